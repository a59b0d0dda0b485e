"""The inference process's control thread: runtime changes in, stats out.

Every ``POLL_S`` it reads the control block's epoch (one u64 load); a new
epoch becomes a control request the batcher applies between batches
(migrations, cache size and policy).  It acknowledges an epoch once every
migration started at or before it is confirmed by the engine that adopted the
connection (``migrated``, called from the completion thread).  Moves overlap:
a new epoch is applied while earlier reopens are still under way, and the
acknowledged epoch advances past each move as it completes (the newest
applied epoch older than the oldest move still waiting), so a supervisor
waiting for one move never waits for a later one.

Model versions: while a version loads on the embedding servers the topology
JSON shows it under ``model.loading``; this thread preloads its dense NN (off
the data path), registers it and tells the supervisor through the mailbox
(ModelDense, like an emrctl command).  When every shard is live the
supervisor names it ``model.active`` and bumps the epoch; the switch is then
posted to the batcher, which applies it between batches.  The
epoch is acknowledged only once no batch of an older version is in flight,
so the supervisor may release the old version on the embedding servers as
soon as it sees the ack.  Every ``PUBLISH_INTERVAL_S``
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
        self._applied: list[int] = []  # epochs the batcher applied, newer than the acknowledged one
        self._waiting: dict[int, int] = {}  # connection whose adoption is not confirmed -> epoch that moved it
        self._acked = -1
        self._lock = threading.Lock()
        self._tables_prev: dict[str, np.ndarray] = {}
        self._reported = 0      # the pushed version whose dense NN we told the supervisor about
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
        version = self._prepare_version()   # a restarted inference process catches up with a pushed version
        if version and version != svc.versions.active:
            svc.post_control(lambda batcher: batcher.switch_version(version))
        self._thread = threading.Thread(target=self._loop, name="control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)

    # ---------------------------------------------------------------- completion thread

    def migrated(self, conn: int, engine: int) -> None:
        with self._lock:
            self._waiting.pop(conn, None)

    def opened(self, conn: int, engine: int) -> None:
        """Migration by reopening: ``engine``'s connection is ready; switch on the batcher (it owns the rings)."""
        self.svc.post_control(lambda batcher: batcher.submitter.opened(conn, engine))

    # ---------------------------------------------------------------- batcher thread

    def _apply(self, state, version: int = 0) -> None:
        """Posted to the batcher: runs there between batches."""

        def apply(batcher: Batcher) -> None:
            sub = batcher.submitter
            if sub is not None:
                for cid, eng in enumerate(state.owners):
                    # (or one still opening elsewhere by reopening: moving it back cancels that)
                    if cid in sub.owners and (sub.owners[cid] != eng or cid in sub.opening):
                        # Waiting first: the engine may confirm before migrate() returns.
                        with self._lock:
                            self._waiting.setdefault(cid, state.epoch)
                        try:
                            moved = sub.migrate(cid, eng)
                        except ValueError as e:
                            moved = False
                            logger.error("cannot migrate connection %d: %s", cid, e)
                        if not moved:
                            with self._lock:
                                self._waiting.pop(cid, None)
            if batcher.cache is not None:
                batcher.cache.apply_runtime(state.cache_policy.label, state.cache_capacity_bytes)
            if version and version != batcher.versions.active and batcher.versions.has_model(version):
                batcher.switch_version(version)
            with self._lock:
                self._applied_epoch = state.epoch
                self._applied.append(state.epoch)

        return apply

    # ---------------------------------------------------------------- control thread

    def _loop(self) -> None:
        last_pub = 0.0
        last_log, last_count = time.monotonic(), 0
        while not self._stop.wait(POLL_S):
            try:
                self._preload_version()
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
            self.svc.post_control(self._apply(state, self._prepare_version()))
        with self._lock:
            oldest = min(self._waiting.values(), default=None)
            ready = [e for e in self._applied if e > self._acked and (oldest is None or e < oldest)]
            applied = max(ready, default=0)
            if applied and not self.svc.versions.draining():
                self._applied = [e for e in self._applied if e > applied]
            else:
                applied = 0
        if applied:
            self._acked = applied
            self.block.ranker.update(epoch_seen=applied)

    def _preload_version(self) -> None:
        """Load the dense NN of the version being pushed before the switch, and report it."""
        job = (self.block.topology.get("model") or {}).get("loading")
        if not job or job.get("state") != "loading" or job.get("dense_loaded"):
            return
        version = int(job["version"])
        if version == self._reported:
            return
        self._reported = version
        error = self._load_dense(version, job.get("dense_dir"))
        from flexemr.control.commands import ModelDense
        from flexemr.control.mailbox import MailboxClient

        try:
            MailboxClient(self.block).request(ModelDense(version=version, error=error).to_dict(), timeout=10.0)
        except Exception as e:
            logger.warning("could not tell the supervisor about version %d's dense NN: %s", version, e)
            self._reported = 0   # try again on the next loop

    def _load_dense(self, version: int, dense_dir: str | None) -> str:
        """Register ``version``'s dense NN; '' when loaded, else why not."""
        versions = self.svc.versions
        if versions.has_model(version):
            return ""
        if not dense_dir:
            return "the topology names no dense NN directory"
        from flexemr.model.dense import load_dense

        t0 = time.monotonic()
        try:
            nn = load_dense(dense_dir, self.svc.spec).to(self.svc.device)
        except Exception as e:
            logger.error("model version %d: cannot load the dense NN from %s: %s", version, dense_dir, e)
            return f"{dense_dir}/dense.pt: {e}"
        versions.add_model(version, nn)
        logger.info("model version %d: dense NN from %s loaded in %.2f s", version, dense_dir, time.monotonic() - t0)
        return ""

    def _prepare_version(self) -> int:
        """The version the topology asks for, its dense NN loaded and registered (0: nothing to switch)."""
        model = self.block.topology.get("model") or {}
        version = int(model.get("active") or 0)
        versions = self.svc.versions
        if not version or version == versions.active or versions.has_model(version):
            return version
        # Normally preloaded; a restarted inference process loads it here.
        error = self._load_dense(version, (model.get("dense_dirs") or {}).get(str(version)))
        if error:
            logger.error("model version %d: %s; not switching", version, error)
            return 0
        return version

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
