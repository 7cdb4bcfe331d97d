"""Objectives for discrete codes: relaxations, leave-one-out score functions, exact enumeration.

Pyro turns a guide site whose distribution has no ``rsample`` into a score-function term by
itself, so ``Trace_ELBO`` already trains a Bernoulli or one-hot code (the ``score`` estimators).
What Pyro lacks is written here as :class:`pyro.infer.ELBO` subclasses, each reading the traces
of the unchanged program ``vae.model`` / ``vae.guide``:

* :class:`RelaxedELBO`: ``Trace_ELBO`` on the program with every discrete latent site replaced
  by its Concrete relaxation (Maddison, Mnih & Teh 2017; Jang, Gu & Poole 2017) in *both* the
  guide and the model, at the same temperature. The relaxed sample is scored either by the
  discrete units' log-probabilities extended linearly to it (default, ``density="discrete"``:
  the KL term tends to the discrete one as the temperature falls) or by the Concrete densities
  of guide and prior (``density="concrete"``, the "relaxed objective" of Maddison et al.,
  section 3.3, whose KL term does not depend on the temperature at all). With
  ``straight_through`` the decoder sees the rounded (hard) sample while the densities and the
  backward pass use the relaxed one.
  The relaxation is a Pyro effect handler (:class:`Relax`) applied inside the ELBO only: the
  program itself stays discrete, so every number reported outside training is the discrete
  model's.
* :class:`VIMCO_ELBO`: the K-sample bound with per-sample leave-one-out baselines (Mnih &
  Rezende 2016).
* :class:`RLOO_ELBO`: REINFORCE on each of K samples' ELBO with the mean of the other K - 1 as
  baseline (Kool, van Hoof & Welling 2019).
* :class:`ExactELBO`: the ELBO as an explicit sum over the table of all codes,
  sum_c q(c|x) [log p(x, c) - log q(c|x)], differentiated exactly by autograd.

See docs/discrete.md for the derivations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import ELBO, Trace_ELBO
from pyro.poutine.messenger import Messenger
from torch.distributions.utils import clamp_probs

from ..errors import ConfigError
from ..models.encoders import is_discrete
from .program import is_subsample

#: Largest code table the exact estimator (and the lab's exact oracle) enumerates.
MAX_EXACT_CODES = 4096


# -- what kind of code ----------------------------------------------------------------------------
def _unwrap(fn: torch.distributions.Distribution) -> tuple[Any, int]:
    """The innermost distribution and the event dims that ``Independent`` wrappers add."""
    ndims = 0
    while isinstance(fn, torch.distributions.Independent):
        ndims += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    return fn, ndims


def num_codes(fn: torch.distributions.Distribution) -> int:
    """How many values the event of a discrete ``fn`` takes (2^d bits, K^d one-hot groups)."""
    base, ndims = _unwrap(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        return 2 ** math.prod(fn.event_shape)
    if isinstance(base, torch.distributions.OneHotCategorical):
        k = base.event_shape[-1]
        groups = math.prod(fn.event_shape[:-1])
        return k ** groups
    raise ConfigError(f"cannot enumerate the codes of {type(base).__name__}; the exact "
                      f"estimator needs Bernoulli or OneHotCategorical units")


def code_table(fn: torch.distributions.Distribution, device: Any = None) -> torch.Tensor:
    """Every value of the event of ``fn``, ``(num_codes, *event_shape)``, in a fixed order.

    Raises:
        ConfigError: when there are more than :data:`MAX_EXACT_CODES` of them.
    """
    count = num_codes(fn)
    if count > MAX_EXACT_CODES:
        raise ConfigError(f"the code has {count:.3g} values, more than the {MAX_EXACT_CODES} "
                          f"that exact enumeration allows; use a smaller --latent-dim")
    base, _ = _unwrap(fn)
    index = torch.arange(count, device=device)
    event = fn.event_shape
    if isinstance(base, torch.distributions.Bernoulli):
        bits = torch.arange(len(event) and event[-1], device=device)
        return ((index[:, None] >> bits) & 1).to(torch.get_default_dtype()).reshape(count, *event)
    k, groups = event[-1], math.prod(event[:-1])
    digits = torch.stack([(index // k ** g) % k for g in range(groups)], -1)
    return torch.nn.functional.one_hot(digits, k).to(torch.get_default_dtype()).reshape(
        count, *event)


# -- relaxation -----------------------------------------------------------------------------------
#: How a relaxed sample is scored (``train.relaxed_density``): ``discrete``, by the discrete
#: units' log-probabilities extended to the relaxed sample (linear in it; Jang et al. 2017 use
#: the same discrete KL); ``concrete``, by the Concrete densities of the guide and the prior
#: (Maddison et al. 2017's relaxed objective). See docs/discrete.md for why they differ.
RELAXED_DENSITIES = ("discrete", "concrete")


def soft_log_prob(base: torch.distributions.Distribution, value: torch.Tensor) -> torch.Tensor:
    """The log-probability of discrete units (Bernoulli, or one-hot over the last dim) written
    as a function linear in the unit values, evaluated at a relaxed ``value`` in [0, 1]: at a
    hard code it is the discrete ``log_prob``. Per unit (no event sum)."""
    logits = base.logits
    if isinstance(base, (torch.distributions.OneHotCategorical,
                         torch.distributions.RelaxedOneHotCategorical)):
        return (value * torch.log_softmax(logits, -1)).sum(-1)
    logits, value = torch.broadcast_tensors(logits, value)
    return -torch.nn.functional.binary_cross_entropy_with_logits(logits, value, reduction="none")


class _ClampedRelaxedOneHot(dist.RelaxedOneHotCategorical):
    """RelaxedOneHotCategorical whose samples are kept inside (0, 1): an entry that underflows
    to 0 in float32 would make its own log-density -inf at low temperatures."""

    def rsample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        return clamp_probs(super().rsample(sample_shape))


class DiscreteScored:
    """Mixin for a relaxed distribution: sample as the relaxation does, but score a value
    with :func:`soft_log_prob` of the discrete units (at the relaxed value that a straight-
    through sample carries)."""

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = getattr(value, "_unquantize", value)
        return soft_log_prob(self, value)


_RELAXED: dict[tuple[bool, bool, bool], type] = {}


def _relaxed_class(categorical: bool, straight_through: bool, discrete_scored: bool) -> type:
    key = (categorical, straight_through, discrete_scored)
    if key not in _RELAXED:
        if categorical:
            cls = dist.RelaxedOneHotCategoricalStraightThrough if straight_through \
                else _ClampedRelaxedOneHot
        else:
            cls = dist.RelaxedBernoulliStraightThrough if straight_through \
                else dist.RelaxedBernoulli
        if discrete_scored:
            cls = type(f"DiscreteScored{cls.__name__}", (DiscreteScored, cls), {})
        _RELAXED[key] = cls
    return _RELAXED[key]


def relax(fn: torch.distributions.Distribution, temperature: float,
          straight_through: bool = False, density: str = "discrete"
          ) -> torch.distributions.Distribution:
    """The Concrete relaxation of a Bernoulli or one-hot distribution at ``temperature``, with
    the same ``Independent`` wrappers; pathwise (``has_rsample``). ``density`` says how its
    samples are scored (:data:`RELAXED_DENSITIES`).

    Raises:
        ConfigError: for a distribution with no relaxation here.
    """
    base, ndims = _unwrap(fn)
    if isinstance(base, torch.distributions.Bernoulli):
        categorical = False
    elif isinstance(base, torch.distributions.OneHotCategorical):
        categorical = True
    else:
        raise ConfigError(f"no Concrete relaxation of {type(base).__name__}; the relaxed "
                          f"estimators need Bernoulli or OneHotCategorical latent units")
    if density not in RELAXED_DENSITIES:
        raise ConfigError(f"unknown relaxed density {density!r}; choose one of: "
                          f"{', '.join(RELAXED_DENSITIES)}")
    t = torch.as_tensor(temperature, dtype=base.logits.dtype, device=base.logits.device)
    cls = _relaxed_class(categorical, straight_through, density == "discrete")
    out = cls(t, logits=base.logits, validate_args=False)
    return out.to_event(ndims) if ndims else out


def concrete_sample(q: torch.distributions.Distribution, uniforms: torch.Tensor,
                    temperature: float, straight_through: bool = False) -> torch.Tensor:
    """The relaxed sample that ``relax(q, temperature, straight_through).rsample()`` makes from
    ``uniforms`` (the numbers its ``torch.rand`` call would return): the same operations as
    torch's ``LogitRelaxedBernoulli`` + sigmoid and ``ExpRelaxedCategorical`` + exp, and the
    same clamping, so that the variance lab's vectorized draws and the relaxed training fast
    path equal Pyro's draw for draw. (torch's ``RelaxedBernoulli`` clips its sigmoid at the
    smallest normal float, Pyro's straight-through classes clamp at the float's eps: a
    Concrete density scores the two differently once the temperature is low.)"""
    base, _ = _unwrap(q)
    u = clamp_probs(uniforms)
    if isinstance(base, torch.distributions.OneHotCategorical):
        logits = base.logits - base.logits.logsumexp(-1, keepdim=True)
        scores = (logits + -((-(u.log())).log())) / temperature
        return clamp_probs((scores - scores.logsumexp(-1, keepdim=True)).exp())
    probs = clamp_probs(base.probs)
    y = (u.log() - (-u).log1p() + probs.log() - (-probs).log1p()) / temperature
    if straight_through:
        return clamp_probs(torch.sigmoid(y))
    finfo = torch.finfo(y.dtype)  # torch's SigmoidTransform
    return torch.clamp(torch.sigmoid(y), min=finfo.tiny, max=1.0 - finfo.eps)


def straight_through_code(soft: torch.Tensor, q: torch.distributions.Distribution
                          ) -> torch.Tensor:
    """The rounded (one-hot argmax, or 0/1) code forward, the gradient of ``soft`` backward."""
    base, _ = _unwrap(q)
    if isinstance(base, torch.distributions.OneHotCategorical):
        # the largest entry of each group (a comparison, not one_hot: vmap can trace it)
        hard = (soft == soft.amax(-1, keepdim=True)).to(soft.dtype)
    else:
        hard = soft.round()
    return soft + (hard - soft).detach()


class Relax(Messenger):
    """Replace every discrete latent (unobserved) sample site's distribution by its relaxation.

    Applied around both the model and the guide so that the guide's relaxed sample is scored
    by the prior's relaxation too; observed sites are left alone.
    """

    def __init__(self, temperature: float, straight_through: bool = False,
                 density: str = "discrete"):
        super().__init__()
        self.temperature = temperature
        self.straight_through = straight_through
        self.density = density

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or msg["infer"].get("_do_not_trace"):
            return
        fn = msg["fn"]
        if is_subsample(fn) or not is_discrete(fn):
            return
        msg["fn"] = relax(fn, self.temperature, self.straight_through, self.density)


def relaxed(fn: Callable, temperature: float, straight_through: bool = False,
            density: str = "discrete") -> Callable:
    """``fn`` (a model or guide) run under :class:`Relax`."""

    def run(*args: Any, **kwargs: Any) -> Any:
        with Relax(temperature, straight_through, density):
            return fn(*args, **kwargs)

    return run


class _Annealed:
    """A Concrete temperature that can fall geometrically over training (:meth:`set_progress`,
    called by the trainer before each step)."""

    def _set_temperature(self, temperature: float, temperature_final: float) -> None:
        self.initial_temperature = float(temperature)
        self.temperature_final = float(temperature_final)
        self.temperature = float(temperature)

    def set_progress(self, fraction: float) -> None:
        """Set the temperature for the step at ``fraction`` (0 at the first, 1 at the last)
        of training: tau_0 (tau_final / tau_0)^fraction, or constant without annealing."""
        if self.temperature_final > 0:
            ratio = self.temperature_final / self.initial_temperature
            self.temperature = self.initial_temperature * ratio ** min(max(fraction, 0.0), 1.0)


class RelaxedELBO(_Annealed, Trace_ELBO):
    """Trace_ELBO of the relaxed program (the relaxed objective; see the module docstring).

    Args:
        temperature: the Concrete temperature at the start (lambda > 0).
        temperature_final: when > 0, the temperature falls geometrically to this value over
            training (:meth:`set_progress`, called by the trainer before each step).
        straight_through: hard samples forward, relaxed gradients backward.
        density: how relaxed samples are scored (:data:`RELAXED_DENSITIES`).
    """

    def __init__(self, temperature: float = 1.0, temperature_final: float = 0.0,
                 straight_through: bool = False, density: str = "discrete", **kwargs: Any):
        super().__init__(**kwargs)
        self.density = density
        self._set_temperature(temperature, temperature_final)
        self.straight_through = straight_through

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - Pyro's signature
        how = (self.temperature, self.straight_through, self.density)
        return super()._get_trace(relaxed(model, *how), relaxed(guide, *how), args, kwargs)


# -- K-sample score-function objectives -----------------------------------------------------------
class _MultiSample(ELBO):
    """Shared by VIMCO and RLOO: K vectorized draws of the guide, the model replayed on them,
    and per draw and image the log-weight log p(x, z_k) - log q(z_k|x) (latent sites weighted
    by their ``poutine.scale``, e.g. a KL weight) and log q(z_k|x)."""

    def __init__(self, num_particles: int = 5):
        if num_particles < 2:
            raise ConfigError(f"leave-one-out baselines need at least 2 samples, got "
                              f"num_particles = {num_particles}")
        super().__init__(num_particles=num_particles, max_plate_nesting=1,
                         vectorize_particles=True)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - Pyro's signature
        return pyro.infer.enum.get_importance_trace("flat", self.max_plate_nesting, model, guide,
                                                    args, kwargs)

    def _parts(self, model, guide, args, kwargs):  # noqa: ANN001
        model_trace, guide_trace = next(self._get_traces(model, guide, args, kwargs))
        return importance_parts(model_trace, guide_trace, self.num_particles)

    def loss(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        with torch.no_grad():
            return self._losses(model, guide, args, kwargs)[0].item()

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        # the loss's value (minus the objective) with the surrogate's gradient
        loss, surrogate = self._losses(model, guide, args, kwargs)
        return loss + (surrogate - surrogate.detach())

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        loss, surrogate = self._losses(model, guide, args, kwargs)
        surrogate.backward()
        return loss.item()

    def _losses(self, model, guide, args, kwargs) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
        raise NotImplementedError


def importance_parts(model_trace: poutine.Trace, guide_trace: poutine.Trace, k: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Of K vectorized importance traces: ``(log_w, log_p, log_q, plate_scale)``, the first
    three ``(K, batch)``. log_p sums the model's sites and log_w subtracts the guide's (each
    latent site weighted by its extra scale, 1 unless a KL weight is set), log_q is the
    guide's unweighted log-density; plate_scale is the data plate's subsampling scale."""
    plate_scale = _plate_scale(model_trace)
    log_p, log_w, log_q = 0.0, 0.0, 0.0
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for site in trace.nodes.values():
            if site["type"] != "sample" or is_subsample(site["fn"]):
                continue
            weight = _as_float(site["scale"]) / plate_scale
            lp = site["unscaled_log_prob"].reshape(k, -1)
            log_w = log_w + sign * weight * lp
            if sign > 0:
                log_p = log_p + weight * lp
            else:
                log_q = log_q + lp
    return log_w, log_p, log_q, plate_scale


def _as_float(scale: Any) -> float:
    return float(scale) if not isinstance(scale, torch.Tensor) else float(scale.reshape(-1)[0])


def _plate_scale(model_trace: poutine.Trace) -> float:
    """The subsampling scale of the data plate (dataset size / minibatch), read from the
    observed sites (which no KL weight touches)."""
    for site in model_trace.nodes.values():
        if site["type"] == "sample" and site["is_observed"]:
            return _as_float(site["scale"])
    return 1.0


def _others_mean(log_w: torch.Tensor) -> torch.Tensor:
    """For each of K samples, the mean of the other K - 1 log-weights, ``(K, batch)``."""
    return (log_w.sum(0, keepdim=True) - log_w) / (log_w.shape[0] - 1)


def leave_one_out_bounds(log_w: torch.Tensor) -> torch.Tensor:
    """VIMCO's baselines: for each k, the K-sample bound with log w_k replaced by the mean of
    the other K - 1 log-weights (Mnih & Rezende 2016, eq. 9 with the geometric mean),
    ``(K, batch)`` from ``(K, batch)``."""
    k = log_w.shape[0]
    others_mean = _others_mean(log_w)  # (K, batch)
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)  # (K, K, 1)
    replaced = torch.where(eye, others_mean.unsqueeze(1), log_w.unsqueeze(0))  # row k: k swapped
    return torch.logsumexp(replaced, dim=1) - math.log(k)


class VIMCO_ELBO(_MultiSample):
    """VIMCO (Mnih & Rezende 2016): gradients of the K-sample bound
    L_K = log (1/K) sum_k w_k for a guide sampled without reparametrization.

    Surrogate per image (its gradient is the estimator, eq. 10 of the paper):

        L_K(z detached) + sum_k [L_K - L_K^{-k}]_detached * log q(z_k|x),

    where L_K^{-k} is the bound with log w_k replaced by the mean of the other log-weights. The
    first term carries the decoder's gradient (the IWAE bound's) and sum_k w~_k grad log w_k
    for the encoder; the second is the score term with a per-sample baseline.
    """

    def _losses(self, model, guide, args, kwargs):  # noqa: ANN001
        log_w, _, log_q, scale = self._parts(model, guide, args, kwargs)
        bound, surrogate = vimco_surrogate(log_w, log_q)
        return -(bound.detach() * scale).sum(), -(surrogate * scale).sum()


def vimco_surrogate(log_w: torch.Tensor, log_q: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The K-sample bound and VIMCO's surrogate per image from ``(K, batch)`` log-weights and
    guide log-densities (:class:`VIMCO_ELBO`); z must carry no gradient."""
    bound = torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])
    signal = (bound.unsqueeze(0) - leave_one_out_bounds(log_w)).detach()
    return bound, bound + (signal * log_q).sum(0)


def rloo_surrogate(log_w: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ELBO estimate and the RLOO surrogate per image from ``(K, batch)`` log-weights,
    model and guide log-densities (:class:`RLOO_ELBO`)."""
    baseline = _others_mean(log_w)
    return log_w.mean(0), (log_p + (log_w - baseline).detach() * log_q).mean(0)


class RLOO_ELBO(_MultiSample):
    """REINFORCE leave-one-out (Kool, van Hoof & Welling 2019): K draws per image, each
    draw's ELBO signal f_k = log w_k with the mean of the other K - 1 as its baseline.

    Surrogate per image, averaged over the K draws (the pathwise term of log q, zero in
    expectation, is left out as in Pyro's Trace_ELBO):

        (1/K) sum_k [ log p(x, z_k) + (f_k - mean_{j != k} f_j)_detached * log q(z_k|x) ].

    The objective is the ELBO (the mean of the f_k estimates it).
    """

    def _losses(self, model, guide, args, kwargs):  # noqa: ANN001
        log_w, log_p, log_q, scale = self._parts(model, guide, args, kwargs)
        value, surrogate = rloo_surrogate(log_w, log_p, log_q)
        return -(value.detach() * scale).sum(), -(surrogate * scale).sum()


# -- exact enumeration ----------------------------------------------------------------------------
# -- REBAR: the relaxation as a control variate of the score function ----------------------------
def rebar_hard_code(q: torch.distributions.Distribution, uniforms: torch.Tensor) -> torch.Tensor:
    """The code that :func:`concrete_sample` of ``uniforms`` rounds to at every temperature
    (the sign of its logit, or the argmax of its Gumbel-perturbed logits): a sample of q."""
    base, _ = _unwrap(q)
    u = clamp_probs(uniforms)
    if isinstance(base, torch.distributions.OneHotCategorical):
        scores = base.logits - base.logits.logsumexp(-1, keepdim=True) + -((-(u.log())).log())
        return (scores == scores.amax(-1, keepdim=True)).to(scores.dtype)
    probs = clamp_probs(base.probs)
    return (u.log() - (-u).log1p() + probs.log() - (-probs).log1p() > 0).to(probs.dtype)


def conditional_concrete(q: torch.distributions.Distribution, hard: torch.Tensor,
                         uniforms: torch.Tensor, temperature: float) -> torch.Tensor:
    """A Concrete sample of q at ``temperature`` conditioned on rounding to ``hard``, from fresh
    ``uniforms``, reparametrized in q's logits with the code held fixed (REBAR's z~ | b).

    Bernoulli units: the logistic noise is drawn from the part of (0, 1) that gives ``hard``
    (above 1 - p for a 1, below it for a 0). One-hot groups: with normalized logits the largest
    perturbed logit is a standard Gumbel, and every other one a Gumbel at its logit truncated
    below it (the inverse of its CDF, in a stable log-add form)."""
    base, _ = _unwrap(q)
    v = clamp_probs(uniforms)
    if isinstance(base, torch.distributions.OneHotCategorical):
        logits = base.logits - base.logits.logsumexp(-1, keepdim=True)
        top = (-((-(v.log())).log()) * hard).sum(-1, keepdim=True)  # the chosen one's Gumbel
        others = -torch.logaddexp(-logits + (-(v.log())).log(), -top)
        scores = torch.where(hard > 0, top, others) / temperature
        return clamp_probs((scores - scores.logsumexp(-1, keepdim=True)).exp())
    probs = clamp_probs(base.probs)
    truncated = hard * (1 - probs + v * probs) + (1 - hard) * (v * (1 - probs))
    return concrete_sample(q, truncated, temperature)


def rebar_surrogate(log_w: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor,
                    relaxed: torch.Tensor, conditional: torch.Tensor, eta: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean ELBO estimate and REBAR's surrogate per image from ``(K, batch)`` log-weights,
    model and guide log-densities of the codes, and the relaxed signals (log p~ - log q~) at
    the free and the conditional Concrete samples (:class:`REBAR_ELBO`)."""
    signal = (log_w - eta * conditional).detach()
    return log_w.mean(0), (log_p + signal * log_q + eta * (relaxed - conditional)).mean(0)


class _RebarNoise(Messenger):
    """At each discrete latent sample site (of a guide): draw two sets of uniforms (u, v) in one
    ``torch.rand`` call, take the code u rounds to as the site's value, and keep (u, v, code)
    by site name for the relaxed signals."""

    def __init__(self) -> None:
        super().__init__()
        self.draws: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        fn = msg["fn"]
        if msg["is_observed"] or msg["infer"].get("_do_not_trace") or is_subsample(fn) \
                or not is_discrete(fn):
            return
        base, _ = _unwrap(fn)
        u, v = torch.rand((2, *fn.shape()), device=base.logits.device)
        code = rebar_hard_code(fn, u).detach()
        msg["value"] = code
        self.draws[msg["name"]] = (u, v, code)


class REBAR_ELBO(_Annealed, _MultiSample):
    """REBAR (Tucker et al. 2017): the score-function gradient of the ELBO with the Concrete
    relaxation as its control variate, unbiased at every temperature.

    Per sample: uniforms u give the code b (sampled from q) and the relaxed sample z = the
    Concrete sample of u; fresh uniforms v give z~, a Concrete sample conditioned on rounding
    to b. With f the ELBO's signal log p(x, b) - log q(b) and c the relaxed one (log p~ - log
    q~ at a relaxed code, the relaxed program's; :data:`RELAXED_DENSITIES`), the surrogate per
    image, averaged over the K samples, is

        log p(x, b) + [f - eta c(z~)]_detached log q(b) + eta (c(z) - c(z~)).

    E[c(z~) grad log q(b) + grad c(z~)] = grad E[c(z)] = E[grad c(z)], so the last two terms
    take the control variate's expectation back out: unbiased for any eta and temperature
    (eta = 1 here). The decoder's and the prior's gradients get eta (grad c(z) - grad c(z~)),
    whose mean is zero (z and z~ have the same distribution). The objective is the ELBO.
    """

    def __init__(self, temperature: float = 1.0, temperature_final: float = 0.0,
                 density: str = "discrete", eta: float = 1.0, num_particles: int = 1):
        ELBO.__init__(self, num_particles=num_particles, max_plate_nesting=1,
                      vectorize_particles=True)
        if density not in RELAXED_DENSITIES:
            raise ConfigError(f"unknown relaxed density {density!r}; choose one of: "
                              f"{', '.join(RELAXED_DENSITIES)}")
        self._set_temperature(temperature, temperature_final)
        self.density = density
        self.eta = float(eta)

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - Pyro's signature
        # model and guide are already vectorized over the particles: the noise messenger sits
        # outside that plate, so it sees each site's full (particles, batch) shape
        self._noise, self._model = _RebarNoise(), model

        def noisy_guide(*a: Any, **k: Any) -> Any:
            with self._noise:
                return guide(*a, **k)

        return pyro.infer.enum.get_importance_trace("flat", self.max_plate_nesting, model,
                                                    noisy_guide, args, kwargs)

    def _relaxed_signal(self, guide_trace: poutine.Trace, conditional: bool, args: tuple,
                        kwargs: dict) -> torch.Tensor:
        """log p~(x, z) - log q~(z) per sample and image, ``(K, batch)``, at the free (or the
        conditional) Concrete samples: the relaxed program replayed at them."""
        soft = poutine.Trace()
        for name, node in guide_trace.nodes.items():
            node = {k: v for k, v in node.items()
                    if k not in ("log_prob", "unscaled_log_prob", "log_prob_sum", "score_parts")}
            if name in self._noise.draws:
                u, v, code = self._noise.draws[name]
                q = node["fn"]
                node["value"] = conditional_concrete(q, code, v, self.temperature) \
                    if conditional else concrete_sample(q, u, self.temperature)
                node["fn"] = relax(q, self.temperature, density=self.density)
            soft.add_node(name, **node)
        soft.compute_log_prob()
        model = relaxed(self._model, self.temperature, density=self.density)
        model_trace = poutine.trace(poutine.replay(model, trace=soft)).get_trace(*args, **kwargs)
        model_trace.compute_log_prob()
        return importance_parts(model_trace, soft, self.num_particles)[0]

    def _losses(self, model, guide, args, kwargs):  # noqa: ANN001
        log_w, log_p, log_q, scale = self._parts(model, guide, args, kwargs)
        if len(self._noise.draws) != 1:
            # with a second discrete site whose q depends on the first's code, the relaxed
            # replay would keep that q (built from the hard code): its gradient would miss the
            # jumps of the code, a bias (layer-wise REBAR is not implemented)
            sites = list(self._noise.draws)
            self._forget()
            raise ConfigError(f"rebar handles a guide with one discrete latent site; this one "
                              f"has {len(sites)}: {', '.join(sites) or 'none'}")
        relaxed_z, conditional_z = (self._relaxed_signal(self._guide_trace, c, args, kwargs)
                                    for c in (False, True))
        value, surrogate = rebar_surrogate(log_w, log_p, log_q, relaxed_z, conditional_z,
                                           self.eta)
        self._forget()
        return -(value.detach() * scale).sum(), -(surrogate * scale).sum()

    def _parts(self, model, guide, args, kwargs):  # noqa: ANN001
        model_trace, self._guide_trace = next(self._get_traces(model, guide, args, kwargs))
        return importance_parts(model_trace, self._guide_trace, self.num_particles)

    def loss(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        # the value needs the codes' log-weights only, not the two relaxed replays
        with torch.no_grad():
            log_w, _, _, scale = self._parts(model, guide, args, kwargs)
            self._forget()
            return -(log_w.mean(0) * scale).sum().item()

    def _forget(self) -> None:
        """Drop the step's traces and noise, kept between the calls of one step only."""
        self._guide_trace = self._noise = self._model = None


class ExactELBO(ELBO):
    """The ELBO summed exactly over the table of all codes (an explicit sum, not TraceEnum):

        ELBO(x) = sum_c q(c|x) [log p(x|c) + beta (log p(c) - log q(c|x))],

    one term per code c of the guide's only latent site, evaluated by running the guide and the
    model with the site conditioned on a block of codes (inside a plate over the block). Its
    gradient is exact (autograd of a deterministic sum); blocks of codes are differentiated
    one at a time, so memory stays bounded. At most :data:`MAX_EXACT_CODES` codes.

    Args:
        codes_per_block: codes evaluated together (memory ~ codes x batch x network width).
    """

    def __init__(self, codes_per_block: int = 0):
        super().__init__(num_particles=1, max_plate_nesting=1)
        self.codes_per_block = codes_per_block

    def _get_trace(self, model, guide, args, kwargs):  # noqa: ANN001 - not sampled: unused
        raise NotImplementedError("ExactELBO enumerates codes; it draws no traces")

    def _blocks(self, model, guide, args, kwargs) -> Iterator[torch.Tensor]:  # noqa: ANN001
        """Per block of codes, the block's contribution to the scaled ELBO summed over images
        (a differentiable scalar)."""
        with poutine.block(), torch.no_grad():
            probe = poutine.trace(guide).get_trace(*args, **kwargs)
        latent = [s for s in probe.nodes.values() if s["type"] == "sample"
                  and not s["is_observed"] and not is_subsample(s["fn"])]
        if len(latent) != 1 or not is_discrete(latent[0]["fn"]):
            raise ConfigError("estimator exact needs a guide with one discrete latent site")
        name, fn = latent[0]["name"], latent[0]["fn"]
        table = code_table(fn, device=fn.logits.device if hasattr(fn, "logits") else None)
        batch = fn.batch_shape.numel() or 1
        per_block = self.codes_per_block or max(1, min(len(table), 65536 // batch))
        for start in range(0, len(table), per_block):
            codes = table[start:start + per_block]
            yield self._block(model, guide, args, kwargs, name, codes, fn.batch_shape)

    def _block(self, model, guide, args, kwargs, name, codes, batch_shape):  # noqa: ANN001
        n = codes.shape[0]
        # one row per code, broadcast over the images (not expanded): the decoder runs once
        # per code, and only the densities are computed per (code, image)
        value = codes.reshape(n, *([1] * len(batch_shape)), *codes.shape[1:])

        def in_plate(fn: Callable) -> Callable:
            def run(*a: Any, **k: Any) -> Any:
                with pyro.plate("_exact_codes", n, dim=-(self.max_plate_nesting + 1)):
                    return fn(*a, **k)
            return run

        guide_trace = poutine.trace(poutine.condition(in_plate(guide), data={name: value})
                                    ).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.condition(in_plate(model), data={name: value})
                                    ).get_trace(*args, **kwargs)
        terms = 0.0
        log_q = None
        for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
            for site in trace.nodes.values():
                if site["type"] != "sample" or is_subsample(site["fn"]):
                    continue
                lp = site["fn"].log_prob(site["value"])
                scale = site["scale"]
                terms = terms + sign * lp * scale
                if sign < 0:
                    log_q = lp
        weighted = log_q.exp() * terms  # q(c|x) * (scaled log p - scaled log q), (n, batch)
        return weighted.sum()

    def loss(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        with torch.no_grad():
            return -sum(b.item() for b in self._blocks(model, guide, args, kwargs))

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:  # noqa: ANN001
        return -sum(self._blocks(model, guide, args, kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:  # noqa: ANN001
        total = 0.0
        for block in self._blocks(model, guide, args, kwargs):
            (-block).backward()
            total -= block.item()
        return total
