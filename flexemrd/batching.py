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

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec
from flexemr.routing.split import combine_partials  # noqa: F401  (re-exported for tests)
from flexemr.types import Pooling
from flexemr.wire.codec import ClientRequest


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


def validate(spec: ModelSpec, req: ClientRequest, predict: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Check a decoded request against the model; returns ids by table index."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    index = {t.name: i for i, t in enumerate(spec.tables)}
    for k, name in enumerate(req.names):
        i = index.get(name)
        if i is None:
            raise RequestError(f"sparse: unknown table {name!r} (the model has {', '.join(spec.table_names)})")
        if i in out:
            raise RequestError(f"sparse: table {name!r} appears twice")
        values, lengths = req.kjt.table(k)
        if len(values):
            lo, hi = int(values.min()), int(values.max())
            rows = spec.tables[i].rows
            if lo < 0:
                raise RequestError(f"sparse[{name!r}] values: id {lo} is negative")
            if hi >= rows:
                raise RequestError(f"sparse[{name!r}] values: id {hi} is past the end of table {name!r} ({rows} rows)")
        out[i] = (values, lengths)
    if predict:
        missing = [t.name for i, t in enumerate(spec.tables) if i not in out]
        if missing:
            raise RequestError(f"sparse: predict needs every table; missing {', '.join(map(repr, missing))}")
        assert req.dense is not None
        if req.dense.shape[1] != spec.dense_features:
            raise RequestError(
                f"dense: has {req.dense.shape[1]} features per sample, the model expects {spec.dense_features}"
            )
    return out


class Accumulator:
    """Global pooling of one table, fed partial pools as they arrive (FlexEMR 3.1.2).

    The first partial is copied in (no zero fill first); later ones are added
    (sum, mean) or max-ed where that server pooled at least one id of the bag.
    """

    __slots__ = ("pooling", "out", "lengths", "empty")

    def __init__(self, pooling: Pooling, batch: int, dim: int, lengths: np.ndarray) -> None:
        self.pooling = pooling
        self.lengths = lengths
        self.out = np.empty((batch, dim), dtype=np.float32)
        self.empty = True

    def add(self, partial: np.ndarray, counts: np.ndarray) -> None:
        if self.pooling is Pooling.MAX:
            has = (counts > 0)[:, None]
            if self.empty:
                np.copyto(self.out, np.float32(-np.inf))
            np.maximum(self.out, partial, out=self.out, where=has)
        elif self.empty:
            np.copyto(self.out, partial)
        else:
            self.out += partial
        self.empty = False

    def set_pooled(self, pooled: np.ndarray) -> None:
        """The whole bag was pooled in one place (in-ranker tables): take it as final."""
        self.out = pooled
        self.empty = False
        self.pooling = Pooling.SUM  # nothing left to divide or clean up

    def result(self) -> np.ndarray:
        if self.empty:
            self.out.fill(0.0)
        elif self.pooling is Pooling.MAX:
            self.out[np.isneginf(self.out)] = 0.0
        elif self.pooling is Pooling.MEAN:
            self.out /= np.maximum(self.lengths, 1).astype(np.float32)[:, None]
        return self.out


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
