"""A fast training loss for the reparametrized VAE: Trace_ELBO's numbers without Pyro's tracing.

For a guide whose only site is ``z ~ q(z|x)`` with pathwise gradients and a model
``z ~ p(z), x ~ p(x|z)`` inside one data plate, Pyro's Trace_ELBO surrogate has no
score-function term and equals minus the Monte Carlo ELBO itself (Kingma & Welling 2014, eq. 10):

    loss = -(N / B) * (1 / K) * sum_k sum_n [log p(x_n|z_nk) + log p(z_nk) - log q(z_nk|x_n)],
    z_nk = loc_n + scale_n * eps_nk,   eps_nk ~ N(0, I),

with N the dataset size, B the minibatch and K the particles. TraceMeanField_ELBO replaces
``log p(z) - log q(z|x)`` by ``-KL(q || p)`` in closed form. :class:`FastELBO` computes exactly this
with the VAE's own encoder, decoder and prior and draws ``eps`` from the global torch generator
the way Pyro's sample site does, so with the same seed it gives Trace_ELBO's loss and gradients
(up to float rounding). :func:`choose_training_loss` uses it only where the traced program has
that structure and a probe -- loss and gradients of both on the same noise -- agrees; everything
else trains through the estimator's own Pyro ELBO.

Under data parallelism every rank draws the noise of the whole global minibatch and keeps its
own rows, so a run gives the same result whatever the number of processes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import kl_divergence

from ..program import inspect_program, param_scope
from . import (
    GENERIC,
    PathChoice,
    diagonal_normal_problem,
    infer_problem,
    one_latent_problem,
    record,
)

if TYPE_CHECKING:
    from ...config import Config
    from ...models.vae import VAE
    from ..estimators import Estimator

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
#: The surrogates FastELBO reproduces, and whether each integrates the KL in closed form.
SURROGATES = {"pathwise": False, "analytic-kl": True}
#: Images of the probe on which FastELBO is compared with the estimator's own ELBO.
PROBE_IMAGES = 16


class FastELBO(nn.Module):
    """Minus the ELBO of a minibatch as Trace_ELBO (or TraceMeanField_ELBO) computes it.

    A module (its submodule is the VAE) so that DistributedDataParallel can wrap it: calling
    it returns the scalar loss whose ``backward()`` gives Trace_ELBO's gradients.

    Args:
        vae: the model whose encoder, decoder and prior are used.
        num_data: dataset size N; the minibatch terms are scaled by N / B (None: no scaling).
        num_particles: K samples of z per image, averaged.
        analytic_kl: use KL(q || p) in closed form, as TraceMeanField_ELBO does.
        rank, world_size: this process's place among data-parallel processes; the noise of
            the whole global minibatch (``world_size`` times this one) is drawn, rows
            ``rank * B`` to ``(rank + 1) * B`` are used.
    """

    def __init__(self, vae: VAE, num_data: int | None = None, num_particles: int = 1,
                 analytic_kl: bool = False, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.vae = vae
        self.num_data = num_data
        self.num_particles = num_particles
        self.analytic_kl = analytic_kl
        self.rank, self.world_size = rank, world_size

    def _noise(self, loc: torch.Tensor) -> torch.Tensor:
        batch = loc.shape[0]
        shape = (batch * self.world_size, *loc.shape[1:])
        if self.num_particles > 1:
            shape = (self.num_particles, *shape)
        # Same draw as Normal.rsample inside Pyro's sample site (and its particle plate).
        eps = torch.randn(shape, dtype=loc.dtype, device=loc.device)
        if self.world_size > 1:
            eps = eps.narrow(-2, self.rank * batch, batch)
        return eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        weight = float(getattr(vae, "kl_weight", 1.0))  # the latent sites' poutine.scale
        # Argument validation happens once per distribution in Pyro's path too; here the
        # trainer checks the loss and gradients for non-finite values instead.
        with dist.validation_enabled(False):
            q = vae.encoder(x)
            if not (isinstance(q, dist.Independent) and isinstance(q.base_dist, dist.Normal)
                    and q.reinterpreted_batch_ndims == 1):
                raise TypeError(f"the fast path needs an encoder returning a diagonal Normal, "
                                f"got {type(q).__name__}")
            loc, scale = q.base_dist.loc, q.base_dist.scale
            eps = self._noise(loc)
            z = loc + scale * eps
            log_px = vae.decoder(z).log_prob(x)
            prior = vae.prior()
            if self.analytic_kl:
                kl = kl_divergence(q, prior).sum()
                elbo = log_px.sum() / self.num_particles - weight * kl
            else:
                # log q(z|x) at z = loc + scale * eps, written with eps (same value and gradient
                # as Normal.log_prob(z), one division fewer).
                log_qz = -(0.5 * eps.square() + scale.log()).sum(-1) - loc.shape[-1] * _HALF_LOG_2PI
                elbo = (log_px + weight * (prior.log_prob(z) - log_qz)).sum() / self.num_particles
        scale_factor = 1.0 if self.num_data is None else self.num_data / x.shape[0]
        return -elbo * scale_factor


class RelaxedDrawELBO(nn.Module):
    """Minus the relaxed objective of a minibatch as the relaxed estimators' Pyro ELBO
    (:class:`~pyro_vae.inference.discrete.RelaxedELBO`) computes it, without Pyro's tracing.

    The loss is the estimator's own ``draw_loss`` (its surrogate as a function of one draw of
    noise, the function the variance lab differentiates) times the dataset size: for the
    relaxed estimators the surrogate is pathwise, so its value is the objective and its
    gradient Pyro's. The uniforms are drawn from the global generator as the relaxed guide
    site's ``rsample`` draws them; the temperature and density are read from ``elbo`` at every
    call, so an annealed temperature (``elbo.set_progress``) is followed.

    Args:
        vae: the model whose encoder, decoder and prior are used.
        estimator: the registry entry (a ``relaxed`` surrogate with a ``draw_loss``).
        elbo: the run's RelaxedELBO (its ``temperature`` and ``density``).
        num_data: dataset size N; the minibatch terms are scaled by N / B (None: no scaling).
        num_particles: K draws per image, averaged.
    """

    def __init__(self, vae: VAE, estimator: Estimator, elbo: object, num_data: int | None = None,
                 num_particles: int = 1):
        super().__init__()
        self.vae = vae
        self.estimator = estimator
        self.elbo = elbo
        self.num_data = num_data
        self.num_particles = num_particles

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..estimators import Draw

        vae = self.vae
        with dist.validation_enabled(False):
            q = vae.encoder(x)
            shape = (*q.batch_shape, *q.event_shape)
            # the numbers of the guide site's rsample (torch.rand of its shape, particles first;
            # one particle's leading 1 changes no number)
            noise = torch.rand((self.num_particles, *shape), dtype=q.mean.dtype, device=x.device)
            draw = Draw(x, q, noise, vae.decoder, vae.prior(), None, discrete=True,
                        temperature=self.elbo.temperature, relaxed_density=self.elbo.density)
            loss = self.estimator.draw_loss(draw)
        return loss * (x.shape[0] if self.num_data is None else self.num_data)


def _gradients(vae: VAE) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
            for p in vae.parameters()]


def _verify(fast: FastELBO, elbo, vae: VAE, x: torch.Tensor, num_data: int | None,
            seed: int = 12345) -> str | None:
    """Loss and gradients of ``fast`` and of Pyro's ``elbo`` on the same noise; why they
    differ, or None. Gradients, the RNG and the param store are left as they were."""
    saved = [p.grad for p in vae.parameters()]
    devices = [x.device] if x.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), param_scope():
            for p in vae.parameters():
                p.grad = None
            torch.manual_seed(seed)
            want = elbo.loss_and_grads(vae.model, vae.guide, x, num_data=num_data)
            want_grads = _gradients(vae)
            for p in vae.parameters():
                p.grad = None
            torch.manual_seed(seed)
            with dist.validation_enabled(False):
                loss = fast(x)
            loss.backward()
            got, got_grads = loss.item(), _gradients(vae)
    finally:
        for p, g in zip(vae.parameters(), saved, strict=True):
            p.grad = g
    if not math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-3):
        return f"the probe's loss differs from the estimator's ELBO ({got:.6g} vs {want:.6g})"
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(got_grads, want_grads))
    norm = sum(float(b.pow(2).sum()) for b in want_grads)
    if diff > 1e-6 * norm + 1e-12:
        return (f"the probe's gradients differ from the estimator's ELBO (relative "
                f"{math.sqrt(diff / max(norm, 1e-30)):.2g})")
    return None


def _probe_problem(fast: nn.Module, cfg: Config, estimator: Estimator, vae: VAE,
                   x: torch.Tensor, num_data: int | None) -> str | None:
    """:func:`_verify` against a fresh copy of the estimator's Pyro ELBO; a probe that cannot
    run is a reason too (Pyro then decides)."""
    try:
        return _verify(fast, estimator.make_elbo(cfg), vae, x, num_data)
    except Exception as e:  # noqa: BLE001 - an ELBO or program the probe cannot run: Pyro decides
        return f"the probe failed ({type(e).__name__}: {str(e)[:80]})"


def _choose_relaxed(cfg: Config, vae: VAE, estimator: Estimator, x: torch.Tensor,
                    num_data: int | None, world_size: int, elbo: object | None, generic: Any
                    ) -> tuple[RelaxedDrawELBO | None, PathChoice]:
    """:class:`RelaxedDrawELBO` where the program is one discrete latent site in one data
    plate, unscaled, and a probe agrees with the estimator's Pyro ELBO."""
    if world_size > 1:
        return generic("data-parallel: the relaxed fast path draws one process's noise")
    if cfg.train.beta != 1.0 or cfg.train.kl_warmup_epochs:
        # draw_loss has no KL weight, and a warm-up's first weight may be 1 by chance
        return generic("a KL weight (--beta or --kl-warmup-epochs) scales the latent sites, "
                       "which the relaxed fast path does not")
    probe = x[:PROBE_IMAGES]
    structure = inspect_program(vae, probe, num_data)
    problem = one_latent_problem(structure, latent_scale=1.0)
    if problem is None:
        problem = infer_problem(structure.guide_sites[0])
    if problem is not None:
        return generic(problem)
    elbo = elbo if elbo is not None else estimator.make_elbo(cfg)
    particles = cfg.train.num_particles or 1
    fast = RelaxedDrawELBO(vae, estimator, elbo, num_data, particles)
    problem = _probe_problem(fast, cfg, estimator, vae, probe, num_data)
    if problem is not None:
        return generic(problem)
    return fast, record(PathChoice(
        "training loss", "RelaxedDrawELBO", f"one discrete latent site, relaxed; the estimator's "
        f"draw_loss: loss and gradients equal {type(elbo).__name__} on a probe"))


def choose_training_loss(cfg: Config, vae: VAE, estimator: Estimator, x: torch.Tensor,
                         num_data: int | None, rank: int = 0, world_size: int = 1,
                         elbo: object | None = None
                         ) -> tuple[nn.Module | None, PathChoice]:
    """:class:`FastELBO` (or, for the relaxed estimators, :class:`RelaxedDrawELBO`) where it
    reproduces ``estimator``'s Pyro ELBO for this program, else None (train through Pyro);
    with the recorded choice. ``elbo``: the run's Pyro ELBO, whose annealed temperature the
    relaxed fast path follows (default: a new one from ``cfg``).

    Args:
        cfg: the run's config (``train.fast_path`` false forces Pyro).
        vae: the model whose ``model`` and ``guide`` are inspected.
        estimator: the registry entry the run trains with.
        x: a minibatch to trace and probe on (its first PROBE_IMAGES images are used).
        num_data: the dataset size (the plate's subsampling scale).
    """
    what = "training loss"
    elbo_name = type(estimator.make_elbo(cfg)).__name__

    def generic(reason: str) -> tuple[None, PathChoice]:
        return None, record(PathChoice(what, f"{GENERIC} ({elbo_name})", reason))

    if not getattr(cfg.train, "fast_path", True):
        return generic("--no-fast-path")
    if estimator.surrogate == "relaxed" and estimator.draw_loss is not None:
        return _choose_relaxed(cfg, vae, estimator, x, num_data, world_size, elbo, generic)
    if estimator.surrogate not in SURROGATES:
        return generic(f"estimator {estimator.name} has a {estimator.surrogate} surrogate")
    probe = x[:PROBE_IMAGES]
    structure = inspect_program(vae, probe, num_data)
    problem = one_latent_problem(structure, latent_scale=float(getattr(vae, "kl_weight", 1.0)))
    if problem is None:
        site = structure.guide_sites[0]
        problem = (diagonal_normal_problem(site) or infer_problem(site)
                   or (None if site.has_rsample else f"guide site {site.name!r} is not "
                       f"reparametrized"))
    if problem is not None:
        return generic(problem)
    analytic = SURROGATES[estimator.surrogate]
    particles = cfg.train.num_particles or 1
    check = FastELBO(vae, num_data, particles, analytic_kl=analytic)
    problem = _probe_problem(check, cfg, estimator, vae, probe, num_data)
    if problem is not None:
        return generic(problem)
    fast = FastELBO(vae, num_data, particles, analytic_kl=analytic, rank=rank,
                    world_size=world_size)
    weighted = ", latent sites scaled by the KL weight" if structure.guide_sites[0].extra_scale \
        != 1.0 else ""
    return fast, record(PathChoice(
        what, "FastELBO", f"one diagonal-Normal latent, pathwise{weighted}; loss and gradients "
        f"equal {elbo_name} on a probe"))
