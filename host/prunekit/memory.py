"""Keeping a command's peak resident memory near what it must hold.

glibc keeps the memory of freed tensors (the float masks baked by ``finalize``, selection scores) in its
heap rather than giving it back, so the next stage's allocations land on top of it and the peak grows by
each stage's leftovers. ``release()`` hands that memory back between stages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from functools import cache


@cache
def _malloc_trim() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim: nothing to hand back
        return None


def release() -> None:
    """Collect garbage and return the allocator's free memory to the system (a no-op off glibc)."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB, macOS in bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
