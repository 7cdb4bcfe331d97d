"""Every file the package writes goes through here: atomically, and with OS errors as one line.

A write goes to a temporary file beside its target, is fsynced and renamed over the target
(``os.replace``), and the folder is fsynced; a crash, a full disk (ENOSPC), a read-only file
system (EROFS) or a missing permission (EACCES) at any moment leaves either the old file or the
new one, never a partial one, and no temporary file. Appends to a log (``events.jsonl``) are
cut back to their old length when the write fails. An OS error becomes
:class:`pyro_vae.errors.OutputError`, whose message names the path and the error::

    cannot write runs/x/config.toml: No space left on device (ENOSPC)
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import OutputError


def describe(error: OSError) -> str:
    """``strerror (ENAME)``: what went wrong, in words and as the errno name to search for."""
    name = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error)
    return f"{text} ({name})" if name else text


def output_error(path: str | Path, error: OSError, verb: str = "write") -> OutputError:
    """The one-line error for an OS error while writing ``path``."""
    return OutputError(f"cannot {verb} {path}: {describe(error)}")


def make_folder(folder: str | Path) -> Path:
    """``mkdir -p folder`` with an OS error as :class:`OutputError`."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise output_error(folder, e, "create folder") from None
    return folder


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some file systems cannot open a folder; the rename is done anyway
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file atomically: ``write(f)`` into a temporary file beside ``path``, fsync, rename.

    Raises:
        OutputError: the file cannot be written (the old file, if any, is unchanged and no
            temporary file is left).
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise output_error(path, e) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, e) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_bytes`)."""
    data = text.encode()
    atomic_write_bytes(path, lambda f: f.write(data))


def save_figure(fig: Any, path: str | Path, **savefig_kwargs: Any) -> None:
    """A matplotlib figure rendered in memory, then written atomically (the format follows the
    suffix of ``path``)."""
    path = Path(path)
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip(".") or "png", **savefig_kwargs)
    atomic_write_bytes(path, lambda f: f.write(buffer.getbuffer()))


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to a log file; a failed write is cut back so no partial line remains.

    Raises:
        OutputError: the file cannot be opened or written.
    """
    path = Path(path)
    data = text.encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise output_error(path, e) from None
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError as e:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
            raise output_error(path, e) from None
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_outputs(paths: Iterable[str | Path], folder: str | Path | None = None,
                own_folder: bool = False) -> Iterator[None]:
    """Undo a command's outputs when it fails: the files among ``paths`` that did not exist
    before the block are removed, and so is ``folder`` (and the parents it needed) when the
    block created it and left it empty. ``own_folder``: ``folder`` is the command's own output
    folder, and every file that appears in it during the block counts as an output. A
    command's outputs then appear all together or not at all (files it replaces are each
    replaced atomically)."""
    paths = [Path(p) for p in paths]
    new = [p for p in paths if not p.exists()]
    created: list[Path] = []
    before: set[Path] = set()
    if folder is not None:
        folder = Path(folder).absolute()
        created = [p for p in (folder, *folder.parents) if not p.exists()]
        if own_folder and folder.is_dir():
            before = set(folder.iterdir())
    try:
        yield
    except BaseException:
        if own_folder and folder is not None and folder.is_dir():
            new += [p for p in folder.iterdir() if p not in before and p.is_file()]
        for path in new:
            path.unlink(missing_ok=True)
        for path in created:  # innermost first
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty
        raise


def write_output(path: str | Path, text: str) -> None:
    """A command's single output file: its folder made if needed, the text written atomically;
    on failure neither the file nor a folder made for it is left."""
    path = Path(path)
    with new_outputs([path], path.parent):
        make_folder(path.parent)
        atomic_write_text(path, text)
