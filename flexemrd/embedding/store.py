"""The shards an embedding server holds, and pooling over them (no sockets, no threads).

Tables are mapped read-only from the model directory's ``.npy`` files (whole
files: ids stay global, only the pages of this server's shards are touched)
and pooled through THE kernel, ``flexemr.pooling.TablePooler`` (torch, or
numpy with ``[embedding].kernel = "numpy"``: same answers): each server
sends a partial per bag (sums for mean tables; docs/PROTOCOL.md,
*Hierarchical pooling*).

With ``resident=True`` (the serving processes' default) a table held whole
is pooled from a private copy in transparent huge pages
(:func:`flexemr.hugepages.resident_copy`: ~20% less CPU per gather than over
the 4 KiB pages of the map) as long as the copies fit in a quarter of the
memory available when the store opened, shared by the ``resident_share``
servers starting on the host; the others stay maps.

Model versions (docs/MODEL-UPDATES.md): the store holds one or more versions
side by side, each a dict of read-only pooled tables.  A full version maps
another model directory; a delta version shares its base's unchanged tables
and holds a copy-on-write map of each changed one
(:func:`flexemr.model.versions.apply_delta`), so every version pools
exactly.  Versions are added and retired by replacing the ``versions`` dict
(one reference assignment): pooling workers read it without a lock, and a
retired version's maps live on until the last request that holds them ends.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Sequence

import numpy as np

from flexemr.hugepages import available_memory, resident_copy
from flexemr.model.spec import ModelSpec, load_spec
from flexemr.model.tables import open_tables, table_path
from flexemr.model.versions import BOOT_VERSION, apply_delta, read_delta, same_architecture
from flexemr.pooling import TablePooler, bag_offsets
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
    resident_bytes: int = 0  # bytes of its huge-page copy (0: pooled from the map)


@dataclasses.dataclass(slots=True)
class HeldVersion:
    """One model version's tables on this server."""

    version: int
    base: int                       # 0 for a full version
    root_dir: str                   # the full model directory its table files come from
    deltas: tuple[str, ...]         # delta directories applied on top, oldest first
    tables: dict[int, _HeldTable]
    load_s: float = 0.0


class EmbeddingStore:
    """The shards this server holds, per model version: range checks, partial pooling and raw rows."""

    def __init__(self, model_dir: str, spec: ModelSpec, shards: Sequence[Shard], version: int = BOOT_VERSION,
                 kernel: str = "torch", resident: bool = False, resident_share: int = 1) -> None:
        self.spec = spec
        self.kernel = kernel            # flexemr.pooling.KERNELS
        # Bytes of huge-page table copies still allowed (0: pool from the maps only).
        self.resident_budget = (available_memory() or 0) // (4 * max(1, resident_share)) if resident else 0
        self.resident_tables = 0
        self.shards = list(shards)
        self.boot_version = version
        self._names = sorted({s.table for s in shards}, key=spec.table_index)
        self._ranges = {name: sorted(((s.start, s.end) for s in shards if s.table == name)) for name in self._names}
        self._lock = threading.Lock()   # serialises add/retire (writers); readers need none
        first = HeldVersion(version, 0, str(model_dir), (), self._open_full(model_dir))
        self.versions: dict[int, HeldVersion] = {version: first}
        self.tables = first.tables      # the boot version's tables (older callers)

    # ------------------------------------------------------------------ versions

    def _held(self, name: str, arr: np.ndarray) -> _HeldTable:
        t = self.spec.table(name)
        mine = self._ranges[name]
        whole = len(mine) == 1 and mine[0] == (0, t.rows)
        # Only a table held whole is copied: a shard's server touches only its rows' pages of the map.
        copy = resident_copy(arr, self.resident_budget) if whole and self.resident_budget else None
        if copy is not None:
            self.resident_budget -= copy.nbytes
            self.resident_tables += 1
        return _HeldTable(
            name=name,
            pooler=TablePooler(arr if copy is None else copy, t.pooling, self.kernel),
            starts=np.array([a for a, _ in mine], dtype=np.int64),
            ends=np.array([b for _, b in mine], dtype=np.int64),
            whole=whole,
            resident_bytes=0 if copy is None else int(copy.nbytes),
        )

    def _open_full(self, model_dir: str) -> dict[int, _HeldTable]:
        maps = open_tables(model_dir, self.spec, self._names)
        return {self.spec.table_index(n): self._held(n, maps[n]) for n in self._names}

    def load_full(self, version: int, model_dir: str) -> HeldVersion:
        """Map ``model_dir`` as ``version`` beside the others (ModelError if it cannot replace them)."""
        from flexemr.errors import ModelError

        t0 = time.perf_counter()
        problems = same_architecture(self.spec, load_spec(model_dir))
        if problems:
            raise ModelError([f"{model_dir}: {p}" for p in problems])
        held = HeldVersion(version, 0, str(model_dir), (), self._open_full(model_dir))
        held.load_s = time.perf_counter() - t0
        self._add(held)
        return held

    def load_delta(self, version: int, base: int, delta_dir: str) -> HeldVersion:
        """``version`` = ``base`` with the delta's changed rows (copy-on-write maps of the changed tables only)."""
        t0 = time.perf_counter()
        b = self.hold(base)
        chain = (*b.deltas, str(delta_dir))
        deltas = [read_delta(d, self.spec) for d in chain]
        changed = deltas[-1]
        tables = dict(b.tables)
        for name in self._names:
            if name not in changed:
                continue   # unchanged here: share the base's map and pooler
            steps = [d[name] for d in deltas if name in d]
            arr = apply_delta(table_path(b.root_dir, name), steps, self._ranges[name])
            tables[self.spec.table_index(name)] = self._held(name, arr)
        held = HeldVersion(version, base, b.root_dir, chain, tables)
        held.load_s = time.perf_counter() - t0
        self._add(held)
        return held

    def _add(self, held: HeldVersion) -> None:
        with self._lock:
            self.versions = {**self.versions, held.version: held}

    def retire(self, version: int) -> bool:
        """Stop serving ``version``; requests pooling it now finish on the maps they hold."""
        with self._lock:
            if version not in self.versions:
                return False
            gone = self.versions[version]
            self.versions = {v: h for v, h in self.versions.items() if v != version}
            # Its huge-page copies no longer count against the budget once no held version shares them
            # (a delta shares its base's unchanged tables), so a later full push may copy again.
            kept = {id(t) for h in self.versions.values() for t in h.tables.values()}
            for t in gone.tables.values():
                if t.resident_bytes and id(t) not in kept:
                    self.resident_budget += t.resident_bytes
                    self.resident_tables -= 1
            return True

    def hold(self, version: int) -> HeldVersion:
        """The version a request names (0: the boot version); UNKNOWN_VERSION if not held."""
        held = self.versions.get(version or self.boot_version)
        if held is None:
            raise RequestRejected(ErrorCode.UNKNOWN_VERSION,
                                  f"model version {version or self.boot_version} is not held by this server "
                                  f"(it holds {', '.join(map(str, sorted(self.versions))) or 'none'})")
        return held

    def hello_shards(self) -> list[tuple[int, int, int, int]]:
        """(table_id, dim, start, end) of every shard, as HELLO announces them."""
        return [(self.spec.table_index(s.table), self.spec.table(s.table).dim, s.start, s.end) for s in self.shards]

    def pool(self, req: codec.LookupRequest) -> list[np.ndarray]:
        """Partial pools float32 [B, dim] per requested table of the version the request names."""
        kjt = req.kjt
        version = self.hold(req.version)
        held = [self._table(t, version) for t in req.table_ids]
        for i, st in enumerate(held):
            # ids of other servers' shards are valid rows to the kernel: check here; numpy's
            # gather would also wrap a negative id around, so it checks every table.
            if not st.whole or self.kernel == "numpy":
                self._check_ids(st, kjt.table(i)[0])
        # Every table carries all B bags (the plain [T, B] layout): one cumsum gives all their offsets.
        offsets = bag_offsets(kjt.lengths, kjt.values.dtype) if kjt.bag_starts is None and held else None
        out = []
        for i, st in enumerate(held):
            values, lengths = kjt.table(i)
            try:
                if offsets is None:
                    out.append(st.pooler.partial(values, lengths, check=False))
                else:
                    out.append(st.pooler.partial_at(values, offsets[i], lengths))
            except RuntimeError:
                # A whole table's ids are checked by the kernel as it gathers (a
                # separate min/max pass costs ~5% of a lookup); name the bad id.
                self._check_ids(st, values)
                raise
        return out

    def fetch(self, table_id: int, ids: np.ndarray, version: int = 0) -> np.ndarray:
        """Raw rows [n, dim] of ``version`` (0: the boot version) for cache fills."""
        st = self._table(table_id, self.hold(version))
        self._check_ids(st, ids)
        return st.pooler.rows_of(ids)

    def _table(self, tid: int, version: HeldVersion) -> _HeldTable:
        st = version.tables.get(int(tid))
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
