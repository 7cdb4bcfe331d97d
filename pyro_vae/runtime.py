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

import torch


def apply_threads(threads: int) -> None:
    """``torch.set_num_threads(threads)``, or leave torch's default (one per core) for 0."""
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
