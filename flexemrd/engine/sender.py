"""The engine's sender thread: drains the submission ring and acts on each message.

    SUB_FRAME     send the frame on its connection straight from the ring slot
                  (the mapping decides which socket and lock; the credit mode
                  may piggyback credits into the slot first); a cache-fill
                  FETCH the server advertised for RDMA READ is read instead
                  (reads.py) and never sent
    SUB_MIGRATE   hand the connection to another engine right away, answers
                  still in flight included (no drain): the receiver lets go of
                  it between two frames, the socket moves over SCM_RIGHTS, and
                  COMP_MIGRATED is *posted* to the receiver, which writes it
    SUB_OPEN      migration by reopening: have the reopener open this engine's own
                  connection (reopen.py; the sender never waits for it)
    SUB_RETIRE    migration by reopening: stop owning the connection and let the
                  retirer drain and close it (reopen.py)
    SUB_STOP      wait (bounded) for the answers in flight, then return

The sender never writes the completion ring and never publishes stats: its
only jobs are sends and hand-offs.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Mapping

from flexemr import enginemsg as em
from flexemr.ring import Ring

from flexemrd.engine.completions import CompletionWriter
from flexemrd.engine.connections import ConnTable
from flexemrd.engine.credits import CreditMode
from flexemrd.engine.handoff import HANDOFF_OWN, HANDOFF_RECONNECT, send_connection
from flexemrd.engine.mapping import ADOPT_WAIT_S, ConnectionMapping
from flexemrd.engine.reads import CacheReads
from flexemrd.engine.receiver import Receiver
from flexemrd.engine.reconnect import Reconnector
from flexemrd.engine.reopen import Reopener, Retirer

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 10.0


class Sender:
    """Run ``run()`` on the engine's main thread; counters are read by the stats view."""

    def __init__(self, engine_id: int, instance: str, submission: Ring, table: ConnTable,
                 directory: Mapping[int, tuple[int, str]], mapping: ConnectionMapping, credits: CreditMode,
                 receiver: Receiver, completions: CompletionWriter, stop: threading.Event,
                 reconnector: Reconnector | None = None, reopener: Reopener | None = None,
                 retirer: Retirer | None = None, reads: CacheReads | None = None) -> None:
        self.engine_id = engine_id
        self.instance = instance
        self.sub = submission
        self.table = table
        self.directory = directory
        self.mapping = mapping
        self.credits = credits
        self.receiver = receiver
        self.completions = completions
        self.stop = stop
        self.reconnector = reconnector
        self.reopener = reopener
        self.retirer = retirer
        self.reads = reads          # cache fills by RDMA READ (reads.py): a FETCH it takes is not sent
        # Written here only; read by the stats view.
        self.subrequests = 0
        self.busy_ns = 0

    def run(self) -> None:
        """Until SUB_STOP (after a bounded drain) or ``stop``."""
        wait_s = self.credits.sender_wait_s
        while True:
            msg = self.sub.read(timeout=wait_s)
            next_cid = None if msg is None else em.PREFIX.unpack_from(msg.data, 0)[0]
            self.credits.flush(self.table, exclude=next_cid)
            if msg is None:
                if self.stop.is_set():
                    return
                continue
            kind = msg.kind
            cid, arg = em.PREFIX.unpack_from(msg.data, 0)
            try:
                if kind == em.SUB_FRAME:
                    t0 = time.perf_counter_ns()
                    frame = msg.data[em.PREFIX_SIZE:]
                    if (self.reads is not None and self.reads.try_read(cid, frame)) or self.mapping.send(cid, frame):
                        self.subrequests += 1
                        self.busy_ns += time.perf_counter_ns() - t0
                elif kind == em.SUB_MIGRATE:
                    self.migrate_out(cid, arg)
                elif kind == em.SUB_OPEN and self.reopener is not None:
                    self.reopener.request(cid)
                elif kind == em.SUB_RETIRE and self.retirer is not None:
                    self.retirer.retire(cid, arg)
                elif kind == em.SUB_STOP:
                    msg.release()
                    self.drain()
                    return
            finally:
                if not msg.released:
                    msg.release()

    def drain(self, timeout: float = DRAIN_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while any(st.inflight for _cid, st in self.table.items() + self.table.retiring_items()) \
                and time.monotonic() < deadline:
            time.sleep(0.002)

    def migrate_out(self, cid: int, to_engine: int) -> None:
        """Hand ``cid`` to ``to_engine`` now, answers still in flight included.

        Whatever the server sends after the receiver let go stays in the
        socket and the new owner reads it; the inference matches answers by
        request id, whichever engine's ring they come through.
        """
        st = self.table.get(cid)
        if st is None and self.table.down_reason(cid) is not None:
            # Down: no socket to move; the other engine takes over reconnecting it.
            if self.reconnector is not None:
                self.reconnector.cancel(cid)
            self.table.forget_down(cid)
            server, address = self.directory[cid]
            send_connection(self.instance, to_engine, cid, server, address, HANDOFF_RECONNECT, [])
            logger.info("connection %d (server %d, down) handed to engine %d to reconnect", cid, server, to_engine)
            self.completions.post_migrated(cid, to_engine)
            return
        if st is None:
            # Moved here a moment ago and moved on again: the inference routes by
            # COMP_MIGRATED, which the previous owner posts once the socket is
            # sent, possibly before our hand-off thread has adopted it.
            st = self.table.wait_owned(cid, self.stop, ADOPT_WAIT_S)
            if st is None:
                logger.error("cannot hand connection %d to engine %d: it never arrived here", cid, to_engine)
                self.completions.post_lost(cid, f"engine {self.engine_id} does not own connection {cid}")
                return
        self.receiver.release(cid)
        self.table.remove(cid)
        server, address = self.directory[cid]
        try:
            handles = [st.conn.detach()]
            if st.credit_conn is not None:
                handles.append(st.credit_conn.detach())
        except NotImplementedError as e:
            # The transport cannot move it ([ranker].migration = "handoff" over RDMA): fail over
            # what is in flight and have the new owner reconnect, rather than lose the connection.
            self._handoff_by_reconnecting(cid, to_engine, st, str(e))
            return
        try:
            send_connection(self.instance, to_engine, cid, server, address, HANDOFF_OWN, handles,
                            inflight=st.inflight)
        finally:
            for h in handles:
                os.close(h)
        logger.info("connection %d (server %d) handed to engine %d with %d subrequests in flight",
                    cid, server, to_engine, st.inflight)
        self.completions.post_migrated(cid, to_engine)

    def _handoff_by_reconnecting(self, cid: int, to_engine: int, st, why: str) -> None:
        for c in (st.conn, st.credit_conn):
            if c is not None:
                c.close()
        server, address = self.directory[cid]
        logger.error("connection %d (server %d): %s; engine %d reconnects it (set [ranker].migration = "
                     "\"reopen\" or \"auto\" to migrate it without failing over)", cid, server, why, to_engine)
        self.completions.post_lost(cid, f"connection {cid} to server {server} ({address}) could not move to "
                                        f"engine {to_engine}: {why}")
        send_connection(self.instance, to_engine, cid, server, address, HANDOFF_RECONNECT, [])
        self.completions.post_migrated(cid, to_engine)
