"""Types every module of the KServe front imports: the backend interface, tensors, model names.

The front (HTTP and gRPC) speaks to the ranker through :class:`InferenceBackend`
only, so the same front runs over the unix socket today
(:mod:`flexemr.kserve.socket_backend`) and inside the inference process later
(a backend that feeds the batcher directly).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from flexemr.model.spec import ModelSpec

#: The scoring model: DLRM scores, output ``OUTPUT0`` FP32 [B] (HPS's name).
PREDICT_MODEL = "flexemr"
#: The lookup-only model: pooled embeddings, ``{NAME}__pooled`` FP32 [B, dim] per table.
LOOKUP_MODEL = "flexemr_lookup"
MODEL_VERSION = "1"
SERVER_NAME = "flexemr"
#: What ServerMetadata lists: the protocol extensions this front implements.
EXTENSIONS = ("binary_tensor_data",)

Sparse = dict[str, tuple[np.ndarray, np.ndarray]]


class InferenceBackend(Protocol):
    """What the front needs from a ranker."""

    spec: ModelSpec

    def infer(self, predict: bool, dense: np.ndarray | None, sparse: Sparse,
              timeout_s: float | None = None) -> np.ndarray | dict[str, np.ndarray]:
        """Scores [B] float32 (``predict``) or pooled {table: [B, dim]}; RequestError on bad input."""
        ...

    def ready(self) -> bool:
        """True when every shard has a live server."""
        ...


class BackendUnavailable(Exception):
    """The backend cannot serve right now (socket gone, ranker restarting): HTTP 503 / UNAVAILABLE."""


@dataclasses.dataclass(frozen=True, slots=True)
class Tensor:
    """One named tensor of a request or a response (``data`` already shaped)."""

    name: str
    datatype: str          # KServe datatype: "FP32", "INT64", ...
    data: np.ndarray

    @property
    def shape(self) -> list[int]:
        return [int(d) for d in self.data.shape]
