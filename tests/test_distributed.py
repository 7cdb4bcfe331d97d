"""Data-parallel training under torchrun equals one process with the global batch (issue 6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from conftest import tiny_config

from pyro_vae import Config, fit, load_run
from pyro_vae.training.distributed import Workers

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

FLAGS = ["--dataset", "mnist-5k", "--train-limit", "1024", "--hidden-dims", "32",
         "--latent-dim", "4", "--no-progress", "--device", "cpu"]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "pyro_vae", "train", *args],
                          capture_output=True, text=True, timeout=240, env=env)


def _single_process(epochs: int):
    cfg = tiny_config(epochs=epochs, batch_size=256, device="cpu")
    cfg.data.dataset, cfg.data.train_limit = "mnist-5k", 1024
    cfg.model.hidden_dims, cfg.model.latent_dim = [32], 4
    return fit(cfg)


def test_two_processes_of_batch_128_equal_one_of_batch_256_and_resume(tmp_path):
    out = tmp_path / "ddp"
    proc = _torchrun("--out", str(out), "--batch-size", "128", "--epochs", "1", "--no-figures",
                     *FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Resume under torchrun to a longer schedule.
    proc = _torchrun("--out", str(out), "--batch-size", "128", "--epochs", "2", "--resume",
                     *FLAGS)
    assert proc.returncode == 0, proc.stderr[-3000:]

    torch.set_num_threads(1)
    single = _single_process(epochs=2)
    # Only rank 0 wrote: one metrics line per epoch, not one per process.
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert [m["step"] for m in metrics] == [4, 8]  # 1024 images / (2 x 128) per step
    for ours, theirs in zip(metrics, single.metrics):
        assert ours["test_elbo"] == pytest.approx(theirs["test_elbo"], abs=1e-3)
    assert (out / "samples.png").is_file()
    _, vae, _ = load_run(out)
    reference = dict(single.vae.named_parameters())
    moved = 0.0
    for name, p in vae.named_parameters():
        torch.testing.assert_close(p, reference[name], rtol=1e-4, atol=2e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
        moved = max(moved, float((p.detach() - _initial(name)).abs().max()))
    assert moved > 1e-3  # training moved the parameters: the comparison is not trivial


def _initial(name: str) -> torch.Tensor:
    from pyro_vae import VAE

    torch.manual_seed(0)
    cfg = Config()
    cfg.model.hidden_dims, cfg.model.latent_dim = [32], 4
    return dict(VAE.from_config(cfg, (1, 28, 28)).named_parameters())[name].detach()


def test_workers_shard_their_rows_of_the_global_batch():
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(Workers().shard(x), x)
    parts = [Workers(rank=r, world_size=3).shard(x) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert all(p.shape == (2, 2) for p in parts)


def test_an_estimator_without_differentiable_loss_is_refused_under_ddp(monkeypatch):
    """Pyro-path estimators need differentiable_loss for DDP; others get a clear error."""
    from dataclasses import replace

    from pyro_vae import ConfigError
    from pyro_vae.inference.estimators import ESTIMATORS
    from pyro_vae.training.trainer import Trainer

    class NoDifferentiableLoss:
        pass

    monkeypatch.setitem(ESTIMATORS, "graph-like", replace(
        ESTIMATORS["reparam"], name="graph-like", make_elbo=lambda cfg: NoDifferentiableLoss()))
    monkeypatch.setattr("pyro_vae.training.trainer.distributed.current",
                        lambda: Workers(rank=0, world_size=2))
    from conftest import small_dataset

    with pytest.raises(ConfigError, match="graph-like"):
        Trainer(tiny_config(estimator="graph-like").validate(), small_dataset())
