"""Cache benchmark (FlexEMR 3.1.1, the paper's Figure 7), one run:

    python -m flexemr_bench.cache --out bench-out/cache [--budget 192MiB] [--rows-cap 200000]

The ranker's memory budget is shared by the NN and the cache.  For fixed
caches of increasing size, the largest batch that still fits next to the
cache (from the memory model, the same one the adaptive policy uses) and the
throughput and hit rate at that batch; then the adaptive policy on the same
traffic under a load that rises to the largest batch and falls back.

Each system runs the ranker's request path in one process on the real
library: RowCache split (hits pooled locally), misses pooled with torch's
embedding_bag over the tables (standing in for the embedding servers; what a
miss costs on the wire is not what this benchmark is about), exact global
pooling, the DLRM forward, and cache fills after every batch (the daemon
sends them as FETCH frames off the request path).  Throughput counts the
whole path.  Writes ``cache.json`` and ``cache.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

MIB = 1 << 20


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Path_:
    """The ranker's request path over local tables, with a RowCache in front."""

    def __init__(self, model: Path, capacity: int, admission: str) -> None:
        import torch

        from flexemr.cache.rowcache import RowCache
        from flexemr.model.dense import load_dense
        from flexemr.model.spec import load_spec
        from flexemr.model.tables import open_tables
        from flexemr.pooling import as_weight

        self.torch = torch
        self.spec = load_spec(model)
        self.model = load_dense(model, self.spec)
        tables = open_tables(model, self.spec)
        self.weights = [as_weight(tables[t.name]) for t in self.spec.tables]
        self.cache = RowCache(self.spec.tables, capacity, admission=admission)

    def run_batch(self, dense: np.ndarray, sparse: dict) -> np.ndarray:
        import torch.nn.functional as F

        from flexemr_bench.daemon import Accumulator

        torch = self.torch
        pooled = []
        for i, t in enumerate(self.spec.tables):
            v, ln = sparse[t.name]
            acc = Accumulator(t.pooling, len(ln), t.dim, ln)
            sp = self.cache.split(i, v, ln, check=False)
            if sp.n_hits:
                acc.add(sp.hit_pooled().numpy(), sp.hit_counts)
            off = np.zeros(len(ln) + 1, dtype=np.int64)
            np.cumsum(sp.miss_lengths, out=off[1:])
            mode = "max" if t.pooling.name == "MAX" else "sum"
            miss = F.embedding_bag(torch.from_numpy(sp.miss_values), self.weights[i], torch.from_numpy(off),
                                   mode=mode, include_last_offset=True).numpy()
            acc.add(miss, sp.miss_lengths)
            pooled.append(torch.from_numpy(acc.result()))
        with torch.inference_mode():
            out = self.model(torch.from_numpy(dense), pooled).numpy()
        self.fill()
        return out

    def fill(self) -> None:
        if self.cache.capacity_bytes == 0:
            return
        for t, rows in self.cache.candidates_for_fill(8192).items():
            if len(rows):
                self.cache.fill(t, rows, self.weights[t].numpy()[rows])


def _trace(spec, batches: list[int], seed: int, zipf: float, drift_every: int):
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=zipf, seed=seed, drift_every=drift_every,
                           drift_fraction=0.05)
    for b in batches:
        yield gen.batch(b)


def _run(path: Path_, batches: list[int], seed: int, zipf: float, warm: int) -> dict:
    spec = path.spec
    samples = 0
    t_total = 0.0
    for i, (dense, sparse) in enumerate(_trace(spec, batches, seed, zipf, drift_every=20)):
        if i == warm:
            path.cache.reset_stats()
        t0 = time.perf_counter()
        path.run_batch(dense, sparse)
        if i >= warm:
            t_total += time.perf_counter() - t0
            samples += len(dense)
    st = path.cache.stats()
    return {"samples_per_s": round(samples / t_total, 1) if t_total else 0.0, "hit_rate": round(st["hit_rate"], 4),
            "capacity_bytes": st["capacity_bytes"], "used_bytes": st["used_bytes"]}


def run(out: Path, budget: int, rows_cap: int, zipf: float, samples_per_point: int, admission: str) -> dict:
    from flexemr_bench.ranker import ensure_model
    from flexemr.cache.memory_model import estimate_nn_peak_bytes, max_batch_that_fits, weights_bytes
    from flexemr.cache.policy import AdaptivePolicy, CachePolicy, LoadMonitor
    from flexemr.model.spec import load_spec

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    margin = 8 * MIB
    limit = 1 << 15
    no_cache_batch = max_batch_that_fits(budget, spec, 0, margin, limit=limit)
    res: dict = {"budget_bytes": budget, "margin_bytes": margin, "weights_bytes": weights_bytes(spec),
                 "model": {"tables": len(spec.tables), "rows": spec.tables[0].rows, "dim": spec.tables[0].dim},
                 "zipf": zipf, "admission": admission, "no_cache_largest_batch": no_cache_batch, "fixed": []}
    fractions = [0.0, 0.1, 0.25, 0.4, 0.55, 0.7]
    for f in fractions:
        cap = int(f * budget)
        b = max_batch_that_fits(budget, spec, cap, margin, limit=limit)
        if b == 0:
            continue
        n = max(6, samples_per_point // b)
        _log(f"fixed cache {cap / MIB:.0f} MiB: largest batch {b}, {n} batches ...")
        r = _run(Path_(model, cap, admission), [b] * n, seed=1, zipf=zipf, warm=max(2, n // 3))
        r.update(cache_bytes=cap, largest_batch=b, nn_peak_bytes=estimate_nn_peak_bytes(spec, b))
        res["fixed"].append(r)

    # Adaptive: the load rises to the no-cache batch and falls back; the policy
    # resizes between batches. Every batch must fit: NN peak + cache <= budget.
    phases = [512, 2048, no_cache_batch, 2048, 512]
    phase_batches = [[b] * max(6, samples_per_point // b) for b in phases]
    path = Path_(model, 0, admission)
    monitor = LoadMonitor(window_s=0.05, windows=3)
    adaptive = AdaptivePolicy(budget, spec, margin_bytes=margin, max_batch=no_cache_batch)
    policy = CachePolicy(path.cache, mode="adaptive", adaptive=adaptive)
    res["adaptive"] = []
    gen_seed = 1
    for b, batches in zip(phases, phase_batches):
        _log(f"adaptive: load phase at batch {b}, {len(batches)} batches ...")
        path.cache.reset_stats()
        samples, t_total, fit_all, caps = 0, 0.0, True, []
        for i, (dense, sparse) in enumerate(_trace(spec, batches, gen_seed, zipf, drift_every=20)):
            monitor.observe(len(dense), 0)
            policy.update(monitor)
            cap = path.cache.capacity_bytes
            caps.append(cap)
            fit_all &= estimate_nn_peak_bytes(spec, len(dense)) + cap + margin <= budget
            t0 = time.perf_counter()
            path.run_batch(dense, sparse)
            if i >= 1:
                t_total += time.perf_counter() - t0
                samples += len(dense)
        gen_seed += 1
        st = path.cache.stats()
        res["adaptive"].append({"batch": b, "samples_per_s": round(samples / t_total, 1) if t_total else 0.0,
                                "hit_rate": round(st["hit_rate"], 4), "capacity_min_bytes": min(caps),
                                "capacity_max_bytes": max(caps), "every_batch_fit": bool(fit_all)})
    best_fixed = max(r["hit_rate"] for r in res["fixed"])
    light = [p for p in res["adaptive"] if p["batch"] <= 2048]
    res["summary"] = {
        "adaptive_largest_batch": max(p["batch"] for p in res["adaptive"] if p["every_batch_fit"]),
        "adaptive_largest_batch_over_no_cache": round(
            max(p["batch"] for p in res["adaptive"] if p["every_batch_fit"]) / no_cache_batch, 3),
        "best_fixed_hit_rate": best_fixed,
        "adaptive_hit_rate_at_light_load": max(p["hit_rate"] for p in light),
        "hit_rate_gap_pp": round(100 * (best_fixed - max(p["hit_rate"] for p in light)), 2),
    }
    (out / "cache.json").write_text(json.dumps(res, indent=2))
    _plot(res, out / "cache.png")
    return res


def _plot(res: dict, path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None:
        return
    fx = res["fixed"]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    caps = [r["cache_bytes"] / MIB for r in fx]
    ax[0].plot(caps, [r["largest_batch"] for r in fx], "o-", label="largest batch that fits")
    ax[0].set_xlabel("fixed cache (MiB)")
    ax[0].set_ylabel("largest batch")
    a2 = ax[0].twinx()
    a2.plot(caps, [r["samples_per_s"] / 1e3 for r in fx], "s--", color="tab:red", label="k samples/s")
    a2.plot(caps, [100 * r["hit_rate"] for r in fx], "^:", color="tab:green", label="hit rate %")
    ax[0].set_title(f"fixed caches, budget {res['budget_bytes'] / MIB:.0f} MiB (Figure 7)")
    h1, l1 = ax[0].get_legend_handles_labels()
    h2, l2 = a2.get_legend_handles_labels()
    ax[0].legend(h1 + h2, l1 + l2, fontsize=8, loc="upper right")
    ad = res["adaptive"]
    x = np.arange(len(ad))
    ax[1].bar(x - 0.2, [p["capacity_max_bytes"] / MIB for p in ad], 0.4, label="cache MiB (max in phase)")
    ax[1].bar(x + 0.2, [100 * p["hit_rate"] for p in ad], 0.4, label="hit rate %")
    ax[1].set_xticks(x, [f"batch {p['batch']}" for p in ad])
    ax[1].set_title("adaptive: load rises and falls")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    from flexemr.config import parse_size

    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.cache", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/cache"))
    ap.add_argument("--budget", default="192MiB")
    ap.add_argument("--rows-cap", type=int, default=200_000)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--samples", type=int, default=60_000, help="samples per measured point")
    ap.add_argument("--admission", choices=["lru", "tinylfu"], default="tinylfu")
    a = ap.parse_args(argv)
    r = run(a.out, parse_size(a.budget), a.rows_cap, a.zipf, a.samples, a.admission)
    print(f"{'cache MiB':>10} {'largest batch':>14} {'samples/s':>10} {'hit rate':>9}")
    for f in r["fixed"]:
        print(f"{f['cache_bytes'] / MIB:>10.0f} {f['largest_batch']:>14} {f['samples_per_s']:>10,.0f} {f['hit_rate']:>9.1%}")
    print("adaptive phases:")
    for p in r["adaptive"]:
        print(f"  batch {p['batch']:>6}: cache {p['capacity_min_bytes'] / MIB:.0f}-{p['capacity_max_bytes'] / MIB:.0f} MiB, "
              f"hit rate {p['hit_rate']:.1%}, {p['samples_per_s']:,.0f} samples/s, every batch fit: {p['every_batch_fit']}")
    print(json.dumps(r["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
