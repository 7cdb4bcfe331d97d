"""The doubly-reparametrized IWAE gradient (``dreg``): unbiased, Pyro's draws, trains."""

from __future__ import annotations

import json
from dataclasses import replace

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import tiny_config
from pyro.distributions.testing.fakes import NonreparameterizedNormal
from test_estimators import _exact_objective, _linear_gaussian_vae

from pyro_vae import ENCODERS, ESTIMATORS, VAE
from pyro_vae.app.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.inference.estimators import IWAE_ELBO, DReG_ELBO, _draw_iwae
from pyro_vae.lab.variance import choose_draws, gradient_draws
from pyro_vae.models.encoders import GuideFamily
from pyro_vae.models.layers import positive_scale

X = torch.tensor([[-1.0], [0.5], [2.0], [1.2]], dtype=torch.float64)


def _draws(vae: VAE, name: str, k: int, n: int, seed: int = 11) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {}
    for chunk in gradient_draws(vae, name, X, n, num_particles=k, chunk_size=n):
        for param, g in chunk.items():
            out.setdefault(param, []).append(g.reshape(g.shape[0], -1))
    return {param: torch.cat(v) for param, v in out.items()}


def test_mean_gradient_is_the_exact_iwae_gradient_and_the_decoder_gets_iwae_s():
    """Linear-Gaussian VAE, K = 3: the exact gradient of the IWAE bound by Gauss-Hermite
    quadrature (40 nodes per particle). DReG's mean over 12,000 draws is within 4.5 standard
    errors of it for every parameter; its decoder gradient is IWAE's draw for draw (same
    noise), and its encoder gradient is less noisy than IWAE's."""
    k, n = 3, 12000
    vae = _linear_gaussian_vae("dreg").double()
    vae.zero_grad()
    (-_exact_objective(vae, X, k)).backward()
    exact = {name: p.grad.reshape(-1).clone() for name, p in vae.named_parameters()}
    dreg, iwae = _draws(vae, "dreg", k, n), _draws(vae, "iwae", k, n)
    for name, want in exact.items():
        mean, stderr = dreg[name].mean(0), (dreg[name].var(0) / n).sqrt()
        assert (stderr > 0).all()
        z = ((mean - want) / stderr).abs().max().item()
        assert z < 4.5, f"{name}: DReG's mean gradient is {z:.1f} standard errors off"
        if name.startswith("decoder"):
            torch.testing.assert_close(dreg[name], iwae[name], rtol=1e-9, atol=1e-12)
        else:
            assert (dreg[name].var(0) < iwae[name].var(0)).all(), name


def test_loss_is_the_iwae_bound_and_the_plate_scale_multiplies_the_images():
    """Same noise: DReG_ELBO's loss equals IWAE_ELBO's; with num_data = N the gradient is N/B
    times the full-batch one (the scale is applied outside each image's log-mean-exp)."""
    vae = _linear_gaussian_vae("dreg").double()

    def run(elbo, num_data):
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        with pyro.get_param_store().scope():
            loss = elbo.loss_and_grads(vae.model, vae.guide, X, num_data=num_data)
        return loss, {n: p.grad.clone() for n, p in vae.named_parameters()}

    loss, grads = run(DReG_ELBO(num_particles=4), None)
    torch.manual_seed(2)
    assert loss == pytest.approx(IWAE_ELBO(num_particles=4).loss(vae.model, vae.guide, X),
                                 rel=1e-12)
    scaled_loss, scaled = run(DReG_ELBO(num_particles=4), 40)
    assert scaled_loss == pytest.approx(10 * loss, rel=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(scaled[name], 10 * g)


@pytest.mark.parametrize("prior", ["standard-normal", "vamp"])
def test_lab_draws_equal_pyro_and_the_probe_refuses_a_draw_loss_that_is_not_pyros(
        prior, mnist5k_grey):
    # The VampPrior evaluates the encoder at its pseudo-inputs: that direct dependence of
    # log p(z) on the encoder is weighted by w~_k, the path through z_k by w~_k^2.
    cfg = tiny_config(estimator="dreg")
    cfg.model.hidden_dims = [32]
    cfg.model.latent_dim = 4
    cfg.model.prior = prior
    cfg.model.prior_components = 5
    vae = VAE.from_config(cfg, (1, 28, 28))
    x = (mnist5k_grey.train.images[:16] > 0.5).float()
    paths: list = []
    torch.manual_seed(5)
    fast = list(gradient_draws(vae, "dreg", x, 3, num_particles=4, chunk_size=1, paths=paths))
    torch.manual_seed(5)
    slow = list(gradient_draws(vae, "dreg", x, 3, num_particles=4, vectorized=False))
    assert paths[0].path == "func" and "hand: " in paths[0].reason
    for a, b in zip(fast, slow, strict=True):
        for name in b:
            scale = b[name].abs().max().item()
            torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5 * scale)
    # a draw loss that is IWAE's, not DReG's, with DReG's ELBO: the probe sends it to Pyro
    wrong = replace(ESTIMATORS["dreg"], draw_loss=_draw_iwae)
    choice = choose_draws(vae, wrong, x, 4, None)
    assert choice.path == "generic" and "probe draw differs" in choice.reason


class _NotReparametrized(GuideFamily):
    """A diagonal Normal that Pyro must treat as a score-function site."""

    def forward(self, h: torch.Tensor) -> dist.Distribution:
        loc, raw_scale = h.chunk(2, dim=-1)
        return NonreparameterizedNormal(loc, positive_scale(raw_scale)).to_event(1)


TINY = ["--hidden-dims", "16", "--latent-dim", "2", "--batch-size", "32", "--epochs", "1",
        "--train-limit", "128", "--no-progress", "--no-figures"]


@pytest.mark.parametrize("name", ["dreg", "iwae"])
def test_refused_with_one_line_for_a_guide_without_rsample(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(ENCODERS, "not-reparametrized", _NotReparametrized)
    code = main(["train", "--out", str(tmp_path / "run"), *TINY, "--estimator", name,
                 "--encoder", "not-reparametrized"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    # the guide family's own distribution is checked when the config is validated
    assert lines[0].startswith(f"pyro-vae: error: estimator {name} needs a reparametrizable "
                               f"q(z|x)")
    assert "(NonreparameterizedNormal) has no rsample" in lines[0]
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_cli_trains_with_dreg_and_reports_the_iwae_bound(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--estimator", "dreg"]) == 0
    (record,) = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert record["objective"] == "iwae bound (K=5)"
    assert record["train_objective"] < 0 and record["test_elbo"] < 0
    with pytest.raises(ConfigError, match="num_particles >= 2"):
        tiny_config(estimator="dreg", num_particles=1).validate()


def test_snr_script_runs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "iwae_dreg_snr.py"
    spec = importlib.util.spec_from_file_location("iwae_dreg_snr", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--out", str(tmp_path), "--epochs", "0", "--hidden-dims", "16",
                        "--latent-dim", "2", "--ks", "1", "2", "4", "--draws", "4",
                        "--control-dim", "2", "--control-draws", "4", "--batch", "4",
                        "--no-figure"]) == 0
    result = json.loads((tmp_path / "iwae_dreg_snr.json").read_text())
    for setting in ("control", "digits"):
        assert set(result[setting]["slopes"]) == {"iwae", "dreg"}
        assert result[setting]["snr"]["dreg"]["2"]["path"]["path"] == "func"
        assert set(result[setting]["ess"]) == {"1", "2", "4"}
    assert "slope of log(median SNR)" in capsys.readouterr().out
