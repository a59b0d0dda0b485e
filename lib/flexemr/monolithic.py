"""The whole model in one process over local tables: the correctness oracle and the baseline.

``MonolithicModel(model_dir)`` maps every table read-only and loads ``dense.pt``;
``lookup`` pools bags with the same kernel the embedding servers use (flexemr.pooling) and
``predict`` runs the DLRM on top, under ``torch.inference_mode()``.  The
disaggregated cluster must answer exactly what this answers (up to float32
summation order), and benchmarks compare against it: nothing crosses a process
boundary here, so it is the upper bound a single host can reach without
disaggregation.  torch uses all cores for the MLPs by default.  With
``resident=True`` the tables are gathered from huge-page copies, as the
daemons' poolers do (flexemr.hugepages): the benchmarks' limit uses that, so
no ratio credits flexemr with a memory layout its baseline was denied.

Inputs follow the client contract (DESIGN.md): dense float32 [B, F], sparse
``{table: (values int64, lengths int32)}``; bad input raises RequestError
naming the field, as the daemon would.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from flexemr.errors import RequestError
from flexemr.hugepages import resident_copies
from flexemr.model.loader import open_model
from flexemr.pooling import TablePooler, check_bags

__all__ = ["MonolithicModel"]

Sparse = Mapping[str, tuple[np.ndarray, np.ndarray]]


class MonolithicModel:
    """Spec, table maps and the NN of one model directory, served in-process."""

    def __init__(self, model_dir: str | Path, resident: bool = False) -> None:
        loaded = open_model(model_dir)
        self.path = loaded.path
        self.spec = loaded.spec
        # name -> read-only np.memmap, or its huge-page copy where one fits
        self.tables = resident_copies(loaded.tables) if resident else loaded.tables
        self.dense = loaded.dense
        # One pooler per table: the map is wrapped for torch once (no copy), not per call.
        self._poolers = {t.name: TablePooler(self.tables[t.name], t.pooling) for t in self.spec.tables}

    def _check(self, sparse: Sparse, batch: int | None) -> int | None:
        for name, bag in sparse.items():
            if name not in self._poolers:
                raise RequestError(f"sparse[{name!r}]: unknown table (model has {', '.join(self.spec.table_names)})")
            if not (isinstance(bag, (tuple, list)) and len(bag) == 2):
                raise RequestError(f"sparse[{name!r}]: must be a (values, lengths) pair")
            values, lengths = np.asarray(bag[0]), np.asarray(bag[1])
            if values.dtype.kind not in "iu" or lengths.dtype.kind not in "iu":
                raise RequestError(f"sparse[{name!r}]: values and lengths must be integer arrays, "
                                   f"got {values.dtype} and {lengths.dtype}")
            if batch is None:
                batch = len(lengths)
            elif len(lengths) != batch:
                raise RequestError(f"sparse[{name!r}].lengths: {len(lengths)} bags, expected batch size {batch}")
            try:
                check_bags(self.spec.table(name).rows, values, lengths, f"sparse[{name!r}]")
            except ValueError as e:
                raise RequestError(str(e)) from None
        return batch

    def _pool(self, sparse: Sparse) -> dict[str, np.ndarray]:
        out = {}
        for t in self.spec.tables:  # model table order, whatever the dict order
            if t.name in sparse:
                values, lengths = sparse[t.name]
                out[t.name] = self._poolers[t.name].pool(values, lengths, check=False)
        return out

    def lookup(self, sparse: Sparse) -> dict[str, np.ndarray]:
        """Pooled vectors {table: float32 [B, dim]} for the tables given, in model table order."""
        if not sparse:
            raise RequestError("sparse: at least one table is required")
        self._check(sparse, None)
        with torch.inference_mode():
            return self._pool(sparse)

    def predict(self, dense: np.ndarray, sparse: Sparse) -> np.ndarray:
        """Scores float32 [B]; every table of the model must be present in ``sparse``."""
        dense = np.asarray(dense)
        if dense.ndim != 2 or dense.shape[1] != self.spec.dense_features:
            raise RequestError(f"dense: shape {dense.shape}, expected [B, {self.spec.dense_features}]")
        missing = [n for n in self.spec.table_names if n not in sparse]
        if missing:
            raise RequestError(f"sparse: missing tables {missing} (predict needs every table)")
        self._check(sparse, dense.shape[0])
        with torch.inference_mode():
            pooled = self._pool(sparse)
            x = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
            emb = [torch.from_numpy(pooled[t.name]) for t in self.spec.tables]
            return self.dense(x, emb).numpy()
