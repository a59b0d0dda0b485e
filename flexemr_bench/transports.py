"""Transport benchmark: ``flexemrd local`` over TCP vs shm, side by side in one run.

    python -m flexemr_bench.transports --out bench-out/transports [--seconds 4] [--reps 3] [--rows-cap 200000]

Two clusters run at once, identical but for ``--transport`` (2 embedding
servers, 2 engines, the bench8 preset: 8 tables x 64 dims, 20 ids per bag,
rows capped).  Each repetition measures lookup() then predict() on each
cluster, alternating which cluster goes first (the machine is shared and
noisy: interleaving spreads the noise over both, medians over repetitions
keep one bad interval from deciding).  Closed loop, CLIENTS client processes,
batch BATCH.  Reports samples/s per cell and the shm/tcp ratio per kind;
writes ``transports.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

from flexemr.loadgen import run_load, socket_caller
from flexemr_bench.ranker import Daemon, ensure_model

BATCH = 2048
CLIENTS = 4
TRANSPORTS = ("tcp", "shm")
KINDS = ("lookup", "predict")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _requests(model: Path, n: int = 16) -> list:
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(load_spec(model), ids_per_bag=20, zipf_exponent=1.05, seed=3)
    return [gen.batch(BATCH) for _ in range(n)]


def run(out: Path, rows_cap: int, seconds: float, reps: int, clients: int = CLIENTS) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    requests = _requests(model)
    tag = f"x{os.getpid()}"
    systems: dict[str, Daemon] = {}
    cells: dict[str, list[dict]] = {}
    try:
        for t in TRANSPORTS:
            systems[t] = Daemon(model, 2, 2, str(out / f"{tag}-{t}.sock"), f"{tag}{t}",
                                ["--transport", t, "--max-batch", str(BATCH)])
        for t, d in systems.items():          # warm-up: page in the tables, fill the pools
            run_load(socket_caller(d.sock, "lookup"), requests, clients, 1.0)
        for rep in range(reps):
            order = list(TRANSPORTS) if rep % 2 == 0 else list(reversed(TRANSPORTS))
            for kind in KINDS:
                for t in order:
                    r = run_load(socket_caller(systems[t].sock, kind), requests, clients, seconds).summary()
                    cells.setdefault(f"{t}/{kind}", []).append(r)
                    _log(f"rep {rep + 1}/{reps} {t:3s} {kind:7s} {r['samples_per_s']:10.0f} samples/s  "
                         f"p50 {r['p50_ms']:7.2f} ms  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}")
    finally:
        for d in systems.values():
            d.stop()
    median = {k: statistics.median(c["samples_per_s"] for c in v) for k, v in cells.items()}
    result = {
        "shape": {"preset": "bench8", "rows_cap": rows_cap, "batch": BATCH, "ids_per_bag": 20, "tables": 8,
                  "dim": 64, "servers": 2, "engines": 2, "clients": clients, "seconds": seconds, "reps": reps},
        "median_samples_per_s": median,
        "ratio_shm_over_tcp": {k: round(median[f"shm/{k}"] / median[f"tcp/{k}"], 3)
                               for k in KINDS if median.get(f"tcp/{k}")},
        "errors": {k: sum(c["errors"] for c in v) for k, v in cells.items()},
        "cells": cells,
    }
    (out / "transports.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.transports", description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/transports"))
    ap.add_argument("--rows-cap", type=int, default=200_000, help="rows per table (bench8 has 1M)")
    ap.add_argument("--seconds", type=float, default=4.0, help="per cell")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=CLIENTS)
    a = ap.parse_args(argv)
    res = run(a.out, a.rows_cap, a.seconds, a.reps, a.clients)
    med = res["median_samples_per_s"]
    for k in KINDS:
        _log(f"{k:7s} tcp {med[f'tcp/{k}']:10.0f}  shm {med[f'shm/{k}']:10.0f}  samples/s  "
             f"shm/tcp = {res['ratio_shm_over_tcp'].get(k)}")
    print(json.dumps({"median_samples_per_s": med, "ratio_shm_over_tcp": res["ratio_shm_over_tcp"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
