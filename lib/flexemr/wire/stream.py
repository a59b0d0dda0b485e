"""Frames over stream sockets: gathered sends and zero-copy receives.

``send_buffers`` hands a list of buffers (header + numpy sections) to
``sendmsg`` so the kernel gathers them; nothing is joined in Python.
``FrameReader`` receives a payload either into a caller-supplied view (a
shared-memory ring slot: the bytes land where they will be consumed) or into
one reusable buffer that grows to the largest frame seen, never past the
configured limit, which is checked on the header before any allocation.
"""

from __future__ import annotations

import socket

from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, HEADER_SIZE, Header, unpack_header

_IOV_MAX = 1024


def send_buffers(sock: socket.socket, buffers: list) -> int:
    """Send every buffer in order (blocking socket); returns bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers]
    views = [v for v in views if len(v)]
    total = sum(len(v) for v in views)
    sent_total = 0
    while views:
        sent = sock.sendmsg(views[:_IOV_MAX])
        sent_total += sent
        # Drop what went out; partial sends are normal for large payloads.
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if sent:
            views[0] = views[0][sent:]
    assert sent_total == total
    return total


def recv_exact_into(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` completely or raise ConnectionError on EOF."""
    got = 0
    n = len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise ConnectionError(f"peer closed the connection after {got} of {n} bytes")
        got += k


class FrameReader:
    """Reads frames from one blocking stream socket."""

    def __init__(self, sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._buf = bytearray(0)

    def read_header(self) -> Header:
        """Next header; raises ProtocolError (bad frame) or ConnectionError (EOF)."""
        recv_exact_into(self.sock, self._hdr_view)
        return unpack_header(self._hdr, self.max_payload)

    def read_payload(self, header: Header) -> memoryview:
        """The payload in the reader's own buffer (valid until the next read)."""
        n = header.payload_len
        if len(self._buf) < n:
            self._buf = bytearray(n)
        view = memoryview(self._buf)[:n]
        recv_exact_into(self.sock, view)
        return view

    def read_payload_owned(self, header: Header) -> memoryview:
        """The payload in a fresh buffer the caller keeps (no copy afterwards)."""
        view = memoryview(bytearray(header.payload_len))
        recv_exact_into(self.sock, view)
        return view

    def read_payload_into(self, header: Header, view: memoryview) -> None:
        recv_exact_into(self.sock, view[: header.payload_len])

    def skip(self, nbytes: int) -> None:
        """Discard a payload we refuse (in bounded chunks: no big allocation)."""
        chunk = memoryview(bytearray(min(nbytes, 1 << 16) or 1))
        while nbytes > 0:
            k = min(nbytes, len(chunk))
            recv_exact_into(self.sock, chunk[:k])
            nbytes -= k

    def raw_header_fields(self) -> tuple:
        """The last header's raw fields, also when it failed validation."""
        from flexemr.wire.frame import HEADER

        return HEADER.unpack_from(self._hdr, 0)

    def read_frame(self) -> tuple[Header, memoryview]:
        h = self.read_header()
        return h, self.read_payload(h)
