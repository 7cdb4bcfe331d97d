"""Priors p(z): modules whose call returns a distribution over z with event shape (latent_dim,).

A prior may own learnable parameters; the VAE registers it with Pyro so SVI trains them with the
networks, and its ``state_dict`` is saved in the checkpoint. Add a prior with one class and one
entry in :data:`PRIORS`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn

if TYPE_CHECKING:
    from .config import Config, ModelConfig


class Prior(nn.Module):
    """Base class of priors.

    Subclasses implement :meth:`forward` returning a distribution with ``batch_shape == ()`` and
    ``event_shape == (latent_dim,)``; the data plate broadcasts it over the minibatch. They set
    ``closed_form_kl = True`` only if ``forward`` returns a diagonal Normal, for which
    ``KL(q || p)`` has a closed form (see docs/theory.md); otherwise the KL term is estimated by
    Monte Carlo. The constructor receives the model config and, for priors defined through the
    encoder (VampPrior), the encoder and the image shape.
    """

    closed_form_kl = False

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


#: Prior name -> class.
PRIORS: dict[str, type[Prior]] = {
    "standard-normal": StandardNormalPrior,
}


def build_prior(cfg: ModelConfig, encoder: nn.Module | None = None,
                image_shape: tuple[int, ...] | None = None) -> Prior:
    """The prior that ``cfg.prior`` names."""
    return PRIORS[cfg.prior](cfg, encoder, image_shape)
