"""Keep the process's heap from holding freed memory: glibc's allocator settings, set at run time.

Training layers on batches of varying length allocates and frees activation buffers of ever
new sizes. glibc raises its mmap threshold after each large free (up to 32 MB), so those
buffers come from the heap and the freed space stays with the process: ``--tune top`` on
3,000 Debian texts grew to 2.5 GB RSS within one epoch. A fixed 1 MB threshold returns every
large buffer to the system when it is freed (the same run peaked at 1.5 GB); two arenas stop
threads (prefetch, torch) from each keeping their own. Elsewhere than glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20


def bound_heap() -> bool:
    """Tell glibc's malloc to map large buffers and to keep at most two arenas; whether it could."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to tune
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_ARENA_MAX, 2))
