"""Tests of pyro_vae.evaluate: the importance-sampled log-likelihood, active units, ELBO terms,
anomaly scores, and the evaluate / sample / score commands on real runs."""

from __future__ import annotations

import csv
import json
import math
import os

import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from torch import nn

from pyro_vae import LIKELIHOODS, PRIORS, VAE, Config
from pyro_vae.app.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.inference.accelerators.bernoulli_mlp import _bernoulli_log_prob
from pyro_vae.metrics import (
    active_units,
    anomaly_scores,
    auroc,
    elbo_per_image,
    elbo_terms,
    importance_log_likelihood,
    log_likelihood,
)
from pyro_vae.models.priors import StandardNormalPrior


# -- a linear-Gaussian VAE whose log p(x) is known exactly ---------------------------------------
class LinearGaussianDecoder(nn.Module):
    """p(x|z) = N(W z + b, sigma^2 I)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float):
        super().__init__()
        self.weight, self.bias, self.sigma = nn.Parameter(weight), nn.Parameter(bias), sigma

    def forward(self, z: torch.Tensor) -> dist.Distribution:
        return dist.Normal(z @ self.weight.T + self.bias, self.sigma).to_event(1)


class ExactPosteriorEncoder(nn.Module):
    """q(z|x) = the exact Gaussian posterior of the linear-Gaussian model, with its standard
    deviations multiplied by ``inflate`` (1: exact, so every importance weight equals p(x))."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, sigma: float,
                 inflate: float = 1.0):
        super().__init__()
        precision = torch.eye(weight.shape[1]) + weight.T @ weight / sigma**2
        self.cov = torch.linalg.inv(precision)
        self.weight, self.bias, self.sigma, self.inflate = weight, bias, sigma, inflate
        # A diagonal q is exact only if the posterior covariance is diagonal.
        assert torch.allclose(self.cov, torch.diag(torch.diag(self.cov)), atol=1e-6)

    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc = (x - self.bias) @ self.weight @ self.cov.T / self.sigma**2
        scale = torch.diag(self.cov).sqrt().expand_as(loc) * self.inflate
        return dist.Normal(loc, scale).to_event(1)


def linear_gaussian(inflate: float = 1.0, pixels: int = 6, latent: int = 2, sigma: float = 0.5):
    # Orthogonal columns make W^T W diagonal, so the exact posterior is a diagonal Normal.
    q, _ = torch.linalg.qr(torch.randn(pixels, latent, generator=torch.Generator().manual_seed(3)))
    weight = q * torch.tensor([1.5, 0.7])[:latent]
    bias = torch.linspace(-0.5, 0.5, pixels)
    cfg = Config()
    cfg.model.latent_dim = latent
    vae = VAE(ExactPosteriorEncoder(weight, bias, sigma, inflate),
              LinearGaussianDecoder(weight, bias, sigma), StandardNormalPrior(cfg.model))
    marginal = dist.MultivariateNormal(bias, weight @ weight.T + sigma**2 * torch.eye(pixels))
    x = marginal.sample((16,))
    return vae, x, marginal.log_prob(x)


def test_exact_posterior_gives_exact_log_likelihood_with_zero_error():
    vae, x, exact = linear_gaussian(inflate=1.0)
    result = importance_log_likelihood(vae, x, num_samples=7, seed=1)
    assert torch.allclose(result.estimate, exact, atol=1e-4)
    assert result.stderr.max() < 1e-3


def test_estimate_within_tolerance_of_exact_log_likelihood():
    vae, x, exact = linear_gaussian(inflate=1.6)  # a poor proposal: weights vary
    result = importance_log_likelihood(vae, x, num_samples=4000, seed=2)
    err = (result.estimate - exact).abs()
    assert result.stderr.max() < 0.03
    assert (err < 4 * result.stderr + 1e-3).all(), (err, result.stderr)
    assert err.mean() < 0.015
    # The ELBO of this encoder is well below: the test would catch an estimate stuck at it.
    elbo = elbo_terms(vae, x, num_particles=2000, seed=0).elbo
    assert (exact - elbo).min() > 0.1


def test_standard_error_matches_spread_across_seeds():
    vae, x, _ = linear_gaussian(inflate=2.0)
    x = x[:4]
    runs = torch.stack([importance_log_likelihood(vae, x, 200, seed=s).estimate
                        for s in range(40)])
    predicted = importance_log_likelihood(vae, x, 200, seed=99).stderr
    ratio = runs.std(0) / predicted
    assert ((ratio > 0.6) & (ratio < 1.6)).all(), ratio


def test_estimate_is_above_elbo_and_rises_with_k():
    vae, x, exact = linear_gaussian(inflate=2.5)
    x, exact = x[:8], exact[:8]
    elbo = elbo_terms(vae, x, num_particles=4000, seed=0).elbo.mean()
    means = [log_likelihood(vae, x, k, seed=5).mean() for k in (1, 10, 100, 2000)]
    assert all(m > elbo for m in means[1:])
    assert means[0] < means[1] < means[2] < means[3] <= exact.mean() + 0.02
    assert exact.mean() - means[3] < 0.05


def test_chunked_and_unchunked_agree():
    torch.manual_seed(0)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    x = (torch.rand(10, 784) < 0.3).float()
    whole = importance_log_likelihood(vae, x, 200, batch_size=10, chunk_size=200, seed=4)
    for batch, chunk in ((1, 1000), (3, 37), (10, 199)):
        split = importance_log_likelihood(vae, x, 200, batch_size=batch, chunk_size=chunk, seed=4)
        assert torch.allclose(split.estimate, whole.estimate, atol=1e-4), (batch, chunk)
        assert torch.allclose(split.stderr, whole.stderr, atol=1e-4, rtol=1e-3)
    other_seed = importance_log_likelihood(vae, x, 200, seed=5).estimate
    assert not torch.allclose(other_seed, whole.estimate)


def test_worker_processes_give_the_single_process_result():
    torch.manual_seed(0)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    x = (torch.rand(7, 784) < 0.3).float()
    one = importance_log_likelihood(vae, x, 300, batch_size=2, seed=4, compile=False)
    two = importance_log_likelihood(vae, x, 300, batch_size=2, seed=4, compile=False, workers=2)
    torch.testing.assert_close(two.estimate, one.estimate, rtol=0, atol=1e-5)
    torch.testing.assert_close(two.stderr, one.stderr, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pixels", [784, 13, 241])  # 241 is prime and above the group cap
def test_grouped_bernoulli_sum_matches_distribution_at_extreme_logits(pixels):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 3, pixels, generator=g) * 8
    logits[0] = 0.0        # every factor 1 + exp(-|l|) is 2: the largest group product
    logits[1, :, ::2] = 90.0
    logits[1, :, 1::2] = -90.0
    x = (torch.rand(5, 1, pixels, generator=g) < 0.4).float()
    expected = dist.Bernoulli(logits=logits).log_prob(x.expand_as(logits)).sum(-1)
    got = _bernoulli_log_prob(logits, x)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-5), (got - expected).abs().max()


@pytest.mark.skipif(os.environ.get("PYRO_VAE_TEST_COMPILE") != "1",
                    reason="torch.compile takes ~35 s with a cold cache; "
                           "set PYRO_VAE_TEST_COMPILE=1 to run")
def test_compiled_kernel_matches_eager():
    torch.manual_seed(0)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    x = (torch.rand(3, 784) < 0.4).float()
    eager = importance_log_likelihood(vae, x, 300, seed=3, compile=False).estimate
    compiled = importance_log_likelihood(vae, x, 300, seed=3, compile=True).estimate
    assert torch.allclose(compiled, eager, atol=1e-3)


def test_fast_path_matches_generic_path_and_bfloat16_is_close():
    torch.manual_seed(0)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    x = (torch.rand(6, 784) < 0.4).float()
    fast = importance_log_likelihood(vae, x, 200, seed=3, fast=True).estimate
    generic = importance_log_likelihood(vae, x, 200, seed=3, fast=False).estimate
    assert torch.allclose(fast, generic, atol=1e-3)
    bf16 = importance_log_likelihood(vae, x, 200, seed=3, precision="bfloat16").estimate
    assert (bf16 - fast).abs().max() < 0.5
    with pytest.raises(ConfigError, match="bfloat16"):
        importance_log_likelihood(vae, x.clamp(0.1, 0.9), 5, precision="bfloat16")


@pytest.mark.parametrize("prior", [n for n in sorted(PRIORS)
                                   if "gaussian" in getattr(PRIORS[n], "latent_kinds", ())])
def test_every_prior_gives_a_bound_above_the_elbo(prior):
    cfg = tiny_config()
    cfg.model.prior = prior
    cfg.validate()
    torch.manual_seed(0)
    vae = VAE.from_config(cfg, (1, 28, 28)).eval()
    x = (torch.rand(4, 784) < 0.3).float()
    ll = importance_log_likelihood(vae, x, 400, seed=0)
    elbo = elbo_terms(vae, x, num_particles=400, seed=0).elbo
    assert torch.isfinite(ll.estimate).all() and torch.isfinite(ll.stderr).all()
    assert ll.estimate.mean() > elbo.mean()


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOODS))
def test_every_likelihood(likelihood):
    cfg = tiny_config()
    cfg.model.likelihood = likelihood
    torch.manual_seed(0)
    vae = VAE.from_config(cfg, (1, 28, 28)).eval()
    x = torch.rand(4, 784)
    ll = importance_log_likelihood(vae, x, 100, seed=0)
    elbo = elbo_terms(vae, x, num_particles=100, seed=0).elbo
    assert torch.isfinite(ll.estimate).all()
    assert ll.estimate.mean() > elbo.mean()


def test_elbo_terms_closed_form_kl_matches_monte_carlo_and_trace_elbo():
    torch.manual_seed(0)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    x = (torch.rand(16, 784) < 0.3).float()
    exact = elbo_terms(vae, x, num_particles=200, seed=0)
    assert exact.kl_closed_form and (exact.kl >= 0).all()
    mc = elbo_terms(vae, x, num_particles=1000, seed=0, closed_form_kl=False)
    assert not mc.kl_closed_form
    assert (mc.kl - exact.kl).abs().max() < 0.2
    assert abs(float(exact.elbo.mean()) - elbo_per_image(vae, x, num_particles=200)) < 0.5


class _PartlyActiveEncoder(nn.Module):
    def forward(self, x: torch.Tensor) -> dist.Distribution:
        loc = x[:, :4] * torch.tensor([1.0, 1.0, 0.01, 0.0])  # var(U(0,1)) = 1/12
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


def test_active_units_counts_dimensions_whose_mean_varies():
    cfg = tiny_config()
    cfg.model.latent_dim = 4
    vae = VAE(_PartlyActiveEncoder(), nn.Identity(), StandardNormalPrior(cfg.model))
    x = torch.rand(500, 10)
    assert active_units(vae, x) == 2
    assert active_units(vae, x, threshold=1e-7) == 3
    assert active_units(vae, x, threshold=0.5) == 0


def test_auroc_matches_pairwise_definition_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (60,), generator=g).float()
    positive = torch.rand(60, generator=g) < 0.4
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None]).float() + 0.5 * (pos[:, None] == neg[None]).float()
    assert auroc(scores, positive) == pytest.approx(float(pairs.mean()))
    assert auroc(torch.arange(4.0), torch.tensor([0, 0, 1, 1])) == 1.0


def test_bad_arguments_are_named():
    vae, x, _ = linear_gaussian()
    with pytest.raises(ConfigError, match="num_samples.*0"):
        log_likelihood(vae, x, num_samples=0)
    with pytest.raises(ConfigError, match="chunk_size"):
        log_likelihood(vae, x, 10, chunk_size=-1)
    with pytest.raises(ConfigError, match="'float8'"):
        log_likelihood(vae, x, 10, precision="float8")
    with pytest.raises(ConfigError, match="'bogus'"):
        anomaly_scores(vae, x, method="bogus")


# -- the commands, on runs made by train ----------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two tiny runs on the embedded real MNIST digits: a 2-D and an 8-D latent space."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for latent in (2, 8):
        run = root / f"z{latent}"
        code = main(["train", "--out", str(run), "--train-limit", "256", "--epochs", "1",
                     "--hidden-dims", "64", "--latent-dim", str(latent), "--batch-size", "64",
                     "--no-progress", "--no-figures"])
        assert code == 0
        out[latent] = run
    return out


def test_evaluate_command_writes_json(runs, capsys):
    run = runs[8]
    assert main(["evaluate", str(run), "--num-samples", "64", "--limit", "40"]) == 0
    table = capsys.readouterr().out
    assert "log p(x), K = 64" in table and "active units" in table
    r = json.loads((run / "evaluation.json").read_text())
    assert r["num_images"] == 40 and r["log_likelihood"]["num_samples"] == 64
    e, ll = r["elbo"], r["log_likelihood"]
    assert e["nats"] == pytest.approx(e["reconstruction_nats"] - e["kl_nats"], abs=1e-3)
    assert ll["nats"] > e["nats"] and r["gap_nats"] > 0
    assert ll["bits_per_dim"] == pytest.approx(-ll["nats"] / (784 * math.log(2)))
    assert 0 <= r["active_units"]["count"] <= 8
    # Nothing is overwritten without --overwrite.
    assert main(["evaluate", str(run), "--num-samples", "8", "--limit", "4"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert json.loads((run / "evaluation.json").read_text())["num_images"] == 40


@pytest.mark.parametrize("latent", [2, 8])
def test_sample_command_writes_figures(runs, latent, tmp_path):
    out = tmp_path / "fig"
    assert main(["sample", str(runs[latent]), "--out", str(out), "--num-images", "16",
                 "--num-pairs", "3", "--steps", "5"]) == 0
    expected = {"prior_means", "prior_draws", "reconstructions", "interpolations",
                "latent_space"} | ({"manifold"} if latent == 2 else set())
    assert {p.stem for p in out.glob("*.png")} == expected
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))


def test_sample_command_tsne_projection(runs, tmp_path):
    out = tmp_path / "tsne"
    assert main(["sample", str(runs[8]), "--out", str(out), "--num-images", "4",
                 "--num-pairs", "1", "--steps", "2", "--projection", "tsne"]) == 0
    assert (out / "latent_space.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tsne_keeps_separated_clusters_apart():
    pytest.importorskip("sklearn")
    from pyro_vae.metrics import tsne

    g = torch.Generator().manual_seed(0)
    a = torch.randn(60, 10, generator=g)
    b = torch.randn(60, 10, generator=g) + 20.0  # far away in every dimension
    e = tsne(torch.cat([a, b]), seed=0)
    assert e.shape == (120, 2)
    gap = (e[:60].mean(0) - e[60:].mean(0)).norm()
    spread = max(e[:60].std(0).norm(), e[60:].std(0).norm())
    assert gap > 3 * spread


@pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")  # write_png
def test_score_command_split_and_folder(runs, tmp_path, capsys):
    from torchvision.io import write_png

    run = runs[8]
    out = tmp_path / "split.csv"
    assert main(["score", str(run), "--limit", "12", "--num-samples", "16",
                 "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.read_text().splitlines()))
    assert len(rows) == 12 and all(math.isfinite(float(r["score"])) for r in rows)
    assert {int(r["label"]) for r in rows} <= set(range(10))
    folder = tmp_path / "imgs"
    folder.mkdir()
    blank = torch.zeros(1, 28, 28, dtype=torch.uint8)
    noise = (torch.rand(1, 28, 28) * 255).to(torch.uint8)
    write_png(blank, str(folder / "a_blank.png"))
    write_png(noise, str(folder / "b_noise.png"))
    out2 = tmp_path / "folder.csv"
    assert main(["score", str(run), "--images", str(folder), "--method", "elbo",
                 "--num-particles", "8", "--out", str(out2)]) == 0
    rows = list(csv.DictReader(out2.read_text().splitlines()))
    assert [r["file"] for r in rows] == ["a_blank.png", "b_noise.png"]
    # Half-on random pixels are far less likely under a digit model than a blank image.
    assert float(rows[1]["score"]) > float(rows[0]["score"]) + 50
    write_png(torch.zeros(1, 20, 20, dtype=torch.uint8), str(folder / "c_small.png"))
    assert main(["score", str(run), "--images", str(folder), "--out",
                 str(tmp_path / "x.csv")]) == 2
    assert "c_small.png is 20x20" in capsys.readouterr().err


def test_commands_reject_bad_run_folders(tmp_path, capsys):
    for command in ("evaluate", "sample", "score"):
        assert main([command, str(tmp_path / "missing")]) == 2
        assert "not a run folder" in capsys.readouterr().err


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_script_runs(runs, capsys):
    assert _script("bench_loglik").main([str(runs[2]), "--num-samples", "20", "--limit", "3",
                                         "--loop-images", "1", "--compare-images", "2",
                                         "--peak-size", "128", "--no-compile",
                                         "--target-images", "30", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain per-image loop" in out and "% of this run's float32 peak" in out
    assert "measured on 3, scaled to 30" in out and "bfloat16 - float32 on 2 images" in out


def test_anomaly_script_runs(tmp_path, capsys):
    out = tmp_path / "anomaly"
    assert _script("anomaly_experiment").main([
        "--out", str(out), "--epochs", "1", "--latent-dim", "2", "--hidden-dims", "32",
        "--num-samples", "4", "--test-limit", "60"]) == 0
    report = json.loads((out / "anomaly.json").read_text())
    assert 0.0 <= report["auroc"]["nll"] <= 1.0 and report["held_out_classes"] == [5, 6, 7, 8, 9]
    assert (out / "anomaly_hist.png").is_file() and (out / "scores.csv").is_file()


def test_elbo_per_image_leaves_the_param_store_alone():
    import pyro

    from pyro_vae.metrics import elbo_per_image

    store = pyro.get_param_store()
    store.clear()
    store["__baseline_avg_downstream_cost_z"] = torch.full((4,), -123.0)
    # a stale parameter of another model under a name this VAE's modules also use
    store["decoder$$$net.0.weight"] = torch.zeros(3, 3)
    vae = VAE.from_config(tiny_config(), (1, 28, 28)).eval()
    value = elbo_per_image(vae, (torch.rand(5, 784) < 0.3).float())
    assert math.isfinite(value)
    assert set(store.keys()) == {"__baseline_avg_downstream_cost_z", "decoder$$$net.0.weight"}
    assert torch.equal(store["__baseline_avg_downstream_cost_z"], torch.full((4,), -123.0))
    assert torch.equal(store["decoder$$$net.0.weight"], torch.zeros(3, 3))


def test_bits_per_dim_puts_densities_on_the_grey_level_scale():
    from pyro_vae.metrics.elbo import bits_per_dim as _bits_per_dim

    # a uniform density on [0, 1]^D has log p = 0: its 256 equal bins carry 8 bits each
    assert _bits_per_dim(0.0, 784, "gaussian") == pytest.approx(8.0)
    assert _bits_per_dim(0.0, 784, "continuous-bernoulli") == pytest.approx(8.0)
    # a probability of binary pixels is taken as it is: 784 fair coins are 1 bit each
    assert _bits_per_dim(-784 * math.log(2), 784, "bernoulli") == pytest.approx(1.0)


def test_score_elbo_refuses_importance_samples(runs, capsys):
    assert main(["score", str(runs[8]), "--method", "elbo", "--num-samples", "8"]) == 2
    assert "--num-particles" in capsys.readouterr().err
