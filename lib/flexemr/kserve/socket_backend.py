"""An InferenceBackend over the ranker's unix socket: a small pool of InferenceClient connections.

Lets the KServe front run as its own process next to any ``flexemrd`` (and
the tests drive a real ``flexemrd local``).  Requests go through the daemon's
own validation and batching, exactly as unix-socket clients' do.  One
InferenceClient serves one request at a time, so the pool holds up to
``pool_size`` of them, opened on demand and reused LIFO (the warm one first);
a connection that failed mid-request is closed, never reused.

``ready()`` answers whether the ranker's socket answers a PING right now.
(Shard liveness — every shard has a live server — arrives with the failover
work; until then a ranker that answers is taken as ready.)
"""

from __future__ import annotations

import logging
import queue
import socket
import threading

import numpy as np

from flexemr.client import InferenceClient
from flexemr.errors import ProtocolError, RequestError
from flexemr.kserve.types import BackendUnavailable, Sparse
from flexemr.model.spec import ModelSpec
from flexemr.wire.frame import FrameType, pack_header
from flexemr.wire.stream import FrameReader

logger = logging.getLogger(__name__)


class SocketBackend:
    """InferenceBackend over ``socket_path`` for a ranker serving ``spec``."""

    def __init__(self, socket_path: str, spec: ModelSpec, pool_size: int = 8, timeout_s: float = 60.0,
                 ping_timeout_s: float = 1.0) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.socket_path = socket_path
        self.spec = spec
        self.timeout_s = timeout_s
        self.ping_timeout_s = ping_timeout_s
        self._idle: queue.LifoQueue[InferenceClient] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False

    def _acquire(self) -> InferenceClient:
        self._slots.acquire()
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            pass
        try:
            return InferenceClient(self.socket_path, timeout=self.timeout_s)
        except (ConnectionError, OSError) as e:
            self._slots.release()
            raise BackendUnavailable(f"ranker socket {self.socket_path}: {e}") from None

    def _release(self, client: InferenceClient, healthy: bool) -> None:
        if healthy and not self._closed:
            self._idle.put(client)
        else:
            client.close()
        self._slots.release()

    def infer(self, predict: bool, dense: np.ndarray | None, sparse: Sparse,
              timeout_s: float | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """Scores or pooled vectors from the ranker.

        ``timeout_s`` is not forwarded: the unix protocol has no per-request
        deadline yet, so every call is bounded by the pool's ``timeout_s``.
        """
        client = self._acquire()
        healthy = False
        try:
            if predict:
                if dense is None:
                    raise RequestError("dense: required for predict")
                out = client.predict(dense, sparse)
            else:
                out = client.lookup(sparse)
            healthy = True
            return out
        except RequestError:
            healthy = True  # the ranker answered with an ERROR frame; the connection is in step
            raise
        except (socket.timeout, ConnectionError, OSError, ProtocolError) as e:
            raise BackendUnavailable(f"ranker socket {self.socket_path}: {type(e).__name__}: {e}") from None
        finally:
            self._release(client, healthy)

    def ready(self) -> bool:
        """The ranker answers a PING on a fresh connection within ``ping_timeout_s``."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.ping_timeout_s)
        try:
            s.connect(self.socket_path)
            s.sendall(pack_header(FrameType.PING, 1, 0))
            h = FrameReader(s, 1 << 16).read_header()
            return h.type == FrameType.PONG
        except (OSError, ProtocolError):
            return False
        finally:
            s.close()

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
