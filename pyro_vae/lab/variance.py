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

Speed: each estimator's :attr:`~pyro_vae.inference.estimators.Estimator.draw_loss` is its Pyro
surrogate written as a function of one draw of noise; ``torch.func.vmap(torch.func.grad(...))``
over a chunk of draws gives all their gradients at once, and the encoder's forward pass (the
same for every draw, since x is fixed) is computed once per chunk instead of once per draw.
Each such path is used only where a probe draw equals Pyro's ``loss_and_grads`` on the same
noise (:func:`choose_draws`); the tests compare them draw for draw.
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

from ..errors import ConfigError
from ..inference.accelerators import GENERIC, PathChoice, record, relative_difference
from ..inference.accelerators.code_gradients import CodeGradients
from ..inference.accelerators.code_gradients import unsupported_reason as code_unsupported_reason
from ..inference.accelerators.mlp_gradients import MLPGradients, unsupported_reason
from ..inference.discrete import _unwrap
from ..inference.estimators import AVG_BASELINE_PARAM, Draw, Estimator
from ..inference.precision import fast_product_precision
from ..inference.program import log_weights, param_scope, running_estimator, trace_program
from ..models.vae import VAE
from ..registry import ESTIMATORS
from .bound import Bound as _Bound
from .bound import split_draws
from .discrete import discrete_code, discrete_draws, discrete_noise, exact_oracle

#: Matrix-product precision of the vectorized draws -> context manager.
PRECISIONS: dict[str, Callable[[str], Any]] = {
    "float32": lambda device: contextlib.nullcontext(),
    "bfloat16": lambda device: torch.autocast(device, dtype=torch.bfloat16),
    "bf16": lambda device: torch.autocast(device, dtype=torch.bfloat16),
}
#: The same, as the dtype of the hand-written products (:mod:`pyro_vae.mlp_gradients`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``(precision, why)`` for a precision of the draws' products: ``auto`` becomes bf16 where
    bf16 products are faster than float32's on ``device`` (measured once per process:
    :func:`~pyro_vae.inference.precision.fast_product_precision`), float32 otherwise; a named
    one is kept ("asked for").

    Raises:
        ConfigError: for a precision that is neither ``auto`` nor in :data:`PRECISIONS`.
    """
    if precision == "auto":
        choice, why = fast_product_precision(device)
        return choice, f"auto: {why}"
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose from auto, "
                          f"{', '.join(PRECISIONS)}")
    return precision, "asked for"


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
    """Leave the VAE, Pyro's param store and the RNG as they were.

    Parameter values are restored in place (the same tensor objects), gradients and the
    training mode are put back, and the measurement runs in a fresh param-store scope
    (:func:`~pyro_vae.inference.program.param_scope`): afterwards the store holds the same
    objects under the same names as before, and nothing else. A user's ``pyro.infer.SVI``
    with ``pyro.optim`` therefore keeps training the same tensors after a measurement.
    """
    params = {k: v.detach().clone() for k, v in vae.state_dict().items()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in vae.named_parameters()}
    devices = [d for d in {p.device for p in vae.parameters()} if d.type == "cuda"]
    training = vae.training
    try:
        with torch.random.fork_rng(devices=devices), param_scope(carry=(AVG_BASELINE_PARAM,)):
            yield
    finally:
        with torch.no_grad():
            for k, v in vae.state_dict().items():
                v.copy_(params[k])
        for k, p in vae.named_parameters():
            p.grad = grads[k]
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
        # a plain tensor: Pyro keeps the average as a ProvenanceTensor, which compiled
        # kernels downstream cannot take
        value = store[AVG_BASELINE_PARAM].detach().as_subclass(torch.Tensor) / train_scale
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
    return log_weights(trace_program(vae, x, num_draws), x.shape[0]).mean()


# -- accumulation ---------------------------------------------------------------------------------
class _Moments:
    """Per-parameter sums of (g - reference) and its square in float64, and per-draw scalars.

    Shifting by a reference close to the mean (the oracle) keeps sum-of-squares accurate.
    """

    def __init__(self, reference: dict[str, torch.Tensor], groups: dict[str, list[str]],
                 blocks: bool = False, chunk_bootstrap: bool = False, block_draws: int = 0):
        self.reference = reference
        self.groups = groups
        self.count = 0
        #: with ``blocks`` (an exact reference: the bias is reported) or ``chunk_bootstrap``,
        #: each block's summed deviation per parameter and its draw count: the bootstrap of
        #: the mean gradient's distance to the reference (and its cosine) resamples blocks
        self.bias = blocks
        self.block_sums: dict[str, list[torch.Tensor]] | None = \
            {k: [] for k in reference} if blocks or chunk_bootstrap else None
        #: the trace's bootstrap resamples blocks too (from per-block sums, so nothing is
        #: computed draw by draw), instead of single draws; for enough blocks only
        self.chunk_bootstrap = chunk_bootstrap
        #: a block is filled with chunks until it holds at least this many draws (0: a block
        #: per chunk), so that the block sums' memory stays bounded whatever R and however the
        #: draws come (Pyro's path yields them one at a time)
        self.block_draws = block_draws
        self.block_counts: list[int] = []
        #: per parameter, its block sums' Gram matrix, dots with the reference and |sum|^2
        #: (:func:`_block_parts`)
        self.block_parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        self.sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
        self.sumsq = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in reference.items()}
        # per draw (with ``chunk_bootstrap``: per chunk, summed over its draws), per group:
        # ||g - ref||^2, and per draw (g - ref) . ref, for the bootstrap
        self.sq_dev: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.dot_ref: dict[str, list[torch.Tensor]] = {g: [] for g in groups}
        self.kernel: Callable[..., Any] | None = None  # compiled _chunk_moments, if any
        self.kernel_draws = 0  # the chunk size it was compiled for

    def add(self, grads: dict[str, torch.Tensor]) -> None:
        """Add a chunk of draws ``{name: (n, *shape)}`` (any float dtype)."""
        names = list(grads)
        n = grads[names[0]].shape[0]
        args = ([grads[k] for k in names], [self.reference[k] for k in names])
        chunked = self.chunk_bootstrap
        parts = self.kernel(*args) if self.kernel is not None and n == self.kernel_draws \
            else _chunk_moments(*args, per_draw=not chunked)
        sq_norms, dots = {}, {}
        # into the open block, or a new one
        merge = bool(self.block_counts) and self.block_counts[-1] < self.block_draws
        for k, (total, total_sq, sq_norm, dot) in zip(names, parts):
            if self.block_sums is not None:
                if merge:
                    self.block_sums[k][-1] += total.reshape(-1).float()
                else:
                    self.block_sums[k].append(total.reshape(-1).float().clone())
            if chunked:  # the chunk's sum of squares over its draws, from the per-parameter
                sq_norm = total_sq.sum().reshape(1)  # sums (its dots come from block_sums)
            self.sum[k] += total.double().view_as(self.sum[k])
            self.sumsq[k] += total_sq.double().view_as(self.sumsq[k])
            sq_norms[k] = sq_norm.double()
            if not chunked:
                dots[k] = dot.double()
        for group, members in self.groups.items():
            sq = sum(sq_norms[k] for k in members)
            if chunked and merge:
                self.sq_dev[group][-1] += sq
            else:
                self.sq_dev[group].append(sq)
            if not chunked:
                self.dot_ref[group].append(sum(dots[k] for k in members))
        self.count += n
        if merge:
            self.block_counts[-1] += n
        else:
            self.block_counts.append(n)


#: Parameters per block of :func:`_chunk_moments`: a chunk's block of draws stays in cache
#: between its passes.
MOMENT_BLOCK = 16384


def _chunk_moments(grads: list[torch.Tensor], references: list[torch.Tensor],
                   per_draw: bool = True) -> list[tuple[torch.Tensor, ...]]:
    """Per tensor, for a chunk of n draws g: with d = g - reference (float32), the sums over
    draws of d and d^2 (per parameter), and per draw |d|^2 and d . reference (``per_draw``
    false: those two are None and their passes are skipped).

    The parameters are taken in blocks of :data:`MOMENT_BLOCK`, in the order the chunk is
    stored (a weight gradient made as the transpose of a product is read without a copy), so
    the four passes over a block hit the cache: about 1 ns per element on a small CPU, against
    3 ns for whole-tensor passes. :func:`_fused_moments` is the same in one compiled loop.
    """
    out = []
    for g, ref in zip(grads, references, strict=True):
        n = g.shape[0]
        transposed = g.dim() == 3 and not g.is_contiguous() and g.transpose(1, 2).is_contiguous()
        if transposed:  # moments are per parameter: any fixed order will do
            g, ref = g.transpose(1, 2), ref.T
        flat, ref = g.reshape(n, -1), ref.reshape(-1).float()
        size = flat.shape[1]
        total = torch.empty(size, device=g.device)
        total_sq = torch.empty(size, device=g.device)
        sq_norm = torch.zeros(n, device=g.device) if per_draw else None
        dot = torch.zeros(n, device=g.device) if per_draw else None
        for a in range(0, size, MOMENT_BLOCK):
            b = min(a + MOMENT_BLOCK, size)
            d = flat[:, a:b].float() - ref[a:b]
            torch.sum(d, 0, out=total[a:b])
            if per_draw:
                dot += d @ ref[a:b]
            d.mul_(d)
            torch.sum(d, 0, out=total_sq[a:b])
            if per_draw:
                sq_norm += d.sum(1)
        if transposed:
            shape = g.shape[1:]
            total, total_sq = (t.view(shape).T.reshape(-1) for t in (total, total_sq))
        out.append((total, total_sq, sq_norm, dot))
    return out


def _fused_moments(grads: list[torch.Tensor], references: list[torch.Tensor]
                   ) -> list[tuple[torch.Tensor, ...]]:
    """:func:`_chunk_moments` written as whole-tensor operations, for torch.compile to fuse."""
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
    """:func:`_fused_moments` compiled for chunks shaped like ``example``, or None when
    torch.compile cannot build it here (no C++ compiler, unsupported platform). The first
    call is checked against the eager function."""
    key = tuple((k, tuple(v.shape), v.dtype) for k, v in example.items())
    if key not in _COMPILED_MOMENTS:
        kernel = None
        try:
            kernel = torch.compile(_fused_moments, dynamic=False)
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
    block_weights = boot_idx = None
    if m.chunk_bootstrap:
        block_weights = _block_weights(len(m.block_counts), num_bootstrap, generator)
    else:
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
        # Bootstrap over draws (or over chunks of draws, whose sums were kept). Over draws,
        # ||mean* - ref||^2 is held at its full-sample value; it is O(trace / R) for unbiased
        # estimators, a correction small next to the resampled term.
        sq_dev = torch.cat(m.sq_dev[group])
        shift2 = (shift ** 2).sum().item()
        if block_weights is not None:
            # each resample's own trace: sum ||d||^2 - n* ||mean* - ref||^2 over n* - 1, the
            # second term from the chunks' Gram matrix (held fixed, it would carry a biased
            # estimator's ||bias||^2 fluctuations into the interval, even below zero)
            n_b = block_weights @ torch.tensor(m.block_counts, dtype=torch.float64)
            gram = sum(_block_parts(m, k)[0] for k in names)
            shift2_b = _resampled_shift2(block_weights, gram, n_b)
            trace_b = (block_weights @ sq_dev - n_b * shift2_b) / (n_b - 1)
        else:
            trace_b = r / (r - 1) * (sq_dev[boot_idx].mean(1) - shift2)
        out[group] = {
            "num_params": int(mean.numel()), "trace": trace, "mean_variance": trace / mean.numel(),
            "relative_variance": trace / max(norm2, 1e-300), "snr": snr, "cosine": cosine,
            "mean_norm": math.sqrt(norm2),
            "trace_ci": _interval(trace_b), "mean_variance_ci": _interval(trace_b / mean.numel()),
            "_trace_boot": trace_b,  # removed before returning; used for ratio intervals
        }
        if m.block_sums is not None:  # the bias, and the cosine's interval, by blocks
            bias = _bias(m, names, ref, trace, boot_generator=generator,
                         num_bootstrap=num_bootstrap)
            # against a reference that is not exact (a reparametrized mean), only the cosine
            out[group].update(bias if m.bias else {"cosine_ci": bias["cosine_ci"]})
        else:  # the cosine's interval over single draws
            dot_b = torch.cat(m.dot_ref[group])[boot_idx].mean(1)
            norm2_b = (ref_norm ** 2 + 2 * dot_b + shift2).clamp_min(1e-300)
            out[group]["cosine_ci"] = _interval(
                (ref_norm ** 2 + dot_b) / (norm2_b.sqrt() * max(ref_norm, 1e-300)))
    return out


def _bias(m: _Moments, names: list[str], ref: torch.Tensor, trace: float,
          boot_generator: torch.Generator, num_bootstrap: int) -> dict[str, Any]:
    """Distance of the mean gradient to an exact reference, with block-bootstrap intervals.

    ``relative_error`` = ||mean - g|| / ||g|| (interval: basic bootstrap of its square);
    ``noise_floor`` = sqrt(tr Cov / R) / ||g||, the
    value an unbiased estimator shows from its own noise; ``relative_bias`` = sqrt(max(||mean -
    g||^2 - tr Cov / R, 0)) / ||g||, the bias with that noise subtracted; ``cosine`` between mean
    and g. Intervals resample the chunks of draws (independent blocks) with replacement, from
    their Gram matrix, so no per-draw gradient is kept.
    """
    parts = [_block_parts(m, k) for k in names]  # per parameter, shared by its groups
    counts = torch.tensor(m.block_counts, dtype=torch.float64)
    gram = sum(p[0] for p in parts)
    dots = sum(p[1] for p in parts)
    ref2 = float(ref @ ref)
    r = m.count
    shift2 = sum(p[2] for p in parts) / r ** 2
    weights = _block_weights(len(counts), num_bootstrap, boot_generator)
    n_b = weights @ counts
    shift2_b = _resampled_shift2(weights, gram, n_b)
    dot_b = (weights @ dots) / n_b
    norm_ref = max(ref2 ** 0.5, 1e-300)
    # basic (reflected) bootstrap on the squared distance: a resampled mean sits farther
    # from the reference than the mean does (by its own noise), so percentiles of the
    # resampled distances alone would be shifted up
    lo2, hi2 = _interval(shift2_b)
    rel_interval = [max(2 * shift2 - hi2, 0.0) ** 0.5 / norm_ref,
                    max(2 * shift2 - lo2, 0.0) ** 0.5 / norm_ref]
    cos_b = (ref2 + dot_b) / ((ref2 + 2 * dot_b + shift2_b).clamp_min(1e-300).sqrt() * norm_ref)
    # reflected too: a resampled mean is noisier than the mean, so its cosine sits lower
    cosine = (ref2 + dots.sum().item() / r) / max((ref2 + 2 * dots.sum().item() / r
                                                   + shift2) ** 0.5 * norm_ref, 1e-300)
    lo_c, hi_c = _interval(cos_b)
    cos_interval = [max(2 * cosine - hi_c, -1.0), min(2 * cosine - lo_c, 1.0)]
    return {"relative_error": shift2 ** 0.5 / norm_ref,
            "relative_error_ci": rel_interval,
            "noise_floor": (trace / r) ** 0.5 / norm_ref,
            "relative_bias": max(shift2 - trace / r, 0.0) ** 0.5 / norm_ref,
            "cosine_ci": cos_interval,
            "exact_norm": norm_ref}


#: Chunks of draws from which the lab bootstraps the trace's interval by chunk: with fewer, a
#: resample of chunks varies too little (one chunk: not at all), and the interval resamples
#: single draws.
MIN_BOOTSTRAP_CHUNKS = 20
#: Most blocks a bootstrap keeps sums for (a vector of all parameters each); beyond, chunks
#: are merged into larger blocks.
MAX_BOOTSTRAP_BLOCKS = 100


def bootstrap_blocks(num_draws: int, chunk_size: int) -> tuple[bool, int]:
    """How the lab bootstraps R = ``num_draws`` draws made ``chunk_size`` at a time: whether
    it resamples blocks of draws (at least :data:`MIN_BOOTSTRAP_CHUNKS` chunks) rather than
    single draws, and the draws per block (chunks merged so that there are at most
    :data:`MAX_BOOTSTRAP_BLOCKS`)."""
    chunks = -(-num_draws // chunk_size)
    return (num_draws // chunk_size >= MIN_BOOTSTRAP_CHUNKS,  # full chunks: R >= 20 x size
            chunk_size * max(1, -(-chunks // MAX_BOOTSTRAP_BLOCKS)))


def _block_weights(blocks: int, num_bootstrap: int, generator: torch.Generator
                   ) -> torch.Tensor:
    """How often each of ``blocks`` chunks is picked in each bootstrap resample (with
    replacement), ``(num_bootstrap, blocks)`` float64."""
    picks = torch.randint(0, blocks, (num_bootstrap, blocks), generator=generator)
    return torch.zeros(num_bootstrap, blocks, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones_like(picks, dtype=torch.float64))


def _resampled_shift2(weights: torch.Tensor, gram: torch.Tensor, n_b: torch.Tensor
                      ) -> torch.Tensor:
    """||mean* - reference||^2 of each resample: ``w^T G w / n*^2`` for the chunks' picks
    ``w``, their sums' Gram matrix ``G`` and draw counts ``n*``."""
    return ((weights @ gram) * weights).sum(1) / n_b ** 2


def _block_parts(m: _Moments, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """For one parameter's block sums S (blocks x entries, float64): the Gram matrix S S^T,
    S . reference and |sum of S|^2; cached on ``m`` (a parameter is in several groups)."""
    cache = m.block_parts
    if name not in cache:
        sums = torch.stack(m.block_sums[name]).double()
        ref = m.reference[name].double().reshape(-1)
        cache[name] = (sums @ sums.T, sums @ ref, float(sums.sum(0).pow(2).sum()))
    return cache[name]


def _interval(samples: torch.Tensor, level: float = 0.95) -> list[float]:
    lo, hi = torch.quantile(samples.double().cpu(), torch.tensor([(1 - level) / 2, (1 + level) / 2],
                                                           dtype=torch.float64)).tolist()
    return [lo, hi]


# -- drawing gradients ----------------------------------------------------------------------------
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
    """``eps -> per-draw gradients`` with the encoder's forward pass shared by all draws
    (:func:`~pyro_vae.lab.bound.split_draws`: only the cotangents at q's loc and scale differ
    per draw). Only valid when the prior does not use the encoder."""
    enc = {k[len("encoder."):]: v for k, v in params.items() if k.startswith("encoder.")}
    rest = {k: v for k, v in params.items() if not k.startswith("encoder.")}
    with torch.no_grad():
        template = vae.encoder(x)

    def encode(p: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        base = functional_call(vae.encoder, p, (x,)).base_dist
        return base.loc, base.scale

    (loc, scale), pull_back = vjp(encode, enc)

    def draw_of(v: VAE, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
                ) -> torch.Tensor:
        base = type(template.base_dist)(loc, scale, validate_args=False)
        q = type(template)(base, template.reinterpreted_batch_ndims, validate_args=False)
        return _draw_of(v, estimator, x, q, eps, baseline)

    return split_draws(vae, draw_of, (loc, scale), pull_back, rest)


def _pyro_draws(vae: VAE, estimator: Estimator, x: torch.Tensor, params: dict[str, Any],
                num_draws: int, num_particles: int, baseline: torch.Tensor | None,
                relaxation: tuple[float, str] = (1.0, "discrete")):
    """Yield gradients of R draws from Pyro's own ELBO, one ``loss_and_grads`` per draw: the
    definition every faster path is held to. ``relaxation``: the temperature and relaxed
    density of the relaxed estimators."""
    from ..config import Config

    cfg = Config()
    cfg.train.num_particles = num_particles
    cfg.train.temperature, cfg.train.relaxed_density = relaxation
    elbo = estimator.make_elbo(cfg)
    with running_estimator(vae, estimator):
        store = pyro.get_param_store()
        for _ in range(num_draws):
            if estimator.baseline == "avg":
                store[AVG_BASELINE_PARAM] = baseline.clone()
            vae.zero_grad(set_to_none=True)
            elbo.loss_and_grads(vae.model, vae.guide, x)
            yield {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach()[None]
                   / x.shape[0] for k, p in params.items()}


#: Draws whose noise the discrete ``hand`` path takes at once, a chunk at a time (see
#: :meth:`~pyro_vae.inference.accelerators.code_gradients.CodeGradients.chunks`).
DISCRETE_GROUP = 100
#: Seed of the probe draw on which an accelerated path is compared with Pyro's.
PROBE_SEED = 20261201
#: Largest relative L2 difference between an accelerated probe draw and Pyro's (float32).
PROBE_TOLERANCE = 1e-3


def _normal_guide_problem(vae: VAE, x: torch.Tensor) -> str | None:
    from ..inference.accelerators import diagonal_normal_problem, one_latent_problem
    from ..inference.program import inspect_program

    structure = inspect_program(vae, x[:2])
    problem = one_latent_problem(structure)
    if problem is None:
        problem = diagonal_normal_problem(structure.guide_sites[0], exact=False)
    return problem


def _probe(draw: Any, vae: VAE, estimator: Estimator, x: torch.Tensor,
           params: dict[str, torch.Tensor], num_particles: int,
           baseline: torch.Tensor | None, noise: Callable[[], torch.Tensor] | None = None,
           relaxation: tuple[float, str] = (1.0, "discrete")) -> str | None:
    """Compare one draw of an accelerated path (``draw(eps)``) with Pyro's on the same noise:
    why they differ, or None. The global RNG is left as it was. ``noise()`` draws one draw's
    noise as the guide would (default: standard normal, for a Gaussian code)."""
    # both sides in float32: the probe checks the kernel's structure, not a precision
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []), \
            torch.autocast(x.device.type, enabled=False):
        torch.manual_seed(PROBE_SEED)
        want = next(iter(_pyro_draws(vae, estimator, x, params, 1, num_particles, baseline,
                                     relaxation)))
        torch.manual_seed(PROBE_SEED)  # the guide's rsample draws exactly this noise
        if noise is None:
            latent_dim = vae.prior().event_shape[0]
            eps = torch.randn(1, num_particles, x.shape[0], latent_dim, device=x.device)
        else:
            eps = noise()
        try:
            got = draw(eps)
        except Exception as e:  # noqa: BLE001 - a kernel that cannot run here is not used
            got = f"the probe draw failed ({type(e).__name__}: {str(e)[:80]})"
    if isinstance(got, str):
        return got
    missing = sorted(set(want) - set(got))
    if missing:
        return f"the kernel gives no gradient for {missing[0]}"
    rel = relative_difference(got, want)
    if not rel <= PROBE_TOLERANCE:
        return f"a probe draw differs from Pyro's loss_and_grads by {rel:.2g} (relative)"
    return None


def _choose_discrete(vae: VAE, estimator: Estimator, x: torch.Tensor, num_particles: int,
                     baseline: torch.Tensor | None, method: str, what: str,
                     params: dict[str, torch.Tensor], relaxation: tuple[float, str]
                     ) -> tuple[PathChoice, Any]:
    """The path for a discrete code: ``hand`` (:class:`~pyro_vae.inference.accelerators.
    code_gradients.CodeGradients`, the decoder written out) where the program has its
    structure, else ``func`` (:mod:`pyro_vae.lab.discrete`), each held to Pyro on a probe draw;
    with the probed draws (None for ``generic``)."""
    reasons = []
    detached = {k: p.detach() for k, p in params.items()}

    def probe(draws: Any) -> str | None:
        return _probe(draws, vae, estimator, x, params, num_particles, baseline,
                      noise=lambda: discrete_noise(vae, estimator, x, 1, num_particles),
                      relaxation=relaxation)

    with torch.no_grad():
        kind = type(_unwrap(vae.encoder(x[:1]))[0]).__name__
    problem = None
    if not estimator.applies_to(discrete=True):
        problem = f"estimator {estimator.name} does not apply to a discrete code ({kind})"
    elif estimator.draw_loss is None:
        problem = "the estimator has no draw_loss"
    if problem is not None:
        if method in ("hand", "func"):
            raise ConfigError(f"method {method}: {problem}")
        return record(PathChoice(what, GENERIC, problem)), None
    if method in ("auto", "hand"):
        problem = code_unsupported_reason(vae, x)
        if problem is None:
            with _no_validation():
                kernel = CodeGradients(vae, estimator, x, baseline, detached, *relaxation)
                problem = probe(kernel)
        if problem is None:
            return record(PathChoice(what, "hand", "discrete code, MLP decoder with a "
                                     "Bernoulli likelihood written out (a per-code table for "
                                     "hard codes), the estimator's draw_loss differentiated "
                                     "on scalars, float32; a probe draw equals Pyro's")), kernel
        if method == "hand":
            raise ConfigError(f"method hand: {problem}")
        reasons.append(f"hand: {problem}")
    if method in ("auto", "func"):
        if _prior_uses_encoder(vae):
            problem = "the prior uses the encoder"
        else:
            with _no_validation():
                per_draw = discrete_draws(vae, estimator, x, baseline, detached, *relaxation)
                problem = probe(per_draw)
        if problem is None:
            return record(PathChoice(what, "func", "discrete code: vmap over codes or Concrete "
                                     "noise, shared encoder pass; a probe draw equals Pyro's"
                                     + (f" ({reasons[0]})" if reasons else ""))), per_draw
        if method == "func":
            raise ConfigError(f"method func: {problem}")
        reasons.append(f"func: {problem}")
    return record(PathChoice(what, GENERIC, "; ".join(reasons))), None


def choose_draws(vae: VAE, estimator: Estimator, x: torch.Tensor, num_particles: int,
                 baseline: torch.Tensor | None, method: str = "auto",
                 what: str | None = None, relaxation: tuple[float, str] = (1.0, "discrete")
                 ) -> PathChoice:
    """Which path computes the estimator's gradient draws at this checkpoint, and why.

    ``hand`` (:class:`~pyro_vae.inference.accelerators.MLPGradients`) where the program has the
    structure it writes out, ``func`` (``torch.func.vmap`` of the estimator's ``draw_loss``)
    where the guide is one diagonal-Normal site, else ``generic`` (Pyro per draw); each
    accelerated path is held to Pyro's ``loss_and_grads`` on a probe draw first.
    """
    return _choose_draws(vae, estimator, x, num_particles, baseline, method, what,
                         relaxation)[0]


def _choose_draws(vae: VAE, estimator: Estimator, x: torch.Tensor, num_particles: int,
                  baseline: torch.Tensor | None, method: str = "auto",
                  what: str | None = None, relaxation: tuple[float, str] = (1.0, "discrete")
                  ) -> tuple[PathChoice, Any]:
    """:func:`choose_draws` with the draws it probed (float32; None for ``generic``), which
    :func:`gradient_draws` then uses rather than building them again."""
    what = what or f"gradient draws ({estimator.name})"
    params = measured_parameters(vae)
    if method == "pyro":
        return record(PathChoice(what, GENERIC, "asked for (method pyro)")), None
    if discrete_code(vae, x):
        return _choose_discrete(vae, estimator, x, num_particles, baseline, method, what,
                                params, relaxation)
    reasons = []
    if method in ("auto", "hand"):
        reason = unsupported_reason(vae, estimator)
        if reason is None:
            hand = MLPGradients(vae, estimator, x, baseline, torch.float32)
            reason = _probe(hand, vae, estimator, x, params, num_particles, baseline)
        if reason is None:
            return record(PathChoice(what, "hand", "MLP networks, diagonal-Normal guide, "
                                     "Bernoulli likelihood, N(0, I) prior; a probe draw equals "
                                     "Pyro's")), hand
        if method == "hand":
            raise ConfigError(f"method hand: {reason}")
        reasons.append(f"hand: {reason}")
    if method in ("auto", "func"):
        reason = ("the estimator has no draw_loss" if estimator.draw_loss is None
                  else _normal_guide_problem(vae, x))
        if reason is None:
            func = _func_draws(vae, estimator, x, baseline, params, shared_encoder=True)
            with _no_validation():
                reason = _probe(func, vae, estimator, x, params, num_particles, baseline)
        if reason is None:
            return record(PathChoice(what, "func", "one diagonal-Normal latent site; a probe "
                                     "draw equals Pyro's" + (f" ({reasons[0]})" if reasons
                                                             else ""))), func
        if method == "func":
            raise ConfigError(f"method func: {reason}")
        reasons.append(f"func: {reason}")
    return record(PathChoice(what, GENERIC, "; ".join(reasons))), None


def _func_draws(vae: VAE, estimator: Estimator, x: torch.Tensor, baseline: torch.Tensor | None,
                params: dict[str, torch.Tensor], shared_encoder: bool):
    detached = {k: p.detach() for k, p in params.items()}
    with _no_validation():
        if shared_encoder and not _prior_uses_encoder(vae):
            return _split_per_draw(vae, estimator, x, baseline, detached)
        full = vmap(grad(_functional_loss(vae, estimator, x, baseline)), in_dims=(None, 0),
                    randomness="error")

        def per_draw(eps: torch.Tensor) -> dict[str, torch.Tensor]:
            return full(detached, eps)
        return per_draw


def gradient_draws(vae: VAE, estimator: Estimator | str, x: torch.Tensor, num_draws: int, *,
                   num_particles: int = 1, chunk_size: int = 25, train_scale: float = 1.0,
                   vectorized: bool = True, shared_encoder: bool = True,
                   method: str = "auto", precision: str = "float32",
                   paths: list[PathChoice] | None = None,
                   relaxation: tuple[float, str] = (1.0, "discrete")):
    """Yield dicts ``{param name: (n, *shape) gradients}`` of ``num_draws`` independent draws.

    Every draw is defined by Pyro's ``loss_and_grads`` on ``vae.model`` and the estimator's
    guide; ``method`` picks how it is computed (all give the same gradients for the same
    noise, and an accelerated path is used only after a probe draw agrees with Pyro's). The
    accelerated paths draw a chunk's noise in one call, which takes other numbers from the
    RNG stream than Pyro's one call per draw: with ``chunk_size=1`` the draws are Pyro's
    draw for draw, otherwise they are other, equally distributed draws.

    * ``"hand"``: the backward pass written out for MLP networks, a diagonal-Normal guide, a
      Bernoulli likelihood and the N(0, I) prior
      (:mod:`pyro_vae.inference.accelerators.mlp_gradients`), several times faster;
    * ``"func"``: ``torch.func.vmap`` over the estimator's ``draw_loss`` (diagonal-Normal guide);
    * ``"pyro"`` (or ``vectorized=False``): one Pyro ``loss_and_grads`` per draw;
    * ``"auto"``: the first of these that applies (:func:`choose_draws`).

    Noise comes from the global torch RNG. ``shared_encoder=False`` makes ``func``
    differentiate the whole surrogate per draw (encoder included); it is also used when the
    prior depends on the encoder (VampPrior). ``precision`` (``float32`` or ``bf16``) is the
    dtype of the hand-written matrix products; for ``func`` the caller sets autocast. The
    path taken is appended to ``paths`` when given.
    """
    estimator = ESTIMATORS[estimator] if isinstance(estimator, str) else estimator
    num_particles = max(num_particles, estimator.min_particles)
    params = measured_parameters(vae)
    with torch.autocast(x.device.type, enabled=False):  # not rounded by the draws' autocast
        baseline = baseline_for(estimator, vae, x, train_scale)
    if method not in ("auto", "hand", "func", "pyro"):
        raise ConfigError(f"unknown method {method!r}; choose from auto, hand, func, pyro")
    choice, probed = _choose_draws(vae, estimator, x, num_particles, baseline,
                                   "pyro" if not vectorized else method, relaxation=relaxation)
    if paths is not None:
        paths.append(choice)
    if choice.path == GENERIC:
        yield from _pyro_draws(vae, estimator, x, params, num_draws, num_particles, baseline,
                               relaxation)
        return
    if discrete_code(vae, x):  # the probed kernel (its first-draw facts already read)
        if choice.path == "hand":
            kernel = probed
            # noise for DISCRETE_GROUP draws at a time: the kernel's per-call vmap work is
            # shared by all of them, its products still run chunk by chunk (one draw per
            # chunk keeps Pyro's numbers, draw for draw)
            group = max(chunk_size, DISCRETE_GROUP) if chunk_size > 1 else 1
            for n in _chunks(num_draws, group):
                noise = discrete_noise(vae, estimator, x, n, num_particles)
                with _no_validation():
                    yield from kernel.chunks(noise, chunk_size)
            return
        per_draw = probed
        for n in _chunks(num_draws, chunk_size):
            noise = discrete_noise(vae, estimator, x, n, num_particles)
            with _no_validation():
                yield per_draw(noise)
        return
    latent_dim = vae.prior().event_shape[0]
    if choice.path == "hand":
        hand = probed if DTYPES[precision] == torch.float32 else \
            MLPGradients(vae, estimator, x, baseline, DTYPES[precision])
        for n in _chunks(num_draws, chunk_size):
            yield hand(torch.randn(n, num_particles, x.shape[0], latent_dim, device=x.device))
        return
    per_draw = probed if shared_encoder else \
        _func_draws(vae, estimator, x, baseline, params, shared_encoder)
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
                    precision: str = "float32", paths: list[PathChoice] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Mean reparametrized gradient over ``num_draws`` evaluations: the reference for cosines.

    Where the hand-written kernel reproduces the program (checked on a probe draw), each
    evaluation is the reparametrized gradient with the closed-form KL, and the noise comes in
    antithetic pairs (eps, -eps). Both keep the mean unbiased for the ELBO gradient and both
    lower its variance: on the default 784-400-50 VAE, 1,000 such evaluations have 1.9-16x
    less variance than 2,000 plain reparametrized draws (``scripts/oracle_variance.py``). It is
    the gradient of the ELBO, which every estimator but ``iwae`` estimates (``iwae`` estimates
    the gradient of its K-sample bound). Otherwise the oracle is the mean gradient of Pyro's
    ``Trace_ELBO`` with the draws as vectorized particles (the guide's own ``rsample``), each
    chunk one backward pass. Nothing per draw is kept.
    """
    params = {k: p.detach() for k, p in measured_parameters(vae).items()}
    latent_dim = vae.prior().event_shape[0]
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    analytic = ESTIMATORS["analytic-kl"]
    with torch.autocast(x.device.type, enabled=False):
        try:
            choice = choose_draws(vae, analytic, x, 1, None, "hand",
                                  what="oracle (closed-form KL, antithetic pairs)")
        except ConfigError as e:
            choice = PathChoice("oracle", GENERIC, str(e))
    if choice.path == "hand":
        hand = MLPGradients(vae, analytic, x, dtype=DTYPES[precision])
        shape = (1, x.shape[0], latent_dim)
        # pairs, then (odd num_draws) one draw without a partner
        batches = [(n, True) for n in _chunks(num_draws // 2, max(chunk_size // 8, 1))]
        for n, antithetic in batches + ([(1, False)] if num_draws % 2 else []):
            eps = torch.randn(n, *shape, device=x.device)
            g = hand(torch.cat([eps, -eps]) if antithetic else eps, summed=True)
            for k in total:
                total[k] += g[k].double()
    else:
        choice = record(PathChoice("oracle", GENERIC, f"Trace_ELBO with vectorized particles "
                                   f"({choice.reason})"))
        from pyro.infer import Trace_ELBO

        live = measured_parameters(vae)
        with running_estimator(vae, ESTIMATORS["reparam"]):
            for n in _chunks(num_draws, chunk_size):
                elbo = Trace_ELBO(num_particles=n, vectorize_particles=True,
                                  max_plate_nesting=1)
                vae.zero_grad(set_to_none=True)
                elbo.loss_and_grads(vae.model, vae.guide, x)
                for k, p in live.items():
                    if p.grad is not None:
                        total[k] += p.grad.double() * n / x.shape[0]
    if paths is not None:
        paths.append(choice)
    return {k: (v / num_draws).float() for k, v in total.items()}


def check_applicable(names: Sequence[str], discrete: bool) -> None:
    """ConfigError for the first estimator that cannot train a code of this kind."""
    for name in names:
        if not ESTIMATORS[name].applies_to(discrete=discrete):
            kind = "discrete" if discrete else "continuous"
            fitting = ", ".join(n for n, e in ESTIMATORS.items() if e.applies_to(discrete))
            raise ConfigError(f"estimator {name} does not apply to the {kind} code of this "
                              f"model; choose from {fitting}")


def measure_gradient_variance(vae: VAE, x: torch.Tensor, estimators: Sequence[str], *,
                              num_draws: int = 1000, oracle_draws: int = 1000,
                              num_particles: int = 1, num_bootstrap: int = 200,
                              chunk_size: int = 25, train_scale: float = 1.0, seed: int = 0,
                              vectorized: bool = True, precision: str = "float32",
                              compile: bool | None = None, temperature: float = 1.0,
                              relaxed_density: str = "discrete") -> dict[str, Any]:
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
        precision: ``float32`` (the default here), ``bf16``, or ``auto`` (the default of
            ``pyro-vae variance --draw-precision``: bf16 where its products are faster than
            float32's on x's device, measured; recorded with the reason in the result's
            ``precision`` and ``precision_choice``): ``bf16`` runs the draws' and the oracle's
            matrix products in bfloat16 (see
            :class:`~pyro_vae.inference.accelerators.MLPGradients`; autocast on the ``func``
            path). Per-draw gradients then differ from float32 by 0.1-0.4%, which
            changes the variances by far less than their intervals (tested).
        temperature, relaxed_density: the relaxation of the relaxed estimators
            (gumbel-softmax, straight-through).
        compile: accumulate the per-parameter moments with a torch.compile'd kernel (one
            pass over each chunk; compiling takes seconds, cached on disk afterwards). None:
            when num_draws x parameters exceeds 10^8 and the draws are not float32 (a bf16
            chunk costs the blocked eager passes a conversion, and there the kernel is 4x
            faster; on float32 chunks it gains 1.4x, which does not repay its compile time).
            Falls back to eager when compiling fails.

    Returns:
        ``{"estimators": {name: {"groups": {group: stats}, "seconds_per_draw": s, ...}},
        "oracle_draws": ..., "num_draws": ..., "batch_size": ...}`` with plain numbers only.
    """
    if num_draws < 2:
        raise ConfigError(f"variance needs at least 2 draws, got num_draws = {num_draws}")
    if oracle_draws < 1:
        raise ConfigError(f"oracle_draws must be >= 1, got {oracle_draws}")
    precision, precision_choice = resolve_precision(precision, x.device)
    discrete = discrete_code(vae, x)
    # ratios are relative to reparam for a continuous code, to score (or the first) for a
    # discrete one, which no reparametrized estimator applies to
    if discrete:
        names = list(dict.fromkeys(estimators))
        # never exact: it has no variance to compare with
        sampled = [n for n in names if ESTIMATORS[n].surrogate != "exact"]
        reference = "score" if "score" in names else (sampled or names)[0]
    else:
        names = list(dict.fromkeys(["reparam", *estimators]))
        reference = "reparam"
    relaxation = (temperature, relaxed_density)
    for name in names:
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {name!r}; choose from "
                              f"{', '.join(ESTIMATORS)}")
    check_applicable(names, discrete)
    results: dict[str, Any] = {}
    big = num_draws * sum(p.numel() for p in measured_parameters(vae).values()) > 1e8
    compile_seconds = 0.0
    with preserved_state(vae), torch.no_grad():
        vae.eval()
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        paths: list[PathChoice] = []
        with torch.enable_grad():
            if discrete:  # the exact gradient: every estimator's bias is measurable
                oracle = exact_oracle(vae, x, measured_parameters(vae), paths)
            else:
                oracle = oracle_gradient(vae, x, oracle_draws, precision=precision,
                                         paths=paths)
        oracle_seconds = time.perf_counter() - start
        groups = parameter_groups(list(oracle))
        by_block, block_draws = bootstrap_blocks(num_draws, chunk_size)
        boots: dict[str, dict[str, torch.Tensor]] = {}
        for name in names:
            est = ESTIMATORS[name]
            moments = _Moments(oracle, groups, blocks=discrete, chunk_bootstrap=by_block,
                               block_draws=block_draws)
            seconds, start = 0.0, time.perf_counter()
            # exact's draws are the exact gradient itself: in bf16 they would sit 3-4.5% from
            # the float32 oracle, a "bias" that is only rounding
            own = "float32" if est.surrogate == "exact" else precision
            with torch.enable_grad(), PRECISIONS[own](x.device.type):
                draws = gradient_draws(vae, est, x, num_draws, num_particles=num_particles,
                                       chunk_size=chunk_size, train_scale=train_scale,
                                       vectorized=vectorized, precision=precision,
                                       paths=paths, relaxation=relaxation)
                for g in draws:
                    seconds += time.perf_counter() - start
                    g = {k: v.detach() for k, v in g.items()}
                    # the sums are float32/float64 work: no autocast
                    with torch.autocast(x.device.type, enabled=False):
                        if compile is None:
                            compile = big and next(iter(g.values())).dtype != torch.float32
                        if compile and moments.kernel_draws == 0:
                            compile_start = time.perf_counter()
                            moments.kernel = _compiled_moments(g, oracle)
                            moments.kernel_draws = next(iter(g.values())).shape[0]
                            compile_seconds += time.perf_counter() - compile_start
                        moments.add(g)
                    start = time.perf_counter()
            stats = _summary(moments, oracle, num_bootstrap, generator)
            boots[name] = {grp: s.pop("_trace_boot") for grp, s in stats.items()}
            for s in stats.values():  # variance at equal cost: per second of drawing
                s["cost_adjusted_variance"] = s["trace"] * seconds / num_draws
            results[name] = {"groups": stats, "seconds_per_draw": seconds / num_draws,
                             "num_particles": max(num_particles, est.min_particles),
                             "score_function": est.score_function, "path": paths[-1].path,
                             # what the intervals resample: blocks of draws (their number) or
                             # single draws
                             "bootstrap": {"trace": "blocks" if by_block else "draws",
                                           "blocks": len(moments.block_counts)
                                           if moments.block_sums is not None else 0}}
        for name in names:
            for grp, s in results[name]["groups"].items():
                ref = results[reference]["groups"][grp]["trace"]
                s["ratio_to_reparam"] = s["trace"] / max(ref, 1e-300)
                s["ratio_to_reparam_ci"] = _interval(boots[name][grp]
                                                     / boots[reference][grp].clamp_min(1e-300))
    return {"estimators": results, "num_draws": num_draws, "oracle_draws": oracle_draws,
            "oracle_seconds": oracle_seconds, "compile_seconds": compile_seconds,
            "batch_size": int(x.shape[0]), "ratio_reference": reference,
            "oracle": "exact" if discrete else "reparametrized",
            "groups": {g: len(v) for g, v in groups.items()},
            "precision": precision, "precision_choice": precision_choice,
            "paths": [p.as_dict() for p in paths]}


