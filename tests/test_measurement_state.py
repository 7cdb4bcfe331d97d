"""Measuring changes nothing: the param store holds the same objects afterwards, no new keys,
and Pyro's own SVI keeps training the same tensors."""

from __future__ import annotations

import pyro
import pyro.optim
import torch
from conftest import small_dataset, tiny_config
from pyro.infer import SVI, Trace_ELBO

from pyro_vae import VAE, fit, measure_gradient_variance
from pyro_vae.inference.estimators import AVG_BASELINE_PARAM
from pyro_vae.lab.variance import gradient_draws


def _x(n: int = 16) -> torch.Tensor:
    return (small_dataset(num_train=n).train.images > 0.5).float()


def _store_snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name] for name in store.keys()}


def test_measurement_leaves_the_same_param_store_objects_and_svi_keeps_training():
    cfg = tiny_config().validate()
    vae = VAE.from_config(cfg, (1, 28, 28))
    x = _x()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)  # registers the modules' parameters in the store
    before = _store_snapshot()
    measure_gradient_variance(vae, x, ["score"], num_draws=4, oracle_draws=2)
    after = _store_snapshot()
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)  # identity, not only values
    weight = vae.encoder.head.weight
    assert pyro.get_param_store()["encoder$$$head.weight"] is weight
    start = weight.detach().clone()
    for _ in range(5):
        svi.step(x)
    assert not torch.equal(weight, start)  # the encoder still trains


def test_pyro_reference_path_leaves_no_baseline_behind():
    cfg = tiny_config(estimator="score-avg-baseline").validate()
    vae = VAE.from_config(cfg, (1, 28, 28))
    x = _x()
    list(gradient_draws(vae, "score-avg-baseline", x, 3, vectorized=False))
    assert AVG_BASELINE_PARAM not in pyro.get_param_store()
    measure_gradient_variance(vae, x, ["score-avg-baseline"], num_draws=3, oracle_draws=2,
                              vectorized=False)
    assert AVG_BASELINE_PARAM not in pyro.get_param_store()


def test_measuring_a_model_just_trained_with_the_average_baseline(tmp_path):
    """Pyro keeps the moving average as a ProvenanceTensor; a measurement in the same process
    reads it as a plain tensor (the compiled moment kernel once crashed on it)."""
    result = fit(tiny_config(estimator="score-avg-baseline", epochs=1), tmp_path / "run",
                 dataset=small_dataset(256, 64))
    store = pyro.get_param_store()
    assert AVG_BASELINE_PARAM in store
    kept = store._params[AVG_BASELINE_PARAM]
    value = kept.detach().clone()
    out = measure_gradient_variance(result.vae, _x(64), ["score-avg-baseline"], num_draws=4,
                                    oracle_draws=2, compile=True)
    assert out["estimators"]["score-avg-baseline"]["groups"]["encoder"]["trace"] > 0
    assert store._params[AVG_BASELINE_PARAM] is kept and torch.equal(kept.detach(), value)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    extras = saved["param_store_extras"]
    assert all(type(v) is torch.Tensor for v in extras.values())
