"""Guide families: the distribution q(z|x) that the encoder network's output parameterizes.

The encoder networks (:mod:`pyro_vae.models.networks`) map an image to a feature vector; a
:class:`GuideFamily` turns that vector into q(z|x), a distribution with event shape
``(latent_dim,)``. The guide samples z from it and every number the package reports is computed
from its own ``rsample``/``sample`` and ``log_prob`` (the traces of ``VAE.guide``), so a new
family needs nothing else. Add one with a class and an entry in :data:`ENCODERS`::

    class LaplaceFamily(GuideFamily):
        def __init__(self, latent_dim):
            super().__init__(latent_dim)
            self.num_features = 2 * latent_dim          # loc and a raw scale per dimension
        def forward(self, h):
            loc, raw = h.chunk(2, dim=-1)
            return dist.Laplace(loc, positive_scale(raw)).to_event(1)

    ENCODERS["laplace"] = LaplaceFamily

docs/architecture.md shows a full-covariance Gaussian family written this way as a plugin.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn

from ..registry import ENCODERS
from .layers import positive_scale

if TYPE_CHECKING:
    from ..config import Config, ModelConfig


def is_discrete(fn: torch.distributions.Distribution) -> bool:
    """Whether a distribution's support is discrete (read from its support, not its name)."""
    return bool(getattr(fn.support, "is_discrete", False))


def code_shape(cfg: ModelConfig) -> tuple[int, ...]:
    """Shape of a code z: ``(d,)`` (Gaussian units or bits) or ``(d, K)`` one-hot groups."""
    if cfg.latent == "categorical":
        return (cfg.latent_dim, cfg.categories)
    return (cfg.latent_dim,)


class GuideFamily(nn.Module):
    """Base class of guide families q(z|x).

    A subclass implements:

    * ``__init__(latent_dim)``: call ``super().__init__(latent_dim)`` and set
      :attr:`num_features`, the number of outputs it needs from the encoder network per image;
    * ``forward(h)``: ``h`` has shape ``(..., num_features)``; return a Pyro distribution with
      batch shape ``h.shape[:-1]`` and event shape ``(latent_dim,)``. Make it reparametrizable
      (``has_rsample``) for the pathwise estimators; the score-function estimators work with
      any family whose ``log_prob`` is differentiable in its parameters.

    It may also override :meth:`check_config` to refuse settings it cannot work with. The
    family may hold parameters of its own (they train with the encoder). A family of discrete
    codes sets :attr:`latent_kinds` (the ``model.latent`` values it makes) and, when it needs
    more of the config than ``latent_dim``, overrides :meth:`from_config`.
    """

    #: The kinds of code (``model.latent``) this family makes.
    latent_kinds: tuple[str, ...] = ("gaussian",)

    def __init__(self, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.num_features = 2 * latent_dim

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> GuideFamily:
        """The family for ``cfg`` (default: ``cls(cfg.latent_dim)``)."""
        return cls(cfg.latent_dim)

    def forward(self, h: torch.Tensor) -> dist.Distribution:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for a configuration this family cannot work with."""


class DiagonalNormal(GuideFamily):
    """q(z|x) = N(loc, diag(scale^2)), ``scale = softplus(raw) + MIN_SCALE`` (Kingma & Welling
    2014): the default, and the family whose structure the accelerators reproduce."""

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = h.chunk(2, dim=-1)
        return dist.Normal(loc, positive_scale(raw_scale)).to_event(1)


class DiagonalLaplace(GuideFamily):
    """q(z|x) = prod_j Laplace(loc_j, scale_j): heavier tails than the Normal, still
    reparametrizable; no accelerator covers it, so it exercises the generic Pyro path."""

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = h.chunk(2, dim=-1)
        return dist.Laplace(loc, positive_scale(raw_scale)).to_event(1)


class BernoulliCode(GuideFamily):
    """q(z|x) = prod_j Bernoulli(z_j; sigmoid(logit_j)): a code of ``latent_dim`` binary units.

    Not reparametrizable (``has_rsample`` is False), so Pyro's ELBOs give its parameters
    score-function gradients; the relaxed estimators replace it by its Concrete relaxation
    during training only (docs/discrete.md).
    """

    latent_kinds = ("bernoulli",)

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.num_features = latent_dim

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=h).to_event(1)


class CategoricalCode(GuideFamily):
    """q(z|x) = prod_j OneHotCategorical(z_j; softmax(logits_j)): ``latent_dim`` one-hot groups
    of ``categories`` each, event shape ``(latent_dim, categories)``."""

    latent_kinds = ("categorical",)

    def __init__(self, latent_dim: int, categories: int = 10):
        super().__init__(latent_dim)
        self.categories = categories
        self.num_features = latent_dim * categories

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> GuideFamily:
        return cls(cfg.latent_dim, cfg.categories)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        logits = h.reshape(*h.shape[:-1], self.latent_dim, self.categories)
        return dist.OneHotCategorical(logits=logits).to_event(1)


ENCODERS.update({
    "diagonal-normal": DiagonalNormal,
    "laplace": DiagonalLaplace,
    "bernoulli": BernoulliCode,
    "categorical": CategoricalCode,
})


def build_guide_family(name: str, cfg: ModelConfig | int) -> GuideFamily:
    """The family that ``name`` names in :data:`ENCODERS` (ConfigError when unknown), built for
    the model config ``cfg`` (or, for a family that needs no more, a latent dimension)."""
    cls = ENCODERS.get_or_raise(name)
    if isinstance(cfg, int):
        return cls(cfg)
    from_config = getattr(cls, "from_config", None)
    return from_config(cfg) if from_config is not None else cls(cfg.latent_dim)
