"""An InferenceBackend over the ranker's unix socket: a small pool of InferenceClient connections.

Lets the KServe front run as its own process next to any ``flexemrd`` (and
the tests drive a real ``flexemrd local``).  Requests go through the daemon's
own validation and batching, exactly as unix-socket clients' do.  One
InferenceClient serves one request at a time, so the pool holds up to
``pool_size`` of them, opened on demand and reused LIFO (the warm one first);
a connection that failed mid-request is closed, never reused.

``ready()`` is true when the ranker answers a PING *and* a probe lookup
completes within ``probe_timeout_s``: one bag per table whose ids are spread
evenly over the table's rows (128 points, shifted at random each time so the
ranker's cache does not answer them all), so under either routing every
embedding server holding part of a table is asked.  A shard whose server is
dead, frozen or unreachable makes the probe fail or time out: not ready.
Until the failover work publishes shard liveness, this end-to-end probe is
the truth the front can see; the answer is reused for ``cache_s``.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time

import numpy as np

from flexemr.client import InferenceClient
from flexemr.errors import ProtocolError, RemoteError, RequestError
from flexemr.kserve.types import BackendUnavailable, Sparse
from flexemr.model.spec import ModelSpec
from flexemr.wire.frame import FrameType, pack_header
from flexemr.wire.stream import FrameReader

logger = logging.getLogger(__name__)


class SocketBackend:
    """InferenceBackend over ``socket_path`` for a ranker serving ``spec``."""

    def __init__(self, socket_path: str, spec: ModelSpec, pool_size: int = 8, timeout_s: float = 60.0,
                 ping_timeout_s: float = 1.0, probe_timeout_s: float = 2.0, cache_s: float = 0.5) -> None:
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        self.socket_path = socket_path
        self.spec = spec
        self.timeout_s = timeout_s
        self.ping_timeout_s = ping_timeout_s
        self.probe_timeout_s = probe_timeout_s
        self.cache_s = cache_s
        self._ready_lock = threading.Lock()
        self._ready_at = -1e9
        self._ready = False
        self._rng = np.random.default_rng()
        self._idle: queue.LifoQueue[InferenceClient] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(pool_size)
        self._closed = False

    def _acquire(self, fresh: bool = False) -> tuple[InferenceClient, bool]:
        """A client and whether it was reused from the pool (``fresh``: never reuse)."""
        self._slots.acquire()
        if not fresh:
            try:
                return self._idle.get_nowait(), True
            except queue.Empty:
                pass
        try:
            return InferenceClient(self.socket_path, timeout=self.timeout_s), False
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
        fresh = False
        while True:
            client, reused = self._acquire(fresh)
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
            except (RequestError, RemoteError):
                healthy = True  # the ranker answered with an ERROR frame; the connection is in step
                raise
            except (ConnectionError, OSError, ProtocolError) as e:
                if reused and not isinstance(e, TimeoutError):
                    # an idle connection the ranker dropped (it restarted): once more on a new one
                    fresh = True
                    continue
                raise BackendUnavailable(f"ranker socket {self.socket_path}: {type(e).__name__}: {e}") from None
            finally:
                self._release(client, healthy)

    def ready(self) -> bool:
        """The ranker answers a PING and a lookup touching every shard (see the module docstring)."""
        with self._ready_lock:  # one probe at a time; concurrent callers share its answer
            now = time.monotonic()
            if now - self._ready_at >= self.cache_s:
                ready = self._ping() and self._probe()
                if ready != self._ready:
                    logger.info("ranker %s: %s", self.socket_path, "ready" if ready else "not ready")
                self._ready, self._ready_at = ready, time.monotonic()
            return self._ready

    def _ping(self) -> bool:
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

    def probe_batch(self) -> Sparse:
        """One bag per table, ids spread evenly over its rows with a random shift."""
        sparse = {}
        for t in self.spec.tables:
            n = min(t.rows, 128)
            ids = (np.arange(n, dtype=np.int64) * t.rows // n + int(self._rng.integers(t.rows))) % t.rows
            sparse[t.name] = (np.sort(ids), np.array([n], dtype=np.int32))
        return sparse

    def _probe(self) -> bool:
        try:
            with InferenceClient(self.socket_path, timeout=self.probe_timeout_s) as c:
                c.lookup(self.probe_batch())
            return True
        except (RequestError, RemoteError, ConnectionError, OSError, ProtocolError) as e:
            logger.debug("readiness probe failed: %s: %s", type(e).__name__, e)
            return False

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                self._idle.get_nowait().close()
            except queue.Empty:
                return
