import json
import subprocess
import sys

import pytest

from pyro_vae.app.cli import main

TINY = ["--hidden-dims", "32", "--latent-dim", "4", "--train-limit", "256", "--batch-size", "64",
        "--no-progress"]


def exit_code(argv):
    """main()'s return value, or the status argparse exits with."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], capture_output=True,
                          text=True, timeout=300)


def test_train_end_to_end_from_the_command_line(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--out", str(out), "--epochs", "2", *TINY)
    assert proc.returncode == 0, proc.stderr
    metrics = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert all(m["test_elbo"] < 0 and m["seconds"] > 0 for m in metrics)
    assert (out / "samples.png").stat().st_size > 1000
    assert 'latent_dim = 4' in (out / "config.toml").read_text()
    # resume to a longer schedule continues from epoch 3
    proc = run_cli("train", "--out", str(out), "--epochs", "3", "--resume", *TINY)
    assert proc.returncode == 0, proc.stderr
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    # the other commands read the run, with train's spelling of the precision
    proc = run_cli("evaluate", str(out), "--num-samples", "4", "--limit", "16", "--precision",
                   "bf16")
    assert proc.returncode == 0, proc.stderr
    assert "log_likelihood" in json.loads((out / "evaluation.json").read_text())


@pytest.mark.parametrize("args, needle", [
    (["--lr", "-1"], "--lr -1.0 is invalid: must be > 0"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10'"),
    (["--likelihood", "poisson"], "unknown likelihood 'poisson'"),
    (["--epochs", "three"], "argument --epochs: invalid int value: 'three'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent/folder/mnist"], "does not exist"),
    (["--config", "/nonexistent.toml"], "config file not found"),
    (["--likelihood", "continuous-bernoulli"], "use it with --binarize none"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    code = exit_code(["train", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()  # nothing written


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    # in this process: test_train_end_to_end_from_the_command_line runs the real executable
    out = tmp_path / "run"
    assert exit_code(["train", "--out", str(out), "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert exit_code(["train", "--out", str(out), "--epochs", "1", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds another run" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code = exit_code(["train", "--out", str(out), "--epochs", "1", "--lr", "0.01", "--resume",
                      *TINY])
    assert code == 2 and "--lr cannot change when resuming" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
