"""A plugin for pyro_vae: q(z|x) as a Gaussian with a full covariance matrix.

Load it with ``pyro-vae --plugin full_covariance train --encoder full-covariance ...`` (the
folder holding this file on PYTHONPATH), or ``pyro_vae.load_plugin("full_covariance")`` from
Python. docs/architecture.md walks through it; tests/test_plugins.py runs it.

The encoder network outputs, per image, the mean (D numbers) and the lower triangle of a
Cholesky factor L of the covariance (D (D + 1) / 2 numbers); the diagonal of L goes through a
softplus so that it is positive. q(z|x) = N(loc, L L^T) lets the posterior's dimensions
correlate, which a diagonal Normal cannot express. It is reparametrized (``rsample``), so every
estimator works with it; no accelerator covers it, so it trains and is measured through the
generic Pyro path -- correct by construction, at the speed Pyro's tracing allows.
"""

import pyro.distributions as dist
import torch

from pyro_vae import ENCODERS, GuideFamily
from pyro_vae.models.layers import positive_scale


class FullCovarianceNormal(GuideFamily):
    """q(z|x) = N(loc, L L^T) with L lower triangular, positive diagonal."""

    def __init__(self, latent_dim: int):
        super().__init__(latent_dim)
        self.num_features = latent_dim + latent_dim * (latent_dim + 1) // 2
        rows, cols = torch.tril_indices(latent_dim, latent_dim)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        d = self.latent_dim
        loc, entries = h[..., :d], h[..., d:]
        tril = h.new_zeros(*h.shape[:-1], d, d)
        tril[..., self.rows, self.cols] = entries
        diagonal = positive_scale(torch.diagonal(tril, dim1=-2, dim2=-1))
        tril = torch.tril(tril, -1) + torch.diag_embed(diagonal)
        return dist.MultivariateNormal(loc, scale_tril=tril)


ENCODERS["full-covariance"] = FullCovarianceNormal
