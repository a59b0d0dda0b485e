"""The batch: the one module that mutates a batch's state.

A ``Batch`` is created by the batcher from coalesced ``Work``; its partial
pools arrive from three places — the cache (hits pooled on the ranker), the
local pooler (monolithic layout) and the embedding servers' responses (on the
completion thread) — and all of them go through the methods here, under the
batch's own lock, so the finisher sees a batch exactly when its last part is
in.

A *part* is one server's share of the batch (the ids of one primary's
shards).  It may travel as several *copies* — a hedge to a second replica,
or a re-issue after a lost connection — that share the part's ``group``: the
first copy to answer is added, later ones are ignored, and the part fails
only when no copy is left.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.model.versions import BOOT_VERSION
from flexemr.routing.combine import Accumulator, SplitAccumulator
from flexemr.wire import codec

from flexemrd.inference.admission import Work


@dataclasses.dataclass(slots=True)
class Part:
    """One copy of a subrequest: where it went and what it asked for."""

    primary: int               # the routing server whose shards these ids are in
    server: int                # the replica it was sent to
    conn: int
    tables: list[int]
    counts: list[np.ndarray]   # ids per bag sent for each table (mean/max need them)
    values: list[np.ndarray]   # the ids, kept so the part can be re-issued or hedged
    rows: list[np.ndarray | None] | None = None   # per table, the batch positions of the bags sent
                                                   # (None: all); the answer is scattered back there
    group: int = 0             # the rid of the part's first copy
    sent_at: float = 0.0
    hedge: bool = False        # this copy is a hedge (counts "hedges won" when it answers first)
    spare: bool = False        # a second copy while the first is still out (hedge or rescue): one per part

    def copy_to(self, server: int, conn: int, hedge: bool = False, spare: bool = False) -> "Part":
        return Part(self.primary, server, conn, self.tables, self.counts, self.values, self.rows, self.group,
                    time.perf_counter(), hedge, spare or hedge)


class Batch:
    """Coalesced requests on their way through the servers to the finisher."""

    def __init__(self, seq: int, works: list[Work], spec: ModelSpec, tables: list[int],
                 lengths: list[np.ndarray], version: int = BOOT_VERSION, place: bool = False) -> None:
        self.seq = seq
        self.version = version     # the model version every part and the NN of this batch use
        self.works = works
        self.size = sum(w.batch for w in works)
        self.tables = tables
        self.deadline = min(w.deadline for w in works)
        # With ``place``, answers are pooled straight into the clients' reply slots (see _place_answers).
        self.placed = _place_answers(works, spec, version) if place else None
        self.outs: list[dict[int, np.ndarray]] = []   # placed: per request, table -> its rows' array
        if self.placed is None:
            self.acc = {t: Accumulator(spec.tables[t].pooling, self.size, spec.tables[t].dim, ln)
                        for t, ln in zip(tables, lengths)}
        else:
            self.acc = self._split_accumulators(spec, tables, lengths)
        self.parts: dict[int, Part] = {}
        self.error: str | None = None
        self.error_code = 0
        self.started = time.perf_counter()
        self.submitted = self.started
        self.parts_done = self.started
        self._copies: dict[int, set[int]] = {}   # open group -> rids of its copies in flight
        self._hedged: set[int] = set()
        self._remaining = 0
        self._lock = threading.Lock()

    def _split_accumulators(self, spec: ModelSpec, tables: list[int], lengths: list[np.ndarray]) -> dict:
        """Per table, a SplitAccumulator whose runs are the requests' rows: in a placed answer's slot where the
        request asked for the table and has a slot, else in a private array (the answer then goes by frame)."""
        for w, placed in zip(self.works, self.placed):
            named = {spec.table_index(n): a for n, a in zip(w.names, placed.arrays)} if placed is not None else {}
            self.outs.append({t: named[t] if t in named else np.empty((w.batch, spec.tables[t].dim), np.float32)
                              for t in tables})
        starts = np.cumsum([0] + [w.batch for w in self.works[:-1]]).tolist()
        return {t: SplitAccumulator(spec.tables[t].pooling, ln, [(s, out[t]) for s, out in zip(starts, self.outs)])
                for t, ln in zip(tables, lengths)}

    # ---------------------------------------------------------------- batcher

    def add_cached(self, table: int, pooled: np.ndarray, counts: np.ndarray) -> None:
        """Hits the ranker's cache pooled: one more partial, like a server's."""
        with self._lock:
            self.acc[table].add(pooled, counts)

    def set_pooled(self, table: int, pooled: np.ndarray) -> None:
        """The whole bag was pooled in one place (monolithic layout)."""
        with self._lock:
            self.acc[table].set_pooled(pooled)

    def expect(self, rid: int, part: Part) -> None:
        """Register a part's first copy before it is submitted (its answer may come at once)."""
        part.group = rid
        with self._lock:
            self.parts[rid] = part
            self._copies[rid] = {rid}
            self._remaining += 1

    def budget_us(self) -> int:
        """Microseconds left before the deadline (at least 1: an expired budget still travels)."""
        left = self.deadline - time.perf_counter()
        return max(1, int(min(left, 3600.0) * 1e6))

    def mark_submitted(self) -> None:
        self.submitted = time.perf_counter()
        for p in self.parts.values():
            p.sent_at = self.submitted

    # ---------------------------------------------------------------- copies (completion thread)

    def add_copy(self, rid: int, part: Part) -> bool:
        """Another copy of ``part.group`` (hedge or re-issue); False if that part is settled already."""
        with self._lock:
            copies = self._copies.get(part.group)
            if copies is None:
                return False
            self.parts[rid] = part
            copies.add(rid)
            if part.spare:
                self._hedged.add(part.group)
            return True

    def drop_copy(self, rid: int) -> bool:
        """Copy ``rid`` is lost; True if the part is still covered (another copy in flight, or settled)."""
        with self._lock:
            copies = self._copies.get(self.parts[rid].group)
            if copies is None:
                return True
            copies.discard(rid)
            return bool(copies)

    def hedged(self, rid: int) -> bool:
        with self._lock:
            return self.parts[rid].group in self._hedged

    def open_copies(self, rid: int) -> list[int]:
        with self._lock:
            return sorted(self._copies.get(self.parts[rid].group, ()))

    # ---------------------------------------------------------------- answers and failures

    def complete(self, rid: int, payload: memoryview) -> tuple[bool, bool, list[int]]:
        """A LOOKUP_RESP for ``rid``: (accepted, batch done, sibling copies now moot)."""
        with self._lock:
            part = self.parts[rid]
            copies = self._copies.pop(part.group, None)
            if copies is None:
                return False, False, []   # another copy answered first
            if self.error is None:
                _tids, partials = codec.decode_lookup_response(payload)
                rows = part.rows or [None] * len(part.tables)
                for t, p, cnt, r in zip(part.tables, partials, part.counts, rows):
                    self.acc[t].add(p, cnt, r)
            copies.discard(rid)
            return True, self._part_done(), sorted(copies)

    def fail(self, rid: int | None, error: str, code: int = 0) -> bool:
        """Part of ``rid`` failed (None: the batch failed before any part); True when nothing is left."""
        with self._lock:
            if self.error is None:
                self.error, self.error_code = error, code
            if rid is None:
                return self._remaining == 0
            if self._copies.pop(self.parts[rid].group, None) is None:
                return False
            return self._part_done()

    def _part_done(self) -> bool:
        self._remaining -= 1
        if self._remaining == 0:
            self.parts_done = time.perf_counter()
            return True
        return False

    # ---------------------------------------------------------------- finisher

    def pooled(self) -> dict[int, np.ndarray]:
        """Final pooled vectors per table (call once every part is in; not for a placed batch)."""
        return {t: self.acc[t].result() for t in self.tables}

    def finish_placed(self) -> list[dict[int, np.ndarray]]:
        """A placed batch's pooled vectors finished in place: per request, table -> its rows (call once)."""
        for t in self.tables:
            self.acc[t].result()
        return self.outs


MAX_PLACED_WORKS = 8   # requests whose answers one batch pools in place: one accumulator call each per partial


def _place_answers(works: list[Work], spec: ModelSpec, version: int) -> list | None:
    """For a lookup-only batch of at most MAX_PLACED_WORKS requests, each request's answer laid out in the
    reply slot it named (None for a request without one); None when no request's answer can be placed.

    Pooling into the slot writes each answer once, where the client reads it, instead of pooling into a
    batch buffer and copying that into the slot at the end (4 MiB per 2048-sample lookup of 8 x 64 dims).
    """
    if len(works) > MAX_PLACED_WORKS or any(w.predict for w in works):
        return None
    placed = []
    for w in works:
        place = getattr(w.reply, "place_pooled", None)   # socket sessions with a reply region have it
        dims = [spec.table(n).dim for n in w.names]
        placed.append(place(w.request_id, w.names, dims, w.batch, version) if place is not None else None)
    return placed if any(p is not None for p in placed) else None


def merge(works: list[Work], tables: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Concatenate the requests' ids per table; a request without a table gets empty bags."""
    values, lengths = [], []
    for t in tables:
        if len(works) == 1:
            v, ln = works[0].tables[t]
            values.append(v)
            lengths.append(ln)
            continue
        vs, ls = [], []
        for w in works:
            pair = w.tables.get(t)
            if pair is None:
                ls.append(np.zeros(w.batch, dtype=np.int32))
            else:
                vs.append(pair[0])
                ls.append(pair[1])
        values.append(np.concatenate(vs) if vs else np.zeros(0, dtype=np.int64))
        lengths.append(np.concatenate(ls))
    return values, lengths
