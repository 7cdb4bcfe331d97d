"""The command line a user expects: a bare command lists what it can do, --version, --resume
from the run's own config, progress that fits where it goes, --quiet, and errors that name
flags on the command line and Python arguments in Python."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import small_dataset, tiny_config

import pyro_vae
from pyro_vae import CheckpointError, ConfigError, fit
from pyro_vae.app.cli import COMMANDS, for_the_command_line

TINY = ["--batch-size", "64", "--hidden-dims", "32", "--latent-dim", "3", "--train-limit", "256",
        "--no-figures"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True,
                          text=True, env=env, timeout=300)


def test_bare_command_lists_the_commands_and_version_prints():
    proc = run_cli()
    assert proc.returncode == 0
    for name, (help_text, _, _) in COMMANDS.items():
        assert f"  {name}" in proc.stdout and help_text in proc.stdout
    proc = run_cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"pyro-vae {pyro_vae.__version__}"


def test_resume_reads_the_saved_config_and_accepts_only_what_may_change(tmp_path, capsys):
    from pyro_vae.app.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--out", out, "--epochs", "1", "--latent-dim", "3", "--hidden-dims",
                 "32", "--train-limit", "256", "--batch-size", "64", "--no-figures"]) == 0
    # no flag repeated: the run's own config, a longer schedule
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--no-figures"]) == 0
    assert "epoch 2:" in capsys.readouterr().out
    # repeating a saved value is fine; changing it is refused, naming the flag and the value
    assert main(["train", "--out", out, "--resume", "--epochs", "2", "--latent-dim", "3",
                 "--no-figures"]) == 0
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--latent-dim", "50"]) == 2
    assert capsys.readouterr().err.strip() == (
        "pyro-vae: error: --latent-dim cannot change when resuming (the run has 3, "
        "--latent-dim asks for 50); drop it, or start a new run")


def test_progress_lines_in_a_log_and_quiet(tmp_path):
    # stderr is a pipe here, as in a log file or a cluster job: one line per epoch
    proc = run_cli("train", "--out", str(tmp_path / "a"), "--epochs", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    lines = [s for s in proc.stderr.splitlines() if s.startswith("pyro-vae: epoch ")]
    assert [s.split(":")[1].split()[-1] for s in lines] == ["1/2", "2/2"], proc.stderr
    assert "test ELBO" in lines[0] and " s" in lines[0]
    assert "No CUDA runtime" not in proc.stderr and "Warning" not in proc.stderr
    proc = run_cli("train", "--out", str(tmp_path / "b"), "--epochs", "2", "--quiet", *TINY)
    assert proc.returncode == 0 and proc.stderr == ""
    # a long evaluation reports progress with an ETA in a log (every 30 s; here a tiny one:
    # the line is checked through the Progress class itself)
    from pyro_vae.progress import Progress

    bar = Progress(100, "log-likelihood", "images", every=0.0)
    bar.update(25)
    assert bar.line().startswith("log-likelihood: 25/100 images,") and "ETA" in bar.line()


def test_progress_line_reaches_a_log_handler_from_python(caplog):
    with caplog.at_level("INFO", logger="pyro_vae.progress"):
        fit(tiny_config(epochs=2, progress=True), dataset=small_dataset(256, 64))
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["epoch 1/2", "epoch 2/2"]


def test_python_errors_name_arguments_and_cli_errors_name_flags(tmp_path):
    fit(tiny_config(epochs=1), tmp_path / "run", dataset=small_dataset(256, 64))
    with pytest.raises(CheckpointError, match=r"pass resume=True to continue it, "
                                              r"overwrite=True to replace it"):
        fit(tiny_config(epochs=1), tmp_path / "run", dataset=small_dataset(256, 64))
    with pytest.raises(ConfigError, match=r"resume=True and overwrite=True exclude"):
        fit(tiny_config(), tmp_path / "run", resume=True, overwrite=True)
    with pytest.raises(ConfigError, match=r"train.num_particles >= 2"):
        tiny_config(estimator="iwae", num_particles=1).validate()
    cfg = tiny_config()
    cfg.model.likelihood = "gaussian"
    with pytest.raises(ConfigError, match=r'data.binarize="none"'):
        cfg.validate()
    proc = run_cli("train", "--out", str(tmp_path / "run"), *TINY)
    assert proc.returncode == 2
    assert "pass --resume to continue it, --overwrite to replace it, or choose another --out" \
        in proc.stderr
    proc = run_cli("train", "--out", str(tmp_path / "g"), "--likelihood", "gaussian")
    assert proc.returncode == 2 and "use it with --binarize none" in proc.stderr
    proc = run_cli("evaluate", str(tmp_path / "run"), "--num-samples", "0")
    assert proc.returncode == 2 and "--num-samples must be a positive integer" in proc.stderr


@pytest.mark.parametrize("message, flags", [
    ("train.lr = 0.0 is invalid: must be > 0", "--lr 0.0 is invalid: must be > 0"),
    ("unknown prior 'x' (model.prior); choose", "unknown prior 'x' (--prior); choose"),
    ('use train.device="cpu" or "auto"', 'use --device cpu or "auto"'),
    ("set data.val_fraction, e.g. 0.1", "set --val-fraction, e.g. 0.1"),
    ("num_samples must be a positive integer", "--num-samples must be a positive integer"),
    ("the run num_samples.json", "the run num_samples.json"),  # not an argument: left alone
])
def test_python_names_become_flags(message, flags):
    assert for_the_command_line(message) == flags


def test_help_shows_the_new_options():
    text = run_cli("train", "--help").stdout
    for flag in ("--kl-warmup-epochs", "--beta", "--lr-schedule", "--early-stop-patience",
                 "--tensorboard", "--encoder", "--quiet", "--verbose", "--plugin"):
        assert flag in text, flag
    usage = Path(__file__).resolve().parents[1] / "docs" / "usage.md"
    assert "--kl-warmup-epochs" in usage.read_text()
