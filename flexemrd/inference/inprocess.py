"""An in-process front door to the batcher, for fronts that live in the inference process (KServe v2).

``InProcessBackend.infer`` builds the same decoded request the socket front
would, admits it through the same validation, and waits for the finisher's
answer: HTTP/gRPC requests are batched with unix-socket ones and get exactly
the same checks and errors.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from flexemr.errors import DeadlineExceeded, RemoteError, RequestError
from flexemr.model.spec import ModelSpec
from flexemr.validation import request_from_arrays
from flexemr.wire.frame import ErrorCode

_CLIENT_ERRORS = (ErrorCode.BAD_REQUEST, ErrorCode.UNKNOWN_TABLE, ErrorCode.ID_OUT_OF_RANGE,
                  ErrorCode.SIZE_MISMATCH, ErrorCode.TOO_LARGE, ErrorCode.BAD_FRAME)


class _Answer:
    """A ReplySink for one request: the finisher fills it, the caller waits."""

    __slots__ = ("done", "value", "failure", "version")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.failure: Exception | None = None
        self.version = 0          # the model version that served it

    def scores(self, request_id: int, scores: np.ndarray, version: int = 0) -> None:
        self.version = version
        self.value = np.array(scores)   # the finisher's array is a slice of the batch's
        self.done.set()

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray], version: int = 0) -> None:
        self.version = version
        self.value = {n: np.array(p) for n, p in zip(names, pooled)}
        self.done.set()

    def error(self, request_id: int, code: int, message: str) -> None:
        if code in _CLIENT_ERRORS:
            self.failure = RequestError(message)
        elif code == ErrorCode.DEADLINE_EXCEEDED:
            self.failure = DeadlineExceeded(code, message)
        else:
            self.failure = RemoteError(code, message)
        self.done.set()


class InProcessBackend:
    """The KServe front's backend inside the inference process (see flexemr.kserve.types.InferenceBackend)."""

    READY_CACHE_S = 1.0
    PROBE_TIMEOUT_S = 2.0

    def __init__(self, service) -> None:
        self.service = service
        self.spec: ModelSpec = service.spec
        self._ready = False
        self._ready_at = -1e9
        self._ready_lock = threading.Lock()
        self._rng = np.random.default_rng()

    def infer(self, predict: bool, dense: np.ndarray | None, sparse, timeout_s: float | None = None):
        if timeout_s is not None and not 0 < timeout_s < 86400:
            timeout_s = None   # gRPC says "no deadline" with a huge time remaining: use the configured one
        req = request_from_arrays(dense if predict else None, sparse)
        answer = _Answer()
        work = self.service.admission.admit(answer, 0, predict, req, timeout_s)
        if work is not None:
            self.service.submit(work)
        limit = (timeout_s or self.service.options.request_timeout_s) + 1.0
        if not answer.done.wait(limit):
            raise DeadlineExceeded(ErrorCode.DEADLINE_EXCEEDED, f"no answer within {limit:g} s")
        if answer.failure is not None:
            raise answer.failure
        return answer.value

    def ready(self) -> bool:
        """Every shard group has a live server, and a lookup touching every shard comes back in time.

        The probe catches what connection state cannot (a frozen server keeps
        its connections); its answer is cached for READY_CACHE_S.
        """
        health = self.service.health
        if health is not None and not health.all_shards_live():
            return False
        with self._ready_lock:
            if time.monotonic() - self._ready_at >= self.READY_CACHE_S:
                self._ready = self._probe()
                self._ready_at = time.monotonic()
            return self._ready

    def _probe(self) -> bool:
        sparse = {}
        for t in self.spec.tables:
            n = min(t.rows, 128)
            ids = (np.arange(n, dtype=np.int64) * t.rows // n + int(self._rng.integers(t.rows))) % t.rows
            sparse[t.name] = (np.sort(ids), np.array([n], dtype=np.int32))
        try:
            self.infer(False, None, sparse, timeout_s=self.PROBE_TIMEOUT_S)
            return True
        except (RequestError, RemoteError):
            return False
