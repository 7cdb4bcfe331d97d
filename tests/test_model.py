import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae import VAE
from pyro_vae.models.layers import MIN_SCALE
from pyro_vae.models.networks import Encoder


def make_vae(**model):
    cfg = tiny_config()
    for k, v in model.items():
        setattr(cfg.model, k, v)
    if cfg.model.likelihood != "bernoulli":
        cfg.data.binarize = "none"
    return VAE.from_config(cfg.validate(), (1, 28, 28))


@pytest.mark.parametrize("arch", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "continuous-bernoulli"])
def test_model_and_guide_traces_agree(arch, likelihood):
    vae = make_vae(arch=arch, likelihood=likelihood)
    x = torch.rand(5, 784)
    if likelihood == "bernoulli":
        x = x.round()
    guide_tr = poutine.trace(vae.guide).get_trace(x)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x)
    latent = [n for n in guide_tr.stochastic_nodes if n != "data"]  # "data" is the plate's site
    assert latent == ["z"] and [n for n in model_tr.stochastic_nodes if n != "data"] == ["z"]
    assert guide_tr.nodes["z"]["value"].shape == model_tr.nodes["z"]["value"].shape == (5, 8)
    assert model_tr.nodes["x"]["is_observed"]
    assert model_tr.nodes["x"]["fn"].event_shape == (784,)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    for site in (model_tr.nodes["z"], model_tr.nodes["x"], guide_tr.nodes["z"]):
        assert site["log_prob"].shape == (5,)
        assert torch.isfinite(site["log_prob"]).all()


def test_minibatch_plate_scales_to_the_dataset_size():
    vae = make_vae()
    x = torch.rand(16, 784).round()
    tr = poutine.trace(vae.model).get_trace(x, num_data=1600)
    assert tr.nodes["x"]["scale"] == pytest.approx(100.0)
    assert tr.nodes["z"]["scale"] == pytest.approx(100.0)
    elbo = Trace_ELBO()
    pyro.set_rng_seed(1)
    full = elbo.loss(vae.model, vae.guide, x, num_data=1600)
    pyro.set_rng_seed(1)
    batch = elbo.loss(vae.model, vae.guide, x)
    assert full == pytest.approx(100.0 * batch, rel=1e-6)


def test_bernoulli_log_prob_is_minus_cross_entropy():
    vae = make_vae()
    z, x = torch.randn(4, 8), torch.rand(4, 784).round()
    logits = vae.decoder.net(z)
    expected = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
    torch.testing.assert_close(vae.decoder(z).log_prob(x), expected)


def test_gaussian_log_prob_is_scaled_squared_error():
    vae = make_vae(likelihood="gaussian", gaussian_scale=0.2)
    z, x = torch.randn(3, 8), torch.rand(3, 784)
    mean = torch.sigmoid(vae.decoder.net(z))
    log_norm = math.log(0.2) + 0.5 * math.log(2 * math.pi)
    expected = (-(x - mean) ** 2 / (2 * 0.2**2) - log_norm).sum(-1)
    torch.testing.assert_close(vae.decoder(z).log_prob(x), expected, rtol=1e-4, atol=1e-2)


def test_learned_gaussian_scale_is_a_parameter():
    fixed = make_vae(likelihood="gaussian")
    learned = make_vae(likelihood="gaussian", learn_gaussian_scale=True)
    assert len(list(learned.parameters())) == len(list(fixed.parameters())) + 1


def test_continuous_bernoulli_is_normalized_on_the_unit_interval():
    vae = make_vae(likelihood="continuous-bernoulli", arch="mlp")
    px = vae.decoder(torch.randn(1, 8)).base_dist
    grid = torch.linspace(0, 1, 20001)
    density = px.log_prob(grid[:, None].expand(-1, 784)).exp()       # (grid, pixels)
    integral = torch.trapezoid(density, grid, dim=0)
    torch.testing.assert_close(integral, torch.ones(784), atol=1e-3, rtol=0)


def test_encoder_scale_is_positive_and_finite_at_extreme_inputs():
    enc = Encoder(784, [32], 4)
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(50.0)
    q = enc(torch.ones(2, 784))
    assert torch.isfinite(q.base_dist.scale).all()
    with torch.no_grad():
        for p in enc.parameters():
            p.fill_(-50.0)
    q = enc(torch.ones(2, 784))
    assert (q.base_dist.scale >= MIN_SCALE).all()


def test_mc_kl_and_closed_form_kl_estimate_the_same_elbo():
    """Trace_ELBO (Monte Carlo KL) and TraceMeanField_ELBO (closed-form KL) share one mean."""
    vae = make_vae()
    x = torch.rand(8, 784).round()
    n = 4000
    mc = Trace_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    cf = TraceMeanField_ELBO(num_particles=n, vectorize_particles=True, max_plate_nesting=1)
    a, b = mc.loss(vae.model, vae.guide, x), cf.loss(vae.model, vae.guide, x)
    # The difference is Monte Carlo noise of a mean over n particles: a few nats at most here.
    assert a == pytest.approx(b, abs=0.5 + 1e-3 * abs(b))
    q = vae.encoder(x).base_dist
    kl = 0.5 * (q.scale**2 + q.loc**2 - 1 - 2 * q.scale.log()).sum()
    torch.testing.assert_close(
        kl, torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 1.0)).sum())
