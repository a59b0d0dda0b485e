"""Hedging benchmark: p99 with and without hedged subrequests while one replica stalls, side by side.

    python -m flexemr_bench.hedging --out bench-out/hedging [--seconds 4] [--reps 3]

Two clusters run at once, identical but for ``--hedging``: ``flexemrd local
--embedding-servers 3 --replicas 2``.  Each repetition measures, interleaved:

    steady     both clusters, no stall
    stalled    one embedding server (the same index in both) is stopped with
               SIGSTOP for STALL_MS every PERIOD_MS (SIGCONT in between): a
               replica that answers, but late, as a GC pause or a noisy
               neighbour makes one
    ...for the cluster without hedging, then for the cluster with it

Clients: closed loop, CLIENTS processes of batch BATCH predictions each.
Reports p50/p95/p99 per cell (medians over repetitions), the hedges sent and
won (from the ranker's log line), and the ratio the issue asks for: hedged
p99 while stalled over the unhedged steady p99 (goal: ≤ 1.5).  Writes
``hedging.json`` and ``hedging.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from flexemr.loadgen import run_load, socket_caller
from flexemr_bench.ranker import Daemon, ensure_model

BATCH = 64
CLIENTS = 2
STALL_MS = 60
PERIOD_MS = 300


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _server_pid(daemon: Daemon, index: int) -> int:
    import psutil

    for p in psutil.Process(daemon.proc.pid).children(recursive=True):
        try:
            if p.name() == f"flexemr-emb[{index}]":
                return p.pid
        except psutil.NoSuchProcess:
            continue
    raise RuntimeError(f"no embedding server {index} under pid {daemon.proc.pid}")


class Staller:
    """SIGSTOP/SIGCONT bursts on one process while active (always leaves it running)."""

    def __init__(self, pid: int, stall_s: float, period_s: float) -> None:
        self.pid, self.stall_s, self.period_s = pid, stall_s, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Staller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        os.kill(self.pid, signal.SIGCONT)

    def _run(self) -> None:
        while not self._stop.is_set():
            os.kill(self.pid, signal.SIGSTOP)
            time.sleep(self.stall_s)
            os.kill(self.pid, signal.SIGCONT)
            self._stop.wait(self.period_s - self.stall_s)


def _requests(model: Path, n: int = 64) -> list:
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(load_spec(model), ids_per_bag=20, seed=3)
    return [gen.batch(BATCH) for _ in range(n)]


def _cell(daemon: Daemon, requests: list, seconds: float, stall_pid: int | None) -> dict:
    if stall_pid is None:
        res = run_load(socket_caller(daemon.sock, "predict"), requests, CLIENTS, seconds)
    else:
        with Staller(stall_pid, STALL_MS / 1e3, PERIOD_MS / 1e3):
            res = run_load(socket_caller(daemon.sock, "predict"), requests, CLIENTS, seconds)
    return res.summary()


def _hedge_counts(daemon: Daemon) -> dict:
    """The ranker's failover counters, from emrctl status --json (0 when not published)."""
    import subprocess

    out = subprocess.run([sys.executable, "-m", "emrctl", "--instance", daemon.instance, "status", "--json"],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        return {}
    ranker = json.loads(out.stdout).get("ranker", {})
    return dict(ranker.get("failover", {}))


def run(out: Path, rows_cap: int, seconds: float, reps: int) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    requests = _requests(model)
    tag = f"h{os.getpid()}"
    systems = {
        "no_hedging": Daemon(model, 3, 2, str(out / f"{tag}-plain.sock"), f"{tag}plain",
                             ["--replicas", "2", "--no-hedging"]),
        "hedging": Daemon(model, 3, 2, str(out / f"{tag}-hedge.sock"), f"{tag}hedge",
                          ["--replicas", "2", "--hedging"]),
    }
    cells: dict[str, list[dict]] = {}
    try:
        for name, d in systems.items():   # warm-up: hedging needs latency history per server
            _cell(d, requests, 2.0, None)
        stall = {name: _server_pid(d, 1) for name, d in systems.items()}
        for rep in range(reps):
            for phase in ("steady", "stalled"):
                for name, d in (systems.items() if rep % 2 == 0 else reversed(list(systems.items()))):
                    key = f"{name}/{phase}"
                    r = _cell(d, requests, seconds, stall[name] if phase == "stalled" else None)
                    cells.setdefault(key, []).append(r)
                    _log(f"rep {rep + 1}/{reps} {key:22s} {r['samples_per_s']:9.0f} samples/s  "
                         f"p50 {r['p50_ms']:6.2f}  p99 {r['p99_ms']:7.2f} ms  errors {r['errors']}")
        counters = {name: _hedge_counts(d) for name, d in systems.items()}
    finally:
        for d in systems.values():
            d.stop()
    med = {k: {m: float(np.median([r[m] for r in v])) for m in ("samples_per_s", "p50_ms", "p95_ms", "p99_ms")}
           | {"errors": int(sum(r["errors"] for r in v))} for k, v in cells.items()}
    ratio = med["hedging/stalled"]["p99_ms"] / med["no_hedging/steady"]["p99_ms"]
    result = {
        "workload": {"batch": BATCH, "clients": CLIENTS, "stall_ms": STALL_MS, "period_ms": PERIOD_MS,
                     "servers": 3, "replicas": 2, "seconds": seconds, "reps": reps, "rows_cap": rows_cap},
        "cells": med,
        "runs": cells,
        "counters": counters,
        "ratios": {
            "hedged_stalled_p99_over_steady_p99": round(ratio, 3),
            "unhedged_stalled_p99_over_steady_p99": round(
                med["no_hedging/stalled"]["p99_ms"] / med["no_hedging/steady"]["p99_ms"], 3),
            "hedged_steady_throughput_over_unhedged": round(
                med["hedging/steady"]["samples_per_s"] / med["no_hedging/steady"]["samples_per_s"], 3),
        },
        "goal": "hedged p99 while one replica stalls <= 1.5x the unslowed p99",
    }
    (out / "hedging.json").write_text(json.dumps(result, indent=2))
    _plot(med, out / "hedging.png")
    return result


def _plot(med: dict, path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None:
        return
    keys = ["no_hedging/steady", "no_hedging/stalled", "hedging/steady", "hedging/stalled"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = np.arange(len(keys))
    for i, (m, label) in enumerate((("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99"))):
        ax.bar(x + (i - 1) * 0.27, [med[k][m] for k in keys], 0.27, label=label)
    ax.set_xticks(x, [k.replace("/", "\n") for k in keys])
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"one replica stopped {STALL_MS} ms every {PERIOD_MS} ms")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows-cap", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    res = run(args.out, args.rows_cap, args.seconds, args.reps)
    print(json.dumps({"cells": res["cells"], "ratios": res["ratios"], "counters": res["counters"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
