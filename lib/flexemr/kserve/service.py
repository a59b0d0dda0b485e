"""The protocol-neutral half of the front: health, metadata and one inference call.

HTTP (:mod:`flexemr.kserve.http`) and gRPC (:mod:`flexemr.kserve.grpc`) only
decode their wire format into named numpy tensors and encode the answer; the
checks and the backend call live here once, so both fronts answer alike.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexemr import __version__ as _flexemr_version
from flexemr.errors import RemoteError, RequestError
from flexemr.kserve import convert
from flexemr.kserve.types import EXTENSIONS, PREDICT_MODEL, SERVER_NAME, BackendUnavailable, InferenceBackend, Tensor

logger = logging.getLogger(__name__)

#: Triton's request parameter for a deadline, in microseconds.
TIMEOUT_PARAMETER = "timeout"


class KServeService:
    """Health, metadata and inference over one backend (thread-safe if the backend is)."""

    def __init__(self, backend: InferenceBackend) -> None:
        self.backend = backend
        self._metadata = {m: convert.model_metadata(backend.spec, m) for m in convert.MODELS}

    def live(self) -> bool:
        # Live = this process answers; readiness is what the ranker behind it can do.
        return True

    def ready(self) -> bool:
        try:
            return bool(self.backend.ready())
        except Exception:  # a probe never raises: a backend that cannot tell is not ready
            logger.exception("readiness check failed")
            return False

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": _flexemr_version, "extensions": list(EXTENSIONS)}

    def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return self._metadata[convert.check_model(model, version)]

    def model_ready(self, model: str, version: str | None = None) -> bool:
        # an unknown model is simply not ready (as HTTP's 4xx reads to tritonclient), not an error
        try:
            convert.check_model(model, version)
        except convert.UnknownModel:
            return False
        return self.ready()

    def infer(self, model: str, version: str | None, inputs: Sequence[tuple[str, np.ndarray]],
              requested: Sequence[str] | None, parameters: Mapping[str, Any] | None = None,
              deadline_s: float | None = None) -> list[Tensor]:
        """Run one request: named input tensors in, response tensors out (RequestError on bad input).

        The backend gets the tighter of ``parameters.timeout`` (Triton's, in
        microseconds) and ``deadline_s`` (what is left of a gRPC deadline).
        """
        convert.check_model(model, version)
        named: dict[str, np.ndarray] = {}
        for name, arr in inputs:
            if name in named:
                raise RequestError(f"input {name!r}: given twice")
            named[name] = arr
        if requested is not None and len(set(requested)) != len(requested):
            raise RequestError("outputs: an output is requested twice")
        predict = model == PREDICT_MODEL
        dense, sparse = convert.to_request(self.backend.spec, named, predict)
        timeout_s = None
        raw_timeout = (parameters or {}).get(TIMEOUT_PARAMETER)
        if raw_timeout is not None:
            if not isinstance(raw_timeout, int) or isinstance(raw_timeout, bool) or raw_timeout <= 0:
                raise RequestError(f"parameters.{TIMEOUT_PARAMETER}: must be a positive integer of "
                                   f"microseconds, got {raw_timeout!r}")
            timeout_s = raw_timeout / 1e6
        if deadline_s is not None:
            timeout_s = deadline_s if timeout_s is None else min(timeout_s, deadline_s)
        try:
            result = self.backend.infer(predict, dense, sparse, timeout_s)
        except RemoteError as e:  # the ranker could not complete it (a shard unreachable, ...)
            raise BackendUnavailable(f"the ranker could not serve the request: {e}") from None
        hps = convert.CATCOLUMN in named
        return convert.outputs_of(self.backend.spec, model, result, requested, hps=hps)
