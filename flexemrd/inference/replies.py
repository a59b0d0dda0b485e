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

    def error(self, request_id: int, code: int, message: str) -> None:
        if self._slots:
            self._slots.pop(request_id, None)
        self.send(codec.encode_error(request_id, code, message))
