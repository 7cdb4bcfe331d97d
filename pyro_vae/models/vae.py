"""The VAE as a Pyro model p(z) p(x|z) and an amortized guide q(z|x).

The networks return distributions (:mod:`pyro_vae.models.networks`), the prior is a module
returning p(z) (:mod:`pyro_vae.models.priors`) and the estimator decides how the guide samples z
(:mod:`pyro_vae.inference.estimators`), so the model and guide below read like the maths:

    model:  z_n ~ p(z),            x_n ~ p(x | z_n) = Decoder(z_n)     for n in the minibatch
    guide:  z_n ~ q(z | x_n) = Encoder(x_n)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import pyro
import torch
from pyro import poutine
from torch import nn

from ..registry import ESTIMATORS
from .encoders import is_discrete
from .networks import build_networks
from .priors import Prior, build_prior

if TYPE_CHECKING:
    from ..config import Config


def code_point(q: Any) -> torch.Tensor:
    """One representative code of q(z|x): its mode when the support is discrete (bits or
    one-hot groups), else its mean."""
    if is_discrete(q):
        return q.mode
    return q.mean


class Estimator(Protocol):
    """What the guide needs of a gradient estimator (the registry's entries,
    :class:`pyro_vae.inference.estimators.Estimator`, provide it): the distribution z is sampled
    from, the site's infer options, and the trainable modules those options use."""

    posterior: Callable[[Any], Any]
    site_infer: Callable[[nn.ModuleDict, torch.Tensor, float], dict[str, Any]]
    make_modules: Callable[[Config, int], dict[str, nn.Module]]


class VAE(nn.Module):
    """A variational auto-encoder: encoder, decoder, prior and the estimator's extra modules.

    Args:
        encoder: ``x -> q(z|x)``, a distribution with event shape ``(latent_dim,)``.
        decoder: ``z -> p(x|z)``, a distribution with event shape ``(num_pixels,)``.
        prior: ``() -> p(z)``.
        estimator: how the guide samples z (default: reparametrized).
        estimator_modules: trainable modules the estimator's guide options use (baselines).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, prior: Prior,
                 estimator: Estimator | None = None,
                 estimator_modules: dict[str, nn.Module] | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior
        self.estimator = estimator if estimator is not None else ESTIMATORS["reparam"]
        self.estimator_modules = nn.ModuleDict(estimator_modules or {})
        #: Weight of the latent sites (beta, KL annealing): log p(z) and log q(z|x) are scaled
        #: by it through ``poutine.scale``, so the objective is E[log p(x|z)] - weight * KL.
        #: The trainer sets it per step; 1 leaves the program unscaled.
        self.kl_weight = 1.0

    @classmethod
    def from_config(cls, cfg: Config, image_shape: tuple[int, int, int]) -> VAE:
        """Build the networks, prior and estimator modules that ``cfg`` describes."""
        encoder, decoder = build_networks(cfg.model, image_shape)
        prior = build_prior(cfg.model, encoder, image_shape)
        estimator = ESTIMATORS[cfg.train.estimator]
        num_pixels = int(torch.Size(image_shape).numel())
        return cls(encoder, decoder, prior, estimator, estimator.make_modules(cfg, num_pixels))

    @staticmethod
    def data_plate(x: torch.Tensor, num_data: int | None) -> pyro.plate:
        # With num_data = N > batch size B, Pyro scales every log-density in the plate by N / B,
        # so the minibatch ELBO is an unbiased estimate of the full-dataset ELBO.
        batch = x.shape[0]
        if num_data is None or num_data == batch:
            return pyro.plate("data", batch)
        return pyro.plate("data", num_data, subsample=torch.arange(batch, device=x.device))

    def model(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """p(z) p(x|z) with x observed; ``num_data`` is the dataset size when x is a minibatch."""
        pyro.module("decoder", self.decoder)
        pyro.module("prior", self.prior)
        with self.data_plate(x, num_data):
            with self.latent_weight():
                z = pyro.sample("z", self.prior())
            pyro.sample("x", self.decoder(z), obs=x)

    def guide(self, x: torch.Tensor, num_data: int | None = None) -> None:
        """q(z|x), sampled the way the estimator asks."""
        pyro.module("encoder", self.encoder)
        if len(self.estimator_modules):
            pyro.module("estimator", self.estimator_modules)
        with self.data_plate(x, num_data):
            q = self.estimator.posterior(self.encoder(x))
            scale = num_data / x.shape[0] if num_data is not None else 1.0
            with self.latent_weight():
                pyro.sample("z", q,
                            infer=self.estimator.site_infer(self.estimator_modules, x, scale))

    def latent_weight(self) -> contextlib.AbstractContextManager:
        """``poutine.scale(kl_weight)`` around the latent sites of the model and the guide (the
        beta-VAE objective of Higgins et al. 2017; annealed from near 0 to 1 it is the KL
        warm-up of Bowman et al. 2016 and Sønderby et al. 2016), or nothing when it is 1."""
        weight = float(self.kl_weight)
        return poutine.scale(scale=weight) if weight != 1.0 else contextlib.nullcontext()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z) at a point code of q(z|x): its mean E_q[z] for a continuous code,
        its most probable code for a discrete one (the decoder was trained on codes, not on
        their probabilities)."""
        return self.decoder(code_point(self.encoder(x))).mean

    @torch.no_grad()
    def sample(self, num_samples: int, mean: bool = True) -> torch.Tensor:
        """Images decoded from prior draws: decoder means (``mean=True``) or draws from p(x|z)."""
        z = self.prior().sample((num_samples,))
        px = self.decoder(z)
        return px.mean if mean else px.sample()
