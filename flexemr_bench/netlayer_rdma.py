"""Network-layer benchmark over RDMA verbs (issue 12), side by side in one run:

    python -m flexemr_bench.netlayer --transport rdma --out DIR [--seconds 4 --reps 3]
    scripts/bench-rdma.sh DIR        # the same inside a soft-RoCE guest, plot drawn on the host

Real embedding-server processes (``netlayer_rdma_server``: a ServerChannel
per engine, a numpy table pooled with ``np.add.reduceat``, partials written
back with WRITE WITH IMM) and ranker engines (``netlayer_rdma_engine``),
forked from this process, torch-free.  Every configuration is repeated
``--reps`` times, interleaved (the order reversed every other repetition),
and the medians are reported:

1. mapping, 2 engines x 2 servers, credits on the priority QP:
   "owned"  = 2 engine processes, each with its own Endpoint (verbs context,
              PD, CQ: its own NIC parallelism unit) and its own QPs to every server;
   "shared" = the same 2 engines as 2 threads of ONE process sharing one
              Endpoint and one QP per server, taking strict turns on it (a QP
              cannot be shared across processes, so this is the honest form
              of sharing a unit: posting and polling serialise).
   Lookups/s, p50/p99 per lookup, owned/shared.
2. credits, the "owned" set-up with grants on the credit QP (SL 5 / TC 184)
   vs in band on the data QP behind the partials: grant latency (the server
   posting a grant to the engine applying it; CLOCK_MONOTONIC is common to
   both ends on one host), p50/p99, and lookup p99; in_band/priority.

A lookup is one engine's request to one server (``--bags`` bags of
``--ids-per-bag`` ids), answered by that many pooled partial vectors.

Writes DIR/netlayer-rdma.json and DIR/netlayer-rdma.png (``--no-plot`` skips
the plot, ``--plot-only DIR`` draws it from an existing JSON).  In the
soft-RoCE guest the CPU is emulated (and soft-RoCE is CPU too): absolute
numbers are meaningless there, only the ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from statistics import median
from typing import Any, Callable

import numpy as np

from flexemr_bench.netlayer_rdma_wire import Workload, percentiles_us

JSON_NAME = "netlayer-rdma.json"
PLOT_NAME = "netlayer-rdma.png"
JSON_BEGIN = "NETLAYER-RDMA-JSON-BEGIN"
JSON_END = "NETLAYER-RDMA-JSON-END"
MODES: tuple[tuple[str, str], ...] = (("mapping", "owned"), ("mapping", "shared"),
                                       ("credits", "priority"), ("credits", "in_band"))
SHARED_MEANS = ("2 engines as threads of one process sharing one Endpoint (verbs context, PD, CQ) and one "
                "data+credit QP pair per server, taking strict turns to post and poll; 'owned' is 2 processes "
                "with an Endpoint and QPs each")
NOTE = ("Measured in a soft-RoCE guest whose CPU is emulated (soft-RoCE itself runs on that CPU): absolute "
        "rates and latencies are meaningless, only the ratios mean anything.")
READY_S = 180.0
HW_COUNTERS = "/sys/class/infiniband/{dev}/ports/1/hw_counters/{name}"


def _log(msg: str) -> None:
    print(f"[netlayer-rdma {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _counter(dev: str, name: str) -> int | None:
    try:
        with open(HW_COUNTERS.format(dev=dev, name=name)) as f:
            return int(f.read())
    except OSError:
        return None


def _child(target: Callable[..., None], conn: Any, args: tuple[Any, ...]) -> None:
    """A forked child: whatever it raises comes back to the benchmark with its traceback."""
    try:
        target(*args, conn)
    except BaseException:  # noqa: BLE001 -- reported to the parent
        try:
            conn.send(("error", f"pid {os.getpid()}:\n{traceback.format_exc()}"))
        except OSError:
            pass


class _Child:
    def __init__(self, what: str, target: Callable[..., None], *args: Any) -> None:
        ctx = multiprocessing.get_context("fork")  # the guest re-imports numpy in ~20 s: fork instead
        self.what = what
        self.pipe, child = ctx.Pipe()
        self.proc = ctx.Process(target=_child, args=(target, child, args), daemon=True)
        self.proc.start()
        child.close()

    def recv(self, timeout_s: float) -> Any:
        if not self.pipe.poll(timeout_s):
            raise TimeoutError(f"{self.what} (pid {self.proc.pid}) said nothing for {timeout_s} s")
        try:
            msg = self.pipe.recv()
        except EOFError:
            raise RuntimeError(f"{self.what} (pid {self.proc.pid}) died, exit code {self.proc.exitcode}") from None
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise RuntimeError(f"{self.what} failed:\n{msg[1]}")
        return msg

    def stop(self, timeout_s: float = 30.0) -> None:
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self.pipe.close()


def _one_run(experiment: str, mode: str, w: Workload, device: str, paths: list[str], seconds: float,
             warmup_s: float) -> dict[str, Any]:
    from flexemr_bench.netlayer_rdma_engine import run_group

    groups = [2] if mode == "shared" else [1, 1]
    credits = mode if experiment == "credits" else "priority"
    kids = [_Child(f"{experiment}/{mode} engine group {g}", run_group, g, n, credits, w, device, paths)
            for g, n in enumerate(groups)]
    try:
        for k in kids:
            if k.recv(READY_S) != "ready":
                raise RuntimeError(f"{k.what}: unexpected hello")
        start = time.monotonic_ns() + 100_000_000  # all engines start together
        window = (start + int(warmup_s * 1e9), start + int(seconds * 1e9))
        for k in kids:
            k.pipe.send(("go", start, *window))
        results = [k.recv(seconds + READY_S) for k in kids]
    finally:
        for k in kids:
            k.stop()
    engines = [e for r in results for e in r["engines"]]
    lat = np.concatenate([e["lat_ns"] for e in engines])
    grants = np.concatenate([r["grant_ns"] for r in results])
    look, grant = percentiles_us(lat), percentiles_us(grants)
    completed = sum(e["completed"] for e in engines)
    return {"lookups_per_s": round(completed / ((window[1] - window[0]) / 1e9), 1),
            "lookup_p50_us": look["p50_us"], "lookup_p99_us": look["p99_us"], "lookups": look["samples"],
            "grant_p50_us": grant["p50_us"], "grant_p99_us": grant["p99_us"], "grants": grant["samples"],
            "credits": credits, "engines": len(engines), "endpoints": len(results),
            "verified_replies": sum(e["verified"] for e in engines),
            "mismatched_replies": sum(e["mismatches"] for e in engines),
            "grants_unmatched": sum(r["grants_unmatched"] for r in results),
            # where the time went: ~0 everywhere means CPU-bound (the guest's emulated CPU)
            "engine_idle_fraction": round(float(np.mean([e["idle_fraction"] for e in engines])), 3),
            "server_idle_fraction": round(float(np.mean([f for r in results for f in r["server_idle_fraction"]])), 3),
            "qp_states": sorted({s for r in results for pair in r["qp_states"] for s in pair}),
            "device": results[0]["device"]}


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("lookups_per_s", "lookup_p50_us", "lookup_p99_us", "grant_p50_us", "grant_p99_us")
    # a run the host starved of CPU may have no samples at all (NaN): the median skips it
    out: dict[str, Any] = {k: _median([r[k] for r in runs], 1) for k in keys}
    out.update(engines=runs[0]["engines"], endpoints=runs[0]["endpoints"], credits=runs[0]["credits"],
               lookups=sum(r["lookups"] for r in runs), grants=sum(r["grants"] for r in runs), runs=runs)
    return out


def _median(xs: list[float], digits: int) -> float:
    finite = [x for x in xs if not math.isnan(x)]
    return round(median(finite), digits) if finite else float("nan")


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b and not math.isnan(a) and not math.isnan(b) else float("nan")


def run(out: Path, w: Workload, *, seconds: float = 4.0, warmup_s: float = 0.5, reps: int = 3,
        device: str | None = None, plot: bool = True) -> dict[str, Any]:
    """The whole benchmark; returns (and writes to ``out``) the JSON document."""
    from flexemr.transport.rdma import device as rdma_device
    from flexemr.transport.rdma.loader import load_pyverbs
    from flexemr_bench.netlayer_rdma_server import serve

    if seconds <= warmup_s:
        raise ValueError(f"--seconds {seconds} must exceed --warmup {warmup_s}")
    if reps < 1:
        raise ValueError(f"--reps {reps} must be at least 1")
    names, why = rdma_device.probe()
    if not names:
        raise SystemExit(f"netlayer --transport rdma: no usable RDMA device ({why}); "
                         "run scripts/bench-rdma.sh to use a soft-RoCE guest")
    dev = device or os.environ.get("FLEXEMR_RDMA_DEVICE") or names[0]
    load_pyverbs()  # once, before forking: children open their own verbs contexts
    import flexemr_bench.netlayer_rdma_engine  # noqa: F401 -- imported once here, not in every child
    import flexemr.transport.rdma.channel  # noqa: F401
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    sock_dir = tempfile.mkdtemp(prefix="fx-rdma-bench-")
    paths = [os.path.join(sock_dir, f"server{i}.sock") for i in range(w.servers)]
    pkts0 = (_counter(dev, "sent_pkts"), _counter(dev, "rcvd_pkts"))
    _log(f"device {dev}; {w.servers} servers, 2 engines, {w.bags} bags x {w.ids_per_bag} ids, dim {w.dim}, "
         f"window {w.window}; {reps} x {len(MODES)} runs of {seconds} s")
    servers = [_Child(f"embedding server {i}", serve, i, p, dev, w) for i, p in enumerate(paths)]
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {m: [] for m in MODES}
    try:
        for s in servers:
            s.recv(READY_S)
        # One short run first, left out: the guest's first run pays page faults and cold caches.
        _log("warm-up run (not reported) ...")
        _one_run("mapping", "owned", w, dev, paths, min(seconds, 1.0 + warmup_s), warmup_s)
        for rep in range(reps):
            for exp, mode in (MODES if rep % 2 == 0 else MODES[::-1]):
                r = _one_run(exp, mode, w, dev, paths, seconds, warmup_s)
                runs[(exp, mode)].append(r)
                _log(f"rep {rep + 1}/{reps} {exp:8s} {mode:8s}: {_num(r['lookups_per_s'], 9)} lookups/s, "
                     f"p99 {_num(r['lookup_p99_us'], 9)} us, grant p50/p99 {r['grant_p50_us']}/{r['grant_p99_us']} us, "
                     f"idle engines {r['engine_idle_fraction']:.0%} servers {r['server_idle_fraction']:.0%}")
        for s in servers:
            s.pipe.send("stop")
            s.recv(60)
    finally:
        for s in servers:
            s.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)
    pkts1 = (_counter(dev, "sent_pkts"), _counter(dev, "rcvd_pkts"))
    res = _report(w, dev, seconds, warmup_s, reps, runs)
    res["verbs"] = {"sent_pkts": None if None in (pkts0[0], pkts1[0]) else pkts1[0] - pkts0[0],
                    "rcvd_pkts": None if None in (pkts0[1], pkts1[1]) else pkts1[1] - pkts0[1]}
    res["wall_s"] = round(time.monotonic() - t0, 1)
    res = _json_safe(res)
    (out / JSON_NAME).write_text(json.dumps(res, indent=2, allow_nan=False))
    if plot:
        plot_json(out)
    return res


def _json_safe(x: Any) -> Any:
    """NaN (a statistic without samples) as null: strict JSON for any reader."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def _num(x: float | None, width: int) -> str:
    return f"{'-':>{width}s}" if x is None or math.isnan(x) else f"{x:{width}.1f}"


def _report(w: Workload, dev: str, seconds: float, warmup_s: float, reps: int,
            runs: dict[tuple[str, str], list[dict[str, Any]]]) -> dict[str, Any]:
    m = {mode: _medians(runs[("mapping", mode)]) for mode in ("owned", "shared")}
    c = {mode: _medians(runs[("credits", mode)]) for mode in ("priority", "in_band")}

    def ratios(exp: str, a: str, b: str, key: str, name: str, into: dict[str, Any]) -> None:
        # The ratio of the medians, and the median of each repetition's ratio: the two runs of a
        # repetition are adjacent in time, so the latter cancels drift in how fast the host lets the guest run.
        per_rep = [_ratio(x[key], y[key]) for x, y in zip(runs[(exp, a)], runs[(exp, b)])]
        into[name] = _ratio(into[a][key], into[b][key])
        into[f"{name}_per_rep"] = per_rep
        into[f"{name}_median_per_rep"] = _median(per_rep, 3)

    ratios("mapping", "owned", "shared", "lookups_per_s", "owned_over_shared_lookups_per_s", m)
    ratios("mapping", "shared", "owned", "lookup_p99_us", "shared_over_owned_lookup_p99", m)
    ratios("credits", "in_band", "priority", "grant_p50_us", "in_band_over_priority_grant_p50", c)
    ratios("credits", "in_band", "priority", "grant_p99_us", "in_band_over_priority_grant_p99", c)
    ratios("credits", "in_band", "priority", "lookup_p99_us", "in_band_over_priority_lookup_p99", c)
    return {"transport": "rdma", "device": dev, "workload": w.as_dict(), "seconds": seconds, "warmup_s": warmup_s,
            "repetitions": reps, "order": "interleaved, reversed every other repetition", "statistic": "median",
            "lookup": "one engine's request to one server; lookups/s = replies dispatched in the window (after the "
                      "warm-up); latency = SEND posted to reply completion dispatched, for lookups posted in the window",
            "grant_latency": "server posts a credit grant -> engine applies it (CLOCK_MONOTONIC, one host)",
            "ratios": "X_over_Y: ratio of the medians; X_over_Y_median_per_rep: median of the per-repetition ratios "
                      "(adjacent runs, robust to drift in the guest's speed)",
            "shared_means": SHARED_MEANS, "note": NOTE, "mapping": m, "credits": c}


def table(res: dict[str, Any]) -> str:
    """The side-by-side table printed at the end."""
    rows = [("mapping", "owned"), ("mapping", "shared"), ("credits", "priority"), ("credits", "in_band")]
    lines = [f"{'experiment':10s} {'mode':9s} {'lookups/s':>10s} {'p50 us':>9s} {'p99 us':>9s} "
             f"{'grant p50':>10s} {'grant p99':>10s}"]
    for exp, mode in rows:
        r = res[exp][mode]
        lines.append(f"{exp:10s} {mode:9s} {_num(r['lookups_per_s'], 10)} {_num(r['lookup_p50_us'], 9)} "
                     f"{_num(r['lookup_p99_us'], 9)} {_num(r['grant_p50_us'], 10)} {_num(r['grant_p99_us'], 10)}")
    m, c = res["mapping"], res["credits"]

    def both(d: dict[str, Any], key: str) -> str:
        reps = ", ".join("-" if x is None or math.isnan(x) else f"{x:g}" for x in d[key + "_per_rep"])
        return f"{d[key + '_median_per_rep']} (ratio of medians {d[key]}; per repetition {reps})"

    lines.append("ratios, median over repetitions of each repetition's ratio:")
    lines.append(f"  owned/shared lookups/s        = {both(m, 'owned_over_shared_lookups_per_s')}")
    lines.append(f"  shared/owned lookup p99       = {both(m, 'shared_over_owned_lookup_p99')}")
    lines.append(f"  in_band/priority grant p50    = {both(c, 'in_band_over_priority_grant_p50')}")
    lines.append(f"  in_band/priority grant p99    = {both(c, 'in_band_over_priority_grant_p99')}")
    lines.append(f"  in_band/priority lookup p99   = {both(c, 'in_band_over_priority_lookup_p99')}")
    lines.append(f"shared = {res['shared_means']}")
    lines.append(res["note"])
    return "\n".join(lines)


def _v(x: float | None) -> float:
    return float("nan") if x is None else x


def plot_json(out: Path) -> Path | None:
    """Draw DIR/netlayer-rdma.png from DIR/netlayer-rdma.json (None when matplotlib is missing)."""
    res = json.loads((out / JSON_NAME).read_text())
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _log("matplotlib not importable: no plot (draw it elsewhere with --plot-only DIR)")
        return None
    m, c = res["mapping"], res["credits"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    ax[0].bar(["owned", "shared"], [_v(m["owned"]["lookups_per_s"]), _v(m["shared"]["lookups_per_s"])])
    ax[0].set_ylabel("lookups/s (guest: ratios only)")
    ax[0].set_title(f"mapping: owned/shared = {m['owned_over_shared_lookups_per_s_median_per_rep']}x")
    x = np.arange(2)
    for k, (key, label) in enumerate((("lookup_p50_us", "p50"), ("lookup_p99_us", "p99"))):
        ax[1].bar(x + (k - 0.5) * 0.4, [_v(m["owned"][key]), _v(m["shared"][key])], 0.4, label=label)
    ax[1].set_xticks(x, ["owned", "shared"])
    ax[1].set_ylabel("lookup latency (µs)")
    ax[1].legend()
    ax[1].set_title("mapping: per-lookup latency")
    for k, (key, label) in enumerate((("grant_p50_us", "grant p50"), ("grant_p99_us", "grant p99"),
                                      ("lookup_p99_us", "lookup p99"))):
        ax[2].bar(x + (k - 1) * 0.27, [_v(c["priority"][key]), _v(c["in_band"][key])], 0.27, label=label)
    ax[2].set_xticks(x, ["priority QP", "in band"])
    ax[2].set_ylabel("µs")
    ax[2].set_yscale("log")
    ax[2].legend(fontsize=8)
    ax[2].set_title(f"credits: in-band/priority grant p99 = {c['in_band_over_priority_grant_p99_median_per_rep']}x")
    fig.suptitle(f"RDMA on {res['device']}, medians of {res['repetitions']} interleaved repetitions "
                 "(in a soft-RoCE guest, whose CPU is emulated, only the ratios mean anything)", fontsize=9)
    for a in ax:
        a.title.set_fontsize(10)
    fig.tight_layout()
    path = out / PLOT_NAME
    fig.savefig(path, dpi=90)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.netlayer --transport rdma",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/netlayer-rdma"))
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each run")
    ap.add_argument("--warmup", type=float, default=0.5, help="start of each run left out of the statistics")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions of every configuration")
    d = Workload()
    ap.add_argument("--servers", type=int, default=d.servers)
    ap.add_argument("--rows", type=int, default=d.rows)
    ap.add_argument("--dim", type=int, default=d.dim)
    ap.add_argument("--bags", type=int, default=d.bags)
    ap.add_argument("--ids-per-bag", type=int, default=d.ids_per_bag)
    ap.add_argument("--window", type=int, default=d.window, help="lookups in flight per engine and server")
    ap.add_argument("--device", default=None, help="RDMA device (default: FLEXEMR_RDMA_DEVICE or the first)")
    ap.add_argument("--no-plot", action="store_true", help="skip the plot (draw it later with --plot-only)")
    ap.add_argument("--emit-json", action="store_true",
                    help=f"also print the JSON between {JSON_BEGIN}/{JSON_END} lines (a guest's files are discarded)")
    ap.add_argument("--plot-only", type=Path, metavar="DIR", help=f"draw DIR/{PLOT_NAME} from DIR/{JSON_NAME}")
    ap.add_argument("--verbose", action="store_true", help="keep the verbs layer's per-connection log lines")
    a = ap.parse_args(argv)
    if not a.verbose:  # one "RDMA channel ..." line per QP pair and run drowns the progress lines
        logging.getLogger("flexemr.transport.rdma").setLevel(logging.WARNING)
    if a.plot_only is not None:
        path = plot_json(a.plot_only)
        print(table(json.loads((a.plot_only / JSON_NAME).read_text())))
        return 0 if path else 1
    w = Workload(a.servers, a.rows, a.dim, a.bags, a.ids_per_bag, a.window)
    res = run(a.out, w, seconds=a.seconds, warmup_s=a.warmup, reps=a.reps, device=a.device, plot=not a.no_plot)
    print(table(res))
    if a.emit_json:
        print(JSON_BEGIN)
        print(json.dumps(res))
        print(JSON_END, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
