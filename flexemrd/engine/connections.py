"""Per-connection state of an engine, the table of connections it owns, and opening one.

Opening a connection is connect + HELLO: the engine introduces itself
(``"<token>/<conn id>/<data|credit>"``, aux = the credits it grants up front),
authenticates when the server asks for it and the ranker has a secret (both
sides prove knowledge of it, ``flexemr.auth``; a ranker with a secret refuses
a server that does not ask), and checks that the server holds exactly the shards this ranker's routing
expects, so a misconfigured host fails at boot with a message naming both
sides instead of answering lookups wrongly.

Who writes what (each field has one writer thread, so nothing here locks on
the hot path)::

    sender     sent, bytes_sent, sent_at, grants_sent, granted (in-band)
    receiver   received, bytes_received, rtt, grants_made, grant_ns, granted (priority)
    sender / handoff   the table itself (add, remove), under its condition
    sender / retirer   ``retiring``: connections migrated away by reopening, still
                       receiving their last answers (flexemrd/engine/reopen.py)

A connection opened for a migration by reopening introduces itself with a
label of its own (``"<conn id>.<engine>.<n>"`` instead of ``"<conn id>"``), so
the embedding server books it apart from the connection it replaces, which
stays open until its answers are in: each keeps its own credit pool.
"""

from __future__ import annotations

import threading
from typing import Mapping, Sequence

import numpy as np

from flexemr.errors import ProtocolError
from flexemr.transport.base import Connection, Transport
from flexemr.wire import codec
from flexemr.wire.handshake import client_hello

# (table id, dim, start row, end row) of one shard, as routing builds them
Shard = tuple[int, int, int, int]

RTT_WINDOW = 256  # recent round trips kept per connection for the p50/p99 the publisher reports


class RttWindow:
    """The last ``RTT_WINDOW`` round trips in ns: one writer (receiver), any number of readers.

    A fixed numpy ring, so a reader copying it while the receiver adds one never
    sees a resized container (a list or deque would need a lock for that).
    """

    __slots__ = ("_ns", "_count")

    def __init__(self) -> None:
        self._ns = np.zeros(RTT_WINDOW, dtype=np.int64)
        self._count = 0

    def add(self, ns: int) -> None:
        self._ns[self._count % RTT_WINDOW] = ns
        self._count += 1

    def recent(self) -> list[int]:
        """Up to ``RTT_WINDOW`` recent samples, in no particular order."""
        n = min(self._count, RTT_WINDOW)
        return self._ns[:n].tolist()


class ConnState:
    """One connection the engine owns: its sockets and counters (see module docstring for writers)."""

    __slots__ = ("conn", "credit_conn", "sent", "received", "bytes_sent", "bytes_received", "rtt", "sent_at",
                 "grants_made", "grants_sent", "grant_ns", "granted")

    def __init__(self, conn: Connection, credit_conn: Connection | None = None, inflight: int = 0) -> None:
        self.conn = conn
        self.credit_conn = credit_conn
        # In-band credits: the receiver counts grants made, the sender grants sent;
        # two single-writer counters instead of one shared one (no lost updates).
        self.grants_made = 0
        self.grants_sent = 0
        self.grant_ns = 0
        self.granted = 0
        # A migrated connection arrives owing answers to the previous owner's sends.
        self.sent = inflight
        self.received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rtt = RttWindow()
        self.sent_at: dict[int, int] = {}

    @property
    def conn_id(self) -> int:
        return self.conn.conn_id

    @property
    def inflight(self) -> int:
        return self.sent - self.received


class ConnTable:
    """The connections an engine owns, plus send-only copies under the "shared" mapping.

    Changes (adopt, migrate away) are rare and go under one condition so the
    sender can wait for a connection that is migrating here; lookups are plain
    dict reads.
    """

    def __init__(self) -> None:
        self.owned: dict[int, ConnState] = {}
        self.shared: dict[int, Connection] = {}
        self.down: dict[int, str] = {}          # owned by us but lost: reconnecting (cid -> why)
        self.retiring: dict[int, ConnState] = {}  # migrated away by reopening, draining its answers
        self._changed = threading.Condition()

    def get(self, cid: int) -> ConnState | None:
        return self.owned.get(cid)

    def add(self, st: ConnState) -> None:
        with self._changed:
            self.owned[st.conn_id] = st
            self.down.pop(st.conn_id, None)
            self._changed.notify_all()

    def mark_down(self, cid: int, reason: str) -> ConnState | None:
        """``cid`` is lost: forget its state (returned, to close) and remember why until it is back."""
        with self._changed:
            self.down[cid] = reason
            self._changed.notify_all()
            return self.owned.pop(cid, None)

    def forget_down(self, cid: int) -> bool:
        with self._changed:
            return self.down.pop(cid, None) is not None

    def down_reason(self, cid: int) -> str | None:
        return self.down.get(cid)

    def remove(self, cid: int) -> ConnState | None:
        with self._changed:
            return self.owned.pop(cid, None)

    def add_shared(self, conn: Connection) -> None:
        with self._changed:
            self.shared[conn.conn_id] = conn
            self._changed.notify_all()

    def wait_owned(self, cid: int, stop: threading.Event, timeout: float) -> ConnState | None:
        """The connection ``cid`` once it is here (it may be migrating in), or None after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: cid in self.owned or cid in self.down or stop.is_set(), timeout=timeout)
            return self.owned.get(cid)

    def wait_sendable(self, cid: int, stop: threading.Event, timeout: float) -> Connection | None:
        """A connection to send ``cid``'s frames on, owned or a shared copy; None after ``timeout``."""
        with self._changed:
            self._changed.wait_for(lambda: cid in self.owned or cid in self.shared or stop.is_set(), timeout=timeout)
            st = self.owned.get(cid)
            return st.conn if st is not None else self.shared.get(cid)

    def items(self) -> list[tuple[int, ConnState]]:
        """A snapshot of the owned connections (safe from any thread)."""
        with self._changed:
            return list(self.owned.items())

    def retire(self, cid: int) -> ConnState | None:
        """Stop owning ``cid`` but keep it receiving (its answers in flight): returned, or None if not owned."""
        with self._changed:
            st = self.owned.pop(cid, None)
            if st is not None:
                self.retiring[cid] = st
            self._changed.notify_all()
            return st

    def retired(self, cid: int) -> ConnState | None:
        """``cid`` finished draining: forget it (returned, to close)."""
        with self._changed:
            st = self.retiring.pop(cid, None)
            self._changed.notify_all()
            return st

    def retiring_items(self) -> list[tuple[int, ConnState]]:
        with self._changed:
            return list(self.retiring.items())

    def wait_not_retiring(self, cid: int, stop: threading.Event, timeout: float) -> bool:
        """Wait until no connection ``cid`` drains here any more; False after ``timeout``."""
        with self._changed:
            return self._changed.wait_for(lambda: cid not in self.retiring or stop.is_set(), timeout=timeout) \
                and cid not in self.retiring

    def __len__(self) -> int:
        return len(self.owned)


def check_shards(conn: Connection, hello: codec.Hello, expected: Sequence[Shard]) -> None:
    """ProtocolError unless the server's HELLO lists exactly the shards routing expects of it."""
    got = sorted((int(r["table_id"]), int(r["start"]), int(r["end"])) for r in hello.shards)
    want = sorted((t, a, b) for t, _dim, a, b in expected)
    if got != want:
        raise ProtocolError(
            f"server {conn.server} at {conn.address} ({hello.name}) holds shards {got[:4]}... but this ranker's "
            f"routing expects {want[:4]}...: check [embedding].index, servers and routing on that host"
        )


def say_hello(conn: Connection, token: str, channel: str, credits: int, secret: bytes | None = None,
              label: str | None = None) -> codec.Hello:
    """Introduce this engine on ``conn`` (authenticating with ``secret``) and return the server's HELLO.

    ``label`` names the connection to the server (default: its conn id); see the module docstring.

    ProtocolError if the server refuses us, fails to prove it knows the secret,
    asks for a secret we do not have, or (we having one) does not ask for it.
    The HELLO carries the transport's connection blob (RDMA: QP, GID, regions);
    the server's answer completes it and the data path may switch to verbs.
    """
    def recv() -> tuple:
        h = conn.recv_header()
        return h, conn.recv_payload(h)

    hello = client_hello(conn.send_frame, recv, f"server {conn.server} ({conn.address})", codec.ROLE_RANKER,
                         f"{token}/{conn.conn_id if label is None else label}/{channel}", credits=credits, secret=secret, blob=conn.hello_blob())
    conn.hello_done(hello.blob)
    return hello


class Connector:
    """Opens an engine's connections: data channel, and the credit channel when the mode wants one."""

    def __init__(self, transport: Transport, token: str, initial_credits: int, credit_channel: bool,
                 expected_shards: Mapping[int, Sequence[Shard]] | None = None, secret: bytes | None = None) -> None:
        self.transport = transport
        self.token = token
        self.initial_credits = initial_credits
        self.credit_channel = credit_channel
        self.expected_shards = dict(expected_shards or {})
        self.secret = secret

    def open(self, cid: int, server: int, address: str, label: str | None = None) -> ConnState:
        """Connect, HELLO (and the credit channel's); ``label``: a name apart for a reopened connection."""
        opened = [self.transport.connect(address, cid, server)]
        try:
            hello = say_hello(opened[0], self.token, "data", self.initial_credits, self.secret, label)
            want = self.expected_shards.get(server)
            if want is not None:
                check_shards(opened[0], hello, want)
            if self.credit_channel:
                opened.append(self.transport.connect(address, cid, server, priority=True))
                say_hello(opened[1], self.token, "credit", 0, self.secret, label)
        except BaseException:
            for c in opened:
                c.close()
            raise
        return ConnState(opened[0], opened[1] if len(opened) > 1 else None)
