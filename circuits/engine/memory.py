"""Keep freed large buffers for reuse instead of handing them back to the OS after every step.

glibc's malloc serves blocks above its mmap threshold with a fresh ``mmap`` and trims freed
memory at the heap's top, so a loop that allocates the same 8-100 MB activations each step
page-faults them in again every time. On this project's 2-core CPU that made a fresh 105 MB
``pow`` cost 88 ms against 18 ms into a reused buffer (measured; docs/benchmarks.md). Raising
the mmap and trim thresholds lets the heap keep and reuse those blocks, the effect PyTorch's
CPU tuning guide gets from jemalloc or tcmalloc, without preloading another allocator.

The setting is process-wide and only changes when memory returns to the OS, never a result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30
_done: list[bool] = []


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds to 1 GiB (once per process).

    Returns whether the setting is in effect; elsewhere than glibc Linux it does nothing.
    """
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(
                libc.mallopt(_M_TRIM_THRESHOLD, _THRESHOLD)
            )
        except (OSError, AttributeError):
            ok = False
    _done.append(ok)
    return ok
