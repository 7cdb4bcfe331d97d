"""Every speed path gives Trace_ELBO's loss and gradients (issue 6, acceptance 3)."""

from __future__ import annotations

import pyro
import pytest
import torch
from conftest import small_dataset, tiny_config

from pyro_vae import VAE, ConfigError, fit
from pyro_vae.inference.accelerators import FastELBO, choose_training_loss
from pyro_vae.inference.accelerators.fast_elbo import SURROGATES
from pyro_vae.inference.estimators import ESTIMATORS
from pyro_vae.inference.precision import keep_float32_outputs, precision_context

FAST_ESTIMATORS = [name for name, e in ESTIMATORS.items() if e.surrogate in SURROGATES]


def make_fast_elbo(cfg, vae, num_data, x=None):
    """The FastELBO the trainer would choose for this program, or None (generic path)."""
    if x is None:
        x = _binary_batch(16)
    fast, _ = choose_training_loss(cfg, vae, ESTIMATORS[cfg.train.estimator], x, num_data)
    return fast

NUM_DATA = 1000


def _gradients(vae: VAE, loss_fn, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    vae.zero_grad(set_to_none=True)
    pyro.set_rng_seed(seed)
    loss = loss_fn()
    grads = {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}
    return float(loss.detach() if torch.is_tensor(loss) else loss), grads


def _pyro_gradients(cfg, vae, x, seed):
    elbo = ESTIMATORS[cfg.train.estimator].make_elbo(cfg)
    return _gradients(vae, lambda: elbo.loss_and_grads(vae.model, vae.guide, x,
                                                       num_data=NUM_DATA), seed)


def _fast_gradients(cfg, vae, x, seed):
    fast = make_fast_elbo(cfg, vae, NUM_DATA, x)
    assert fast is not None

    def run():
        loss = fast(x)
        loss.backward()
        return loss
    return _gradients(vae, run, seed)


def _binary_batch(n: int = 32) -> torch.Tensor:
    return (small_dataset(num_train=n).train.images > 0.5).float()


CASES = [dict(estimator=e, num_particles=k) for e in FAST_ESTIMATORS for k in (1, 3)]
MODELS = [dict(), dict(likelihood="gaussian", learn_gaussian_scale=True),
          dict(likelihood="continuous-bernoulli"), dict(arch="conv", hidden_dims=[32])]


@pytest.mark.parametrize("train", CASES, ids=lambda c: f"{c['estimator']}-K{c['num_particles']}")
@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.get("likelihood", m.get("arch", "mlp")))
def test_fast_path_matches_trace_elbo_gradients(train, model):
    cfg = tiny_config(**train)
    for key, value in model.items():
        setattr(cfg.model, key, value)
    if cfg.model.likelihood != "bernoulli":
        cfg.data.binarize = "none"
    cfg.validate()
    x = small_dataset(num_train=16).train.images
    if cfg.model.likelihood == "bernoulli":
        x = (x > 0.5).float()
    vae = VAE.from_config(cfg, (1, 28, 28))
    loss_p, grads_p = _pyro_gradients(cfg, vae, x, seed=7)
    loss_f, grads_f = _fast_gradients(cfg, vae, x, seed=7)
    assert loss_f == pytest.approx(loss_p, rel=1e-5)
    assert grads_f.keys() == grads_p.keys() and len(grads_p) > 0
    for name in grads_p:
        # Sums over the batch and pixels run in a different order on the two paths, so the
        # absolute tolerance follows the gradient's own scale (float32 rounding of large terms).
        atol = 1e-4 * max(1.0, grads_p[name].abs().max().item())
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")
    # A different seed draws different z: the match above is not an accident of the data.
    loss_other, _ = _fast_gradients(cfg, vae, x, seed=8)
    assert loss_other != pytest.approx(loss_p, rel=1e-6)


def test_fast_path_bf16_matches_pyro_bf16_and_stays_near_float32():
    cfg = tiny_config()
    x = _binary_batch()
    vae = VAE.from_config(cfg, (1, 28, 28))
    keep_float32_outputs(vae)
    cpu = torch.device("cpu")
    loss_32, grads_32 = _pyro_gradients(cfg, vae, x, seed=3)
    with precision_context("bf16", cpu):
        loss_pb, grads_pb = _pyro_gradients(cfg, vae, x, seed=3)
    with precision_context("bf16", cpu):
        loss_fb, grads_fb = _fast_gradients(cfg, vae, x, seed=3)
    # bf16 really is in use (the loss moves), but only by rounding-size amounts.
    assert loss_pb != loss_32
    assert loss_pb == pytest.approx(loss_32, rel=2e-2)
    assert loss_fb == pytest.approx(loss_pb, rel=1e-4)
    for name in grads_pb:
        torch.testing.assert_close(grads_fb[name], grads_pb[name], rtol=2e-3, atol=2e-3)
        cosine = torch.nn.functional.cosine_similarity(grads_pb[name].flatten(),
                                                       grads_32[name].flatten(), dim=0)
        assert cosine > 0.98, name


def test_float32_hooks_change_nothing_without_autocast():
    cfg = tiny_config()
    x = _binary_batch()
    vae = VAE.from_config(cfg, (1, 28, 28))
    loss_before, grads_before = _fast_gradients(cfg, vae, x, seed=1)
    keep_float32_outputs(vae)
    keep_float32_outputs(vae)  # idempotent: one hook per layer
    loss_after, grads_after = _fast_gradients(cfg, vae, x, seed=1)
    assert loss_after == loss_before
    for name in grads_before:
        assert torch.equal(grads_after[name], grads_before[name])
    assert all(len(m._forward_hooks) <= 1 for m in vae.modules())


def test_fast_path_noise_slices_the_global_batch():
    """Rank r of W draws the global batch's noise and uses its rows (world-size invariance)."""
    cfg = tiny_config()
    vae = VAE.from_config(cfg, (1, 28, 28))
    loc = torch.zeros(4, cfg.model.latent_dim)
    torch.manual_seed(5)
    full = FastELBO(vae)._noise(torch.zeros(8, cfg.model.latent_dim))
    for rank in range(2):
        torch.manual_seed(5)
        part = FastELBO(vae, rank=rank, world_size=2)._noise(loc)
        assert torch.equal(part, full[4 * rank:4 * (rank + 1)])


def test_training_with_and_without_fast_path_gives_the_same_model():
    data = small_dataset(num_train=256, num_test=64)
    results = {}
    for fast in (True, False):
        cfg = tiny_config(fast_path=fast, epochs=1)
        results[fast] = fit(cfg, dataset=data)
    p_fast = dict(results[True].vae.named_parameters())
    for name, p in results[False].vae.named_parameters():
        torch.testing.assert_close(p_fast[name], p, rtol=1e-4, atol=1e-5)
    assert results[True].metrics[0]["test_elbo"] == pytest.approx(
        results[False].metrics[0]["test_elbo"], abs=1e-3)


def test_fast_path_is_used_only_where_valid(monkeypatch):
    cfg = tiny_config()
    vae = VAE.from_config(cfg, (1, 28, 28))
    assert isinstance(make_fast_elbo(cfg, vae, 100), FastELBO)
    assert make_fast_elbo(tiny_config(fast_path=False), vae, 100) is None
    # The choice reads the estimator's surrogate, not its name: a renamed copy of reparam is
    # accelerated, a surrogate FastELBO does not reproduce trains through Pyro.
    from dataclasses import replace
    monkeypatch.setitem(ESTIMATORS, "other", replace(ESTIMATORS["reparam"], name="other"))
    assert isinstance(make_fast_elbo(tiny_config(estimator="other"), vae, 100), FastELBO)
    monkeypatch.setitem(ESTIMATORS, "other", replace(ESTIMATORS["reparam"], name="other",
                                                     surrogate="made-up"))
    assert make_fast_elbo(tiny_config(estimator="other"), vae, 100) is None


def test_bad_precision_is_a_config_error():
    with pytest.raises(ConfigError, match="fp8"):
        tiny_config(precision="fp8").validate()


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        fit(tiny_config(threads=1, epochs=1), dataset=small_dataset(num_train=128, num_test=32))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fast_path", [True, False])
def test_trainer_applies_bf16(fast_path):
    """--precision bf16 reaches the training step on both paths: results move, but only a little."""
    data = small_dataset(num_train=256, num_test=64)
    elbo = {}
    for precision in ("float32", "bf16"):
        cfg = tiny_config(epochs=1, precision=precision, fast_path=fast_path)
        elbo[precision] = fit(cfg, dataset=data).metrics[0]["train_elbo"]
    assert elbo["bf16"] != elbo["float32"]
    assert elbo["bf16"] == pytest.approx(elbo["float32"], rel=1e-2)
