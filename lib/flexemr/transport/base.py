"""The transport interface, both ends: ranker engines connect, embedding servers listen.

A ``Connection`` carries whole frames between a ranker engine and one
embedding server, and is the same object on both ends.  Buffer management
and message layout live above it (the engine receives payloads straight into
shared-memory ring slots through ``recv_payload_into``), so an RDMA
implementation only has to move bytes: one queue pair per connection, one
thread domain + parent domain per engine so QPs of different engines never
share a UAR (FlexEMR 3.2).  ``detach``/``Transport.adopt`` move a live
connection to another engine process (TCP: the socket itself over
SCM_RIGHTS; RDMA: re-associating the QP with the new engine's domain).

Two styles of use:

- blocking (engines, tools): ``send_frame``, ``recv_header``, ``recv_payload``,
  ``recv_payload_into``;
- non-blocking (the embedding server's event loop): ``recv_nowait`` and
  ``send_nowait`` move what can be moved now and never wait, and ``fileno()``
  is what the loop's selector watches.

A ``Listener`` (``Transport.listen``) hands out server-side connections; its
``accept`` never blocks (None when nobody is waiting), so one event loop can
watch the listener and every connection.

This module imports no implementation (tcp.py and verbs.py import it), so
there is no import loop; ``flexemr.transport.registry`` picks one.  It also
holds the two socket chores every socket-backed transport (tcp.py, shm.py)
does the same way: ``accept_nowait`` and ``close_socket``.
"""

from __future__ import annotations

import abc
import errno
import socket
from typing import Any, NamedTuple, Sequence

from flexemr.wire.frame import Header

__all__ = ["Connection", "Lent", "Listener", "Transport", "PEER_ACCEPT_ERRNOS", "accept_nowait", "close_socket"]

# accept() failures of one connection, not of the listener: the peer gave up
# between SYN and accept, or a firewall refused it.  Running out of
# descriptors or memory (EMFILE, ENOMEM...) is raised: the listener stays
# readable, so the caller must back off rather than retry at once.
PEER_ACCEPT_ERRNOS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def accept_nowait(sock: socket.socket) -> tuple[socket.socket, Any] | None:
    """``sock.accept()`` on a non-blocking listener: None when nobody is waiting or that one peer failed."""
    try:
        return sock.accept()
    except (BlockingIOError, InterruptedError):
        return None
    except OSError as e:
        if e.errno in PEER_ACCEPT_ERRNOS:
            return None
        raise


def close_socket(sock: socket.socket) -> None:
    """Close ``sock``, never raising: ``close()`` of a connection or listener is idempotent and quiet."""
    try:
        sock.close()
    except OSError:
        pass


class Lent(NamedTuple):
    """A payload left where it landed (``Connection.lend_payload``): lend ``seq`` of ring ``ring``.

    The bytes are at stream position ``pos`` of the shared-memory ring
    ``ring`` (segment inode ``ino``) until a ``flexemr.ring.Borrower`` gives
    lend ``seq`` back.
    """

    ring: str
    ino: int
    seq: int
    pos: int
    nbytes: int


class Connection(abc.ABC):
    """One frame stream; ``peer`` names the other end for log lines."""

    conn_id: int
    server: int
    address: str
    peer: str

    @abc.abstractmethod
    def send_frame(self, buffers: Sequence) -> int:
        """Send one frame given as a buffer list (blocking); returns bytes sent."""

    @abc.abstractmethod
    def recv_header(self) -> Header:
        """Block until the next frame header (ProtocolError if invalid, ConnectionError on EOF)."""

    @abc.abstractmethod
    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        """Receive the payload of ``header`` into ``view`` (no intermediate copy)."""

    @abc.abstractmethod
    def recv_payload(self, header: Header) -> memoryview:
        """Receive a payload into the connection's own reusable buffer (valid until the next read)."""

    @abc.abstractmethod
    def recv_nowait(self, view: memoryview) -> int:
        """Receive what has arrived, up to ``len(view)`` bytes, without waiting.

        Returns the number of bytes received, 0 when nothing is there yet;
        raises ConnectionError when the peer has closed.
        """

    @abc.abstractmethod
    def send_nowait(self, views: Sequence[memoryview]) -> int:
        """Send as much of ``views`` (in order) as fits now; returns bytes sent, maybe 0."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """A pollable descriptor that is readable when a frame is arriving."""

    @abc.abstractmethod
    def detach(self) -> int:
        """Give up the connection for migration; returns the handle to pass on."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection (idempotent; never raises)."""

    def interrupt(self) -> None:
        """Wake a thread blocked reading this connection: its read fails as if the peer had gone.

        Nothing is freed (``close`` does that, once no thread is inside): an
        engine retiring a connection uses it to get its receiver out first.
        """

    def lend_payload(self, header: Header) -> Lent | None:
        """Leave ``header``'s payload where it landed and say where (zero copy); None: receive it instead.

        Only a transport whose receive buffer is shared memory another process
        can map (shm) ever lends; None means nothing was consumed.
        """
        return None

    def ready_to_read(self) -> bool:
        """After ``fileno()`` turned readable: will a read find bytes (or EOF) now?  Non-blocking.

        A socket's readability means exactly that (True); an RDMA stream's fd
        also wakes for its own send completions, which bring nothing to read.
        """
        return True

    def setup_report(self) -> str:
        """What setting this connection up cost, step by step, for a log line ('' when nothing is measured)."""
        return ""

    def send_backlogged(self) -> bool:
        """Does the connection hold bytes ``send_nowait`` accepted but could not send yet?

        TCP and shm never do (what they accept is in the kernel or the ring);
        an RDMA stream holds them until the peer grants ring slots, and its
        fd turns readable when the grants land.
        """
        return False

    # A transport that sets up its data path inside the HELLO (RDMA: the
    # connection blob) overrides these two; TCP needs neither.
    def hello_blob(self) -> bytes:
        """Bytes the ranker's HELLO carries for the transport (b"": none)."""
        return b""

    def hello_done(self, blob: bytes) -> None:
        """The server's HELLO answer carried ``blob``; switch the data path if the transport wants to."""


class Listener(abc.ABC):
    """Where a server accepts connections; ``address`` is what peers connect to."""

    address: str

    @abc.abstractmethod
    def accept(self) -> Connection | None:
        """The next waiting connection, or None when nobody is waiting (never blocks).

        Raises OSError when the process cannot take a connection now (out of
        descriptors or memory); the caller should stop watching for a moment.
        """

    @abc.abstractmethod
    def fileno(self) -> int:
        """A pollable descriptor that is readable when a connection is waiting."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop accepting (idempotent)."""


class Transport(abc.ABC):
    """A way to reach embedding servers (ranker side) and to be reached (server side)."""

    name: str
    # Whether ``detach``/``adopt`` can move a live connection to another engine process.
    # False (RDMA: a queue pair cannot change process): engines migrate it by reopening
    # (the new engine opens its own connection, the old one drains and closes).
    MIGRATES: bool = True

    @abc.abstractmethod
    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        """Open a connection; ``priority`` marks the credit channel."""

    @abc.abstractmethod
    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        """Take over a connection detached by another engine."""

    @abc.abstractmethod
    def listen(self, address: str) -> Listener:
        """Accept connections on ``address`` ("host:port"; port 0 lets the system choose)."""
