"""Keep freed memory in the process on Linux/glibc, so that training steps stop paying for page faults.

glibc returns large freed blocks to the kernel (blocks over the mmap threshold are unmapped at once; the top of
the heap is trimmed). A CPU training step frees and re-allocates the same activation-sized buffers (tens of MB)
every iteration, so each step faults every page of them back in: on a 2-core Xeon that made max-pool's
backward (which zero-fills a fresh gradient buffer) cost more than the convolutions. Raising the thresholds keeps
those pages mapped and reused: `python bench/classification.py --skip-recipes` measured FastNet's step at batch
512 (bf16, channels_last) 141.6 -> 116.4 ms, about what LD_PRELOADing tcmalloc gives, without a dependency.
The cost is a larger resident set, which plateaus at the step's peak working set.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8  # from glibc's malloc.h
_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's ceiling for this setting on 64-bit
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 256 * 1024 * 1024

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the thresholds once per process; True when they are in force (False off glibc, e.g. macOS, musl)."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD)))
    return _applied


def release_freed_memory() -> bool:
    """Hand memory that is free inside the process back to the kernel (glibc's malloc_trim), after something large
    was released: an unloaded model version. Its ONNX Runtime arenas and buffers, freed while other threads kept
    allocating, leave free pages scattered through the heaps that glibc does not return on its own; a server that
    loads and unloads versions under traffic then grows by the size of those holes at each cycle (seen: about
    12 MB/min in bench/soak.py). True when it ran (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (default 8 per core) for a long-lived server, before its threads start. Each
    thread that meets contention gets an arena of its own; a server whose ONNX Runtime threads come and go with
    every loaded and unloaded version spreads its free pages over more and more arenas. Loading and unloading a
    version 150 times grew the resident set by 20 MB with the default and 7.5 MB with 2 arenas (2 cores). True
    when it applied (Linux with glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc.mallopt(_M_ARENA_MAX, max(1, int(arenas))) == 1
    except (OSError, AttributeError):
        return False
