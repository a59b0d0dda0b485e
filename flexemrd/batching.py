"""Request validation and batch assembly for the inference process.

Every client request is validated on its own before it may join a batch, so
a bad request is answered with a RequestError naming the field and never
affects the requests it would have been batched with.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.routing.combine import Accumulator, combine_partials  # noqa: F401  (moved to lib; re-exported)
from flexemr.validation import validate_request as validate  # noqa: F401  (moved to lib; re-exported)


@dataclasses.dataclass(slots=True)
class Work:
    """One validated client request waiting for its batch."""

    session: Any
    request_id: int
    predict: bool
    batch: int
    tables: dict[int, tuple[np.ndarray, np.ndarray]]  # table index -> (values, lengths)
    dense: np.ndarray | None
    names: list[str]
    arrived: float = dataclasses.field(default_factory=time.perf_counter)


def merge(works: list[Work], tables: list[int]) -> tuple[int, list[np.ndarray], list[np.ndarray]]:
    """Concatenate the requests' ids per table; a request without a table gets empty bags."""
    batch = sum(w.batch for w in works)
    values, lengths = [], []
    for t in tables:
        if len(works) == 1:
            v, ln = works[0].tables[t]
            values.append(v)
            lengths.append(ln)
            continue
        vs, ls = [], []
        for w in works:
            pair = w.tables.get(t)
            if pair is None:
                ls.append(np.zeros(w.batch, dtype=np.int32))
            else:
                vs.append(pair[0])
                ls.append(pair[1])
        values.append(np.concatenate(vs) if vs else np.zeros(0, dtype=np.int64))
        lengths.append(np.concatenate(ls))
    return batch, values, lengths


class LocalPooler:
    """Tables held by the ranker itself (``--embedding-servers 0``): the monolithic layout.

    Same batching, validation and NN as the disaggregated path; only the
    pooling happens here, with torch's embedding_bag over read-only maps.
    """

    def __init__(self, spec: ModelSpec, tables: dict[str, np.ndarray]) -> None:
        import warnings

        import torch

        self.spec = spec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only maps; torch only reads
            self.weights = [torch.from_numpy(tables[t.name]) for t in spec.tables]
        self.modes = [t.pooling.label for t in spec.tables]

    def pool(self, table: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = F.embedding_bag(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), self.weights[table],
                              torch.from_numpy(offsets), mode=self.modes[table], include_last_offset=True)
        return out.numpy()
