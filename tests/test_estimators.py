"""Every estimator: trains end to end, and its mean gradient is the exact gradient."""

from __future__ import annotations

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from torch import nn

from pyro_vae import ESTIMATORS, PRIORS, VAE, fit
from pyro_vae.config import ModelConfig
from pyro_vae.errors import ConfigError
from pyro_vae.lab.variance import gradient_draws
from pyro_vae.models.priors import StandardNormalPrior

#: The estimators that apply to a continuous code (the discrete-only ones: tests/test_discrete.py)
CONTINUOUS = [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].applies_to(discrete=False)]

def _particles(name: str) -> int:
    return ESTIMATORS[name].min_particles if ESTIMATORS[name].min_particles > 1 else 1


@pytest.mark.parametrize("name", CONTINUOUS)
def test_every_estimator_trains_on_real_digits_and_improves(name, mnist5k_grey):
    from pyro_vae import Dataset, Split

    cfg = tiny_config(estimator=name, epochs=3, num_particles=max(1, _particles(name)))
    cfg.model.hidden_dims = [32]
    train, test = mnist5k_grey.train, mnist5k_grey.test  # the shared fixture stays untouched
    data = Dataset(mnist5k_grey.name, mnist5k_grey.image_shape,
                   Split(train.images[:384], train.labels[:384]),
                   Split(test.images[:100], test.labels[:100]))
    result = fit(cfg, dataset=data)
    elbos = [m["train_objective"] for m in result.metrics]  # the ELBO, or iwae's bound
    assert all(math.isfinite(e) for e in elbos)
    assert elbos[-1] > elbos[0], f"{name}: train ELBO did not improve: {elbos}"
    assert math.isfinite(result.metrics[-1]["test_elbo"])


# -- a conjugate linear-Gaussian VAE whose ELBO is known in closed form ----------------------------
class _LinearEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.loc = nn.Linear(1, 1)
        self.raw_scale = nn.Linear(1, 1)

    def forward(self, x):
        return dist.Normal(self.loc(x), nn.functional.softplus(self.raw_scale(x))).to_event(1)


class _LinearDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(1, 1)

    def forward(self, z):
        return dist.Normal(self.lin(z), 1.0).to_event(1)


def _linear_gaussian_vae(estimator: str) -> VAE:
    torch.manual_seed(3)
    enc, dec = _LinearEncoder(), _LinearDecoder()
    with torch.no_grad():  # a guide away from the posterior, so every gradient is non-zero
        enc.loc.weight.fill_(0.2)
        enc.loc.bias.fill_(-0.3)
        enc.raw_scale.weight.fill_(0.1)
        enc.raw_scale.bias.fill_(0.5)
        dec.lin.weight.fill_(1.5)
        dec.lin.bias.fill_(0.4)
    est = ESTIMATORS[estimator]
    modules = est.make_modules(tiny_config(), 1)
    return VAE(enc, dec, StandardNormalPrior(ModelConfig(latent_dim=1)), est, modules)


def _exact_objective(vae: VAE, x: torch.Tensor, particles: int) -> torch.Tensor:
    """Per-image ELBO in closed form; for K > 1 the IWAE bound by Gauss-Hermite quadrature."""
    q = vae.encoder(x).base_dist
    mu, sigma = q.loc[:, 0], q.scale[:, 0]
    w, b = vae.decoder.lin.weight[0, 0], vae.decoder.lin.bias[0]
    xs = x[:, 0]
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    if particles == 1:
        e_lik = -half_log_2pi - 0.5 * ((xs - w * mu - b) ** 2 + w ** 2 * sigma ** 2)
        e_prior = -half_log_2pi - 0.5 * (mu ** 2 + sigma ** 2)
        entropy = 0.5 * torch.log(2 * math.pi * math.e * sigma ** 2)
        return (e_lik + e_prior + entropy).mean()
    nodes, weights = np.polynomial.hermite_e.hermegauss(40)
    nodes = torch.tensor(nodes, dtype=torch.float64)
    weights = torch.tensor(weights / weights.sum(), dtype=torch.float64)
    grids = torch.meshgrid(*[nodes] * particles, indexing="ij")
    grid_w = torch.ones_like(grids[0])
    for i in range(particles):
        grid_w = grid_w * weights[torch.arange(40)].reshape(
            [40 if j == i else 1 for j in range(particles)])
    eps = torch.stack([g.reshape(-1) for g in grids])  # (K, G)
    z = mu[None, None] + sigma[None, None] * eps[..., None]  # (K, G, B)
    log_w = (-half_log_2pi - 0.5 * (xs - w * z - b) ** 2 - half_log_2pi - 0.5 * z ** 2
             + half_log_2pi + torch.log(sigma) + 0.5 * eps[..., None] ** 2)
    bound = torch.logsumexp(log_w, 0) - math.log(particles)  # (G, B)
    return (grid_w.reshape(-1, 1) * bound).sum(0).mean()


@pytest.mark.parametrize("name", CONTINUOUS)
def test_mean_gradient_matches_the_exact_gradient(name):
    """Over many draws each estimator is unbiased for its objective's exact gradient."""
    vae = _linear_gaussian_vae(name).double()
    x = torch.tensor([[-1.0], [0.5], [2.0], [1.2]], dtype=torch.float64)
    k = _particles(name)
    params = dict(vae.named_parameters())
    vae.zero_grad()
    # rloo averages K single-sample ELBOs: its objective is the ELBO, not the K-sample bound
    objective_k = 1 if ESTIMATORS[name].surrogate == "leave-one-out-score" else k
    (-_exact_objective(vae, x, objective_k)).backward()
    exact = {n: p.grad.clone() for n, p in params.items() if not n.startswith("estimator")}
    draws = torch.cat([torch.cat([g[n].reshape(g[n].shape[0], -1) for n in exact], 1)
                       for g in gradient_draws(vae, name, x, 20000, num_particles=k,
                                               chunk_size=5000)])
    mean, var = draws.mean(0), draws.var(0)
    target = torch.cat([exact[n].reshape(-1) for n in exact])
    stderr = (var / draws.shape[0]).sqrt()
    assert torch.isfinite(var).all() and (var > 0).all()
    z = ((mean - target) / stderr).abs()
    assert (z < 4.5).all(), f"{name}: mean gradient off by {z.max():.1f} standard errors"


def test_score_function_site_is_not_reparametrized_inside_a_plate():
    q = dist.Normal(torch.zeros(3, 2), torch.ones(3, 2)).to_event(1)
    site = ESTIMATORS["score"].posterior(q)
    assert not site.has_rsample
    assert not site.expand((4, 3)).has_rsample  # what a particle plate does


def test_iwae_needs_two_particles_and_analytic_kl_a_closed_form_prior():
    cfg = tiny_config(estimator="iwae", num_particles=1)
    with pytest.raises(ConfigError, match="num_particles"):
        cfg.validate()
    without_kl = [name for name, prior in PRIORS.items() if not prior.closed_form_kl]
    if not without_kl:
        pytest.skip("every registered prior has a closed-form KL")
    cfg = tiny_config(estimator="analytic-kl")
    cfg.model.prior = without_kl[0]
    with pytest.raises(ConfigError, match="closed-form KL"):
        cfg.validate()
