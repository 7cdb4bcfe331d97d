"""Progress of long computations, fitted to where it goes.

On a terminal a tqdm bar; elsewhere (a log file, a cluster job) a line on the
``pyro_vae.progress`` logger at most every ``every`` seconds, with the rate and an ETA. The
library only logs: the command line (:mod:`pyro_vae.app.cli`) attaches the handler that prints
those lines, and ``--quiet`` leaves it off. From Python, ``logging.basicConfig(level="INFO")``
shows them.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

LOG = logging.getLogger("pyro_vae.progress")


def on_terminal() -> bool:
    """Whether stderr is a terminal (a bar redraws in place there; a log needs lines)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """``update(n)`` as work gets done; ``close()`` at the end (or use it as a context manager).

    Args:
        total: units of work (images, steps).
        what: what is being done, e.g. "log-likelihood".
        unit: name of a unit, e.g. "images".
        enabled: False turns it off entirely.
        every: seconds between log lines when stderr is not a terminal.
    """

    def __init__(self, total: int, what: str, unit: str = "it", enabled: bool = True,
                 every: float = 30.0):
        self.total, self.what, self.unit, self.every = total, what, unit, every
        self.done = 0
        self.start = self._last = time.perf_counter()
        self.bar: Any = None
        self.enabled = enabled
        if enabled and on_terminal():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=what, unit=f" {unit}", leave=False)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            LOG.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.perf_counter()) - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta_text = _duration(eta) if eta == eta else "unknown"
        return (f"{self.what}: {self.done}/{self.total} {self.unit}, {_duration(elapsed)} "
                f"elapsed, ETA {eta_text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
