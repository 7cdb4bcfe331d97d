"""Encoder and decoder networks that return distributions. Pure torch and pyro.distributions.

``Encoder(x)`` returns q(z|x) = Normal(loc, scale) with event shape ``(latent_dim,)``;
``Decoder(z)`` returns p(x|z) with event shape ``(num_pixels,)``, built by a :class:`Likelihood`
from the network's last layer. The Pyro model and guide (``model.py``) only compose these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import Config, ModelConfig

#: Smallest standard deviation of q(z|x) and of a learned Gaussian likelihood. softplus(.) + this
#: is positive and cannot overflow the way exp(.) of a large pre-activation does.
MIN_SCALE = 1e-4

ACTIVATIONS = {"softplus": nn.Softplus, "relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh,
               "silu": nn.SiLU, "leaky-relu": nn.LeakyReLU}


def positive_scale(raw: torch.Tensor) -> torch.Tensor:
    """Map an unconstrained tensor to a standard deviation > 0 without overflow."""
    return F.softplus(raw) + MIN_SCALE


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers with ``activation`` between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


# -- likelihoods ----------------------------------------------------------------------------------
class Likelihood(nn.Module):
    """Turns the decoder's output (one value per pixel) into p(x|z).

    Subclasses implement :meth:`forward` returning a distribution with event shape
    ``(num_pixels,)``, may override :meth:`check_config` to reject configurations they
    cannot handle (e.g. a density on [0, 1] asked to model binarized pixels), and set
    :attr:`is_density` when ``log_prob`` is a density on [0, 1] per pixel rather than a
    probability of discrete values (bits/dim then uses the 256-level scale, evaluate.py).
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
                              "--binarize none")


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
            raise ConfigError("likelihood gaussian models grey levels; use it with --binarize none")


#: Likelihood name -> class. Add a likelihood with one entry.
LIKELIHOODS: dict[str, type[Likelihood]] = {
    "bernoulli": BernoulliLikelihood,
    "gaussian": GaussianLikelihood,
    "continuous-bernoulli": ContinuousBernoulliLikelihood,
}


# -- networks -------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """q(z|x): an MLP from pixels to the loc and scale of a diagonal Normal over z."""

    def __init__(self, num_pixels: int, hidden_dims: list[int], latent_dim: int,
                 activation: str = "softplus"):
        super().__init__()
        self.body = nn.Sequential(mlp([num_pixels, *hidden_dims], activation),
                                  ACTIVATIONS[activation]())
        self.head = nn.Linear(hidden_dims[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = self.head(self.body(x)).chunk(2, dim=-1)
        return dist.Normal(loc, positive_scale(raw_scale)).to_event(1)


class Decoder(nn.Module):
    """p(x|z): an MLP from z to one output per pixel, read by a :class:`Likelihood`."""

    def __init__(self, latent_dim: int, hidden_dims: list[int], num_pixels: int,
                 activation: str, likelihood: Likelihood):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_dims), num_pixels], activation)
        self.likelihood = likelihood

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return self.likelihood(self.net(z))


class ConvEncoder(nn.Module):
    """q(z|x) for images: two stride-2 convolutions, a dense layer, then loc and scale."""

    def __init__(self, image_shape: tuple[int, int, int], hidden_dim: int, latent_dim: int,
                 activation: str = "softplus", channels: tuple[int, int] = (32, 64)):
        super().__init__()
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ConfigError(f"arch conv needs image sides divisible by 4, got {h}x{w}")
        act = ACTIVATIONS[activation]
        self.image_shape = image_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1), act(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), act(),
            nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), hidden_dim), act())
        self.head = nn.Linear(hidden_dim, 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        h = self.body(x.reshape(-1, *self.image_shape))
        loc, raw_scale = self.head(h).reshape(*x.shape[:-1], -1).chunk(2, dim=-1)
        return dist.Normal(loc, positive_scale(raw_scale)).to_event(1)


class ConvDecoder(nn.Module):
    """p(x|z) for images: a dense layer, then two stride-2 transposed convolutions."""

    def __init__(self, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int],
                 activation: str, likelihood: Likelihood, channels: tuple[int, int] = (32, 64)):
        super().__init__()
        c, h, w = image_shape
        act = ACTIVATIONS[activation]
        self.dense = nn.Sequential(nn.Linear(latent_dim, hidden_dim), act(),
                                   nn.Linear(hidden_dim, channels[1] * (h // 4) * (w // 4)), act())
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(channels[1], channels[0], 4, stride=2, padding=1), act(),
            nn.ConvTranspose2d(channels[0], c, 4, stride=2, padding=1))
        self.grid = (channels[1], h // 4, w // 4)
        self.likelihood = likelihood

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        batch = z.shape[:-1]
        out = self.deconv(self.dense(z).reshape(-1, *self.grid))
        return self.likelihood(out.reshape(*batch, -1))


def build_networks(cfg: ModelConfig, image_shape: tuple[int, int, int]
                   ) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair that ``cfg`` describes, for images of ``image_shape``."""
    num_pixels = math.prod(image_shape)
    likelihood = LIKELIHOODS[cfg.likelihood](cfg, num_pixels)
    if cfg.arch == "conv":
        return (ConvEncoder(image_shape, cfg.hidden_dims[0], cfg.latent_dim, cfg.activation),
                ConvDecoder(cfg.latent_dim, cfg.hidden_dims[0], image_shape, cfg.activation,
                            likelihood))
    return (Encoder(num_pixels, cfg.hidden_dims, cfg.latent_dim, cfg.activation),
            Decoder(cfg.latent_dim, cfg.hidden_dims, num_pixels, cfg.activation, likelihood))
