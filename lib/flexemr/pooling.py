"""Pooling of embedding bags: a float64 numpy reference and the torch kernel.

A bag is the ids of one sample for one table; ``values`` holds every bag's ids
back to back and ``lengths[b]`` is the size of bag ``b`` (KJT layout, see
docs/CONTRACTS-INTERNAL.md).  Pooling reduces a bag's rows to one vector:
``sum``, ``mean`` or elementwise ``max``; an empty bag pools to zeros in every
mode (DESIGN.md).

``pool_reference`` is the oracle: float64 accumulation, written with numpy's
``reduceat`` and nothing shared with the torch path.  ``pool_torch`` is THE
serving kernel: ``torch.nn.functional.embedding_bag`` straight over the
(read-only) table map, without copying the table; every ``embedding_bag`` in
lib/ and flexemrd/ goes through it.  ``TablePooler`` binds one table to its
pooling mode (the torch view is built once) and also gives the partial an
embedding server sends in hierarchical pooling (docs/PROTOCOL.md): a sum for
sum and mean tables (the ranker divides), a max for max tables.

torch's ``embedding_bag`` releases the GIL while it gathers, so threads
pooling different requests run in parallel.

``pool_numpy`` is the same kernel without torch (``[embedding].kernel =
"numpy"``, ``TablePooler(..., kernel="numpy")``): a gather and a float32
``reduceat`` that accumulate in the order ``embedding_bag`` does (row by row
within a bag), so its answers equal the torch kernel's (the tests compare
them bit for bit).  It exists so an embedding server need not import torch
(seconds on a host, over a minute on an emulated CPU); torch stays the
default because its gather releases the GIL for longer and runs threaded.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from flexemr.types import Pooling

if TYPE_CHECKING:
    import torch

__all__ = ["KERNELS", "pool_tensor", "TablePooler", "as_weight", "bag_offsets", "check_bags", "partial_pooling",
           "pool_numpy", "pool_reference", "pool_torch"]

KERNELS = ("torch", "numpy")


def check_bags(rows: int, values: np.ndarray, lengths: np.ndarray, what: str = "bags") -> None:
    """Raise ValueError unless lengths are non-negative, sum to len(values) and every id is in [0, rows)."""
    if values.ndim != 1 or lengths.ndim != 1:
        raise ValueError(f"{what}: values and lengths must be 1-D, got {values.shape} and {lengths.shape}")
    if len(lengths) and int(lengths.min()) < 0:
        raise ValueError(f"{what}: negative bag length {int(lengths.min())}")
    total = int(lengths.sum(dtype=np.int64))
    if total != len(values):
        raise ValueError(f"{what}: lengths sum to {total} but there are {len(values)} values")
    if len(values):
        lo, hi = int(values.min()), int(values.max())
        # numpy would wrap a negative id around silently; torch would fail deep inside.
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{what}: id {bad} is outside the table's rows [0, {rows})")


def pool_reference(table: np.ndarray, values: np.ndarray, lengths: np.ndarray, pooling: Pooling) -> np.ndarray:
    """Pool each bag of ``table`` rows in float64; returns float32 [B, dim] (empty bag -> zeros)."""
    values = np.asarray(values, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    check_bags(table.shape[0], values, lengths)
    out = np.zeros((len(lengths), table.shape[1]), dtype=np.float64)
    full = lengths > 0
    if not full.any():
        return out.astype(np.float32)
    rows = np.asarray(table[values], dtype=np.float64)
    # reduceat over an empty segment returns the element at its start instead of
    # the identity, so reduce only the non-empty bags: their starts are strictly
    # increasing and each segment runs up to the next non-empty bag's start, which
    # is exactly the bag because the empty bags in between span nothing.
    starts = (np.cumsum(lengths) - lengths)[full]
    if pooling is Pooling.MAX:
        out[full] = np.maximum.reduceat(rows, starts, axis=0)
    else:
        out[full] = np.add.reduceat(rows, starts, axis=0)
        if pooling is Pooling.MEAN:
            out[full] /= lengths[full, None]
    return out.astype(np.float32)


def as_weight(table: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A torch view of a table (no copy), also for read-only memory maps."""
    import torch

    if isinstance(table, torch.Tensor):
        return table
    with warnings.catch_warnings():
        # The map is read-only on purpose (pages shared between processes);
        # torch warns because it cannot promise not to write, but embedding_bag only reads.
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(table)


_MODES = {Pooling.SUM: "sum", Pooling.MEAN: "mean", Pooling.MAX: "max"}
# torch.embedding_bag's mode argument (what F.embedding_bag turns the names into).
_MODE_INTS = {Pooling.SUM: 0, Pooling.MEAN: 1, Pooling.MAX: 2}


def pool_torch(
    weight: np.ndarray | torch.Tensor,
    values: np.ndarray,
    lengths: np.ndarray,
    pooling: Pooling,
    check: bool = True,
) -> np.ndarray:
    """Pool bags with ``torch.nn.functional.embedding_bag``; returns float32 [B, dim].

    ``weight`` may be a read-only memmap (wrapped without a copy) or a tensor
    from :func:`as_weight` (cheaper when pooling the same table repeatedly).
    ``check=False`` skips the id range check for callers that already did it.
    """
    import torch
    import torch.nn.functional as F

    w = as_weight(weight)
    # int32 ids (protocol 2 sends them where tables allow) pool as they are,
    # with int32 offsets (embedding_bag wants both alike): no widening copy.
    narrow = values.dtype == np.int32 and len(values) < 2**31
    values = np.ascontiguousarray(values, dtype=np.int32 if narrow else np.int64)
    lengths = np.asarray(lengths)
    if check:
        check_bags(w.shape[0], values, lengths)
    # include_last_offset=True with offsets [B+1]: the last bag is closed
    # explicitly, so a trailing empty bag needs no special case.
    offsets = np.zeros(len(lengths) + 1, dtype=values.dtype)
    np.cumsum(lengths, out=offsets[1:])
    empty = (lengths == 0) if pooling is Pooling.MAX else None
    return pool_tensor(torch.from_numpy(values), w, torch.from_numpy(offsets), pooling, empty).numpy()


def pool_tensor(ids: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, pooling: Pooling,
                empty: np.ndarray | None = None) -> torch.Tensor:
    """The kernel itself, on tensors of any device: ``offsets`` [B+1] (last offset included).

    Sum and mean pool as ``embedding_bag`` does; max bags listed in ``empty``
    (bool [B]) are zeros, as the contract says, whatever the kernel gives them.
    """
    import torch

    # torch.embedding_bag is what F.embedding_bag calls after its argument checks (1-D ids with
    # offsets need none): calling it directly saves ~10 us of Python per table.
    out = torch.embedding_bag(weight, ids, offsets, False, _MODE_INTS[Pooling(pooling)], False, None, True, None)[0]
    if pooling is Pooling.MAX and empty is not None and empty.any():
        out[torch.from_numpy(empty).to(out.device)] = 0.0
    return out


def bag_offsets(lengths: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Offsets [T, B+1] (last offset included) of T tables' bags from their lengths [T, B]: one cumsum for all.

    Row ``t`` is table ``t``'s offsets into its own ids, contiguous, ready for
    :meth:`TablePooler.partial_at`; ``dtype`` is the ids' (embedding_bag wants both alike).
    """
    t, b = lengths.shape
    out = np.empty((t, b + 1), dtype=dtype)
    out[:, 0] = 0
    np.cumsum(lengths, axis=1, dtype=dtype, out=out[:, 1:])
    return out


def pool_numpy(table: np.ndarray, values: np.ndarray, lengths: np.ndarray, pooling: Pooling,
               check: bool = True) -> np.ndarray:
    """Pool bags in float32 with numpy alone; returns float32 [B, dim], bit for bit :func:`pool_torch`'s answer.

    ``embedding_bag`` sums a bag's rows one after the other in float32;
    ``np.add.reduceat`` does not (its answers differ in the last bits), so
    sums go position by position instead: step k adds the k-th row of every
    bag at least k+1 long, all bags at once (bags sorted longest first, so
    the active ones are a prefix).  That is one whole-array add per position
    of the longest bag, never a loop over rows.  Max is order-free:
    ``np.maximum.reduceat`` over the non-empty bags.  Empty bags are zeros.
    """
    values = np.asarray(values)
    lengths = np.asarray(lengths, dtype=np.int64)
    if check:
        check_bags(table.shape[0], values, lengths)
    out = np.zeros((len(lengths), table.shape[1]), dtype=np.float32)
    if not len(values):
        return out
    rows = np.asarray(table[values], dtype=np.float32)
    starts = np.cumsum(lengths) - lengths
    if Pooling(pooling) is Pooling.MAX:
        full = lengths > 0
        out[full] = np.maximum.reduceat(rows, starts[full], axis=0)
        return out
    order = np.argsort(-lengths, kind="stable")
    sorted_starts = starts[order]
    sorted_lengths = lengths[order]
    acc = np.zeros_like(out)
    longest = int(sorted_lengths[0])
    # active[k] = how many bags have more than k rows (a prefix of the sorted bags)
    active = np.searchsorted(-sorted_lengths, -np.arange(longest), side="left")
    for k in range(longest):
        n = int(active[k])
        acc[:n] += rows[sorted_starts[:n] + k]
    if Pooling(pooling) is Pooling.MEAN:
        full = sorted_lengths > 0
        acc[full] /= sorted_lengths[full, None].astype(np.float32)
    out[order] = acc
    return out


def partial_pooling(pooling: Pooling) -> Pooling:
    """What one server computes for a table of ``pooling``: mean travels as partial sums."""
    return Pooling.MAX if Pooling(pooling) is Pooling.MAX else Pooling.SUM


class TablePooler:
    """One table (a read-only map or a tensor) and its pooling mode, ready to pool bags.

    ``pool`` is the global pool of each bag; ``partial`` is what an embedding
    server holding some of the rows sends (see ``partial_pooling``).  Both
    return float32 [B, dim]; ``check=False`` leaves the id range check to
    torch, which raises RuntimeError on an id outside the table (numpy's
    gather raises IndexError).  ``kernel="numpy"`` pools with
    :func:`pool_numpy` and never imports torch (the table must then be a
    numpy array).
    """

    __slots__ = ("table", "weight", "pooling", "rows", "dim", "kernel", "_partial_mode", "_from_numpy")

    def __init__(self, table: np.ndarray | torch.Tensor, pooling: Pooling, kernel: str = "torch") -> None:
        if kernel not in KERNELS:
            raise ValueError(f"pooling kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        if kernel == "numpy":
            if not isinstance(table, np.ndarray):
                raise TypeError(f"the numpy pooling kernel needs a numpy table, got {type(table).__name__}")
            self.weight = None
            self.table = table
        else:
            self.weight = as_weight(table)          # no copy: pages stay shared with every other mapper
            self.table = table if isinstance(table, np.ndarray) else self.weight.numpy()
        self.pooling = Pooling(pooling)
        self.rows, self.dim = (int(x) for x in self.table.shape)
        self._partial_mode = partial_pooling(self.pooling)
        self._from_numpy = None
        if self.weight is not None:
            import torch

            self._from_numpy = torch.from_numpy

    def pool(self, values: np.ndarray, lengths: np.ndarray, check: bool = True) -> np.ndarray:
        return self._pool(values, lengths, self.pooling, check)

    def partial(self, values: np.ndarray, lengths: np.ndarray, check: bool = True) -> np.ndarray:
        return self._pool(values, lengths, partial_pooling(self.pooling), check)

    def partial_at(self, values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """:meth:`partial` from offsets made already (:func:`bag_offsets`), ids unchecked (the kernel checks).

        ``values`` is C-contiguous int32 or int64, ``offsets`` [B+1] of the same
        dtype and ``lengths`` [B] the bags' sizes (only read for max tables' empty bags).
        """
        if self._from_numpy is None:
            return pool_numpy(self.table, values, lengths, self._partial_mode, check=False)
        mode = self._partial_mode
        empty = (lengths == 0) if mode is Pooling.MAX else None
        return pool_tensor(self._from_numpy(values), self.weight, self._from_numpy(offsets), mode, empty).numpy()

    def _pool(self, values: np.ndarray, lengths: np.ndarray, pooling: Pooling, check: bool) -> np.ndarray:
        if self.weight is None:
            return pool_numpy(self.table, values, lengths, pooling, check=check)
        return pool_torch(self.weight, values, lengths, pooling, check=check)

    def rows_of(self, ids: np.ndarray) -> np.ndarray:
        """Raw rows [n, dim] (a copy), for cache fills; ids must already be checked."""
        return self.table[ids]
