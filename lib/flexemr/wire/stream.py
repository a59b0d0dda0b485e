"""Frames over stream sockets: gathered sends and zero-copy receives.

``send_buffers`` hands a list of buffers (header + numpy sections) to
``sendmsg`` so the kernel gathers them; nothing is joined in Python.
``FrameReader`` receives a payload either into a caller-supplied view (a
shared-memory ring slot: the bytes land where they will be consumed) or into
one reusable buffer that grows to the largest frame seen, never past the
configured limit, which is checked on the header before any allocation.

With ``frame_timeout_s`` a ``FrameReader`` gives a peer that long to finish a
frame once its first byte arrived (a slow sender gets TimeoutError, waiting
for the next frame is free), and ``read_payload_growing`` allocates as the
payload's bytes arrive, asking a ``reserve`` callback before each growth so a
process can bound the bytes all its connections hold.

``FrameAssembler`` is the non-blocking counterpart for event loops: it is
fed whatever bytes have arrived and hands out whole frames.  A payload buffer
starts small and doubles as bytes arrive (so it stays within about twice
the bytes received), so a header that announces 1 GiB and then stalls costs
64 KiB, not 1 GiB;
an oversized payload is reported and then discarded in bounded chunks.
"""

from __future__ import annotations

import collections
import select
import socket
import time
from typing import Callable

import numpy as np

from flexemr.wire.frame import CLIENT_VERSION, DEFAULT_MAX_PAYLOAD, HEADER, HEADER_SIZE, MAGIC, VERSION, Header, unpack_header

_IOV_MAX = 1024


def _uninitialized(n: int) -> memoryview:
    """A writable byte buffer of ``n`` bytes that is not zero-filled first (bytearray(n) memsets it:
    for a 4 MiB answer that is a pass over 4 MiB the socket read is about to overwrite anyway)."""
    return memoryview(np.empty(n, dtype=np.uint8)).cast("B")


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


class BudgetExceeded(Exception):
    """``read_payload_growing``'s ``reserve`` refused more bytes; the payload's rest is still unread."""

    def __init__(self, header: Header, got: int, reserved: int) -> None:
        super().__init__(f"{header.payload_len}-byte payload refused after {got} bytes")
        self.header = header
        self.got = got              # payload bytes already read (the rest is still in the socket)
        self.reserved = reserved    # bytes ``reserve`` granted for it: the caller gives them back


class FrameReader:
    """Reads frames from one blocking stream socket.

    ``frame_timeout_s``: once the first byte of a frame has arrived, the whole
    frame must arrive within this time, else TimeoutError (the socket stays
    blocking: waits go through poll, so a sender thread on the same socket is
    unaffected).  None: no limit.
    """

    GROW_START = 64 << 10   # first allocation of a growing payload: a stalled 1 GiB header costs this

    def __init__(self, sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 frame_timeout_s: float | None = None) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self.frame_timeout_s = frame_timeout_s
        self._deadline = 0.0
        self._hdr = bytearray(HEADER_SIZE)
        self._hdr_view = memoryview(self._hdr)
        self._buf = bytearray(0)
        self._poll: select.poll | None = None

    def read_header(self) -> Header:
        """Next header; raises ProtocolError (bad frame), ConnectionError (EOF) or TimeoutError (slow sender)."""
        if self.frame_timeout_s is None:
            recv_exact_into(self.sock, self._hdr_view)
        else:
            first = self.sock.recv_into(self._hdr_view, HEADER_SIZE)   # waiting for a frame costs nothing
            if first == 0:
                raise ConnectionError("peer closed the connection")
            self._deadline = time.monotonic() + self.frame_timeout_s
            self._recv_timed(self._hdr_view[first:])
        return unpack_header(self._hdr, self.max_payload)

    def read_payload_growing(self, header: Header, reserve: Callable[[int], bool] | None = None) -> memoryview:
        """The payload in a fresh buffer the caller keeps, allocated as its bytes arrive.

        The buffer starts at ``GROW_START`` and doubles (the last step to the
        exact size), so a sender that announces much and sends little costs
        little.  ``reserve(n)`` is asked before each allocation of ``n`` more
        bytes; False raises BudgetExceeded, which says how much was reserved.
        """
        n = header.payload_len
        buf = _uninitialized(0)
        got = 0
        while got < n:
            if got == len(buf):
                # Grow only once more bytes are there: a sender that stalls after filling
                # the buffer does not get a bigger one.
                self._wait_readable()
                cap = min(n, max(self.GROW_START, 2 * len(buf)))
                if reserve is not None and not reserve(cap - len(buf)):
                    raise BudgetExceeded(header, got, len(buf))
                bigger = _uninitialized(cap)
                bigger[:got] = buf[:got]
                buf = bigger
            got += self._recv_some(buf[got:])
        return buf[:n]

    def _recv_some(self, view: memoryview) -> int:
        if self.frame_timeout_s is not None:
            self._wait_readable()
        k = self.sock.recv_into(view, len(view))
        if k == 0:
            raise ConnectionError("peer closed the connection in the middle of a frame")
        return k

    def _recv_timed(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            got += self._recv_some(view[got:])

    def _wait_readable(self) -> None:
        if self._poll is None:
            self._poll = select.poll()
            self._poll.register(self.sock.fileno(), select.POLLIN)
        if self.frame_timeout_s is None:
            self._poll.poll()
            return
        left = self._deadline - time.monotonic()
        if left <= 0 or not self._poll.poll(left * 1e3):
            raise TimeoutError(f"the peer left a frame unfinished for {self.frame_timeout_s:g} s")

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
        view = _uninitialized(header.payload_len)
        recv_exact_into(self.sock, view)
        return view

    def read_payload_into(self, header: Header, view: memoryview) -> None:
        recv_exact_into(self.sock, view[: header.payload_len])

    def skip(self, nbytes: int) -> None:
        """Discard a payload we refuse (in bounded chunks: no big allocation; within the frame's deadline)."""
        chunk = memoryview(bytearray(min(nbytes, 1 << 16) or 1))
        while nbytes > 0:
            k = min(nbytes, len(chunk))
            if self.frame_timeout_s is None:
                recv_exact_into(self.sock, chunk[:k])
            else:
                k = self._recv_some(chunk[:k])
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
        if magic == MAGIC and version in (VERSION, CLIENT_VERSION) and plen > self.max_payload:
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
