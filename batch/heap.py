"""The C heap of a process that is one wsbatch command."""

from __future__ import annotations

import ctypes
import sys

# glibc's mallopt parameter for the most heaps (arenas) malloc keeps.
_M_ARENA_MAX = -8


def one_malloc_arena() -> None:
    """Keep every thread's C allocations in one heap (glibc only; elsewhere nothing).

    glibc gives each thread that allocates its own heap, and what a heap frees it keeps.
    A run hands output writes, hashing and ledger syncs to worker threads, and each of
    their heaps grew by what the rows before needed and kept it: at 50k rows about
    7 MB, a quarter of what a fresh run grew by. The threads mostly wait on the disk,
    so sharing one heap costs them nothing measurable. Set before any worker thread
    starts; a library caller's process is left as it is.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (musl keeps one heap anyway)
        return
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt(_M_ARENA_MAX, 1)
