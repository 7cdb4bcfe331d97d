"""Gradient-variance measurement: how noisy is each estimator's ELBO gradient? No I/O here.

Protocol (Rainforth et al. 2018; Mohamed et al. 2020, section 8): parameters frozen at a
checkpoint, one fixed minibatch shared by every estimator, R independent gradient draws per
estimator with no optimizer step. Per parameter, the mean and variance over draws are
accumulated in float64; they are summarised per parameter group (encoder, decoder, each layer):

* ``trace``: trace of the covariance, sum of per-parameter variances;
* ``mean_variance``: trace / number of parameters;
* ``relative_variance``: trace / ||mean gradient||^2;
* ``snr``: mean over parameters of |mean| / std;
* ``cosine``: cosine between the mean gradient and a high-R reparametrized oracle's.

Gradients are of the per-image negative ELBO (Pyro's surrogate divided by the batch size).

Speed: each estimator's :attr:`~pyro_vae.estimators.Estimator.draw_loss` is its Pyro surrogate
written as a function of one draw of noise; ``torch.func.vmap(torch.func.grad(...))`` over a
chunk of draws gives all their gradients at once, and the encoder's forward pass (the same for
every draw, since x is fixed) is computed once per chunk instead of once per draw. The result
equals a loop over Pyro's ``loss_and_grads`` draw for draw (tests/test_variance.py).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import pyro
import torch
from torch import nn
from torch.func import functional_call, grad, vjp, vmap

from .errors import ConfigError
from .estimators import AVG_BASELINE_PARAM, ESTIMATORS, Draw, Estimator
from .mlp_gradients import MLPGradients, unsupported_reason
from .model import VAE

#: Matrix-product precision of the vectorized draws -> context manager.
PRECISIONS: dict[str, Callable[[], Any]] = {
    "float32": contextlib.nullcontext,
    "bfloat16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
}
#: The same, as the dtype of the hand-written products (:mod:`pyro_vae.mlp_gradients`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
#: Parameter groups always reported besides the per-layer ones.
TOP_GROUPS = ("encoder", "decoder", "prior")


# -- parameter groups -----------------------------------------------------------------------------
def measured_parameters(vae: VAE) -> dict[str, torch.Tensor]:
    """The parameters whose gradients are measured: encoder, decoder and prior (not baselines)."""
    return {name: p for name, p in vae.named_parameters()
            if name.split(".", 1)[0] in TOP_GROUPS and p.requires_grad}


def parameter_groups(names: Sequence[str]) -> dict[str, list[str]]:
    """``encoder``, ``decoder`` (and ``prior``) plus one group per layer (``decoder.net.2``)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        top = name.split(".", 1)[0]
        groups.setdefault(top, []).append(name)
        layer = name.rsplit(".", 1)[0]
        if layer != top:
            groups.setdefault(layer, []).append(name)
    return groups


# -- state that a measurement must leave untouched ------------------------------------------------
@contextmanager
def preserved_state(vae: VAE):
    """Restore the VAE's parameters, grads, training mode, the param store and the RNG on exit."""
    params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in vae.named_parameters()}
    store = pyro.get_param_store().get_state()
    store = {"params": {k: v.detach().clone() for k, v in store["params"].items()},
             "constraints": dict(store["constraints"])}
    rng = torch.get_rng_state()
    training = vae.training
    try:
        yield
    finally:
        vae.load_state_dict(params)
        for k, p in vae.named_parameters():
            p.grad = grads[k]
        pyro.get_param_store().set_state(store)
        torch.set_rng_state(rng)
        vae.train(training)


@contextmanager
def _no_validation():
    # Argument checks branch on tensor values, which vmap cannot do; the inputs come from a
    # trained network and were validated when it was trained.
    previous = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        torch.distributions.Distribution.set_default_validate_args(previous)


def baseline_for(estimator: Estimator, vae: VAE, x: torch.Tensor,
                 train_scale: float = 1.0) -> torch.Tensor | None:
    """The baseline per image the estimator subtracts at this checkpoint (unscaled), or None.

    The moving average lives in Pyro's param store, in the plate-scaled units of training
    (``train_scale`` = dataset size / training batch size); it has one slot per batch position,
    so for another batch size its mean over positions is used.
    """
    if estimator.baseline == "nn":
        if "baseline" not in vae.estimator_modules:
            raise ConfigError(f"estimator {estimator.name} needs a run trained with it (its "
                              f"neural baseline is learned during training)")
        with torch.no_grad():
            return vae.estimator_modules["baseline"](x, 1.0).detach()
    if estimator.baseline == "avg":
        store = pyro.get_param_store()
        if AVG_BASELINE_PARAM not in store:
            return _mean_learning_signal(vae, x).expand(x.shape[0]).clone()
        value = store[AVG_BASELINE_PARAM].detach() / train_scale
        if value.shape != (x.shape[0],):
            value = value.mean().expand(x.shape[0])
        return value.clone()
    return None


@torch.no_grad()
def _mean_learning_signal(vae: VAE, x: torch.Tensor, num_draws: int = 20) -> torch.Tensor:
    """Fixed point of the moving-average baseline: the mean of log p(x, z) - log q(z|x).

    Used for checkpoints of runs not trained with that baseline (the moving average then has
    never been updated; at stationarity it tracks this mean).
    """
    q = vae.encoder(x)
    z = q.sample((num_draws,))
    signal = vae.decoder(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    return signal.mean()


# -- accumulation ---------------------------------------------------------------------------------
class _Moments:
    """Per-parameter sums of (g - reference) and its square in float64, and per-draw scalars.

    Shifting by a reference close to the mean (the oracle) keeps sum-of-squares accurate.
    """

    def __init__(self, reference: dict[str, torch.Tensor], groups: dict[str, list[str]]):
        self.reference = reference
        self.groups = groups
        self.count = 0
        self.sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
        self.sumsq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
        # per draw, per group: ||g - ref||^2 and (g - ref) . ref, for the bootstrap
        self.sq_dev: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.dot_ref: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.kernel: Callable[..., Any] | None = None  # compiled _chunk_moments, if any
        self.kernel_draws = 0  # the chunk size it was compiled for

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        """Add a chunk of draws ``{name: (n, *shape)}`` (any float dtype)."""
        names = list(grads)
        n = grads[names[0]].shape[0]
        args = ([grads[k] for k in names], [self.reference[k] for k in names])
        parts = self.kernel(*args) if self.kernel is not None and n == self.kernel_draws \
            else _chunk_moments(*args)
        sq_norms, dots = {}, {}
        for k, (total, total_sq, sq_norm, dot) in zip(names, parts):
            self.sum[k] += total.double().view_as(self.sum[k])
            self.sumsq[k] += total_sq.double().view_as(self.sumsq[k])
            sq_norms[k], dots[k] = sq_norm.double(), dot.double()
        for group, members in self.groups.items():
            self.sq_dev[group].append(sum(sq_norms[k] for k in members))
            self.dot_ref[group].append(sum(dots[k] for k in members))
        self.count += n


def _chunk_moments(grads: list[torch.Tensor], references: list[torch.Tensor]
                   ) -> list[tuple[torch.Tensor, ...]]:
    """Per tensor, for a chunk of n draws g: with d = g - reference (float32), the sums over
    draws of d and d^2 (per parameter), and per draw |d|^2 and d . reference.

    Eagerly each operation is a pass over n x parameters of memory (about 3 ns per element
    on a small CPU); compiled (:func:`_compiled_moments`) it is one fused loop, about ten
    times faster.
    """
    out = []
    for g, ref in zip(grads, references, strict=True):
        ref = ref.reshape(-1).float()
        d = g.reshape(g.shape[0], -1).float() - ref
        d2 = d * d
        out.append((d.sum(0), d2.sum(0), d2.sum(1), d @ ref))
    return out


_COMPILED_MOMENTS: dict[tuple, Any] = {}


def _compiled_moments(example: dict[str, torch.Tensor],
                      reference: dict[str, torch.Tensor]) -> Callable[..., Any] | None:
    """:func:`_chunk_moments` compiled for chunks shaped like ``example``, or None when
    torch.compile cannot build it here (no C++ compiler, unsupported platform). The first
    call is checked against the eager function."""
    key = tuple((k, tuple(v.shape), v.dtype) for k, v in example.items())
    if key not in _COMPILED_MOMENTS:
        kernel = None
        try:
            kernel = torch.compile(_chunk_moments, dynamic=False)
            args = (list(example.values()), [reference[k] for k in example])
            for got, want in zip(kernel(*args), _chunk_moments(*args), strict=True):
                # sums of squares have no cancellation: compare relatively; the signed sums
                # (which cancel) within a small fraction of their root-sum-of-squares scale
                scale = float(want[1].sum().sqrt() + want[2].sum().sqrt()) + 1e-30
                for u, v in zip(got, want, strict=True):
                    if not torch.allclose(u, v, rtol=1e-3, atol=1e-4 * scale):
                        raise RuntimeError("compiled moments disagree with eager ones")
        except Exception:  # noqa: BLE001 - any failure means: accumulate eagerly
            kernel = None
        _COMPILED_MOMENTS[key] = kernel
    return _COMPILED_MOMENTS[key]


def _summary(m: _Moments, oracle: dict[str, torch.Tensor], num_bootstrap: int,
             generator: torch.Generator) -> dict[str, dict[str, Any]]:
    r = m.count
    out: dict[str, dict[str, Any]] = {}
    boot_idx = torch.randint(0, r, (num_bootstrap, r), generator=generator)
    for group, names in m.groups.items():
        mean = torch.cat([(m.reference[k].double() + m.sum[k] / r).reshape(-1) for k in names])
        shift = torch.cat([(m.sum[k] / r).reshape(-1) for k in names])
        sumsq = torch.cat([m.sumsq[k].reshape(-1) for k in names])
        var = ((sumsq - r * shift ** 2) / (r - 1)).clamp_min(0.0)
        ref = torch.cat([oracle[k].double().reshape(-1) for k in names])
        trace = var.sum().item()
        norm2 = (mean ** 2).sum().item()
        std = var.sqrt()
        ok = std > 0
        snr = ((mean.abs()[ok] / std[ok]).mean().item()) if bool(ok.any()) else math.inf
        ref_norm = ref.norm().item()
        cosine = (mean @ ref).item() / max(math.sqrt(norm2) * ref_norm, 1e-300)
        # Bootstrap over draws. ||mean* - ref||^2 is held at its full-sample value; it is
        # O(trace / R) for unbiased estimators, a correction small next to the resampled term.
        sq_dev = torch.cat(m.sq_dev[group])
        dot = torch.cat(m.dot_ref[group])
        shift2 = (shift ** 2).sum().item()
        trace_b = r / (r - 1) * (sq_dev[boot_idx].mean(1) - shift2)
        dot_b = dot[boot_idx].mean(1)
        norm2_b = (ref_norm ** 2 + 2 * dot_b + shift2).clamp_min(1e-300)
        cosine_b = (ref_norm ** 2 + dot_b) / (norm2_b.sqrt() * max(ref_norm, 1e-300))
        out[group] = {
            "num_params": int(mean.numel()), "trace": trace, "mean_variance": trace / mean.numel(),
            "relative_variance": trace / max(norm2, 1e-300), "snr": snr, "cosine": cosine,
            "mean_norm": math.sqrt(norm2),
            "trace_ci": _interval(trace_b), "mean_variance_ci": _interval(trace_b / mean.numel()),
            "cosine_ci": _interval(cosine_b),
            "_trace_boot": trace_b,  # removed before returning; used for ratio intervals
        }
    return out


def _interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    lo, hi = torch.quantile(samples.double(), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                           dtype=torch.float64)).tolist()
    return [lo, hi]


# -- drawing gradients ----------------------------------------------------------------------------
class _Bound(nn.Module):
    """``fn(vae, *args)`` as a module, so ``functional_call`` swaps *every* use of a parameter.

    A prior may use the encoder (the VampPrior evaluates q(z|u_k) at its pseudo-inputs); calling
    the prior's own ``functional_call`` would leave that path on the real, unswapped encoder and
    silently drop the encoder gradient that flows through log p(z).
    """

    def __init__(self, vae: VAE, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.vae = vae
        self.fn = fn

    def forward(self, *args: Any) -> torch.Tensor:
        return self.fn(self.vae, *args)


def _draw_of(vae: VAE, estimator: Estimator, x: torch.Tensor, q: Any, eps: torch.Tensor,
             baseline: torch.Tensor | None) -> torch.Tensor:
    draw = Draw(x, q, eps, vae.decoder, vae.prior(), baseline)
    return estimator.draw_loss(draw)


def _functional_loss(vae: VAE, estimator: Estimator, x: torch.Tensor,
                     baseline: torch.Tensor | None) -> Callable[..., torch.Tensor]:
    """``(params, eps) -> loss`` of one draw, every module (the prior's encoder too) swapped."""
    bound = _Bound(vae, lambda v, eps: _draw_of(v, estimator, x, v.encoder(x), eps, baseline))

    def loss(params: dict[str, torch.Tensor], eps: torch.Tensor) -> torch.Tensor:
        return functional_call(bound, {f"vae.{k}": v for k, v in params.items()}, (eps,))

    return loss


def _prior_uses_encoder(vae: VAE) -> bool:
    return isinstance(getattr(vae.prior, "encoder", None), nn.Module)


def _split_per_draw(vae: VAE, estimator: Estimator, x: torch.Tensor,
                    baseline: torch.Tensor | None, params: dict[str, torch.Tensor]
                    ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``eps -> per-draw gradients`` with the encoder's forward pass shared by all draws.

    The encoder sees the same x in every draw, so its forward pass and its vector-Jacobian
    product are built once (``torch.func.vjp``); only the cotangents at q's loc and scale differ
    per draw. Pulling a chunk of them back at once (``vmap`` of the vjp) turns each encoder
    layer's per-draw weight gradients into one matrix product against the shared activations.
    The decoder and prior, whose inputs (z) differ per draw, are differentiated per draw with
    ``vmap(grad(...))``. Only valid when the prior does not use the encoder.
    """
    enc = {k[len("encoder."):]: v for k, v in params.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in params.items() if not k.startswith("encoder.")}
    with torch.no_grad():
        template = vae.encoder(x)

    def encode(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        base = functional_call(vae.encoder, p, (x,)).base_dist
        return base.loc, base.scale

    (loc, scale), pull_back = vjp(encode, enc)
    bound = _Bound(vae, lambda v, q, eps: _draw_of(v, estimator, x, q, eps, baseline))

    def rest_loss(loc: torch.Tensor, scale: torch.Tensor, p: dict[str, torch.Tensor],
                  eps: torch.Tensor) -> torch.Tensor:
        base = type(template.base_dist)(loc, scale, validate_args=False)
        q = type(template)(base, template.reinterpreted_batch_ndims, validate_args=False)
        return functional_call(bound, {f"vae.{k}": v for k, v in p.items()}, (q, eps))

    per_draw = vmap(grad(rest_loss, argnums=(0, 1, 2)), in_dims=(None, None, None, 0),
                    randomness="error")

    def draws(eps: torch.Tensor) -> dict[str, torch.Tensor]:
        g_loc, g_scale, g_rest = per_draw(loc, scale, rest, eps)
        (g_enc,) = vmap(pull_back)((g_loc, g_scale))
        return {**{f"encoder.{k}": v for k, v in g_enc.items()}, **g_rest}

    return draws


def _pyro_draws(vae: VAE, estimator: Estimator, x: torch.Tensor, params: dict[str, Any],
                num_draws: int, num_particles: int, baseline: torch.Tensor | None):
    """Yield gradients of R draws from Pyro's own ELBO, one ``loss_and_grads`` per draw."""
    from .config import Config

    cfg = Config()
    cfg.train.num_particles = num_particles
    elbo = estimator.make_elbo(cfg)
    old_estimator = vae.estimator
    vae.estimator = estimator
    store = pyro.get_param_store()
    try:
        for _ in range(num_draws):
            if estimator.baseline == "avg":
                store[AVG_BASELINE_PARAM] = baseline.clone()
            vae.zero_grad(set_to_none=True)
            elbo.loss_and_grads(vae.model, vae.guide, x)
            yield {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()[None]
                   / x.shape[0] for k, p in params.items()}
    finally:
        vae.estimator = old_estimator


def gradient_draws(vae: VAE, estimator: Estimator | str, x: torch.Tensor, num_draws: int, *,
                   num_particles: int = 1, chunk_size: int = 25, train_scale: float = 1.0,
                   vectorized: bool = True, shared_encoder: bool = True,
                   method: str = "auto", precision: str = "float32"):
    """Yield dicts ``{param name: (n, *shape) gradients}`` of ``num_draws`` independent draws.

    ``method`` picks how the draws are computed (all give the same gradients for the same
    noise; tests/test_variance.py checks them against each other):

    * ``"hand"``: the backward pass written out for MLP networks, a Bernoulli likelihood and
      the standard-normal prior (:mod:`pyro_vae.mlp_gradients`), several times faster;
    * ``"func"``: ``torch.func.vmap`` over the estimator's ``draw_loss``;
    * ``"pyro"`` (or ``vectorized=False``): one Pyro ``loss_and_grads`` per draw, the
      reference;
    * ``"auto"``: ``hand`` where it applies, else ``func``, else ``pyro``.

    Noise comes from the global torch RNG. ``shared_encoder=False`` makes ``func``
    differentiate the whole surrogate per draw (encoder included); it is also used when the
    prior depends on the encoder (VampPrior). ``precision`` (``float32`` or ``bf16``) is the
    dtype of the hand-written matrix products; for ``func`` the caller sets autocast.
    """
    estimator = ESTIMATORS[estimator] if isinstance(estimator, str) else estimator
    num_particles = max(num_particles, estimator.min_particles)
    params = measured_parameters(vae)
    with torch.autocast(x.device.type, enabled=False):  # not rounded by the draws' autocast
        baseline = baseline_for(estimator, vae, x, train_scale)
    if method not in ("auto", "hand", "func", "pyro"):
        raise ConfigError(f"unknown method {method!r}; choose from auto, hand, func, pyro")
    if method == "pyro" or not vectorized or (method == "auto" and estimator.draw_loss is None):
        yield from _pyro_draws(vae, estimator, x, params, num_draws, num_particles, baseline)
        return
    latent_dim = vae.prior().event_shape[0]
    reason = unsupported_reason(vae, estimator.name)
    if method == "hand" and reason is not None:
        raise ConfigError(f"method hand: {reason}")
    if method in ("auto", "hand") and reason is None:
        hand = MLPGradients(vae, estimator.name, x, baseline, DTYPES[precision])
        for n in _chunks(num_draws, chunk_size):
            yield hand(torch.randn(n, num_particles, x.shape[0], latent_dim, device=x.device))
        return
    detached = {k: p.detach() for k, p in params.items()}
    with _no_validation():
        if shared_encoder and not _prior_uses_encoder(vae):
            per_draw = _split_per_draw(vae, estimator, x, baseline, detached)
        else:
            full = vmap(grad(_functional_loss(vae, estimator, x, baseline)), in_dims=(None, 0),
                        randomness="error")

            def per_draw(eps: torch.Tensor) -> dict[str, torch.Tensor]:
                return full(detached, eps)
    for n in _chunks(num_draws, chunk_size):
        eps = torch.randn(n, num_particles, x.shape[0], latent_dim, device=x.device)
        with _no_validation():
            yield per_draw(eps)


def _chunks(total: int, size: int):
    done = 0
    while done < total:
        yield min(size, total - done)
        done += size


def oracle_gradient(vae: VAE, x: torch.Tensor, num_draws: int, chunk_size: int = 100,
                    precision: str = "float32") -> dict[str, torch.Tensor]:
    """Mean reparametrized gradient over ``num_draws`` evaluations: the reference for cosines.

    For the MLP VAE with the standard-normal prior (:mod:`pyro_vae.mlp_gradients`) each
    evaluation is the reparametrized gradient with the closed-form KL, and the noise comes in
    antithetic pairs (eps, -eps). Both keep the mean unbiased for the ELBO gradient and both
    lower its variance: on the default 784-400-50 VAE, 1,000 such evaluations have 1.9-16x
    less variance than 2,000 plain reparametrized draws (``scripts/oracle_variance.py``). It is
    the gradient of the ELBO, which every estimator but ``iwae`` estimates (``iwae`` estimates
    the gradient of its K-sample bound). Otherwise the oracle is the mean of plain
    reparametrized draws, each chunk one backward pass with the draws as particles. Nothing
    per draw is kept.
    """
    params = {k: p.detach() for k, p in measured_parameters(vae).items()}
    latent_dim = vae.prior().event_shape[0]
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    if unsupported_reason(vae, "analytic-kl") is None:
        hand = MLPGradients(vae, "analytic-kl", x, dtype=DTYPES[precision])
        shape = (1, x.shape[0], latent_dim)
        # pairs, then (odd num_draws) one draw without a partner
        batches = [(n, True) for n in _chunks(num_draws // 2, max(chunk_size // 8, 1))]
        for n, antithetic in batches + ([(1, False)] if num_draws % 2 else []):
            eps = torch.randn(n, *shape, device=x.device)
            g = hand(torch.cat([eps, -eps]) if antithetic else eps, summed=True)
            for k in total:
                total[k] += g[k].double()
    else:
        loss = _functional_loss(vae, ESTIMATORS["reparam"], x, None)
        for n in _chunks(num_draws, chunk_size):
            eps = torch.randn(n, x.shape[0], latent_dim, device=x.device)
            with _no_validation():
                g = grad(loss)(params, eps)
            for k in total:
                total[k] += g[k].double() * n
    return {k: (v / num_draws).float() for k, v in total.items()}


def measure_gradient_variance(vae: VAE, x: torch.Tensor, estimators: Sequence[str], *,
                              num_draws: int = 1000, oracle_draws: int = 1000,
                              num_particles: int = 1, num_bootstrap: int = 200,
                              chunk_size: int = 25, train_scale: float = 1.0, seed: int = 0,
                              vectorized: bool = True, precision: str = "float32",
                              compile: bool | None = None) -> dict[str, Any]:
    """Gradient mean/variance statistics of each estimator at the VAE's current parameters.

    Nothing is trained and nothing is written: parameters, gradients, Pyro's param store (the
    moving-average baseline) and the global RNG are restored on return.

    Args:
        vae: the model at a checkpoint.
        x: the fixed minibatch (observations, as the model sees them).
        estimators: registry names; ``reparam`` is added if missing (ratios are relative to it).
        num_draws: R, independent gradient draws per estimator.
        oracle_draws: draws of the reparametrized oracle mean gradient.
        num_particles: particles per draw (the importance-weighted bound uses at least 2).
        num_bootstrap: bootstrap resamples of the draws for the confidence intervals.
        chunk_size: draws per vectorized call (memory ~ chunk_size x parameters x 4 bytes).
        train_scale: dataset size / batch size of the training run (units of the stored
            moving-average baseline).
        seed: seeds the noise; the caller's RNG state is restored afterwards.
        vectorized: False measures with a loop over Pyro's ``loss_and_grads`` (slow reference).
        precision: ``float32`` (the default here), or ``bf16`` (the default of ``pyro-vae
            variance --draw-precision``): the draws' and the oracle's matrix products in
            bfloat16 (see :class:`~pyro_vae.mlp_gradients.MLPGradients`; autocast on the
            ``func`` path). Per-draw gradients then differ from float32 by 0.1-0.4%, which
            changes the variances by far less than their intervals (tested).
        compile: accumulate the per-parameter moments with a torch.compile'd kernel (one
            pass over each chunk instead of six; compiling takes seconds, cached on disk
            afterwards). None: when num_draws x parameters exceeds 10^8. Falls back to eager
            when compiling fails.

    Returns:
        ``{"estimators": {name: {"groups": {group: stats}, "seconds_per_draw": s, ...}},
        "oracle_draws": ..., "num_draws": ..., "batch_size": ...}`` with plain numbers only.
    """
    if num_draws < 2:
        raise ConfigError(f"variance needs at least 2 draws, got num_draws = {num_draws}")
    if oracle_draws < 1:
        raise ConfigError(f"oracle_draws must be >= 1, got {oracle_draws}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    names = list(dict.fromkeys(["reparam", *estimators]))
    for name in names:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from "
                              f"{', '.join(ESTIMATORS)}")
    results: dict[str, Any] = {}
    if compile is None:
        compile = num_draws * sum(p.numel() for p in measured_parameters(vae).values()) > 1e8
    compile_seconds = 0.0
    with preserved_state(vae), torch.no_grad():
        vae.eval()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        with torch.enable_grad():
            oracle = oracle_gradient(vae, x, oracle_draws, precision=precision)
        oracle_seconds = time.perf_counter() - start
        groups = parameter_groups(list(oracle))
        boots: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            est = ESTIMATORS[name]
            moments = _Moments(oracle, groups)
            seconds, start = 0.0, time.perf_counter()
            with torch.enable_grad(), PRECISIONS[precision]():
                draws = gradient_draws(vae, est, x, num_draws, num_particles=num_particles,
                                       chunk_size=chunk_size, train_scale=train_scale,
                                       vectorized=vectorized, precision=precision)
                for g in draws:
                    seconds += time.perf_counter() - start
                    g = {k: v.detach() for k, v in g.items()}
                    # the sums are float32/float64 work: no autocast
                    with torch.autocast(x.device.type, enabled=False):
                        if compile and moments.kernel_draws == 0:
                            compile_start = time.perf_counter()
                            moments.kernel = _compiled_moments(g, oracle)
                            moments.kernel_draws = next(iter(g.values())).shape[0]
                            compile_seconds += time.perf_counter() - compile_start
                        moments.add(g)
                    start = time.perf_counter()
            stats = _summary(moments, oracle, num_bootstrap, generator)
            boots[name] = {grp: s.pop("_trace_boot") for grp, s in stats.items()}
            results[name] = {"groups": stats, "seconds_per_draw": seconds / num_draws,
                             "num_particles": max(num_particles, est.min_particles),
                             "score_function": est.score_function}
        for name in names:
            for grp, s in results[name]["groups"].items():
                ref = results["reparam"]["groups"][grp]["trace"]
                s["ratio_to_reparam"] = s["trace"] / max(ref, 1e-300)
                s["ratio_to_reparam_ci"] = _interval(boots[name][grp]
                                                     / boots["reparam"][grp].clamp_min(1e-300))
    return {"estimators": results, "num_draws": num_draws, "oracle_draws": oracle_draws,
            "oracle_seconds": oracle_seconds, "compile_seconds": compile_seconds,
            "batch_size": int(x.shape[0]),
            "groups": {g: len(v) for g, v in groups.items()}}


# -- the experiment: checkpoints along a reference run, sweeps, training curves -------------------
def fixed_minibatch(dataset: Any, cfg: Any, batch_size: int, seed: int = 0) -> torch.Tensor:
    """One minibatch of training images, binarized once, shared by every estimator."""
    from .data import binarize_batch, prepare_observations

    data = prepare_observations(dataset, cfg.data, seed=seed)
    if batch_size > len(data.train):
        raise ConfigError(f"measurement batch size {batch_size} is larger than the "
                          f"{len(data.train)} training images")
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    return binarize_batch(data.train.images[idx[:batch_size]], cfg.data.binarize)


def train_with_snapshots(cfg: Any, dataset: Any, snapshot_steps: Sequence[int],
                         record_every: int = 10) -> tuple[Any, dict[int, dict], dict[str, list]]:
    """Train ``cfg``'s estimator for max(snapshot_steps) steps; keep the states at those steps.

    Returns:
        (trainer, {step: {"vae": state_dict, "store": param-store extras}}, curve) where curve
        holds ``step``, ``seconds`` (training wall-clock) and ``elbo`` (mean training ELBO per
        image over the last ``record_every`` steps).
    """
    from .data import binarize_batch
    from .train import Trainer, _param_store_extras, epoch_order

    trainer = Trainer(cfg, dataset)
    train = trainer.dataset.train.images
    batch = cfg.train.batch_size
    per_epoch = len(train) // batch
    last = max(snapshot_steps)
    snapshots: dict[int, dict] = {}
    curve: dict[str, list] = {"step": [], "seconds": [], "elbo": []}
    seconds, window = 0.0, []
    for step in range(last + 1):
        if step in snapshot_steps:
            snapshots[step] = {"vae": {k: v.detach().clone()
                                       for k, v in trainer.vae.state_dict().items()},
                               "store": _param_store_extras()}
        if step == last:
            break
        epoch, pos = divmod(step, per_epoch)
        if pos == 0:
            order = epoch_order(len(train), cfg.train.seed, epoch)
        x = binarize_batch(train[order[pos * batch:(pos + 1) * batch]], cfg.data.binarize)
        start = time.perf_counter()
        loss = trainer.step(x)
        seconds += time.perf_counter() - start
        if loss is not None:
            window.append(-loss)
        if (step + 1) % record_every == 0 and window:
            curve["step"].append(step + 1)
            curve["seconds"].append(seconds)
            curve["elbo"].append(sum(window) / len(window))
            window = []
    return trainer, snapshots, curve


def variance_experiment(cfg: Any, dataset: Any, estimators: Sequence[str] = (
        "reparam", "score", "score-avg-baseline"), *, checkpoints: Sequence[int] = (
        0, 100, 500, 1000), num_draws: int = 1000, oracle_draws: int = 1000,
        measure_batch: int = 256, latent_dims: Sequence[int] = (),
        batch_sizes: Sequence[int] = (), curve_steps: int = 0, seed: int = 0,
        precision: str = "float32", runs: Sequence[Any] = (),
        log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The variance experiment; returns plain numbers (the CLI writes them).

    With ``runs`` (a list of ``(name, step, config, vae, param-store extras)``), those
    checkpoints are measured. Otherwise a reference run of ``cfg`` (its estimator, usually
    ``reparam``) is trained and snapshotted at ``checkpoints``, once per latent dimension in
    ``latent_dims`` (default: ``cfg.model.latent_dim``); each snapshot is measured on one fixed
    minibatch per size in ``batch_sizes`` (default: ``measure_batch``). With ``curve_steps``,
    each estimator is also trained that many steps from the same initialisation and its
    training ELBO recorded against steps and wall-clock.
    """
    import copy

    from .model import VAE

    log = log or (lambda message: None)
    for name in estimators:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from {', '.join(ESTIMATORS)}")
    if any(c < 0 for c in checkpoints) or not checkpoints:
        raise ConfigError(f"checkpoints must be non-negative steps, got {list(checkpoints)}")
    sizes = list(batch_sizes) or [measure_batch]
    rows: list[dict[str, Any]] = []
    timing = {"reference_training_s": 0.0, "measurement_s": 0.0, "curves_s": 0.0}
    measured: list[tuple[str, int, int, Any, dict, float]] = []  # name, ld, step, vae, store
    if runs:
        for name, step, run_cfg, vae, store in runs:
            train_scale = len(dataset.train) / run_cfg.train.batch_size
            measured.append((name, run_cfg.model.latent_dim, step, vae, store, train_scale))
    for latent_dim in ([] if runs else (list(latent_dims) or [cfg.model.latent_dim])):
        ref_cfg = copy.deepcopy(cfg)
        ref_cfg.model.latent_dim = latent_dim
        ref_cfg.train.progress = False
        start = time.perf_counter()
        log(f"training the reference run (latent dim {latent_dim}, {max(checkpoints)} steps)")
        trainer, snaps, _ = train_with_snapshots(ref_cfg, dataset, sorted(set(checkpoints)))
        timing["reference_training_s"] += time.perf_counter() - start
        train_scale = len(trainer.dataset.train) / ref_cfg.train.batch_size
        for step, snap in sorted(snaps.items()):
            vae = VAE.from_config(ref_cfg, dataset.image_shape)
            vae.load_state_dict(snap["vae"])
            measured.append(("reference", latent_dim, step, vae, snap["store"], train_scale))
    # one fixed minibatch per size, the same at every checkpoint (each call re-binarizes the set)
    minibatches = {size: fixed_minibatch(dataset, cfg, size, seed) for size in sizes}
    start_all = time.perf_counter()
    for run_name, latent_dim, step, vae, store, train_scale in measured:
        for size in sizes:
            x = minibatches[size]
            pyro.clear_param_store()
            for key, value in store.items():
                pyro.get_param_store()[key] = value
            log(f"measuring {run_name} step {step} (latent dim {latent_dim}, batch {size})")
            result = measure_gradient_variance(
                vae, x, estimators, num_draws=num_draws, oracle_draws=oracle_draws,
                num_particles=cfg.train.num_particles, train_scale=train_scale, seed=seed,
                precision=precision)
            rows.append({"run": run_name, "latent_dim": latent_dim, "batch_size": size,
                         "step": step, **result})
    timing["measurement_s"] = time.perf_counter() - start_all
    curves: dict[str, dict[str, list]] = {}
    if curve_steps > 0:
        start = time.perf_counter()
        for name in estimators:
            run_cfg = copy.deepcopy(cfg)
            run_cfg.train.estimator = name
            run_cfg.train.progress = False
            run_cfg.validate()
            log(f"training curve: {name} ({curve_steps} steps)")
            _, _, curves[name] = train_with_snapshots(run_cfg, dataset, [curve_steps])
        timing["curves_s"] = time.perf_counter() - start
    pyro.clear_param_store()
    return {"estimators": list(estimators), "num_draws": num_draws,
            "oracle_draws": oracle_draws, "precision": precision, "measurements": rows,
            "curves": curves, "timing": timing}


def variance_rows(experiment: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten an experiment into one row per (checkpoint, batch size, estimator, group)."""
    out = []
    for m in experiment["measurements"]:
        for name, res in m["estimators"].items():
            for group, s in res["groups"].items():
                out.append({
                    "run": m["run"], "latent_dim": m["latent_dim"], "batch_size": m["batch_size"],
                    "step": m["step"], "estimator": name, "group": group,
                    "num_params": s["num_params"], "trace": s["trace"],
                    "trace_lo": s["trace_ci"][0], "trace_hi": s["trace_ci"][1],
                    "mean_variance": s["mean_variance"],
                    "relative_variance": s["relative_variance"], "snr": s["snr"],
                    "cosine": s["cosine"], "cosine_lo": s["cosine_ci"][0],
                    "cosine_hi": s["cosine_ci"][1], "ratio_to_reparam": s["ratio_to_reparam"],
                    "ratio_lo": s["ratio_to_reparam_ci"][0],
                    "ratio_hi": s["ratio_to_reparam_ci"][1],
                    "seconds_per_draw": res["seconds_per_draw"]})
    return out
