"""The variance lab for discrete codes: the exact gradient as oracle, and vectorized draws.

A code of at most :data:`~pyro_vae.inference.discrete.MAX_EXACT_CODES` values has an exact ELBO
gradient (:class:`~pyro_vae.inference.discrete.ExactELBO`, a sum over the code table), so every
estimator's mean gradient can be compared with the truth: its bias, not only its variance.

The draws of the discrete estimators are vectorized the way the Gaussian ones are
(:func:`pyro_vae.lab.bound.split_draws`): the encoder's forward pass and its
vector-Jacobian product are shared by all draws and pulled back from the cotangents at the
logits of q(z|x); decoder and prior are differentiated per draw with ``vmap(grad(...))``. The
noise of a draw is what Pyro's guide would sample: the codes themselves for the score-function
estimators (``q.sample()`` on q expanded to ``(draws, particles, batch)``: with one draw per
chunk the same numbers as Pyro's), the uniforms of ``torch.rand`` for the relaxed ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..inference.accelerators import PathChoice, record, relative_difference
from ..inference.accelerators.code_gradients import exact_table_gradient, shared_code_encoder
from ..inference.accelerators.code_gradients import unsupported_reason as code_unsupported_reason
from ..inference.discrete import ExactELBO, _unwrap, is_discrete
from ..inference.estimators import Draw, Estimator
from ..inference.program import running_estimator
from ..models.vae import VAE
from ..registry import ESTIMATORS
from .bound import split_draws


@torch.no_grad()
def discrete_code(vae: VAE, x: torch.Tensor) -> bool:
    """Whether the encoder's q(z|x) has a discrete support."""
    return is_discrete(vae.encoder(x[:1]))


def exact_gradient(vae: VAE, x: torch.Tensor, params: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    """The exact gradient of the per-image negative ELBO by summing over every code
    (ExactELBO on the program, one backward pass per block of codes)."""
    with running_estimator(vae, ESTIMATORS["exact"]):
        vae.zero_grad(set_to_none=True)
        ExactELBO().loss_and_grads(vae.model, vae.guide, x)
        return {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                / x.shape[0] for k, p in params.items()}


#: Images on which the table-based exact gradient is compared with ExactELBO's.
ORACLE_PROBE_IMAGES = 8
#: Largest relative L2 difference between the two on those images.
ORACLE_TOLERANCE = 1e-4


def exact_oracle(vae: VAE, x: torch.Tensor, params: dict[str, torch.Tensor],
                 paths: list[PathChoice] | None = None) -> dict[str, torch.Tensor]:
    """The exact gradient of the per-image negative ELBO, the discrete lab's oracle.

    From the code tables (:func:`~pyro_vae.inference.accelerators.code_gradients.
    exact_table_gradient`: the decoder run once per code, the likelihood a matrix product)
    where the program has their structure and the two agree on the first
    :data:`ORACLE_PROBE_IMAGES` images; otherwise :func:`exact_gradient` (``ExactELBO`` on the
    program). The path taken is appended to ``paths``.
    """
    problem = code_unsupported_reason(vae, x)
    if problem is None:
        few = x[:ORACLE_PROBE_IMAGES]
        want = exact_gradient(vae, few, params)
        got = exact_table_gradient(vae, few, params)
        rel = relative_difference(got, want)
        if rel <= ORACLE_TOLERANCE:
            choice = PathChoice("oracle", "table", f"sum over every code with the decoder run "
                                f"once per code and the likelihood as a matrix product; equal "
                                f"to ExactELBO's on {few.shape[0]} images ({rel:.1g})")
            oracle = exact_table_gradient(vae, x, params)
        else:
            problem = f"the table's exact gradient differs from ExactELBO's by {rel:.2g}"
    if problem is not None:
        choice = PathChoice("oracle", "exact", f"sum over every code (ExactELBO) ({problem})")
        oracle = exact_gradient(vae, x, params)
    record(choice)
    if paths is not None:
        paths.append(choice)
    return oracle


class _BinaryBernoulli:
    """log p(x|z) of independent Bernoulli pixels at binary x: sum -softplus(sign * logits),
    sign = 1 - 2x (the same number as ``Bernoulli(logits).log_prob(x).sum(-1)``)."""

    def __init__(self, logits: torch.Tensor, sign: torch.Tensor):
        self.logits, self.sign = logits, sign

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return -torch.nn.functional.softplus(self.sign * self.logits).sum(-1)


def _fast_bernoulli_decoder(vae: VAE, x: torch.Tensor) -> Callable | None:
    """``(decoder, z) -> p(x|z)`` with :class:`_BinaryBernoulli` when the decoder returns
    ``Independent(Bernoulli(logits), 1)`` and x is binary; None otherwise."""
    with torch.no_grad():
        probe = vae.decoder(torch.zeros(1, *vae.prior().event_shape, device=x.device))
    base, ndims = _unwrap(probe)
    if not isinstance(base, torch.distributions.Bernoulli) or \
            type(base).log_prob is not torch.distributions.Bernoulli.log_prob:
        return None
    if ndims != 1 or not bool(((x == 0) | (x == 1)).all()) or "logits" not in vars(base):
        return None
    sign = 1.0 - 2.0 * x

    def decode(decoder: Any, z: torch.Tensor) -> _BinaryBernoulli:
        return _BinaryBernoulli(_unwrap(decoder(z))[0].logits, sign)

    return decode


def discrete_noise(vae: VAE, estimator: Estimator, x: torch.Tensor, draws: int,
                   particles: int) -> torch.Tensor:
    """The noise of ``draws`` draws, ``(draws, particles, batch, *event)``: codes sampled from
    q(z|x) for the score-function estimators (``q.sample()`` on q expanded: one draw's codes
    are the numbers Pyro's guide draws from the same RNG state), uniforms for the relaxed
    ones, and for REBAR two sets of uniforms, ``(draws, 2, particles, batch, *event)``."""
    # q in float32 whatever autocast the caller runs under: codes drawn from bf16-rounded
    # probabilities would not be q's, which scores them in float32
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        q = vae.encoder(x)
        if estimator.surrogate == "relaxed":
            return torch.rand(draws, particles, *q.batch_shape, *q.event_shape, device=x.device)
        if estimator.surrogate == "rebar":  # two sets of uniforms per draw, as REBAR_ELBO's
            return torch.rand(draws, 2, particles, *q.batch_shape, *q.event_shape,
                              device=x.device)
        return q.expand(torch.Size((draws, particles, *q.batch_shape))).sample()


def discrete_draws(vae: VAE, estimator: Estimator, x: torch.Tensor,
                   baseline: torch.Tensor | None, params: dict[str, torch.Tensor],
                   temperature: float = 1.0, relaxed_density: str = "discrete",
                   fast_likelihood: bool = True
                   ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """``noise -> per-draw gradients`` of the estimator's ``draw_loss`` for a discrete code,
    the encoder's forward pass shared by all draws (the prior must not use the encoder).

    ``fast_likelihood``: where the decoder's p(x|z) is ``Bernoulli(logits).to_event(1)`` and x
    is binary, its log-probability is computed as -softplus((1 - 2x) * logits) summed over
    pixels (two fused element-wise passes instead of the dozen of the general binary cross-
    entropy, which dominate a draw's time); the caller's probe against Pyro covers it.
    """
    rest = {k: v for k, v in params.items() if not k.startswith("encoder.")}
    # the shared encoder pass (float32 whatever autocast the draws run under): done once, its
    # logits feed every draw's densities
    _, logits, pull_back, make_q = shared_code_encoder(vae, x, params)

    decoder = _fast_bernoulli_decoder(vae, x) if fast_likelihood else None

    def draw_of(v: VAE, logits: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        dec = v.decoder if decoder is None else (lambda z: decoder(v.decoder, z))
        draw = Draw(x, make_q(logits), noise, dec, v.prior(), baseline, discrete=True,
                    temperature=temperature, relaxed_density=relaxed_density)
        return estimator.draw_loss(draw)

    return split_draws(vae, draw_of, (logits,), pull_back, rest)
