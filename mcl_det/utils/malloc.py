"""Keep freed memory in the process on CPU runs (glibc ``mallopt``).

Why: glibc gives every allocation above its mmap threshold (32 MiB at most, by default) its own
mapping and unmaps it on free, and returns the top of the heap to the kernel above its trim
threshold. A CPU training step allocates and frees gigabytes of activations, so every step
page-faults them in again (the kernel zeroes each page). Raising both thresholds keeps freed
buffers for reuse, which is what PyTorch's caching allocator does on a GPU (the measured gain
is in docs/BENCHMARKS.md, from benchmarks/bench_cohort_step.py). The price: the resident
memory stays near the step's peak instead of dropping between steps. Not glibc (macOS, musl):
nothing is changed.
"""

from __future__ import annotations

import ctypes
import platform

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
KEEP_BYTES = 1 << 30  # allocations above 1 GiB still get their own mapping


def keep_freed_memory(threshold: int = KEEP_BYTES) -> bool:
    """Raise glibc's mmap and trim thresholds to ``threshold`` bytes; True if both took effect.

    Affects allocations made after the call, in this process and in children it forks later
    (DataLoader workers); threads' own malloc arenas keep their smaller heaps.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mmap_ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1
    trim_ok = mallopt(M_TRIM_THRESHOLD, threshold) == 1
    return mmap_ok and trim_ok
