"""Atomic checkpoint files, loaded without unpickling arbitrary objects."""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, OutputError
from ..files import atomic_write_bytes, atomic_write_text  # noqa: F401 - re-exported


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Save ``state`` (tensors, numbers, strings, lists and dicts of them) atomically.

    Raises:
        CheckpointError: if the file cannot be written (disk full, no permission); the
            previous checkpoint, if any, is left as it was.
    """
    # Serialize in memory first: torch.save turns a failing file write into an obscure
    # RuntimeError, a plain write reports OSError (e.g. ENOSPC) as it is.
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        atomic_write_bytes(path, lambda f: f.write(buffer.getbuffer()))
    except OutputError as e:
        raise OutputError(f"{e}; the previous checkpoint, if any, is unchanged") from None


def _unpickling_reason(error: Exception) -> str:
    """The line of torch's long weights-only error that names what was refused."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    match = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if match:
        return f"it asks to run or build {match.group(1)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "refused by the weights-only unpickler"


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only.

    Raises:
        CheckpointError: if the file is missing, corrupt, or holds anything else (a pickle
            that would construct arbitrary objects or run code is refused, never executed).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refusing to load {path}: it is not a plain-tensor checkpoint "
                              f"({_unpickling_reason(e)}); never load it with "
                              f"weights_only=False unless you trust its source") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is unreadable or corrupt: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(state, dict) or "format" not in state:
        raise CheckpointError(f"{path} is not a pyro_vae checkpoint")
    return state


def require_keys(state: dict[str, Any], path: str | Path,
                 keys: tuple[str, ...] = ("config", "image_shape", "vae")) -> None:
    """CheckpointError unless a run's checkpoint holds ``keys`` (what load_run and --resume
    read)."""
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it has no {', '.join(missing)} "
                              f"(saved by another program, or edited)")
