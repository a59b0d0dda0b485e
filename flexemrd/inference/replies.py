"""Where a request's answer goes: a small interface so fronts other than the socket can feed the batcher."""

from __future__ import annotations

import socket
import threading
from typing import Protocol, Sequence

import numpy as np

from flexemr.wire import codec
from flexemr.wire.stream import send_buffers


class ReplySink(Protocol):
    """Receives the answer to one or more requests of one client (thread-safe)."""

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None: ...

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray],
               version: int = 0) -> None: ...

    def error(self, request_id: int, code: int, message: str) -> None: ...


class SocketReplies:
    """Replies of one unix-socket client: frames sent under a lock (finisher and session both answer)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self.alive = True

    def send(self, frame: list) -> None:
        if not self.alive:
            return
        try:
            with self.lock:
                send_buffers(self.sock, frame)
        except OSError:
            self.alive = False

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None:
        self.send(codec.encode_scores(request_id, scores, version))

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray], version: int = 0) -> None:
        self.send(codec.encode_pooled(request_id, names, pooled, version))

    def error(self, request_id: int, code: int, message: str) -> None:
        self.send(codec.encode_error(request_id, code, message))
