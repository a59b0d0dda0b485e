"""Counters of the inference process (written by the data-path threads, read by the publisher).

Each counter has one writer thread, except errors (sessions and the finisher
both count them, under a lock); the publisher only reads, and a slightly
stale read is fine for status.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any

import numpy as np

from flexemr.model.spec import ModelSpec

STAGES = ("queue", "route", "remote", "finish")


class LatencyWindow:
    """Recent latencies for p50/p99 (bounded)."""

    def __init__(self, size: int = 4096) -> None:
        self.values: deque[float] = deque(maxlen=size)
        self.count = 0
        self.samples = 0

    def add(self, seconds: float, samples: int) -> None:
        self.values.append(seconds)
        self.count += 1
        self.samples += samples

    def percentiles(self) -> tuple[float, float]:
        if not self.values:
            return 0.0, 0.0
        a = np.fromiter(list(self.values), dtype=np.float64)
        p50, p99 = np.percentile(a, [50, 99])
        return float(p50), float(p99)


class FailoverCounters:
    """Written by the completion thread only."""

    def __init__(self) -> None:
        self.reissued = 0
        self.hedges_sent = 0
        self.hedges_won = 0


class ServiceStats:
    def __init__(self, n_tables: int) -> None:
        self.latency = LatencyWindow()
        # Where a request's time goes, batch by batch (emrctl status --json: ranker.stages_ms).
        self.stages = {k: LatencyWindow(1024) for k in STAGES}
        self.errors = 0
        self._errors_lock = threading.Lock()
        self.batches = 0
        self.batch_samples = 0
        # Per-table counters (cumulative; the publisher sends deltas).
        self.t_lookups = np.zeros(n_tables, dtype=np.int64)   # bags looked up
        self.t_ids = np.zeros(n_tables, dtype=np.int64)       # ids looked up
        self.t_wire = np.zeros(n_tables, dtype=np.int64)      # bytes on the wire: ids out + partials back
        self.failover = FailoverCounters()
        self._rate_prev = (time.monotonic(), 0)

    def add_errors(self, n: int = 1) -> None:
        with self._errors_lock:
            self.errors += n

    # ---------------------------------------------------------------- batcher

    def count_lookups(self, spec: ModelSpec, size: int, tables: list[int], values: list[np.ndarray]) -> None:
        for t, v in zip(tables, values):
            self.t_lookups[t] += size
            self.t_ids[t] += len(v)

    def count_wire(self, spec: ModelSpec, bags: list[int], tables: list[int], values: list[np.ndarray]) -> None:
        """Wire bytes of one subrequest and its answer; ``bags[i]``: the bags table ``tables[i]`` sent (compact)."""
        for t, b, v in zip(tables, bags, values):
            ids = 4 if spec.tables[t].rows <= 2**31 else 8   # the id width the batcher sends (protocol 2)
            self.t_wire[t] += ids * len(v) + 4 * b + 4 * b * spec.tables[t].dim

    # ---------------------------------------------------------------- finisher

    def batch_done(self, batch, sent: float) -> None:
        st = self.stages
        st["queue"].add(batch.started - batch.works[0].arrived, 0)
        if batch.parts:
            st["route"].add(batch.submitted - batch.started, 0)
            st["remote"].add(batch.parts_done - batch.submitted, 0)
            st["finish"].add(sent - batch.parts_done, 0)
        else:
            st["finish"].add(sent - batch.started, 0)
        self.batches += 1
        self.batch_samples += batch.size

    # ---------------------------------------------------------------- publisher

    def snapshot(self, inflight_batches: int) -> dict[str, Any]:
        p50, p99 = self.latency.percentiles()
        now, count = time.monotonic(), self.latency.count
        t0, c0 = self._rate_prev
        rate = (count - c0) / (now - t0) if now > t0 else 0.0
        if now - t0 >= 1.0:
            self._rate_prev = (now, count)
        return {
            "requests_per_s": rate,
            "requests_total": self.latency.count,
            "samples_total": self.latency.samples,
            "errors_total": self.errors,
            "batches_total": self.batches,
            "mean_batch": (self.batch_samples / self.batches) if self.batches else 0.0,
            "latency_p50_ms": p50 * 1e3,
            "latency_p99_ms": p99 * 1e3,
            "inflight_batches": inflight_batches,
            "stages_ms": {k: [round(v * 1e3, 2) for v in w.percentiles()] for k, w in self.stages.items()},
        }

    def table_counters(self) -> dict[str, np.ndarray]:
        return {"lookups": self.t_lookups.copy(), "ids_total": self.t_ids.copy(), "bytes_wire": self.t_wire.copy()}
