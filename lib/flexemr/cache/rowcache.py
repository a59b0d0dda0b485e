"""DATA PATH: the ranker's cache of raw embedding rows (FlexEMR 3.1.1), vectorised over whole id arrays.

The cache holds rows, not pooled results: pooling results are keyed by a whole
bag and almost never repeat, while hot rows recur across bags and requests.  A
bag's hit rows are pooled here (``hit_pooled``) and its missed ids go to the
embedding servers as usual; the ranker combines the two partial pools exactly
like the servers' partials (hierarchical pooling, 3.1.2):

    sum   hit_sum + miss_sum
    mean  (hit_sum + miss_sum) / (hit_count + miss_count)   <- hit_pooled gives the *sum*
    max   elementwise max over the sides whose count > 0; zeros if both are empty

Layout (one pool per distinct embedding dim; tables of the same dim share it)::

    per table t     slot_of_row[t]  int32 [rows_t]    slot in the pool of dim d_t, -1 = absent
    per pool d      data            float32 [alloc, d] on ``device`` (CPU, or CUDA when present)
                    tab_of_slot     int32 [alloc]     owning table, -1 = free slot
                    row_of_slot     int64 [alloc]
                    last_used       int64 [alloc]     logical clock of the last access (LRU)
    per table t     freq[t]         uint32 [rows_t]   accesses in the current window ("tinylfu" only)
    per table t     miss_clock[t]   int64 [rows_t]    clock of the row's last miss while it is a fill
                                                      candidate, 0 = not pending (no sort to dedupe misses)
    per pool d      free, cold      the free slots, and the eviction order many fills share (see _Pool)

``slot_of_row`` costs 4 bytes per table row on the ranker's host and buys an
O(1) vectorised membership test (one gather) for every id of a batch.  The
logical clock advances once per ``split`` (or ``split_many``: a whole batch) call, so recency has per-batch
granularity: every row a batch touches counts as used "now".  All bookkeeping
arrays are host numpy arrays (ids arrive on the host); only ``data`` lives on
the device, and only slot indices and pooled results cross to and from it.

Filling is asynchronous in the serving process: ``split`` records the missed
rows, ``candidates_for_fill`` picks the ones worth admitting, the engines fetch
their raw rows, and ``fill`` inserts them, evicting the coldest rows first.  A
filled row gets the clock of its last miss, so it ages as if it had been
inserted when it was missed.  Admission:

    lru       every missed row (textbook LRU, but filled after the batch)
    tinylfu   (default) every missed row while there is free room; past that, a
              row must have been seen ``admit_min_count`` times in the decaying
              frequency window (counts halve every ``window_factor`` x capacity
              accesses) and more often than the LRU victim it would displace

On a Zipf(1.05) trace tinylfu's hit rate is never below LRU's and far above it
when the cache is small next to a batch's working set, and it fetches 3-15x
fewer rows (tests/lib/test_cache.py measures both against an offline LRU).

Memory: ``capacity_bytes`` bounds the rows held (``used_bytes``) and also the
pools' allocation (``allocated_bytes``): pools grow geometrically as rows
arrive, never past the capacity, and ``resize`` to a smaller capacity evicts the
coldest rows and then compacts the pools, so the memory really goes back to the
NN (on CUDA to torch's caching allocator, where the NN's activations reuse it).

Methods take an internal lock, so ``split`` on the batcher thread and ``fill``
on the completion thread may interleave; each call is short and vectorised.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence

import numpy as np
import torch

from flexemr.model.spec import TableSpec
from flexemr.pooling import pool_tensor
from flexemr.types import Pooling

__all__ = ["RowCache", "CacheSplit", "ADMISSIONS"]

ADMISSIONS = ("lru", "tinylfu")
_ROW_BYTES = 4  # float32 rows


@dataclasses.dataclass(slots=True)
class CacheSplit:
    """The outcome of looking one table's bags up in the cache.

    ``hit_mask`` bool [N] (per value), ``miss_values`` int64 [M] (the missed ids
    in their original order, so bags stay contiguous), ``miss_lengths`` int32 [B]
    and ``hit_counts`` int32 [B] (``miss_lengths + hit_counts == lengths``).
    """

    table: int
    hit_mask: np.ndarray
    miss_values: np.ndarray
    miss_lengths: np.ndarray
    hit_counts: np.ndarray
    _pooled: torch.Tensor
    _kind: Pooling                 # SUM (serves sum and mean) or MAX
    _cache: RowCache | None
    _version: int
    _slots: torch.Tensor | None
    _offsets: torch.Tensor | None

    _n_hits: int = -1

    @property
    def n_hits(self) -> int:
        if self._n_hits < 0:
            self._n_hits = int(self.hit_counts.sum())
        return self._n_hits

    def hit_pooled(self, pooling: Pooling | None = None) -> torch.Tensor:
        """The local pool of each bag's hit rows, [B, dim] on the cache's device.

        sum and mean give the *sum* of the hit rows (the mean needs the total
        count, so the combiner divides); max gives the elementwise max.  A bag
        without hits gives zeros; combine by ``hit_counts``, not by value.  The
        table's own pooling is computed during ``split``; another mode is only
        available while the cache has not changed since.
        """
        kind = _kind(pooling) if pooling is not None else self._kind
        if kind is self._kind:
            return self._pooled
        if self._cache is None:  # nothing was hit: zeros in every mode
            return self._pooled
        return self._cache._repool(self, kind)


_NO_POOL = torch.empty(0)   # placeholder until split_many pools the group


def _kind(pooling: Pooling) -> Pooling:
    return Pooling.MAX if Pooling(pooling) is Pooling.MAX else Pooling.SUM


class _Pool:
    """Rows of one embedding dim: device storage plus host-side slot bookkeeping.

    ``free`` lists the free slots (so a fill takes them without scanning the
    pool).  ``cold`` is the eviction order computed once and used by many
    fills: the ``cold_n`` coldest live slots when it was made, coldest first,
    with the (table, row, clock) each held then; an entry whose slot has been
    touched, dropped or refilled since no longer matches and is skipped.  Every
    live row outside the list has a clock >= ``cold_cut`` (a fill of an older
    clock drops the list), so the list's first valid entries are exactly the
    coldest rows of the pool.
    """

    __slots__ = ("dim", "data", "tab", "row", "last", "live", "free", "cold", "cold_tab", "cold_row",
                 "cold_last", "cold_cut")

    def __init__(self, dim: int, device: torch.device) -> None:
        self.dim = dim
        self.data = torch.empty((0, dim), dtype=torch.float32, device=device)
        self.tab = np.empty(0, dtype=np.int32)
        self.row = np.empty(0, dtype=np.int64)
        self.last = np.empty(0, dtype=np.int64)
        self.live = 0
        self.free = np.empty(0, dtype=np.int64)
        self.forget_cold()

    def forget_cold(self) -> None:
        self.cold: np.ndarray | None = None
        self.cold_tab = self.cold_row = self.cold_last = np.empty(0, dtype=np.int64)
        self.cold_cut = 0

    @property
    def alloc(self) -> int:
        return len(self.tab)

    @property
    def row_bytes(self) -> int:
        return self.dim * _ROW_BYTES


class RowCache:
    """Raw embedding rows keyed by (table, row), on a torch device; see the module docstring."""

    def __init__(
        self,
        tables: Sequence[TableSpec],
        capacity_bytes: int,
        device: str | torch.device = "cpu",
        admission: str = "tinylfu",
        admit_min_count: int = 2,
        window_factor: int = 10,
    ) -> None:
        if admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {', '.join(ADMISSIONS)}, got {admission!r}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.tables = tuple(tables)
        self.device = torch.device(device)
        self.admission = admission
        self.admit_min_count = int(admit_min_count)
        self.window_factor = int(window_factor)
        self._lock = threading.RLock()
        self._capacity = int(capacity_bytes)
        self._pools: dict[int, _Pool] = {}
        for t in self.tables:
            if t.dim not in self._pools:
                self._pools[t.dim] = _Pool(t.dim, self.device)
        self._slot_of_row = [np.full(t.rows, -1, dtype=np.int32) for t in self.tables]
        self._freq = [np.zeros(t.rows, dtype=np.uint32) for t in self.tables] if admission == "tinylfu" else None
        self._window_seen = 0
        # Misses since the last candidates_for_fill: per table the clock of each row's
        # last miss (0 = not pending) and the pending rows, each listed once, in
        # chunks; plus rows handed out for fetching with the clock of their last miss.
        self._miss_clock = [np.zeros(t.rows, dtype=np.int64) for t in self.tables]
        self._pending: list[list[np.ndarray]] = [[] for _ in self.tables]
        self._pending_n = [0] * len(self.tables)
        self._inflight: list[tuple[np.ndarray, np.ndarray]] = [_empty_pair() for _ in self.tables]
        self._clock = 0
        self._version = 0  # bumped whenever a slot's contents may change
        self._hits = np.zeros(len(self.tables), dtype=np.int64)
        self._lookups = np.zeros(len(self.tables), dtype=np.int64)
        self._evictions = 0
        self._fills = 0

    # ------------------------------------------------------------------ lookups

    def split(self, table_idx: int, values: np.ndarray, lengths: np.ndarray, check: bool = True) -> CacheSplit:
        """Look up every id of one table's bags; pool the hits, return the misses (see :class:`CacheSplit`).

        Records every access: the LRU clock of the hit rows, the frequency of
        every id (``tinylfu``) and the missed rows as fill candidates.
        """
        return self.split_many([table_idx], [values], [lengths], check)[0]

    def split_many(self, tables: Sequence[int], values: Sequence[np.ndarray], lengths: Sequence[np.ndarray],
                   check: bool = True) -> list[CacheSplit]:
        """:meth:`split` of several tables at once (one batch): the same answers, one clock tick.

        Each table's ids are looked up on their own (one gather in its
        ``slot_of_row``), but the hits of all tables that share a pool and a
        pooling kind go to one ``embedding_bag`` call over the pool's storage
        (their bags back to back), not one call per table: each torch call
        on the CPU opens a parallel region, whose threads then spin for work
        and take CPU from the rest of the ranker on a busy host.
        """
        if not (len(tables) == len(values) == len(lengths)):
            raise ValueError(f"split_many: {len(tables)} tables, {len(values)} values and {len(lengths)} lengths")
        values = [np.ascontiguousarray(v, dtype=np.int64) for v in values]
        lengths = [np.ascontiguousarray(ln, dtype=np.int32) for ln in lengths]
        if check:
            for t, v, ln in zip(tables, values, lengths):
                _check_bags(self.tables[t], v, ln)
        with self._lock:
            self._clock += 1
            now = self._clock
            out: list[CacheSplit | None] = [None] * len(tables)
            groups: dict[tuple[int, Pooling], list[tuple[int, np.ndarray, np.ndarray]]] = {}
            for i, (t, v, ln) in enumerate(zip(tables, values, lengths)):
                looked = self._lookup(t, v, ln, now)
                if isinstance(looked, CacheSplit):
                    out[i] = looked
                    continue
                hit, hit_slots, hit_counts, miss_values = looked
                spec = self.tables[t]
                out[i] = CacheSplit(
                    table=t, hit_mask=hit, miss_values=miss_values,
                    miss_lengths=(ln - hit_counts).astype(np.int32), hit_counts=hit_counts,
                    _pooled=_NO_POOL, _kind=_kind(spec.pooling), _cache=self, _version=self._version,
                    _slots=None, _offsets=None, _n_hits=len(hit_slots))
                groups.setdefault((spec.dim, _kind(spec.pooling)), []).append((i, hit_slots, hit_counts))
            for (dim, kind), members in groups.items():
                self._pool_group(dim, kind, members, out)
            return out  # type: ignore[return-value]

    def _lookup(self, table_idx: int, values: np.ndarray, lengths: np.ndarray,
                now: int) -> CacheSplit | tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """One table's bookkeeping: (hit mask, hit slots, hits per bag, missed ids), or a finished all-miss split."""
        self._lookups[table_idx] += len(values)
        if self._freq is not None and len(values):
            self._count(table_idx, values)
        if self._capacity == 0 or len(values) == 0:
            return self._all_miss(table_idx, values, lengths)
        slots = self._slot_of_row[table_idx][values]
        hit = slots >= 0
        # Per-bag hit counts from one running count: no per-bag Python, no repeat().
        ends = np.cumsum(lengths, dtype=np.int64)
        csum = np.concatenate(([0], np.cumsum(hit, dtype=np.int64)))
        hit_counts = (csum[ends] - csum[ends - lengths]).astype(np.int32)
        hit_slots = slots[hit]
        self._pools[self.tables[table_idx].dim].last[hit_slots] = now  # duplicates all write the same value
        self._hits[table_idx] += int(csum[-1])
        miss_values = values[~hit]
        if len(miss_values):
            self._add_pending(table_idx, miss_values, now)
        return hit, hit_slots, hit_counts, miss_values

    def _pool_group(self, dim: int, kind: Pooling, members: list[tuple[int, np.ndarray, np.ndarray]],
                    out: list[CacheSplit | None]) -> None:
        """Pool the hits of ``members`` (tables sharing pool ``dim`` and ``kind``) in one kernel call."""
        counts = members[0][2] if len(members) == 1 else np.concatenate([c for _, _, c in members])
        slots = members[0][1] if len(members) == 1 else np.concatenate([s for _, s, _ in members])
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        slots_t = torch.from_numpy(slots.astype(np.int64, copy=False)).to(self.device)
        if len(slots_t):
            pooled = pool_tensor(slots_t, self._pools[dim].data, torch.from_numpy(offsets).to(self.device), kind,
                                 counts == 0)
        else:
            pooled = torch.zeros((len(counts), dim), dtype=torch.float32, device=self.device)
        bag0 = 0
        for i, _s, c in members:
            sp = out[i]
            assert sp is not None
            n = len(c)
            sp._pooled = pooled[bag0: bag0 + n]
            # What another pooling mode needs (_repool): this table's hit slots and offsets, views, no copies.
            lo, hi = int(offsets[bag0]), int(offsets[bag0 + n])
            sp._slots = slots_t[lo:hi]
            sp._offsets = torch.from_numpy(offsets[bag0: bag0 + n + 1] - lo).to(self.device)
            bag0 += n

    def _all_miss(self, table_idx: int, values: np.ndarray, lengths: np.ndarray) -> CacheSplit:
        spec = self.tables[table_idx]
        if self._capacity and len(values):
            self._add_pending(table_idx, values, self._clock)
        return CacheSplit(
            table=table_idx, hit_mask=np.zeros(len(values), dtype=bool), miss_values=values,
            miss_lengths=lengths.copy(), hit_counts=np.zeros(len(lengths), dtype=np.int32),
            _pooled=torch.zeros((len(lengths), spec.dim), dtype=torch.float32, device=self.device),
            _kind=_kind(spec.pooling), _cache=None, _version=self._version, _slots=None, _offsets=None,
        )

    def _repool(self, split: CacheSplit, kind: Pooling) -> torch.Tensor:
        with self._lock:
            if self._version != split._version:
                raise RuntimeError("hit_pooled: the cache changed since this split; "
                                   "only the table's own pooling is kept")
            return self._pool_slots(split.table, split._slots, split._offsets, split.hit_counts, kind)

    def _pool_slots(
        self,
        table_idx: int,
        slots: torch.Tensor | None,
        offsets: torch.Tensor | None,
        counts: np.ndarray,
        kind: Pooling,
    ) -> torch.Tensor:
        spec = self.tables[table_idx]
        if slots is None or offsets is None or len(slots) == 0:
            return torch.zeros((len(counts), spec.dim), dtype=torch.float32, device=self.device)
        # Zeros for bags without hits is the contract (pool_tensor does not rely on the kernel's choice).
        return pool_tensor(slots, self._pools[spec.dim].data, offsets, Pooling.MAX if kind is Pooling.MAX else Pooling.SUM,
                           counts == 0)

    def _count(self, table_idx: int, values: np.ndarray) -> None:
        """TinyLFU frequency: count every access; halve all counts once a window's worth was seen."""
        assert self._freq is not None
        np.add.at(self._freq[table_idx], values, np.uint32(1))  # a typed scalar keeps add.at on its fast path
        self._window_seen += len(values)
        if self._window_seen >= self._window_size():
            for f in self._freq:
                f >>= 1
            self._window_seen = 0

    def _window_size(self) -> int:
        return max(self.window_factor * self._capacity_rows_estimate(), 1 << 16)

    def _capacity_rows_estimate(self) -> int:
        dim = min(p.dim for p in self._pools.values())
        return self._capacity // (dim * _ROW_BYTES)

    def _add_pending(self, table_idx: int, rows: np.ndarray, clock: int | np.ndarray) -> None:
        """Record misses of ``rows`` at ``clock``: O(len(rows)) gathers and scatters, no sort.

        A row already pending only gets its clock moved; a row not pending is
        listed once, however often it repeats in ``rows`` (the stamp written
        just before tells its first-listed copy from the others).
        """
        mc = self._miss_clock[table_idx]
        fresh = rows[mc[rows] == 0]
        if len(fresh):
            stamp = -np.arange(1, len(fresh) + 1, dtype=np.int64)
            mc[fresh] = stamp
            fresh = fresh[mc[fresh] == stamp]   # one copy per row: the one whose stamp stayed
        mc[rows] = clock
        if not len(fresh):
            return
        self._pending[table_idx].append(fresh)
        self._pending_n[table_idx] += len(fresh)
        # Bound the buffer when nobody asks for candidates: keep the most recently missed.
        limit = max(4 * self._capacity_rows_estimate(), 1 << 16)
        if self._pending_n[table_idx] > 2 * limit:
            rows_u, clocks_u = self._take_pending(table_idx)
            keep = np.sort(np.argsort(clocks_u, kind="stable")[-limit:])
            mc[rows_u[keep]] = clocks_u[keep]
            self._pending[table_idx] = [rows_u[keep]]
            self._pending_n[table_idx] = len(keep)

    def _take_pending(self, table_idx: int) -> tuple[np.ndarray, np.ndarray]:
        """The pending misses of a table (each row once) with the clock of each row's last miss; empties them."""
        chunks = self._pending[table_idx]
        self._pending[table_idx] = []
        self._pending_n[table_idx] = 0
        if not chunks:
            return _empty_pair()
        rows = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        mc = self._miss_clock[table_idx]
        clocks = mc[rows]
        mc[rows] = 0
        return rows, clocks

    # ------------------------------------------------------------------ filling

    def candidates_for_fill(self, max_rows: int) -> dict[int, np.ndarray]:
        """Missed rows worth admitting, at most ``max_rows`` in all, hottest first (deduplicated, not cached).

        The rows stay "in flight" until :meth:`fill` inserts them; rows not
        chosen are dropped (they come back as candidates when missed again).
        """
        with self._lock:
            if self._capacity == 0 or max_rows <= 0:
                for t in range(len(self.tables)):
                    self._take_pending(t)
                return {}
            per_table: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
            for t in range(len(self.tables)):
                rows, clocks = self._take_pending(t)
                if not len(rows):
                    continue
                absent = self._slot_of_row[t][rows] < 0  # a fill may have landed since the miss
                rows, clocks = rows[absent], clocks[absent]
                freq = self._freq[t][rows] if self._freq is not None else np.zeros(len(rows), dtype=np.uint32)
                if len(rows):
                    per_table.append((t, rows, clocks, freq))
            if not per_table:
                return {}
            tabs = np.concatenate([np.full(len(r), t, dtype=np.int32) for t, r, _, _ in per_table])
            rows = np.concatenate([r for _, r, _, _ in per_table])
            clocks = np.concatenate([c for _, _, c, _ in per_table])
            freq = np.concatenate([f for _, _, _, f in per_table]).astype(np.int64)
            # Hottest first: by frequency (tinylfu) then recency.
            order = np.lexsort((-clocks, -freq))[:max_rows]
            tabs, rows, clocks, freq = tabs[order], rows[order], clocks[order], freq[order]
            if self._freq is not None:
                keep = self._beats_victims(tabs, rows, freq)
                tabs, rows, clocks = tabs[keep], rows[keep], clocks[keep]
            out: dict[int, np.ndarray] = {}
            for t in np.unique(tabs):
                sel = tabs == t
                out[int(t)] = rows[sel]
                self._remember_inflight(int(t), rows[sel], clocks[sel])
            return out

    def _beats_victims(self, tabs: np.ndarray, rows: np.ndarray, freq: np.ndarray) -> np.ndarray:
        """TinyLFU admission: a candidate that needs an eviction must be more frequent than its victim.

        Candidates are sorted hottest first; the i-th candidate beyond the free
        room would displace the i-th coldest resident row of its pool.
        """
        keep = np.ones(len(rows), dtype=bool)
        free_bytes = max(self._capacity - self.used_bytes, 0)
        for dim, pool in self._pools.items():
            in_pool = np.flatnonzero(np.isin(tabs, [i for i, t in enumerate(self.tables) if t.dim == dim]))
            # While there is free room, admit without conditions (nothing is displaced).
            contested = in_pool[free_bytes // pool.row_bytes:]
            if not len(contested):
                continue
            coldest = self._coldest(pool, len(contested))
            k = len(coldest)
            vfreq = np.empty(k, dtype=np.int64)
            for t in np.unique(pool.tab[coldest]):
                sel = pool.tab[coldest] == t
                vfreq[sel] = self._freq[t][pool.row[coldest[sel]]]  # type: ignore[index]
            # The doorkeeper (a row must recur before it displaces anything) and the frequency duel.
            keep[contested[:k]] = (freq[contested[:k]] >= self.admit_min_count) & (freq[contested[:k]] > vfreq)
            # Candidates beyond the residents would displace other candidates.
            keep[contested[k:]] = False
        return keep

    def _remember_inflight(self, table_idx: int, rows: np.ndarray, clocks: np.ndarray) -> None:
        old_rows, old_clocks = self._inflight[table_idx]
        rows = np.concatenate([old_rows, rows])
        clocks = np.concatenate([old_clocks, clocks])
        u, first_rev = np.unique(rows[::-1], return_index=True)
        c = clocks[::-1][first_rev]
        limit = max(4 * self._capacity_rows_estimate(), 1 << 16)
        if len(u) > limit:  # fills that never came: forget the oldest
            keep = np.sort(np.argsort(c, kind="stable")[-limit:])
            u, c = u[keep], c[keep]
        self._inflight[table_idx] = (u, c)

    def fill(self, table_idx: int, rows: np.ndarray, data: np.ndarray | torch.Tensor) -> int:
        """Insert rows [n] with their data [n, dim]; evict the coldest rows when full. Returns rows inserted."""
        spec = self.tables[table_idx]
        rows = np.ascontiguousarray(rows, dtype=np.int64)
        if rows.ndim != 1:
            raise ValueError(f"fill: rows must be 1-D, got shape {rows.shape}")
        shape = tuple(data.shape)
        if shape != (len(rows), spec.dim):
            raise ValueError(f"fill: data has shape {shape}, expected {(len(rows), spec.dim)} for table {spec.name}")
        if len(rows) and (int(rows.min()) < 0 or int(rows.max()) >= spec.rows):
            raise ValueError(f"fill: row ids must be in [0, {spec.rows}) for table {spec.name}")
        with self._lock:
            pool = self._pools[spec.dim]
            if self._capacity < pool.row_bytes or not len(rows):
                return 0
            rows_u, idx = np.unique(rows, return_index=True)
            absent = self._slot_of_row[table_idx][rows_u] < 0
            rows_u, idx = rows_u[absent], idx[absent]
            clocks = self._inflight_clocks(table_idx, rows_u)
            fit = self._capacity // pool.row_bytes
            if len(rows_u) > fit:  # more than the whole cache: keep the most recently missed
                keep = np.sort(np.argsort(clocks, kind="stable")[-fit:])
                rows_u, idx, clocks = rows_u[keep], idx[keep], clocks[keep]
            n = len(rows_u)
            if n == 0:
                return 0
            excess = self.used_bytes + n * pool.row_bytes - self._capacity
            if excess > 0:
                self._evict_bytes(excess)
            slots = self._free_slots(pool, n)
            if pool.cold is not None and int(clocks.min()) < pool.cold_cut:
                pool.forget_cold()    # a row colder than the list's cut: the list is no longer the coldest
            if self.device.type == "cpu" and not isinstance(data, torch.Tensor):
                # A numpy scatter straight into the storage: no torch call, so no parallel region (see split_many).
                pool.data.numpy()[slots] = np.asarray(data)[idx]
            else:
                if isinstance(data, torch.Tensor):
                    src = data.detach().to(device=self.device, dtype=torch.float32)
                    src = src[torch.from_numpy(idx).to(self.device)]
                else:  # select on the host, then move only what is inserted
                    src = torch.from_numpy(np.ascontiguousarray(np.asarray(data)[idx], dtype=np.float32)).to(self.device)
                pool.data.index_copy_(0, torch.from_numpy(slots.astype(np.int64)).to(self.device), src)
            pool.tab[slots] = table_idx
            pool.row[slots] = rows_u
            pool.last[slots] = clocks
            pool.live += n
            self._slot_of_row[table_idx][rows_u] = slots.astype(np.int32)
            self._fills += n
            self._version += 1
            self._forget_inflight(table_idx, rows_u)
            return n

    def _inflight_clocks(self, table_idx: int, rows: np.ndarray) -> np.ndarray:
        """The clock of each row's last miss if it was handed out as a candidate, else now."""
        u, c = self._inflight[table_idx]
        out = np.full(len(rows), self._clock, dtype=np.int64)
        if len(u) and len(rows):
            pos = np.minimum(np.searchsorted(u, rows), len(u) - 1)
            found = u[pos] == rows
            out[found] = c[pos[found]]
        return out

    def _forget_inflight(self, table_idx: int, rows: np.ndarray) -> None:
        u, c = self._inflight[table_idx]
        if len(u):
            keep = ~np.isin(u, rows, assume_unique=True)
            self._inflight[table_idx] = (u[keep], c[keep])

    def _free_slots(self, pool: _Pool, n: int) -> np.ndarray:
        """``n`` free slot indices of ``pool``, growing its storage (and compacting others) as needed.

        The caller has already evicted enough rows that the live rows plus
        ``n`` fit the capacity; here the allocation follows, staying within the
        capacity as well.
        """
        if len(pool.free) < n:
            rb = pool.row_bytes
            others = self.allocated_bytes - pool.alloc * rb
            if others + (pool.live + n) * rb > self._capacity:  # give back other pools' slack first
                for other in self._pools.values():
                    if other is not pool:
                        self._compact(other, other.live)
                others = self.allocated_bytes - pool.alloc * rb
            room = (self._capacity - others) // rb
            # Geometric growth: few reallocations while the cache warms up.
            self._compact(pool, max(min(max(2 * pool.alloc, 256), room), pool.live + n))
        slots, pool.free = pool.free[:n], pool.free[n:]
        return slots

    def _compact(self, pool: _Pool, alloc: int) -> None:
        """Reallocate ``pool`` with ``alloc`` slots, live rows moved to the front (order kept)."""
        if alloc == pool.alloc and pool.live == pool.alloc:
            return
        live = np.flatnonzero(pool.tab >= 0)
        data = torch.empty((alloc, pool.dim), dtype=torch.float32, device=self.device)
        if len(live):
            data[: len(live)] = pool.data[torch.from_numpy(live).to(self.device)]
        tab = np.full(alloc, -1, dtype=np.int32)
        row = np.zeros(alloc, dtype=np.int64)
        last = np.zeros(alloc, dtype=np.int64)
        tab[: len(live)] = pool.tab[live]
        row[: len(live)] = pool.row[live]
        last[: len(live)] = pool.last[live]
        pool.data, pool.tab, pool.row, pool.last = data, tab, row, last
        pool.free = np.arange(len(live), alloc, dtype=np.int64)
        pool.forget_cold()   # slots moved
        new_slots = np.arange(len(live), dtype=np.int32)
        for t in np.unique(tab[: len(live)]):
            sel = tab[: len(live)] == t
            self._slot_of_row[t][row[: len(live)][sel]] = new_slots[sel]
        self._version += 1

    def _coldest(self, pool: _Pool, k: int) -> np.ndarray:
        """The ``k`` least recently used live slots of ``pool`` (fewer if it holds fewer), coldest first.

        One argpartition over the live slots serves many calls: it keeps the
        coldest 1/16 of the pool (at least ``k``, at least 4096) as
        :class:`_Pool` describes, and is redone only once too few of them are
        still valid.  Without it every fill of a full cache scanned and
        partitioned the whole pool.
        """
        k = min(int(k), pool.live)
        if k <= 0:
            return np.empty(0, dtype=np.int64)
        if pool.cold is not None:
            # Check a prefix first (the victims are near the front), the whole list only if it falls short.
            for m in (min(len(pool.cold), 2 * k + 1024), len(pool.cold)):
                c = pool.cold[:m]
                ok = ((pool.tab[c] == pool.cold_tab[:m]) & (pool.row[c] == pool.cold_row[:m])
                      & (pool.last[c] == pool.cold_last[:m]))
                if int(ok.sum()) >= k:
                    keep = np.concatenate([ok, np.ones(len(pool.cold) - m, dtype=bool)])
                    if not keep.all():   # an entry that stopped matching never matches again: forget it
                        pool.cold, pool.cold_tab, pool.cold_row, pool.cold_last = (
                            pool.cold[keep], pool.cold_tab[keep], pool.cold_row[keep], pool.cold_last[keep])
                    return pool.cold[:k]
                if m == len(pool.cold):
                    break
        live = np.flatnonzero(pool.tab >= 0)
        n = min(len(live), max(k, pool.live // 16, 4096))
        cold = live if n == len(live) else live[np.argpartition(pool.last[live], n - 1)[:n]]
        cold = cold[np.argsort(pool.last[cold], kind="stable")]
        pool.cold, pool.cold_tab, pool.cold_row, pool.cold_last = (
            cold, pool.tab[cold].astype(np.int64), pool.row[cold], pool.last[cold])
        # Rows left out are at least as recent as the list's last entry; with the whole pool listed, none is.
        pool.cold_cut = int(pool.cold_last[-1]) if n < len(live) else np.iinfo(np.int64).max
        return cold[:k]

    def _evict_bytes(self, need: int) -> int:
        """Evict the least recently used rows (over all pools) until ``need`` bytes are free."""
        if need <= 0:
            return 0
        pools = [p for p in self._pools.values() if p.live]
        if not pools:
            return 0
        if len(pools) == 1:
            pool = pools[0]
            victims = self._coldest(pool, -(-need // pool.row_bytes))
            self._drop(pool, victims)
            return len(victims)
        # Mixed dims: one global LRU order, evict a prefix whose bytes cover ``need``.
        owner = np.concatenate([np.full(p.live, i, dtype=np.int32) for i, p in enumerate(pools)])
        slots = np.concatenate([np.flatnonzero(p.tab >= 0) for p in pools])
        last = np.concatenate([p.last[p.tab >= 0] for p in pools])
        size = np.array([p.row_bytes for p in pools], dtype=np.int64)[owner]
        order = np.argsort(last, kind="stable")
        k = int(np.searchsorted(np.cumsum(size[order]), need)) + 1
        chosen = order[:k]
        for i, p in enumerate(pools):
            sel = chosen[owner[chosen] == i]
            if len(sel):
                self._drop(p, slots[sel])
        return min(k, len(order))

    def _drop(self, pool: _Pool, slots: np.ndarray) -> None:
        for t in np.unique(pool.tab[slots]):
            sel = slots[pool.tab[slots] == t]
            self._slot_of_row[t][pool.row[sel]] = -1
        pool.tab[slots] = -1
        pool.free = np.concatenate([pool.free, slots.astype(np.int64)])
        pool.live -= len(slots)
        self._evictions += len(slots)
        self._version += 1

    # ------------------------------------------------------------------ capacity and stats

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    @property
    def used_bytes(self) -> int:
        return sum(p.live * p.row_bytes for p in self._pools.values())

    @property
    def allocated_bytes(self) -> int:
        return sum(p.alloc * p.row_bytes for p in self._pools.values())

    @property
    def entries(self) -> int:
        return sum(p.live for p in self._pools.values())

    def resize(self, capacity_bytes: int) -> int:
        """Set the capacity; shrinking evicts the coldest rows and frees their memory. Returns rows evicted."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        with self._lock:
            self._capacity = int(capacity_bytes)
            if self._capacity == 0:
                n = self.entries
                self._evictions += n
                self._reset_contents()
                return n
            n = self._evict_bytes(self.used_bytes - self._capacity)
            if self.allocated_bytes > self._capacity:
                for pool in self._pools.values():
                    self._compact(pool, pool.live)
            return n

    def clear(self) -> None:
        """Drop every row and every pending candidate (statistics are kept)."""
        with self._lock:
            self._reset_contents()

    def _reset_contents(self) -> None:
        for t in self._slot_of_row:
            t.fill(-1)
        for dim in list(self._pools):
            self._pools[dim] = _Pool(dim, self.device)
        for i in range(len(self.tables)):
            self._pending[i] = []
            self._pending_n[i] = 0
            self._miss_clock[i].fill(0)
            self._inflight[i] = _empty_pair()
        if self._freq is not None:
            for f in self._freq:
                f.fill(0)
            self._window_seen = 0
        self._version += 1

    def reset_stats(self) -> None:
        with self._lock:
            self._hits[:] = 0
            self._lookups[:] = 0
            self._evictions = 0
            self._fills = 0

    def stats(self) -> dict:
        """Counters and sizes; ``hit_rate`` is hits / lookups over ids (0.0 before any lookup)."""
        with self._lock:
            hits, lookups = int(self._hits.sum()), int(self._lookups.sum())
            return {
                "capacity_bytes": self._capacity,
                "used_bytes": self.used_bytes,
                "allocated_bytes": self.allocated_bytes,
                "entries": self.entries,
                "hits": hits,
                "lookups": lookups,
                "hit_rate": hits / lookups if lookups else 0.0,
                "evictions": self._evictions,
                "fills": self._fills,
                "admission": self.admission,
                "tables": {
                    t.name: {
                        "hits": int(self._hits[i]),
                        "lookups": int(self._lookups[i]),
                        "hit_rate": float(self._hits[i] / self._lookups[i]) if self._lookups[i] else 0.0,
                    }
                    for i, t in enumerate(self.tables)
                },
            }


def _empty_pair() -> tuple[np.ndarray, np.ndarray]:
    return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)


def _check_bags(spec: TableSpec, values: np.ndarray, lengths: np.ndarray) -> None:
    if values.ndim != 1 or lengths.ndim != 1:
        raise ValueError(f"{spec.name}: values and lengths must be 1-D, got {values.shape} and {lengths.shape}")
    if len(lengths) and int(lengths.min()) < 0:
        raise ValueError(f"{spec.name}: negative bag length {int(lengths.min())}")
    total = int(lengths.sum(dtype=np.int64))
    if total != len(values):
        raise ValueError(f"{spec.name}: lengths sum to {total} but there are {len(values)} values")
    if len(values) and (int(values.min()) < 0 or int(values.max()) >= spec.rows):
        bad = int(values.min()) if int(values.min()) < 0 else int(values.max())
        raise ValueError(f"{spec.name}: id {bad} is outside the table's rows [0, {spec.rows})")
