"""Keep freed heap memory for the next batch instead of handing it back to the kernel (glibc only).

Every batch allocates and frees the same few MiB (a 2048-sample lookup: the
4 MiB combine accumulators, the reply, the request's ids), mostly on one
thread and freed on another.  glibc's defaults give them back: a chunk past
the dynamic mmap threshold is ``munmap``ed when freed, and a thread arena's
heap is shrunk with ``MADV_DONTNEED`` whenever its free top passes the trim
threshold (128 KiB by default).  The next batch then faults every page in
again and the kernel zeroes each one.  In ``perf`` that was 13% of the
ranker's CPU under the ranker benchmark (page faults, ``clear_page``,
unmaps); with the two thresholds raised, the ranker's CPU per 1,000 lookups
fell by 18-30% (docs/PERFORMANCE.md, *Where the time goes*).  The embedding
servers' page faults were 0.8% of their CPU while they pooled on worker
threads; pooling on the event loop (one worker) they became 7%, so the
servers raise the thresholds too.

:func:`retain_freed_memory` raises both with ``mallopt``, once per process.
What a process holds then stays near its peak, which the daemon's in-flight
limits already bound; it is not returned between batches.  On a libc
without ``mallopt`` (musl, macOS) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD = 256 << 20   # free heap top kept per arena before glibc trims it
MMAP_THRESHOLD = 32 << 20    # allocations from here on get their own mapping (glibc's maximum on 64-bit)


def retain_freed_memory(trim_threshold: int = TRIM_THRESHOLD, mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if both took effect."""
    if trim_threshold <= 0 or mmap_threshold <= 0:
        raise ValueError(f"thresholds must be > 0, got trim {trim_threshold} and mmap {mmap_threshold}")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        logger.info("this libc has no mallopt: freed memory is returned to the kernel as usual")
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold)) and bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold))
    if not ok:
        logger.warning("mallopt refused trim threshold %d / mmap threshold %d", trim_threshold, mmap_threshold)
    return ok
