"""Seqlocked storage in the control segment: stats rows, the runtime area, the topology area.

Layout (offsets, dtypes) is in :mod:`flexemr.control.layout`; this module only reads and
writes it.  Every stats row starts with ``seq`` (u64).  **One writer per row** is what
makes a seqlock correct (threads of that process are serialised by a lock in
the ControlBlock object), so fields an entity has from two processes live in
two rows (``engine_proc`` from the supervisor, ``engine_stats`` from the
engine), and connection stats are a matrix with one row per (engine, conn):
whichever engine owns a connection writes only its own row, so a migration
never has two writers on one row; readers sum the counters over engines and
take the gauges from the most recently written row.

Seqlock write order (one update = one seqlock write, a few µs from Python)::

    writer: seq = s+1 (odd) ; store fields ; seq = s+2 (even)
    reader: s1 = seq ; odd -> retry ; copy row bytes ; s2 = seq ; s1 != s2 -> retry

x86-64 is TSO: stores become visible in program order and loads are not
reordered with older loads, and CPython performs the stores of separate
statements in program order, so a reader that sees the same even ``seq``
before and after its copy copied a row no writer touched in between (the same
argument as the data-path ring in :mod:`flexemr.ring.layout`).  A writer that
died between its two ``seq`` stores leaves ``seq`` odd: readers give up once
``seq`` has stayed at the same odd value for READ_GIVE_UP_S and return the last
consistent copy that reader object took (what they copied when they have none),
and the next writer of that row (the restarted engine) starts from the next
even value.  A ``seq`` that keeps moving is a live writer, however busy or
descheduled: the reader keeps retrying and never returns a mixed copy of it.
"""

from __future__ import annotations

import json
import mmap
import os
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from flexemr.control.layout import (
    RT_CACHE_CAPACITY,
    RT_CACHE_POLICY,
    RT_EPOCH,
    RT_OWNERS,
    RT_PUBLICATIONS,
    RT_REBALANCE,
    TOPO_DATA_OFF,
)
from flexemr.errors import ControlError
from flexemr.types import CacheMode

__all__ = ["READ_GIVE_UP_S", "Row", "Runtime", "RuntimeState", "Section", "TopologyArea", "load_blob",
           "store_blob"]

# A writer that died mid-update must not hang readers; one descheduled mid-update on a
# loaded host (0.1 s happens at load 30 on 2 cores) must not be taken for dead.
READ_GIVE_UP_S = 0.5
READ_CAP_S = 2.0      # ...nor a writer that never pauses (none does: rows are written per batch)


class _Patience:
    """When a reader should stop retrying: its guard word stuck at one odd value for READ_GIVE_UP_S.

    Only a writer that stopped between its two guard stores leaves the word
    odd and unchanged; a word that moves belongs to a live writer, and giving
    up on it would hand out a torn copy (a busy writer makes every read race).
    """

    __slots__ = ("_word", "_since", "_cap")

    def __init__(self) -> None:
        self._word = -1
        self._since = 0.0
        self._cap = time.monotonic() + READ_CAP_S

    def exhausted(self, word: int) -> bool:
        """Called after a failed attempt that saw ``word``; True once the writer looks dead."""
        now = time.monotonic()
        if now > self._cap:
            return True
        if not word & 1:
            self._word = -1     # even: the writer finished between our loads; it is alive
            return False
        if word != self._word:
            self._word, self._since = word, now
            return False
        return now - self._since > READ_GIVE_UP_S


# ---------------------------------------------------------------------- seqlocked blobs
#
# A blob (a JSON document: the topology here, an embedding server's status in
# embedding_status.py) is guarded by two u64 words: words[0] the generation
# (the seq, odd while a write is under way), words[1] the stored length.


def store_blob(mm: mmap.mmap, words: np.ndarray, lo: int, data: bytes) -> int:
    """Store ``data`` at ``mm[lo:]`` as one seqlock write (its one writer only); returns the new generation word."""
    g = int(words[0])
    g += g & 1                     # a writer that died mid-update left it odd
    words[0] = g + 1
    try:
        mm[lo:lo + len(data)] = data
        words[1] = len(data)
    finally:
        words[0] = g + 2
    return g + 2


def load_blob(mm: mmap.mmap, words: np.ndarray, lo: int, cap: int, what: str) -> tuple[int, bytes]:
    """(generation word, bytes) of a consistent copy of the blob (at most ``cap`` bytes); lock-free.

    Gives up with ControlError naming ``what`` when a writer stays mid-update
    longer than READ_GIVE_UP_S (it died there).
    """
    patience = _Patience()
    while True:
        g1 = int(words[0])
        if not g1 & 1:
            data = mm[lo:lo + min(int(words[1]), cap)]
            if int(words[0]) == g1:
                return g1, data
        if patience.exhausted(int(words[0])):
            raise ControlError(f"{what} is being rewritten by a writer that stopped")
        os.sched_yield()


class Section:
    """A numpy structured array over one section plus per-field column views (built once)."""

    __slots__ = ("name", "arr", "cols", "seq", "fields", "offset", "row_bytes", "dtype", "lock")

    def __init__(self, name: str, mm: mmap.mmap, offset: int, count: int, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.offset = offset
        self.row_bytes = dtype.itemsize
        self.arr = np.ndarray((count,), dtype=dtype, buffer=mm, offset=offset)
        # column views make a field store one numpy setitem (~0.1 µs), no row object
        self.cols = {n: self.arr[n] for n in dtype.names}
        self.seq = self.cols.get("seq")
        self.fields = frozenset(n for n in dtype.names if n != "seq")
        # serialises writer THREADS of this process (a publisher thread and the batcher
        # may both write the ranker row); uncontended it costs ~0.1 µs per update
        self.lock = threading.Lock()

    def _check(self, names: Any) -> None:
        if not self.fields.issuperset(names):
            bad = sorted(set(names) - self.fields)
            raise ValueError(f"{self.name}: unknown field(s) {', '.join(bad)} "
                             f"(known: {', '.join(sorted(self.fields))})")

    def update_all(self, add: bool, values: Mapping[str, Any]) -> None:
        """One seqlock write on every row at once (vectorised: per-table counters per batch)."""
        self._check(values.keys())
        seq = self.seq
        with self.lock:
            start = seq + (seq & 1)  # recover rows whose previous writer died mid-update
            seq[:] = start + 1
            try:
                for k, v in values.items():
                    if add:
                        self.cols[k][:] += np.asarray(v, dtype=self.dtype[k])
                    else:
                        self.cols[k][:] = v
            finally:
                seq[:] = start + 2


class Row:
    """One seqlocked row: exactly one writer process, any number of lock-free readers.

    Threads of the writer process may share it (through one ControlBlock: a
    per-section lock serialises them); readers never take a lock.
    """

    __slots__ = ("_sec", "_i", "_mm", "_lo", "_hi", "label", "_last")

    def __init__(self, section: Section, index: int, mm: mmap.mmap, label: str) -> None:
        self._sec = section
        self._i = index
        self._mm = mm
        self._lo = section.offset + index * section.row_bytes
        self._hi = self._lo + section.row_bytes
        self.label = label
        self._last: bytes | None = None   # the last consistent copy: what a stopped writer leaves readers

    def update(self, **fields: float) -> None:
        """Store ``fields`` as one consistent change (writer only; no JSON, no syscalls)."""
        self._write(fields, add=False)

    def add(self, **deltas: float) -> None:
        """Add to counters as one consistent change (safe: this process is the row's only writer)."""
        self._write(deltas, add=True)

    def _write(self, values: Mapping[str, float], add: bool) -> None:
        """One seqlock write of this row: set ``values``, or add them to the counters."""
        sec, i = self._sec, self._i
        if not sec.fields.issuperset(values):
            sec._check(values)
        seq, cols = sec.seq, sec.cols
        with sec.lock:
            s = int(seq[i])
            s += s & 1  # previous writer died between its two seq stores
            seq[i] = s + 1
            try:
                if add:
                    for k, v in values.items():
                        col = cols[k]
                        col[i] = col[i] + v
                else:
                    for k, v in values.items():
                        cols[k][i] = v
            finally:
                seq[i] = s + 2

    def read_raw(self) -> np.void:
        """A consistent copy of the row (a numpy record that no longer refers to the segment)."""
        seq, i, mm, lo, hi = self._sec.seq, self._i, self._mm, self._lo, self._hi
        attempt = 0
        patience = _Patience()
        while True:
            s1 = int(seq[i])
            if not s1 & 1:
                data = mm[lo:hi]
                if int(seq[i]) == s1:
                    self._last = data
                    break
            attempt += 1
            if attempt > 8:
                # the writer is mid-update or busy: let it run; give up only on one that stopped
                os.sched_yield()
                if patience.exhausted(int(seq[i])):
                    # its writer died mid-update: the last copy known whole, else best effort
                    data = self._last if self._last is not None else mm[lo:hi]
                    break
        return np.frombuffer(data, dtype=self._sec.dtype)[0]

    def read(self) -> dict[str, Any]:
        """A consistent copy of the row as a dict of Python numbers (``seq`` included)."""
        raw = self.read_raw()
        return dict(zip(self._sec.dtype.names, raw.item()))

    def __repr__(self) -> str:
        return f"Row({self.label})"


@dataclass(frozen=True)
class RuntimeState:
    """A consistent copy of the runtime area."""

    epoch: int
    owners: tuple[int, ...]
    cache_policy: CacheMode
    cache_capacity_bytes: int
    rebalance: bool
    publications: int

    def connections_of(self, engine: int) -> list[int]:
        """Connections that ``engine`` owns under this epoch."""
        return [c for c, e in enumerate(self.owners) if e == engine]


class Runtime:
    """Mutable control state: conn->engine owners, desired cache settings, rebalance switch.

    The supervisor ``publish``es; the data path polls :attr:`epoch` between
    batches and calls :meth:`read` only when it changed.
    """

    __slots__ = ("_w", "_owners", "_mm", "_lo", "_hi", "n_connections", "_lock")

    def __init__(self, mm: mmap.mmap, offset: int, n_connections: int) -> None:
        self.n_connections = n_connections
        self._mm = mm
        self._w = np.ndarray((RT_OWNERS,), dtype="<u8", buffer=mm, offset=offset)
        self._owners = np.ndarray((n_connections,), dtype="<i8", buffer=mm, offset=offset + 8 * RT_OWNERS)
        self._lo = offset
        self._hi = offset + 8 * (RT_OWNERS + n_connections)
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        """The current epoch: one aligned u64 load, cheap enough to poll between batches."""
        return int(self._w[RT_EPOCH])

    def read(self) -> RuntimeState:
        """A consistent copy of the whole area."""
        w, mm = self._w, self._mm
        data = b""
        patience = _Patience()
        while True:
            e1 = int(w[RT_EPOCH])
            if not e1 & 1:
                data = mm[self._lo:self._hi]
                if int(w[RT_EPOCH]) == e1:
                    break
            if patience.exhausted(int(w[RT_EPOCH])):
                data = mm[self._lo:self._hi]    # the supervisor died mid-publish: best effort
                break
            os.sched_yield()
        words = np.frombuffer(data, dtype="<u8", count=RT_OWNERS)
        owners = np.frombuffer(data, dtype="<i8", offset=8 * RT_OWNERS)
        return RuntimeState(epoch=int(words[RT_EPOCH]), owners=tuple(int(x) for x in owners),
                            cache_policy=CacheMode(int(words[RT_CACHE_POLICY])),
                            cache_capacity_bytes=int(words[RT_CACHE_CAPACITY]),
                            rebalance=bool(words[RT_REBALANCE]), publications=int(words[RT_PUBLICATIONS]))

    def publish(self, *, owners: Mapping[int, int] | Sequence[int] | None = None,
                cache_policy: CacheMode | str | None = None, cache_capacity_bytes: int | None = None,
                rebalance: bool | None = None) -> int:
        """Change the runtime state as one consistent update and return the new epoch (supervisor only).

        ``owners`` is either a full list (one engine per connection) or a
        mapping of just the connections that move.  Validate ids before calling
        (``ControlBlock.set_owner`` does).
        """
        policy = None if cache_policy is None else CacheMode.parse(cache_policy)
        if owners is not None and not isinstance(owners, Mapping) and len(owners) != self.n_connections:
            raise ValueError(f"owners has {len(owners)} entries, expected {self.n_connections}")
        w = self._w
        with self._lock:
            e = int(w[RT_EPOCH])
            e += e & 1
            w[RT_EPOCH] = e + 1
            try:
                if isinstance(owners, Mapping):
                    for c, eng in owners.items():
                        self._owners[c] = eng
                elif owners is not None:
                    self._owners[:] = owners
                if policy is not None:
                    w[RT_CACHE_POLICY] = int(policy)
                if cache_capacity_bytes is not None:
                    w[RT_CACHE_CAPACITY] = cache_capacity_bytes
                if rebalance is not None:
                    w[RT_REBALANCE] = int(bool(rebalance))
                w[RT_PUBLICATIONS] += 1
            finally:
                w[RT_EPOCH] = e + 2
        return e + 2


class TopologyArea:
    """The topology JSON (servers, connections, mode): seqlocked by its generation word.

    Written by the supervisor only (one writer; its threads serialise on a
    lock); read by the control path, which parses it again only when the
    generation changed.
    """

    __slots__ = ("_mm", "_off", "_w", "_cache", "_lock", "name")

    def __init__(self, mm: mmap.mmap, offset: int, name: str) -> None:
        self.name = name
        self._mm = mm
        self._off = offset
        self._w = np.ndarray((3,), dtype="<u8", buffer=mm, offset=offset)
        self._cache: tuple[int, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    @staticmethod
    def encode(topology: Mapping[str, Any]) -> bytes:
        """The stored form: compact, key-sorted JSON."""
        try:
            return json.dumps(dict(topology), sort_keys=True, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise ValueError(f"topology must be JSON-serialisable: {e}") from None

    def read(self) -> tuple[int, dict[str, Any]]:
        """(generation, topology dict); parsed again only when the generation changed."""
        cached = self._cache
        if cached is not None and cached[0] == int(self._w[0]):
            return cached[0] // 2, cached[1]
        g1, data = load_blob(self._mm, self._w, self._off + TOPO_DATA_OFF, int(self._w[2]),
                             f"{self.name}: topology")
        topo = json.loads(data.decode()) if data else {}
        self._cache = (g1, topo)
        return g1 // 2, topo

    def write(self, topology: Mapping[str, Any]) -> int:
        """Supervisor side: replace the topology JSON; returns the new generation."""
        data = self.encode(topology)
        cap = int(self._w[2])
        if len(data) > cap:
            raise ControlError(f"topology is {len(data)} bytes; the control segment holds at most {cap}")
        with self._lock:
            g = store_blob(self._mm, self._w, self._off + TOPO_DATA_OFF, data)
        return g // 2
