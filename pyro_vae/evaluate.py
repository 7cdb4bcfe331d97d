"""Measurements of a trained VAE: test ELBO and its terms, importance-sampled log-likelihood,
active units, anomaly scores; and the run-level ``evaluate`` / ``sample`` / ``score`` actions.

All estimators here are per image and in nats; higher log-likelihood is better, a higher
anomaly score means more anomalous.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from pyro.infer import Trace_ELBO
from torch.distributions import kl_divergence

from .errors import ConfigError, DataError
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
    gradients are estimated). Higher is better.
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    total = 0.0
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


def _image_noise(seed: int, first: int, count: int, start: int, num: int, latent_dim: int,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Standard-normal noise ``(num, count, latent_dim)``: samples ``start ... start+num-1`` of
    images ``first ... first+count-1``.

    Sample k of image n comes from block k // NOISE_BLOCK of a generator seeded from
    (seed, n, block), so the draws do not depend on how images and samples are split into
    batches and chunks.
    """
    out = torch.empty(num, count, latent_dim, device=device, dtype=dtype)
    g = torch.Generator(device=device)
    blocks = range(start // NOISE_BLOCK, (start + num - 1) // NOISE_BLOCK + 1)
    for i in range(count):
        for b in blocks:
            g.manual_seed(hash((seed, first + i, b)) % (2**63))
            block = torch.randn(NOISE_BLOCK, latent_dim, generator=g, device=device, dtype=dtype)
            lo, hi = max(start, b * NOISE_BLOCK), min(start + num, (b + 1) * NOISE_BLOCK)
            out[lo - start:hi - start, i] = block[lo - b * NOISE_BLOCK:hi - b * NOISE_BLOCK]
    return out


def _log_weights_generic(vae: VAE, x: torch.Tensor, q, z: torch.Tensor) -> torch.Tensor:
    """log p(x, z) - log q(z|x) for z of shape ``(k, B, D)``; any prior, likelihood, decoder."""
    return vae.decoder(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)


def _fast_path_ok(vae: VAE, x: torch.Tensor) -> bool:
    """The fused Bernoulli-MLP kernel applies: MLP decoder, Bernoulli likelihood, binary x."""
    dec = vae.decoder
    return (type(dec) is Decoder and type(dec.likelihood) is BernoulliLikelihood
            and isinstance(dec.net[-1], torch.nn.Linear) and bool(((x == 0) | (x == 1)).all()))


class _BernoulliMLPWeights:
    """log p(x, z) - log q(z|x) for an MLP decoder with a Bernoulli likelihood and binary x.

    Two identities make this cheaper than the generic path (same value up to rounding):

    * log Bernoulli(x | logits l) = log sigmoid(s l) with s = 2x - 1 (s in {-1, +1}), and
      s * (W h + b) = (W diag-scaled by s) h + s b: the sign of each image is folded into a
      copy of the last layer's weights, so the log-likelihood is one batched matmul followed by
      one fused log-sigmoid-and-sum pass.
    * log q(z|x) for z = loc + scale * eps is -|eps|^2 / 2 - sum log scale - D log(2 pi) / 2,
      computed from eps without forming z's density again.

    With ``precision='bfloat16'`` the last (784 x hidden) layer multiplies in bfloat16 (AMX on
    recent Intel CPUs); its outputs are rounded to bfloat16 and everything after (log-sigmoid,
    sums, log-sum-exp) is float32/float64. Rounding a logit changes log sigmoid(s l) by at most
    |d/dl| = sigmoid(-s l) times the rounding error, which is small exactly where the model
    predicts the pixel well.
    """

    def __init__(self, vae: VAE, x: torch.Tensor, precision: str):
        self.vae = vae
        net = vae.decoder.net
        self.body = net[:-1]
        last: torch.nn.Linear = net[-1]
        self.dtype = torch.bfloat16 if precision == "bfloat16" else x.dtype
        sign = 2.0 * x - 1.0                                              # (B, P)
        # (B, H, P): per-image last-layer weights with the pixel signs folded in.
        self.weight = (last.weight.t().unsqueeze(0) * sign.unsqueeze(1)).to(self.dtype)
        self.bias = (last.bias * sign).unsqueeze(1)                       # (B, 1, P)

    def __call__(self, q, loc: torch.Tensor, scale: torch.Tensor, eps: torch.Tensor
                 ) -> torch.Tensor:
        z = loc + scale * eps                                             # (k, B, D)
        log_q = (-0.5 * eps.pow(2).sum(-1) - scale.log().sum(-1)
                 - 0.5 * eps.shape[-1] * math.log(2 * math.pi))
        log_prior = self.vae.prior().log_prob(z)
        h = self.body(z.transpose(0, 1)).to(self.dtype)                  # (B, k, H)
        logits = torch.baddbmm(self.bias.to(self.dtype), h, self.weight)  # (B, k, P)
        log_px = _sum_logsigmoid(logits).transpose(0, 1)                  # (k, B)
        return log_px + log_prior - log_q


def _sum_logsigmoid(t: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of log sigmoid(t), in float32."""
    return F.logsigmoid(t.float()).sum(-1)


@torch.no_grad()
def importance_log_likelihood(vae: VAE, x: torch.Tensor, num_samples: int = 5000,
                              batch_size: int = 8, chunk_size: int | None = None,
                              seed: int | None = None, precision: str = "float32",
                              fast: bool = True) -> LogLikelihood:
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
        chunk_size: samples per image per step (default 1024); memory holds
            ``batch_size * chunk_size`` rows of z and of pixel logits.
        seed: seeds the noise of each image (drawn from the global RNG when None); results do
            not depend on ``batch_size`` or ``chunk_size``.
        precision: ``float32``, or ``bfloat16`` for the last decoder layer on the fast path.
        fast: use the fused kernel for MLP decoders with a Bernoulli likelihood and binary x.
    """
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        _check_positive(name, value)
    if chunk_size is None:
        chunk_size = max(1, NOISE_BLOCK)
    _check_positive("chunk_size", chunk_size)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of: "
                          f"{', '.join(PRECISIONS)}")
    if x.dim() != 2 or x.shape[0] == 0:
        raise DataError(f"expected observations of shape (N, num_pixels) with N > 0, "
                        f"got {tuple(x.shape)}")
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()).item())
    use_fast = fast and _fast_path_ok(vae, x)
    if precision == "bfloat16" and not use_fast:
        raise ConfigError("precision bfloat16 applies only to the fast path (MLP decoder, "
                          "bernoulli likelihood, binary images); use float32")
    estimates, stderrs = [], []
    k_total = num_samples
    for first in range(0, x.shape[0], batch_size):
        xb = x[first:first + batch_size]
        q = vae.encoder(xb)
        loc, scale = q.mean, q.stddev
        log_w = _BernoulliMLPWeights(vae, xb, precision) if use_fast else None
        acc1 = torch.full((xb.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        acc2 = acc1.clone()
        for k0 in range(0, k_total, chunk_size):
            k = min(chunk_size, k_total - k0)
            eps = _image_noise(seed, first, xb.shape[0], k0, k, loc.shape[-1], x.device,
                               loc.dtype)
            if use_fast:
                lw = log_w(q, loc, scale, eps)
            else:
                lw = _log_weights_generic(vae, xb, q, loc + scale * eps)
            lw = lw.double()
            acc1 = torch.logaddexp(acc1, torch.logsumexp(lw, 0))
            acc2 = torch.logaddexp(acc2, torch.logsumexp(2 * lw, 0))
        log_k = math.log(k_total)
        estimates.append(acc1 - log_k)
        if k_total > 1:
            # Var(w) / mean(w)^2 from the two running sums, then the delta method.
            rel_var = torch.expm1(acc2 + log_k - 2 * acc1).clamp_min(0) * k_total / (k_total - 1)
            stderrs.append((rel_var / k_total).sqrt())
        else:
            stderrs.append(torch.full_like(acc1, math.nan))
    return LogLikelihood(torch.cat(estimates).float(), torch.cat(stderrs).float(), num_samples)


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
