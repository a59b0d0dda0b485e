"""Where a request's answer goes: a small interface so fronts other than the socket can feed the batcher."""

from __future__ import annotations

import socket
import threading
from typing import Protocol, Sequence

import numpy as np

from flexemr.wire import codec, replyslot
from flexemr.wire.stream import send_buffers

from flexemrd.inference.reply_region import MappedRegion


class ReplySink(Protocol):
    """Receives the answer to one or more requests of one client (thread-safe)."""

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None: ...

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray],
               version: int = 0) -> None: ...

    def error(self, request_id: int, code: int, message: str) -> None: ...


class PlacedAnswer:
    """A lookup answer being pooled straight into a client's reply slot (``SocketReplies.place_pooled``)."""

    __slots__ = ("offset", "nbytes", "version", "arrays")

    def __init__(self, offset: int, nbytes: int, version: int, arrays: list[np.ndarray]) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.version = version
        self.arrays = arrays      # per requested table, [batch, dim] float32 views into the slot


class SocketReplies:
    """Replies of one unix-socket client: frames sent under a lock (finisher and session both answer).

    With a reply region (``region``, mapped by the session) an answer whose request named a slot
    (``name_slot``) is written once into that slot and only its 16-byte descriptor is sent
    (flexemr.wire.replyslot); an answer that does not fit goes by frame.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True
        self.region: MappedRegion | None = None
        self._slots: dict[int, tuple[int, int]] = {}   # request id -> (offset, capacity) it named

    def send(self, frame: list) -> None:
        if not self.alive:
            return
        try:
            with self.lock:
                send_buffers(self.sock, frame)
        except OSError:
            self.alive = False

    def name_slot(self, request_id: int, offset: int, capacity: int) -> None:
        """The request's answer may go into ``[offset, offset + capacity)`` of the region (checked by the caller)."""
        self._slots[request_id] = (offset, capacity)

    def _answer(self, request_id: int, frame: list) -> None:
        slot = self._slots.pop(request_id, None) if self._slots else None
        region = self.region
        if slot is not None and region is not None and region.write(slot[0], slot[1], frame):
            frame = replyslot.encode_descriptor(frame, slot[0])
        self.send(frame)

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None:
        self._answer(request_id, codec.encode_scores(request_id, scores, version))

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray], version: int = 0) -> None:
        self._answer(request_id, codec.encode_pooled(request_id, names, pooled, version))

    def place_pooled(self, request_id: int, names: Sequence[str], dims: Sequence[int], batch: int,
                     version: int = 0) -> "PlacedAnswer | None":
        """Lay out the lookup answer of ``request_id`` in the slot its request named and return the arrays to
        pool into (one [batch, dim] float32 view per name, in the slot); None when the request named no slot,
        the answer would not fit or the region is gone (answer with ``pooled`` then).  ``send_placed`` sends
        it once the arrays hold the answer; ``error`` still answers it by frame."""
        slot = self._slots.pop(request_id, None) if self._slots else None
        if slot is None:
            return None
        head, offsets, size = codec.pooled_layout(names, dims, batch, version)
        region = self.region
        dest = region.place(slot[0], size) if region is not None and size <= slot[1] else None
        if dest is None:
            self._slots[request_id] = slot   # ``pooled`` sends it by frame
            return None
        dest[: len(head)] = np.frombuffer(head, np.uint8)
        arrays = [dest[o : o + 4 * batch * d].view("<f4").reshape(batch, d) for o, d in zip(offsets, dims)]
        return PlacedAnswer(slot[0], size, version, arrays)

    def send_placed(self, request_id: int, placed: "PlacedAnswer") -> None:
        """The answer ``place_pooled`` laid out is in its slot: send its descriptor."""
        head = codec.pooled_header(request_id, placed.nbytes, placed.version)
        self.send(replyslot.encode_descriptor([head], placed.offset))

    def error(self, request_id: int, code: int, message: str) -> None:
        if self._slots:
            self._slots.pop(request_id, None)
        self.send(codec.encode_error(request_id, code, message))
