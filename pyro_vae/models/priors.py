"""Priors p(z): modules whose call returns a distribution over z with event shape (latent_dim,).

A prior may own learnable parameters; the VAE registers it with Pyro (``pyro.module("prior",
...)`` in the model) so SVI trains them with the networks, and its ``state_dict`` is saved in the
checkpoint. Add a prior with one class and one entry in :data:`PRIORS` (docs/priors.md walks
through an example).

Only a diagonal Normal prior has a closed-form KL(q || p) against the encoder's diagonal Normal;
every other prior enters the ELBO through the Monte Carlo term ``log p(z) - log q(z|x)`` that
Trace_ELBO estimates at the sampled z, so the prior only needs ``log_prob`` (and ``sample`` for
generating images).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro.distributions as dist
import pyro.distributions.transforms as T
import torch
from pyro.nn import AutoRegressiveNN
from torch import nn

from ..errors import ConfigError
from ..registry import PRIORS
from .encoders import code_shape
from .layers import MIN_SCALE, positive_scale

if TYPE_CHECKING:
    from ..config import Config, ModelConfig


def _raw_for_scale(scale: float) -> float:
    """The unconstrained value that :func:`positive_scale` maps to ``scale``."""
    return math.log(math.expm1(scale - MIN_SCALE))


class Prior(nn.Module):
    """Base class of priors.

    Subclasses implement :meth:`forward` returning a distribution with ``batch_shape == ()`` and
    ``event_shape == (latent_dim,)``; the data plate broadcasts it over the minibatch. They set
    ``closed_form_kl = True`` only if ``forward`` returns a diagonal Normal, for which
    ``KL(q || p)`` has a closed form (see docs/theory.md); otherwise the KL term is estimated by
    Monte Carlo. The constructor receives the model config and, for priors defined through the
    encoder (VampPrior), the encoder and the image shape. A subclass may override
    :meth:`check_config` to reject settings it cannot work with before anything is built.
    """

    closed_form_kl = False
    #: The kinds of code (``model.latent``) this prior is a distribution over.
    latent_kinds: tuple[str, ...] = ("gaussian",)

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.latent_dim = cfg.latent_dim

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for a configuration this prior cannot work with."""


class StandardNormalPrior(Prior):
    """p(z) = N(0, I)."""

    closed_form_kl = True

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        self.register_buffer("loc", torch.zeros(cfg.latent_dim))
        self.register_buffer("scale", torch.ones(cfg.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, self.scale).to_event(1)


class LearnedGaussianPrior(Prior):
    """p(z) = N(loc, diag(scale^2)) with learnable ``loc`` and ``scale``, starting at N(0, I).

    Still a diagonal Normal, so the analytic-KL estimator can use it. On its own it cannot
    improve the likelihood much (the decoder's first layer can absorb any affine map of z), but
    it is the simplest learnable prior and a useful control.
    """

    closed_form_kl = True

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        self.loc = nn.Parameter(torch.zeros(cfg.latent_dim))
        self.raw_scale = nn.Parameter(torch.full((cfg.latent_dim,), _raw_for_scale(1.0)))

    def forward(self) -> dist.Distribution:
        return dist.Normal(self.loc, positive_scale(self.raw_scale)).to_event(1)


class MixturePrior(Prior):
    """p(z) = sum_k w_k N(z; loc_k, diag(scale_k^2)): K Gaussians, all parameters learnable.

    The weights are a softmax of learnable logits (uniform at the start); the component means
    start at independent N(0, I) draws so the components differ from the first step.
    """

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        k, d = cfg.prior_components, cfg.latent_dim
        self.logits = nn.Parameter(torch.zeros(k))
        self.locs = nn.Parameter(torch.randn(k, d))
        self.raw_scales = nn.Parameter(torch.full((k, d), _raw_for_scale(1.0)))

    def forward(self) -> dist.Distribution:
        components = dist.Normal(self.locs, positive_scale(self.raw_scales)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), components)


class VampPrior(Prior):
    """The VampPrior (Tomczak & Welling 2018, eq. 9): p(z) = (1/K) sum_k q(z | u_k).

    The K pseudo-inputs u_k are learnable images; the prior is the encoder's own posterior
    averaged over them, so it moves with the encoder and the pseudo-inputs are trained by the
    ``log p(z)`` term of the ELBO. Pixels are ``sigmoid`` of unconstrained parameters so the
    pseudo-inputs stay in [0, 1] like the data (the paper clips with a hard tanh instead).
    """

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        if encoder is None or image_shape is None:
            raise ConfigError("prior vamp needs the encoder and the image shape; build it with "
                              "build_prior(cfg, encoder, image_shape)")
        num_pixels = math.prod(image_shape)
        # Dark, slightly noisy images (sigmoid(-2) ~ 0.12), like the paper's small-mean start.
        self.raw_pseudo_inputs = nn.Parameter(-2.0 + 0.5 * torch.randn(cfg.prior_components,
                                                                       num_pixels))
        # The VAE owns the encoder; keeping it out of this module's children stops its weights
        # from appearing twice in state dicts and in Pyro's param store ("prior$$$encoder...").
        object.__setattr__(self, "encoder", encoder)

    @property
    def pseudo_inputs(self) -> torch.Tensor:
        """The K pseudo-inputs as images with pixels in (0, 1), shape ``(K, num_pixels)``."""
        return torch.sigmoid(self.raw_pseudo_inputs)

    def forward(self) -> dist.Distribution:
        components = self.encoder(self.pseudo_inputs)  # batch (K,), event (latent_dim,)
        weights = torch.zeros(components.batch_shape, device=self.raw_pseudo_inputs.device)
        return dist.MixtureSameFamily(dist.Categorical(logits=weights), components)


class FlowPrior(Prior):
    """A normalizing flow over a N(0, I) base: ``prior_flow_depth`` affine autoregressive layers.

    Each layer is Pyro's :class:`~pyro.distributions.transforms.AffineAutoregressive` driven by
    a :class:`~pyro.nn.AutoRegressiveNN` (MADE, Germain et al. 2015) that outputs a shift and a
    log-scale per dimension; each network has its own random variable order (a buffer, so it
    is saved in the checkpoint). They are used in the density direction of a masked autoregressive
    flow (Papamakarios et al. 2017): ``log p(z)``, the only thing training needs, takes one
    network pass per layer; drawing samples inverts each layer one dimension at a time. The
    last layer of each network starts near zero so p(z) starts near N(0, I).
    """

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        d = cfg.latent_dim
        hidden = [cfg.prior_flow_hidden or 3 * d + 1]
        self.register_buffer("base_loc", torch.zeros(d))
        self.register_buffer("base_scale", torch.ones(d))
        self.networks = nn.ModuleList(AutoRegressiveNN(d, hidden)
                                      for _ in range(cfg.prior_flow_depth))
        with torch.no_grad():
            for net in self.networks:
                net.layers[-1].weight.mul_(0.01)
                net.layers[-1].bias.zero_()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        m = cfg.model
        if m.latent_dim < 2:
            raise ConfigError(f"prior flow needs latent_dim >= 2, got {m.latent_dim}")
        if m.prior_flow_hidden and m.prior_flow_hidden < m.latent_dim:
            raise ConfigError(f"model.prior_flow_hidden = {m.prior_flow_hidden} is invalid: an "
                              f"autoregressive network needs at least latent_dim = "
                              f"{m.latent_dim} hidden units (or 0 for 3 * latent_dim + 1)")

    def forward(self) -> dist.Distribution:
        base = dist.Normal(self.base_loc, self.base_scale).to_event(1)
        # Fresh transform objects per call: they cache the last (input, output, log-scale),
        # which must not live on this module (non-leaf tensors would break copy.deepcopy).
        # Each layer maps z towards the base, so sampling goes through the inverses.
        layers = [T.AffineAutoregressive(net).inv for net in self.networks]
        return dist.TransformedDistribution(base, layers)


class StudentTPrior(Prior):
    """p(z) = prod_j StudentT(z_j; df, 0, 1): heavy tails, fixed degrees of freedom ``prior_df``.

    It costs posteriors far from the origin less than N(0, I) does (a polynomial rather than a
    quadratic penalty in log p(z)), which lets rare or outlying images keep distinct codes.
    """

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        self.register_buffer("df", torch.full((cfg.latent_dim,), float(cfg.prior_df)))
        self.register_buffer("loc", torch.zeros(cfg.latent_dim))
        self.register_buffer("scale", torch.ones(cfg.latent_dim))

    def forward(self) -> dist.Distribution:
        return dist.StudentT(self.df, self.loc, self.scale).to_event(1)


class DiscreteUniformPrior(Prior):
    """p(z) uniform over the codes: each bit Bernoulli(1/2), or each one-hot group uniform over
    its K categories (``model.latent``). log p(z) is the same constant for every code, so the
    ELBO's prior term is -d log 2 (or -d log K)."""

    latent_kinds = ("bernoulli", "categorical")

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        self.kind = cfg.latent
        self.register_buffer("logits", torch.zeros(code_shape(cfg)))

    def forward(self) -> dist.Distribution:
        return _discrete_of(self.kind, self.logits)


class DiscreteLearnedPrior(DiscreteUniformPrior):
    """p(z) with learnable logits per bit (or per group and category), independent units,
    starting uniform. Trained by the ELBO's log p(z) term with pathwise gradients (z is a
    sample, the logits are plain parameters)."""

    def __init__(self, cfg: ModelConfig, encoder: nn.Module | None = None,
                 image_shape: tuple[int, ...] | None = None):
        super().__init__(cfg, encoder, image_shape)
        del self.logits
        self.logits = nn.Parameter(torch.zeros(code_shape(cfg)))


def _discrete_of(kind: str, logits: torch.Tensor) -> dist.Distribution:
    if kind == "categorical":
        return dist.OneHotCategorical(logits=logits).to_event(1)
    return dist.Bernoulli(logits=logits).to_event(1)


#: Prior name -> class (the registry lives in :mod:`pyro_vae.registry`). Add a prior with one
#: entry.
PRIORS.update({
    "standard-normal": StandardNormalPrior,
    "learned-gaussian": LearnedGaussianPrior,
    "mixture": MixturePrior,
    "vamp": VampPrior,
    "flow": FlowPrior,
    "student-t": StudentTPrior,
    "discrete-uniform": DiscreteUniformPrior,
    "discrete-learned": DiscreteLearnedPrior,
})


def build_prior(cfg: ModelConfig, encoder: nn.Module | None = None,
                image_shape: tuple[int, ...] | None = None) -> Prior:
    """The prior that ``cfg.prior`` names.

    Raises:
        ConfigError: if ``cfg.prior`` is not in :data:`PRIORS`.
    """
    return PRIORS.get_or_raise(cfg.prior)(cfg, encoder, image_shape)
