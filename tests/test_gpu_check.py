"""scripts/gpu_check.py: every step runs and is reported, and a missing GPU is one line."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_cpu_run_reports_every_step(tmp_path, capsys):
    gpu_check = _script()
    out = tmp_path / "gpu.json"
    code = gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == list(gpu_check.STEPS)
    for name, step in steps.items():
        assert step["result"] and step["seconds"] >= 0, name
    # the measurements must run here; the CUDA tests skip (or, on a GPU machine, run)
    for name in ("epoch-benchmark", "log-likelihood", "variance-lab"):
        assert steps[name]["ok"], (name, steps[name]["result"])
    tests = steps["cuda-tests"]
    assert re.search(r"\d+ (passed|skipped|failed|xfailed)", tests["result"]), tests["result"]
    if not torch.cuda.is_available():
        assert tests["ok"] and "skipped" in tests["result"]
        assert "needs a CUDA device" in tests["notes"]
    assert code == (0 if all(s["ok"] for s in steps.values()) else 1)
    assert report["device"] == "cpu" and report["quick"] and report["ok"] == (code == 0)

    bench = steps["epoch-benchmark"]["data"]
    assert bench["dataset"] == "mnist-5k" and bench["ratio_float32"] > 0
    assert set(bench["seconds_per_epoch"]) == {"pyro_vae-float32", "plain-float32"}
    loglik = steps["log-likelihood"]["data"]
    assert loglik["num_samples"] == 50 and loglik["images"] == 20 and loglik["mean"] < 0
    variance = steps["variance-lab"]["data"]
    assert variance["num_draws"] == 20 and variance["batch_size"] == 32
    assert variance["encoder_ratio_to_reparam"]["score"] > 1

    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert table[0] == "| step | result | seconds | notes |"
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(gpu_check.STEPS)


def test_cuda_without_a_gpu_is_one_line(monkeypatch, capsys):
    gpu_check = _script()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 2
    captured = capsys.readouterr()
    lines = (captured.out + captured.err).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_exits_2_from_the_command_line():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], lines
    assert "Traceback" not in proc.stderr
