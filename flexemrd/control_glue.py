"""The ranker's control path: status publishing, emrctl commands, migration, rebalancing.

Kept apart from the data-path modules: engines and the inference process get
a ``publish`` callback / hooks from here and never import the control path
themselves.

Migration, end to end (nothing reconnects, no request is lost)::

    emrctl migrate 3 --to 1 ─▶ supervisor: cmd_migrate ─▶ runtime.owners[3] = 1, epoch += 2
    inference (between batches) sees the epoch ─▶ routes conn 3's new subrequests
        to engine 1's ring and puts SUB_MIGRATE(3 -> 1) in engine 0's ring
    engine 0 reaches the marker ─▶ waits for conn 3's in-flight answers, passes
        the socket(s) to engine 1 (SCM_RIGHTS) ─▶ COMP_MIGRATED to the inference
    inference writes ranker.epoch_seen = epoch ─▶ supervisor answers emrctl

The rebalancer runs on the supervisor's tick with the same command: it watches
each engine's load (submission-ring depth + subrequests in flight, smoothed)
and moves one connection from the most to the least loaded engine when the
gap is large and the busy engine owns more than one connection.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ACK_TIMEOUT_S = 4.0  # below emrctl's 5 s, so emrctl hears our reason, not its own timeout
PUBLISH_INTERVAL_S = 0.2
LOG_INTERVAL_S = 10.0


def _topology(plan) -> dict[str, Any]:
    return {
        "instance": plan.instance,
        "mode": "local" if all(a.startswith("127.") for a in plan.servers) else "ranker",
        "servers": [{"name": f"embedding[{i}]", "address": a} for i, a in enumerate(plan.servers)],
        "tables": [t.name for t in plan.spec.tables],
        "engines": plan.engines,
        "mapping": plan.cfg.ranker.mapping,
        "credits": plan.cfg.ranker.credits,
        "routing": plan.cfg.ranker.routing,
        "socket": plan.socket_path,
        "connections": [{"id": c, "server": s} for c, (s, _a) in sorted(plan.connections.items())],
    }


class Rebalancer:
    """Decides which connection to move (pure: the caller applies it)."""

    def __init__(self, min_gap: float = 2.0, ratio: float = 2.0, cooldown_s: float = 3.0, alpha: float = 0.5) -> None:
        self.min_gap = min_gap
        self.ratio = ratio
        self.cooldown_s = cooldown_s
        self.alpha = alpha
        self.load: dict[int, float] = {}
        self.conn_rate: dict[int, float] = {}
        self._prev_sub: dict[int, tuple[float, int]] = {}
        self.last_move = 0.0

    def observe(self, snap: dict[str, Any], now: float) -> None:
        for e in snap["engines"]:
            cur = float(e["queue_depth"] + e["inflight"])
            self.load[e["id"]] = self.alpha * cur + (1 - self.alpha) * self.load.get(e["id"], cur)
        for c in snap["connections"]:
            prev = self._prev_sub.get(c["id"])
            if prev is not None and now > prev[0]:
                rate = max(0, c["subrequests_total"] - prev[1]) / (now - prev[0])
                self.conn_rate[c["id"]] = self.alpha * rate + (1 - self.alpha) * self.conn_rate.get(c["id"], rate)
            self._prev_sub[c["id"]] = (now, c["subrequests_total"])

    def decide(self, owners: tuple[int, ...], n_engines: int, now: float) -> tuple[int, int, int] | None:
        """(conn, from_engine, to_engine) or None."""
        if n_engines < 2 or now - self.last_move < self.cooldown_s or not self.load:
            return None
        busy = max(self.load, key=self.load.get)
        idle = min(self.load, key=self.load.get)
        hi, lo = self.load[busy], self.load[idle]
        mine = [c for c, e in enumerate(owners) if e == busy]
        if busy == idle or hi - lo < self.min_gap or hi < self.ratio * (lo + 0.5) or len(mine) < 2:
            return None
        # Move the connection whose traffic best evens out the two engines' rates.
        rate = {e: sum(self.conn_rate.get(c, 0.0) for c, o in enumerate(owners) if o == e) for e in (busy, idle)}
        gap = rate[busy] - rate[idle]
        conn = min(mine, key=lambda c: abs(gap - 2 * self.conn_rate.get(c, 0.0)))
        self.last_move = now
        return conn, busy, idle


class SupervisorControl:
    """Supervisor side: owns the shared resources and the control block, serves emrctl."""

    def __init__(self, plan, resources) -> None:
        self.plan = plan
        self.resources = resources
        self.supervisor = None
        self.block = None
        self.mailbox = None
        self.dispatcher = None
        self.metrics = None
        self.rebalancer = Rebalancer()
        self._last_rates = 0.0
        self._last_rebalance = 0.0
        self.auto_moves = 0

    # -------------------------------------------------------------- lifecycle

    def create(self) -> None:
        from flexemr.control.block import ControlBlock
        from flexemr.control.dispatch import Dispatcher
        from flexemr.control.mailbox import MailboxServer

        p = self.plan
        cfg = p.cfg
        self.resources.create()
        n_conn = len(p.connections)
        self.block = ControlBlock.create(
            p.instance, max(1, p.engines), n_conn, [t.name for t in p.spec.tables], _topology(p),
            conn_servers=[p.connections[c][0] for c in range(n_conn)],
            owners=[p.owners[c] for c in range(n_conn)],
            cache_policy=cfg.cache.policy, cache_capacity_bytes=cfg.cache.capacity,
            rebalance=cfg.ranker.rebalance and p.engines > 1 and not p.shared,
            supervisor_pid=os.getpid(),
        )
        self.mailbox = MailboxServer(self.block)
        self.dispatcher = Dispatcher(self)
        if cfg.ranker.metrics_port:
            from flexemr.metrics import start_metrics_server

            self.metrics = start_metrics_server(cfg.ranker.metrics_port, self.block, addr=cfg.ranker.metrics_addr)

    def unlink(self) -> None:
        for obj, fn in ((self.metrics, "stop"), (self.mailbox, "close")):
            if obj is not None and hasattr(obj, fn):
                try:
                    getattr(obj, fn)()
                except Exception:
                    pass
        if self.block is not None:
            try:
                self.block.close()
                self.block.unlink()
            except Exception:
                pass
            self.block = None
        self.resources.unlink()

    def on_ready(self, sup) -> None:
        self._record_children(sup)
        if self.supervisor is not None:
            # SIGHUP and emrctl share one dispatcher (circus-style).
            sup.handle_hup = lambda: self.dispatcher.dispatch_signal("SIGHUP")

    def _record_children(self, sup) -> None:
        if self.block is None:
            return
        for c in sup.children:
            if c.name.startswith("engine[") and c.pid:
                e = int(c.name[7:-1])
                self.block.engines[e].set_process(pid=c.pid, cpu=-1 if c.cpu is None else c.cpu, state="ready",
                                                   restarts=len(c.restarts), started_ns=time.monotonic_ns())
            elif c.name == "inference" and c.pid:
                self.block.set_inference(pid=c.pid, state="ready", restarts=len(c.restarts),
                                         started_ns=time.monotonic_ns())

    def on_child_exit(self, child, code: int) -> None:
        if self.block is None:
            return
        stopping = child.stopping or (self.supervisor is not None and self.supervisor.stopping)
        state = "stopping" if stopping else "restarting"
        if child.name.startswith("engine["):
            engine = int(child.name[7:-1])
            self.block.engines[engine].set_process(state=state, pid=0)
            if not stopping:
                self._speak_for_dead_engine(engine, code)
        elif child.name == "inference":
            self.block.set_inference(state=state, pid=0)

    def _speak_for_dead_engine(self, engine: int, code: int) -> None:
        """Fail the dead engine's in-flight subrequests now instead of at their timeout.

        Its completion ring has no producer until the engine restarts, so the
        supervisor may produce: one COMP_LOST per connection the engine owned.
        The inference process answers the affected requests with an error at
        once; the restarted engine reconnects and serves what comes next.
        """
        from flexemr import enginemsg as em
        from flexemr.ring import Ring

        owners = self.block.runtime.read().owners
        lost = [c for c, e in enumerate(owners) if e == engine]
        if not lost:
            return
        try:
            ring = Ring.attach(self.plan.ring_names(engine)[1])
        except Exception as e:
            logger.warning("cannot reach engine %d's completion ring: %s", engine, e)
            return
        try:
            reason = f"engine {engine} died (exit {code}); its connections are being reopened"
            for cid in lost:
                ring.write(em.PREFIX.pack(cid, 0), reason.encode(), kind=em.COMP_LOST, timeout=1)
        finally:
            ring.close()
        logger.warning("engine %d died: failed the subrequests in flight on connections %s", engine, lost)

    # -------------------------------------------------------------- tick

    def tick(self, sup) -> None:
        if self.block is None:
            return
        self.supervisor = sup
        while self.mailbox.serve_one(self.dispatcher, timeout=0.0):
            pass
        now = time.monotonic()
        if now - self._last_rates >= 1.0:
            self._last_rates = now
            self._record_children(sup) if any(c.pid and c.ready for c in sup.children) else None
            self.block.update_rates()
        interval = self.plan.cfg.ranker.rebalance_interval_s
        if now - self._last_rebalance >= interval and self.plan.engines > 1:
            self._last_rebalance = now
            self._rebalance(now)

    def _rebalance(self, now: float) -> None:
        rt = self.block.runtime.read()
        snap = self.block.snapshot()
        self.rebalancer.observe(snap, now)
        if not rt.rebalance:
            return
        move = self.rebalancer.decide(rt.owners, self.plan.engines, now)
        if move is None:
            return
        conn, src, dst = move
        logger.info("rebalancer: moving connection %d (server %d, %.0f subrequests/s) from engine %d (load %.1f) "
                    "to engine %d (load %.1f)", conn, self.plan.connections[conn][0],
                    self.rebalancer.conn_rate.get(conn, 0.0), src, self.rebalancer.load[src], dst,
                    self.rebalancer.load[dst])
        self.auto_moves += 1
        self.block.set_owner(conn, dst)

    # -------------------------------------------------------------- commands (emrctl and signals)

    def _wait_ack(self, epoch: int, what: str) -> float:
        """Wait until the inference process has applied ``epoch``; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < ACK_TIMEOUT_S:
            if self.block.ranker.read()["epoch_seen"] >= epoch:
                return time.monotonic() - t0
            if self.supervisor is not None:
                self.supervisor.reap()
            time.sleep(0.005)
        raise TimeoutError(f"{what}: the inference process did not confirm within {ACK_TIMEOUT_S:g} s")

    def cmd_status(self, cmd) -> dict:
        return {"snapshot": self.block.snapshot()}

    def cmd_migrate(self, cmd) -> dict:
        if self.plan.shared:
            raise ValueError("connections do not migrate under the \"shared\" mapping (every engine sends on every one)")
        if not self.plan.engines:
            raise ValueError("this ranker has no engines (it pools its own tables)")
        rt = self.block.runtime.read()
        if not 0 <= cmd.conn < len(rt.owners):
            raise ValueError(f"no connection {cmd.conn} (connections: 0-{len(rt.owners) - 1})")
        if not 0 <= cmd.to_engine < self.plan.engines:
            raise ValueError(f"no engine {cmd.to_engine} (engines: 0-{self.plan.engines - 1})")
        src = rt.owners[cmd.conn]
        if src == cmd.to_engine:
            return {"conn": cmd.conn, "engine": src, "moved": False, "message": f"already on engine {src}"}
        epoch = self.block.set_owner(cmd.conn, cmd.to_engine)
        waited = self._wait_ack(epoch, f"migrate {cmd.conn}")
        logger.info("connection %d moved from engine %d to engine %d in %.1f ms", cmd.conn, src, cmd.to_engine,
                    waited * 1e3)
        return {"conn": cmd.conn, "from": src, "engine": cmd.to_engine, "moved": True,
                "elapsed_ms": round(waited * 1e3, 2)}

    def cmd_cache_resize(self, cmd) -> dict:
        epoch = self.block.runtime.publish(cache_capacity_bytes=cmd.size_bytes)
        waited = self._wait_ack(epoch, "cache resize")
        return {"capacity_bytes": cmd.size_bytes, "elapsed_ms": round(waited * 1e3, 2),
                "cache": self.block.snapshot()["cache"]}

    def cmd_cache_policy(self, cmd) -> dict:
        epoch = self.block.runtime.publish(cache_policy=cmd.policy)
        waited = self._wait_ack(epoch, "cache policy")
        return {"policy": cmd.policy, "elapsed_ms": round(waited * 1e3, 2), "cache": self.block.snapshot()["cache"]}

    def cmd_rebalance(self, cmd) -> dict:
        if cmd.enabled and (self.plan.engines < 2 or self.plan.shared):
            raise ValueError("the rebalancer needs at least 2 engines and the \"owned\" mapping")
        self.block.runtime.publish(rebalance=cmd.enabled)
        return {"rebalance": cmd.enabled, "moves_so_far": self.auto_moves}

    def cmd_reload(self, cmd) -> dict:
        return {"reloaded": [], "message": "nothing to reload: cache size/policy and migrations change live through "
                                           "emrctl; other settings need a restart"}

    def cmd_shutdown(self, cmd) -> dict:
        if self.supervisor is not None:
            self.supervisor.stopping = True
        return {"stopping": True, "graceful": cmd.graceful}


# ------------------------------------------------------------------ data-path side


def engine_publisher(plan, engine_id: int):
    """A ``publish(engine)`` callback for engine ``engine_id`` (called ~10x/s between batches)."""
    state: dict[str, Any] = {}

    def publish(engine) -> None:
        block = state.get("block")
        if block is None:
            from flexemr.control.block import ControlBlock

            try:
                block = state["block"] = ControlBlock.attach(plan.instance)
            except Exception as e:
                logger.warning("no control block: %s", e)
                state["block"] = False
                return
        if block is False:
            return
        slot = block.engines[engine_id]
        now = time.monotonic_ns()
        inflight = 0
        bsent = brecv = 0
        for cid, st in list(engine.conns.items()):
            inflight += st.inflight
            bsent += st.bytes_sent
            brecv += st.bytes_received
            rtt = st.rtt_ns[-256:]
            p50, p99 = (np.percentile(rtt, [50, 99]) / 1e3) if rtt else (0.0, 0.0)
            slot.conn(cid).update(queued=st.inflight, inflight=st.inflight,
                                  credits=max(0, engine.initial_credits + st.granted - st.received),
                                  subrequests_total=st.sent, bytes_sent=st.bytes_sent,
                                  bytes_received=st.bytes_received, rtt_p50_us=float(p50), rtt_p99_us=float(p99),
                                  updated_ns=now)
        slot.update(active_connections=len(engine.conns), queue_depth=engine.sub.depth(), inflight=inflight,
                    subrequests_total=engine.subrequests, requests_total=engine.subrequests,
                    bytes_sent=bsent, bytes_received=brecv, busy_ns=engine.busy_ns, heartbeat_ns=now)

    return publish


def inference_hooks(plan):
    """Install the inference process's control hooks on an InferenceService."""

    def install(svc) -> None:
        from flexemr.control.block import ControlBlock

        try:
            block = ControlBlock.attach(plan.instance)
        except Exception as e:
            logger.warning("no control block (%s): status and commands are unavailable", e)
            return
        hooks = InferenceControl(svc, block)
        svc.control_hooks.append(hooks.poll)
        svc.on_migrated = hooks.on_migrated
        threading.Thread(target=hooks.publish_loop, name="publish", daemon=True).start()

    return install


class InferenceControl:
    """Applies runtime changes between batches and publishes the ranker's stats."""

    def __init__(self, svc, block) -> None:
        self.svc = svc
        self.block = block
        self.epoch = block.runtime.epoch
        self.pending: set[int] = set()
        self.target_epoch = self.epoch
        self._lock = threading.Lock()
        self._tables_prev: dict[str, np.ndarray] = {}
        self.block.ranker.update(epoch_seen=self.epoch)

    def poll(self) -> None:
        """Batcher thread, between batches: one u64 load unless something changed."""
        epoch = self.block.runtime.epoch
        if epoch == self.epoch or epoch & 1:
            return
        state = self.block.runtime.read()
        self.epoch = state.epoch
        for cid, eng in enumerate(state.owners):
            if cid in self.svc.owners and self.svc.owners[cid] != eng:
                # Pending before the engine hears of it: its COMP_MIGRATED can reach
                # on_migrated (completion thread) before migrate() even returns.
                with self._lock:
                    self.pending.add(cid)
                try:
                    if not self.svc.migrate(cid, eng):
                        with self._lock:
                            self.pending.discard(cid)
                except ValueError as e:
                    with self._lock:
                        self.pending.discard(cid)
                    logger.error("cannot migrate connection %d: %s", cid, e)
        if self.svc.cache is not None:
            self.svc.cache.apply_runtime(state.cache_policy.label, state.cache_capacity_bytes)
        with self._lock:
            self.target_epoch = state.epoch
            if not self.pending:
                self.block.ranker.update(epoch_seen=state.epoch)

    def on_migrated(self, cid: int, engine: int) -> None:
        """Completion thread: an engine adopted ``cid``."""
        with self._lock:
            self.pending.discard(cid)
            if not self.pending:
                self.block.ranker.update(epoch_seen=self.target_epoch)

    def publish_loop(self) -> None:
        last_log, last_count = time.monotonic(), 0
        while not self.svc.stop.is_set():
            time.sleep(PUBLISH_INTERVAL_S)
            try:
                self.publish()
            except Exception:
                logger.exception("publishing stats failed")
            now = time.monotonic()
            if now - last_log >= LOG_INTERVAL_S:
                count = self.svc.latency.count
                if count > last_count:
                    self._log_summary(count - last_count, now - last_log)
                last_log, last_count = now, count

    def _log_summary(self, requests: int, seconds: float) -> None:
        """One line every LOG_INTERVAL_S with traffic: rate, latency and where the time goes."""
        s = self.svc.stats()
        stages = " ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in s["stages_ms"].items())
        logger.info("%.1f req/s, p50 %.1f ms, p99 %.1f ms, mean batch %.0f; stage p50/p99 ms: %s",
                    requests / seconds, s["latency_p50_ms"], s["latency_p99_ms"], s["mean_batch"], stages)

    def publish(self) -> None:
        s = self.svc.stats()
        self.block.ranker.update(requests_total=s["requests_total"], errors_total=s["errors_total"],
                                 samples_total=s["samples_total"], batches_total=s["batches_total"],
                                 latency_p50_ms=s["latency_p50_ms"], latency_p99_ms=s["latency_p99_ms"],
                                 mean_batch=s["mean_batch"], requests_per_s=s["requests_per_s"],
                                 inflight_batches=s["inflight_batches"], heartbeat_ns=time.monotonic_ns())
        counts = self.svc.table_counters()
        deltas = {}
        for k, arr in counts.items():
            prev = self._tables_prev.get(k)
            deltas[k] = arr - prev if prev is not None else arr.copy()
            self._tables_prev[k] = arr.copy()
        if deltas:
            self.block.add_tables(**deltas)
        if self.svc.cache is not None:
            self.svc.cache.publish(self.block)
