"""On a CUDA device pyro_vae computes the same numbers as on the CPU. Skipped without one.

``scripts/gpu_check.py`` runs this file by path (step "cuda-tests"). Every test is tiny.

Set ``PYRO_VAE_TEST_DEVICE=cpu`` to run the same code with the CPU standing in for the GPU
(a check of the tests themselves on a machine without CUDA; it compares the CPU with itself).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from conftest import small_dataset, tiny_config

import pyro_vae
from pyro_vae import VAE, elbo_per_image, importance_log_likelihood, measure_gradient_variance
from pyro_vae.errors import ConfigError
from pyro_vae.inference.accelerators import FastELBO
from pyro_vae.metrics import loglik
from pyro_vae.training.trainer import Trainer

DEVICE = os.environ.get("PYRO_VAE_TEST_DEVICE", "cuda")
IMAGE_SHAPE = (1, 28, 28)

pytestmark = pytest.mark.skipif(
    DEVICE == "cuda" and not torch.cuda.is_available(),
    reason="needs a CUDA device (torch.cuda.is_available() is False)")


@pytest.fixture(autouse=True)
def _full_float32_products():
    """TF32 products would differ from the CPU's by 1e-3 relative; compare true float32."""
    if DEVICE != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _pair(cfg=None) -> tuple[VAE, VAE]:
    """The same freshly initialised VAE (784-64-8) on the CPU and on the device."""
    cfg = cfg or tiny_config()
    torch.manual_seed(0)
    cpu = VAE.from_config(cfg, IMAGE_SHAPE)
    dev = VAE.from_config(cfg, IMAGE_SHAPE)
    dev.load_state_dict(cpu.state_dict())
    return cpu, dev.to(DEVICE)


def _binary(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    grey = small_dataset(num_train=n, num_test=1, seed=seed).train.images
    return (torch.rand(grey.shape, generator=g) < grey).float()


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-4, what: str = "") -> None:
    got = got.detach().float().cpu()
    want = want.detach().float()
    scale = float(want.abs().max()) + 1e-12
    torch.testing.assert_close(got, want, rtol=rtol, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def test_networks_give_the_same_distributions():
    cpu, dev = _pair()
    x = _binary(16)
    z = torch.randn(16, 8)
    with torch.no_grad():
        q_cpu, q_dev = cpu.encoder(x), dev.encoder(x.to(DEVICE))
        _close(q_dev.base_dist.loc, q_cpu.base_dist.loc, what="encoder loc")
        _close(q_dev.base_dist.scale, q_cpu.base_dist.scale, what="encoder scale")
        _close(dev.decoder(z.to(DEVICE)).log_prob(x.to(DEVICE)), cpu.decoder(z).log_prob(x),
               rtol=1e-5, what="decoder log p(x|z)")
        _close(dev.prior().log_prob(z.to(DEVICE)), cpu.prior().log_prob(z), what="log p(z)")


def test_training_loss_and_gradients_agree_for_the_same_noise():
    cpu, dev = _pair()
    x = _binary(32)
    eps = torch.randn(32, 8)
    results = []
    for vae, device in ((cpu, "cpu"), (dev, DEVICE)):
        fast = FastELBO(vae, num_data=1000)
        fast._noise = lambda loc: eps.to(loc.device, loc.dtype)  # the same draws on both
        vae.zero_grad(set_to_none=True)
        loss = fast(x.to(device))
        loss.backward()
        results.append((loss, {k: p.grad for k, p in vae.named_parameters()
                               if p.grad is not None}))
    (loss_cpu, grads_cpu), (loss_dev, grads_dev) = results
    assert math.isfinite(float(loss_cpu.detach()))
    _close(loss_dev, loss_cpu, rtol=1e-5, what="loss")
    assert set(grads_dev) == set(grads_cpu) and grads_cpu
    for name, g in grads_cpu.items():
        _close(grads_dev[name], g, rtol=1e-3, what=f"gradient of {name}")


def test_trainer_takes_the_same_paths_on_the_device():
    data = small_dataset()
    paths = {}
    for device in ("cpu", DEVICE):
        trainer = Trainer(tiny_config(device=device).validate(), data)
        assert trainer.device.type == torch.device(device).type
        paths[device] = [(p.computation, p.path) for p in trainer.paths]
        x = trainer.dataset.train.images[:64]
        loss = trainer.step((torch.rand_like(x) < x).float())
        assert loss is not None and math.isfinite(loss)
    assert paths[DEVICE] == paths["cpu"]


@pytest.mark.parametrize("precision", ["float32", "bf16"])
def test_fit_on_the_device_trains(precision):
    cfg = tiny_config(epochs=1, device=DEVICE, precision=precision)
    result = pyro_vae.fit(cfg, dataset=small_dataset())
    assert {p.device.type for p in result.vae.parameters()} == {torch.device(DEVICE).type}
    assert math.isfinite(result.metrics[-1]["test_elbo"])


def test_checkpoint_of_a_device_run_loads_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    result = pyro_vae.fit(tiny_config(epochs=1, device=DEVICE), run, dataset=small_dataset())
    _, vae, _ = pyro_vae.load_run(run, device="cpu")
    assert {p.device.type for p in vae.parameters()} == {"cpu"}
    trained = result.vae.state_dict()
    for name, value in vae.state_dict().items():
        assert torch.equal(value, trained[name].cpu()), name
    x = result.dataset.test.images[:16].cpu()
    with torch.no_grad():
        _close(vae.encoder(x).base_dist.loc, result.vae.encoder(x.to(DEVICE)).base_dist.loc.cpu(),
               what="encoder loc, loaded on the CPU vs trained on the device")
    assert math.isfinite(elbo_per_image(vae, x))


def test_checkpoint_of_a_device_run_loads_where_cuda_is_missing(tmp_path, monkeypatch):
    run = tmp_path / "run"
    pyro_vae.fit(tiny_config(epochs=1, device=DEVICE), run, dataset=small_dataset())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        _, vae, _ = pyro_vae.load_run(run, device="cpu")
    except ConfigError as e:
        if "no CUDA device" in str(e):
            pytest.xfail(f"known: load_run validates the saved train.device ({e})")
        raise
    assert {p.device.type for p in vae.parameters()} == {"cpu"}


def test_importance_log_likelihood_is_the_same_for_the_same_noise(monkeypatch):
    cpu, dev = _pair()
    x = _binary(6)
    want = importance_log_likelihood(cpu, x, num_samples=300, seed=0)
    # the noise of the CPU, moved to the device (each device has its own generator)
    cpu_noise = loglik._image_noise

    def noise(*args):
        *head, device, dtype = args
        return cpu_noise(*head, torch.device("cpu"), dtype).to(device)

    monkeypatch.setattr(loglik, "_image_noise", noise)
    got = importance_log_likelihood(dev, x.to(DEVICE), num_samples=300, seed=0)
    assert got.path.path == want.path.path
    assert got.estimate.device.type == torch.device(DEVICE).type
    _close(got.estimate, want.estimate, rtol=1e-5, what="log p(x)")
    _close(got.stderr, want.stderr, rtol=1e-3, what="standard error")


def test_importance_log_likelihood_agrees_with_the_cpu_within_monte_carlo_error():
    cpu, dev = _pair()
    x = _binary(8)
    # The devices' noise generators differ (and so do the seeds, on purpose): the estimates
    # agree within their Monte Carlo errors, not exactly. The weights of this untrained model
    # are heavy-tailed, so the delta-method errors run small: allow 8 of them.
    a = importance_log_likelihood(cpu, x, num_samples=1000, seed=0)
    b = importance_log_likelihood(dev, x.to(DEVICE), num_samples=1000, seed=1)
    assert torch.isfinite(b.estimate).all() and torch.isfinite(b.stderr).all()
    err = math.hypot(a.mc_stderr(), b.mc_stderr())
    assert abs(a.mean() - b.mean()) <= 8 * err + 0.1, (a.mean(), b.mean(), err)
    # the estimate lies above the ELBO, as it must on average
    assert b.mean() > elbo_per_image(dev, x.to(DEVICE), num_particles=10) - 1.0


def test_gradient_variance_runs_on_the_device():
    cpu, dev = _pair()
    x = _binary(16)
    kwargs = dict(num_draws=8, oracle_draws=8, num_bootstrap=20, chunk_size=4)
    names = ["reparam", "score", "score-avg-baseline"]
    want = measure_gradient_variance(cpu, x, names, **kwargs)
    try:
        got = measure_gradient_variance(dev, x.to(DEVICE), names, **kwargs)
    except RuntimeError as e:
        if "must be on the same device" in str(e):
            pytest.xfail(f"known: the lab's bootstrap intervals need CPU tensors ({e})")
        raise
    for name in names:
        stats = got["estimators"][name]
        assert stats["path"] == want["estimators"][name]["path"], name
        for group in ("encoder", "decoder"):
            trace = stats["groups"][group]["trace"]
            assert math.isfinite(trace) and trace > 0, (name, group, trace)
    assert got["estimators"]["score"]["groups"]["encoder"]["ratio_to_reparam"] > 1
    assert {p.device.type for p in dev.parameters()} == {torch.device(DEVICE).type}
