"""The fault suite (issue 7): bad input, numerical faults, crashes and hostile files.

Every bad input must end in one line on stderr, exit status 2 and an untouched file system;
a non-finite step must be skipped and logged; a killed run must resume to exactly the result of
an uninterrupted one; a checkpoint that would run code must be refused. docs/reliability.md
lists the same faults with what the user sees.
"""

from __future__ import annotations

import errno
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import (
    ESTIMATORS,
    PRIORS,
    CheckpointError,
    Config,
    DataError,
    Dataset,
    OutputError,
    Split,
    TrainingError,
    fit,
    load_run,
)
from pyro_vae.app.cli import COMMANDS, main
from pyro_vae.config import DataConfig
from pyro_vae.data import DATASETS, load_dataset, write_idx
from pyro_vae.registry import LIKELIHOODS
from pyro_vae.training.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint
from pyro_vae.training.trainer import Trainer

# Pyro warns on every NaN it meets; here NaNs are provoked on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Encountered NaN")

NUM_TRAIN, NUM_TEST = 300, 100
#: Flags of a run that takes a fraction of a second per epoch.
TINY = ["--hidden-dims", "16", "--latent-dim", "2", "--batch-size", "50", "--epochs", "1",
        "--no-progress", "--no-figures"]


# -- helpers --------------------------------------------------------------------------------------
#: The estimators that apply to a continuous code (the discrete-only ones: tests/test_discrete.py)
CONTINUOUS = [n for n in sorted(ESTIMATORS) if ESTIMATORS[n].applies_to(discrete=False)]

def cli(capsys, *argv) -> tuple[int, str]:
    """Run ``pyro-vae`` in this process; return (exit status, stderr)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


def assert_refused(code: int, err: str, *needles: str) -> None:
    """Exit status 2 and exactly one line naming the problem: no traceback."""
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and re.match(r"pyro-vae( train)?: error: ", lines[0]), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (empty if the folder does not exist)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def write_split(folder: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
    write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)


def as_uint8(split: Split, n: int) -> tuple[np.ndarray, np.ndarray]:
    images = (split.images[:n] * 255).round().to(torch.uint8).reshape(n, 28, 28).numpy()
    return images, split.labels[:n].numpy().astype(np.uint8)


@pytest.fixture(scope="module")
def digits(mnist5k_grey) -> dict[str, np.ndarray]:
    """Real MNIST digits as uint8 arrays: 1,000 train and 200 test images."""
    train_x, train_y = as_uint8(mnist5k_grey.train, 1000)
    test_x, test_y = as_uint8(mnist5k_grey.test, 200)
    return {"train_x": train_x, "train_y": train_y, "test_x": test_x, "test_y": test_y}


def idx_folder(root: Path, digits: dict[str, np.ndarray], num_train: int = NUM_TRAIN,
               num_test: int = NUM_TEST) -> Path:
    """A folder of gzipped IDX files holding real digits, as ``--data-dir`` expects."""
    write_split(root, "train", digits["train_x"][:num_train], digits["train_y"][:num_train])
    write_split(root, "t10k", digits["test_x"][:num_test], digits["test_y"][:num_test])
    return root


@pytest.fixture
def data_dir(tmp_path, digits) -> Path:
    return idx_folder(tmp_path / "idx", digits)


def one_epoch_run(root: Path, digits: dict[str, np.ndarray]) -> tuple[Path, Path]:
    """(run folder, data folder) of a one-epoch run trained in ``root``."""
    data = idx_folder(root / "idx", digits)
    run = root / "run"
    assert main(["train", "--out", str(run), "--dataset", "mnist", "--data-dir", str(data),
                 *TINY]) == 0
    return run, data


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, digits) -> tuple[Path, Path]:
    """(run folder, data folder) of a finished one-epoch run; copy it before changing it."""
    return one_epoch_run(tmp_path_factory.mktemp("finished"), digits)


@pytest.fixture
def run_copy(tmp_path, finished_run) -> tuple[Path, list[str]]:
    """A private copy of the finished run and the flags that made it."""
    run, data = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy, ["--dataset", "mnist", "--data-dir", str(data), *TINY]


def params_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def last_linear(module: torch.nn.Module) -> torch.nn.Linear:
    return [m for m in module.modules() if isinstance(m, torch.nn.Linear)][-1]


def poison_gradients(trainer: Trainer, bad_steps: set[int] | None = None,
                     from_step: int | None = None) -> None:
    """Make the decoder's output-layer gradient inf on chosen steps (1-based).

    A tensor hook fires whatever computes the loss (Pyro, a fast path, DDP), so the fault
    reaches the trainer exactly the way an overflowing gradient would.
    """
    weight = last_linear(trainer.vae.decoder).weight

    def hook(grad: torch.Tensor) -> torch.Tensor:
        step = trainer.global_step + 1
        if (bad_steps and step in bad_steps) or (from_step is not None and step >= from_step):
            return torch.full_like(grad, math.inf)
        return grad

    weight.register_hook(hook)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _faults(path: Path) -> list[dict]:
    """The events of skipped steps (a run's events also record its computation paths)."""
    return [e for e in read_jsonl(path) if e["event"] != "path"]


# -- bad input: data -----------------------------------------------------------------------------
def _missing_folder(tmp, d):
    return ["--dataset", "mnist", "--data-dir", tmp / "no-such-folder"], ["does not exist"]


def _no_images(tmp, d):  # valid IDX files that hold zero images
    folder = tmp / "idx"
    write_split(folder, "train", d["train_x"][:0], d["train_y"][:0])
    write_split(folder, "t10k", d["test_x"][:NUM_TEST], d["test_y"][:NUM_TEST])
    return ["--dataset", "mnist", "--data-dir", folder], ["the train split holds no images"]


def _data_dir_is_a_file(tmp, d):
    (tmp / "afile").write_text("not a folder")
    return ["--dataset", "mnist", "--data-dir", tmp / "afile"], ["is a file"]


def _wrong_magic(tmp, d):
    folder = idx_folder(tmp / "idx", d)
    path = folder / "train-images-idx3-ubyte.gz"
    raw = bytearray(__import__("gzip").decompress(path.read_bytes()))
    raw[0:2] = b"\x12\x34"
    path.write_bytes(bytes(raw))
    return ["--dataset", "mnist", "--data-dir", folder], ["wrong magic number", "1234"]


def _truncated(tmp, d):
    folder = idx_folder(tmp / "idx", d)
    path = folder / "t10k-images-idx3-ubyte.gz"
    raw = __import__("gzip").decompress(path.read_bytes())
    path.unlink()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) - 500])
    return ["--dataset", "mnist", "--data-dir", folder], ["truncated", "t10k-images"]


def _corrupt_gzip(tmp, d):
    folder = idx_folder(tmp / "idx", d)
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:30])
    return ["--dataset", "mnist", "--data-dir", folder], ["corrupt gzip"]


def _count_mismatch(tmp, d):
    folder = idx_folder(tmp / "idx", d)
    write_idx(folder / "train-labels-idx1-ubyte.gz", d["train_y"][: NUM_TRAIN - 1])
    return (["--dataset", "mnist", "--data-dir", folder],
            [f"{NUM_TRAIN} train images but {NUM_TRAIN - 1} labels"])


def _float_images(tmp, d, values):
    folder = idx_folder(tmp / "idx", d)
    write_idx(folder / "train-images-idx3-ubyte.gz", values(d["train_x"][:NUM_TRAIN]))
    return folder


def _out_of_range(tmp, d):  # 0..255 stored as floats: not divided by 255 by the loader
    folder = _float_images(tmp, d, lambda x: x.astype(np.float32))
    return (["--dataset", "mnist", "--data-dir", folder],
            ["pixel values span [0, 255]", "bernoulli", "rescale", "binarize"])


def _nan_pixels(tmp, d):
    def poison(x):
        x = x.astype(np.float32) / 255
        x[7, 3, 3] = np.nan
        return x
    folder = _float_images(tmp, d, poison)
    return ["--dataset", "mnist", "--data-dir", folder], ["NaN or inf", "1 of 300"]


def _inf_pixels(tmp, d):
    def poison(x):
        x = x.astype(np.float32) / 255
        x[0, 0, 0] = np.inf
        return x
    folder = _float_images(tmp, d, poison)
    return ["--dataset", "mnist", "--data-dir", folder], ["NaN or inf"]


def _conv_wrong_size(tmp, d):  # 30 x 30 images cannot go through two stride-2 convolutions
    folder = tmp / "idx"
    pad = lambda x: np.pad(x, ((0, 0), (1, 1), (1, 1)))  # noqa: E731
    write_split(folder, "train", pad(d["train_x"][:NUM_TRAIN]), d["train_y"][:NUM_TRAIN])
    write_split(folder, "t10k", pad(d["test_x"][:NUM_TEST]), d["test_y"][:NUM_TEST])
    return ["--dataset", "mnist", "--data-dir", folder, "--arch", "conv"], ["30x30"]


def _train_test_sizes_differ(tmp, d):
    folder = idx_folder(tmp / "idx", d)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", d["test_x"][:NUM_TEST, :20, :20])
    return ["--dataset", "mnist", "--data-dir", folder], ["(28, 28)", "(20, 20)"]


@pytest.mark.parametrize("make", [
    _missing_folder, _no_images, _data_dir_is_a_file, _wrong_magic, _truncated, _corrupt_gzip,
    _count_mismatch, _out_of_range,
    _nan_pixels, _inf_pixels, _conv_wrong_size, _train_test_sizes_differ,
], ids=lambda f: f.__name__.strip("_"))
def test_bad_data_is_refused_before_anything_is_written(tmp_path, capsys, digits, make):
    argv, needles = make(tmp_path, digits)
    before = snapshot(tmp_path)
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", out, *TINY, *argv)
    assert_refused(code, err, *needles)
    assert snapshot(tmp_path) == before and not out.exists()
    assert not (tmp_path / "no-such-folder").exists()  # a typo never starts a download


@pytest.mark.parametrize("change, needles", [
    (lambda x: x * 255, ["pixel values span [0, 255]", "rescale", "binarize"]),
    (lambda x: x - 0.5, ["pixel values span [-0.5, 0.5]"]),
    (lambda x: x.index_fill(0, torch.tensor([3]), math.nan), ["NaN or inf", "1 of"]),
    (lambda x: x[:, :700], ["shape (300, 700)", "expected (N, 784)"]),
], ids=["0-255", "negative", "nan", "wrong-width"])
def test_bad_dataset_objects_are_refused_by_the_api(mnist5k_grey, change, needles):
    train = Split(change(mnist5k_grey.train.images[:NUM_TRAIN]),
                  mnist5k_grey.train.labels[:NUM_TRAIN])
    dataset = Dataset("custom", (1, 28, 28), train, mnist5k_grey.test)
    with pytest.raises(DataError) as info:
        fit(tiny_cfg(), dataset=dataset)
    for needle in needles:
        assert needle in str(info.value)


@pytest.mark.parametrize("dtype, needles", [
    (torch.float64, ["dtype float64", "images.float()"]),
    (torch.uint8, ["dtype uint8", "images.float() / 255"]),
    (torch.bool, ["dtype bool", "images.float()"]),
], ids=["float64", "uint8", "bool"])
def test_images_of_the_wrong_dtype_are_refused_before_anything_is_written(tmp_path, mnist5k_grey,
                                                                          dtype, needles):
    images = mnist5k_grey.train.images[:NUM_TRAIN]
    images = (images * 255).to(dtype) if dtype == torch.uint8 else images.to(dtype)
    dataset = Dataset("custom", (1, 28, 28), Split(images, mnist5k_grey.train.labels[:NUM_TRAIN]),
                      mnist5k_grey.test)
    with pytest.raises(DataError) as info:
        fit(tiny_cfg(), tmp_path / "run", dataset=dataset)
    for needle in needles:
        assert needle in str(info.value)
    assert not (tmp_path / "run").exists()  # a rerun with fixed images is not refused
    fixed = Dataset("custom", (1, 28, 28), Split(mnist5k_grey.train.images[:NUM_TRAIN],
                                                 mnist5k_grey.train.labels[:NUM_TRAIN].float()),
                    mnist5k_grey.test)
    with pytest.raises(DataError, match="train labels have dtype float32"):
        fit(tiny_cfg(), tmp_path / "run", dataset=fixed)


def tiny_cfg(**train) -> Config:
    cfg = Config()
    cfg.model.hidden_dims, cfg.model.latent_dim = [16], 2
    cfg.train.batch_size, cfg.train.epochs, cfg.train.progress = 50, 1, False
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


# -- bad input: configuration ----------------------------------------------------------------------
@pytest.mark.parametrize("argv, needles", [
    (["--latent-dim", "0"], ["--latent-dim 0 is invalid", "> 0"]),
    (["--latent-dim", "-3"], ["--latent-dim -3 is invalid"]),
    (["--hidden-dims", "64", "0"], ["--hidden-dims [64, 0]", "positive"]),
    (["--batch-size", "0"], ["--batch-size 0 is invalid"]),
    (["--epochs", "-1"], ["--epochs -1 is invalid"]),
    (["--num-particles", "-1"], ["--num-particles -1 is invalid", ">= 0"]),
    (["--lr", "0"], ["--lr 0.0 is invalid", "> 0"]),
    (["--lr", "-0.001"], ["--lr -0.001 is invalid"]),
    (["--lr", "nan"], ["--lr must be a finite number", "nan"]),
    (["--grad-clip", "-1"], ["--grad-clip -1.0 is invalid", ">= 0"]),
    (["--max-bad-steps", "0"], ["--max-bad-steps 0 is invalid"]),
    (["--val-fraction", "1.0"], ["--val-fraction 1.0 is invalid"]),
    (["--epochs", "three"], ["--epochs", "'three'"]),
    (["--dataset", "cifar10"], ["unknown dataset 'cifar10'", *DATASETS]),
    (["--estimator", "magic"], ["unknown estimator 'magic'", *ESTIMATORS]),
    (["--prior", "uniform"], ["unknown prior 'uniform'", *PRIORS]),
    (["--likelihood", "poisson"], ["unknown likelihood 'poisson'", *LIKELIHOODS]),
    (["--likelihood", "continuous-bernoulli"], ["continuous-bernoulli", "--binarize none"]),
    (["--dataset", "mnist-5k", "--data-dir", "/tmp"], ["--data-dir does not apply"]),
    (["--resume", "--overwrite"], ["--resume and --overwrite exclude each other"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("--") else None)
def test_bad_config_values_are_refused(tmp_path, capsys, argv, needles):
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", out, *TINY, *argv)
    assert_refused(code, err, *needles)
    assert not out.exists()


def test_estimator_needing_a_closed_form_kl_refuses_other_priors(tmp_path, capsys):
    needs_kl = [n for n, e in ESTIMATORS.items() if e.needs_closed_form_kl]
    no_kl = [n for n, p in PRIORS.items() if not p.closed_form_kl]
    if not needs_kl or not no_kl:
        pytest.skip("no estimator/prior pair with this incompatibility is registered")
    code, err = cli(capsys, "train", "--out", tmp_path / "run", *TINY,
                    "--estimator", needs_kl[0], "--prior", no_kl[0])
    assert_refused(code, err, needs_kl[0], no_kl[0], "closed-form KL")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", CONTINUOUS)
def test_batch_larger_than_the_dataset_is_refused_for_every_estimator(tmp_path, capsys,
                                                                      data_dir, name):
    # Full-batch baselines (Pyro's decaying average keeps one slot per batch position) and
    # the dropped last partial batch both need at least one full batch.
    particles = str(getattr(ESTIMATORS[name], "min_particles", 1))
    out = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", out, "--dataset", "mnist", "--data-dir", data_dir,
                    *TINY, "--estimator", name, "--num-particles", particles,
                    "--batch-size", NUM_TRAIN + 1)
    assert_refused(code, err, f"--batch-size {NUM_TRAIN + 1} is larger",
                   f"{NUM_TRAIN} training images")
    assert not out.exists()


@pytest.mark.parametrize("text, needles", [
    ("[train]\nlearning_rate = 0.1\n", ["unknown config key train.learning_rate", "lr"]),
    ("[optimizer]\nlr = 0.1\n", ["unknown config section [optimizer]"]),
    ("[train]\nlr = \"fast\"\n", ["train.lr must be of type float", "'fast'"]),
    ("[train]\nepochs = 1.5\n", ["train.epochs must be of type int"]),
    ("[train]\nprogress = \"yes\"\n", ["train.progress must be of type bool"]),
    ("[model]\nhidden_dims = 400\n", ["model.hidden_dims must be of type list"]),
    ("[model]\nhidden_dims = [400, true]\n", ["model.hidden_dims must be of type list"]),
    ("[train]\nlr = inf\n", ["train.lr must be a finite number"]),
    ("[train]\nlr = -1e-3\n", ["--lr -0.001 is invalid"]),
    ("train = 3\n", ["config section [train] must be a table"]),
    ("[train\nlr = 0.1\n", ["is not valid TOML"]),
], ids=["unknown-key", "unknown-section", "str-for-float", "float-for-int", "str-for-bool",
        "int-for-list", "bool-in-list", "inf", "negative", "not-a-table", "bad-syntax"])
def test_bad_config_files_are_refused(tmp_path, capsys, text, needles):
    path = tmp_path / "run.toml"
    path.write_text(text)
    code, err = cli(capsys, "train", "--out", tmp_path / "run", "--config", path, *TINY)
    assert_refused(code, err, *needles)
    assert not (tmp_path / "run").exists()


def test_a_binary_file_or_a_folder_as_config_is_one_line(tmp_path, capsys):
    binary = tmp_path / "photo.toml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[train]\n# caf\u00e9\n".encode("latin-1"))
    for path, needles in ((binary, ["is not UTF-8 text", "byte 0 is 0x89"]),
                          (latin1, ["is not UTF-8 text", "0xe9"]),
                          (tmp_path, ["is a folder", "pass a TOML file"])):
        code, err = cli(capsys, "train", "--out", tmp_path / "run", "--config", path, *TINY)
        assert_refused(code, err, str(path), *needles)
    assert not (tmp_path / "run").exists()


def test_config_files_are_parsed_as_data_never_run(tmp_path, capsys):
    marker = tmp_path / "pwned"
    code_text = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for text in (f"[train]\nlr = {code_text}\n", f"[data]\ndataset = \"{code_text}\"\n"):
        path = tmp_path / "evil.toml"
        path.write_text(text)
        code, err = cli(capsys, "train", "--out", tmp_path / "run", "--config", path, *TINY)
        assert code == 2 and ("not valid TOML" in err or "unknown dataset" in err), err
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- bad input: run folders ------------------------------------------------------------------------
def test_output_folder_with_another_run_is_refused_unless_overwrite(capsys, run_copy):
    run, flags = run_copy
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--latent-dim", "3")
    assert_refused(code, err, "already holds another run", "--overwrite")
    assert snapshot(run) == before
    code, err = cli(capsys, "train", "--out", run, *flags, "--latent-dim", "3", "--overwrite")
    assert code == 0, err
    assert "latent_dim = 3" in (run / "config.toml").read_text()
    assert len(read_jsonl(run / "metrics.jsonl")) == 1  # the old run's lines are gone


def test_output_folder_with_other_files_or_a_file_path_is_refused(tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "holiday.jpg").write_bytes(b"\xff\xd8 not a run")
    code, err = cli(capsys, "train", "--out", folder, *TINY)
    assert_refused(code, err, "already holds other files")
    code, err = cli(capsys, "train", "--out", folder / "holiday.jpg", *TINY)
    assert_refused(code, err, "exists and is not a folder")
    code, err = cli(capsys, "train", "--out", folder / "holiday.jpg" / "run", *TINY)
    assert_refused(code, err, "cannot create output folder", "holiday.jpg is a file")
    assert snapshot(folder) == {"holiday.jpg": b"\xff\xd8 not a run"}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root may write anywhere")
def test_an_unwritable_output_folder_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, err = cli(capsys, "train", "--out", locked / "run", *TINY)
    finally:
        locked.chmod(0o700)
    assert_refused(code, err, "permission denied")
    assert not (locked / "run").exists()


def test_resume_with_a_different_config_is_refused(capsys, run_copy):
    run, flags = run_copy
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--lr", "0.01")
    assert_refused(code, err, "--lr cannot change when resuming", "the run has 0.001")
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--estimator", "analytic-kl")
    assert_refused(code, err, "--estimator cannot change", "'reparam'")
    # the Python API compares the whole config
    with pytest.raises(CheckpointError, match=r"train.lr \(0.001 -> 0.01\)"):
        cfg = Config.load(Path(run) / "config.toml")
        cfg.train.lr = 0.01
        fit(cfg, run, resume=True)
    assert snapshot(run) == before
    # what may change on resume (a longer schedule) is accepted
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--epochs", "2")
    assert code == 0, err
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1, 2]


def test_resume_with_a_hand_edited_config_or_a_mismatched_checkpoint_is_refused(capsys,
                                                                                run_copy):
    run, flags = run_copy
    # config.toml edited to match new flags: the checkpoint's own copy still disagrees
    text = (run / "config.toml").read_text()
    (run / "config.toml").write_text(text.replace("latent_dim = 2", "latent_dim = 3"))
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--latent-dim", "3", "--resume",
                    "--epochs", "2")
    assert_refused(code, err, "checkpoint.pt was made with a different config",
                   "--latent-dim (2 -> 3)")
    assert snapshot(run) == before
    # a checkpoint whose tensors do not fit the model (one is missing)
    (run / "config.toml").write_text(text)
    state = load_checkpoint(run / "checkpoint.pt")
    del state["vae"][next(iter(state["vae"]))]
    save_checkpoint(run / "checkpoint.pt", state)
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--epochs", "2")
    assert_refused(code, err, "checkpoint.pt does not fit the model", "Missing key")
    assert snapshot(run) == before
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_run(run)


def test_resume_without_a_checkpoint_is_refused(tmp_path, capsys, run_copy):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = cli(capsys, "train", "--out", empty, *TINY, "--resume")
    assert_refused(code, err, "cannot resume", "checkpoint.pt")
    assert snapshot(empty) == {}
    # a run killed before its first epoch ended: config.toml but no checkpoint yet
    run, flags = run_copy
    (run / "checkpoint.pt").unlink()
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume")
    assert_refused(code, err, "holds no checkpoint.pt", "--overwrite")
    assert snapshot(run) == before


def test_resume_on_images_of_another_size_is_refused(capsys, run_copy, digits):
    # Same config, same --data-dir, but the folder now holds 20 x 20 images.
    run, flags = run_copy
    data = Path(flags[flags.index("--data-dir") + 1])
    write_split(data, "train", digits["train_x"][:NUM_TRAIN, 4:24, 4:24],
                digits["train_y"][:NUM_TRAIN])
    write_split(data, "t10k", digits["test_x"][:NUM_TEST, 4:24, 4:24],
                digits["test_y"][:NUM_TEST])
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--epochs", "2")
    assert_refused(code, err, "cannot resume", "(1, 28, 28)", "(1, 20, 20)")
    assert snapshot(run) == before
    # the commands that read a finished run refuse the new images the same way
    for command in ("evaluate", "sample", "score"):
        if command in COMMANDS:
            size = "--num-images" if command == "sample" else "--num-samples"
            code, err = cli(capsys, command, run, size, "4")
            assert_refused(code, err, "(1, 28, 28)", "(1, 20, 20)")
            assert snapshot(run) == before, command


# -- numerical faults ------------------------------------------------------------------------------
def trainer_with_spy(cfg: Config, dataset: Dataset, run_dir: Path | None):
    """A Trainer whose steps record (step, loss, params before, params after)."""
    if run_dir is not None:
        run_dir.mkdir()
    trainer = Trainer(cfg, dataset, run_dir)
    record: list[tuple[int, float | None, dict, dict]] = []
    step = trainer.step

    def spy(x):
        before = params_of(trainer.vae)
        loss = step(x)
        record.append((trainer.global_step + 1, loss, before, params_of(trainer.vae)))
        return loss

    trainer.step = spy
    return trainer, record


def real_digits(mnist5k_grey, n: int = NUM_TRAIN) -> Dataset:
    return Dataset("mnist-5k", (1, 28, 28),
                   Split(mnist5k_grey.train.images[:n], mnist5k_grey.train.labels[:n]),
                   Split(mnist5k_grey.test.images[:NUM_TEST], mnist5k_grey.test.labels[:NUM_TEST]))


def test_a_non_finite_gradient_is_skipped_logged_and_training_goes_on(tmp_path, mnist5k_grey,
                                                                      caplog):
    cfg = tiny_cfg(epochs=2)
    trainer, record = trainer_with_spy(cfg, real_digits(mnist5k_grey), tmp_path / "run")
    poison_gradients(trainer, bad_steps={4, 9})
    with caplog.at_level("WARNING", logger="pyro_vae.training.trainer"):
        assert trainer.run()
    assert [r.getMessage().split(" skipped")[0] for r in caplog.records] == [
        "step 4 (epoch 1)", "step 9 (epoch 2)"]
    by_step = {s: (loss, before, after) for s, loss, before, after in record}
    assert len(by_step) == 12
    for s, (loss, before, after) in by_step.items():
        if s in (4, 9):
            assert loss is None and same_tensors(before, after), s  # not applied
        else:
            assert loss is not None and not same_tensors(before, after), s
    events = _faults(tmp_path / "run" / "events.jsonl")
    assert [(e["event"], e["step"], e["epoch"]) for e in events] == [
        ("non-finite", 4, 1), ("non-finite", 9, 2)]
    assert events[0]["grad_norm"] == "inf"
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [m["bad_steps"] for m in metrics] == [1, 1]
    assert all(math.isfinite(m["train_elbo"]) and math.isfinite(m["test_elbo"]) for m in metrics)
    assert all(torch.isfinite(p).all() for p in trainer.vae.parameters())


def test_repeated_faults_stop_with_a_clear_message_and_the_last_good_checkpoint(
        tmp_path, capsys, monkeypatch, data_dir):
    init = Trainer.__init__

    def faulty_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        poison_gradients(self, from_step=8)  # every step of epoch 2 from its second one

    monkeypatch.setattr(Trainer, "__init__", faulty_init)
    run = tmp_path / "run"
    flags = ["--dataset", "mnist", "--data-dir", data_dir, *TINY, "--max-bad-steps", "3"]
    code, err = cli(capsys, "train", "--out", run, *flags, "--epochs", "3")
    assert_refused(code, err, "stopped after 3 steps", "step 10", "last good checkpoint is kept")
    assert [e["step"] for e in _faults(run / "events.jsonl")] == [8, 9, 10]
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    state = load_checkpoint(run / "checkpoint.pt")
    assert state["position"]["epoch"] == 1 and state["position"]["batch_in_epoch"] == 0
    # the checkpoint holds exactly the state after epoch 1 of a run without faults
    monkeypatch.setattr(Trainer, "__init__", init)
    code, err = cli(capsys, "train", "--out", tmp_path / "clean", *flags)
    assert code == 0, err
    clean = load_checkpoint(tmp_path / "clean" / "checkpoint.pt")
    assert same_tensors(state["vae"], clean["vae"])


def _score_estimator() -> str:
    names = [n for n, e in ESTIMATORS.items() if getattr(e, "score_function", False)
             and getattr(e, "baseline", None) is None]
    return names[0] if names else "reparam"


@pytest.mark.parametrize("lr", [1e5, 1e30])
def test_score_function_with_a_huge_learning_rate_is_caught(tmp_path, mnist5k_grey, lr):
    # lr 1e5: the loss turns NaN; lr 1e30: inf - inf inside the networks, which Pyro's
    # validation reports as a ValueError. Both must be skipped steps, never a crash.
    cfg = tiny_cfg(estimator=_score_estimator(), lr=lr, epochs=3, max_bad_steps=4)
    trainer, record = trainer_with_spy(cfg, real_digits(mnist5k_grey), tmp_path / "run")
    with pytest.raises(TrainingError, match="stopped after 4 steps"):
        trainer.run()
    events = read_jsonl(tmp_path / "run" / "events.jsonl")
    skipped = [s for s, loss, *_ in record if loss is None]
    assert [e["step"] for e in events] == skipped + [len(record) + 1]
    assert len(events) == 4
    assert all(torch.isfinite(p).all() for p in trainer.vae.parameters())


@pytest.mark.parametrize("pyro_path", [True, False], ids=["pyro", "default"])
def test_a_poisoned_parameter_stops_training_instead_of_crashing(tmp_path, mnist5k_grey,
                                                                 pyro_path):
    # A NaN weight makes the encoder's loc NaN. Through Pyro, its validation raises a
    # ValueError; a faster loss (if the config has one) returns NaN. Both are skipped steps.
    cfg = tiny_cfg(max_bad_steps=2)
    if pyro_path and hasattr(cfg.train, "fast_path"):
        cfg.train.fast_path = False
    trainer, _ = trainer_with_spy(cfg, real_digits(mnist5k_grey), tmp_path / "run")
    with torch.no_grad():
        last_linear(trainer.vae.encoder).bias[0] = math.nan
    with pytest.raises(TrainingError, match=r"stopped after 2 steps .* no checkpoint yet"):
        trainer.run()
    assert [e["step"] for e in _faults(tmp_path / "run" / "events.jsonl")] == [1, 2]


def test_gradient_clipping_bounds_the_applied_gradient(mnist5k_grey):
    norms: dict[float, list[float]] = {}
    for clip in (0.0, 0.5):
        trainer = Trainer(tiny_cfg(grad_clip=clip), real_digits(mnist5k_grey))
        step = trainer.optimizer.step

        def recording_step(*args, _trainer=trainer, _clip=clip, _step=step, **kwargs):
            grads = [p.grad.norm() for p in _trainer.vae.parameters() if p.grad is not None]
            norms.setdefault(_clip, []).append(float(torch.stack(grads).norm()))
            return _step(*args, **kwargs)

        trainer.optimizer.step = recording_step
        trainer.run()
    assert len(norms[0.5]) == NUM_TRAIN // 50
    assert max(norms[0.0]) > 0.5  # without clipping the norm exceeds the bound...
    assert max(norms[0.5]) <= 0.5 * (1 + 1e-5)  # ...with it, it never does


# -- crashes ---------------------------------------------------------------------------------------
def test_a_failed_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "weights": torch.arange(5.0)})
    before = path.read_bytes()

    def dies_half_way(f):
        f.write(b"PK\x03\x04 half a zip file")
        raise OSError("disk full")

    with pytest.raises(OutputError, match=r"cannot write .*checkpoint.pt: disk full"):
        atomic_write_bytes(path, dies_half_way)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(5.0))


def test_a_full_disk_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "weights": torch.arange(5.0)})
    before = path.read_bytes()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OutputError, match=r"cannot write .*checkpoint.pt: No space left on "
                                          r"device \(ENOSPC\); the previous checkpoint"):
        save_checkpoint(path, {"format": 1, "weights": torch.zeros(5)})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "weights": torch.arange(5.0)})
    before = path.read_bytes()
    pid = os.fork()
    if pid == 0:  # child: start replacing the checkpoint, die in the middle of the write
        def killed_half_way(f):
            f.write(before[: len(before) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        try:
            atomic_write_bytes(path, killed_half_way)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert path.read_bytes() == before
    assert torch.equal(load_checkpoint(path)["weights"], torch.arange(5.0))


KILL_TRAIN, KILL_BATCH = 600, 20
KILL_STEPS_PER_EPOCH = KILL_TRAIN // KILL_BATCH
KILL_FLAGS = ["--hidden-dims", "32", "--latent-dim", "4", "--batch-size", str(KILL_BATCH),
              "--epochs", "4", "--seed", "7", "--no-progress"]


@pytest.fixture(scope="module")
def kill_setup(tmp_path_factory, digits):
    """A data folder, the flags of a 4-epoch run and the final state of an uninterrupted run.

    Everything runs on one thread: the subprocess (OMP_NUM_THREADS=1) and this process alike,
    so results may be compared bit for bit.
    """
    root = tmp_path_factory.mktemp("kill")
    data = idx_folder(root / "idx", digits, num_train=KILL_TRAIN, num_test=200)
    flags = ["--dataset", "mnist", "--data-dir", str(data), *KILL_FLAGS]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", "--out", str(root / "reference"), *flags, "--no-figures"]) == 0
    finally:
        torch.set_num_threads(threads)
    return flags, load_checkpoint(root / "reference" / "checkpoint.pt"), \
        read_jsonl(root / "reference" / "metrics.jsonl")


def start_training(run: Path, flags: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "pyro_vae", "train", "--out", str(run),
                             *flags, "--no-figures"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_first_checkpoint(proc: subprocess.Popen, run: Path) -> float:
    """Block until epoch 1 is saved; return how long that epoch took (seconds)."""
    deadline = time.monotonic() + 120
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.005)
    # the checkpoint is written first, then its epoch's metrics line
    return json.loads(load_checkpoint(run / "checkpoint.pt")["metrics"][0])["seconds"]


def resume_in_process(run: Path, flags: list[str], capsys) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        code, err = cli(capsys, "train", "--out", run, *flags, "--no-figures", "--resume")
    finally:
        torch.set_num_threads(threads)
    assert code == 0, err


def assert_same_as_reference(run: Path, reference: dict, reference_metrics: list[dict],
                             note: str, epochs: int = 4) -> None:
    final = load_checkpoint(run / "checkpoint.pt")
    assert same_tensors(final["vae"], reference["vae"]), f"parameters differ ({note})"
    assert same_tensors(final["rng"], reference["rng"]), note
    for a, b in zip(final["optimizer"]["state"].values(),
                    reference["optimizer"]["state"].values()):
        assert same_tensors({k: torch.as_tensor(v) for k, v in a.items()},
                            {k: torch.as_tensor(v) for k, v in b.items()}), note
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == list(range(1, epochs + 1)), \
        f"lost or duplicated epochs ({note})"
    strip = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]  # noqa: E731
    assert strip(metrics) == strip(reference_metrics), note


def test_sigkill_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path, capsys, kill_setup):
    flags, reference, reference_metrics = kill_setup
    seed = int(os.environ.get("PYRO_VAE_KILL_SEED", time.time_ns() % 2**32))
    run = tmp_path / "run"
    proc = start_training(run, flags)
    epoch_seconds = wait_for_first_checkpoint(proc, run)
    # Three epochs remain, each about as long as the first: a delay below one epoch lands
    # somewhere in epoch 2 (a step, the evaluation, or the checkpoint write).
    delay = random.Random(seed).uniform(0, epoch_seconds)
    time.sleep(delay)
    assert proc.poll() is None, "the run finished before the kill"
    proc.kill()
    assert proc.wait() == -signal.SIGKILL
    proc.communicate()
    saved = load_checkpoint(run / "checkpoint.pt")["position"]
    note = (f"PYRO_VAE_KILL_SEED={seed}: SIGKILL {delay:.3f} s after epoch 1 "
            f"({epoch_seconds:.2f} s); checkpoint at epoch {saved['epoch']}, "
            f"{len(read_jsonl(run / 'metrics.jsonl'))} metrics lines")
    with capsys.disabled():  # shown with pytest -s: where the kill landed
        print(note)
    assert saved["epoch"] in (1, 2), note
    resume_in_process(run, flags, capsys)
    assert_same_as_reference(run, reference, reference_metrics, note)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_saves_at_a_step_boundary_and_resume_equals_an_uninterrupted_run(
        tmp_path, capsys, kill_setup, signum):
    """Ctrl-C, and SIGTERM (what a cluster scheduler sends before it kills a job)."""
    flags, reference, reference_metrics = kill_setup
    seed = int(os.environ.get("PYRO_VAE_KILL_SEED", time.time_ns() % 2**32))
    run = tmp_path / "run"
    proc = start_training(run, flags)
    epoch_seconds = wait_for_first_checkpoint(proc, run)
    delay = random.Random(seed).uniform(0.1, 0.8) * epoch_seconds
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name
    note = f"PYRO_VAE_KILL_SEED={seed}, {name} {delay:.3f} s after epoch 1"
    assert proc.returncode == 128 + signum, (note, err)
    assert f"stopped by {name}: position saved" in err and "--resume" in err, err
    assert "Traceback" not in err, err
    position = load_checkpoint(run / "checkpoint.pt")["position"]
    with capsys.disabled():
        print(note, position)
    # saved where it stopped (a step boundary inside epoch 2 or 3), not at the last epoch end
    assert position["global_step"] >= KILL_STEPS_PER_EPOCH and position["epoch"] < 4, \
        (note, position)
    assert position["global_step"] == (KILL_STEPS_PER_EPOCH * position["epoch"]
                                       + position["batch_in_epoch"])
    resume_in_process(run, flags, capsys)
    assert_same_as_reference(run, reference, reference_metrics, note)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_saves_at_the_next_step_boundary(tmp_path, capsys, monkeypatch, data_dir):
    # Deterministic companion of the test above: Ctrl-C arrives during step 8 (epoch 2).
    flags = ["--dataset", "mnist", "--data-dir", data_dir, *TINY, "--epochs", "2"]
    code, err = cli(capsys, "train", "--out", tmp_path / "reference", *flags)
    assert code == 0, err
    step = Trainer.step

    def step_and_ctrl_c(self, x):
        loss = step(self, x)
        if self.global_step + 1 == 8:
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(Trainer, "step", step_and_ctrl_c)
    run = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", run, *flags)
    assert code == 130 and "stopped by SIGINT: position saved" in err, err
    position = load_checkpoint(run / "checkpoint.pt")["position"]
    assert (position["epoch"], position["batch_in_epoch"], position["global_step"]) == (1, 2, 8)
    assert [m["epoch"] for m in read_jsonl(run / "metrics.jsonl")] == [1]
    monkeypatch.setattr(Trainer, "step", step)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume")
    assert code == 0, err
    assert_same_as_reference(run, load_checkpoint(tmp_path / "reference" / "checkpoint.pt"),
                             read_jsonl(tmp_path / "reference" / "metrics.jsonl"), "ctrl-c",
                             epochs=2)


# -- hostile checkpoints ---------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs ``exec``: what a malicious shared checkpoint would contain."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"__import__('pathlib').Path({str(self.marker)!r}).write_text('pwned')",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, capsys, run_copy):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": 1, "vae": _RunsCode(marker)}, crafted)
    # it is a real attack: a plain torch.load would run it
    torch.load(crafted, weights_only=False)
    assert marker.read_text() == "pwned"
    marker.unlink()

    with pytest.raises(CheckpointError, match="refusing to load .*asks to run or build exec"):
        load_checkpoint(crafted)
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps({"format": 1, "vae": _RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointError, match="refusing to load .*asks to run or build exec"):
        load_checkpoint(legacy)

    # in a run folder: load_run and --resume refuse it too, leaving the folder as it was
    run, flags = run_copy
    shutil.copy(crafted, run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_run(run)
    before = snapshot(run)
    code, err = cli(capsys, "train", "--out", run, *flags, "--resume", "--epochs", "2")
    assert_refused(code, err, "refusing to load", "checkpoint.pt", "exec")
    assert snapshot(run) == before
    assert not marker.exists()


def test_a_corrupt_or_foreign_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"format": 1, "weights": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_checkpoint(path)
    torch.save({"weights": torch.ones(3)}, path)
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_every_dataset_name_is_listed_when_unknown():
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(dataset="imagenet"))
    assert all(name in str(info.value) for name in DATASETS)



# -- one owner per run folder, resolved paths, overwrite leaves nothing behind ------------------
def test_a_second_process_on_a_live_run_folder_is_refused_with_the_owners_pid(tmp_path, capsys,
                                                                               data_dir):
    run = tmp_path / "run"
    flags = ["--dataset", "mnist", "--data-dir", data_dir, *TINY, "--epochs", "100000"]
    first = start_training(run, [str(f) for f in flags])  # the owner: another process
    try:
        deadline = time.time() + 120
        while not (run / ".lock").exists() or not (run / "config.toml").exists():
            assert time.time() < deadline and first.poll() is None
            time.sleep(0.05)
        before = (run / "config.toml").read_bytes()
        for extra in ([], ["--overwrite"], ["--resume"]):  # from this process: flock is held
            code, err = cli(capsys, "train", "--out", run, *flags, *extra)  # by the owner's
            assert_refused(code, err, f"is in use by another pyro-vae process (pid {first.pid})")
        assert (run / "config.toml").read_bytes() == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the killed owner's lock is stale: the next start takes it over
    code, err = cli(capsys, "train", "--out", run, *flags, "--epochs", "1", "--overwrite")
    assert code == 0, err


def test_relative_data_dir_is_stored_resolved_and_the_run_works_from_anywhere(
        tmp_path, monkeypatch, data_dir):
    monkeypatch.chdir(Path(data_dir).parent)
    relative = os.path.relpath(data_dir)
    fit_cfg = Config()
    fit_cfg.data.dataset, fit_cfg.data.data_dir = "mnist", relative
    fit_cfg.model.hidden_dims, fit_cfg.model.latent_dim = [16], 2
    fit_cfg.train.epochs, fit_cfg.train.batch_size, fit_cfg.train.progress = 1, 64, False
    fit(fit_cfg, tmp_path / "run")
    saved = Config.load(tmp_path / "run" / "config.toml")
    assert Path(saved.data.data_dir).is_absolute()
    assert Path(saved.data.data_dir) == Path(data_dir).resolve()
    monkeypatch.chdir("/")
    from pyro_vae.app.commands import evaluate_run

    result = evaluate_run(tmp_path / "run", num_samples=2, limit=4, num_particles=1)
    assert result["num_images"] == 4


def test_overwrite_leaves_nothing_of_the_old_run_and_a_failed_overwrite_restores_it(
        tmp_path, monkeypatch):
    from conftest import small_dataset, tiny_config

    from pyro_vae import train

    def small_data():
        return small_dataset(256, 64)

    cfg = tiny_config(epochs=1)
    run = tmp_path / "run"
    train(cfg, run, dataset=small_data())
    from pyro_vae.app.commands import evaluate_run

    evaluate_run(run, num_samples=2, limit=4, num_particles=1)
    old = snapshot(run)
    assert "evaluation.json" in old and "samples.png" in old
    # a new run that fails before its first checkpoint: the old run is back, untouched
    monkeypatch.setattr(Trainer, "step", lambda self, x: (_ for _ in ()).throw(
        TrainingError("stopped on purpose")))
    with pytest.raises(TrainingError):
        fit(cfg, run, overwrite=True, dataset=small_data())
    assert snapshot(run) == old
    monkeypatch.undo()
    # a good overwrite: nothing of the old run is left (evaluation, figures)
    fit(cfg, run, overwrite=True, dataset=small_data())
    entries = {p.name for p in run.iterdir()} - {".lock"}
    assert entries == {"config.toml", "checkpoint.pt", "metrics.jsonl", "events.jsonl"}


@pytest.mark.parametrize("lr", ["1e20", "1e30"])
def test_divergence_reaching_the_epoch_end_evaluation_stops_with_one_line(tmp_path, capsys, lr):
    """Fewer steps per epoch than --max-bad-steps: every step of the diverged epoch is
    skipped, and the epoch-end evaluation meets the broken model. One line, exit 2, and no
    non-finite epoch in metrics.jsonl or the checkpoint."""
    run = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", run, *TINY, "--epochs", "3", "--lr", lr,
                    "--max-bad-steps", "1000", "--train-limit", "200")
    assert code == 2, err
    assert_refused(code, err, "the model diverged in epoch")
    for record in read_jsonl(run / "metrics.jsonl"):
        assert all(math.isfinite(v) for k, v in record.items() if isinstance(v, float))
    if (run / "checkpoint.pt").exists():
        state = load_checkpoint(run / "checkpoint.pt")
        assert all(torch.isfinite(v).all() for v in state["vae"].values())
    events = [e for e in read_jsonl(run / "events.jsonl") if e["event"] == "diverged"]
    assert len(events) == 1


@pytest.mark.parametrize("command", [["evaluate", "--num-samples", "2", "--limit", "2"],
                                     ["score", "--num-samples", "2", "--limit", "2"],
                                     ["sample", "--num-images", "4"]])
def test_outputs_are_checked_before_anything_is_computed(tmp_path, capsys, finished_run,
                                                         command, monkeypatch):
    run, _ = finished_run
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    out = afile / ("samples" if command[0] == "sample" else "out.json")
    from pyro_vae.app import commands

    def no_compute(*args, **kwargs):
        raise AssertionError("computed before checking the output path")

    monkeypatch.setattr(commands, "importance_log_likelihood", no_compute)
    monkeypatch.setattr(commands, "anomaly_scores", no_compute)
    monkeypatch.setattr(commands, "elbo_terms", no_compute)
    code, err = cli(capsys, command[0], run, *command[1:], "--out", out)
    assert_refused(code, err, "afile")
    code, err = cli(capsys, "variance", "--out", afile, "--draws", "2")
    assert_refused(code, err, "afile")


def test_more_user_mistakes_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    code, err = cli(capsys, "train", "--out", run, *TINY, "--train-limit", "200")
    assert code == 0, err
    code, err = cli(capsys, "train", "--out", tmp_path / "r", *TINY, "--seed", "-1")
    assert_refused(code, err, "--seed -1 is invalid", ">= 0")
    code, err = cli(capsys, "score", run, "--method", "elbo", "--num-particles", "0",
                    "--out", tmp_path / "s.csv")
    assert_refused(code, err, "must be a positive integer")
    code, err = cli(capsys, "sample", run, "--num-pairs", "100000", "--out", tmp_path / "smp")
    assert_refused(code, err, "--num-pairs 100000 is more than the")
    assert not (tmp_path / "smp").exists()
    broken = tmp_path / "broken"
    shutil.copytree(run, broken)
    state = load_checkpoint(broken / "checkpoint.pt")
    del state["config"]
    save_checkpoint(broken / "checkpoint.pt", state)
    code, err = cli(capsys, "evaluate", broken, "--num-samples", "2")
    assert_refused(code, err, "is incomplete: it has no config")


# -- OS faults on a real file system ---------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A small tmpfs mounted for the test: a real file system that fills up or turns read-only."""
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root on Linux (the monkeypatched ENOSPC tests above "
                    "still run)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def remount(disk: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def fill(disk: Path) -> None:
    """Write zeros until the file system has no free block left."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, bytes(1 << 16))
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def own_run(tmp_path_factory, digits) -> tuple[Path, Path]:
    """(run folder, data folder) of a finished one-epoch run that no other test changes."""
    return one_epoch_run(tmp_path_factory.mktemp("own"), digits)


@pytest.mark.parametrize("fault, code_name", [("full", "(ENOSPC)"), ("read-only", "(EROFS)")])
def test_a_full_or_read_only_disk_gives_one_line_and_leaves_nothing(small_disk, capsys,
                                                                    own_run, fault,
                                                                    code_name):
    run, data = own_run
    out = small_disk / "out"
    out.mkdir()
    fill(small_disk) if fault == "full" else remount(small_disk, "ro")
    before = snapshot(small_disk)
    for argv in (["train", "--out", out / "run", "--dataset", "mnist", "--data-dir", data, *TINY],
                 ["evaluate", run, "--num-samples", "2", "--limit", "4", "--out", out / "e.json"],
                 ["sample", run, "--num-images", "4", "--out", out / "samples"],
                 ["score", run, "--num-samples", "2", "--limit", "4", "--out", out / "s.csv"],
                 ["variance", "--out", out / "variance", "--draws", "2", "--checkpoints", "0",
                  "--measure-batch", "8", "--oracle-draws", "2", "--latent-dims", "2",
                  "--batch-sizes", "8", "--no-progress"]):
        code, err = cli(capsys, *argv)
        assert_refused(code, err, str(out), code_name)
        assert snapshot(small_disk) == before, argv[0]
        assert list(out.iterdir()) == [], argv[0]  # no partial file, folder or temporary


def test_a_disk_filling_up_during_training_keeps_the_last_checkpoint_and_resume_finishes(
        small_disk, tmp_path, capsys, own_run):
    run, data = own_run
    flags = ["--dataset", "mnist", "--data-dir", data, *TINY, "--epochs", "2"]
    reference = tmp_path / "reference"
    assert cli(capsys, "train", "--out", reference, *flags)[0] == 0
    size = (run / "checkpoint.pt").stat().st_size
    # room for one checkpoint and the small files, not for the second checkpoint's temporary
    remount(small_disk, f"size={size + size // 2 + (64 << 10)}")
    out = small_disk / "run"
    code, err = cli(capsys, "train", "--out", out, *flags)
    assert_refused(code, err, str(out / "checkpoint.pt"), "(ENOSPC)",
                   "the previous checkpoint, if any, is unchanged")
    assert load_checkpoint(out / "checkpoint.pt")["position"]["epoch"] == 1
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1]  # agrees with it
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    remount(small_disk, "size=16m")  # space freed: the run goes on from its checkpoint
    code, err = cli(capsys, "train", "--out", out, *flags, "--resume")
    assert code == 0, err
    assert [m["epoch"] for m in read_jsonl(out / "metrics.jsonl")] == [1, 2]
    mine, theirs = (load_checkpoint(p / "checkpoint.pt")["vae"] for p in (out, reference))
    assert same_tensors(mine, theirs)


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0,
                    reason="runs the command as another user, which needs root (as non-root "
                           "test_an_unwritable_output_folder_is_refused checks the same)")
def test_permission_denied_for_an_ordinary_user_is_one_line():
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="pyro-vae-eacces-"))
    try:
        shared.chmod(0o777)
        locked = shared / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        stderr = shared / "stderr.txt"
        pid = os.fork()
        if pid == 0:  # child: become "nobody" and run the command in this process
            code = 99
            try:
                os.setgid(65534)
                os.setuid(65534)
                with open(stderr, "w") as f:
                    sys.stderr = f
                    code = main(["train", "--out", str(locked / "run"), *TINY])
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert_refused(os.WEXITSTATUS(status), stderr.read_text(), str(locked),
                       "permission denied (EACCES)")
        assert list(locked.iterdir()) == []
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- resource bounds -------------------------------------------------------------------------------
def test_sizes_that_would_not_fit_in_memory_are_refused_before_allocating(tmp_path, capsys,
                                                                          own_run):
    run, data = own_run
    code, err = cli(capsys, "train", "--out", tmp_path / "big", "--latent-dim", "20000000",
                    "--no-progress")
    assert_refused(code, err, "--latent-dim 20000000", "GB of memory but", "--memory-limit")
    code, err = cli(capsys, "train", "--out", tmp_path / "big", "--num-particles", "100000000",
                    "--no-progress")
    assert_refused(code, err, "--batch-size 128 and --num-particles 100000000", "TB of memory")
    code, err = cli(capsys, "train", "--out", tmp_path / "big", "--threads", "100000")
    assert_refused(code, err, "--threads 100000 is more than the")  # torch would segfault
    code, err = cli(capsys, "evaluate", run, "--workers", "100000", "--out", tmp_path / "e.json")
    assert_refused(code, err, "--workers 100000 is more than the")
    code, err = cli(capsys, "sample", run, "--num-images", "100000000", "--out",
                    tmp_path / "samples")
    assert_refused(code, err, "--num-images 100000000", "TB of memory")
    assert not (tmp_path / "big").exists() and not (tmp_path / "samples").exists()
    # the limit can be set: a tiny one refuses even the data, "off" lifts it
    flags = ["--dataset", "mnist", "--data-dir", data, *TINY]
    code, err = cli(capsys, "--memory-limit", "10K", "train", "--out", tmp_path / "r", *flags)
    assert_refused(code, err, "shape (300, 28, 28)", "10.0 KB is allowed by --memory-limit")
    code, err = cli(capsys, "train", "--out", tmp_path / "r", *flags, "--memory-limit", "zz")
    assert_refused(code, err, "--memory-limit 'zz' is invalid")
    assert cli(capsys, "--memory-limit", "off", "train", "--out", tmp_path / "r", *flags)[0] == 0


def _gzip_idx(path: Path, shape: tuple[int, ...], payload_bytes: int) -> None:
    """A gzipped IDX file whose header announces ``shape`` followed by ``payload_bytes`` zeros."""
    import zlib

    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    header = bytes([0, 0, 8, len(shape)]) + b"".join(n.to_bytes(4, "big") for n in shape)
    parts = [packer.compress(header)]
    for _ in range(payload_bytes >> 20):
        parts.append(packer.compress(bytes(1 << 20)))
    parts.append(packer.compress(bytes(payload_bytes & ((1 << 20) - 1))))
    path.write_bytes(b"".join([*parts, packer.flush()]))


def test_a_gzip_bomb_is_refused_without_being_inflated(tmp_path, capsys, digits):
    import tracemalloc

    from pyro_vae.data import read_idx

    bomb = tmp_path / "bomb.gz"
    _gzip_idx(bomb, (300, 28, 28), 256 << 20)  # 256 MB of zeros after a 235 KB header
    assert bomb.stat().st_size < (1 << 20)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="has trailing bytes: more than the 235216 bytes"):
            read_idx(bomb)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < (16 << 20), peak  # never more than the announced images, not the 256 MB
    # a header that announces more images than memory holds is refused at the header
    folder = idx_folder(tmp_path / "idx", digits)
    _gzip_idx(folder / "train-images-idx3-ubyte.gz", (2_000_000_000, 28, 28), 1 << 20)
    code, err = cli(capsys, "train", "--out", tmp_path / "run", "--dataset", "mnist",
                    "--data-dir", folder, *TINY)
    assert_refused(code, err, "shape (2000000000, 28, 28)", "TB of memory but")


def test_a_long_evaluation_reports_progress_with_an_eta_in_a_log(own_run, caplog, monkeypatch):
    from pyro_vae.metrics import loglik
    from pyro_vae.progress import Progress
    from pyro_vae.training.runs import load_run

    run, _ = own_run
    _, vae, _ = load_run(run)
    x = torch.bernoulli(torch.full((3, 784), 0.3))

    class EveryStep(Progress):  # a log line at every update instead of every 30 s
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "every": 0.0})

    monkeypatch.setattr(loglik, "Progress", EveryStep)
    monkeypatch.setattr(loglik, "on_terminal", lambda: False, raising=False)
    with caplog.at_level("INFO", logger="pyro_vae.progress"):
        loglik.importance_log_likelihood(vae, x, num_samples=3000, batch_size=3, chunk_size=500,
                                         progress=True)
    lines = [r.getMessage() for r in caplog.records if r.name == "pyro_vae.progress"]
    # one batch of 3 images, yet a line per chunk of samples, each with an ETA
    assert len(lines) >= 4, lines
    assert lines[0].startswith("log-likelihood: 1500/9000 samples") and "ETA" in lines[0]


def test_a_vanished_folder_and_a_failed_append_are_one_line_and_leave_no_partial_line(
        tmp_path, monkeypatch):
    from pyro_vae import files

    gone = tmp_path / "gone"
    for write in (lambda: files.atomic_write_text(gone / "config.toml", "x = 1\n"),
                  lambda: files.append_text(gone / "events.jsonl", "{}\n")):
        with pytest.raises(OutputError, match=r"cannot write .*gone/.*No such file or directory "
                                              r"\(ENOENT\)"):
            write()
    log = tmp_path / "events.jsonl"
    files.append_text(log, '{"event": "path"}\n')
    before = log.read_bytes()
    real_write = os.write

    def half_then_full(fd, data):  # the disk fills up half-way through the line
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OutputError, match=r"events.jsonl: No space left on device \(ENOSPC\)"):
        files.append_text(log, '{"event": "non-finite", "step": 2}\n')
    monkeypatch.undo()
    assert log.read_bytes() == before  # cut back to the last whole line


def test_an_overwrite_that_meets_a_full_disk_puts_the_old_run_back(small_disk, capsys, own_run):
    _, data = own_run
    run = small_disk / "run"
    flags = ["--dataset", "mnist", "--data-dir", data, *TINY]
    remount(small_disk, "size=16m")
    assert cli(capsys, "train", "--out", run, *flags)[0] == 0
    before = snapshot(run)
    fill(small_disk)
    code, err = cli(capsys, "train", "--out", run, *flags, "--latent-dim", "3", "--overwrite")
    assert_refused(code, err, str(run), "(ENOSPC)")
    assert snapshot(run) == before  # the old run, byte for byte, and nothing of the new one
