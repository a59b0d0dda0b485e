"""The inference process's control thread: runtime changes in, stats out.

Every ``POLL_S`` it reads the control block's epoch (one u64 load); a new
epoch becomes a control request the batcher applies between batches
(migrations, cache size and policy).  It acknowledges the epoch once every
migration it started is confirmed by the engine that adopted the connection
(``migrated``, called from the completion thread).  Every ``PUBLISH_INTERVAL_S``
it publishes the ranker's counters, the failover counters and how it sees each
embedding server (server_stats rows); every ``LOG_INTERVAL_S`` with traffic it
logs one summary line.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flexemrd.inference.batcher import Batcher
    from flexemrd.inference.service import InferenceService

logger = logging.getLogger(__name__)

POLL_S = 0.005
PUBLISH_INTERVAL_S = 0.2
LOG_INTERVAL_S = 10.0


def server_state(health: dict) -> str:
    """The ServerState label of one ``ServerHealth.snapshot()`` entry.

    Down with no connection left means the engines are reopening them
    (they reconnect with backoff); down while still connected means the
    ranker gave up on it after timeouts.
    """
    if health["state"] == "up":
        return "up"
    return "reconnecting" if health["connections_up"] == 0 else "down"


class InferenceControl:
    def __init__(self, instance: str) -> None:
        self.instance = instance
        self.block = None
        self.svc: InferenceService | None = None
        self.epoch = 0
        self._applied_epoch = 0       # the newest epoch the batcher has applied
        self._waiting: set[int] = set()  # connections whose adoption is not confirmed yet
        self._acked = -1
        self._lock = threading.Lock()
        self._tables_prev: dict[str, np.ndarray] = {}
        self._server_states: dict[int, tuple[str, int]] = {}  # server -> (state label, changed_ns)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, svc: InferenceService) -> None:
        from flexemr.control.block import ControlBlock

        self.svc = svc
        try:
            self.block = ControlBlock.attach(self.instance)
        except Exception as e:
            logger.warning("no control block (%s): status and commands are unavailable", e)
            return
        self.epoch = self._applied_epoch = self.block.runtime.epoch
        self.block.ranker.update(epoch_seen=self.epoch)
        self._acked = self.epoch
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    # ---------------------------------------------------------------- completion thread

    def migrated(self, conn: int, engine: int) -> None:
        with self._lock:
            self._waiting.discard(conn)

    # ---------------------------------------------------------------- batcher thread

    def _apply(self, state) -> None:
        """Posted to the batcher: runs there between batches."""

        def apply(batcher: Batcher) -> None:
            sub = batcher.submitter
            if sub is not None:
                for cid, eng in enumerate(state.owners):
                    if cid in sub.owners and sub.owners[cid] != eng:
                        # Waiting first: the engine may confirm before migrate() returns.
                        with self._lock:
                            self._waiting.add(cid)
                        try:
                            moved = sub.migrate(cid, eng)
                        except ValueError as e:
                            moved = False
                            logger.error("cannot migrate connection %d: %s", cid, e)
                        if not moved:
                            with self._lock:
                                self._waiting.discard(cid)
            if batcher.cache is not None:
                batcher.cache.apply_runtime(state.cache_policy.label, state.cache_capacity_bytes)
            with self._lock:
                self._applied_epoch = state.epoch

        return apply

    # ---------------------------------------------------------------- control thread

    def _loop(self) -> None:
        last_pub = 0.0
        last_log, last_count = time.monotonic(), 0
        while not self._stop.wait(POLL_S):
            try:
                self._poll_epoch()
                now = time.monotonic()
                if now - last_pub >= PUBLISH_INTERVAL_S:
                    last_pub = now
                    self.publish()
                if now - last_log >= LOG_INTERVAL_S:
                    count = self.svc.stats.latency.count
                    if count > last_count:
                        self._log_summary(count - last_count, now - last_log)
                    last_log, last_count = now, count
            except Exception:
                logger.exception("inference control step failed")

    def _poll_epoch(self) -> None:
        epoch = self.block.runtime.epoch
        if epoch != self.epoch and not epoch & 1:
            state = self.block.runtime.read()
            self.epoch = state.epoch
            self.svc.post_control(self._apply(state))
        with self._lock:
            done = not self._waiting and self._applied_epoch > self._acked
            applied = self._applied_epoch
        if done:
            self._acked = applied
            self.block.ranker.update(epoch_seen=applied)

    def _log_summary(self, requests: int, seconds: float) -> None:
        """One line every LOG_INTERVAL_S with traffic: rate, latency and where the time goes."""
        s = self.svc.snapshot()
        stages = " ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in s["stages_ms"].items())
        logger.info("%.1f req/s, p50 %.1f ms, p99 %.1f ms, mean batch %.0f; stage p50/p99 ms: %s",
                    requests / seconds, s["latency_p50_ms"], s["latency_p99_ms"], s["mean_batch"], stages)

    def publish(self) -> None:
        s = self.svc.snapshot()
        self.block.ranker.update(requests_total=s["requests_total"], errors_total=s["errors_total"],
                                 samples_total=s["samples_total"], batches_total=s["batches_total"],
                                 latency_p50_ms=s["latency_p50_ms"], latency_p99_ms=s["latency_p99_ms"],
                                 mean_batch=s["mean_batch"], requests_per_s=s["requests_per_s"],
                                 inflight_batches=s["inflight_batches"], heartbeat_ns=time.monotonic_ns())
        f = s.get("failover")
        if f:
            self.block.ranker.update(reissued_total=f["reissued"], hedges_sent=f["hedges_sent"],
                                     hedges_won=f["hedges_won"], failovers_total=f["failovers"])
        self._publish_servers(s.get("servers", []))
        counts = self.svc.stats.table_counters()
        cache = self.svc.cache
        if cache is not None:
            counts["hits"] = cache.hits_by_table()
        deltas = {}
        for k, arr in counts.items():
            prev = self._tables_prev.get(k)
            deltas[k] = arr - prev if prev is not None else arr.copy()
            self._tables_prev[k] = arr.copy()
        if deltas:
            self.block.add_tables(**deltas)
        if cache is not None:
            self._publish_cache(cache)

    def _publish_servers(self, servers: list[dict]) -> None:
        """One server_stats row per embedding server, from ServerHealth.snapshot()."""
        now = time.monotonic_ns()
        slots = self.block.servers
        for d in servers:
            sid = d["server"]
            if not 0 <= sid < len(slots):
                continue
            state = server_state(d)
            prev = self._server_states.get(sid)
            changed = prev[1] if prev is not None and prev[0] == state else now
            self._server_states[sid] = (state, changed)
            slots[sid].update(state=state, outstanding=d["outstanding"], connections_up=d["connections_up"],
                              changed_ns=changed)

    def _publish_cache(self, cache) -> None:
        from flexemr.control.block import CacheMode

        s = cache.cache.stats()
        self.block.cache.update(policy=int(CacheMode.parse(cache.policy.mode.value)),
                                capacity_bytes=s["capacity_bytes"], used_bytes=s["used_bytes"], hits=s["hits"],
                                lookups=s["lookups"], evictions=s["evictions"], fills=s["fills"],
                                entries=s["entries"])
