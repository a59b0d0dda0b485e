"""The RDMA network-layer benchmark's workload: lookup layout, tables, pooling.

A lookup is what an engine sends one embedding server: ``bags`` bags of
``ids_per_bag`` row ids into that server's table, answered by ``bags`` pooled
(sum) partial vectors of ``dim`` float32, the hierarchical-pooling partials
the daemon's servers return.  On the wire (SEND from the engine's registered
request memory into a server receive slot)::

    int64 request id | int64 reply offset | int64 bags | int64 ids_per_bag | int32 ids[bags * ids_per_bag]

and the reply is ``float32[bags, dim]``, written by the server with RDMA WRITE
WITH IMM (imm = request id) straight to ``reply offset`` in the engine's
registered completion memory.  Both ends build the same tables from the
server index, so an engine can check a reply without asking anyone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

HEADER_INT64 = 4
HEADER_BYTES = 8 * HEADER_INT64


@dataclass(frozen=True)
class Workload:
    """Sizes shared by servers and engines (one value per run, both ends agree)."""

    servers: int = 2
    rows: int = 20_000  # rows of each server's table
    dim: int = 64
    bags: int = 32  # bags per lookup
    ids_per_bag: int = 20
    window: int = 8  # lookups each engine keeps in flight per server

    def __post_init__(self) -> None:
        for name in ("servers", "rows", "dim", "bags", "ids_per_bag", "window"):
            if getattr(self, name) <= 0:
                raise ValueError(f"workload: {name} = {getattr(self, name)} must be positive")

    @property
    def request_bytes(self) -> int:
        return HEADER_BYTES + 4 * self.bags * self.ids_per_bag

    @property
    def reply_bytes(self) -> int:
        return 4 * self.bags * self.dim

    def as_dict(self) -> dict[str, int]:
        return dict(asdict(self), request_bytes=self.request_bytes, reply_bytes=self.reply_bytes)


def make_table(server: int, rows: int, dim: int) -> np.ndarray:
    """Server ``server``'s table, the same in every process that asks."""
    return np.random.default_rng(1000 + server).standard_normal((rows, dim), dtype=np.float32)


def bag_starts(bags: int, ids_per_bag: int) -> np.ndarray:
    """``np.add.reduceat`` offsets for fixed-length bags."""
    return np.arange(0, bags * ids_per_bag, ids_per_bag, dtype=np.int64)


def pool(table: np.ndarray, ids: np.ndarray, starts: np.ndarray, out: np.ndarray) -> None:
    """Sum-pool each bag of ``ids`` into ``out[bag]`` (one gather, one reduceat: no loop over bags)."""
    np.add.reduceat(table[ids], starts, axis=0, out=out)


def percentiles_us(ns: np.ndarray) -> dict[str, float]:
    """p50 / p99 of nanosecond samples, in microseconds (NaN when there are none)."""
    if ns.size == 0:
        return {"p50_us": float("nan"), "p99_us": float("nan"), "samples": 0}
    p50, p99 = np.percentile(ns, [50, 99]) / 1e3
    return {"p50_us": round(float(p50), 1), "p99_us": round(float(p99), 1), "samples": int(ns.size)}
