"""The variance lab: vectorized draws equal Pyro's, measuring changes nothing, theory holds."""

from __future__ import annotations

import json

import pyro
import pytest
import torch
from conftest import tiny_config

from pyro_vae import ESTIMATORS, VAE
from pyro_vae.app.cli import main
from pyro_vae.errors import ConfigError
from pyro_vae.inference.accelerators.mlp_gradients import SUPPORTED
from pyro_vae.inference.estimators import AVG_BASELINE_PARAM
from pyro_vae.lab.variance import gradient_draws, measure_gradient_variance

#: The estimators that apply to a continuous code (the discrete-only ones: tests/test_discrete.py)
CONTINUOUS = [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].applies_to(discrete=False)]

def _tiny_vae(estimator: str = "reparam") -> VAE:
    cfg = tiny_config(estimator=estimator)
    cfg.model.hidden_dims = [32]
    cfg.model.latent_dim = 4
    return VAE.from_config(cfg, (1, 28, 28))


def _digits(mnist5k_grey, n: int = 32) -> torch.Tensor:
    return (mnist5k_grey.train.images[:n] > 0.5).float()


@pytest.mark.parametrize("method", ["func", "hand"])
@pytest.mark.parametrize("name", CONTINUOUS)
def test_vectorized_draws_equal_pyro_loss_and_grads(name, method, mnist5k_grey):
    if method == "hand" and ESTIMATORS[name].surrogate not in SUPPORTED:
        pytest.skip(f"{name} has no hand-written gradient")
    vae = _tiny_vae(name)
    x = _digits(mnist5k_grey, 16)
    k = ESTIMATORS[name].min_particles
    pyro.get_param_store()[AVG_BASELINE_PARAM] = torch.full((16,), -300.0)
    torch.manual_seed(5)
    fast = [g for g in gradient_draws(vae, name, x, 3, num_particles=k, chunk_size=1,
                                      method=method)]
    torch.manual_seed(5)
    slow = [g for g in gradient_draws(vae, name, x, 3, num_particles=k, vectorized=False)]
    # leave-one-out signals are differences of nearly equal log-weights: float32 rounding of
    # the networks (vmap vs Pyro's batch) is amplified there
    loo = ESTIMATORS[name].surrogate in ("leave-one-out-score", "multi-sample-score")
    for a, b in zip(fast, slow):
        for param in a:
            scale = b[param].abs().max().item()
            torch.testing.assert_close(a[param], b[param], rtol=1e-3,
                                       atol=(1e-4 if loo else 1e-5) * scale)


def test_measuring_changes_nothing(mnist5k_grey):
    vae = _tiny_vae("score-avg-baseline")
    x = _digits(mnist5k_grey)
    store = pyro.get_param_store()
    store[AVG_BASELINE_PARAM] = torch.full((32,), -250.0)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    rng = torch.get_rng_state()
    measure_gradient_variance(vae, x, ["score-avg-baseline"], num_draws=10, oracle_draws=10)
    measure_gradient_variance(vae, x, ["score-avg-baseline"], num_draws=4, oracle_draws=4,
                              vectorized=False)  # Pyro's loop updates the average: restored
    for k, v in vae.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in vae.parameters())
    assert torch.equal(store[AVG_BASELINE_PARAM], torch.full((32,), -250.0))
    assert torch.equal(torch.get_rng_state(), rng)


def test_variances_agree_with_theory(mnist5k_grey):
    vae = _tiny_vae()
    x = _digits(mnist5k_grey)
    res = measure_gradient_variance(vae, x, ["score", "score-avg-baseline"], num_draws=400,
                                    oracle_draws=400)["estimators"]
    rep, score, avg = (res[n]["groups"] for n in ("reparam", "score", "score-avg-baseline"))
    # decoder gradients are pathwise under every estimator: same variance within the interval
    for other in (score, avg):
        lo, hi = other["decoder"]["ratio_to_reparam_ci"]
        assert lo < 1.0 < hi, (lo, hi)
    # the score function is far noisier on the encoder; a baseline lowers it
    assert score["encoder"]["trace_ci"][0] > 100 * rep["encoder"]["trace_ci"][1]
    assert avg["encoder"]["trace_ci"][1] < score["encoder"]["trace_ci"][0]
    # unbiased estimators point where the oracle does
    assert rep["encoder"]["cosine"] > 0.95 and rep["decoder"]["cosine"] > 0.99
    for groups in (rep, score, avg):
        assert all(s["trace"] > 0 and s["trace"] < float("inf") for s in groups.values())


def test_variance_cli_writes_results_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "v"
    args = ["variance", "--out", str(out), "--hidden-dims", "16", "--latent-dim", "2",
            "--checkpoints", "0", "3", "--draws", "20", "--oracle-draws", "20",
            "--measure-batch", "16", "--batch-size", "16", "--curve-steps", "4",
            "--no-progress"]
    assert main(args) == 0
    for name in ("variance.json", "variance.csv", "variance_vs_step.png", "snr_vs_step.png",
                 "ratio_vs_step.png", "elbo_curves.png"):
        assert (out / name).stat().st_size > 0, name
    header, *rows = (out / "variance.csv").read_text().splitlines()
    assert "ratio_to_reparam" in header and len(rows) >= 2 * 3 * 2
    # the default draw precision is measured, and recorded with the measurement behind it
    from pyro_vae.inference.precision import fast_product_precision

    result = json.loads((out / "variance.json").read_text())
    assert result["precision"] == fast_product_precision("cpu")[0]
    assert result["precision_choice"].startswith("auto: bf16 products ")
    assert main(args) == 2  # nothing already written is overwritten
    assert "already holds" in capsys.readouterr().err
    assert main(["variance", "--out", str(tmp_path / "w"), "--draws", "1"]) == 2
    assert main(["variance", "--out", str(tmp_path / "w"), "--estimators", "nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_variance_cli_measures_given_runs_with_their_own_config(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--hidden-dims", "16", "--latent-dim", "3",
                 "--epochs", "1", "--train-limit", "128", "--batch-size", "32",
                 "--no-progress", "--no-figures"]) == 0
    out = tmp_path / "v"
    common = ["variance", "--out", str(out), "--runs", str(run), "--draws", "10",
              "--oracle-draws", "10", "--measure-batch", "8", "--no-figures"]
    # a training setting would be silently ignored: refused instead, nothing written
    assert main([*common, "--latent-dim", "5"]) == 2
    assert "drop --latent-dim" in capsys.readouterr().err and not out.exists()
    assert main([*common, "--no-progress"]) == 0
    (measurement,) = json.loads((out / "variance.json").read_text())["measurements"]
    assert measurement["latent_dim"] == 3 and measurement["step"] == 4  # the run, not defaults
    assert set(measurement["estimators"]) == {"reparam", "score", "score-avg-baseline"}


@pytest.mark.parametrize("prior", ["vamp", "learned-gaussian"])
def test_draws_include_gradients_through_the_prior(prior, mnist5k_grey):
    # The VampPrior evaluates the encoder at its pseudo-inputs: log p(z) also carries encoder
    # gradient, which a functional call of the prior alone would miss.
    cfg = tiny_config()
    cfg.model.hidden_dims = [32]
    cfg.model.latent_dim = 4
    cfg.model.prior = prior
    cfg.model.prior_components = 5
    vae = VAE.from_config(cfg, (1, 28, 28))
    x = _digits(mnist5k_grey, 16)
    runs = {}
    for key, kwargs in (("split", {}), ("full", {"shared_encoder": False}),
                        ("pyro", {"vectorized": False})):
        torch.manual_seed(7)
        runs[key] = list(gradient_draws(vae, "reparam", x, 2, chunk_size=1, **kwargs))
    for key in ("split", "full"):
        for a, b in zip(runs[key], runs["pyro"]):
            for param in b:
                scale = b[param].abs().max().item()
                torch.testing.assert_close(a[param], b[param], rtol=1e-3, atol=1e-5 * scale,
                                           msg=lambda m, k=key, p=param: f"{k} {p}: {m}")


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variance_benchmark_scripts_run(capsys):
    _script("bench_variance").main(["--draws", "3", "--oracle-draws", "4", "--checkpoints", "0",
                                    "2", "--loop-draws", "2", "--threads", "1"])
    out = capsys.readouterr().out
    assert "default experiment:" in out and "plain loop" in out and "vmap path" in out
    assert _script("oracle_variance").main(["--draws", "4", "--steps", "0"]) == 0
    assert "antithetic analytic-kl pairs" in capsys.readouterr().out
    # the discrete benchmark, shrunk: its figures and the machine's share are printed
    assert _script("bench_discrete").main(["--bits", "2", "--hidden", "8", "--draws", "4",
                                           "--checkpoints", "0", "1", "--loop-draws", "1",
                                           "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "default discrete experiment" in out and "plain loop" in out
    assert "GFLOP/s just before the clock" in out and "cores" in out


@pytest.mark.parametrize("chunked", [False, True])
def test_trace_interval_covers_a_known_trace(chunked):
    # draws g = ref + N(0, s^2 I) of two parameters: tr Cov = P s^2. ``chunked`` (the discrete
    # lab with enough chunks, where the bias is bootstrapped over chunks too) resamples the
    # chunks' sums instead of per-draw norms; both must cover the truth, equally wide.
    from pyro_vae.lab.variance import _Moments, _summary

    torch.manual_seed(0)
    ref = {"a.weight": torch.randn(30, 20), "a.bias": torch.randn(30)}
    s, r, chunk = 0.3, 2000, 25
    truth = s ** 2 * sum(v.numel() for v in ref.values())
    widths, covered = [], 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        m = _Moments(ref, {"a": list(ref)}, blocks=chunked, chunk_bootstrap=chunked)
        for _ in range(r // chunk):
            m.add({k: v + s * torch.randn(chunk, *v.shape, generator=gen)
                   for k, v in ref.items()})
        out = _summary(m, ref, 500, torch.Generator().manual_seed(seed))["a"]
        lo, hi = out["trace_ci"]
        assert lo < out["trace"] < hi
        assert out["trace"] == pytest.approx(truth, rel=0.05)
        covered += lo <= truth <= hi
        widths.append((hi - lo) / truth)
    # the relative standard error of a trace of 620 independent unit variances over 2000
    # draws is sqrt(2 / (620 * 2000)) = 0.13%: a 95% interval about 0.5% wide
    assert covered >= 16
    assert 0.003 < sum(widths) / len(widths) < 0.008


@pytest.mark.parametrize("exact, chunk, block_draws", [
    (True, 25, 25),  # the discrete lab: an exact reference, chunks of 25 draws
    (False, 25, 25),  # the Gaussian lab: a reparametrized reference, no bias reported
    (True, 1, 25),  # Pyro's path: single draws, merged into blocks of 25
    (False, 25, 50),  # many chunks: merged into fewer, larger blocks
])
def test_block_trace_interval_of_a_biased_estimator_stays_around_its_trace(exact, chunk,
                                                                          block_draws):
    # draws g = ref + bias + N(0, s^2 I) with ||bias||^2 = 100 tr Cov (a relaxed estimator far
    # from the exact gradient, or iwae against the ELBO's): the trace is still P s^2, and the
    # interval must cover it rather than swing with the bias's cross term (below zero, before)
    from pyro_vae.lab.variance import _Moments, _summary

    torch.manual_seed(0)
    ref = {"a.weight": torch.randn(30, 20), "a.bias": torch.randn(30)}
    s, r = 0.3, 1000
    truth = s ** 2 * sum(v.numel() for v in ref.values())
    bias = {k: torch.randn(v.shape) * s * 10 for k, v in ref.items()}
    covered = 0
    for seed in range(10):
        gen = torch.Generator().manual_seed(seed)
        m = _Moments(ref, {"a": list(ref)}, blocks=exact, chunk_bootstrap=True,
                     block_draws=block_draws)
        for _ in range(r // chunk):
            m.add({k: v + bias[k] + s * torch.randn(chunk, *v.shape, generator=gen)
                   for k, v in ref.items()})
        assert m.block_counts == [block_draws] * (r // block_draws)
        out = _summary(m, ref, 500, torch.Generator().manual_seed(seed))["a"]
        lo, hi = out["trace_ci"]
        assert 0 < lo < out["trace"] < hi < 1.05 * truth
        covered += lo <= truth <= hi
        assert ("relative_error" in out) == exact  # the bias only against an exact reference
        c_lo, c_hi = out["cosine_ci"]
        assert c_lo <= out["cosine"] <= c_hi
    assert covered >= 8


def test_lab_resamples_blocks_of_draws_once_there_are_enough(mnist5k_grey):
    # from 20 chunks on, the Gaussian lab (like the discrete one) bootstraps blocks of draws,
    # whose trace is taken around each resample's own mean; Pyro's path, which yields single
    # draws, fills blocks of chunk_size draws; the bias is reported only against an exact oracle
    vae = _tiny_vae("iwae")
    x = _digits(mnist5k_grey, 16)
    res = measure_gradient_variance(vae, x, ["iwae"], num_draws=500, oracle_draws=100,
                                    num_particles=4)
    for name in ("reparam", "iwae"):
        r = res["estimators"][name]
        assert r["bootstrap"] == {"trace": "blocks", "blocks": 20}
        enc = r["groups"]["encoder"]
        assert 0 < enc["trace_ci"][0] < enc["trace"] < enc["trace_ci"][1]
        assert enc["cosine_ci"][0] <= enc["cosine"] <= enc["cosine_ci"][1]
        assert "relative_error" not in enc
    few = measure_gradient_variance(vae, x, ["iwae"], num_draws=100, oracle_draws=10,
                                    num_particles=4)
    assert few["estimators"]["iwae"]["bootstrap"] == {"trace": "draws", "blocks": 0}
    # from 20 full chunks (R >= 500 at 25 a chunk), at most 100 blocks however large R is
    from pyro_vae.lab.variance import bootstrap_blocks

    assert bootstrap_blocks(500, 25) == (True, 25) and bootstrap_blocks(499, 25) == (False, 25)
    for draws in (2501, 10 ** 5):
        _, per_block = bootstrap_blocks(draws, 25)
        assert -(-draws // per_block) <= 100 and per_block % 25 == 0
    slow = measure_gradient_variance(vae, x, [], num_draws=40, oracle_draws=10, chunk_size=2,
                                     vectorized=False)
    assert slow["estimators"]["reparam"]["bootstrap"] == {"trace": "blocks", "blocks": 20}


def test_auto_precision_takes_bf16_only_where_its_products_are_faster(monkeypatch):
    # a CPU without native bf16 products (AVX2) runs them tens of times slower than float32:
    # the lab's default precision must follow the measurement, not assume bf16
    from pyro_vae.inference import precision
    from pyro_vae.lab.variance import resolve_precision

    for bf16_seconds, expected in ((0.050, "float32"), (0.001, "bf16")):
        monkeypatch.setattr(precision, "_FAST", {})
        monkeypatch.setattr(precision, "_product_seconds", lambda dtype, device, size=256, s=(
            bf16_seconds): s if dtype == torch.bfloat16 else 0.004)
        choice, why = resolve_precision("auto", torch.device("cpu"))
        assert choice == expected and why.startswith("auto: bf16 products")
    assert resolve_precision("float32", torch.device("cpu")) == ("float32", "asked for")
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


def test_block_cosine_interval_covers_the_mean_gradients_cosine():
    # draws g = ref + bias + N(0, s^2 I) with the noise of the mean comparable to the bias:
    # the sample cosine is pulled below cos(E g, ref) by the mean's noise, and a resampled
    # mean's by twice as much; the (reflected) interval must still cover the true cosine
    from pyro_vae.lab.variance import _Moments, _summary

    torch.manual_seed(0)
    ref = {"a.weight": torch.randn(10, 20)}
    bias = {"a.weight": 0.3 * torch.randn(10, 20)}
    s, r, chunk = 8.0, 1000, 25
    mean = ref["a.weight"] + bias["a.weight"]
    truth = float((mean * ref["a.weight"]).sum() / (mean.norm() * ref["a.weight"].norm()))
    covered = 0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        for exact in (True, False):
            m = _Moments(ref, {"a": ["a.weight"]}, blocks=exact, chunk_bootstrap=True,
                         block_draws=chunk)
            for _ in range(r // chunk):
                m.add({"a.weight": mean + s * torch.randn(chunk, 10, 20, generator=gen)})
            lo, hi = _summary(m, ref, 500, torch.Generator().manual_seed(seed))["a"]["cosine_ci"]
            covered += lo <= truth <= hi
    assert covered >= 34  # of 40; percentiles of the resampled cosines covered it 0 times
