"""The shards an embedding server holds, and pooling over them (no sockets, no threads).

Tables are mapped read-only from the model directory's ``.npy`` files (whole
files: ids stay global, only the pages of this server's shards are touched)
and pooled through THE kernel, ``flexemr.pooling.TablePooler``: each server
sends a partial per bag (sums for mean tables; docs/PROTOCOL.md,
*Hierarchical pooling*).  Safe to call from several threads at once: nothing
here is written after construction.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.model.tables import open_tables
from flexemr.pooling import TablePooler
from flexemr.routing.table import Shard
from flexemr.wire import codec
from flexemr.wire.frame import ErrorCode

__all__ = ["EmbeddingStore", "RequestRejected"]


class RequestRejected(Exception):
    """A request this server will not serve; ``code`` is the wire ErrorCode to answer with."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclasses.dataclass(slots=True)
class _HeldTable:
    name: str
    pooler: TablePooler
    starts: np.ndarray     # shard range starts held here (sorted)
    ends: np.ndarray
    whole: bool            # every row is held here: the kernel's own bounds check suffices


class EmbeddingStore:
    """The shards this server holds: range checks, partial pooling and raw rows."""

    def __init__(self, model_dir: str, spec: ModelSpec, shards: Sequence[Shard]) -> None:
        self.spec = spec
        self.shards = list(shards)
        names = sorted({s.table for s in shards}, key=spec.table_index)
        maps = open_tables(model_dir, spec, names)
        self.tables: dict[int, _HeldTable] = {}
        for name in names:
            t = spec.table(name)
            mine = sorted((s for s in shards if s.table == name), key=lambda s: s.start)
            self.tables[spec.table_index(name)] = _HeldTable(
                name=name,
                pooler=TablePooler(maps[name], t.pooling),
                starts=np.array([s.start for s in mine], dtype=np.int64),
                ends=np.array([s.end for s in mine], dtype=np.int64),
                whole=len(mine) == 1 and mine[0].start == 0 and mine[0].end == t.rows,
            )

    def hello_shards(self) -> list[tuple[int, int, int, int]]:
        """(table_id, dim, start, end) of every shard, as HELLO announces them."""
        return [(self.spec.table_index(s.table), self.spec.table(s.table).dim, s.start, s.end) for s in self.shards]

    def pool(self, req: codec.LookupRequest) -> list[np.ndarray]:
        """Partial pools float32 [B, dim] per requested table, after checking every id of every table."""
        kjt = req.kjt
        held = [self._table(t) for t in req.table_ids]
        for i, st in enumerate(held):
            if not st.whole:  # ids of other servers' shards are valid rows to torch: check here
                self._check_ids(st, kjt.table(i)[0])
        out = []
        for i, st in enumerate(held):
            values, lengths = kjt.table(i)
            try:
                out.append(st.pooler.partial(values, lengths, check=False))
            except RuntimeError:
                # A whole table's ids are checked by the kernel as it gathers (a
                # separate min/max pass costs ~5% of a lookup); name the bad id.
                self._check_ids(st, values)
                raise
        return out

    def fetch(self, table_id: int, ids: np.ndarray) -> np.ndarray:
        """Raw rows [n, dim] for cache fills."""
        st = self._table(table_id)
        self._check_ids(st, ids)
        return st.pooler.rows_of(ids)

    def _table(self, tid: int) -> _HeldTable:
        st = self.tables.get(int(tid))
        if st is None:
            what = self.spec.tables[tid].name if tid < len(self.spec.tables) else f"#{tid}"
            raise RequestRejected(ErrorCode.UNKNOWN_TABLE, f"table {what} is not held by this server")
        return st

    def _check_ids(self, st: _HeldTable, ids: np.ndarray) -> None:
        if not len(ids):
            return
        lo, hi = int(ids.min()), int(ids.max())
        if len(st.starts) == 1 and lo >= st.starts[0] and hi < st.ends[0]:
            return
        k = np.searchsorted(st.starts, ids, side="right") - 1
        bad = (k < 0) | (ids >= st.ends[np.maximum(k, 0)])
        if bad.any():
            first = int(ids[np.argmax(bad)])
            ranges = ", ".join(f"[{a}, {b})" for a, b in zip(st.starts, st.ends))
            raise RequestRejected(
                ErrorCode.ID_OUT_OF_RANGE,
                f"table {st.name}: id {first} is outside the rows this server holds ({ranges}); "
                f"{int(bad.sum())} ids out of range",
            )
