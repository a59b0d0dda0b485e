"""Wire bytes per sample between the ranker and its servers, before and after compact partials (protocol 3).

    python -m flexemr_bench.compactwire [--rows-cap 100000] [--batch 1024] [--cache-size 64MiB] [--out FILE.json]

No daemon runs: the real split (``split_batch``) and the real encoders
(``codec.encode_lookup`` / ``encode_lookup_response``) size the frames of a
few batches of bench8 (8 tables x 64, 20 Zipf-1.05 ids per bag).  *Before*
is the same subrequests laid out as protocol 2 did (every bag of the batch
sent to every server holding rows of a table that has ids, one partial per
bag back); *after* is what is sent now (only the bags with ids for the
server).  Three workloads:

- ``no empty bags``: 2 servers, tables split by rows (``flexemrd local``'s default);
- ``half the bags empty``: the same with half of every table's bags empty
  (real traffic: optional features absent for many samples);
- ``cache``: one server (the slow-link set-up of ``flexemr_bench.cachegate``)
  behind a ranker cache of ``--cache-size`` holding each table's hottest rows
  (what an LRU converges to under a stationary Zipf), its hits taken out of
  the subrequests first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from flexemr.config import parse_size
from flexemr.model.presets import capped, get_preset
from flexemr.model.spec import ModelSpec
from flexemr.reqgen import RequestGenerator
from flexemr.routing import RoutingTable, split_batch
from flexemr.wire import codec


def _nbytes(frame: list) -> int:
    return sum(b.nbytes if isinstance(b, (np.ndarray, memoryview)) else len(b) for b in frame)


def _hot_rows(spec: ModelSpec, gen: RequestGenerator, batch: int, capacity_bytes: int) -> list[np.ndarray]:
    """Per table, a bool mask of the rows an ideal cache of ``capacity_bytes`` holds (the most requested)."""
    counts = [np.zeros(t.rows, np.int64) for t in spec.tables]
    for _ in range(48):   # enough samples that the tail's order is not noise at these capacities
        _dense, sparse = gen.batch(batch)
        for i, t in enumerate(spec.tables):
            counts[i] += np.bincount(sparse[t.name][0], minlength=t.rows)
    total = np.concatenate(counts)
    row_bytes = np.concatenate([np.full(t.rows, 4 * t.dim) for t in spec.tables])
    order = np.argsort(-total, kind="stable")
    keep = order[: int(np.searchsorted(np.cumsum(row_bytes[order]), capacity_bytes, side="right"))]
    mask = np.zeros(len(total), bool)
    mask[keep] = True
    out, at = [], 0
    for t in spec.tables:
        out.append(mask[at: at + t.rows])
        at += t.rows
    return out


def _measure(spec: ModelSpec, routing: RoutingTable, gen: RequestGenerator, batch: int, batches: int,
             hot: list[np.ndarray] | None) -> dict[str, float]:
    tidx = list(range(len(spec.tables)))
    sums = {"before_out": 0, "before_back": 0, "after_out": 0, "after_back": 0, "pairs": 0, "pairs_sent": 0}
    for _ in range(batches):
        _dense, sparse = gen.batch(batch)
        values, lengths = [], []
        for i, t in enumerate(spec.tables):
            v, ln = sparse[t.name]
            if hot is not None:     # the cache's hits leave the subrequest first (as RankerCache.serve does)
                miss = ~hot[i][v]
                bag = np.repeat(np.arange(batch), ln)
                ln = np.bincount(bag[miss], minlength=batch).astype(np.int32)
                v = v[miss]
            values.append(v)
            lengths.append(ln)
        sums["pairs"] += batch * len(tidx)
        for part in split_batch(routing, batch, tidx, values, lengths).parts.values():
            tids = np.asarray(part.tables, np.uint32)
            dims = [spec.tables[t].dim for t in part.tables]
            full = []
            for ln, rows in zip(part.lengths, part.rows):
                f = np.zeros(batch, np.int32)
                f[slice(None) if rows is None else rows] = ln
                full.append(f)
            sums["before_out"] += _nbytes(codec.encode_lookup(1, batch, tids, full, part.values, narrow_ids=True))
            sums["before_back"] += 32 + codec.lookup_response_size(batch, dims)
            sums["after_out"] += _nbytes(codec.encode_lookup(1, batch, tids, part.lengths, part.values,
                                                             narrow_ids=True))
            sums["after_back"] += 32 + codec.lookup_response_size([len(ln) for ln in part.lengths], dims)
            sums["pairs_sent"] += part.bags_sent()
    n = batch * batches
    out = {k: round(v / n, 1) for k, v in sums.items() if k not in ("pairs", "pairs_sent")}
    out["before_total"] = round(out["before_out"] + out["before_back"], 1)
    out["after_total"] = round(out["after_out"] + out["after_back"], 1)
    out["pairs_sent_fraction"] = round(sums["pairs_sent"] / sums["pairs"], 4)
    return out


def run(rows_cap: int, batch: int, cache_size: str, batches: int = 4) -> dict:
    spec = capped(get_preset("bench8").spec, rows_cap)
    results: dict = {"workload": f"bench8 (8 tables x {rows_cap:,} rows x 64), 20 Zipf-1.05 ids per bag, "
                                 f"batch {batch}", "cache_size": cache_size}
    two = RoutingTable.build(spec, 2, "rows")
    for name, empty in (("no empty bags", 0.0), ("half the bags empty", 0.5)):
        gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=1.05, seed=11, empty_bag_prob=empty,
                               length_dist="fixed")
        results[name] = _measure(spec, two, gen, batch, batches, None)
    gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=1.05, seed=11, empty_bag_prob=0.0, length_dist="fixed")
    hot = _hot_rows(spec, gen, batch, parse_size(cache_size))
    results["cache"] = _measure(spec, RoutingTable.build(spec, 1, "tables"), gen, batch, batches, hot)
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.compactwire", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows-cap", type=int, default=100_000)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--cache-size", default="64MiB")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    r = run(a.rows_cap, a.batch, a.cache_size)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(r, indent=2))
    print(r["workload"])
    print(f"{'workload':32} {'before out/back/total B':>26} {'after out/back/total B':>26} {'pairs sent':>10}")
    for k in ("no empty bags", "half the bags empty", "cache"):
        x = r[k]
        label = k if k != "cache" else f"cache {r['cache_size']} (1 server)"
        print(f"{label:32} {x['before_out']:>8,.0f} {x['before_back']:>8,.0f} {x['before_total']:>8,.0f} "
              f"{x['after_out']:>8,.0f} {x['after_back']:>8,.0f} {x['after_total']:>8,.0f} "
              f"{100 * x['pairs_sent_fraction']:>9.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
