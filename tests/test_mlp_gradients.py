"""The hand-written per-draw gradients equal autodiff's, and what is built on them is sound."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from pyro_vae import ESTIMATORS, VAE
from pyro_vae.inference.accelerators.mlp_gradients import (
    SUPPORTED,
    MLPGradients,
    unsupported_reason,
)
from pyro_vae.lab.variance import (
    gradient_draws,
    measure_gradient_variance,
    oracle_gradient,
)
from pyro_vae.models.layers import ACTIVATIONS

HAND = [n for n, e in ESTIMATORS.items() if e.surrogate in SUPPORTED]


def _vae(activation: str = "softplus", hidden: list[int] = (24,), latent: int = 3,
         estimator: str = "reparam") -> VAE:
    cfg = tiny_config(estimator=estimator)
    cfg.model.hidden_dims = list(hidden)
    cfg.model.latent_dim = latent
    cfg.model.activation = activation
    return VAE.from_config(cfg, (1, 28, 28))


def _binary(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 784, generator=g) < 0.3).float()


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("name", HAND)
def test_hand_gradients_equal_autodiff_draw_for_draw(name, activation):
    # two hidden layers so both the encoder's and the decoder's inner layers are exercised,
    # two particles so the sum over particles is too
    vae = _vae(activation, hidden=[20, 12], estimator=name)
    x = _binary(8)
    # Pyro's TraceGraph_ELBO (the baselines) runs its particles one after another, updating the
    # moving average between them and drawing the second particle's noise from another place
    # in the RNG stream, so the written-out draws equal Pyro's for one particle only (next test)
    particles = 1 if ESTIMATORS[name].baseline else 2
    runs = {}
    for method in ("hand", "func"):
        torch.manual_seed(3)
        runs[method] = list(gradient_draws(vae, name, x, 4, num_particles=particles,
                                           chunk_size=2, method=method))
    for hand, func in zip(runs["hand"], runs["func"], strict=True):
        assert set(hand) == set(func)
        for param, want in func.items():
            scale = want.abs().max().item()
            torch.testing.assert_close(hand[param].float(), want, rtol=1e-3, atol=5e-5 * scale,
                                       msg=lambda m, p=param: f"{p}: {m}")


def test_avg_baseline_with_particles_takes_pyro_path_because_the_probe_disagrees():
    """With K > 1 particles Pyro's moving average moves between particles; the kernels keep it
    fixed. The probe finds the difference and the lab measures through Pyro instead."""
    from pyro_vae.lab.variance import choose_draws

    vae, x = _vae(), _binary(8)
    baseline = torch.full((8,), -500.0)
    est = ESTIMATORS["score-avg-baseline"]
    assert choose_draws(vae, est, x, 1, baseline).path == "hand"
    choice = choose_draws(vae, est, x, 2, baseline)
    assert choice.path == "generic" and "probe" in choice.reason


def test_summed_gradients_are_the_sum_of_the_draws():
    vae = _vae()
    x = _binary(8)
    f = MLPGradients(vae, "reparam", x)
    eps = torch.randn(5, 1, 8, 3)
    per_draw, summed = f(eps), f(eps, summed=True)
    for k, v in per_draw.items():
        torch.testing.assert_close(summed[k], v.sum(0), rtol=1e-5, atol=1e-6)


def test_hand_path_refuses_what_it_does_not_cover():
    assert unsupported_reason(_vae(), "iwae") is not None
    cfg = tiny_config()
    cfg.model.prior = "mixture"
    assert "prior" in unsupported_reason(VAE.from_config(cfg, (1, 28, 28)), "reparam")
    cfg = tiny_config()
    cfg.model.arch = "conv"
    assert "MLP" in unsupported_reason(VAE.from_config(cfg, (1, 28, 28)), "reparam")
    with pytest.raises(ValueError, match="iwae"):
        MLPGradients(_vae(), "iwae", _binary(4))


def test_bfloat16_draws_give_the_float32_variances():
    # bf16 products change each draw by ~0.3%; the statistics must agree far inside their CIs
    vae = _vae(hidden=[64], latent=8)
    x = _binary(64)
    res = {p: measure_gradient_variance(vae, x, ["score"], num_draws=200, oracle_draws=200,
                                        precision=p, compile=False)["estimators"]
           for p in ("float32", "bf16")}
    for name in ("reparam", "score"):
        for group in ("encoder", "decoder"):
            a, b = res["float32"][name]["groups"][group], res["bf16"][name]["groups"][group]
            assert b["trace"] == pytest.approx(a["trace"], rel=0.02), (name, group)
            assert b["cosine"] == pytest.approx(a["cosine"], abs=0.01), (name, group)


def test_antithetic_closed_form_oracle_matches_plain_reparam_mean():
    # Both are unbiased for the ELBO gradient; the oracle's noise is much smaller, so the
    # plain mean must scatter around it by its own standard error only.
    vae = _vae(hidden=[32], latent=4)
    x = _binary(32)
    torch.manual_seed(0)
    oracle = oracle_gradient(vae, x, 2000)
    chunks = list(gradient_draws(vae, "reparam", x, 3000, chunk_size=500, method="func"))
    draws = torch.cat([torch.cat([g[k].reshape(g[k].shape[0], -1) for k in oracle], 1)
                       for g in chunks])
    ref = torch.cat([oracle[k].reshape(-1) for k in oracle])
    z = (draws.mean(0) - ref) / (draws.std(0) / draws.shape[0] ** 0.5).clamp_min(1e-12)
    assert z.abs().mean() < 1.0  # |N(0, 1)| has mean 0.80; a biased oracle has far more
    assert z.abs().max() < 6.0


def test_compiled_moments_equal_eager_ones():
    vae = _vae(hidden=[32], latent=4)
    x = _binary(32)
    runs = {c: measure_gradient_variance(vae, x, ["score-avg-baseline"], num_draws=100,
                                         oracle_draws=50, chunk_size=25, compile=c)
            for c in (False, True)}
    if runs[True]["compile_seconds"] == 0.0:
        pytest.skip("torch.compile is not available here")
    for name, res in runs[False]["estimators"].items():
        for group, want in res["groups"].items():
            got = runs[True]["estimators"][name]["groups"][group]
            for key in ("trace", "snr", "cosine", "relative_variance"):
                assert got[key] == pytest.approx(want[key], rel=1e-4), (name, group, key)
