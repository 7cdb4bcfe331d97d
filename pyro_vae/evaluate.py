"""Measurements of a trained VAE: the test ELBO (more in later issues)."""

from __future__ import annotations

import pyro
import torch
from pyro.infer import Trace_ELBO

from .model import VAE


@torch.no_grad()
def elbo_per_image(vae: VAE, x: torch.Tensor, batch_size: int = 1000,
                   num_particles: int = 1) -> float:
    """Single-sample (or ``num_particles``) Monte Carlo ELBO of ``x``, per image, in nats.

    Uses Trace_ELBO on the VAE's own model and guide, in chunks of ``batch_size`` images, with
    reparametrized sampling whatever the training estimator (the value does not depend on how
    gradients are estimated). Higher is better.
    """
    elbo = Trace_ELBO(num_particles=num_particles, vectorize_particles=True, max_plate_nesting=1)
    total = 0.0
    for chunk in x.split(batch_size):
        total += elbo.loss(vae.model, _reparam_guide(vae), chunk)
    return -total / x.shape[0]


def _reparam_guide(vae: VAE):
    def guide(x: torch.Tensor, num_data: int | None = None) -> None:
        with vae.data_plate(x, num_data):
            pyro.sample("z", vae.encoder(x))
    return guide
