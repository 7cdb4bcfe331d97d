"""Encoder and decoder networks that return distributions. Pure torch and pyro.distributions.

``Encoder(x)`` returns q(z|x) with event shape ``(latent_dim,)``, built by a
:class:`~pyro_vae.models.encoders.GuideFamily` from the network's last layer (a diagonal
Normal by default); ``Decoder(z)`` returns p(x|z) with event shape ``(num_pixels,)``, built by a
:class:`~pyro_vae.models.likelihoods.Likelihood` the same way. The Pyro model and guide
(:mod:`pyro_vae.models.vae`) only compose these.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyro.distributions as dist
import torch
from torch import nn

from ..errors import ConfigError
from ..registry import LIKELIHOODS
from .encoders import DiagonalNormal, GuideFamily, build_guide_family, code_shape
from .layers import ACTIVATIONS, mlp
from .likelihoods import Likelihood

if TYPE_CHECKING:
    from ..config import ModelConfig


# -- networks -------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """q(z|x): an MLP from pixels to the parameters of a guide family (default: the loc and
    raw scale of a diagonal Normal over z)."""

    def __init__(self, num_pixels: int, hidden_dims: list[int], latent_dim: int,
                 activation: str = "softplus", family: GuideFamily | None = None):
        super().__init__()
        self.family = family if family is not None else DiagonalNormal(latent_dim)
        self.body = nn.Sequential(mlp([num_pixels, *hidden_dims], activation),
                                  ACTIVATIONS[activation]())
        self.head = nn.Linear(hidden_dims[-1], self.family.num_features)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        return self.family(self.head(self.body(x)))


def flatten_code(z: torch.Tensor, code_dims: int) -> torch.Tensor:
    """A code with ``code_dims`` event dimensions (2 for one-hot groups ``(d, K)``) as one
    vector of ``d * K`` inputs per image; a vector code is returned as it is."""
    return z if code_dims == 1 else z.reshape(*z.shape[:-code_dims], -1)


class Decoder(nn.Module):
    """p(x|z): an MLP from z to one output per pixel, read by a :class:`Likelihood`.

    ``latent_dim`` is the number of network inputs; a code with ``code_dims = 2`` event
    dimensions (one-hot groups) is flattened into them.
    """

    def __init__(self, latent_dim: int, hidden_dims: list[int], num_pixels: int,
                 activation: str, likelihood: Likelihood, code_dims: int = 1):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_dims), num_pixels], activation)
        self.likelihood = likelihood
        self.code_dims = code_dims

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return self.likelihood(self.net(flatten_code(z, self.code_dims)))


class ConvEncoder(nn.Module):
    """q(z|x) for images: two stride-2 convolutions, a dense layer, then loc and scale."""

    def __init__(self, image_shape: tuple[int, int, int], hidden_dim: int, latent_dim: int,
                 activation: str = "softplus", channels: tuple[int, int] = (32, 64),
                 family: GuideFamily | None = None):
        super().__init__()
        self.family = family if family is not None else DiagonalNormal(latent_dim)
        c, h, w = image_shape
        if h % 4 or w % 4:
            raise ConfigError(f"arch conv needs image sides divisible by 4, got {h}x{w}")
        act = ACTIVATIONS[activation]
        self.image_shape = image_shape
        self.body = nn.Sequential(
            nn.Conv2d(c, channels[0], 4, stride=2, padding=1), act(),
            nn.Conv2d(channels[0], channels[1], 4, stride=2, padding=1), act(),
            nn.Flatten(), nn.Linear(channels[1] * (h // 4) * (w // 4), hidden_dim), act())
        self.head = nn.Linear(hidden_dim, self.family.num_features)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        h = self.body(x.reshape(-1, *self.image_shape))
        return self.family(self.head(h).reshape(*x.shape[:-1], -1))


class ConvDecoder(nn.Module):
    """p(x|z) for images: a dense layer, then two stride-2 transposed convolutions."""

    def __init__(self, latent_dim: int, hidden_dim: int, image_shape: tuple[int, int, int],
                 activation: str, likelihood: Likelihood, channels: tuple[int, int] = (32, 64),
                 code_dims: int = 1):
        super().__init__()
        self.code_dims = code_dims
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
        z = flatten_code(z, self.code_dims)
        batch = z.shape[:-1]
        out = self.deconv(self.dense(z).reshape(-1, *self.grid))
        return self.likelihood(out.reshape(*batch, -1))


def build_networks(cfg: ModelConfig, image_shape: tuple[int, int, int]
                   ) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair that ``cfg`` describes, for images of ``image_shape``."""
    num_pixels = math.prod(image_shape)
    likelihood = LIKELIHOODS.get_or_raise(cfg.likelihood)(cfg, num_pixels)
    family = build_guide_family(cfg.encoder, cfg)
    # a categorical code is latent_dim one-hot groups: latent_dim * categories decoder inputs
    shape = code_shape(cfg)
    code_size, code_dims = math.prod(shape), len(shape)
    if cfg.arch == "conv":
        return (ConvEncoder(image_shape, cfg.hidden_dims[0], cfg.latent_dim, cfg.activation,
                            family=family),
                ConvDecoder(code_size, cfg.hidden_dims[0], image_shape, cfg.activation,
                            likelihood, code_dims=code_dims))
    return (Encoder(num_pixels, cfg.hidden_dims, cfg.latent_dim, cfg.activation, family=family),
            Decoder(code_size, cfg.hidden_dims, num_pixels, cfg.activation, likelihood,
                    code_dims=code_dims))
