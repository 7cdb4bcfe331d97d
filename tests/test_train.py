import importlib
import json
import os
import signal

import pytest
import torch
from conftest import tiny_config

from pyro_vae import CheckpointError, ConfigError, Dataset, Split, fit, load_run, train
from pyro_vae.metrics import elbo_per_image
from pyro_vae.models.vae import VAE


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def test_training_on_real_digits_improves_the_test_elbo(mnist5k_grey):
    cfg = tiny_config(epochs=3, batch_size=100)
    result = fit(cfg, dataset=mnist5k_grey)
    torch.manual_seed(0)
    untrained = VAE.from_config(cfg, mnist5k_grey.image_shape)
    before = elbo_per_image(untrained, result.dataset.test.images)
    after = result.metrics[-1]["test_elbo"]
    # An untrained decoder pays ~log 2 nats per pixel (~540 nats); three quick epochs must
    # take off far more than the run-to-run noise.
    assert before < -500
    assert after > before + 250, (before, after)
    assert result.metrics[-1]["train_elbo"] > result.metrics[0]["train_elbo"]


def test_resumed_run_equals_uninterrupted_run(tmp_path, mnist5k_grey):
    cfg = tiny_config(epochs=3)
    cfg.data.train_limit = 640
    straight = fit(cfg, tmp_path / "a")
    short = tiny_config(epochs=1)
    short.data.train_limit = 640
    fit(short, tmp_path / "b")
    resumed = fit(cfg, tmp_path / "b", resume=True)
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)
    for (name, p), q in zip(straight.vae.state_dict().items(), resumed.vae.state_dict().values()):
        assert torch.equal(p, q), name
    lines = [json.loads(s) for s in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]


def test_interrupted_mid_epoch_checkpoint_resumes_exactly(tmp_path, monkeypatch):
    """Ctrl-C (SIGINT) between steps saves a mid-epoch checkpoint that resumes bit for bit."""
    cfg = tiny_config(epochs=2)
    cfg.data.train_limit = 640
    straight = fit(cfg, tmp_path / "a")

    train_mod = importlib.import_module("pyro_vae.training.trainer")  # the module, not the function
    original_step = train_mod.Trainer.step
    calls = {"n": 0}

    def step_then_ctrl_c(self, x):
        out = original_step(self, x)
        calls["n"] += 1
        if calls["n"] == 13:  # in the middle of epoch 2 (10 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(train_mod.Trainer, "step", step_then_ctrl_c)
    first = fit(cfg, tmp_path / "b")
    assert first.interrupted and len(first.metrics) == 1 and calls["n"] == 13
    monkeypatch.setattr(train_mod.Trainer, "step", original_step)
    resumed = fit(cfg, tmp_path / "b", resume=True)
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)
    for p, q in zip(straight.vae.parameters(), resumed.vae.parameters()):
        assert torch.equal(p, q)


def test_run_folder_is_not_overwritten(tmp_path):
    cfg = tiny_config(epochs=1)
    cfg.data.train_limit = 256
    fit(cfg, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(CheckpointError, match="already holds another run"):
        fit(cfg, tmp_path / "run")
    other = tiny_config(epochs=2, lr=0.01)
    other.data.train_limit = 256
    with pytest.raises(CheckpointError, match=r"train.lr \(0.001 -> 0.01\)"):
        fit(other, tmp_path / "run", resume=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    with pytest.raises(CheckpointError, match="cannot resume"):
        fit(cfg, tmp_path / "empty", resume=True)
    with pytest.raises(ConfigError, match="exclude each other"):
        fit(cfg, tmp_path / "run", resume=True, overwrite=True)


def test_train_writes_figures_and_a_reloadable_checkpoint(tmp_path):
    cfg = tiny_config(epochs=1)
    cfg.data.train_limit = 256
    cfg.data.val_fraction = 0.25
    result = train(cfg, tmp_path / "run")
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.toml", "metrics.jsonl", "checkpoint.pt", "loss_curve.png", "samples.png",
            "reconstructions.png"} <= names
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert {"epoch", "train_elbo", "test_elbo", "val_elbo", "seconds"} <= set(record)
    loaded_cfg, vae, _ = load_run(tmp_path / "run")
    assert loaded_cfg == cfg
    x = result.dataset.test.images[:10]
    torch.testing.assert_close(vae.reconstruct(x), result.vae.reconstruct(x))


def test_batch_larger_than_dataset_is_rejected():
    cfg = tiny_config(batch_size=512)
    cfg.data.train_limit = 256
    with pytest.raises(ConfigError, match="larger than the 256 training images"):
        fit(cfg)


@pytest.mark.parametrize("arch, likelihood", [("conv", "bernoulli"), ("mlp", "gaussian"),
                                              ("mlp", "continuous-bernoulli")])
def test_every_architecture_and_likelihood_trains(arch, likelihood, mnist5k_grey):
    cfg = tiny_config(epochs=2, batch_size=50)
    cfg.model.arch, cfg.model.likelihood = arch, likelihood
    cfg.model.learn_gaussian_scale = likelihood == "gaussian"
    if likelihood != "bernoulli":
        cfg.data.binarize = "none"
    cfg.data.train_limit = 500
    data = mnist5k_grey
    test = Split(data.test.images[:200], data.test.labels[:200])  # keep the conv net's eval cheap
    result = fit(cfg, dataset=Dataset(data.name, data.image_shape, data.train, test))
    first, last = result.metrics[0]["train_elbo"], result.metrics[-1]["train_elbo"]
    assert all(torch.isfinite(torch.tensor(m["test_elbo"])) for m in result.metrics)
    assert last > first


def test_a_loaded_run_trains_with_plain_pyro_svi(tmp_path):
    """load_run's VAE is what Pyro optimizes, even after other models filled the param store."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    cfg = tiny_config(epochs=1)
    cfg.data.train_limit = 256
    result = fit(cfg, tmp_path / "run")
    _, vae, _ = load_run(tmp_path / "run")
    before = [p.detach().clone() for p in vae.parameters()]
    svi = SVI(vae.model, vae.guide, Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(result.dataset.test.images[:32])
    assert all(not torch.equal(b, p) for b, p in zip(before, vae.parameters()))
    assert pyro.get_param_store()["decoder$$$net.0.weight"] is vae.decoder.net[0].weight


@pytest.mark.parametrize("estimator", ["reparam", "score"])
def test_encoder_learning_rate_follows_the_estimator(estimator):
    from conftest import small_dataset

    from pyro_vae import ESTIMATORS
    from pyro_vae.training.trainer import Trainer

    cfg = tiny_config(estimator=estimator)
    cfg.train.lr = 2e-3
    trainer = Trainer(cfg.validate(), small_dataset())
    encoder = {id(p) for p in trainer.vae.encoder.parameters()}
    lrs = {id(p): g["lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    scale = ESTIMATORS[estimator].encoder_lr_scale
    assert scale == (0.1 if estimator == "score" else 1.0)
    assert len(lrs) == len(list(trainer.vae.parameters()))
    for p in trainer.vae.parameters():
        assert lrs[id(p)] == pytest.approx(2e-3 * (scale if id(p) in encoder else 1.0))


def test_encoder_lr_scale_option_overrides_and_old_checkpoints_are_named():
    from conftest import small_dataset

    from pyro_vae.training.trainer import Trainer

    cfg = tiny_config(estimator="score")
    cfg.train.encoder_lr_scale = 1.0
    one_group = Trainer(cfg.validate(), small_dataset())
    assert len(one_group.optimizer.param_groups) == 1
    state = one_group.state_dict()  # like a score checkpoint of the previous version
    fresh = Trainer(tiny_config(estimator="score").validate(), small_dataset())
    assert len(fresh.optimizer.param_groups) == 2
    with pytest.raises(CheckpointError, match="encoder_lr_scale=1"):
        fresh.load_state_dict(state)
