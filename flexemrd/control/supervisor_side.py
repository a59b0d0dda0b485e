"""Supervisor side of the control path: the control block, emrctl commands, the rebalancer's moves.

Runs on the supervisor's main loop (``tick``): it serves the mailbox, refreshes
rates, and every ``rebalance_interval_s`` asks the Rebalancer whether to move a
connection, applying the move with the same command as ``emrctl migrate``.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flexemr.config import format_size
from flexemrd.control.rebalancer import Rebalancer

logger = logging.getLogger(__name__)

ACK_TIMEOUT_S = 4.0  # below emrctl's 5 s, so emrctl hears our reason, not its own timeout
# A migration by reopening confirms once the new connection serves and the old one drained:
# connect + HELLO + drain, seconds on an emulated guest (emrctl --timeout must allow it).
REOPEN_ACK_TIMEOUT_S = 45.0


def _topology(plan) -> dict[str, Any]:
    n_srv = len(plan.servers)
    return {
        "instance": plan.instance,
        "mode": "local" if all(a.startswith("127.") for a in plan.servers) else "ranker",
        "servers": [{"name": f"embedding[{i}]", "address": a} for i, a in enumerate(plan.servers)],
        # per primary, the servers holding its shard group (primary first): status derives live replicas
        "holders": [list(plan.routing.holders_of(p)) for p in range(n_srv)],
        "replicas": plan.routing.replicas if n_srv else 0,
        "tables": [t.name for t in plan.spec.tables],
        "engines": plan.engines,
        "mapping": plan.cfg.ranker.mapping,
        "credits": plan.cfg.ranker.credits,
        "routing": plan.cfg.ranker.routing,
        "socket": plan.socket_path,
        "connections": [{"id": c, "server": s} for c, (s, _a) in sorted(plan.connections.items())],
    }


def _server_index(child_name: str) -> int | None:
    """``embedding[2]`` -> 2 (the child names of hosts.py); None for other children."""
    if child_name.startswith("embedding[") and child_name.endswith("]"):
        return int(child_name[len("embedding["):-1])
    return None


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
        self.rollout = None   # ModelRollout, built with the control block
        self._last_rates = 0.0
        self._last_rebalance = 0.0
        self.auto_moves = 0
        # Moves started without waiting (Migrate(wait=False)): (epoch, conn, from, to, started),
        # logged here once the inference process confirms their epoch.
        self._unconfirmed: list[tuple[int, int, int, int, float]] = []
        # child name -> (pid, started_ns): started_ns is written once per process, not once per tick
        self._started: dict[str, tuple[int, int]] = {}
        # embedding server index -> restarts since the daemon started (the supervisor's own
        # list only covers its restart window, an operator wants the total)
        self._server_restarts: dict[int, int] = {}

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
            conn_servers=[p.connections[c][0] for c in range(n_conn)], n_servers=len(p.servers),
            owners=[p.owners[c] for c in range(n_conn)],
            cache_policy=cfg.cache.policy, cache_capacity_bytes=cfg.cache.capacity,
            rebalance=cfg.ranker.rebalance and p.engines > 1 and not p.shared,
            supervisor_pid=os.getpid(),
        )
        self.mailbox = MailboxServer(self.block)
        self.dispatcher = Dispatcher(self)
        from flexemrd.control.rollout import ModelRollout

        self.rollout = ModelRollout(p, self.block)
        self.rollout.publish()
        if cfg.ranker.metrics_port:
            from flexemr.metrics import start_metrics_server

            self.metrics = start_metrics_server(cfg.ranker.metrics_port, self.block, addr=cfg.ranker.metrics_addr)

    def unlink(self) -> None:
        if self.rollout is not None:
            self.rollout.close()
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

    def on_signal(self, name: str) -> bool:
        """SIGHUP and emrctl share one dispatcher (circus-style); other signals stay the supervisor's."""
        if name != "SIGHUP" or self.dispatcher is None:
            return False
        self.dispatcher.dispatch_signal(name)
        return True

    def _started_ns(self, child) -> int:
        """When this process of ``child`` was first recorded (stable across ticks, new after a restart)."""
        pid, ns = self._started.get(child.name, (0, 0))
        if pid != child.pid:
            pid, ns = child.pid, time.monotonic_ns()
            self._started[child.name] = (pid, ns)
        return ns

    def _record_children(self, sup) -> None:
        if self.block is None:
            return
        for c in sup.children:
            if not c.pid:
                continue  # on_child_exit wrote its state; the restarted process is recorded on a later tick
            if c.name.startswith("engine["):
                e = int(c.name[7:-1])
                self.block.engines[e].set_process(pid=c.pid, cpu=-1 if c.cpu is None else c.cpu, state=c.state,
                                                   restarts=len(c.restarts), started_ns=self._started_ns(c))
            elif c.name == "inference":
                self.block.set_inference(pid=c.pid, state=c.state, restarts=len(c.restarts),
                                         started_ns=self._started_ns(c))
            elif (server := _server_index(c.name)) is not None and server < self.block.n_servers:
                self.block.servers[server].set_process(pid=c.pid, state=c.state,
                                                       restarts=self._server_restarts.get(server, 0),
                                                       started_ns=self._started_ns(c))

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
        elif (server := _server_index(child.name)) is not None and server < self.block.n_servers:
            if not stopping:
                self._server_restarts[server] = self._server_restarts.get(server, 0) + 1
            self.block.servers[server].set_process(state=state, pid=0,
                                                   restarts=self._server_restarts.get(server, 0))

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
        if self.rollout is not None:
            self.rollout.tick(now)
        if self._unconfirmed:
            self._confirm_moves(now)
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
        if self._moving(conn) is not None:
            return   # its previous move is not confirmed yet: a second one could be acknowledged early
        self.auto_moves += 1
        epoch = self.block.set_owner(conn, dst)
        self._unconfirmed.append((epoch, conn, src, dst, now))

    def _moving(self, conn: int) -> tuple[int, int, int, int, float] | None:
        """The unconfirmed move of ``conn`` (epoch, conn, from, to, started), if one is under way."""
        return next((m for m in self._unconfirmed if m[1] == conn), None)

    # -------------------------------------------------------------- commands (emrctl and signals)

    def _wait_ack(self, epoch: int, what: str, timeout: float = ACK_TIMEOUT_S) -> float:
        """Wait until the inference process has applied ``epoch``; returns seconds waited."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.block.ranker.read()["epoch_seen"] >= epoch:
                return time.monotonic() - t0
            if self.supervisor is not None:
                self.supervisor.reap()
            time.sleep(0.005)
        raise TimeoutError(f"{what}: the inference process did not confirm within {timeout:g} s")

    def _confirm_moves(self, now: float) -> None:
        """Log each move started without waiting once the ranker confirmed it (or gave up on it)."""
        seen = self.block.ranker.read()["epoch_seen"]
        left = []
        for epoch, conn, src, dst, t0 in self._unconfirmed:
            if seen >= epoch:
                logger.info("connection %d moved from engine %d to engine %d in %.1f ms (epoch %d)", conn, src, dst,
                            (now - t0) * 1e3, epoch)
            elif now - t0 > REOPEN_ACK_TIMEOUT_S:
                logger.error("connection %d: its move from engine %d to engine %d (epoch %d) is not confirmed "
                             "after %g s", conn, src, dst, epoch, REOPEN_ACK_TIMEOUT_S)
            else:
                left.append((epoch, conn, src, dst, t0))
        self._unconfirmed = left

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
        moving = self._moving(cmd.conn)
        if moving is not None:
            epoch, _, m_src, m_dst, t0 = moving
            raise ValueError(f"connection {cmd.conn} is still moving from engine {m_src} to engine {m_dst} (epoch "
                             f"{epoch}, started {time.monotonic() - t0:.1f} s ago); move it again once the ranker "
                             f"confirmed that (emrctl status --json: ranker.epoch_seen >= {epoch})")
        if src == cmd.to_engine:
            return {"conn": cmd.conn, "engine": src, "moved": False, "message": f"already on engine {src}"}
        from flexemr.transport.registry import migrates_by_reopening

        r = self.plan.cfg.ranker
        reopen = migrates_by_reopening(r.migration, r.transport, self.plan.connections[cmd.conn][1])
        epoch = self.block.set_owner(cmd.conn, cmd.to_engine)
        if not cmd.wait:
            # Started: the ranker confirms it by acknowledging the epoch (tick logs it); meanwhile
            # this loop serves further commands, so moves of other connections overlap this one.
            self._unconfirmed.append((epoch, cmd.conn, src, cmd.to_engine, time.monotonic()))
            logger.info("connection %d moving from engine %d to engine %d (epoch %d, not waiting)", cmd.conn, src,
                        cmd.to_engine, epoch)
            return {"conn": cmd.conn, "from": src, "engine": cmd.to_engine, "moved": True, "confirmed": False,
                    "epoch": epoch, "started_ns": time.monotonic_ns()}
        waited = self._wait_ack(epoch, f"migrate {cmd.conn}", REOPEN_ACK_TIMEOUT_S if reopen else ACK_TIMEOUT_S)
        logger.info("connection %d moved from engine %d to engine %d in %.1f ms", cmd.conn, src, cmd.to_engine,
                    waited * 1e3)
        return {"conn": cmd.conn, "from": src, "engine": cmd.to_engine, "moved": True,
                "elapsed_ms": round(waited * 1e3, 2)}

    def cmd_cache_resize(self, cmd) -> dict:
        budget = self.plan.cfg.cache.budget
        if cmd.size_bytes > budget:  # the cache shares the budget with the NN: it can never be larger
            raise ValueError(f"cache resize to {format_size(cmd.size_bytes)} exceeds [cache].budget "
                             f"({format_size(budget)}), the memory the NN and the cache share")
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

    def cmd_model_push(self, cmd) -> dict:
        """Start rolling out a model version (flexemrd/control/rollout.py drives it from the tick)."""
        return self.rollout.push(cmd.path, cmd.delta, cmd.version, cmd.base)

    def cmd_model_dense(self, cmd) -> dict:
        """The inference process reports a pushed version's dense NN loaded (or why not)."""
        return self.rollout.dense_loaded(cmd.version, cmd.error)

    def cmd_shutdown(self, cmd) -> dict:
        if self.supervisor is not None:
            self.supervisor.stopping = True
        return {"stopping": True, "graceful": cmd.graceful}


