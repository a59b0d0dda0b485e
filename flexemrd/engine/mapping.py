"""Connection mappings as strategies: which engine may send on which connection.

    owned   (FlexEMR) each connection belongs to exactly one engine: it alone
            sends and receives on it, so the hot path takes no lock; migration
            moves the socket to another engine.
    shared  (the contention FlexEMR removes, kept for comparison) every engine
            may send on every connection, under a cross-process lock per
            connection; each engine gets send-only copies of the others'
            sockets at start, and answers still arrive at the owner.

Both report a failed send as a lost connection through ``lost(cid, reason)``
(the completion writer's ``post_lost``: the sender never writes the ring).
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Mapping, Protocol

from flexemr.wire.frame import header_request_id

from flexemrd.engine.connections import ConnTable
from flexemrd.engine.credits import CreditMode
from flexemrd.engine.handoff import HANDOFF_SHARE, send_connection

# How long a frame for a connection that is migrating here waits for its socket.
ADOPT_WAIT_S = 10.0

LostFn = Callable[[int, str], None]


class CrossProcessLock(Protocol):
    """What the shared mapping needs of a lock (a posix_ipc.Semaphore)."""

    def acquire(self) -> None: ...
    def release(self) -> None: ...


class OwnedMapping:
    """Send on connections this engine owns; wait briefly for one migrating in."""

    name = "owned"

    def __init__(self, engine_id: int, table: ConnTable, credits: CreditMode, lost: LostFn,
                 stop: threading.Event) -> None:
        self.engine_id = engine_id
        self.table = table
        self.credits = credits
        self.lost = lost
        self.stop = stop

    def start(self, instance: str, n_engines: int, directory: Mapping[int, tuple[int, str]]) -> None:
        """Nothing to share: each connection has one owner."""

    def send(self, cid: int, frame: memoryview) -> bool:
        """Send one whole frame (a submission-ring slot) on ``cid``; False if it could not go out."""
        st = self.table.get(cid)
        if st is None:
            down = self.table.down_reason(cid)
            if down is None:
                st = self.table.wait_owned(cid, self.stop, ADOPT_WAIT_S)  # its socket arrives shortly
                down = self.table.down_reason(cid)
            if st is None:
                # Fail fast: the inference re-issues to a replica or fails the part naming the server.
                self.lost(cid, down or f"engine {self.engine_id} does not own connection {cid}")
                return False
        t0 = time.perf_counter_ns()
        rid = header_request_id(frame)
        self.credits.before_send(st, frame)
        st.sent_at[rid] = t0
        st.sent += 1
        try:
            st.bytes_sent += st.conn.send_frame([frame])
        except OSError as e:
            st.sent -= 1
            st.sent_at.pop(rid, None)
            self.lost(cid, f"send to server {st.conn.server} ({st.conn.address}) failed: {e}")
            return False
        return True


class SharedMapping:
    """Send on any connection, owned or a copy, under that connection's cross-process lock."""

    name = "shared"

    def __init__(self, engine_id: int, table: ConnTable, locks: Mapping[int, CrossProcessLock], lost: LostFn,
                 stop: threading.Event) -> None:
        self.engine_id = engine_id
        self.table = table
        self.locks = locks
        self.lost = lost
        self.stop = stop

    def start(self, instance: str, n_engines: int, directory: Mapping[int, tuple[int, str]]) -> None:
        """Give every other engine a send-only copy of the connections this engine owns."""
        for cid, st in self.table.items():
            server, address = directory[cid]
            for e in range(n_engines):
                if e != self.engine_id:
                    send_connection(instance, e, cid, server, address, HANDOFF_SHARE, [st.conn.fileno()])

    def send(self, cid: int, frame: memoryview) -> bool:
        st = self.table.get(cid)
        conn = st.conn if st is not None else self.table.shared.get(cid)
        if conn is None:
            conn = self.table.wait_sendable(cid, self.stop, ADOPT_WAIT_S)
            st = self.table.get(cid)
            if conn is None:
                self.lost(cid, f"engine {self.engine_id} has no copy of connection {cid}")
                return False
        lock = self.locks[cid]
        lock.acquire()
        try:
            conn.send_frame([frame])
        except OSError as e:
            self.lost(cid, f"send on shared connection {cid} failed: {e}")
            return False
        finally:
            lock.release()
        if st is not None:
            st.sent += 1  # answers come back to the owner only
        return True


ConnectionMapping = OwnedMapping | SharedMapping
