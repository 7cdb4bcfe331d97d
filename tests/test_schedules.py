"""Schedules written as Pyro would: the KL weight as a poutine.scale on the latent sites
(--beta, --kl-warmup-epochs), learning-rate schedules and early stopping, all checkpointed so
that a resumed run equals the uninterrupted one; the objective each epoch trained is named."""

from __future__ import annotations

import os
import signal

import pyro
import pytest
import torch
from conftest import small_dataset, tiny_config

from pyro_vae import ESTIMATORS, ConfigError, elbo_per_image, fit
from pyro_vae.training import trainer as trainer_mod
from pyro_vae.training.trainer import Trainer


def _without_time(metrics):
    return [{k: v for k, v in m.items() if k != "seconds"} for m in metrics]


def _x(n: int = 16) -> torch.Tensor:
    return (small_dataset(num_train=n).train.images > 0.5).float()


def test_kl_weight_ramps_linearly_and_scales_both_latent_sites():
    cfg = tiny_config(kl_warmup_epochs=2, beta=0.5).validate()
    trainer = Trainer(cfg, small_dataset(256, 64))  # 4 steps per epoch
    assert [trainer.kl_weight(s) for s in (1, 4, 8, 9, 100)] == [
        0.5 / 8, 0.25, 0.5, 0.5, 0.5]
    vae = trainer.vae
    vae.kl_weight = 0.3
    guide = pyro.poutine.trace(vae.guide).get_trace(_x())
    model = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide)).get_trace(_x())
    assert guide.nodes["z"]["scale"] == pytest.approx(0.3)
    assert model.nodes["z"]["scale"] == pytest.approx(0.3)
    assert model.nodes["x"]["scale"] == 1.0


@pytest.mark.parametrize("estimator", ["reparam", "analytic-kl"])
def test_fast_path_reproduces_the_weighted_objective(estimator):
    """FastELBO reproduces Trace_ELBO / TraceMeanField_ELBO on the scaled program: loss and
    gradients equal on the same noise, so the warm-up keeps the fast path."""
    cfg = tiny_config(estimator=estimator, kl_warmup_epochs=3).validate()
    trainer = Trainer(cfg, small_dataset(256, 64))
    assert trainer.paths[0].path == "FastELBO" and "KL weight" in trainer.paths[0].reason
    vae, x, n = trainer.vae, _x(), 256
    vae.kl_weight = 0.2
    grads = {}
    for name, run in (("fast", lambda: trainer.fast(x).backward()),
                      ("pyro", lambda: ESTIMATORS[estimator].make_elbo(cfg).loss_and_grads(
                          vae.model, vae.guide, x, num_data=n))):
        vae.zero_grad(set_to_none=True)
        torch.manual_seed(4)
        run()
        grads[name] = [p.grad.clone() for p in vae.parameters() if p.grad is not None]
    for a, b in zip(grads["fast"], grads["pyro"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * max(1.0, b.abs().max().item()))
    # the weight is really in the objective: another weight, other gradients
    vae.kl_weight = 1.0
    vae.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    trainer.fast(x).backward()
    assert not torch.allclose(vae.encoder.head.weight.grad, grads["fast"][1])


def test_reported_elbos_stay_the_true_elbo_and_the_objective_is_named():
    data = small_dataset(256, 64)
    result = fit(tiny_config(epochs=3, kl_warmup_epochs=2), dataset=data)
    objectives = [m["objective"] for m in result.metrics]
    assert objectives[0].startswith("beta-elbo (KL weight 0.125 to 0.5")
    assert objectives[2] == "elbo"  # the warm-up is over: the objective is the ELBO again
    assert "train_elbo" not in result.metrics[0] and "train_elbo" in result.metrics[2]
    assert [m["kl_weight"] for m in result.metrics] == [0.5, 1.0, 1.0]
    assert result.vae.kl_weight == 1.0  # the model is handed back unscaled
    # test_elbo is the ELBO of the unscaled program (the weight never enters a metric)
    vae = result.vae
    vae.kl_weight = 0.25
    scaled = elbo_per_image(vae, result.dataset.test.images, num_particles=5)
    vae.kl_weight = 1.0
    torch.manual_seed(0)
    plain = elbo_per_image(vae, result.dataset.test.images, num_particles=5)
    torch.manual_seed(0)
    vae.kl_weight = 0.25
    assert elbo_per_image(vae, result.dataset.test.images, num_particles=5) == plain
    assert scaled == pytest.approx(plain, abs=2.0)


def test_iwae_defaults_to_five_particles_and_names_its_bound():
    cfg = tiny_config(estimator="iwae", epochs=1).validate()
    assert cfg.train.num_particles == 5
    result = fit(cfg, dataset=small_dataset(256, 64))
    record = result.metrics[0]
    assert record["objective"] == "iwae bound (K=5)" and "train_elbo" not in record
    assert "test_elbo" in record
    with pytest.raises(ConfigError, match="num_particles >= 2"):
        tiny_config(estimator="iwae", num_particles=1).validate()


def test_learning_rate_schedules_follow_torch():
    data = small_dataset(256, 64)
    step = fit(tiny_config(epochs=5, lr_schedule="step", lr_step_epochs=2, lr_gamma=0.1),
               dataset=data)
    assert [m["lr"] for m in step.metrics] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])
    cosine = fit(tiny_config(epochs=4, lr_schedule="cosine"), dataset=data)
    assert [m["lr"] for m in cosine.metrics] == pytest.approx(
        [1e-3, 1e-3 * 0.5 * (1 + 0.7071067811865476), 5e-4, 1e-3 * 0.5 * (1 - 0.7071067811865476)])


def test_early_stopping_on_the_validation_elbo(tmp_path, monkeypatch):
    cfg = tiny_config(epochs=10, early_stop_patience=2)
    cfg.data.train_limit, cfg.data.val_fraction = 512, 0.25
    values = iter([-100.0, -99.0, -99.5, -99.2, -98.0, -97.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"test_elbo": -1.0,
                                                           "val_elbo": next(values)})
    result = fit(cfg, tmp_path / "run")
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    last = result.metrics[-1]
    assert last["early_stop"] and last["best_epoch"] == 2 and last["best_val_elbo"] == -99.0
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert '"event": "early-stop"' in events
    with pytest.raises(ConfigError, match="validation split"):
        fit(tiny_config(early_stop_patience=2), dataset=small_dataset(256, 64))
    with pytest.raises(ConfigError, match="val_fraction"):
        tiny_config(early_stop_patience=2).validate()


def test_resume_after_an_interrupt_repeats_warmup_schedule_and_early_stop(tmp_path,
                                                                           monkeypatch):
    """Ctrl-C in the middle of the warm-up, a cosine schedule and early-stopping bookkeeping:
    the resumed run equals the uninterrupted one bit for bit."""
    cfg = tiny_config(epochs=4, kl_warmup_epochs=3, lr_schedule="cosine",
                      early_stop_patience=3)
    cfg.data.train_limit, cfg.data.val_fraction = 640, 0.2
    straight = fit(cfg, tmp_path / "a")
    original = trainer_mod.Trainer.step
    calls = {"n": 0}

    def step_then_ctrl_c(self, x):
        out = original(self, x)
        calls["n"] += 1
        if calls["n"] == 11:  # in epoch 2 (8 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(trainer_mod.Trainer, "step", step_then_ctrl_c)
    first = fit(cfg, tmp_path / "b")
    assert first.interrupted
    monkeypatch.setattr(trainer_mod.Trainer, "step", original)
    resumed = fit(cfg, tmp_path / "b", resume=True)
    assert _without_time(resumed.metrics) == _without_time(straight.metrics)
    for p, q in zip(straight.vae.parameters(), resumed.vae.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("estimator", ["iwae", "dreg", "vimco"])
@pytest.mark.parametrize("setting", [{"beta": 0.5}, {"kl_warmup_epochs": 2}])
def test_kl_weights_are_refused_for_the_importance_weighted_bound(estimator, setting):
    # the bound has no KL term: a weight on the latent sites would scale the whole bound
    cfg = tiny_config(estimator=estimator, **setting)
    with pytest.raises(ConfigError, match="has no KL term"):
        fit(cfg, dataset=small_dataset())
