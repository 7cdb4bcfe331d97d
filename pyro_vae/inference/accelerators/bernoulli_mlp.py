"""Fused importance log-weights for an MLP decoder with a Bernoulli likelihood.

The importance-sampled log-likelihood (:mod:`pyro_vae.metrics.loglik`) needs log p(x, z_k) -
log q(z_k|x) for thousands of z_k per image. For the structure below the decoder and the
likelihood fuse into one kernel per image; :func:`choose_log_weights` checks the structure on
the traced program and compares the kernel with the traces on one probe image and noise block
before using it.

Structure reproduced: one latent site with a diagonal-Normal guide, one observed site
``Bernoulli(logits).to_event(1)`` whose logits are the decoder's ``net(z)`` (a ``Sequential``
of ``Linear`` layers and elementwise activations), no extra scale or mask, binary x. The prior
is any distribution (N(0, I) takes a shortcut).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
import torch.nn.functional as F

from ..program import inspect_program
from . import GENERIC, PathChoice, diagonal_normal_problem, one_latent_problem, record

if TYPE_CHECKING:
    from ...models.vae import VAE


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


class BernoulliMLPWeights:
    """log p(x, z) - log q(z|x) for an MLP decoder with a Bernoulli likelihood and binary x.

    Same value as the generic path (the traces) up to rounding, with less work:

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
        self.vae = vae
        prior = vae.prior()
        # N(0, I), read off the distribution's own parameters
        self.standard_prior = (isinstance(prior, dist.Independent)
                               and type(prior.base_dist) is dist.Normal
                               and bool((prior.base_dist.loc == 0).all())
                               and bool((prior.base_dist.scale == 1).all()))
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

PROBE_SEED = 20261201


def _layers_problem(vae: VAE) -> str | None:
    net = getattr(vae.decoder, "net", None)
    if not isinstance(net, torch.nn.Sequential) or not len(net):
        return "the decoder has no Sequential .net to fuse"
    modules = list(net)
    if not all(isinstance(m, torch.nn.Linear) == (i % 2 == 0) for i, m in enumerate(modules)) \
            or not isinstance(modules[-1], torch.nn.Linear):
        return "the decoder's net is not Linear layers alternating with activations"
    return None


def choose_log_weights(vae: VAE, x: torch.Tensor, precision: str, compile: bool,
                       generic: Callable[[torch.Tensor, int], torch.Tensor],
                       probe_samples: int = 256) -> tuple[BernoulliMLPWeights | None, PathChoice]:
    """The fused kernel where it reproduces the program's log-weights, else None.

    Args:
        vae: the model; x: the observations it will see (binary for the fused path).
        precision: ``float32`` or ``bfloat16`` (the probe always compares in float32).
        compile: compile the kernel with torch.compile.
        generic: ``(x of one image, k) -> (k,)`` log-weights from the traces, drawing z from
            the global RNG: the reference the probe compares with on the same noise.
        probe_samples: k of the probe.
    """
    what = "log-likelihood"

    def fallback(reason: str) -> tuple[None, PathChoice]:
        return None, record(PathChoice(what, GENERIC, reason))

    structure = inspect_program(vae, x[:2])
    problem = one_latent_problem(structure, latent_scale=None)  # log p(x) is unscaled
    if problem is None:
        problem = diagonal_normal_problem(structure.guide_sites[0], exact=False)
    if problem is None:
        obs = structure.observed_sites[0]
        if len(obs.types) != 2 or not issubclass(obs.types[0], dist.Independent) \
                or obs.types[1] is not dist.Bernoulli:
            problem = f"observed site {obs.name!r} is not Bernoulli(logits).to_event(1)"
    problem = problem or _layers_problem(vae)
    if problem is None and not bool(((x == 0) | (x == 1)).all()):
        problem = "the observations are not binary"
    if problem is not None:
        return fallback(problem)
    with torch.no_grad():
        probe = BernoulliMLPWeights(vae, "float32", compile=False)
        x1 = x[:1]
        q = vae.encoder(x1)
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            torch.manual_seed(PROBE_SEED)
            want = generic(x1, probe_samples)
            torch.manual_seed(PROBE_SEED)  # the guide's rsample draws exactly this noise
            eps = torch.randn(1, probe_samples, q.event_shape[0], device=x.device,
                              dtype=x.dtype)
        got = probe(x1, q.base_dist.loc, q.base_dist.scale, eps)[0]
    error = float((got - want).abs().max())
    if not error <= 1e-3 + 1e-5 * float(want.abs().max()):
        return fallback(f"the probe's log-weights differ from the traces' by {error:.3g} nats")
    return BernoulliMLPWeights(vae, precision, compile), record(PathChoice(
        what, "BernoulliMLPWeights", f"MLP decoder, Bernoulli likelihood, diagonal-Normal guide, "
        f"binary x; log-weights equal the traces' on a probe ({error:.1e} nats)"))
