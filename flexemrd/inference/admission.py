"""Admission: one decoded, validated client request becomes ``Work`` for the batcher.

Every request is checked on its own before it may join a batch, so a bad
request is answered with a RequestError naming the field and never affects the
requests it would have been batched with.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec
from flexemr.validation import validate_request
from flexemr.wire import codec
from flexemr.wire.frame import FrameType

from flexemrd.inference.replies import ReplySink


@dataclasses.dataclass(slots=True)
class Work:
    """One validated client request waiting for its batch."""

    reply: ReplySink
    request_id: int
    predict: bool
    batch: int
    tables: dict[int, tuple[np.ndarray, np.ndarray]]  # table index -> (values, lengths)
    dense: np.ndarray | None
    names: list[str]
    arrived: float = dataclasses.field(default_factory=time.perf_counter)
    deadline: float = float("inf")      # perf_counter time by which the answer is due
    timeout_s: float = 0.0              # what the client (or the default) allowed


class Admission:
    """Turns request frames into Work (session threads; stateless apart from the model)."""

    def __init__(self, spec: ModelSpec, default_timeout_s: float = 30.0, max_batch: int | None = None,
                 max_ids: int | None = None, allow_nonfinite: bool = False) -> None:
        self.spec = spec
        self.default_timeout_s = default_timeout_s
        self.max_batch = max_batch
        self.max_ids = max_ids
        self.allow_nonfinite = allow_nonfinite

    def admit_frame(self, reply: ReplySink, ftype: int, request_id: int, payload: memoryview,
                    timeout_ms: int = 0) -> Work | None:
        """Decode and validate; None when the request was answered already (an empty batch)."""
        if ftype not in (FrameType.PREDICT, FrameType.CLIENT_LOOKUP):
            raise RequestError(f"the inference socket serves PREDICT and LOOKUP frames, not type {ftype}")
        predict = ftype == FrameType.PREDICT
        req = codec.decode_client_request(payload, ftype)
        return self.admit(reply, request_id, predict, req, timeout_ms / 1e3 if timeout_ms else None)

    def admit(self, reply: ReplySink, request_id: int, predict: bool, req: codec.ClientRequest,
              timeout_s: float | None = None) -> Work | None:
        """A Work for the batcher; ``timeout_s`` None means the configured default deadline."""
        arrived = time.perf_counter()
        tables = validate_request(self.spec, req, predict, allow_nonfinite=self.allow_nonfinite,
                                  max_batch=self.max_batch, max_ids=self.max_ids)
        if req.batch == 0:
            if predict:
                reply.scores(request_id, np.zeros(0, np.float32))
            else:
                reply.pooled(request_id, req.names,
                             [np.zeros((0, self.spec.tables[i].dim), np.float32) for i in tables])
            return None
        timeout = self.default_timeout_s if timeout_s is None else timeout_s
        return Work(reply, request_id, predict, req.batch, tables, req.dense, req.names, arrived,
                    arrived + timeout, timeout)
