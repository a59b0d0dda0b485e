"""The RDMA benchmark's embedding server: one process, one Endpoint, a ServerChannel per engine.

Pools its table the way the daemon's servers do (one gather and one
``np.add.reduceat`` per lookup, straight into registered reply memory) and
writes the partials back with WRITE WITH IMM.  Credits are granted as receive
slots are reposted (after the reply's write completed), once per batch of
completions, and the CLOCK_MONOTONIC time of every grant post is logged per
connection: the engine pairs the k-th grant it applied with the k-th one
posted here (grants travel in order on one RC QP) to get grant latency.

Connection set-up is a unix socket per server (the benchmark's stand-in for
the daemon's authenticated TCP HELLO): the engine sends ``{"credits", "recv_slots",
"blob", "name"}``, the server connects its QPs first, then answers ``{"blob"}``
(so the engine's first SEND never meets a QP that is not ready yet).  The socket
stays open; ``"bye"`` on it is answered with the grant log (and the fraction of the
session the server spent idle) and closes the channel.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from flexemr_bench.netlayer_rdma_wire import HEADER_BYTES, HEADER_INT64, Workload, bag_starts, make_table, pool

logger = logging.getLogger(__name__)

# Longest sleep for completions before looking at the sockets again (a new
# engine or a "bye" waits at most this long; lookups never do).
IDLE_WAIT_S = 0.05


class _Session:
    """One engine's connection: its channel, receive and reply memory, grant log."""

    def __init__(self, ep: Any, table: np.ndarray, w: Workload, conn: Connection, idle: list[int]) -> None:
        from flexemr.transport.rdma.channel import ServerChannel

        hello = conn.recv()
        self.conn = conn
        self.table = table
        self.w = w
        self.starts = bag_starts(w.bags, w.ids_per_bag)
        slots = int(hello["recv_slots"])
        self.receive = ep.register(np.zeros(slots * w.request_bytes, np.uint8))
        self.replies = ep.register(np.zeros(slots * w.reply_bytes, np.uint8))
        self.out = np.frombuffer(self.replies.array, np.float32).reshape(slots, w.bags, w.dim)
        # in band, grants share the data QP's send queue with the writes
        self.ch = ServerChannel(ep, str(hello["name"]), self.receive, self.replies, recv_slots=slots,
                                depth=2 * slots + 16, credits=str(hello["credits"]))
        self.ch.connect(hello["blob"])
        conn.send({"blob": self.ch.blob()})
        self.grant_posted_ns: list[int] = []
        self.requests = 0
        self.idle = idle  # the server's running total of ns spent waiting with nothing to do
        self.idle0, self.t0 = idle[0], time.monotonic_ns()

    def handle(self, events: list[object]) -> None:
        from flexemr.transport.rdma.channel import Request, WriteDone
        from flexemr.transport.rdma.errors import QueuePairError

        done: list[int] = []
        w = self.w
        for ev in events:
            if isinstance(ev, QueuePairError):
                raise ev
            if isinstance(ev, Request):
                rid, dst, bags, per_bag = np.frombuffer(ev.view, np.int64, HEADER_INT64).tolist()
                if (bags, per_bag) != (w.bags, w.ids_per_bag) or ev.nbytes != w.request_bytes:
                    raise ValueError(f"{self.ch.peer}: lookup {rid} of {bags}x{per_bag} ids in {ev.nbytes} bytes, "
                                     f"expected {w.bags}x{w.ids_per_bag} in {w.request_bytes}")
                ids = np.frombuffer(ev.view, np.int32, bags * per_bag, HEADER_BYTES)
                pool(self.table, ids, self.starts, self.out[ev.slot])
                if not self.ch.reply(rid, ev.slot * w.reply_bytes, w.reply_bytes, dst, wr_id=ev.slot):
                    raise RuntimeError(f"{self.ch.peer}: send queue full with depth > 2 x receive slots")
                self.requests += 1
            elif isinstance(ev, WriteDone):
                done.append(ev.wr_id)  # the partials are at the engine: the slot may take a new lookup
        if done:
            self.ch.release(done)
        self.flush_grants()

    def flush_grants(self) -> None:
        """Post the credits owed (a full send queue defers them to the next batch of completions)."""
        # Stamped before the post: on a busy CPU this process may lose the core
        # right after it, while the grant is already on its way.
        t = time.monotonic_ns()
        if self.ch.grant():
            self.grant_posted_ns.append(t)

    def bye(self) -> None:
        idle = (self.idle[0] - self.idle0) / max(1, time.monotonic_ns() - self.t0)
        self.conn.send({"grant_posted_ns": np.array(self.grant_posted_ns, np.int64), "requests": self.requests,
                        "idle_fraction": idle})
        self.close()

    def close(self) -> None:
        self.ch.close()
        self.receive.close()
        self.replies.close()
        self.conn.close()


def serve(index: int, sock_path: str, device: str, w: Workload, control: Connection) -> None:
    """Serve engines on ``sock_path`` until ``"stop"`` arrives on ``control`` (run in a forked process)."""
    from flexemr.transport.rdma.endpoint import Endpoint

    ep = Endpoint(device)
    table = make_table(index, w.rows, w.dim)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(16)
    sessions: dict[int, _Session] = {}
    idle = [0]  # ns in collect() that brought nothing: is the server the bottleneck?
    control.send(("ready", os.getpid()))
    try:
        while True:
            # Sleep on the CQ's channel (Endpoint.collect arms it), then peek at the sockets.
            t = time.monotonic_ns()
            if not ep.collect(IDLE_WAIT_S):
                idle[0] += time.monotonic_ns() - t
            for s in list(sessions.values()):
                s.handle(ep.take(s.ch))
            ready, _, _ = select.select([listener, control, *(s.conn for s in sessions.values())], [], [], 0)
            if control in ready:
                if control.recv() == "stop":
                    break
            if listener in ready:
                sock, _ = listener.accept()
                s = _Session(ep, table, w, Connection(sock.detach()), idle)
                sessions[s.conn.fileno()] = s
            for fd, s in list(sessions.items()):
                if s.conn in ready:
                    try:
                        msg = s.conn.recv()
                    except EOFError:
                        msg = None
                    if msg == "bye":
                        s.bye()
                    else:  # the engine went away without saying goodbye
                        s.close()
                    del sessions[fd]
    finally:
        for s in sessions.values():
            s.close()
        listener.close()
        os.unlink(sock_path)
        ep.close()
        control.send(("stopped", os.getpid()))
