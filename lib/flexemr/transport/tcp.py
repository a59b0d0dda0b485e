"""TCP transport: one blocking stream socket per connection.

The credit channel of a (ranker, server) pair is a second socket marked high
priority: SO_PRIORITY 6 (the Linux queueing discipline serves it first) and
DSCP EF through IP_TOS (switches that honour DSCP do too), so bulk responses
cannot delay credits in the host's queues.
"""

from __future__ import annotations

import socket

from flexemr.transport.base import Connection, Transport
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, Header
from flexemr.wire.stream import FrameReader, recv_exact_into, send_buffers

PRIORITY_SO = 6
DSCP_EF_TOS = 0xB8
_BUF_BYTES = 4 << 20


def _tune(sock: socket.socket, priority: bool) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if priority:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, PRIORITY_SO)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, DSCP_EF_TOS)
    else:
        # Large buffers let a whole partial-pool response sit in the kernel
        # while the engine is busy elsewhere.
        for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _BUF_BYTES)
            except OSError:
                pass


class TcpConnection(Connection):
    def __init__(self, sock: socket.socket, conn_id: int, server: int, address: str, max_payload: int) -> None:
        self.sock = sock
        self.conn_id = conn_id
        self.server = server
        self.address = address
        self._reader = FrameReader(sock, max_payload)

    def send_frame(self, buffers: list) -> int:
        return send_buffers(self.sock, buffers)

    def recv_header(self) -> Header:
        return self._reader.read_header()

    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        recv_exact_into(self.sock, view[: header.payload_len])

    def recv_payload(self, header: Header) -> memoryview:
        return self._reader.read_payload(header)

    def fileno(self) -> int:
        return self.sock.fileno()

    def detach(self) -> int:
        return self.sock.detach()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class TcpTransport(Transport):
    name = "tcp"

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD, connect_timeout: float = 10.0) -> None:
        self.max_payload = max_payload
        self.connect_timeout = connect_timeout

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        host, _, port = address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=self.connect_timeout)
        sock.settimeout(None)
        _tune(sock, priority)
        return TcpConnection(sock, conn_id, server, address, self.max_payload)

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        sock = socket.socket(fileno=handle)
        sock.settimeout(None)
        return TcpConnection(sock, conn_id, server, address, self.max_payload)
