"""Bring your own pieces: plugins from the CLI and Python, what a run records of its parts, and
the refusals that keep a run from being loaded into the wrong classes or without its plugin."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import small_dataset, tiny_config

import pyro_vae
from pyro_vae import VAE, CheckpointError, Config, ConfigError, fit, load_run
from pyro_vae.models.encoders import DiagonalNormal
from pyro_vae.models.networks import Encoder

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples"
TINY = ["--epochs", "1", "--batch-size", "64", "--hidden-dims", "32", "--latent-dim", "3",
        "--no-progress", "--train-limit", "256", "--no-figures"]


def run_cli(*args: str, plugin_path: bool = True) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(EXAMPLES) if plugin_path else "", "OMP_NUM_THREADS": "1",
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory) -> Path:
    """A run trained from the CLI with the full-covariance guide of the docs' plugin."""
    out = tmp_path_factory.mktemp("plugin") / "run"
    proc = run_cli("--plugin", "full_covariance", "train", "--out", str(out), "--encoder",
                   "full-covariance", "--verbose", *TINY)
    assert proc.returncode == 0, proc.stderr
    # --verbose prints the path the training loss took, and why
    assert "path: training loss: generic" in proc.stderr
    assert "MultivariateNormal" in proc.stderr
    return out


def test_plugin_run_records_its_plugin_and_parts(plugin_run):
    cfg = Config.load(plugin_run / "config.toml")
    assert cfg.model.encoder == "full-covariance"
    assert cfg.run.plugins == ["full_covariance"]
    assert cfg.run.guide_family_class == "full_covariance.FullCovarianceNormal"
    events = (plugin_run / "events.jsonl").read_text()
    assert '"event": "path"' in events and "MultivariateNormal" in events


@pytest.mark.parametrize("command", [["evaluate", "--num-samples", "4", "--limit", "4"],
                                     ["sample", "--num-images", "4"],
                                     ["score", "--num-samples", "4", "--limit", "4"]])
def test_commands_refuse_a_run_whose_plugin_is_not_loaded(plugin_run, command, tmp_path):
    # the plugin is importable (on PYTHONPATH), but it is never imported on a run folder's word
    proc = run_cli(command[0], str(plugin_run), *command[1:], "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "needs plugin full_covariance" in proc.stderr and "--plugin" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_variance_runs_and_resume_refuse_without_the_plugin(plugin_run, tmp_path):
    proc = run_cli("variance", "--out", str(tmp_path / "v"), "--runs", str(plugin_run),
                   "--draws", "2", "--oracle-draws", "2", "--measure-batch", "8")
    assert proc.returncode == 2 and "needs plugin full_covariance" in proc.stderr
    proc = run_cli("train", "--out", str(plugin_run), "--resume", *TINY)
    assert proc.returncode == 2 and "needs plugin full_covariance" in proc.stderr


def test_commands_work_with_the_plugin_loaded(plugin_run, tmp_path):
    out = tmp_path / "ev.json"
    proc = run_cli("--plugin", "full_covariance", "evaluate", str(plugin_run), "--num-samples",
                   "8", "--limit", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    import json

    result = json.loads(out.read_text())
    assert result["paths"][0]["path"] == "generic"
    assert "MultivariateNormal" in result["paths"][0]["reason"]
    proc = run_cli("--plugin", "full_covariance", "train", "--out", str(plugin_run), "--resume",
                   "--encoder", "full-covariance", *TINY[:-1], "--epochs", "2", "--no-figures")
    assert proc.returncode == 0, proc.stderr


def test_unknown_plugin_and_unknown_name_are_one_line_errors(tmp_path):
    proc = run_cli("--plugin", "no_such_module_xyz", "train", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "plugin 'no_such_module_xyz' not found" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_cli("train", "--out", str(tmp_path / "r"), "--encoder", "full-covariance", *TINY)
    assert proc.returncode == 2 and "unknown encoder 'full-covariance'" in proc.stderr
    assert "--plugin" in proc.stderr and not (tmp_path / "r").exists()


def test_a_broken_plugin_is_a_one_line_error(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    env_path = f"{tmp_path}"
    proc = subprocess.run([sys.executable, "-m", "pyro_vae", "--plugin", "broken_plugin",
                           "train", "--out", str(tmp_path / "r")], capture_output=True,
                          text=True, env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert proc.returncode == 2
    assert "plugin 'broken_plugin' failed to import: RuntimeError: boom" in proc.stderr


class _ShiftedEncoder(Encoder):
    """A user's own encoder class: same weights as the stock one, another class."""


def _custom_vae(cfg: Config) -> VAE:
    vae = VAE.from_config(cfg, (1, 28, 28))
    vae.encoder.__class__ = _ShiftedEncoder
    return vae


def test_fit_takes_a_user_built_vae_and_load_run_refuses_the_wrong_class(tmp_path):
    cfg = tiny_config(epochs=1).validate()
    vae = _custom_vae(cfg)
    result = fit(cfg, tmp_path / "run", dataset=small_dataset(256, 64), vae=vae)
    assert result.vae is vae  # trained in place
    assert Config.load(tmp_path / "run" / "config.toml").run.encoder_class.endswith(
        "_ShiftedEncoder")
    with pytest.raises(CheckpointError, match="_ShiftedEncoder"):
        load_run(tmp_path / "run")  # the config would build the stock Encoder
    _, loaded, _ = load_run(tmp_path / "run", vae=_custom_vae(tiny_config()))
    for p, q in zip(loaded.parameters(), vae.parameters(), strict=True):
        assert torch.equal(p, q)
    with pytest.raises(CheckpointError, match="_ShiftedEncoder"):
        fit(tiny_config(epochs=2), tmp_path / "run", resume=True,
            dataset=small_dataset(256, 64))


def test_python_plugin_registration_records_its_source():
    sys.path.insert(0, str(EXAMPLES))
    try:
        pyro_vae.load_plugin("full_covariance")
    finally:
        sys.path.remove(str(EXAMPLES))
    assert pyro_vae.ENCODERS.source("full-covariance") == "full_covariance"
    assert pyro_vae.ENCODERS.source("diagonal-normal") is None
    assert "full_covariance" in pyro_vae.loaded_plugins()
    family = pyro_vae.ENCODERS["full-covariance"](3)
    q = family(torch.randn(5, family.num_features))
    assert q.event_shape == (3,) and q.batch_shape == (5,)
    assert isinstance(DiagonalNormal(3)(torch.randn(5, 6)).base_dist, torch.distributions.Normal)


def test_bad_registry_names_are_refused():
    with pytest.raises(ConfigError, match="non-empty string"):
        pyro_vae.PRIORS[""] = object
