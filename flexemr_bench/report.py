"""The report: results.json rows combined and checked, the table, summary.md, and the machine they ran on.

Every function here works on plain results.json data (dicts), so a finished
run can be reported again (``python -m flexemr_bench.suite DIR``) and the
pieces can be tested without running anything.  The plots are in
:mod:`flexemr_bench.plots`.
"""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

import numpy as np

from flexemr_bench.workloads import BASELINES, CORE_SYSTEMS

NOISY_CORES = 0.3   # other processes' CPU during a cell above which the table flags it
REQUIRED_SYSTEM_KEYS = ("samples_per_s", "p50_ms", "p99_ms", "wire_bytes_per_sample")


# --------------------------------------------------------------------------- combining rows


def median_run(runs: list[dict]) -> dict:
    """The run with the median samples/s (the lower of the middle two), with every run's rate."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        out["samples_per_s_runs"] = [r["samples_per_s"] for r in runs]
    return out


def ratios(systems: dict[str, dict]) -> dict[str, dict]:
    """Every flexemr variant against each baseline (and ablations against flexemr): >1 = more of it."""
    out: dict[str, dict] = {}
    pairs = [(s, b) for s in systems if s.startswith("flexemr") for b in BASELINES if b in systems]
    pairs += [(s, "flexemr") for s in systems if s.startswith("flexemr-") and "flexemr" in systems]
    for s, b in pairs:
        a, z = systems[s], systems[b]
        out[f"{s}/{b}"] = {k: _ratio(a.get(k), z.get(k))
                           for k in ("samples_per_s", "p50_ms", "p99_ms", "wire_bytes_per_sample", "cpu_s_per_sample")}
    return out


def strongest_ratio(ratios: dict[str, dict], key: str = "samples_per_s") -> float | None:
    """flexemr against the stronger in-process baseline: the lowest throughput ratio (the highest p99 one)."""
    vals = [ratios.get(f"flexemr/{b}", {}).get(key) for b in ("inprocess", "inprocess-all")]
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return min(vals) if key == "samples_per_s" else max(vals)


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)) or math.isnan(b):
        return None
    return round(a / b, 3)


def validate_results(results: dict) -> list[str]:
    """Problems with the results.json contract (empty: fine).

    ``workloads``: a list of objects with ``name`` and ``systems``, a map from
    system name (at least flexemr, inprocess, redis) to an object with at least
    samples_per_s, p50_ms, p99_ms, wire_bytes_per_sample (numbers).
    """
    problems = []
    wls = results.get("workloads")
    if not isinstance(wls, list) or not wls:
        return ["workloads: missing or not a non-empty list"]
    for i, c in enumerate(wls):
        where = f"workloads[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            problems.append(f"{where}: no name")
            continue
        where = f"workloads[{i}] ({c['name']})"
        systems = c.get("systems")
        if not isinstance(systems, dict):
            problems.append(f"{where}: systems is not a map")
            continue
        for name in CORE_SYSTEMS:
            if name not in systems:
                problems.append(f"{where}: system {name} missing")
        for name, r in systems.items():
            for k in REQUIRED_SYSTEM_KEYS:
                if not isinstance(r.get(k), (int, float)):
                    problems.append(f"{where}: systems.{name}.{k} missing or not a number")
    return problems


def write_results(out: Path, results: dict) -> None:
    """``out/results.json``, replaced whole (a reader never sees half a file)."""
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")


# --------------------------------------------------------------------------- lines and tables


def measurement_line(r: dict) -> str:
    """One measurement as a progress line."""
    err = f", {r['errors']} ERRORS" if r["errors"] else ""
    return (f"    {r['samples_per_s']:>12,.0f} samples/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
            f"wire {r['wire_bytes_per_sample']:,.0f} B/sample  cpu {r['cpu_s_per_sample'] * 1e6:,.0f} us/sample{err}")


def format_table(results: dict) -> str:
    """The summary printed at the end: one line per (workload cell, system).

    ``vs inproc`` / ``vs redis``: samples/s ratio in closed-loop cells (more is
    better), p99 ratio in open-loop cells (same offered load; less is better).
    ``bg`` is the CPU (in cores) that other processes took during the cell;
    ``*`` marks cells where that exceeded NOISY_CORES (numbers less trustworthy).
    """
    head = (f"{'workload':20} {'system':22} {'samples/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'wire B/smp':>10} {'cpu us/smp':>10} {'vs inproc':>10} {'vs redis':>10} {'bg':>4}")
    lines = [head, "-" * len(head)]
    for c in results["workloads"]:
        key = "samples_per_s" if c["mode"] == "closed" else "p99_ms"
        tag = "" if c["mode"] == "closed" else "p99 "
        for name, r in c["systems"].items():
            ri = c.get("ratios", {}).get(f"{name}/inprocess", {}).get(key)
            rr = c.get("ratios", {}).get(f"{name}/redis", {}).get(key)
            lines.append(f"{c['name']:20} {name:22} {r['samples_per_s']:>10,.0f} {r['p50_ms']:>8.2f} "
                         f"{r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['wire_bytes_per_sample']:>10,.0f} "
                         f"{r['cpu_s_per_sample'] * 1e6:>10,.0f} {_fmt_ratio(ri, tag):>10} {_fmt_ratio(rr, tag):>10} "
                         f"{r.get('background_cpu_cores', 0):>4.1f}"
                         + ("*" if r.get("background_cpu_cores", 0) > NOISY_CORES else "")
                         + (f"  ({r['errors']} errors)" if r.get("errors") else ""))
        for name, why in c.get("failed", {}).items():
            lines.append(f"{c['name']:20} {name:22} FAILED: {why[:120]}")
        lines.append("")
    m = results.get("mlperf")
    if m:
        lines.append(mlperf_line(m))
    noisy = sum(1 for c in results["workloads"] for r in c["systems"].values()
                if r.get("background_cpu_cores", 0) > NOISY_CORES)
    if noisy:
        lines.append(f"* {noisy} measurement(s) shared the machine with other processes using > {NOISY_CORES} "
                     f"cores (column bg); repeat on a quiet machine for firm numbers")
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['system']} on {s['workload']}: {s['why']}")
    for i in results.get("issues", []):
        lines.append(f"ISSUE: {i}")
    return "\n".join(lines)


def mlperf_line(m: dict) -> str:
    """The MLPerf LoadGen result in one line."""
    off = m.get("offline", {})
    srv = m.get("server", {})
    best = srv.get("best_qps")
    return (f"MLPerf LoadGen ({m.get('system')}, {m.get('workload')}, {m.get('batch')} samples/query): "
            f"Offline {off.get('qps', float('nan')):,.1f} QPS; Server: highest QPS with p99 <= "
            f"{srv.get('bound_ms')} ms = " + (f"{best:,.1f}" if best else "none found")
            + (f" (p99 {srv.get('best_p99_ms'):.1f} ms)" if best else ""))


def format_markdown(results: dict) -> str:
    """results.json as Markdown tables (written to DIR/summary.md; pasted into docs/PERFORMANCE.md)."""
    m = results.get("machine", {})
    out = [f"Command: `{results.get('command')}` ({results.get('duration_s', 0):.0f} s, {results.get('started')})",
           "",
           f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_gib')} GiB RAM, Linux "
           f"{m.get('kernel')}, Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}; load "
           f"average {m.get('loadavg_at_start')} at start, {m.get('loadavg_at_end')} at end.",
           "",
           "### Headline: flexemr against each baseline",
           "",
           "Closed loop: samples/s ratio (> 1: flexemr is faster).  Open loop (same Poisson load for every "
           "system): p99 ratio (< 1: flexemr answers faster).",
           "",
           "The in-process limit is the stronger of `inprocess` (one caller, all cores) and `inprocess-all` "
           "(concurrent callers); `monolithic` is the same daemon pooling its own tables (`--embedding-servers 0`).",
           "",
           "| workload | flexemr samples/s | p99 ms | flexemr / in-process limit | flexemr / monolithic "
           "| flexemr / redis |",
           "|---|---:|---:|---:|---:|---:|"]
    for c in results["workloads"]:
        f = c["systems"].get("flexemr")
        if f is None:
            continue
        key = "samples_per_s" if c["mode"] == "closed" else "p99_ms"
        tag = "" if c["mode"] == "closed" else "p99 "
        r = c.get("ratios", {})
        out.append(f"| {c['name']} | {f['samples_per_s']:,.0f} | {f['p99_ms']:.1f} | "
                   f"{_fmt_ratio(strongest_ratio(r, key), tag)} | "
                   f"{_fmt_ratio(r.get('flexemr/monolithic', {}).get(key), tag)} | "
                   f"{_fmt_ratio(r.get('flexemr/redis', {}).get(key), tag)} |")
    out += ["", "### Every measurement", "",
            "| workload | system | samples/s | p50 ms | p95 ms | p99 ms | wire B/sample | CPU us/sample | other CPU (cores) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["workloads"]:
        for name, r in c["systems"].items():
            bg = r.get("background_cpu_cores", 0)
            out.append(f"| {c['name']} | {name} | {r['samples_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                       f"{r['p99_ms']:.1f} | {r['wire_bytes_per_sample']:,.0f} | {r['cpu_s_per_sample'] * 1e6:,.0f} | "
                       f"{bg:.1f}{' *' if bg > NOISY_CORES else ''} |")
        for name, why in c.get("failed", {}).items():
            out.append(f"| {c['name']} | {name} | failed: {why[:100]} | | | | | | |")
    mp_ = results.get("mlperf")
    if mp_:
        out += ["", "### MLPerf LoadGen", "", mlperf_line(mp_)]
    for sk in results.get("skipped", []):
        out.append(f"\nSkipped {sk['system']} on {sk['workload']}: {sk['why']}")
    if results.get("issues"):
        out += ["", "### Issues seen during the run", ""] + [f"- {i}" for i in results["issues"]]
    return "\n".join(out) + "\n"


def _fmt_ratio(x: float | None, tag: str = "") -> str:
    return "-" if x is None else f"{tag}{x:.2f}"


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """The machine a run is on (results.json ``machine``); ``loadavg_at_end`` is added when it ends."""
    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "numpy": np.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
