"""Likelihoods p(x|z): turn the decoder network's output (one value per pixel) into a distribution.

Add a likelihood with one class and one entry in :data:`LIKELIHOODS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import LIKELIHOODS
from .layers import MIN_SCALE, positive_scale

if TYPE_CHECKING:
    from ..config import Config, ModelConfig


class Likelihood(nn.Module):
    """Turns the decoder's output (one value per pixel) into p(x|z).

    Subclasses implement :meth:`forward` returning a distribution with event shape
    ``(num_pixels,)``, may override :meth:`check_config` to reject configurations they
    cannot handle (e.g. a density on [0, 1] asked to model binarized pixels), and set
    :attr:`is_density` when ``log_prob`` is a density on [0, 1] per pixel rather than a
    probability of discrete values (bits/dim then uses the 256-level scale,
    :mod:`pyro_vae.metrics.elbo`).
    """

    is_density = False

    def __init__(self, cfg: ModelConfig, num_pixels: int):
        super().__init__()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ConfigError for a configuration this likelihood cannot work with."""


class BernoulliLikelihood(Likelihood):
    """x_i ~ Bernoulli(sigmoid(logits_i)); log p(x|z) is minus the binary cross-entropy.

    Parameterized by logits so log-probabilities are computed without taking log(sigmoid(.)).
    Validation is off because grey levels in [0, 1] are accepted as soft targets (the data
    loader checks the range once).
    """

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        return dist.Bernoulli(logits=logits, validate_args=False).to_event(1)


class ContinuousBernoulliLikelihood(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): a proper density on [0, 1].

    Unlike the Bernoulli applied to grey levels it includes the normalizing constant, so the
    ELBO is a true bound on the density of un-binarized pixels.
    """

    is_density = True

    def forward(self, logits: torch.Tensor) -> dist.Distribution:
        # Clamp keeps the normalizer's Taylor branch stable at extreme logits.
        logits = logits.clamp(-15.0, 15.0)
        return dist.ContinuousBernoulli(logits=logits, validate_args=False).to_event(1)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        if cfg.data.binarize != "none":
            raise ConfigError("likelihood continuous-bernoulli models grey levels; use it with "
                              "data.binarize=\"none\"")


class GaussianLikelihood(Likelihood):
    """x_i ~ Normal(sigmoid(h_i), sigma_i): the squared-error view of the VAE.

    -log p(x|z) = sum_i (x_i - mu_i)^2 / (2 sigma_i^2) + log sigma_i + log(2 pi) / 2, so with a
    fixed sigma the reconstruction term is a scaled squared error. With
    ``learn_gaussian_scale`` each pixel has its own learned sigma (a free parameter).
    """

    is_density = True

    def __init__(self, cfg: ModelConfig, num_pixels: int):
        super().__init__(cfg, num_pixels)
        # softplus^-1(sigma - MIN_SCALE) so positive_scale(raw) == sigma at initialisation.
        raw = math.log(math.expm1(max(cfg.gaussian_scale - MIN_SCALE, 1e-6)))
        init = torch.full((num_pixels,), raw)
        if cfg.learn_gaussian_scale:
            self.raw_scale = nn.Parameter(init)
        else:
            self.register_buffer("raw_scale", init)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        return dist.Normal(torch.sigmoid(h), positive_scale(self.raw_scale)).to_event(1)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        # On {0, 1} pixels a (learned-scale) Gaussian density grows without bound as the scale
        # of always-black pixels shrinks, so its ELBO would not measure anything.
        if cfg.data.binarize != "none":
            raise ConfigError("likelihood gaussian models grey levels; use it with "
                              "data.binarize=\"none\"")


#: Likelihood name -> class (the registry lives in :mod:`pyro_vae.registry`).
LIKELIHOODS.update({
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
})
