"""Ranker benchmark: ``flexemrd local`` against the monolithic layout, same front end, one run.

    python -m flexemr_bench.ranker --out bench-out/ranker [--rows-cap 250000] [--seconds 6] [--reps 3]
                                   [--shm-replies both|on|off]

Workload (the ranker issue's): batches of 2048 samples, 8 tables x 64 dims,
20 ids per bag, Zipf ids (s = 1.05) scattered over the rows by a permutation.

Systems, each started as real processes and stopped by pid:

    flexemr      flexemrd local --embedding-servers 2 --engines 2 (whole tables per server)
    monolithic   flexemrd local --embedding-servers 0: the same ranker (socket,
                 validation, batching, NN) pooling its own tables in-process:
                 the monolithic reference behind the same API
    kernel       MonolithicModel called directly in this process: no socket, no
                 batching, one caller; its tables gathered from huge-page
                 copies like the daemons' (flexemr.hugepages)
    kernel-4     the same with as many caller threads as the daemons get
                 clients (embedding_bag and the MLP release the GIL): the best
                 the same process can do on all cores
    kernel-4/t1  the same with one torch intra-op thread per call (concurrent
                 OpenMP teams stall each other; on 2 cores this is often faster)
    limit        the best of the three per phase: every ratio is against it

Answers reach the daemons' clients through their shared-memory reply region
(``InferenceClient(shm_replies=True)``, the default); with ``--shm-replies
both`` (the default) the closed loops also run ``monolithic/frames`` and
``flexemr/frames``, the same daemons answering by frames over the socket
(``shm_replies=False``), in the same rotation, so the two are compared in one
run (CPU per 1,000 samples and samples/s).

Phases: closed loop (C clients, each sends its next request when answered:
maximum samples/s) for lookup() and predict(); then open loop (Poisson
arrivals, latency from the scheduled arrival, 16 clients so that client
concurrency never caps the offered rate) at the same offered loads for both
systems, 30% and 60% of the monolithic layout's predict maximum, for p50/p99.
Writes ``ranker.json`` and ``ranker.png``; prints a table with ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from flexemr.client import InferenceClient
from flexemr.loadgen import LoadResult, run_load
from flexemr_bench.daemon import ReadyProcess, tree_cpu_by_prefix

BATCH = 2048
OPEN_LOOP_LEVELS = (0.3, 0.6)   # offered load, as a fraction of the monolithic layout's predict maximum
OPEN_LOOP_CLIENTS = 16


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_model(out: Path, rows_cap: int) -> Path:
    from flexemr.model.presets import init_model_dir

    model = out / f"bench8-{rows_cap}"
    if (model / "model.toml").exists() and (model / "dense.pt").exists():
        return model
    _log(f"writing model bench8 capped at {rows_cap} rows/table to {model} ...")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 1 or done == total:
            last[0] = time.monotonic()
            _log(f"  {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB")

    init_model_dir(model, "bench8", seed=3, rows_cap=rows_cap, progress=progress)
    return model


class Daemon(ReadyProcess):
    """A ``flexemrd local`` process tree (log ``SOCK.log``); stopped with SIGTERM to its supervisor."""

    def __init__(self, model: Path, servers: int, engines: int, sock: str, instance: str, extra: list[str]) -> None:
        self.instance = instance
        cmd = [sys.executable, "-m", "flexemrd", "local", "--model", str(model), "--embedding-servers", str(servers),
               "--engines", str(engines), "--socket", sock, "--instance", instance, "--log-level", "warning", *extra]
        super().__init__(cmd, f"{sock}.log", sock, sock_timeout_s=60)


def _kernel_closed_loop(model: Path, requests: list, seconds: float, kind: str) -> LoadResult:
    from flexemr.monolithic import MonolithicModel

    m = MonolithicModel(model, resident=True)
    call = m.predict if kind == "predict" else (lambda d, s: m.lookup(s))
    for r in requests:  # warm: map the tables' pages and torch's kernels before the clock starts
        call(*r)
    lat = []
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        d, s = requests[n % len(requests)]
        t = time.perf_counter()
        call(d, s)
        lat.append(time.perf_counter() - t)
        n += 1
    return LoadResult(n, n * BATCH, 0, time.perf_counter() - t0, np.asarray(lat))


def _kernel_concurrent(model: Path, requests: list, seconds: float, kind: str, callers: int,
                       torch_threads: int | None = None, on_start: Callable[[], None] | None = None) -> LoadResult:
    """The in-process kernel driven by ``callers`` threads at once: what one process gets out of all cores.

    ``torch_threads`` sets torch's intra-op threads for the run (None: torch's default, all cores).  With
    several callers one thread each is often faster (the OpenMP teams of concurrent calls stall each
    other), so the limit is taken over both settings.  ``on_start`` is called once warm, as the clock
    starts (flexemr_bench.profile records from then on).
    """
    import threading

    import torch

    from flexemr.monolithic import MonolithicModel

    before = torch.get_num_threads()
    if torch_threads is not None:
        torch.set_num_threads(torch_threads)
    try:
        m = MonolithicModel(model, resident=True)
        call = m.predict if kind == "predict" else (lambda d, s: m.lookup(s))
        for r in requests:
            call(*r)
        lats: list[list[float]] = [[] for _ in range(callers)]
        if on_start is not None:
            on_start()
        t0 = time.perf_counter()
        stop = t0 + seconds

        def loop(i: int) -> None:
            k = i
            while time.perf_counter() < stop:
                d, s = requests[k % len(requests)]
                t = time.perf_counter()
                call(d, s)
                lats[i].append(time.perf_counter() - t)
                k += callers

        threads = [threading.Thread(target=loop, args=(i,)) for i in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        n = sum(len(x) for x in lats)
        return LoadResult(n, n * BATCH, 0, time.perf_counter() - t0, np.concatenate([np.asarray(x) for x in lats]))
    finally:
        torch.set_num_threads(before)


ROLES = (("flexemr-emb", "embedding servers"), ("flexemr-eng", "engines"), ("flexemr-inf", "ranker"))
ROLE_COLUMNS = ("embedding servers", "engines", "ranker", "supervisor", "clients")


def cpu_by_role(pid: int) -> dict[str, float]:
    """user+system CPU seconds of a ``flexemrd local`` tree, summed per role (process titles name them)."""
    return tree_cpu_by_prefix(pid, ROLES, "supervisor")


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)   # the load generator's client processes, once joined
    return r.ru_utime + r.ru_stime


def socket_caller(path: str, kind: str, shm_replies: bool = True):
    """A factory (run in each client process) of a predict or lookup call; answers by reply region or frame."""

    def make():
        client = InferenceClient(path, shm_replies=shm_replies)
        if shm_replies and not client.shm_active:
            raise RuntimeError(f"the ranker on {path} took no reply region: {client.shm_replies_error}")
        if kind == "predict":
            return client.predict
        return lambda dense, sparse: client.lookup(sparse)

    return make


def measure(daemon: Daemon, requests: list, kind: str, clients: int, seconds: float, rate: float = 0.0,
             shm_replies: bool = True) -> dict:
    """One closed- or open-loop run, with where the CPU went: ms of CPU per 1,000 samples, per role and
    for the clients (the in-process limit pays neither the clients nor the copies between processes)."""
    cpu0, c0 = cpu_by_role(daemon.proc.pid), _children_cpu()
    res = run_load(socket_caller(daemon.sock, kind, shm_replies), requests, clients, seconds,
                   rate / clients if rate else 0.0)
    cpu1, c1 = cpu_by_role(daemon.proc.pid), _children_cpu()
    out = res.summary()
    per_k = 1e6 / max(1, res.samples)   # seconds -> ms per 1,000 samples
    split = {role: round((cpu1[role] - cpu0[role]) * per_k, 3) for role in cpu0}
    split["clients"] = round((c1 - c0) * per_k, 3)
    out["cpu_ms_per_1k_samples"] = split
    out["daemon_cpu_s_per_1k_samples"] = round(sum(v for k, v in split.items() if k != "clients") / 1e3, 4)
    return out


def _median_run(runs: list[dict]) -> dict:
    """The repetition with the median samples/s (its latencies with it), plus every repetition's rate."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    out = dict(ordered[len(ordered) // 2])
    out["samples_per_s_runs"] = [r["samples_per_s"] for r in runs]
    out["p99_ms_runs"] = [r["p99_ms"] for r in runs]
    return out


REPLY_MODES = {"both": (True, False), "on": (True,), "off": (False,)}
# The daemons compared: name -> (embedding servers, engines, extra ``flexemrd local`` arguments).
SYSTEMS: dict[str, tuple[int, int, list[str]]] = {"monolithic": (0, 2, []), "flexemr": (2, 2, ["--routing", "tables"])}


def bench_requests(spec, nreq: int, zipf: float) -> list:
    """The benchmark's ``nreq`` requests of BATCH samples (20 ids per bag, Zipf ids, fixed seed)."""
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=zipf, seed=11, empty_bag_prob=0.0, length_dist="fixed")
    _log(f"generating {nreq} requests of {BATCH} samples ...")
    return [gen.batch(BATCH) for _ in range(nreq)]


def run(out: Path, rows_cap: int, seconds: float, clients: int, nreq: int, zipf: float, reps: int = 3,
        shm_replies: str = "both") -> dict:
    from flexemr.model.spec import load_spec

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    requests = bench_requests(spec, nreq, zipf)
    results: dict = {"workload": {"batch": BATCH, "tables": len(spec.tables), "dim": spec.tables[0].dim,
                                  "rows_per_table": spec.tables[0].rows, "ids_per_bag": 20, "zipf": zipf},
                     "clients": clients, "seconds": seconds, "repetitions": reps, "shm_replies": shm_replies,
                     "systems": {}}
    sysres = results["systems"]
    configs = SYSTEMS
    # Both daemons run for the whole benchmark (an idle daemon sleeps on
    # semaphores and sockets) and the systems take turns, repetition after
    # repetition, so a noisy neighbour or drift hits both alike; medians are kept.
    daemons = {}
    try:
        for name, (servers, engines, extra) in configs.items():
            _log(f"starting {name} ...")
            daemons[name] = Daemon(model, servers, engines, f"/tmp/flexemr-bench-{name}-{os.getpid()}.sock",
                                   f"bench{name[:4]}{os.getpid() % 10000}", extra)
        runs: dict = {}
        for rep in range(reps):
            for kind in ("lookup", "predict"):
                # The in-process baselines take their turn in the same rotation.
                _log(f"  [{rep + 1}/{reps}] kernel {kind}: one caller, {clients} callers")
                runs.setdefault(("kernel", kind), []).append(
                    _kernel_closed_loop(model, requests, seconds, kind).summary())
                runs.setdefault(("kernel-4", kind), []).append(
                    _kernel_concurrent(model, requests, seconds, kind, clients).summary())
                runs.setdefault(("kernel-4/t1", kind), []).append(
                    _kernel_concurrent(model, requests, seconds, kind, clients, torch_threads=1).summary())
                for name, d in daemons.items():
                    for shm in REPLY_MODES[shm_replies]:
                        variant = _variant(name, shm, shm_replies)
                        _log(f"  [{rep + 1}/{reps}] {variant} {kind}: closed loop, {clients} clients, {seconds:g} s")
                        runs.setdefault((variant, kind), []).append(
                            measure(d, requests, kind, clients, seconds, shm_replies=shm))
        for (name, kind), rs in runs.items():
            sysres.setdefault(name, {})[kind] = _median_run(rs)
        baselines = ("kernel", "kernel-4", "kernel-4/t1")
        sysres["limit"] = {k: dict(max(((n, sysres[n][k]) for n in baselines), key=lambda nr: nr[1]["samples_per_s"])[1],
                                   system=max(baselines, key=lambda n: sysres[n][k]["samples_per_s"]))
                           for k in ("lookup", "predict")}
        mono_max = sysres["monolithic"]["predict"]["requests_per_s"]
        results["open_loop_levels"] = OPEN_LOOP_LEVELS
        results["open_loop_requests_per_s"] = [round(f * mono_max, 2) for f in OPEN_LOOP_LEVELS]
        runs = {}
        for rep in range(reps):
            for level in OPEN_LOOP_LEVELS:
                offered = level * mono_max
                for name, d in daemons.items():
                    shm = shm_replies != "off"
                    _log(f"  [{rep + 1}/{reps}] {name} predict: open loop at {offered:.1f} req/s "
                         f"({offered * BATCH:,.0f} samples/s)")
                    runs.setdefault((name, level), []).append(
                        measure(d, requests, "predict", OPEN_LOOP_CLIENTS, seconds, rate=offered, shm_replies=shm))
        for (name, level), rs in runs.items():
            sysres[name][f"predict_open_loop_{int(level * 100)}"] = _median_run(rs)
    finally:
        for d in daemons.values():
            d.stop()
    f, m = sysres["flexemr"], sysres["monolithic"]
    results["ratios"] = {
        "lookup_flexemr_over_monolithic": round(f["lookup"]["samples_per_s"] / m["lookup"]["samples_per_s"], 3),
        "predict_flexemr_over_monolithic": round(f["predict"]["samples_per_s"] / m["predict"]["samples_per_s"], 3),
        **{f"open_loop_{int(lv * 100)}pct_p99_flexemr_over_monolithic":
           round(f[f"predict_open_loop_{int(lv * 100)}"]["p99_ms"] / m[f"predict_open_loop_{int(lv * 100)}"]["p99_ms"], 3)
           for lv in OPEN_LOOP_LEVELS},
        **{f"{k}_{n}_over_limit": round(sysres[n][k]["samples_per_s"] / sysres["limit"][k]["samples_per_s"], 3)
           for n in ("monolithic", "flexemr", "kernel") for k in ("lookup", "predict")},
    }
    if shm_replies == "both":
        results["ratios"].update({
            f"{k}_{n}_shm_over_frames": round(sysres[n][k]["samples_per_s"] / sysres[f"{n}/frames"][k]["samples_per_s"], 3)
            for n in ("monolithic", "flexemr") for k in ("lookup", "predict")})
        results["ratios"].update({
            f"{k}_{n}_cpu_shm_over_frames": round(sum(sysres[n][k]["cpu_ms_per_1k_samples"].values())
                                                  / sum(sysres[f"{n}/frames"][k]["cpu_ms_per_1k_samples"].values()), 3)
            for n in ("monolithic", "flexemr") for k in ("lookup", "predict")})
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    (out / "ranker.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "ranker.png")
    return results


def _variant(name: str, shm: bool, mode: str) -> str:
    """The system's name in the results: the default (reply region, or whatever ``--shm-replies`` chose) keeps
    the daemon's name; with both, the frames variant is ``<name>/frames``."""
    return f"{name}/frames" if mode == "both" and not shm else name


def _plot(results: dict, path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None:
        return
    s = results["systems"]
    names = ["kernel", "kernel-4", "kernel-4/t1", "monolithic", "flexemr"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(2)
    for i, n in enumerate(names):
        vals = [s[n][k]["samples_per_s"] / 1e3 for k in ("lookup", "predict")]
        axes[0].bar(x + (i - 2) * 0.16, vals, 0.16, label=n)
    axes[0].set_xticks(x, ["lookup()", "predict()"])
    axes[0].set_ylabel("k samples/s (closed loop)")
    axes[0].set_title(f"batch {BATCH}, 8 tables x 64, 20 ids/bag")
    axes[0].legend()
    labels, p50, p99 = [], [], []
    for lv, rate in zip(results["open_loop_levels"], results["open_loop_requests_per_s"]):
        for n in ("monolithic", "flexemr"):
            k = f"predict_open_loop_{int(lv * 100)}"
            labels.append(f"{n}\n{rate:g} req/s")
            p50.append(s[n][k]["p50_ms"])
            p99.append(s[n][k]["p99_ms"])
    xs = np.arange(len(labels))
    axes[1].bar(xs - 0.2, p50, 0.4, label="p50")
    axes[1].bar(xs + 0.2, p99, 0.4, label="p99")
    axes[1].set_xticks(xs, labels, fontsize=8)
    axes[1].set_ylabel("ms")
    axes[1].set_title("predict() latency, open loop, equal offered load")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.ranker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/ranker"))
    ap.add_argument("--rows-cap", type=int, default=250_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--reps", type=int, default=3, help="repetitions per measurement (median kept)")
    ap.add_argument("--shm-replies", choices=sorted(REPLY_MODES), default="both",
                    help="answers to the daemons' clients through their shared reply region (on), by frames (off), "
                         "or both in the same rotation (the frames runs appear as <system>/frames)")
    a = ap.parse_args(argv)
    r = run(a.out, a.rows_cap, a.seconds, a.clients, a.requests, a.zipf, a.reps, a.shm_replies)
    s = r["systems"]
    levels = [int(lv * 100) for lv in r["open_loop_levels"]]
    head = "".join(f" {f'p50/p99 ms @{lv}%':>18}" for lv in levels)
    print(f"{'system':12} {'lookup samples/s':>17} {'predict samples/s':>18}{head}")
    daemons = [n for n in ("monolithic", "monolithic/frames", "flexemr", "flexemr/frames") if n in s]
    for n in ("kernel", "kernel-4", "kernel-4/t1", "limit", *daemons):
        cells = ""
        for lv in levels:
            ol = s[n].get(f"predict_open_loop_{lv}")
            cell = "-" if ol is None else "{:.1f} / {:.1f}".format(ol["p50_ms"], ol["p99_ms"])
            cells += f" {cell:>18}"
        print(f"{n:12} {s[n]['lookup']['samples_per_s']:>17,.0f} {s[n]['predict']['samples_per_s']:>18,.0f}{cells}")
    print(f"\nCPU ms per 1,000 samples (closed loop): {', '.join(ROLE_COLUMNS)}")
    for n in daemons:
        for k in ("lookup", "predict"):
            split = s[n][k]["cpu_ms_per_1k_samples"]
            print(f"  {n:17} {k:8} " + "  ".join(f"{split[c]:6.2f}" for c in ROLE_COLUMNS)
                  + f"   total {sum(split.values()):6.2f}")
    print(json.dumps(r["ratios"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
