"""Tables resident in transparent huge pages: a private copy of a table that gathers faster.

Pooling is a random gather of rows (Zipf ids scattered over the whole
table).  Over a file map in 4 KiB page-cache pages nearly every row costs a
TLB miss and a page walk: on this host's benchmark shape (8 tables x 200k x
64 fp32, 20 ids per bag) ``embedding_bag`` spends 3.6-3.8 ms of CPU per 1,000
samples over the maps and 2.8-3.2 over the same rows copied into anonymous
memory advised ``MADV_HUGEPAGE`` (2 MiB pages: a 51 MiB table is 26 TLB
entries).  The page cache cannot give a file map huge pages here
(``MADV_COLLAPSE`` on a read-only file map: EINVAL), so the rows are copied.

The price is memory: the copy is private to the process (the page cache's
pages are no longer what it reads; they stay reclaimable).
:func:`resident_copy` therefore copies only when the table fits in a share
of the memory the kernel reports available, and returns None otherwise: the
caller keeps serving from the map.  Nothing here changes a value: the copy
holds the same bytes, read-only.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Mapping

import numpy as np

__all__ = ["HUGE_PAGE", "available_memory", "resident_copies", "resident_copy"]

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_COPY_CHUNK = 64 << 20   # copied in slices: np.copyto releases the GIL, the loop's heartbeat keeps going


def available_memory() -> int | None:
    """``MemAvailable`` in bytes (None where /proc/meminfo does not say)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def resident_copy(table: np.ndarray, budget: int) -> np.ndarray | None:
    """A read-only copy of ``table`` in huge-page-advised anonymous memory, or None.

    None when the copy would exceed ``budget`` bytes or the platform has no
    ``madvise`` (the caller then keeps ``table``).  The copy is C-contiguous
    with ``table``'s dtype and shape; its memory lives as long as the array.
    """
    nbytes = int(table.nbytes)
    if nbytes == 0 or nbytes > budget or not hasattr(mmap.mmap, "madvise"):
        return None
    size = -(-(nbytes + HUGE_PAGE) // HUGE_PAGE) * HUGE_PAGE   # room to start on a 2 MiB boundary
    try:
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(_MADV_HUGEPAGE)
    except (OSError, ValueError) as e:
        logger.info("no huge-page copy of a %d-byte table (%s): pooling from its map", nbytes, e)
        return None
    base = np.frombuffer(region, dtype=np.uint8)
    start = -base.ctypes.data % HUGE_PAGE
    out = base[start:start + nbytes].view(table.dtype).reshape(table.shape)
    src = np.ascontiguousarray(table).reshape(-1).view(np.uint8)
    dst = out.reshape(-1).view(np.uint8)
    for off in range(0, nbytes, _COPY_CHUNK):
        np.copyto(dst[off:off + _COPY_CHUNK], src[off:off + _COPY_CHUNK])
    out.flags.writeable = False
    return out


def resident_copies(tables: Mapping[str, np.ndarray], budget: int | None = None) -> dict[str, np.ndarray]:
    """``tables`` with each one that fits the budget replaced by its :func:`resident_copy` (in order).

    ``budget`` defaults to a quarter of the memory available now, as one
    process holding every table (the monolithic layout, the in-process limit)
    gets; what does not fit stays the caller's array.
    """
    left = (available_memory() or 0) // 4 if budget is None else budget
    out = dict(tables)
    for name, arr in tables.items():
        copy = resident_copy(arr, left)
        if copy is not None:
            left -= copy.nbytes
            out[name] = copy
    return out
