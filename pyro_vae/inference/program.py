"""The VAE's Pyro program as the one definition of every number the package reports.

Everything here is read off the traces of ``vae.guide`` and ``vae.model``: z is drawn by the
guide's own distribution (``rsample`` or ``sample``), densities come from each site's own
``log_prob``, masks are applied, and whatever poutine handlers the user put into the program
shape the trace the same way they shape Pyro's ELBOs. Per-image numbers (ELBO terms,
importance weights) use the unscaled densities: the plate's subsampling scale and any
``poutine.scale`` weight the *objective*, not log p(x).

* :func:`trace_program` traces the guide with K vectorized draws (a particle plate left of
  the program's own plates) and replays the model on them;
* :func:`log_weights` gives log p(x, z_k) - log q(z_k|x) per particle and image;
* :func:`elbo_parts` splits the ELBO into reconstruction and KL (closed form wherever
  ``torch.distributions.kl_divergence`` knows the pair of site distributions);
* :func:`inspect_program` summarises the program's structure (sites, distribution types,
  rsample, plates, infer options, scales) for the accelerators to check against
  (:mod:`pyro_vae.inference.accelerators`).

The per-image axis is the rightmost batch dimension (``VAE.data_plate``, dim -1); any further
plates the user adds to the program are summed within each image.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch.distributions import kl_divergence

if TYPE_CHECKING:
    from ..models.vae import VAE

#: Name of the particle plate wrapped around the program.
PARTICLE_PLATE = "_pyro_vae_particles"


def is_subsample(fn: Any) -> bool:
    """Whether a sample site's ``fn`` is the subsample index a ``pyro.plate`` records (Pyro's
    internal ``_Subsample``, matched by name): no random variable of the program."""
    return type(fn).__name__ == "_Subsample"


@dataclass
class ProgramTraces:
    """The guide's trace and the model's trace replayed on it, with K particles."""

    model: poutine.Trace
    guide: poutine.Trace
    num_particles: int

    def sample_sites(self, which: str) -> Iterator[dict[str, Any]]:
        trace = self.model if which == "model" else self.guide
        for site in trace.nodes.values():
            if site["type"] == "sample" and not site["infer"].get("_do_not_trace") \
                    and not site.get("is_auxiliary"):
                if is_subsample(site["fn"]):
                    continue
                yield site


@contextmanager
def param_scope(carry: tuple[str, ...] = ()) -> Iterator[None]:
    """A fresh Pyro param store for the duration: ``pyro.module`` then uses the modules' own
    parameters (not a stale store entry of the same name), and nothing is added to or replaced
    in the caller's store. The caller's store holds the same objects afterwards.

    Args:
        carry: names of the caller's entries (e.g. a moving-average baseline) whose values are
            copied in, as plain tensors: read and updated inside, unchanged outside.
    """
    store = pyro.get_param_store()
    state = {"params": {}, "constraints": {}}
    for name in carry:
        if name in store:
            value = store[name].detach().as_subclass(torch.Tensor).clone()
            state["params"][name] = value.requires_grad_()
            state["constraints"][name] = store._constraints[name]
    with store.scope(state):
        yield


@contextmanager
def running_estimator(vae: VAE, estimator: Any) -> Iterator[None]:
    """``vae.model`` and ``vae.guide`` run with ``estimator`` (a registry entry) for the
    duration, in a fresh param store (:func:`param_scope`); afterwards the VAE's own
    estimator is back and its gradients are cleared."""
    old, vae.estimator = vae.estimator, estimator
    try:
        with param_scope():
            yield
    finally:
        vae.estimator = old
        vae.zero_grad(set_to_none=True)


def _max_plate_nesting(vae: VAE, x: torch.Tensor, num_data: int | None) -> int:
    devices = [x.device] if x.device.type == "cuda" else []
    with poutine.block(), param_scope(), torch.no_grad(), torch.random.fork_rng(devices=devices):
        guide = poutine.trace(vae.guide).get_trace(x[:1], num_data)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x[:1], num_data)
    dims = [-f.dim for t in (guide, model) for site in t.nodes.values()
            if site["type"] == "sample" for f in site["cond_indep_stack"] if f.vectorized]
    return max(dims, default=1)


def trace_program(vae: VAE, x: torch.Tensor, num_particles: int = 1,
                  num_data: int | None = None, plate_nesting: int | None = None
                  ) -> ProgramTraces:
    """Trace ``vae.guide(x)`` with ``num_particles`` vectorized draws and replay ``vae.model``.

    Draws come from the global torch RNG, exactly as in ``Trace_ELBO(vectorize_particles=True)``.
    Gradients flow (call under ``torch.no_grad()`` when only values are wanted). The caller's
    param store is not touched (:func:`param_scope`).
    """
    if plate_nesting is None:
        plate_nesting = _max_plate_nesting(vae, x, num_data)

    def wrapped(fn):
        def run(*args: Any) -> Any:
            with pyro.plate(PARTICLE_PLATE, num_particles, dim=-(plate_nesting + 1)):
                return fn(*args)
        return run

    with param_scope():
        guide = poutine.trace(wrapped(vae.guide)).get_trace(x, num_data)
        model = poutine.trace(poutine.replay(wrapped(vae.model), trace=guide)).get_trace(
            x, num_data)
    return ProgramTraces(model, guide, num_particles)


def site_log_prob(site: dict[str, Any], num_particles: int, batch: int) -> torch.Tensor:
    """The site's unscaled, masked log-density per particle and image, ``(K, batch)``."""
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value)
    mask = site["mask"]
    if mask is not None and mask is not True:
        lp = torch.where(torch.as_tensor(mask, device=lp.device), lp, torch.zeros_like(lp))
    return _per_image(lp, num_particles, batch)


def _per_image(t: torch.Tensor, num_particles: int, batch: int) -> torch.Tensor:
    """``(K, ..., batch)`` -> ``(K, batch)``: plates between particles and images are summed."""
    while t.dim() < 2:
        t = t.unsqueeze(0)
    if t.dim() > 2:
        t = t.reshape(t.shape[0], -1, t.shape[-1]).sum(1)
    return t.expand(num_particles, batch)


def log_weights(traces: ProgramTraces, batch: int) -> torch.Tensor:
    """log p(x, z_k) - log q(z_k|x) per particle and image, ``(K, batch)``."""
    k = traces.num_particles
    total = 0.0
    for site in traces.sample_sites("model"):
        total = total + site_log_prob(site, k, batch)
    for site in traces.sample_sites("guide"):
        total = total - site_log_prob(site, k, batch)
    return torch.as_tensor(total).expand(k, batch)


@dataclass
class ElboParts:
    """Per-particle, per-image parts of the ELBO, ``(K, batch)`` each.

    ``reconstruction`` sums the observed sites' log p(x|z); ``kl`` is KL(q || p) of the latent
    sites, in closed form when ``closed_form`` (every latent site's pair of distributions has a
    registered ``kl_divergence``), else log q(z|x) - log p(z) at the drawn z.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    closed_form: bool


def elbo_parts(traces: ProgramTraces, batch: int, closed_form: bool = True) -> ElboParts:
    """Reconstruction and KL terms of each particle's ELBO (Kingma & Welling 2014, eq. 7)."""
    k = traces.num_particles
    recon = torch.zeros(k, batch)
    log_p_latent = torch.zeros(k, batch)
    model_latents = {}
    for site in traces.sample_sites("model"):
        lp = site_log_prob(site, k, batch)
        recon = recon.to(lp)
        log_p_latent = log_p_latent.to(lp)
        if site["is_observed"]:
            recon = recon + lp
        else:
            log_p_latent = log_p_latent + lp
            model_latents[site["name"]] = site
    log_q = torch.zeros_like(log_p_latent)
    guide_sites = list(traces.sample_sites("guide"))
    for site in guide_sites:
        log_q = log_q + site_log_prob(site, k, batch)
    mc_kl = log_q - log_p_latent
    if not closed_form or set(model_latents) != {s["name"] for s in guide_sites}:
        return ElboParts(recon, mc_kl, False)
    kl = torch.zeros_like(mc_kl)
    for site in guide_sites:
        model_site = model_latents[site["name"]]
        if site["mask"] is not None or model_site["mask"] is not None:
            return ElboParts(recon, mc_kl, False)
        try:
            term = kl_divergence(site["fn"], model_site["fn"])
        except NotImplementedError:
            return ElboParts(recon, mc_kl, False)
        kl = kl + _per_image(term, k, batch)
    return ElboParts(recon, kl, True)


# -- structure ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SiteInfo:
    """What an accelerator may ask of one sample site.

    Attributes:
        name: the site's name.
        observed: whether it is conditioned on data.
        types: the distribution's class and, for ``Independent``/``ExpandedDistribution``
            wrappers, the classes inside, outermost first (``(Independent, Normal)``).
        reinterpreted_ndims: batch dims an ``Independent`` turned into event dims (0 if none).
        has_rsample: whether Pyro takes a pathwise gradient at this site.
        event_shape: the distribution's event shape.
        infer: the site's infer options (baselines, enumeration, ...).
        extra_scale: the site's scale divided by the plates' subsampling scale: 1.0 unless a
            ``poutine.scale`` (or ``pyro.factor``-like weighting) acts on the site.
        masked: whether a mask acts on the site.
        plates: names of the plates the site is in, outermost first.
    """

    name: str
    observed: bool
    types: tuple[type, ...]
    reinterpreted_ndims: int
    has_rsample: bool
    event_shape: tuple[int, ...]
    infer: tuple[tuple[str, Any], ...]
    extra_scale: float
    masked: bool
    plates: tuple[str, ...]


@dataclass
class ProgramStructure:
    """The sample sites of the guide and the model, and the plates they sit in."""

    guide_sites: list[SiteInfo]
    model_sites: list[SiteInfo]

    @property
    def latent_sites(self) -> list[SiteInfo]:
        return [s for s in self.model_sites if not s.observed]

    @property
    def observed_sites(self) -> list[SiteInfo]:
        return [s for s in self.model_sites if s.observed]


def _types(fn: dist.Distribution) -> tuple[tuple[type, ...], int]:
    types, ndims = [], 0
    while True:
        types.append(type(fn))
        if isinstance(fn, torch.distributions.Independent):
            ndims += fn.reinterpreted_batch_ndims
            fn = fn.base_dist
        elif isinstance(fn, (dist.ExpandedDistribution, dist.MaskedDistribution)):
            fn = fn.base_dist
        else:
            return tuple(types), ndims


def _site_info(site: dict[str, Any]) -> SiteInfo:
    types, ndims = _types(site["fn"])
    plate_scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.size:
            plate_scale *= float(frame.full_size) / float(frame.size)
    scale = site["scale"]
    scale = float(scale) if not isinstance(scale, torch.Tensor) or scale.numel() == 1 else None
    extra = scale / plate_scale if scale is not None else float("nan")
    infer = tuple(sorted((k, v) for k, v in site["infer"].items()
                         if not k.startswith("_") and not isinstance(v, torch.Tensor)
                         and not isinstance(v, dict)))
    infer += tuple((k, "...") for k, v in sorted(site["infer"].items())
                   if isinstance(v, (dict, torch.Tensor)))
    return SiteInfo(site["name"], bool(site["is_observed"]), types, ndims,
                    bool(site["fn"].has_rsample), tuple(site["fn"].event_shape), infer, extra,
                    site["mask"] is not None,
                    tuple(f.name for f in reversed(site["cond_indep_stack"])))


@torch.no_grad()
def inspect_program(vae: VAE, x: torch.Tensor, num_data: int | None = None
                    ) -> ProgramStructure:
    """Trace the program once on ``x`` (RNG and param store untouched) and describe it."""
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            param_scope():
        guide = poutine.trace(vae.guide).get_trace(x, num_data)
        model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x, num_data)
    guide_sites = [_site_info(s) for s in guide.nodes.values() if s["type"] == "sample"
                   and not is_subsample(s["fn"])]
    model_sites = [_site_info(s) for s in model.nodes.values() if s["type"] == "sample"
                   and not is_subsample(s["fn"])]
    return ProgramStructure(guide_sites, model_sites)
