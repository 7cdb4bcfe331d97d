"""Gradient estimators of the ELBO: one registry entry each.

An :class:`Estimator` says how the guide samples the latent site ``z`` (the distribution it
hands to ``pyro.sample`` and the site's ``infer`` options), which Pyro ELBO turns the traces
into a surrogate loss, and (for the vectorized variance lab, :mod:`pyro_vae.lab.variance`) the same
surrogate written as a plain function of one draw of noise. Pyro decides per site between a
pathwise and a score-function gradient from the distribution's ``has_rsample``; see
docs/estimators.md for the derivations and how each entry maps onto Pyro.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import ELBO, Trace_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from pyro.util import check_model_guide_match, check_site_shape
from torch import nn

from ..errors import ConfigError
from ..registry import ESTIMATORS, PRIORS
from .discrete import (
    MAX_EXACT_CODES,
    REBAR_ELBO,
    RLOO_ELBO,
    VIMCO_ELBO,
    ExactELBO,
    RelaxedELBO,
    _unwrap,
    concrete_sample,
    conditional_concrete,
    importance_parts,
    is_discrete,
    num_codes,
    rebar_hard_code,
    rebar_surrogate,
    relax,
    rloo_surrogate,
    straight_through_code,
    vimco_surrogate,
)

if TYPE_CHECKING:
    from ..config import Config
    from .program import ProgramStructure


# -- how the guide samples z ----------------------------------------------------------------------
class ScoreFunction:
    """Mixin: q(z|x) that Pyro must treat as non-reparameterizable, a score-function site.

    ``has_rsample`` is overridden on a class, not set on the instance: Pyro's plate expands the
    distribution and ``expand`` keeps the class (an instance-level ``has_rsample_(False)`` on an
    ``Independent`` raises AttributeError inside a plate; see docs/estimators.md).
    :func:`score_function` makes such a class for any distribution the encoder returns.
    """

    has_rsample = False


class StickingTheLanding:
    """Mixin: q(z|x) with the "sticking the landing" path derivative (Roeder, Wu & Duvenaud 2017).

    z is reparametrized, but the surrogate's ``log q(z)`` is evaluated with the variational
    parameters detached, so only the path through z carries gradient; the score term
    ``grad log q`` (zero mean, often large) is dropped. ``log_prob`` itself is unchanged, so the
    ELBO value Pyro reports is the usual one.
    """

    def score_parts(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> ScoreParts:
        log_prob = self.log_prob(x)
        entropy_term = detached(self).log_prob(x)
        return ScoreParts(log_prob=log_prob, score_function=0, entropy_term=entropy_term)


_VARIANTS: dict[tuple[type, type], type] = {}


def _variant(q: dist.Distribution, mixin: type) -> dist.Distribution:
    """A shallow copy of ``q`` whose class is ``mixin`` + ``type(q)`` (made once per pair).

    The subclass inherits ``__init__``, so torch's ``expand`` (which Pyro's plates call) keeps
    it; the copy shares every parameter tensor with ``q``, so gradients reach the encoder.
    """
    cls = type(q)
    if issubclass(cls, mixin):
        return q
    key = (mixin, cls)
    if key not in _VARIANTS:
        _VARIANTS[key] = type(f"{mixin.__name__}{cls.__name__}", (mixin, cls), {})
    out = copy.copy(q)
    out.__class__ = _VARIANTS[key]
    return out


def detached(d: dist.Distribution) -> dist.Distribution:
    """A copy of ``d`` whose tensors (nested distributions included) are detached from the graph:
    the same density, no gradient to its parameters."""
    out = copy.copy(d)
    for name, value in list(vars(out).items()):
        if isinstance(value, torch.Tensor):
            setattr(out, name, value.detach())
        elif isinstance(value, torch.distributions.Distribution):
            setattr(out, name, detached(value))
    return out


def score_function(q: dist.Distribution) -> dist.Distribution:
    """``q`` as a score-function site (any distribution)."""
    return _variant(q, ScoreFunction)


def sticking_the_landing(q: dist.Distribution) -> dist.Distribution:
    """``q`` with the path-derivative surrogate (any reparametrizable distribution)."""
    return _variant(q, StickingTheLanding)


def _identity(q: dist.Distribution) -> dist.Distribution:
    return q


def _no_infer(modules: nn.ModuleDict, x: torch.Tensor, scale: float) -> dict[str, Any]:
    return {}


def _no_modules(cfg: Config, num_pixels: int) -> dict[str, nn.Module]:
    return {}


# -- baselines ------------------------------------------------------------------------------------
class NeuralBaseline(nn.Module):
    """b(x): an input-dependent baseline for the score-function term (Mnih & Gregor 2014, NVIL).

    It predicts the learning signal ``log p(x, z) - log q(z|x)`` of each image and is trained
    jointly with the VAE by the squared error Pyro adds to the surrogate loss. The network
    outputs nats *per pixel* and the result is multiplied by the number of pixels and the plate
    scale (dataset size / batch size): Pyro's downstream cost is scaled by the plate (Pyro
    #555), and a network asked to output values in the thousands directly would take Adam
    thousands of steps to get there.
    """

    def __init__(self, num_pixels: int, hidden_dim: int = 100):
        super().__init__()
        self.num_pixels = num_pixels
        self.net = nn.Sequential(nn.Linear(num_pixels, hidden_dim), nn.Tanh(),
                                 nn.Linear(hidden_dim, 1))
        # start near a typical per-pixel cost of a Bernoulli VAE (about -0.2 nats per pixel)
        nn.init.constant_(self.net[-1].bias, -0.2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.net(x).squeeze(-1) * (self.num_pixels * scale)


def _nn_baseline_modules(cfg: Config, num_pixels: int) -> dict[str, nn.Module]:
    return {"baseline": NeuralBaseline(num_pixels)}


def _avg_baseline_infer(modules: nn.ModuleDict, x: torch.Tensor, scale: float) -> dict[str, Any]:
    return {"baseline": {"use_decaying_avg_baseline": True, "baseline_beta": AVG_BASELINE_BETA}}


def _nn_baseline_infer(modules: nn.ModuleDict, x: torch.Tensor, scale: float) -> dict[str, Any]:
    # ``baseline_value`` (rather than ``nn_baseline``) lets us pass the plate scale; its graph
    # only reaches the baseline's parameters because x is data.
    return {"baseline": {"baseline_value": modules["baseline"](x, scale)}}


#: Decay of the moving-average baseline b <- beta b + (1 - beta) cost (Pyro's default).
AVG_BASELINE_BETA = 0.90
#: Param-store name under which Pyro keeps the moving-average baseline of site "z".
AVG_BASELINE_PARAM = "__baseline_avg_downstream_cost_z"


# -- objectives -----------------------------------------------------------------------------------
class IWAE_ELBO(ELBO):
    """The importance-weighted bound of Burda, Grosse & Salakhutdinov (2016), per data point.

        L_K(x) = E[ log (1/K) sum_k p(x, z_k) / q(z_k|x) ],   z_1..z_K ~ q(z|x)

    ``RenyiELBO(alpha=0)`` computes the same bound but applies the plate's subsampling scale
    *inside* the log-mean-exp; here the per-image bound is computed from unscaled densities and
    the scale multiplies the sum over images, so the minibatch estimate stays unbiased for the
    dataset's bound. Only reparametrized guides are accepted. Particles are vectorized.
    """

    def __init__(self, num_particles: int = 2):
        super().__init__(num_particles=num_particles, max_plate_nesting=1,
                         vectorize_particles=True)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - Pyro's signature
        model_trace, guide_trace = pyro.infer.enum.get_importance_trace(
            "flat", self.max_plate_nesting, model, guide, args, kwargs)
        return model_trace, guide_trace

    #: The registry name that error messages give.
    name = "iwae"

    def _log_weights(self, model_trace, guide_trace) -> tuple[torch.Tensor, Any]:  # noqa: ANN001
        """log p(x, z_k) - log q(z_k|x) per particle and image, ``(K, batch)``, from unscaled
        densities; and the data plate's subsampling scale (:func:`importance_parts`)."""
        for site in guide_trace.nodes.values():
            if site["type"] == "sample" and not site["fn"].has_rsample:
                raise ConfigError(f"estimator {self.name} needs a reparametrized guide; guide "
                                  f"site {site['name']!r} is {type(site['fn']).__name__}, "
                                  f"which has no rsample")
        log_w, _, _, plate_scale = importance_parts(model_trace, guide_trace, self.num_particles)
        return log_w, plate_scale

    def _surrogate(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        log_w, scale = self._log_weights(model_trace, guide_trace)
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)  # (batch,)
        return -(bound * scale).sum()

    def loss(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        with torch.no_grad():
            return self._surrogate(model, guide, *args, **kwargs).item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        return self._surrogate(model, guide, *args, **kwargs)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        surrogate = self._surrogate(model, guide, *args, **kwargs)
        surrogate.backward()
        return surrogate.item()


class DReG_ELBO(IWAE_ELBO):
    """The IWAE bound with doubly-reparametrized gradients (Tucker, Lawson, Gu & Maddison 2019).

    The value is the importance-weighted bound of :class:`IWAE_ELBO`. With w~_k the normalised
    importance weights, the gradients are

        decoder and prior (theta): sum_k w~_k grad_theta log p(x, z_k)           (as IWAE)
        encoder (phi):             sum_k w~_k^2 d log w_k / d z_k  d z_k / d phi

    where log w_k = log p(x, z_k) - log q(z_k|x) is differentiated through z_k only (the
    density of q taken with its parameters detached): the score term of IWAE's encoder
    gradient, whose noise does not shrink with K, is replaced by its reparametrized expectation.

    Surrogate (two model passes): the guide draws z_k once; the model is replayed on it to get
    the weights w~ (without a graph: nothing is differentiated through this pass); then the
    model is replayed on z'_k = z_k.detach() + w~_k (z_k - z_k.detach()), which equals z_k but
    carries w~_k times its gradient back to phi. Differentiating sum_k w~_k log w_k(z'_k) gives
    w~_k for every direct dependence on a parameter (the decoder, the prior -- including an
    encoder the prior uses, as the VampPrior does) and w~_k * w~_k for the path through z_k. A
    detached correction makes the surrogate's value the bound. Only reparametrized guides are
    accepted.
    """

    name = "dreg"

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - Pyro's signature
        # The first model pass only gives the weights, so it builds no graph.
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        with torch.no_grad():
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(
                *args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        traces = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
        with torch.no_grad():
            for trace in traces:
                trace.compute_log_prob()
                for site in trace.nodes.values():
                    if site["type"] == "sample" and is_validation_enabled():
                        check_site_shape(site, self.max_plate_nesting)
        return traces

    def _surrogate(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        log_w, scale = self._log_weights(model_trace, guide_trace)
        log_w = log_w.detach()
        bound = torch.logsumexp(log_w, dim=0) - math.log(self.num_particles)  # (batch,)
        weights = torch.softmax(log_w, dim=0)  # (K, batch)
        reweighted = guide_trace.copy()
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                value = site["value"]
                w = weights.reshape(weights.shape + (1,) * (value.dim() - weights.dim()))
                reweighted.nodes[name] = dict(site, value=value.detach()
                                              + w * (value - value.detach()))
        replayed = poutine.trace(poutine.replay(self._vectorized_num_particles(model),
                                                trace=reweighted)).get_trace(*args, **kwargs)
        path_log_w = 0.0
        for trace, sign in ((prune_subsample_sites(replayed), 1.0), (reweighted, -1.0)):
            for site in trace.nodes.values():
                if site["type"] != "sample":
                    continue
                fn = site["fn"] if sign > 0 else detached(site["fn"])
                log_p = fn.log_prob(site["value"])
                path_log_w = path_log_w + sign * log_p.reshape(self.num_particles, -1)
        surrogate = (weights * path_log_w).sum(0)
        per_image = surrogate + (bound - surrogate).detach()
        return -(per_image * scale).sum()


def _trace_elbo(cfg: Config) -> ELBO:
    return Trace_ELBO(num_particles=cfg.train.num_particles or 1, vectorize_particles=True,
                      max_plate_nesting=1)


def _mean_field_elbo(cfg: Config) -> ELBO:
    return TraceMeanField_ELBO(num_particles=cfg.train.num_particles or 1, vectorize_particles=True,
                               max_plate_nesting=1)


def _tracegraph_elbo(cfg: Config) -> ELBO:
    # Not vectorized: the baselines have one slot per batch position, not per (particle, image).
    return TraceGraph_ELBO(num_particles=cfg.train.num_particles or 1, max_plate_nesting=1)


def _iwae_elbo(cfg: Config) -> ELBO:
    return IWAE_ELBO(num_particles=cfg.train.num_particles or ESTIMATORS["iwae"].default_particles)


def _dreg_elbo(cfg: Config) -> ELBO:
    return DReG_ELBO(num_particles=cfg.train.num_particles or ESTIMATORS["dreg"].default_particles)


def _vimco_elbo(cfg: Config) -> ELBO:
    return VIMCO_ELBO(num_particles=cfg.train.num_particles
                      or ESTIMATORS["vimco"].default_particles)


def _rloo_elbo(cfg: Config) -> ELBO:
    return RLOO_ELBO(num_particles=cfg.train.num_particles or ESTIMATORS["rloo"].default_particles)


def _rebar_elbo(cfg: Config) -> ELBO:
    return REBAR_ELBO(cfg.train.temperature, cfg.train.temperature_final,
                      density=cfg.train.relaxed_density, num_particles=cfg.train.num_particles or 1)


def _relaxed_elbo(cfg: Config, straight_through: bool = False) -> ELBO:
    return RelaxedELBO(cfg.train.temperature, cfg.train.temperature_final,
                       straight_through=straight_through, density=cfg.train.relaxed_density,
                       num_particles=cfg.train.num_particles or 1, vectorize_particles=True,
                       max_plate_nesting=1)


def _straight_through_elbo(cfg: Config) -> ELBO:
    return _relaxed_elbo(cfg, straight_through=True)


def _exact_elbo(cfg: Config) -> ELBO:
    return ExactELBO()


# -- the same surrogates as functions of one draw (for vectorized variance measurement) -----------
@dataclass
class Draw:
    """Everything one gradient draw of the per-image surrogate needs, as plain tensors.

    The variance lab (:mod:`pyro_vae.lab.variance`) builds this from a functional call of the VAE so
    that ``torch.func.grad`` of :attr:`Estimator.draw_loss` gives one draw's gradient and
    ``torch.func.vmap`` gives R of them at once.

    Attributes:
        x: the minibatch, ``(batch, num_pixels)``.
        q: the encoder's q(z|x), a function of the encoder parameters.
        eps: standard normal noise, ``(particles, batch, latent_dim)``.
        decoder: ``z -> p(x|z)``; prior: the prior p(z), both functions of their parameters.
        baseline: the score-function baseline per image (already plate-scaled), or None.
        discrete: for a discrete code, ``eps`` holds the sampled codes themselves (score-
            function estimators) or the uniform noise of the Concrete relaxation (relaxed
            estimators), ``(particles, batch, *event_shape)``.
        temperature, relaxed_density: the relaxation of the relaxed estimators.
    """

    x: torch.Tensor
    q: dist.Independent
    eps: torch.Tensor
    decoder: Callable[[torch.Tensor], dist.Distribution]
    prior: dist.Distribution
    baseline: torch.Tensor | None = None
    discrete: bool = False
    temperature: float = 1.0
    relaxed_density: str = "discrete"

    def z(self) -> torch.Tensor:
        if self.discrete:  # a code sampled beforehand, as Pyro's guide would have
            return self.eps
        base = self.q.base_dist
        return base.loc + base.scale * self.eps

    def log_joint(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).log_prob(self.x) + self.prior.log_prob(z)


def _draw_pathwise(d: Draw) -> torch.Tensor:
    z = d.z()
    return -(d.log_joint(z) - d.q.log_prob(z)).mean()


def _draw_stl(d: Draw) -> torch.Tensor:
    z = d.z()
    base = d.q.base_dist
    stopped = dist.Normal(base.loc.detach(), base.scale.detach(), validate_args=False)
    return -(d.log_joint(z) - stopped.to_event(1).log_prob(z)).mean()


def _draw_analytic_kl(d: Draw) -> torch.Tensor:
    z = d.z()
    kl = torch.distributions.kl_divergence(d.q, d.prior)
    return -(d.decoder(z).log_prob(d.x) - kl).mean()


def _draw_score(d: Draw) -> torch.Tensor:
    # Pyro's surrogate for a non-reparametrized site (Trace_ELBO / TraceGraph_ELBO):
    # log p(x, z) [pathwise for the decoder] + log q(z) * (learning signal - baseline).detach()
    z = d.z().detach()
    log_q = d.q.log_prob(z)
    signal = d.log_joint(z) - log_q
    if d.baseline is not None:
        signal = signal - d.baseline
    return -(d.log_joint(z) + log_q * signal.detach()).mean()


def _draw_vimco(d: Draw) -> torch.Tensor:
    # VIMCO_ELBO's surrogate (z sampled without a path: detached), per image
    z = d.z().detach()
    log_q = d.q.log_prob(z)
    _, surrogate = vimco_surrogate(d.log_joint(z) - log_q, log_q)
    return -surrogate.mean()


def _draw_rloo(d: Draw) -> torch.Tensor:
    # RLOO_ELBO's surrogate, per image
    z = d.z().detach()
    log_q = d.q.log_prob(z)
    log_p = d.log_joint(z)
    _, surrogate = rloo_surrogate(log_p - log_q, log_p, log_q)
    return -surrogate.mean()


def _draw_relaxed(d: Draw, straight_through: bool) -> torch.Tensor:
    # RelaxedELBO's surrogate: the Concrete sample from the uniforms Pyro's rsample would
    # draw, scored (at the relaxed value) by the relaxations of q and the prior
    soft = concrete_sample(d.q, d.eps, d.temperature, straight_through)
    z = straight_through_code(soft, d.q) if straight_through else soft
    q_r = relax(d.q, d.temperature, density=d.relaxed_density)
    p_r = relax(d.prior, d.temperature, density=d.relaxed_density)
    return -(d.decoder(z).log_prob(d.x) + p_r.log_prob(soft) - q_r.log_prob(soft)).mean()


def _draw_gumbel_softmax(d: Draw) -> torch.Tensor:
    return _draw_relaxed(d, False)


def _draw_straight_through(d: Draw) -> torch.Tensor:
    return _draw_relaxed(d, True)


def _draw_rebar(d: Draw) -> torch.Tensor:
    # REBAR_ELBO's surrogate, per image: the noise is (u, v), the code is what u rounds to
    u, v = d.eps[0], d.eps[1]
    code = rebar_hard_code(d.q, u).detach()
    q_r = relax(d.q, d.temperature, density=d.relaxed_density)
    p_r = relax(d.prior, d.temperature, density=d.relaxed_density)

    def relaxed_signal(z: torch.Tensor) -> torch.Tensor:
        return d.decoder(z).log_prob(d.x) + p_r.log_prob(z) - q_r.log_prob(z)

    log_q = d.q.log_prob(code)
    log_p = d.log_joint(code)
    _, surrogate = rebar_surrogate(
        log_p - log_q, log_p, log_q, relaxed_signal(concrete_sample(d.q, u, d.temperature)),
        relaxed_signal(conditional_concrete(d.q, code, v, d.temperature)))
    return -surrogate.mean()


def _draw_iwae(d: Draw) -> torch.Tensor:
    z = d.z()
    log_w = d.log_joint(z) - d.q.log_prob(z)  # (particles, batch)
    return -(torch.logsumexp(log_w, dim=0) - math.log(d.eps.shape[0])).mean()


def _draw_dreg(d: Draw) -> torch.Tensor:
    # DReG_ELBO's surrogate for one draw: weights from a pass without gradient, then each
    # particle's path gradient scaled by its weight (see DReG_ELBO).
    z = d.z()
    base = d.q.base_dist
    stopped = dist.Normal(base.loc.detach(), base.scale.detach(), validate_args=False).to_event(1)
    with torch.no_grad():
        log_w = d.log_joint(z) - stopped.log_prob(z)  # (particles, batch)
    weights = torch.softmax(log_w, dim=0)
    z_w = z.detach() + weights[..., None] * (z - z.detach())
    surrogate = (weights * (d.log_joint(z_w) - stopped.log_prob(z_w))).sum(0)
    bound = torch.logsumexp(log_w, dim=0) - math.log(d.eps.shape[0])
    return -(surrogate + (bound - surrogate).detach()).mean()


# -- the registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimator:
    """How one gradient estimator is wired into the guide and the ELBO.

    Attributes:
        name: registry key.
        summary: one line for ``--help`` and the docs.
        make_elbo: ``(config) -> pyro.infer.ELBO`` building the objective.
        posterior: maps the encoder's q(z|x) to the distribution the guide samples ``z`` from
            (identity for pathwise gradients; a non-reparameterized or path-derivative variant
            otherwise).
        site_infer: ``(modules, x, scale) -> dict`` giving the ``infer`` options of the ``z``
            site (e.g. baselines); ``modules`` are those made by ``make_modules`` and ``scale``
            is the data plate's subsampling scale (dataset size / batch size).
        make_modules: ``(config, num_pixels) -> dict`` of extra trainable modules (e.g. a
            neural baseline) that live in the VAE and are trained and checkpointed with it.
        draw_loss: the estimator's surrogate loss per image for one draw, as a function of a
            :class:`Draw`; its gradient must equal Pyro's surrogate gradient divided by the
            batch size (checked in tests/test_variance.py). None: the variance lab falls back
            to a loop over Pyro's own ``loss_and_grads``.
        surrogate: the form of the surrogate for the latent site, which kernels that reproduce
            it (:mod:`pyro_vae.inference.accelerators`) read instead of the name:
            ``pathwise``, ``path-derivative`` (log q with detached parameters),
            ``analytic-kl``, ``score-function``, ``importance-weighted`` or
            ``doubly-reparametrized`` (the importance-weighted bound with DReG gradients).
        baseline: ``"avg"`` or ``"nn"`` when the score-function term uses a baseline.
        needs_closed_form_kl: the ELBO integrates KL(q || p) analytically, so the prior must
            be a diagonal Normal.
        min_particles: smallest useful ``--num-particles`` (2 for the importance-weighted bound,
            which with one particle is the plain ELBO).
        default_particles: the particles used when ``--num-particles`` is 0 (the default).
        needs_rsample: every guide site must be reparametrizable (``has_rsample``); the trainer
            refuses other guides before anything is written (:meth:`check_program`).
        requires: what the guide family's q(z|x) must be for this estimator, read from the
            distribution (never from names): ``rsample`` (reparametrizable), ``discrete`` (a
            discrete support: Bernoulli or one-hot units), ``enumerable`` (discrete with at
            most :data:`~pyro_vae.inference.discrete.MAX_EXACT_CODES` codes) or ``any``.
        encoder_lr_scale: the encoder's Adam learning rate is ``--lr`` times this. Adam takes
            steps of about ``lr`` per parameter whatever the gradient's noise, so an encoder
            gradient with a signal-to-noise ratio near 0.025 (plain REINFORCE, measured in
            docs/estimators.md) random-walks at ``lr`` = 1e-3 and the ELBO falls after the first
            epoch; a tenth of the rate lets it improve.
    """

    name: str
    summary: str
    make_elbo: Callable[[Config], ELBO]
    posterior: Callable[[dist.Distribution], dist.Distribution] = _identity
    site_infer: Callable[[nn.ModuleDict, torch.Tensor, float], dict[str, Any]] = _no_infer
    make_modules: Callable[[Config, int], dict[str, nn.Module]] = field(default=_no_modules)
    draw_loss: Callable[[Draw], torch.Tensor] | None = None
    surrogate: str = "pathwise"
    baseline: str | None = None
    needs_closed_form_kl: bool = False
    min_particles: int = 1
    default_particles: int = 1
    requires: str = "rsample"
    encoder_lr_scale: float = 1.0
    needs_rsample: bool = False

    @property
    def optimizes_bound(self) -> bool:
        """Whether the objective is the K-sample importance-weighted bound, not the ELBO
        (iwae, dreg, vimco): it has no KL term for a KL weight to scale."""
        return self.surrogate in ("importance-weighted", "doubly-reparametrized",
                                  "multi-sample-score")

    @property
    def score_function(self) -> bool:
        """Whether the encoder's gradient uses the score function (REINFORCE)."""
        return self.surrogate == "score-function"

    def applies_to(self, discrete: bool) -> bool:
        """Whether this estimator can train a code of this kind (continuous or discrete), as
        far as :attr:`requires` tells without building the code."""
        if self.requires == "any":
            return True
        return discrete == (self.requires in ("discrete", "enumerable"))

    def check_config(self, cfg: Config) -> None:
        """Raise ConfigError if this estimator cannot be used with ``cfg``."""
        self._check_family(cfg)
        if self.needs_closed_form_kl:
            if not PRIORS[cfg.model.prior].closed_form_kl:
                raise ConfigError(f"estimator {self.name} needs a closed-form KL, which prior "
                                  f"{cfg.model.prior} does not have; use "
                                  f"train.estimator=\"reparam\"")
        if self.optimizes_bound and (
                cfg.train.beta != 1.0 or cfg.train.kl_warmup_epochs):
            raise ConfigError(f"estimator {self.name} optimizes the importance-weighted bound, "
                              f"which has no KL term for train.beta or "
                              f"train.kl_warmup_epochs to weight; use them with an ELBO "
                              f"estimator such as reparam")
        if cfg.train.num_particles == 0:  # the estimator's own default, recorded in the config
            cfg.train.num_particles = self.default_particles
        if cfg.train.num_particles < self.min_particles:
            why = ("a leave-one-out baseline needs at least one other sample"
                   if self.surrogate in ("leave-one-out-score", "multi-sample-score")
                   else "with one particle the importance-weighted bound is the plain ELBO")
            raise ConfigError(f"estimator {self.name} needs train.num_particles >= "
                              f"{self.min_particles}, got {cfg.train.num_particles} ({why})")

    def check_program(self, structure: ProgramStructure) -> None:
        """Raise ConfigError if this estimator cannot train the traced program ``structure``."""
        for site in structure.guide_sites if self.needs_rsample else ():
            if not site.has_rsample:
                kind = "(".join(t.__name__ for t in site.types) + ")" * (len(site.types) - 1)
                raise ConfigError(f"estimator {self.name} needs a reparametrized guide; guide "
                                  f"site {site.name!r} is {kind}, which has no rsample")


    def _check_family(self, cfg: Config) -> None:
        """Refuse a guide family whose q(z|x) lacks what :attr:`requires` asks for; the
        family is built and asked (``has_rsample``, its support), whatever its name."""
        if self.requires == "any":
            return
        q = example_posterior(cfg)
        if q is None:  # a family that cannot be built here: the first training step will tell
            return
        family = cfg.model.encoder
        if self.requires == "rsample" and not q.has_rsample:
            kind = type(_unwrap(q)[0]).__name__
            raise ConfigError(f"estimator {self.name} needs a reparametrizable q(z|x), and "
                              f"encoder {family} ({kind}) has no rsample; use "
                              f"an estimator for discrete codes (score, vimco, rloo, "
                              f"gumbel-softmax, straight-through, exact)")
        if self.requires in ("discrete", "enumerable") and not is_discrete(q):
            raise ConfigError(f"estimator {self.name} is for discrete codes, and encoder "
                              f"{family} makes a continuous one; use --latent bernoulli or "
                              f"--latent categorical, or another estimator")
        if self.requires == "enumerable":
            count = num_codes(q)
            if count > MAX_EXACT_CODES:
                raise ConfigError(f"estimator {self.name} sums over all {count:.3g} codes, more "
                                  f"than the {MAX_EXACT_CODES} it allows; use a smaller "
                                  f"--latent-dim")


def example_posterior(cfg: Config) -> dist.Distribution | None:
    """q(z|x) of ``cfg``'s guide family at arbitrary features (for checks of its properties),
    or None when the family cannot be built from the config alone."""
    try:
        from ..models.encoders import build_guide_family

        family = build_guide_family(cfg.model.encoder, cfg.model)
        return family(torch.zeros(1, family.num_features))
    except Exception:  # noqa: BLE001 - a plugin family that needs more than the config
        return None


#: Estimator name -> Estimator (the registry lives in :mod:`pyro_vae.registry`). Adding an
#: estimator is one entry.
ESTIMATORS.update({
    "reparam": Estimator(
        "reparam", "pathwise (reparametrized) gradients through Trace_ELBO", _trace_elbo,
        draw_loss=_draw_pathwise),
    "analytic-kl": Estimator(
        "analytic-kl", "reparametrized likelihood term, closed-form KL (TraceMeanField_ELBO)",
        _mean_field_elbo, draw_loss=_draw_analytic_kl, surrogate="analytic-kl",
        needs_closed_form_kl=True),
    "stl": Estimator(
        "stl", "sticking the landing: pathwise, score term of log q dropped (Roeder et al. "
               "2017)", _trace_elbo, posterior=sticking_the_landing, draw_loss=_draw_stl,
               surrogate="path-derivative"),
    "score": Estimator(
        "score", "score function (REINFORCE) for z, no baseline (Trace_ELBO); encoder lr x 0.1",
        _trace_elbo, posterior=score_function, draw_loss=_draw_score, surrogate="score-function",
        requires="any", encoder_lr_scale=0.1),
    "score-avg-baseline": Estimator(
        "score-avg-baseline", "score function with a decaying-average baseline "
                              "(TraceGraph_ELBO)", _tracegraph_elbo,
        posterior=score_function, site_infer=_avg_baseline_infer, draw_loss=_draw_score,
        surrogate="score-function", requires="any",
        baseline="avg"),
    "score-nn-baseline": Estimator(
        "score-nn-baseline", "score function with a neural, input-dependent baseline (NVIL; "
                             "TraceGraph_ELBO)", _tracegraph_elbo,
        posterior=score_function, site_infer=_nn_baseline_infer,
        make_modules=_nn_baseline_modules, draw_loss=_draw_score, surrogate="score-function",
        requires="any", baseline="nn"),
    "iwae": Estimator(
        "iwae", "importance-weighted bound with K = --num-particles samples (default 5), "
                "reparametrized",
        _iwae_elbo, draw_loss=_draw_iwae, surrogate="importance-weighted", min_particles=2,
        default_particles=5, needs_rsample=True),
    "dreg": Estimator(
        "dreg", "importance-weighted bound, doubly-reparametrized encoder gradient (Tucker et "
                "al. 2019), K = --num-particles (default 5)",
        _dreg_elbo, draw_loss=_draw_dreg, surrogate="doubly-reparametrized", min_particles=2,
        default_particles=5, needs_rsample=True),
    "vimco": Estimator(
        "vimco", "K-sample bound, score function with per-sample leave-one-out baselines "
                 "(Mnih & Rezende 2016); K = --num-particles (default 5)",
        _vimco_elbo, posterior=score_function, draw_loss=_draw_vimco,
        surrogate="multi-sample-score", min_particles=2,
        default_particles=5, requires="any"),
    "rloo": Estimator(
        "rloo", "REINFORCE leave-one-out: K samples, each baselined by the mean of the others "
                "(Kool et al. 2019); K = --num-particles (default 5)",
        _rloo_elbo, posterior=score_function, draw_loss=_draw_rloo,
        surrogate="leave-one-out-score", min_particles=2,
        default_particles=5, requires="any"),
    "gumbel-softmax": Estimator(
        "gumbel-softmax", "Concrete / Gumbel-softmax relaxation at --temperature, relaxed "
                          "objective (biased); discrete codes",
        _relaxed_elbo, draw_loss=_draw_gumbel_softmax, surrogate="relaxed",
        requires="discrete"),
    "straight-through": Estimator(
        "straight-through", "straight-through Gumbel: hard codes forward, relaxed gradients "
                            "backward at --temperature (biased); discrete codes",
        _straight_through_elbo, draw_loss=_draw_straight_through, surrogate="relaxed",
        requires="discrete"),
    "rebar": Estimator(
        "rebar", "REBAR (Tucker et al. 2017): score function with the Concrete relaxation at "
                 "--temperature as control variate (unbiased); discrete codes",
        _rebar_elbo, draw_loss=_draw_rebar, surrogate="rebar", requires="discrete"),
    "exact": Estimator(
        "exact", "exact ELBO and gradient by summing over every code (at most 4096 codes)",
        _exact_elbo, surrogate="exact", requires="enumerable"),
})
