"""The client's side of shared-memory replies: a sealed memfd cut into slots, leased to returned arrays.

``ReplyRegion`` owns one anonymous shared region (``os.memfd_create``, sealed
against shrinking and growing so the ranker that maps it can never fault on
it) divided into ``slots`` equal slots::

    offset 0          slot_bytes        2*slot_bytes      n*slot_bytes        region_bytes
    +-----------------+-----------------+--- ... ---+------------+------------------+
    | slot 0          | slot 1          |           | slot n-1   | request area     |
    +-----------------+-----------------+--- ... ---+------------+------------------+

The request area (``request_bytes``, 0: none) is where the client writes each
request's payload once for the ranker to read (flexemr.wire.requestslot): one
request at a time, the next one only after the previous one was answered.

A slot is *free*, *named* (a request in flight asked the ranker to write its
answer there) or *leased* (arrays returned to the caller point into it).
``acquire`` hands out a free slot (None when every slot is named or leased:
the caller then asks for a normal frame, it never waits); ``lease`` turns the
answer's bytes into a buffer whose owner object sits at the bottom of every
derived array's ``.base`` chain, and ``weakref.finalize`` on that owner frees
the slot once the last such array is garbage; ``release`` frees a named slot
whose answer came by frame (or not at all).

Free slots live in a deque (append and pop are atomic in CPython), so a
finalizer that runs inside ``acquire`` (garbage collection can start at any
allocation) cannot deadlock on a lock.  They are reused last-freed first: a
caller that drops each answer before the next call keeps writing the same
slot, whose pages are already mapped on both sides and warm in cache; the
other slots' pages are never touched (a memfd's pages cost memory only once
written).
"""

from __future__ import annotations

import collections
import fcntl
import mmap
import os
import weakref

import numpy as np

from flexemr.wire.replyslot import MIN_SLOT_BYTES, SLOT_ALIGN

DEFAULT_REGION_BYTES = 32 << 20     # 4 slots of 8 MiB: a 2048-sample lookup of 8 x 64-dim tables is 4 MiB
DEFAULT_SLOTS = 4
DEFAULT_REQUEST_BYTES = 8 << 20     # a 2048-sample predict of 8 tables x 20 ids (int32) + 13 dense is 1.5 MiB
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


class Slot:
    """One slot of a region: where the ranker may write an answer."""

    __slots__ = ("index", "offset", "capacity")

    def __init__(self, index: int, offset: int, capacity: int) -> None:
        self.index = index
        self.offset = offset
        self.capacity = capacity

    def __repr__(self) -> str:
        return f"Slot({self.index}, offset={self.offset}, capacity={self.capacity})"


class _Lease:
    """Bottom of the ``.base`` chain of the arrays over one slot: while it lives, the slot stays leased.

    It exports the slot's bytes through ``__array_interface__`` (``np.asarray(lease).base is lease``) and
    keeps the region's mapping alive, so the memory outlives the client if the arrays do.
    """

    __slots__ = ("__array_interface__", "_mapping", "__weakref__")

    def __init__(self, mapping: np.ndarray, offset: int, nbytes: int) -> None:
        self._mapping = mapping
        self.__array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "version": 3,
                                    "data": (mapping.ctypes.data + offset, False)}


class ReplyRegion:
    """A sealed memfd: ``slots`` reply slots in ``region_bytes``, then a request area of ``request_bytes``."""

    def __init__(self, region_bytes: int = DEFAULT_REGION_BYTES, slots: int = DEFAULT_SLOTS,
                 request_bytes: int = 0) -> None:
        self.check_size(region_bytes, slots)
        self.check_request_size(request_bytes)
        self.slot_bytes = (region_bytes // slots) & ~(SLOT_ALIGN - 1)
        self.request_offset = self.slot_bytes * slots
        self.request_capacity = request_bytes & ~(SLOT_ALIGN - 1)
        self.region_bytes = self.request_offset + self.request_capacity
        self.fd = os.memfd_create("flexemr-replies", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.region_bytes)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS)
            self._mmap = mmap.mmap(self.fd, self.region_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self._bytes = np.frombuffer(self._mmap, np.uint8)
        self._slots = [Slot(i, i * self.slot_bytes, self.slot_bytes) for i in range(slots)]
        self._free: collections.deque[int] = collections.deque(range(slots - 1, -1, -1))   # slot 0 first
        self._leased = 0

    @staticmethod
    def check_size(region_bytes: int, slots: int) -> None:
        """ValueError naming the argument when a region of ``region_bytes`` cannot hold ``slots`` slots."""
        if not isinstance(slots, int) or isinstance(slots, bool) or slots < 1:
            raise ValueError(f"reply_slots: must be a whole number of at least 1, got {slots!r}")
        if not isinstance(region_bytes, int) or isinstance(region_bytes, bool) or region_bytes < slots * MIN_SLOT_BYTES:
            raise ValueError(f"reply_region_bytes: must be at least {MIN_SLOT_BYTES} bytes per slot ({slots} slots: "
                             f"{slots * MIN_SLOT_BYTES}), got {region_bytes!r}")

    @staticmethod
    def check_request_size(request_bytes: int) -> None:
        """ValueError naming the argument when ``request_bytes`` is no size for a request area (0: none)."""
        if not isinstance(request_bytes, int) or isinstance(request_bytes, bool) or \
                (request_bytes != 0 and request_bytes < MIN_SLOT_BYTES):
            raise ValueError(f"request_region_bytes: must be 0 (no request area) or at least {MIN_SLOT_BYTES} "
                             f"bytes, got {request_bytes!r}")

    @property
    def request_area(self) -> np.ndarray:
        """The request area as a uint8 array (empty without one): write a request's payload here only once
        the previous request on this region was answered (``codec.write_client_request``)."""
        return self._bytes[self.request_offset : self.request_offset + self.request_capacity]

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def leased_slots(self) -> int:
        """Slots held by arrays a caller still has."""
        return self._leased

    def acquire(self) -> Slot | None:
        """A free slot to name in a request, or None when all are named or leased (use a normal frame)."""
        try:
            return self._slots[self._free.pop()]
        except IndexError:
            return None

    def release(self, slot: Slot) -> None:
        """Free a named slot the ranker did not answer into."""
        self._free.append(slot.index)

    def lease(self, slot: Slot, offset: int, nbytes: int) -> memoryview:
        """The answer's bytes ``[offset, offset + nbytes)`` of the region, inside ``slot``, as a buffer that
        keeps the slot leased until it and every array made from it are garbage.  ValueError if the
        ranker's descriptor points outside the slot named (the slot stays named: release it)."""
        if offset != slot.offset or nbytes > slot.capacity:
            raise ValueError(f"the ranker answered into [{offset}, {offset + nbytes}) but the request named "
                             f"slot [{slot.offset}, {slot.offset + slot.capacity})")
        owner = _Lease(self._bytes, offset, nbytes)
        self._leased += 1
        weakref.finalize(owner, self._unlease, slot.index)
        return memoryview(np.asarray(owner)).cast("B")

    def _unlease(self, index: int) -> None:
        self._leased -= 1
        self._free.append(index)

    def close(self) -> None:
        """Close the descriptor; the mapping goes once nothing points into it (leased arrays keep it)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
