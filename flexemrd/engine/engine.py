"""Engine worker: owns a set of connections to embedding servers and one parallelism unit.

With TCP the unit is the engine's own process, sockets and threads; with
RDMA it is a thread domain + parent domain.  Under the "owned" mapping no two
engines share a connection, so nothing on the hot path takes a lock.

Threads, each the only writer of what it owns::

    sender     (main thread, sender.py) drains the submission ring, sends each
               frame straight from its ring slot, hands connections away
    receiver   (receiver.py) polls the connections, lands each response in the
               completion ring: the ring's ONE producer (completions.py)
    handoff    receives connections other engines hand over (handoff.py)
    reconnect  retries lost connections with backoff and jitter (reconnect.py)
    reopen     migration by reopening (reopen.py): opens this engine's own
               connection for one migrating here ...
    retire     ... and drains and closes one that migrated away
    publisher  calls ``publish(stats_view)`` every PUBLISH_INTERVAL_S: control
               work never runs on the data-path threads, and a slow or broken
               control block cannot stall them

How credits are granted and which engine may send on which connection are
strategies (credits.py, mapping.py) chosen once at construction.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Mapping, Sequence

from flexemr.ring import Ring
from flexemr.transport.base import Transport

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnState, Connector, ConnTable, Shard
from flexemrd.engine.credits import credit_mode
from flexemrd.engine.handoff import HANDOFF_RECONNECT, HANDOFF_SHARE, Handoff, HandoffReceiver
from flexemrd.engine.mapping import ConnectionMapping, CrossProcessLock, OwnedMapping, SharedMapping
from flexemrd.engine.receiver import Receiver, Wakeup
from flexemrd.engine.reads import CacheReads
from flexemrd.engine.reconnect import Reconnector
from flexemrd.engine.reopen import Reopener, Retirer
from flexemrd.engine.sender import Sender
from flexemrd.engine.stats import EngineStatsView

logger = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 0.1
_JOIN_S = 2.0

PublishFn = Callable[[EngineStatsView], None]


class Engine:
    """One engine worker's data path (the process entry is ``flexemrd.engine.main.engine_main``)."""

    def __init__(
        self,
        engine_id: int,
        instance: str,
        transport: Transport,
        submission: Ring,
        completion: Ring,
        connections: Mapping[int, tuple[int, str]],
        owned: Sequence[int],
        publish: PublishFn | None = None,
        credits: str = "off",
        credits_per_connection: int = 4,
        token: str = "ranker",
        expected_shards: Mapping[int, Sequence[Shard]] | None = None,
        shared_locks: Mapping[int, CrossProcessLock] | None = None,
        n_engines: int = 1,
        heartbeat: Callable[[], None] | None = None,
        secret: bytes | None = None,
    ) -> None:
        self.id = engine_id
        self.instance = instance
        self.transport = transport
        self.n_engines = n_engines
        self.directory = dict(connections)  # conn_id -> (server, address), every connection of the ranker
        self.stop = threading.Event()
        self._publish = publish
        self.credits = credit_mode(credits, credits_per_connection)
        self.table = ConnTable()
        self.wakeup = Wakeup()
        self.completions = CompletionWriter(completion, self.wakeup.wake)
        lost = self.completions.post_lost
        self.mapping: ConnectionMapping = (
            OwnedMapping(engine_id, self.table, self.credits, lost, self.stop) if shared_locks is None
            else SharedMapping(engine_id, self.table, shared_locks, lost, self.stop))
        # Cache fills by RDMA READ where the server advertised its rows (reads.py); RDMA only.
        self.reads = (CacheReads(self.table, self.completions, engine_id, self.stop)
                      if transport.name == "rdma" else None)
        self.receiver = Receiver(self.table, self.completions, self.credits, self.wakeup, self.stop,
                                 heartbeat or (lambda: None), on_dead=self._lost, reads=self.reads)
        connector = Connector(transport, token, self.credits.initial, self.credits.credit_channel, expected_shards,
                              secret=secret)
        self.reconnector = Reconnector(connector, self.directory, self._reconnected, self.stop)
        self.reopener = Reopener(engine_id, connector, self.directory, self.table, self._own, self.completions,
                                 self.stop)
        self.retirer = Retirer(engine_id, self.table, self.completions, self.receiver.release,
                               self.reconnector.cancel, self.stop)
        self.sender = Sender(engine_id, instance, submission, self.table, self.directory, self.mapping,
                             self.credits, self.receiver, self.completions, self.stop, self.reconnector,
                             self.reopener, self.retirer, reads=self.reads)
        self.stats = EngineStatsView(engine_id, self.table, submission, self.sender, self.credits.initial,
                                     payloads=self.completions, reads=self.reads)
        # Bound before connecting, so engines handing us connections find us early.
        self._handoffs = HandoffReceiver(instance, engine_id)
        try:
            for cid in owned:
                server, address = self.directory[cid]
                try:
                    self._own(connector.open(cid, server, address))
                    # A restarted engine's connections are new: whatever was said of them before is over.
                    self.completions.post_connected(cid)
                except OSError as e:
                    # Serve degraded rather than fail the boot: the server may come back.
                    reason = f"connection to server {server} ({address}) failed: {e}"
                    logger.warning("%s; serving without it and reconnecting", reason)
                    self._lost(cid, reason)
        except BaseException:   # a ProtocolError here is a configuration error: halt with it
            self.close()
            raise

    def _own(self, st: ConnState) -> None:
        self.table.add(st)
        self.receiver.watch(st.conn_id)

    # ------------------------------------------------------------ losses and reconnects

    def _lost(self, cid: int, reason: str) -> None:
        """Any thread: ``cid`` is gone; close it, fail fast what comes for it, and reconnect."""
        if self.retirer.dead(cid, reason):
            return  # it had migrated away by reopening: the retirer reports what it still owed
        st = self.table.mark_down(cid, reason)
        if st is not None:
            st.conn.close()
            if st.credit_conn is not None:
                st.credit_conn.close()
        self.completions.post_lost(cid, reason)
        self.reconnector.schedule(cid)

    def _reconnected(self, st: ConnState, attempts: int) -> None:
        self._own(st)
        self.completions.post_connected(st.conn_id)

    # ------------------------------------------------------------ threads

    def run(self) -> None:
        """Serve until SUB_STOP or ``stop``; then stop the other threads and close everything."""
        threads = [threading.Thread(target=self.receiver.run, name="receiver", daemon=True),
                   threading.Thread(target=self._handoff_loop, name="handoff", daemon=True),
                   threading.Thread(target=self.reconnector.run, name="reconnect", daemon=True),
                   threading.Thread(target=self.reopener.run, name="reopen", daemon=True),
                   threading.Thread(target=self.retirer.run, name="retire", daemon=True)]
        if self._publish is not None:
            threads.append(threading.Thread(target=self._publisher_loop, args=(self._publish,), name="publisher",
                                            daemon=True))
        for t in threads:
            t.start()
        try:
            self.mapping.start(self.instance, self.n_engines, self.directory)
            self.sender.run()
        finally:
            self.stop.set()
            self.wakeup.wake()
            for t in threads:
                t.join(_JOIN_S)
            self.close()

    def close(self) -> None:
        self.retirer.close_all()
        for _cid, st in self.table.items():
            st.conn.close()
            if st.credit_conn is not None:
                st.credit_conn.close()
        self._handoffs.close()

    def _handoff_loop(self) -> None:
        while not self.stop.is_set():
            try:
                h = self._handoffs.receive(timeout=0.2)
            except OSError:
                return  # closed: the engine is stopping
            if h is not None:
                self._adopt(h)

    def _adopt(self, h: Handoff) -> None:
        if h.kind == HANDOFF_RECONNECT:
            logger.info("took over connection %d (server %d), which is down: reconnecting it", h.conn_id, h.server)
            self._lost(h.conn_id, f"connection to server {h.server} ({h.address}) is down (reconnecting)")
            return
        conn = self.transport.adopt(h.fds[0], h.conn_id, h.server, h.address)
        if h.kind == HANDOFF_SHARE:
            self.table.add_shared(conn)
            return
        credit_conn = self.transport.adopt(h.fds[1], h.conn_id, h.server, h.address) if len(h.fds) > 1 else None
        self._own(ConnState(conn, credit_conn, inflight=h.inflight))
        logger.info("adopted connection %d (server %d)", h.conn_id, h.server)

    def _publisher_loop(self, publish: PublishFn) -> None:
        failing = False
        while not self.stop.wait(PUBLISH_INTERVAL_S):
            try:
                publish(self.stats)
                failing = False
            except Exception:
                if not failing:  # once per streak: a broken control block must not flood the log
                    logger.exception("publishing engine stats failed")
                failing = True
