"""The batcher thread: coalesce Work into batches, serve cache hits, submit the misses.

It is the only thread that reads the admission queue and writes the
submission rings.  Control requests (migrations, cache settings) arrive on
their own queue from the control thread and are applied here between
batches, so ownership changes and ring writes never race.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Protocol

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.routing.split import split_batch
from flexemr.routing.table import RoutingTable
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode

from flexemrd.inference.admission import Work
from flexemrd.inference.batch import Batch, Part, merge
from flexemrd.inference.health import ServerHealth
from flexemrd.inference.lookups import LookupEncoder
from flexemrd.inference.pending import Fill, PendingTable
from flexemrd.inference.stats import ServiceStats
from flexemrd.inference.submission import Submitter
from flexemrd.inference.versions import ModelVersions

logger = logging.getLogger(__name__)

ControlRequest = Callable[["Batcher"], None]



class LocalPooling(Protocol):
    """Pools whole bags in this process (the monolithic layout)."""

    def pool(self, table: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray: ...


def local_pooling_threads() -> int:
    """Pooling threads of the monolithic layout: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class Batcher:
    def __init__(self, spec: ModelSpec, routing: RoutingTable, submitter: Submitter | None, pending: PendingTable,
                 finish: Callable[[Batch], None], fail: Callable[[list[Work], int, str], None],
                 stats: ServiceStats, inflight: threading.BoundedSemaphore, max_batch: int, max_wait_s: float,
                 cache=None, local: LocalPooling | None = None, inband_credits: bool = False,
                 health: ServerHealth | None = None, beat: Callable[[], None] = lambda: None,
                 partials: str = "fp32", versions: ModelVersions | None = None,
                 lookups: LookupEncoder | None = None) -> None:
        self.spec = spec
        self.routing = routing
        self.submitter = submitter
        self.pending = pending
        self.finish = finish
        self.fail = fail
        self.stats = stats
        self.inflight = inflight
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.cache = cache
        self.local = local
        self.inband_credits = inband_credits
        self.health = health
        self.beat = beat
        # The completion thread's hedges and re-issues must share this encoder (see lookups.py).
        self.lookups = lookups if lookups is not None else LookupEncoder(spec, partials, inband_credits)
        self.versions = versions if versions is not None else ModelVersions(None)
        self.queue: queue.Queue[Work | None] = queue.Queue()
        self.controls: queue.SimpleQueue[ControlRequest] = queue.SimpleQueue()
        self.stop = threading.Event()
        self._carry: Work | None = None
        self._seqs = itertools.count(1)
        # Monolithic layout: tables are pooled on their own threads (embedding_bag
        # releases the GIL), one per core, so the batcher goes on coalescing the
        # next batch while this one pools and two tables pool at once.
        self._poolers = (ThreadPoolExecutor(local_pooling_threads(), thread_name_prefix="pool")
                         if local is not None else None)

    def idle(self) -> bool:
        return self.queue.empty() and self._carry is None

    # ---------------------------------------------------------------- coalescing

    def _next_batch(self) -> list[Work] | None:
        first, self._carry = self._carry, None
        while first is None:
            if self.stop.is_set():
                return None
            self.beat()
            try:
                first = self.queue.get(timeout=0.05)
            except queue.Empty:
                self._apply_controls()
                continue
            if first is None:
                return None
        works, n = [first], first.batch
        deadline = first.arrived + self.max_wait_s
        while n < self.max_batch:
            try:
                w = self.queue.get(timeout=max(0.0, deadline - time.perf_counter()))
            except queue.Empty:
                break
            if w is None:
                self.queue.put(None)
                break
            if n + w.batch > self.max_batch:
                self._carry = w
                break
            works.append(w)
            n += w.batch
        return works

    def _apply_controls(self) -> None:
        while True:
            try:
                request = self.controls.get_nowait()
            except queue.Empty:
                return
            try:
                request(self)
            except Exception:
                logger.exception("control request failed")

    def run(self) -> None:
        while True:
            works = self._next_batch()
            if works is None:
                return
            self._apply_controls()
            while not self.inflight.acquire(timeout=0.2):
                if self.stop.is_set():
                    return
            try:
                self._dispatch(works)
            except Exception as e:
                logger.exception("dispatch failed")
                self.fail(works, ErrorCode.INTERNAL, f"internal error while routing: {e}")
                self.inflight.release()

    # ---------------------------------------------------------------- dispatch

    def _dispatch(self, works: list[Work]) -> None:
        works = self._drop_expired(works)
        if not works:
            self.inflight.release()
            return
        tables = sorted({t for w in works for t in w.tables})
        values, lengths = merge(works, tables)
        # The version is fixed here, between batches: every part, fill and the NN of this batch use it.
        # Answers from the servers are pooled straight into the clients' reply slots where they can be
        # (batch._place_answers); the local pooler's come whole from its kernel and are copied once anyway.
        batch = Batch(next(self._seqs), works, self.spec, tables, lengths, self.versions.begin(),
                      place=self.local is None)
        if self.local is not None:
            self._pool_locally(batch, tables, values, lengths)
            return
        if self.cache is not None:
            values, lengths = self.cache.serve(batch, tables, values, lengths, self.queue.qsize())
        self.stats.count_lookups(self.spec, batch.size, tables, values)
        plan = split_batch(self.routing, batch.size, tables, values, lengths)
        if not plan.parts:
            self.finish(batch)
            return
        choices = {primary: self.health.choose(primary) for primary in plan.parts}
        unserved = [p for p, c in choices.items() if c is None]
        if unserved:
            # Fail fast, naming the servers: no live replica holds these shards.
            for c in choices.values():
                if c is not None:
                    self.health.released(c[0])
            batch.fail(None, "; ".join(self.health.describe_down(p) for p in unserved), ErrorCode.UNAVAILABLE)
            self.finish(batch)
            return
        frames = []
        for primary, part in plan.parts.items():
            self.stats.count_wire(self.spec, [len(ln) for ln in part.lengths], part.tables, part.values)
            server, cid = choices[primary]
            rid = self.pending.next_rid()
            batch.expect(rid, Part(primary, server, cid, part.tables, part.lengths, part.values, part.rows))
            frames.append((cid, rid))
        # Every part is registered before the first is submitted: an answer may come at once.
        self.pending.add_lookups(batch, [rid for _c, rid in frames])
        batch.mark_submitted()
        budget_us = batch.budget_us()
        for cid, rid in frames:
            frame = self.lookups.encode(rid, batch, batch.parts[rid], budget_us)
            engine = self.submitter.submit(cid, frame)
            if engine is not None:
                self._fail_part(rid, f"engine {engine} did not accept the subrequest in time")
        if self.cache is not None:
            self._send_fills(batch.version)

    def _pool_locally(self, batch: Batch, tables: list[int], values: list[np.ndarray],
                      lengths: list[np.ndarray]) -> None:
        """Pool every table on the pooling threads; the last table to finish hands the batch on."""
        left = [len(tables)]
        lock = threading.Lock()

        def pool(t: int, v: np.ndarray, ln: np.ndarray) -> None:
            try:
                batch.set_pooled(t, self.local.pool(t, v, ln))
            except Exception as e:
                logger.exception("pooling table %d failed", t)
                batch.fail(None, f"internal error while pooling table {self.spec.tables[t].name!r}: {e}",
                           ErrorCode.INTERNAL)
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self.finish(batch)

        for t, v, ln in zip(tables, values, lengths):
            self._poolers.submit(pool, t, v, ln)

    def _drop_expired(self, works: list[Work]) -> list[Work]:
        """Answer requests whose deadline passed while they queued; keep the rest."""
        now = time.perf_counter()
        late = [w for w in works if w.deadline <= now]
        if not late:
            return works
        for w in late:
            self.fail([w], ErrorCode.DEADLINE_EXCEEDED,
                      f"deadline of {w.timeout_s * 1e3:.0f} ms passed while the request waited in the ranker's "
                      f"queue ({(now - w.arrived) * 1e3:.0f} ms)")
        return [w for w in works if w.deadline > now]

    def _fail_part(self, rid: int, error: str) -> None:
        batch = self.pending.take_lookup(rid)
        if batch is not None:
            self.health.released(batch.parts[rid].server)
            if batch.fail(rid, error):
                self.finish(batch)

    def switch_version(self, version: int) -> None:
        """Serve ``version`` from the next batch on (runs here, between batches); the cache starts empty."""
        t0 = time.perf_counter()
        old = self.versions.switch(version)
        if self.cache is not None:
            self.cache.switch_version(version)
        logger.info("switched from model version %d to %d between batches in %.2f ms", old, version,
                    (time.perf_counter() - t0) * 1e3)

    def _send_fills(self, version: int) -> None:
        """Fetch hot missed rows for the cache, after the batch's own subrequests (off the request path)."""
        for primary, table, rows in self.cache.fill_requests():
            choice = self.health.choose(primary)
            if choice is None:
                self.cache.filled(table, rows, None)
                continue
            server, cid = choice
            self.health.released(server)   # fills are not counted as outstanding work
            rid = self.pending.next_rid()
            self.pending.add_fill(rid, Fill(cid, table, rows, version))
            # Never wait for ring space on behalf of a fill: skip it instead.
            if self.submitter.submit(cid, codec.encode_fetch(rid, table, rows, version), wait=False) is not None:
                if self.pending.take_fill(rid) is not None:
                    self.cache.filled(table, rows, None)
