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
    """Global pooling of one table, fed partial pools as they arrive (FlexEMR 3.1.2)."""

    __slots__ = ("pooling", "out", "lengths")

    def __init__(self, pooling: Pooling, batch: int, dim: int, lengths: np.ndarray) -> None:
        self.pooling = pooling
        self.lengths = lengths
        fill = -np.inf if pooling is Pooling.MAX else 0.0
        self.out = np.full((batch, dim), fill, dtype=np.float32)

    def add(self, partial: np.ndarray, counts: np.ndarray) -> None:
        if self.pooling is Pooling.MAX:
            np.maximum(self.out, partial, out=self.out, where=(counts > 0)[:, None])
        else:
            self.out += partial

    def result(self) -> np.ndarray:
        if self.pooling is Pooling.MAX:
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
