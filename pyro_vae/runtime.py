"""Process-level settings for the command line and benchmark scripts (never set on import).

The heavy CPU paths (gradient draws, importance sampling) allocate and free tens of megabytes
of temporaries per step. glibc returns each such block to the kernel with ``munmap`` and the
next allocation faults every page back in, which costs as much as the arithmetic on it:
a bf16-to-float32 copy of a fresh 8 MB tensor runs at half speed. Raising glibc's mmap and trim
thresholds keeps freed blocks in the process for reuse.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import time

import torch

from .errors import ConfigError, ResourceError


def apply_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``, or leave torch's default (one per core) for 0.

    Raises:
        ConfigError: for more threads than CPU cores (torch's thread pool crashes the process
            at tens of thousands, and more threads than cores only wait for each other).
    """
    cores = os.cpu_count() or 1
    if threads > cores:
        raise ConfigError(f"train.threads = {threads} is more than the {cores} CPU cores here; "
                          f"ask for at most {cores}, or 0 for one per core")
    if threads:
        torch.set_num_threads(threads)


#: glibc ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def reuse_freed_memory(limit_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks up to ``limit_bytes`` in the heap; True if glibc accepted it.

    A no-op (False) on systems without glibc. Affects the whole process, so only programs that
    own their process (``pyro-vae``, the scripts) call it.
    """
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, limit_bytes)) and \
        bool(mallopt(_M_TRIM_THRESHOLD, limit_bytes))


# -- memory bounds ---------------------------------------------------------------------------------
#: The memory limit that :func:`check_memory` enforces: "auto" (the memory available now), None
#: (no check) or a number of bytes. Set by ``--memory-limit`` or :func:`set_memory_limit`.
_memory_limit: int | str | None = "auto"
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int | str | None:
    """``"64G"``, ``"512M"``, ``"1000000"`` -> bytes; ``"auto"``; ``"off"`` -> None.

    Raises:
        ConfigError: for anything else.
    """
    value = text.strip().upper().removesuffix("B").removesuffix("I")
    if value in ("AUTO", "OFF", "NONE"):
        return None if value in ("OFF", "NONE") else "auto"
    number, unit = (value[:-1], value[-1]) if value[-1:] in _UNITS and value[-1:] else (value, "")
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if not math.isfinite(amount) or amount <= 0:
        raise ConfigError(f"--memory-limit {text!r} is invalid: give a size such as 16G or "
                          f"512M, auto (the memory available) or off")
    return int(amount * _UNITS[unit])


def set_memory_limit(limit: int | str | None) -> None:
    """Set the limit of :func:`check_memory`: bytes, a size such as ``"64G"``, ``"auto"`` (the
    default: the memory available when the check runs) or ``None``/``"off"`` (no check)."""
    global _memory_limit
    _memory_limit = parse_size(limit) if isinstance(limit, str) else limit


def available_memory() -> int | None:
    """Bytes this process can still allocate: the kernel's MemAvailable, capped by the cgroup
    limit (containers); None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap != "max":
            with open("/sys/fs/cgroup/memory.current") as f:
                found.append(int(cap) - int(f.read().strip()))
    except (OSError, ValueError):
        pass
    if not found and hasattr(os, "sysconf"):
        try:
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return max(0, min(found)) if found else None


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"  # pragma: no cover


def check_memory(estimate: float, what: str, fix: str) -> None:
    """Refuse, before allocating, a computation whose memory estimate exceeds the limit.

    Args:
        estimate: the bytes the computation needs at its peak, estimated from its sizes.
        what: the computation, as the message names it (``"sample --num-images 100000000"``).
        fix: what to change instead (``"ask for fewer images"``).

    Raises:
        ResourceError: one line naming the estimate, the limit and the way out.
    """
    limit = available_memory() if _memory_limit == "auto" else _memory_limit
    if limit is None or estimate <= limit:
        return
    source = "available" if _memory_limit == "auto" else "allowed by --memory-limit"
    raise ResourceError(f"{what} needs about {human_bytes(estimate)} of memory but "
                        f"{human_bytes(limit)} is {source}; {fix}, or set --memory-limit "
                        f"(Python: pyro_vae.runtime.set_memory_limit) if the estimate is wrong")


# -- how much of the machine a benchmark had ------------------------------------------------------
def gemm_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 5) -> float:
    """Measured GFLOP/s of a large square matmul: the practical peak for ``dtype`` at this
    moment (benchmarks report rates against it, since a shared machine's speed varies)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def cpu_ticks() -> list[int]:
    """The machine-wide CPU time counters of /proc/stat (user, nice, system, idle, iowait,
    irq, softirq, steal), or an empty list where there are none."""
    try:
        with open("/proc/stat") as f:
            return [int(t) for t in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return []


def busy_report(before: list[int], after: list[int], own_cpu: float, wall: float) -> str:
    """How much of the machine this process had between two :func:`cpu_ticks`: its CPU time
    per wall second, the time other processes ran, and the time the hypervisor took (steal)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    if not before or not after:
        return f"load {load:.1f}"
    d = [b - a for a, b in zip(before, after, strict=True)]
    hz = os.sysconf("SC_CLK_TCK")
    total = sum(d) / hz  # cpu-seconds available to the guest
    busy = (d[0] + d[1] + d[2] + d[5] + d[6]) / hz
    others = max(0.0, busy - own_cpu)
    return (f"this process {own_cpu / wall:.2f} cores, others {others / wall:.2f} cores, "
            f"steal {100 * d[7] / max(1, sum(d)):.0f}% of {total / wall:.1f} cores, "
            f"load {load:.1f}")
