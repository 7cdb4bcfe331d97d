"""Run folders: what a run's folder holds, the checks before anything is written, the record of
the parts a run was built from, and loading a trained run back.

A run records in config.toml (section ``[run]``) the plugin modules its parts came from and the
class of each part. Loading or resuming a run refuses, with one line, when one of those plugins
is not loaded or when the config would now build other classes than the run was trained with:
a checkpoint is never loaded into the wrong class, and no code named by a run folder is
imported on its own.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyro
import torch
from torch import nn

from ..config import Config
from ..errors import CheckpointError, ConfigError, OutputError
from ..files import make_folder, output_error
from ..models.vae import VAE
from ..registry import ENCODERS, ESTIMATORS, LIKELIHOODS, PRIORS, plugins_for, require_plugins
from .checkpoint import load_checkpoint, require_keys

CONFIG_FILE = "config.toml"
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"
CHECKPOINT_FORMAT = 1
#: Config keys that may differ between a run and its resumption.
RESUMABLE_KEYS = {("train", "epochs"), ("train", "progress"), ("train", "device"),
                  ("train", "max_bad_steps"), ("train", "eval_batch_size"),
                  ("train", "fast_path"), ("train", "threads"), ("train", "tensorboard"),
                  ("train", "tensorboard_images_every")}


def pick_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA device is available")
    return torch.device(name)


def _short(error: Exception) -> str:
    """The informative line of a multi-line error (torch puts a heading ending in ':' first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    return lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]


# -- run folders ----------------------------------------------------------------------------------
def _config_differences(old: Config, new: Config) -> list[str]:
    a, b = old.to_dict(), new.to_dict()
    # [run] records what the parts were built from; check_parts compares it with the VAE
    return [f"{s}.{k} ({a[s][k]!r} -> {b[s][k]!r})" for s in a if s != "run" for k in a[s]
            if (s, k) not in RESUMABLE_KEYS and a[s][k] != b[s].get(k)]


def check_writable(folder: Path, instead: str = "output path") -> None:
    """CheckpointError unless ``folder`` is, or can be created as, a writable folder
    (``instead``: what the message asks to choose another of)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CheckpointError(f"output path {folder} exists and is not a folder")
    nearest = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not nearest.is_dir():
        raise CheckpointError(f"cannot create output folder {folder}: {nearest} is a file")
    if not os.access(nearest, os.W_OK | os.X_OK):
        read_only = bool(os.statvfs(nearest).f_flag & os.ST_RDONLY)
        why = ("read-only file system (EROFS)" if read_only else "permission denied (EACCES)")
        raise OutputError(f"cannot write to {nearest}: {why}; choose another {instead}")


def check_run_dir(run_dir: Path, cfg: Config, resume: bool, overwrite: bool,
                  contents: bool = True) -> None:
    """Refuse to touch a folder that holds something else, before anything is written.

    ``contents=False`` checks only that the folder can be created or written (the training
    process does that before it takes the folder's lock, and the rest under the lock).

    Raises:
        CheckpointError: the folder holds another run (and neither --resume nor --overwrite),
            or --resume was given for a folder with no checkpoint or a different config.
    """
    if resume and overwrite:
        raise ConfigError("resume=True and overwrite=True exclude each other")
    check_writable(run_dir, "run_dir")
    if not contents:
        return
    entries = ([p for p in run_dir.iterdir() if p.name not in OWN_ENTRIES]
               if run_dir.is_dir() else [])
    if resume:
        if (run_dir / CONFIG_FILE).is_file() and not (run_dir / CHECKPOINT_FILE).is_file():
            raise CheckpointError(f"cannot resume {run_dir}: it holds no {CHECKPOINT_FILE} (the "
                                  f"run stopped before its first epoch ended); start it again "
                                  f"with overwrite=True")
        if not (run_dir / CHECKPOINT_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(f"cannot resume: {run_dir} holds no {CHECKPOINT_FILE} and "
                                  f"{CONFIG_FILE}")
        saved = Config.load(run_dir / CONFIG_FILE)
        require_plugins(saved.run.plugins, f"run {run_dir}")
        differences = _config_differences(saved, cfg)
        if differences:
            raise CheckpointError(f"cannot resume {run_dir} with a different config: "
                                  f"{'; '.join(differences)}")
    elif entries and not overwrite:
        what = "another run" if (run_dir / CONFIG_FILE).exists() else "other files"
        raise CheckpointError(f"output folder {run_dir} already holds {what}; pass resume=True "
                              f"to continue it, overwrite=True to replace it, or choose another "
                              f"run_dir")


# -- one owner per run folder ----------------------------------------------------------------------
#: The lock a training process holds on its run folder (it contains the owner's pid).
LOCK_FILE = ".lock"
#: Where ``overwrite`` keeps the old run until the new one has its first checkpoint.
PREVIOUS_RUN = ".previous-run"
OWN_ENTRIES = (LOCK_FILE, PREVIOUS_RUN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunFolder:
    """A run folder owned by this process for the duration of a run.

    ``acquire`` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` (written with this process's
    pid) before anything in the folder is checked or written; another process asking for the
    same folder is refused with the owner's pid. The kernel drops the lock when its process
    dies, so a lock left by a killed run is simply taken over. ``overwrite`` moves the old run
    aside (:meth:`set_aside`) and deletes it only once the new run has saved its first
    checkpoint (:meth:`discard_previous`); if the new run fails before that, :meth:`restore`
    puts the old one back -- also on the next start, if the process that overwrote was killed.
    """

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self.created = False
        self.lock_created = False
        self.claimed = False

    def acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            return
        self.created = not self.run_dir.exists()
        make_folder(self.run_dir)
        self.lock_created = not (self.run_dir / LOCK_FILE).exists()
        try:
            fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise output_error(self.run_dir / LOCK_FILE, e, "create the lock file") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            owner = owner if owner.isdigit() and _alive(int(owner)) else "still starting up"
            raise CheckpointError(f"run folder {self.run_dir} is in use by another pyro-vae "
                                  f"process (pid {owner}); wait for it to finish, or choose "
                                  f"another run_dir") from None
        self._fd = fd
        if (self.run_dir / PREVIOUS_RUN).is_dir():  # an overwrite that died before its
            self.restore()                           # first checkpoint: the old run comes back

    def claim(self) -> None:
        """Write this process's pid into the lock (once the folder's checks have passed, so
        that a refused start changes nothing in the folder)."""
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)
            except OSError as e:
                raise output_error(self.run_dir / LOCK_FILE, e) from None
            self.claimed = True

    def release(self, remove: bool = False) -> None:
        if self._fd is not None and not self.claimed and self.lock_created:
            (self.run_dir / LOCK_FILE).unlink(missing_ok=True)  # refused: leave no trace
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None
        if remove and self.created:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def _entries(self) -> list[Path]:
        return [p for p in self.run_dir.iterdir() if p.name not in OWN_ENTRIES]

    def set_aside(self) -> None:
        """Move the folder's contents (an old run being overwritten) into PREVIOUS_RUN."""
        entries = self._entries()
        if not entries:
            return
        previous = self.run_dir / PREVIOUS_RUN
        previous.mkdir()
        for entry in entries:
            entry.rename(previous / entry.name)

    def discard_previous(self) -> None:
        shutil.rmtree(self.run_dir / PREVIOUS_RUN, ignore_errors=True)

    def clear(self) -> None:
        """Delete what a new run wrote into the folder (the folder's own entries stay)."""
        for entry in self._entries():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else \
                entry.unlink(missing_ok=True)

    def restore(self) -> bool:
        """Delete what a failed new run wrote and put the old run back (False: there was no old
        run set aside)."""
        previous = self.run_dir / PREVIOUS_RUN
        if not previous.is_dir():
            return False
        for entry in self._entries():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        for entry in previous.iterdir():
            entry.rename(self.run_dir / entry.name)
        previous.rmdir()
        return True


@contextlib.contextmanager
def owned(run_dir: Path | None, enabled: bool = True) -> Iterator[RunFolder | None]:
    """Hold :class:`RunFolder`'s lock for the block; a folder this created and left empty of
    run files (a refused or failed start) is removed again."""
    if run_dir is None or not enabled:
        yield None
        return
    folder = RunFolder(run_dir)
    folder.acquire()
    ok = False
    try:
        yield folder
        ok = True
    finally:
        empty = folder.run_dir.is_dir() and not folder._entries()
        folder.release(remove=folder.created and (not ok or empty) and empty)


# -- the parts a run was built from ---------------------------------------------------------------
def class_name(obj: Any) -> str:
    """``module.QualName`` of an object's class."""
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _part_classes(vae: VAE) -> dict[str, str]:
    family = getattr(vae.encoder, "family", None)
    return {"encoder_class": class_name(vae.encoder), "decoder_class": class_name(vae.decoder),
            "prior_class": class_name(vae.prior),
            "guide_family_class": class_name(family) if isinstance(family, nn.Module) else ""}


def record_parts(cfg: Config, vae: VAE) -> None:
    """Fill ``cfg.run``: the plugins the configured parts come from and each part's class."""
    parts = {"prior": (PRIORS, cfg.model.prior), "encoder": (ENCODERS, cfg.model.encoder),
             "likelihood": (LIKELIHOODS, cfg.model.likelihood),
             "estimator": (ESTIMATORS, cfg.train.estimator)}
    cfg.run.plugins = plugins_for(parts)
    for key, value in _part_classes(vae).items():
        setattr(cfg.run, key, value)


def check_parts(cfg: Config, vae: VAE, what: str) -> None:
    """Refuse (CheckpointError) a VAE whose parts are of other classes than ``cfg.run`` records.

    Runs saved before parts were recorded (empty fields) are accepted as they are.
    """
    for key, built in _part_classes(vae).items():
        recorded = getattr(cfg.run, key)
        if recorded and built != recorded:
            raise CheckpointError(
                f"{what} was trained with {key.replace('_class', '').replace('_', ' ')} "
                f"{recorded}, but this would load it into {built}; build the VAE from the same "
                f"classes and pass it as vae= (Python), or load the plugin that provides them")


def load_run(run_dir: str | Path, device: str = "cpu", vae: VAE | None = None
             ) -> tuple[Config, VAE, dict[str, Any]]:
    """Rebuild the trained VAE of a run folder from its checkpoint.

    Args:
        run_dir: the run folder.
        device: where to put the model.
        vae: a VAE of the run's own classes to load the weights into (a run trained with
            ``fit(..., vae=...)`` on parts no registry builds); default: built from the config.

    Returns:
        (config, vae in eval mode, the checkpoint's state dict).

    Raises:
        CheckpointError / ConfigError: no run there; a plugin the run needs is not loaded; the
            parts would be of other classes than the run was trained with.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no {CONFIG_FILE})")
    state = load_checkpoint(run_dir / CHECKPOINT_FILE, device)
    require_keys(state, run_dir / CHECKPOINT_FILE)
    # pyro.module hands back a param-store tensor of the same name in preference to the
    # module's own, so a store left over from earlier work would shadow the loaded weights.
    pyro.clear_param_store()
    cfg = Config.from_dict(state["config"])
    require_plugins(cfg.run.plugins, f"run {run_dir}")
    if cfg.train.device == "cuda" and torch.device(device).type != "cuda":
        cfg.train.device = "auto"  # trained on a GPU, loaded where there may be none
    cfg.validate()
    if vae is None:
        vae = VAE.from_config(cfg, tuple(state["image_shape"]))
    vae = vae.to(device)
    check_parts(cfg, vae, f"run {run_dir}")
    try:
        vae.load_state_dict(state["vae"])
    except (KeyError, RuntimeError) as e:
        raise CheckpointError(f"{run_dir / CHECKPOINT_FILE} does not fit the model its config "
                              f"describes ({_short(e)})") from None
    return cfg, vae.eval(), state
