"""The ranker's adaptive embedding cache inside the inference process (FlexEMR 3.1.1).

On the request path (batcher thread): the load monitor sees the batch, the
policy may resize the cache (shrinking evicts the coldest rows at once), each
table's ids are looked up; the hits are pooled here and added to the batch's
accumulator as one more partial (with their per-bag counts, exactly like a
server's partial), and only the misses are routed to the servers.

Off the request path: after dispatching a batch, a bounded number of FETCH
subrequests for hot missed rows go to the servers that hold them, through the
same engines and rings; their raw rows fill the cache when they come back
(completion thread).  A fill never holds up a request.

Whether serving hits pays is measured, not assumed: with the adaptive policy
a ``PayoffGate`` A/B-tests batches served through the cache against batches
that bypass it; where hits save nothing (loopback, shared memory) the cache
is bypassed entirely (no lookups, no hit pooling, no fills) until the next
probe.
"""

from __future__ import annotations

import collections
import logging
import time
from typing import Any

import numpy as np

from flexemr.cache.gate import GateState, PayoffGate
from flexemr.cache.policy import AdaptivePolicy, CachePolicy, LoadMonitor, PolicyMode, memory_budget_bytes
from flexemr.cache.rowcache import RowCache
from flexemr.config import CacheConfig
from flexemr.model.spec import ModelSpec
from flexemr.routing.table import RoutingTable

from flexemrd.inference.batch import Batch

logger = logging.getLogger(__name__)

FILL_ROWS_PER_BATCH = 4096   # rows requested for filling after each batch, at most
MAX_FILLS_INFLIGHT = 2       # FETCH subrequests outstanding at once


class RankerCache:
    def __init__(self, spec: ModelSpec, routing: RoutingTable, cfg: CacheConfig, device: str = "cpu",
                 max_batch: int = 4096) -> None:
        self.spec = spec
        self.routing = routing
        self.device = device
        self.cache = RowCache(spec.tables, 0, device=device, admission=cfg.admission)
        self.monitor = LoadMonitor(window_s=cfg.window_s, windows=5)
        budget = memory_budget_bytes(device, cfg.budget)
        self.adaptive = AdaptivePolicy(budget, spec, margin_bytes=cfg.margin, max_batch=max_batch,
                                       overload_queue_depth=2.0)
        self.policy = CachePolicy(self.cache, mode=cfg.policy, fixed_bytes=cfg.capacity, adaptive=self.adaptive)
        if cfg.policy == "adaptive":
            self.cache.resize(min(cfg.capacity, self.adaptive.target_capacity(self.monitor)))
        self.fills_inflight = 0
        self.version = 0          # model version the cached rows belong to (0: the boot version, not named)
        self.budget = budget
        self.gate = PayoffGate()
        self._probes: collections.deque = collections.deque()   # (used cache, batch, t0, served) of the probe
        self._bypassing = False
        logger.info("cache: policy %s, capacity %d bytes, budget %d bytes on %s, admission %s",
                    cfg.policy, self.cache.capacity_bytes, budget, device, cfg.admission)

    # ------------------------------------------------------------------ request path (batcher thread)

    def serve(self, batch: Batch, tables: list[int], values: list[np.ndarray], lengths: list[np.ndarray],
              queue_depth: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Pool the cached rows into ``batch``'s accumulators; return the ids left for the servers."""
        t0 = time.perf_counter()
        self.monitor.observe(batch.size, queue_depth)
        self.policy.update(self.monitor)
        self._bypassing = False
        if self.cache.capacity_bytes == 0:
            return values, lengths
        gated = self.policy.mode is PolicyMode.ADAPTIVE
        if gated:
            self._harvest_probes()
            use = self.gate.use_cache(batch.size)
            probing = self.gate.state is GateState.PROBING
            if not use:
                self._bypassing = True
                if probing:
                    self._probes.append((False, batch, t0, t0))
                return values, lengths
        miss_v, miss_l = [], []
        hits = 0
        for sp in self.cache.split_many(tables, values, lengths, check=False):   # one pooling call per batch
            if sp.n_hits:
                batch.add_cached(sp.table, sp.hit_pooled().cpu().numpy(), sp.hit_counts)
                hits += sp.n_hits
            miss_v.append(sp.miss_values)
            miss_l.append(sp.miss_lengths)
        if gated and probing:
            self.gate.note_hits(hits, sum(len(v) for v in values))
            self._probes.append((True, batch, t0, time.perf_counter()))
        return miss_v, miss_l

    def _harvest_probes(self) -> None:
        """Hand the gate the lookup time per sample of every probe batch whose partials are all in."""
        while self._probes:
            used, batch, t0, served = self._probes[0]
            if batch._remaining > 0 and batch.error is None:
                if time.perf_counter() - t0 < 30.0:
                    return                 # answers still to come (batches finish about in order)
                self._probes.popleft()     # a part that never answers tells nothing
                continue
            self._probes.popleft()
            if batch.error is None:
                done = max(served, batch.parts_done if batch.parts else served)
                self.gate.record(used, (done - t0) / max(1, batch.size))

    def fill_requests(self) -> list[tuple[int, int, np.ndarray]]:
        """(server, table, rows) FETCHes worth sending now (bounded; may be empty)."""
        if self.cache.capacity_bytes == 0 or self.fills_inflight >= MAX_FILLS_INFLIGHT or self._bypassing:
            return []
        out = []
        for t, rows in self.cache.candidates_for_fill(FILL_ROWS_PER_BATCH).items():
            if not len(rows):
                continue
            srv = self.routing.server_of(t, rows)
            for s in np.unique(srv):
                out.append((int(s), t, rows[srv == s]))
        self.fills_inflight += len(out)
        return out

    # ------------------------------------------------------------------ completion thread

    def filled(self, table: int, rows: np.ndarray, data: np.ndarray | None, version: int = 0) -> None:
        """A FETCH came back (``data`` None: it failed; the rows stay uncached).

        Rows fetched for another model version than the cache now holds are
        dropped: a fill sent before a switch must not serve the new version.
        """
        self.fills_inflight = max(0, self.fills_inflight - 1)
        if version and self.version and version != self.version:
            return
        if data is not None and len(rows) == len(data):
            self.cache.fill(table, rows, data)

    # ------------------------------------------------------------------ control

    def switch_version(self, version: int) -> None:
        """Batcher thread, between batches: forget every row (they are the old version's)."""
        capacity = self.cache.capacity_bytes
        self.cache.resize(0)
        self.cache.resize(capacity)
        self.version = version
        logger.info("cache emptied for model version %d (capacity %d bytes kept)", version, capacity)

    def apply_runtime(self, policy: str, capacity_bytes: int) -> None:
        """emrctl cache policy / resize, applied between batches."""
        if capacity_bytes != self.policy.fixed_bytes:
            self.policy.resize(capacity_bytes)
            logger.info("cache resized to %d bytes", capacity_bytes)
        if PolicyMode(policy) is not self.policy.mode:
            self.policy.set_mode(policy)
            logger.info("cache policy now %s (capacity %d bytes)", policy, self.cache.capacity_bytes)

    def stats(self) -> dict[str, Any]:
        s = self.cache.stats()
        s["policy"] = self.policy.mode.value
        s["budget_bytes"] = self.budget
        s["planned_batch"] = self.adaptive.planned_batch(self.monitor)
        if self.policy.mode is PolicyMode.ADAPTIVE:
            s["payoff"] = self.gate.snapshot()
        return s

    def hits_by_table(self) -> np.ndarray:
        s = self.cache.stats()["tables"]
        return np.array([s[t.name]["hits"] for t in self.spec.tables], dtype=np.int64)


__all__ = ["RankerCache"]
