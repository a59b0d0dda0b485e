"""Plots of an ``emrctl bench`` results.json (matplotlib, Agg backend: no display needed).

    throughput.png   closed-loop samples/s against batch size, one panel per model
    latency_cdf.png  latency CDFs under open-loop Poisson arrivals, per model and offered load
    efficiency.png   wire bytes and CPU seconds per sample, per model and system
    ablations.png    flexemr variants against flexemr: samples/s, p99, wire bytes
    mlperf.png       LoadGen Server probes: p99 against QPS, with the bound
    profile.png      where the CPU goes (flexemr_bench.profile): ms per 1,000 samples, role x category

    python -m flexemr_bench.plots DIR      # re-draw from DIR/results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

_COLORS = {"flexemr": "#1f77b4", "inprocess": "#2ca02c", "redis": "#d62728", "flexemr-rawrows": "#ff7f0e",
           "flexemr-shared": "#9467bd", "flexemr-1engine": "#8c564b", "flexemr-inband": "#e377c2",
           "flexemr-cache-fixed": "#7f7f7f", "flexemr-cache-adaptive": "#17becf"}
_CORE = ("flexemr", "inprocess", "inprocess-all", "monolithic", "redis")


def _color(name: str) -> str | None:
    return _COLORS.get(name)


def pyplot(required: bool = True) -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files, no display): the one place a benchmark gets it.

    With ``required=False`` a host without matplotlib gets None (that
    benchmark then writes its JSON and skips its plot) instead of ImportError.
    """
    try:
        import matplotlib
    except ImportError:
        if required:
            raise
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _models(results: dict) -> list[str]:
    seen: list[str] = []
    for c in results["workloads"]:
        if c["model"] not in seen:
            seen.append(c["model"])
    return seen


def _title(results: dict, model: str) -> str:
    m = results.get("models", {}).get(model, {})
    if not m:
        return model
    return f"{model}: {m['tables']} x {m['rows_per_table'] // 1000}k x {'/'.join(map(str, m['dims']))}, {m['ids_per_bag']} ids/bag"


def throughput_vs_batch(results: dict, path: Path) -> None:
    plt = pyplot()
    models = _models(results)
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        cells = sorted((c for c in results["workloads"] if c["model"] == model and c["mode"] == "closed"),
                       key=lambda c: c["batch"])
        names: list[str] = []
        for c in cells:
            names += [n for n in c["systems"] if n not in names]
        for n in names:
            pts = [(c["batch"], c["systems"][n]["samples_per_s"]) for c in cells if n in c["systems"]]
            xs, ys = zip(*pts)
            core = n in _CORE
            ax.plot(xs, ys, marker="o" if core else "x", linestyle="-" if core else "none", label=n,
                    color=_color(n), markersize=5 if core else 7)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({c["batch"] for c in cells}), [str(c) for c in sorted({c["batch"] for c in cells})])
        ax.set_yscale("log")
        ax.set_xlabel("batch size (samples per request)")
        ax.set_ylabel("samples/s (closed loop)")
        ax.set_title(_title(results, model), fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle("Maximum throughput against batch size", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def latency_cdfs(results: dict, path: Path) -> None:
    plt = pyplot()
    models = _models(results)
    loads = []   # (relative to, level), one row of panels each
    for c in results["workloads"]:
        key = (c.get("load_relative_to", "slowest"), c.get("load_level"))
        if c["mode"] == "open" and key not in loads:
            loads.append(key)
    if not loads:
        return
    loads.sort(key=lambda k: (k[0] != "slowest", k[1] or 0))
    fig, axes = plt.subplots(len(loads), len(models), figsize=(4.6 * len(models), 3.4 * len(loads)),
                             squeeze=False)
    for i, (rel, level) in enumerate(loads):
        for j, model in enumerate(models):
            ax = axes[i][j]
            cell = next((c for c in results["workloads"] if c["model"] == model and c["mode"] == "open"
                         and (c.get("load_relative_to", "slowest"), c.get("load_level")) == (rel, level)), None)
            if cell is None:
                ax.set_visible(False)
                continue
            for n, r in cell["systems"].items():
                cdf = r.get("latency_cdf_ms") or []
                if not cdf:
                    continue
                ax.plot(cdf, [q / 100 for q in range(len(cdf))], color=_color(n),
                        label=n + (" (saturated)" if r.get("saturated") else ""),
                        linestyle="-" if n in _CORE else "--")
            ax.set_xscale("log")
            ax.set_xlabel("latency (ms, from scheduled arrival)")
            ax.set_ylabel("fraction of requests")
            ax.axhline(0.99, color="grey", linewidth=0.6, linestyle=":")
            what = "the slowest system's" if rel == "slowest" else "flexemr's"
            ax.set_title(f"{model}, batch {cell['batch']}, Poisson {cell['offered_samples_per_s']:,.0f} samples/s\n"
                         f"({int(round((level or 0) * 100))}% of {what} maximum)", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Latency CDFs, open loop: the same Poisson arrivals for every system", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def efficiency(results: dict, path: Path) -> None:
    """Wire bytes and CPU per sample at each model's open-loop batch size (closed loop)."""
    plt = pyplot()
    import numpy as np

    models = _models(results)
    rows = []
    for model in models:
        opens = [c for c in results["workloads"] if c["model"] == model and c["mode"] == "open"]
        b = opens[0]["batch"] if opens else None
        cell = next((c for c in results["workloads"] if c["model"] == model and c["mode"] == "closed"
                     and (b is None or c["batch"] == b)), None)
        if cell:
            rows.append((model, cell))
    if not rows:
        return
    names: list[str] = []
    for _, c in rows:
        names += [n for n in c["systems"] if n not in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    x = np.arange(len(rows))
    w = 0.8 / len(names)
    for k, n in enumerate(names):
        wire = [c["systems"].get(n, {}).get("wire_bytes_per_sample", np.nan) for _, c in rows]
        cpu = [c["systems"].get(n, {}).get("cpu_s_per_sample", np.nan) * 1e6 for _, c in rows]
        axes[0].bar(x + (k - (len(names) - 1) / 2) * w, [max(v, 1) if v == v else v for v in wire], w, label=n,
                    color=_color(n))
        axes[1].bar(x + (k - (len(names) - 1) / 2) * w, cpu, w, label=n, color=_color(n))
    labels = [f"{m}\nbatch {c['batch']}" for m, c in rows]
    axes[0].set_yscale("log")
    axes[0].set_ylabel("bytes / sample (log)")
    axes[0].set_title("wire bytes, ranker <-> embedding store (in-process: none, drawn at 1)", fontsize=9)
    axes[1].set_ylabel("CPU us / sample")
    axes[1].set_title("CPU time of every process of the system", fontsize=9)
    for ax in axes:
        ax.set_xticks(x, labels, fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle("Cost per sample, closed loop", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def ablations(results: dict, path: Path) -> bool:
    plt = pyplot()
    import numpy as np

    cells = [c for c in results["workloads"] if c.get("ablation")]
    if not cells:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    metrics = (("samples_per_s", "samples/s vs flexemr"), ("p99_ms", "p99 latency vs flexemr"),
               ("wire_bytes_per_sample", "wire bytes/sample vs flexemr"))
    names: list[str] = []
    for c in cells:
        names += [n for n in c["systems"] if n.startswith("flexemr-") and n not in names]
    x = np.arange(len(names))
    w = 0.8 / len(cells)
    for ax, (key, label) in zip(axes, metrics):
        for k, c in enumerate(cells):
            base = c["systems"]["flexemr"].get(key) or np.nan
            vals = [c["systems"].get(n, {}).get(key, np.nan) / base for n in names]
            ax.bar(x + (k - (len(cells) - 1) / 2) * w, vals, w, label=f"{c['model']} batch {c['batch']}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [n.removeprefix("flexemr-") for n in names], rotation=30, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(True, axis="y", alpha=0.3)
        if key == "wire_bytes_per_sample":
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("Ablations: one knob changed against flexemr (closed loop; 1.0 = flexemr)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def mlperf(results: dict, path: Path) -> bool:
    m = results.get("mlperf")
    if not m or not m.get("server", {}).get("probes"):
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    probes = sorted(m["server"]["probes"], key=lambda p: p["target_qps"])
    ax.plot([p["target_qps"] for p in probes], [p.get("p99_ms", float("nan")) for p in probes], marker="o",
            label="p99 (LoadGen Server)")
    for p in probes:
        ax.annotate("pass" if p["pass"] else "fail", (p["target_qps"], p.get("p99_ms", 0)), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(m["server"]["bound_ms"], color="red", linestyle="--", label=f"bound {m['server']['bound_ms']:g} ms")
    ax.axvline(m["offline"]["qps"], color="grey", linestyle=":", label=f"Offline {m['offline']['qps']:,.1f} QPS")
    ax.set_yscale("log")
    ax.set_xlabel(f"target QPS (1 query = {m['batch']} samples)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(f"MLPerf LoadGen Server, {m['system']} on {m['workload']}", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def cpu_breakdown(profile: dict, path: Path) -> bool:
    """Stacked bars of a ``flexemr_bench.profile`` result: per kind, one bar per role, one colour per category.

    Returns False (nothing drawn) on a host without matplotlib.
    """
    plt = pyplot(required=False)
    if plt is None:
        return False
    runs = profile["runs"]
    labels = profile["categories"]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.2), squeeze=False)
    for ax, (kind, run) in zip(axes[0], runs.items()):
        roles = [r for r, d in run["roles"].items() if d["cpu_ms_per_1k_samples"] > 0]
        bottom = [0.0] * len(roles)
        for i, key in enumerate(labels):
            vals = [run["roles"][r]["ms_per_1k_samples"][key] for r in roles]
            ax.bar(range(len(roles)), vals, 0.6, bottom=bottom, label=labels[key], color=cmap(i % 10))
            bottom = [b + v for b, v in zip(bottom, vals)]
        # A role perf did not see still shows its measured CPU, as an outline.
        for x, r in enumerate(roles):
            if not run["roles"][r]["perf_cpu_s"]:
                ax.bar(x, run["roles"][r]["cpu_ms_per_1k_samples"], 0.6, fill=False, hatch="//")
        ax.set_xticks(range(len(roles)), [r.replace(" ", "\n", 1) for r in roles], fontsize=8)
        ax.set_ylabel("ms of CPU per 1,000 samples")
        ax.set_title(f"{profile['system']}, {kind}()", fontsize=10)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_plots(results: dict, out: Path) -> list[str]:
    """Draw every plot the results allow into ``out``; returns the file names written."""
    out = Path(out)
    written = []
    throughput_vs_batch(results, out / "throughput.png")
    written.append("throughput.png")
    if any(c["mode"] == "open" for c in results["workloads"]):
        latency_cdfs(results, out / "latency_cdf.png")
        written.append("latency_cdf.png")
    efficiency(results, out / "efficiency.png")
    written.append("efficiency.png")
    if ablations(results, out / "ablations.png"):
        written.append("ablations.png")
    if mlperf(results, out / "mlperf.png"):
        written.append("mlperf.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m flexemr_bench.plots DIR``: draw the PNGs of DIR/results.json again."""
    args = sys.argv[1:] if argv is None else argv
    usage = "usage: python -m flexemr_bench.plots DIR"
    if args in (["-h"], ["--help"]):
        print(f"{usage}\n\n{main.__doc__}")
        return 0
    if len(args) != 1:
        print(usage, file=sys.stderr)
        return 2
    out = Path(args[0])
    if not (out / "results.json").is_file():
        print(f"{out / 'results.json'}: no such file", file=sys.stderr)
        return 2
    print("\n".join(write_plots(json.loads((out / "results.json").read_text()), out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
