"""Frames over stream sockets: gathered sends and zero-copy receives.

``send_buffers`` hands a list of buffers (header + numpy sections) to
``sendmsg`` so the kernel gathers them; nothing is joined in Python.
``FrameReader`` receives a payload either into a caller-supplied view (a
shared-memory ring slot: the bytes land where they will be consumed) or into
one reusable buffer that grows to the largest frame seen, never past the
configured limit, which is checked on the header before any allocation.

``FrameAssembler`` is the non-blocking counterpart for event loops: it is
fed whatever bytes have arrived and hands out whole frames.  A payload buffer
starts small and doubles as bytes arrive (so it stays within about twice
the bytes received), so a header that announces 1 GiB and then stalls costs
64 KiB, not 1 GiB;
an oversized payload is reported and then discarded in bounded chunks.
"""

from __future__ import annotations

import collections
import socket
from typing import Callable

from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD, HEADER, HEADER_SIZE, MAGIC, VERSION, Header, unpack_header

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


class Oversized:
    """A frame refused for its size alone: its bytes are being discarded, the stream stays in sync."""

    __slots__ = ("request_id", "payload_len", "message")

    def __init__(self, request_id: int, payload_len: int, message: str) -> None:
        self.request_id = request_id
        self.payload_len = payload_len
        self.message = message


class FrameAssembler:
    """Whole frames out of a non-blocking byte stream, allocating only for bytes that arrived.

    ``next(recv)`` calls ``recv(view) -> int`` (bytes read into ``view``, 0 when
    nothing is there; ConnectionError on EOF) as often as it needs and returns:

    - ``(header, payload)`` for a complete frame; ``payload`` is a memoryview
      of a buffer the caller keeps (give it back with ``recycle`` once nothing
      refers to it);
    - an ``Oversized`` for a valid header over ``max_payload`` (its payload is
      then skipped, chunk by chunk, by later calls);
    - ``None`` when the frame is not complete yet (call again when readable).

    A header that fails validation for any other reason raises ProtocolError
    (the stream cannot be resynchronised).
    """

    START_BYTES = 64 << 10       # first allocation for a payload: a stalled 1 GiB header costs this
    SPARE_BUFFERS = 8            # recycled payload buffers (a fresh one page-faults on every 4 KiB)
    SPARE_MAX_BYTES = 64 << 20   # a rare huge request does not pin its buffer

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_got = 0
        self._header: Header | None = None
        self._buf = bytearray(0)
        self._got = 0
        self._skip = 0
        self._scratch: memoryview | None = None
        self._spare: collections.deque[bytearray] = collections.deque()

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived (EOF now would cut a frame short)."""
        return self._hdr_got > 0 or self._header is not None or self._skip > 0

    def next(self, recv: Callable[[memoryview], int]) -> tuple[Header, memoryview] | Oversized | None:
        if self._skip and not self._discard(recv):
            return None
        if self._header is None:
            while self._hdr_got < HEADER_SIZE:
                k = recv(memoryview(self._hdr)[self._hdr_got:])
                if k == 0:
                    return None
                self._hdr_got += k
            self._hdr_got = 0
            refused = self._oversized()
            if refused is not None:
                self._skip = refused.payload_len
                return refused
            self._header = unpack_header(self._hdr, self.max_payload)  # ProtocolError: the caller closes
            self._start_payload(self._header.payload_len)
        h = self._header
        n = h.payload_len
        while self._got < n:
            if self._got == len(self._buf):
                self._grow(n)
            k = recv(memoryview(self._buf)[self._got : min(n, len(self._buf))])
            if k == 0:
                return None
            self._got += k
        self._header = None
        payload = memoryview(self._buf)[:n]
        self._buf = bytearray(0)
        return h, payload

    def recycle(self, payload: memoryview) -> None:
        """Give back a payload returned by ``next`` once nothing refers to its bytes."""
        buf = payload.obj
        if isinstance(buf, bytearray) and 0 < len(buf) <= self.SPARE_MAX_BYTES and len(self._spare) < self.SPARE_BUFFERS:
            self._spare.append(buf)

    def _oversized(self) -> Oversized | None:
        magic, version, _t, _f, _a, rid, plen = HEADER.unpack_from(self._hdr, 0)
        if magic == MAGIC and version == VERSION and plen > self.max_payload:
            return Oversized(rid, plen, f"payload of {plen} bytes exceeds the limit of {self.max_payload} bytes")
        return None

    def _start_payload(self, n: int) -> None:
        self._got = 0
        # A recycled buffer costs nothing new (its pages are already faulted in):
        # take the smallest that holds the payload, else the largest to grow from.
        # Without one, start small and let the bytes that actually arrive pay.
        if self._spare:
            fits = [b for b in self._spare if len(b) >= n]
            buf = min(fits, key=len) if fits else max(self._spare, key=len)
            self._spare.remove(buf)
            self._buf = buf
            return
        self._buf = bytearray(min(n, self.START_BYTES))

    def _grow(self, n: int) -> None:
        # Doubling keeps the allocation within twice the bytes received; the last
        # step leaves 1/8 headroom so the next, slightly larger request of the
        # same workload fits the recycled buffer.
        cap = max(2 * len(self._buf), self.START_BYTES)
        if cap >= n:
            cap = n + (n >> 3)
        bigger = bytearray(cap)
        bigger[: self._got] = memoryview(self._buf)[: self._got]
        self._buf = bigger

    def _discard(self, recv: Callable[[memoryview], int]) -> bool:
        """Skip an oversized payload; True once all of it is gone."""
        if self._scratch is None:
            self._scratch = memoryview(bytearray(1 << 16))
        while self._skip:
            k = recv(self._scratch[: min(self._skip, len(self._scratch))])
            if k == 0:
                return False
            self._skip -= k
        return True
