"""Keep the process's heap from holding freed memory: glibc's allocator settings, set at run time.

Training layers on batches of varying length allocates and frees activation buffers of ever
new sizes. glibc raises its mmap threshold after each large free (up to 32 MB), so those
buffers come from the heap and the freed space stays with the process: ``--tune top`` on
3,000 Debian texts grew to 2.5 GB RSS within one epoch. A fixed 1 MB threshold returns every
large buffer to the system when it is freed (the same run peaked at 1.5 GB); two arenas stop
threads (prefetch, torch, ingest's commit thread) from each keeping their own. Elsewhere than
glibc this does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
MMAP_THRESHOLD = 1 << 20
ARENAS = 2


def _mallopt():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt): nothing to tune
        return None


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Tell glibc's malloc to keep at most ``arenas`` heaps, whatever the threads; whether it could.

    glibc gives each new thread a heap of its own; batches made in fit-head's prefetch thread
    and freed in the training thread then fragment them, and RSS creeps up by ~100 MB over the
    epochs. Two are plenty for ew, whose heavy allocations go to DuckDB's and Arrow's allocators.
    """
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, arenas))


def bound_heap() -> bool:
    """Tell glibc's malloc to map large buffers and to keep at most two arenas; whether it could."""
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and limit_arenas()
