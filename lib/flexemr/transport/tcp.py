"""TCP transport: one stream socket per connection, and a listening socket for servers.

The credit channel of a (ranker, server) pair is a second socket marked high
priority: SO_PRIORITY 6 (the Linux queueing discipline serves it first) and
DSCP EF through IP_TOS (switches that honour DSCP do too), so bulk responses
cannot delay credits in the host's queues.  Every socket has TCP_NODELAY: a
frame is written in one gathered ``sendmsg`` and must leave at once.

Sockets stay in blocking mode; the non-blocking calls use MSG_DONTWAIT per
call, so one connection serves both styles (an engine blocks, the embedding
server's event loop does not) without mode switches.
"""

from __future__ import annotations

import itertools
import socket
from typing import Sequence

from flexemr.transport.base import Connection, Listener, Transport, accept_nowait, close_socket
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, Header
from flexemr.wire.stream import FrameReader, recv_exact_into, send_buffers

__all__ = ["TcpConnection", "TcpListener", "TcpTransport", "format_address", "parse_address"]

PRIORITY_SO = 6
DSCP_EF_TOS = 0xB8
_BUF_BYTES = 4 << 20
_IOV_MAX = 1024


def parse_address(address: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); ValueError naming the address if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} must be \"host:port\"")
    return host.strip("[]"), int(port)


def format_address(sockname: tuple) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# A peer that vanishes without a reset (a cut link, a powered-off host) must become a
# lost connection in seconds, not at TCP's ~15 minute retransmission limit: data left
# unacknowledged for USER_TIMEOUT_MS fails the socket, and idle connections are probed.
USER_TIMEOUT_MS = 3000
KEEPALIVE = ((getattr(socket, "TCP_KEEPIDLE", None), 2), (getattr(socket, "TCP_KEEPINTVL", None), 1),
             (getattr(socket, "TCP_KEEPCNT", None), 3))


def _tune(sock: socket.socket, priority: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in KEEPALIVE:
        if opt is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, value)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    if priority:
        # IP_TOS first: Linux derives the socket priority from the TOS when it is
        # set (EF would give priority 4), so SO_PRIORITY must come after it.
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_EF_TOS)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, PRIORITY_SO)
    else:
        # Large buffers let a whole partial-pool response sit in the kernel
        # while the engine is busy elsewhere.
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _BUF_BYTES)
            except OSError:
                pass


class TcpConnection(Connection):
    """A connected stream socket carrying frames (either end)."""

    def __init__(self, sock: socket.socket, conn_id: int, server: int, address: str,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, peer: str = "") -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.server = server
        self.address = address
        self.peer = peer or address
        self._reader = FrameReader(sock, max_payload)

    def send_frame(self, buffers: Sequence) -> int:
        return send_buffers(self.sock, list(buffers))

    def recv_header(self) -> Header:
        return self._reader.read_header()

    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        recv_exact_into(self.sock, view[: header.payload_len])

    def recv_payload(self, header: Header) -> memoryview:
        return self._reader.read_payload(header)

    def recv_nowait(self, view: memoryview) -> int:
        try:
            n = self.sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0
        if n == 0 and len(view):
            raise ConnectionError(f"{self.peer} closed the connection")
        return n

    def send_nowait(self, views: Sequence[memoryview]) -> int:
        try:
            return self.sock.sendmsg(list(itertools.islice(views, _IOV_MAX)), [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def detach(self) -> int:
        return self.sock.detach()

    def interrupt(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        close_socket(self.sock)


class TcpListener(Listener):
    """A listening TCP socket; ``accept`` hands out tuned, blocking-mode connections."""

    def __init__(self, sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        sock.setblocking(False)  # accept() must never wait: an event loop owns this socket
        self.sock = sock
        self.max_payload = max_payload
        self.address = format_address(sock.getsockname())
        self._accepted = 0

    def accept(self) -> Connection | None:
        accepted = accept_nowait(self.sock)
        if accepted is None:
            return None
        conn, peer = accepted
        conn.settimeout(None)
        _tune(conn, priority=False)
        self._accepted += 1
        return TcpConnection(conn, self._accepted, -1, self.address, self.max_payload, format_address(peer))

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        close_socket(self.sock)


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, connect_timeout: float = 10.0) -> None:
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        host, port = parse_address(address)
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        sock.settimeout(None)
        _tune(sock, priority)
        return TcpConnection(sock, conn_id, server, address, self.max_payload)

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        sock = socket.socket(fileno=handle)
        sock.settimeout(None)
        return TcpConnection(sock, conn_id, server, address, self.max_payload)

    def listen(self, address: str) -> Listener:
        host, port = parse_address(address)
        return TcpListener(socket.create_server((host, port), backlog=128), self.max_payload)

    def listener_from_socket(self, sock: socket.socket) -> Listener:
        """Wrap a socket that is already listening (one the supervisor opened and the child inherited)."""
        return TcpListener(sock, self.max_payload)
