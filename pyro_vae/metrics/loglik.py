"""Importance-sampled log-likelihood log p(x) (Burda, Grosse & Salakhutdinov 2016, eq. 8).

The estimate is defined by the program's traces: z_k drawn by the guide's own distribution,
log p(x, z_k) - log q(z_k|x) from the sites' own densities (:mod:`pyro_vae.inference.program`).
For an MLP decoder with a Bernoulli likelihood and a diagonal-Normal guide, a fused kernel
(:class:`~pyro_vae.inference.accelerators.BernoulliMLPWeights`) computes the same weights on
the same noise several times faster; it is chosen by inspecting the program and checked on a
probe first.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..inference.accelerators import GENERIC, PathChoice, choose_log_weights, record
from ..inference.accelerators.bernoulli_mlp import AUTO_COMPILE_SAMPLES
from ..inference.program import log_weights, trace_program
from ..models.vae import VAE
from ..progress import Progress
from ..runtime import check_memory
from .checks import check_observations_shape, check_positive

PRECISIONS = ("float32", "bfloat16")


@dataclass
class LogLikelihood:
    """Importance-sampled estimates of log p(x), one per image (Burda et al. 2016, eq. 8).

    Attributes:
        estimate: log (1/K) sum_k p(x, z_k) / q(z_k|x), z_k ~ q(z|x); shape ``(N,)``, nats.
        stderr: Monte Carlo standard error of each estimate, by the delta method:
            sd(w) / (sqrt(K) mean(w)) for the importance weights w (nan when K = 1).
        num_samples: K.
        path: which path computed the log-weights (fused kernel or the traces), and why.
    """

    estimate: torch.Tensor
    stderr: torch.Tensor
    num_samples: int
    path: PathChoice | None = None

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
            g.manual_seed(block_seed(seed, first + i, b))
            lo, hi = max(start, b * NOISE_BLOCK), min(start + num, (b + 1) * NOISE_BLOCK)
            if hi - lo == NOISE_BLOCK:  # a whole block: draw it in place
                torch.randn(NOISE_BLOCK, latent_dim, generator=g, out=out[i, lo - start:hi - start])
            else:
                block = torch.randn(NOISE_BLOCK, latent_dim, generator=g, device=device,
                                    dtype=dtype)
                out[i, lo - start:hi - start] = block[lo - b * NOISE_BLOCK:hi - b * NOISE_BLOCK]
    return out


def block_seed(seed: int, image: int, block: int) -> int:
    """The seed of noise block ``block`` of image ``image`` (both paths draw from it)."""
    return hash((seed, image, block)) % (2**63)


def _generic_block(vae: VAE, x1: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` log-weights of one image from the traces, z drawn by the guide (global RNG)."""
    return log_weights(trace_program(vae, x1, num_particles=num), 1)[:, 0]


def _generic_chunk(vae: VAE, xb: torch.Tensor, seed: int, first: int, start: int, num: int
                   ) -> torch.Tensor:
    """Log-weights ``(B, num)`` of samples ``start ... start+num-1`` of images ``first...``:
    each whole noise block is traced with the RNG seeded by :func:`block_seed`, so for a
    diagonal-Normal guide the draws equal the fused path's."""
    out = torch.empty(xb.shape[0], num, device=xb.device)
    devices = [xb.device] if xb.device.type == "cuda" else []
    blocks = range(start // NOISE_BLOCK, (start + num - 1) // NOISE_BLOCK + 1)
    with torch.random.fork_rng(devices=devices):
        for i in range(xb.shape[0]):
            for b in blocks:
                torch.manual_seed(block_seed(seed, first + i, b))
                lw = _generic_block(vae, xb[i:i + 1], NOISE_BLOCK)
                lo, hi = max(start, b * NOISE_BLOCK), min(start + num, (b + 1) * NOISE_BLOCK)
                out[i, lo - start:hi - start] = lw[lo - b * NOISE_BLOCK:hi - b * NOISE_BLOCK]
    return out


@torch.no_grad()
def importance_log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000,
                              batch_size: int = 8, chunk_size: int | None = None,
                              seed: int | None = None, precision: str = "float32",
                              fast: bool = True, compile: bool | None = None,
                              workers: int = 1, first_index: int = 0,
                              progress: bool = False) -> LogLikelihood:
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
            path, which traces one image and one noise block at a time.
        seed: seeds the noise of each image (drawn from the global RNG when None); results do
            not depend on ``batch_size`` or ``chunk_size``.
        precision: ``float32``, or ``bfloat16`` for the decoder's products on the fused path.
        fast: allow the fused kernel where the program has its structure (MLP decoder,
            Bernoulli likelihood, diagonal-Normal guide, binary x) and its probe agrees.
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
        progress: report progress (:class:`pyro_vae.progress.Progress`: a bar on a terminal,
            a line with an ETA every 30 s in a log).
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        check_positive(name, value)
    check_observations_shape(x)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: "
                          f"{', '.join(PRECISIONS)}")
    if compile is None:
        compile = x.shape[0] * num_samples >= AUTO_COMPILE_SAMPLES
    if fast:
        log_w, choice = choose_log_weights(vae, x, precision, compile,
                                           lambda x1, k: _generic_block(vae, x1, k))
    else:
        log_w, choice = None, record(PathChoice("log-likelihood", GENERIC, "fast=False"))
    use_fast = log_w is not None
    if chunk_size is None:
        chunk_size = FAST_CHUNK if use_fast else NOISE_BLOCK
    check_positive("chunk_size", chunk_size)
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    if precision == "bfloat16" and not use_fast:
        raise ConfigError(f"precision bfloat16 applies only to the fused path, which this "
                          f"program does not take ({choice.reason}); use float32")
    check_positive("workers", workers)
    cores = os.cpu_count() or 1
    if workers > cores:
        raise ConfigError(f"workers = {workers} is more than the {cores} CPU cores here (each "
                          f"worker is a process with one thread); ask for at most {cores}")
    check_memory(log_weight_memory(vae, min(batch_size, x.shape[0]), min(chunk_size, num_samples),
                                   x.shape[1]),
                 f"log p(x) with --batch-size {batch_size} x --chunk-size {chunk_size}",
                 "lower --batch-size or --chunk-size")
    if workers > 1 and x.shape[0] > 1 and x.device.type == "cpu":
        return _parallel_log_likelihood(
            vae, x, workers, first_index, progress=progress, num_samples=num_samples,
            batch_size=batch_size, chunk_size=chunk_size, seed=seed, precision=precision,
            fast=fast, compile=compile)
    estimates, stderrs = [], []
    k_total = num_samples
    # counted in samples (images x K), so that even one batch of a huge K shows its ETA
    bar = Progress(x.shape[0] * num_samples, "log-likelihood", "samples", enabled=progress)
    for first in range(0, x.shape[0], batch_size):
        xb = x[first:first + batch_size]
        if use_fast:
            q = vae.encoder(xb)
            loc, scale = q.base_dist.loc, q.base_dist.scale
        acc1 = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        acc2 = acc1.clone()
        for k0 in range(0, k_total, chunk_size):
            k = min(chunk_size, k_total - k0)
            if use_fast:
                eps = _image_noise(seed, first_index + first, xb.shape[0], k0, k,
                                   loc.shape[-1], x.device, loc.dtype)
                lw = log_w(xb, loc, scale, eps)                           # (B, k)
            else:
                lw = _generic_chunk(vae, xb, seed, first_index + first, k0, k)
            # Each chunk's log-sum-exp is float32 (it subtracts the chunk's maximum first, so
            # only rounding of order 1e-7 relative enters); the running sums are float64.
            lw = lw.float()
            acc1 = torch.logaddexp(acc1, torch.logsumexp(lw, 1).double())
            acc2 = torch.logaddexp(acc2, torch.logsumexp(2 * lw, 1).double())
            bar.update(xb.shape[0] * k)
        log_k = math.log(k_total)
        estimates.append(acc1 - log_k)
        if k_total > 1:
            # Var(w) / mean(w)^2 from the two running sums, then the delta method.
            rel_var = torch.expm1(acc2 + log_k - 2 * acc1).clamp_min(0) * k_total / (k_total - 1)
            stderrs.append((rel_var / k_total).sqrt())
        else:
            stderrs.append(torch.full_like(acc1, math.nan))
    bar.close()
    return LogLikelihood(torch.cat(estimates).float(), torch.cat(stderrs).float(), num_samples,
                         choice)


def _worker_log_likelihood(vae: VAE, x: torch.Tensor, kwargs: dict[str, Any]) -> LogLikelihood:
    from ..runtime import reuse_freed_memory

    reuse_freed_memory()  # the worker owns its process
    torch.set_num_threads(1)
    return importance_log_likelihood(vae, x, **kwargs)


#: Slices of the images per worker process (results do not depend on it).
SLICES_PER_WORKER = 8


def _parallel_log_likelihood(vae: VAE, x: torch.Tensor, workers: int, first_index: int = 0,
                             progress: bool = False, **kwargs: Any) -> LogLikelihood:
    """:func:`importance_log_likelihood` over contiguous slices of ``x`` in ``workers`` spawned
    processes (one torch thread each). Each image's noise is seeded by its index in ``x``, so
    the estimates equal a single process's. Spawning and importing torch costs a few seconds
    per worker, worth it for long jobs such as K = 5000 over a test set."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    workers = min(workers, x.shape[0])
    # more slices than workers, so that progress can be reported as slices finish
    # Slice boundaries fall on the single process's batch boundaries, so every image is
    # computed in the same batch as there and the estimates are identical, not only close.
    n, batch = x.shape[0], kwargs.get("batch_size", 8)
    wanted = min(n, workers * SLICES_PER_WORKER)
    bounds = sorted({min(n, round(i * n / wanted / batch) * batch) for i in range(wanted)} | {n})
    if bounds[0] != 0:
        bounds.insert(0, 0)
    slices = len(bounds) - 1
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool, \
            Progress(x.shape[0] * kwargs["num_samples"], "log-likelihood", "samples",
                     enabled=progress) as bar:
        futures = {pool.submit(_worker_log_likelihood, vae, x[lo:hi].clone(),
                               {**kwargs, "workers": 1, "first_index": first_index + lo}):
                   (i, hi - lo) for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))}
        parts = [None] * slices
        for future in as_completed(futures):
            i, size = futures[future]
            parts[i] = future.result()
            bar.update(size * kwargs["num_samples"])
    return LogLikelihood(torch.cat([p.estimate for p in parts]),
                         torch.cat([p.stderr for p in parts]), parts[0].num_samples,
                         parts[0].path)


def log_weight_memory(vae: VAE, batch: int, chunk: int, num_pixels: int) -> int:
    """Bytes of one step of the log-weights: ``batch x chunk`` rows of z, each with its
    decoder activations (every parameter tensor's output width, as a generous bound) and the
    image-sized likelihood terms, in float32, twice for the temporaries of the kernels."""
    widths = sum(p.shape[0] for p in vae.parameters() if p.ndim >= 2)
    return 2 * 4 * batch * chunk * (widths + 3 * num_pixels)


def log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000, batch_size: int = 8,
                   **kwargs: Any) -> torch.Tensor:
    """Per-image importance-sampled log p(x) estimates, ``(N,)``, in nats.

    The same computation as :func:`importance_log_likelihood` (which also returns the standard
    errors); keyword arguments are passed on to it.
    """
    return importance_log_likelihood(vae, x, num_samples, batch_size, **kwargs).estimate

