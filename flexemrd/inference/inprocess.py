"""An in-process front door to the batcher, for fronts that live in the inference process (KServe v2).

``InProcessBackend.infer`` builds the same decoded request the socket front
would, admits it through the same validation, and waits for the finisher's
answer: HTTP/gRPC requests are batched with unix-socket ones and get exactly
the same checks and errors.
"""

from __future__ import annotations

import threading
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

    __slots__ = ("done", "value", "failure")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: object = None
        self.failure: Exception | None = None

    def scores(self, request_id: int, scores: np.ndarray) -> None:
        self.value = np.array(scores)   # the finisher's array is a slice of the batch's
        self.done.set()

    def pooled(self, request_id: int, names: Sequence[str], pooled: Sequence[np.ndarray]) -> None:
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

    def __init__(self, service) -> None:
        self.service = service
        self.spec: ModelSpec = service.spec

    def infer(self, predict: bool, dense: np.ndarray | None, sparse, timeout_s: float | None = None):
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
        health = self.service.health
        return health is None or health.all_shards_live()
