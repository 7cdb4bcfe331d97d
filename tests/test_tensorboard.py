"""--tensorboard: a run's scalars and images, read back with TensorBoard's own event reader; a
KL warm-up run killed and resumed equals the uninterrupted one, events included."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

FLAGS = ["--epochs", "20", "--kl-warmup-epochs", "10", "--train-limit", "512",
         "--batch-size", "64", "--hidden-dims", "32", "--latent-dim", "4", "--threads", "1",
         "--tensorboard", "--tensorboard-images-every", "5", "--no-figures", "--quiet"]


def _train(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", "--out", str(out),
                             *FLAGS, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [{k: v for k, v in json.loads(s).items() if k != "seconds"} for s in lines]


def _events(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("tb")
    straight = _train(base / "straight")
    assert straight.wait(timeout=600) == 0, straight.stderr.read()
    killed = _train(base / "killed")
    deadline = time.time() + 600
    while len(_metrics(base / "killed")) < 7 and time.time() < deadline:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)  # during the warm-up, no chance to save anything
    killed.wait()
    assert 7 <= len(_metrics(base / "killed")) < 20
    resumed = _train(base / "killed", "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()
    return base / "straight", base / "killed"


def test_warmup_run_resumes_exactly_after_a_kill(runs):
    straight, killed = runs
    assert _metrics(killed) == _metrics(straight)
    metrics = _metrics(straight)
    assert [m["kl_weight"] for m in metrics[:10]] == pytest.approx(
        [(e + 1) / 10 for e in range(10)])
    assert all(m["objective"] == "elbo" for m in metrics[10:])


def test_event_file_holds_the_scalars_and_images(runs):
    straight, _ = runs
    acc = _events(straight)
    tags = acc.Tags()
    for tag in ("elbo/test", "elbo/train", "objective/train", "elbo/reconstruction", "elbo/kl",
                "train/lr", "train/kl_weight", "train/skipped_steps", "train/loss",
                "train/grad_norm"):
        assert tag in tags["scalars"], tag
    assert {"samples", "reconstructions"} <= set(tags["images"])
    # the scalars are the numbers of metrics.jsonl, at the same steps
    metrics = _metrics(straight)
    test = {e.step: e.value for e in acc.Scalars("elbo/test")}
    for m in metrics:
        assert test[m["step"]] == pytest.approx(m["test_elbo"], rel=1e-6)
    weights = [e.value for e in acc.Scalars("train/kl_weight")]
    assert weights == pytest.approx([m["kl_weight"] for m in metrics])
    images = acc.Images("samples")
    assert [i.step for i in images] == [metrics[e - 1]["step"] for e in (1, 5, 10, 15, 20)]
    assert images[0].width > 200 and images[0].height > 200


def test_variance_command_writes_its_curves(tmp_path):
    out = tmp_path / "v"
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", "variance", "--out", str(out),
                           "--checkpoints", "0", "5", "--draws", "4", "--oracle-draws", "4",
                           "--measure-batch", "8", "--hidden-dims", "16", "--latent-dim", "2",
                           "--train-limit", "256", "--batch-size", "32", "--curve-steps", "20",
                           "--no-figures", "--tensorboard", "--quiet"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    acc = _events(out)
    tags = acc.Tags()["scalars"]
    assert "reference-d2-b8/encoder/variance_ratio/score" in tags
    assert [e.step for e in acc.Scalars("reference-d2-b8/encoder/snr/reparam")] == [0, 5]
    assert "curves/train_elbo/score" in tags
