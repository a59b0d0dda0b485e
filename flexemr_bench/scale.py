"""Scale-out: throughput against embedding hosts and rankers, on a real namespace cluster (issue 14).

    python -m flexemr_bench.scale --out DIR [--seconds 9] [--rounds 6] [--host-quota 0.2] [--ranker-quota 0.1]
    emrctl bench --suite scale --out DIR

Needs root (it runs ``emrctl cluster up``).  One run measures, side by side:

* 1, 2 and 4 embedding hosts, each under the same CPU quota, with one
  ranker without a quota (so that it is not what limits);
* 1 and 2 rankers, each under a small quota (a small NN machine), sharing 4
  embedding hosts, so that one ranker is what limits and the hosts have
  headroom for a second.

The workload makes pooling dominate: many tables and large bags (default 16
tables x 128 dims, 96 ids per bag, 256 samples per request), so an
embedding host does 128 float reads and adds per id where the ranker only
splits and forwards the id.  Placement is ``tables`` (whole tables per
host): each host answers with partials of its own tables only, so the
ranker's work per request stays the same as hosts are added.  With ``rows``
every host returns a partial for every bag and table, and the ranker's
receive-and-add work grows with the number of hosts (measured: 8.5 -> 15.6
ms of ranker CPU per request from 1 to 4 hosts).  Requests are made
once, before any cluster starts, and replayed by closed-loop clients (a few
per ranker) in this process; every cluster's rankers are checked against the
monolithic reference first.

The machine is shared (other tenants' load comes and goes), so the cells of
a series run side by side: the 1-, 2- and 4-host clusters are all up at once
(idle ones cost nothing) and measured in short rounds in rotating order; the
1- and 2-ranker cells are one cluster, driven through one ranker or both.

Per cell it measures samples/s and, per host, the CPU it used (psutil over
the host's processes) and its cgroup's ``cpu.stat`` (share of periods
throttled), and names what saturates: a host (or the ranker) is saturated
when it used >= 85% of its quota or was throttled in >= 50% of the periods.
Writes DIR/scale.json and DIR/scale.png (throughput against hosts with the
ideal line, and the 2-ranker point).

Budget on a 2-core machine: 4 hosts x 0.2 + 2 rankers x 0.1 = 1.0 core in
the ranker series; in the host series the one ranker needs ~0.35 core at 4
hosts; the rest is for the clients and the kernel.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger(__name__)

CLUSTER = "scale"
TARGETS = {"hosts_2x": 1.8, "hosts_4x": 3.2, "rankers_2x": 1.8}
SATURATED_USE = 0.85        # of the quota
SATURATED_THROTTLE = 0.5    # of the periods
ROUND_WARMUP_S = 0.4        # clients connect and fill the pipeline before a round counts


@dataclass(frozen=True)
class Workload:
    tables: int = 16
    rows: int = 25_000
    dim: int = 128
    ids_per_bag: int = 96
    batch: int = 256
    requests: int = 6            # distinct requests, replayed

    def spec(self):
        from flexemr.model.spec import ModelSpec, TableSpec
        from flexemr.types import Interaction, Pooling

        return ModelSpec(dense_features=13, bottom_mlp=(64, self.dim), top_mlp=(64, 1), interaction=Interaction.CAT,
                         tables=tuple(TableSpec(f"t{i}", self.rows, self.dim, Pooling.SUM)
                                      for i in range(self.tables)))


def make_model(out: Path, w: Workload) -> Path:
    """The workload's model directory (written once, reused while its shape matches)."""
    from flexemr.model.presets import Preset, init_model_dir

    model = out / f"model-{w.tables}x{w.rows}x{w.dim}"
    if not (model / "model.toml").exists():
        init_model_dir(model, Preset("scale", w.spec(), w.ids_per_bag, "scale-out benchmark"), seed=1)
    return model


def make_requests(model: Path, w: Workload) -> list[tuple[np.ndarray, dict]]:
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(load_spec(model), ids_per_bag=w.ids_per_bag, seed=3, length_dist="fixed",
                           empty_bag_prob=0.0)
    return [gen.batch(w.batch) for _ in range(w.requests)]


# ------------------------------------------------------------------------------------------ one cell


class Clients:
    """Closed-loop clients replaying the requests on the given ranker sockets; counts answered samples."""

    def __init__(self, sockets: list[str], requests: list, per_ranker: int, offset: int = 0) -> None:
        self.requests = requests
        self.stop = threading.Event()
        self.samples = 0
        self.errors: list[str] = []
        self._counting = False
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(s, offset + k), daemon=True)
                        for s in sockets for k in range(per_ranker)]

    def _run(self, socket: str, k: int) -> None:
        from flexemr.client import InferenceClient

        with InferenceClient(socket, timeout=120) as c:
            i = k
            while not self.stop.is_set():
                dense, sparse = self.requests[i % len(self.requests)]
                i += 1
                try:
                    c.predict(dense, sparse)
                except Exception as e:  # counted and reported: a failed request is a result too
                    with self._lock:
                        self.errors.append(str(e))
                    continue
                with self._lock:
                    if self._counting:
                        self.samples += len(dense)

    def measure(self, seconds: float, warmup: float, sample: Callable[[], dict]) -> tuple[int, dict, dict]:
        """Samples answered in ``seconds`` after ``warmup``; the CPU samples around that window."""
        for t in self.threads:
            t.start()
        time.sleep(warmup)
        before = sample()
        with self._lock:
            self._counting, self.samples = True, 0
        time.sleep(seconds)
        with self._lock:
            n, self._counting = self.samples, False
        after = sample()
        self.stop.set()
        for t in self.threads:
            t.join(120)
        return n, before, after


def _sample_hosts(state) -> dict[str, Any]:
    """Per host: CPU seconds of its processes (and of each by name), its cgroup's cpu.stat; the machine's busy time."""
    import psutil

    from emrctl.cluster import limits, procs

    t = psutil.cpu_times()
    me = psutil.Process().cpu_times()
    out: dict[str, Any] = {"t": time.monotonic(), "machine_busy_s": sum(t) - t.idle - getattr(t, "iowait", 0.0),
                           "clients_s": me.user + me.system}
    for h in state.hosts:
        cpu = 0.0
        by_name: dict[str, float] = {}
        for pid in procs.host_pids(h):
            try:
                p = psutil.Process(pid)
                ct = p.cpu_times()
                by_name[f"{p.name()}:{pid}"] = ct.user + ct.system
                cpu += ct.user + ct.system
            except psutil.Error:
                continue
        out[h.name] = {"cpu_s": cpu, "procs": by_name, **limits.cpu_stat(h.cgroup)}
    return out


@dataclass
class Cell:
    """One configuration, measured over several short rounds interleaved with the other cells."""

    series: str                   # "hosts" or "rankers"
    hosts: int
    rankers: int                  # rankers driven (the cluster may have more, idle)
    ranker_quota: float | None
    cluster: str
    samples: int = 0
    wall: float = 0.0
    errors: list = field(default_factory=list)
    sums: dict = field(default_factory=dict)     # accumulated deltas: (host, key) and machine keys

    def add(self, n: int, before: dict, after: dict, errors: list[str]) -> None:
        self.samples += n
        self.wall += after["t"] - before["t"]
        self.errors += errors
        for key in ("machine_busy_s", "clients_s"):
            self.sums[key] = self.sums.get(key, 0.0) + after[key] - before[key]
        for name, a in after.items():
            if not isinstance(a, dict):
                continue
            b = before.get(name, {})
            for k in ("cpu_s", "nr_periods", "nr_throttled", "throttled_time"):
                self.sums[(name, k)] = self.sums.get((name, k), 0) + a.get(k, 0) - b.get(k, 0)
            for proc, v in a["procs"].items():
                self.sums[(name, "proc", proc)] = self.sums.get((name, "proc", proc), 0.0) + v - b["procs"].get(proc, v)

    def result(self, state, host_quota: float, batch: int) -> dict[str, Any]:
        import os

        wall = self.wall or float("nan")
        per_host = {}
        for h in state.hosts:
            quota = host_quota if h.role == "embedding" else self.ranker_quota
            used = self.sums.get((h.name, "cpu_s"), 0.0) / wall
            periods = self.sums.get((h.name, "nr_periods"), 0)
            throttled = self.sums.get((h.name, "nr_throttled"), 0) / periods if periods else 0.0
            procs_used = {k[2]: round(v / wall, 3) for k, v in self.sums.items()
                          if isinstance(k, tuple) and k[0] == h.name and k[1] == "proc"}
            per_host[h.name] = {
                "role": h.role, "quota_cores": quota, "cpu_cores": round(used, 3), "processes": procs_used,
                "throttled_share": round(throttled, 3),
                "throttled_ms": round(self.sums.get((h.name, "throttled_time"), 0) / 1e6, 1),
                "saturated": _saturated(used, quota, throttled, procs_used),
            }
        machine = {"cores": os.cpu_count() or 1, "busy_cores": round(self.sums["machine_busy_s"] / wall, 3),
                   "clients_cores": round(self.sums["clients_s"] / wall, 3)}
        machine["others_cores"] = round(machine["busy_cores"] - machine["clients_cores"]
                                        - sum(h["cpu_cores"] for h in per_host.values()), 3)
        rate = self.samples / wall
        return {"series": self.series, "embedding_hosts": self.hosts, "rankers": self.rankers,
                "ranker_quota_cores": self.ranker_quota, "samples_per_s": round(rate, 1),
                "requests_per_s": round(rate / batch, 2), "measured_s": round(self.wall, 1),
                "errors": len(self.errors), "error_examples": self.errors[:3], "hosts": per_host,
                "machine": machine, "saturates": _what_saturates(per_host, machine)}


def _saturated(used: float, quota: float | None, throttled: float, processes: dict[str, float]) -> bool:
    if quota is None:
        # no quota: a process at one full core (its Python threads share one GIL)
        return any(v >= SATURATED_USE for v in processes.values())
    return used >= SATURATED_USE * quota or throttled >= SATURATED_THROTTLE


def _what_saturates(per_host: dict[str, dict], machine: dict[str, float]) -> str:
    emb = [n for n, h in per_host.items() if h["role"] == "embedding" and h["saturated"]]
    rk = [n for n, h in per_host.items() if h["role"] == "ranker" and h["saturated"]]
    parts = []
    if rk:
        parts.append(f"ranker CPU ({', '.join(rk)})")
    if emb:
        parts.append(f"embedding host CPU quota ({', '.join(emb)})")
    if machine["busy_cores"] >= 0.9 * machine["cores"]:
        parts.append(f"the machine: {machine['busy_cores']:.2f} of {machine['cores']} cores busy "
                     f"({machine['others_cores']:.2f} by other tenants, {machine['clients_cores']:.2f} by the clients)")
    return " and ".join(parts) or "nothing at quota (clients' round trips)"


# ------------------------------------------------------------------------------------------ the run


def _up_checked(name: str, model: Path, hosts: int, rankers: int, host_quota: float, ranker_quota: float | None,
                routing: str, requests: list, reference):
    """A cluster for the benchmark, each ranker's answer checked against the monolithic reference."""
    from emrctl.cluster import lifecycle
    from flexemr.client import InferenceClient

    state = lifecycle.up(name, str(model), hosts, rankers, cpu_quota=host_quota,
                         ranker_cpu_quota=ranker_quota if ranker_quota is not None else 0, engines=1,
                         routing=routing)
    dense, sparse = requests[0]
    want = reference.predict(dense, sparse)
    for h in state.of_role("ranker"):
        with InferenceClient(h.socket, timeout=120) as c:
            got = c.predict(dense, sparse)
        if not np.allclose(got, want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"cluster {name} answered wrongly on {h.socket}: max error "
                               f"{np.abs(got - want).max():g}")
    return state


def _interleave(cells: list[Cell], states: dict, requests: list, rounds: int, round_s: float, per_ranker: int,
                log: Callable[[str], None]) -> None:
    """Every cell gets ``rounds`` rounds of ``round_s``, in rotating order: other tenants' load falls on all alike.

    Round 0 is not counted: a fresh host's first lookups fault in its table pages.
    """
    for r in range(rounds + 1):
        order = cells[r % len(cells):] + cells[:r % len(cells)]
        for cell in order:
            state = states[cell.cluster]
            sockets = [h.socket for h in state.of_role("ranker")][:cell.rankers]
            clients = Clients(sockets, requests, per_ranker, offset=r)
            n, before, after = clients.measure(round_s, warmup=ROUND_WARMUP_S, sample=lambda: _sample_hosts(state))
            if r:
                cell.add(n, before, after, clients.errors)
        if not r:
            log("  warm-up round done")
            continue
        log(f"  round {r}/{rounds}: " + ", ".join(
            f"{c.hosts}h/{c.rankers}r {c.samples / (c.wall or 1):,.0f}" for c in cells))


# ------------------------------------------------------------------------------------------ the run


def run_scale(out: Path, seconds: float = 9.0, host_quota: float = 0.2, ranker_quota: float = 0.1,
              clients_per_ranker: int = 3, workload: Workload = Workload(), routing: str = "tables",
              rounds: int = 6, log: Callable[[str], None] = print) -> dict[str, Any]:
    from emrctl.cluster import lifecycle
    from flexemr.monolithic import MonolithicModel

    out.mkdir(parents=True, exist_ok=True)
    model = make_model(out, workload)
    requests = make_requests(model, workload)
    reference = MonolithicModel(model)
    ids = sum(len(v) for v, _l in requests[0][1].values())
    log(f"scale: {workload.tables} tables x {workload.dim} dims, {workload.ids_per_bag} ids/bag, "
        f"{workload.batch} samples/request ({ids:,} ids, {ids * 8 / 1e6:.1f} MB of ids per request), "
        f"{rounds} interleaved rounds of {seconds / rounds:.1f} s per cell")
    hosts_cells = [Cell("hosts", n, 1, None, f"{CLUSTER}-h{n}") for n in (1, 2, 4)]
    ranker_cells = [Cell("rankers", 4, n, ranker_quota, f"{CLUSTER}-r") for n in (1, 2)]
    results_cells = []
    # (cells, clusters to bring up: name -> (hosts, rankers, ranker quota))
    phases = [(hosts_cells, {c.cluster: (c.hosts, 1, None) for c in hosts_cells}),
              (ranker_cells, {f"{CLUSTER}-r": (4, 2, ranker_quota)})]
    for cells, clusters in phases:
        states = {}
        try:
            for name, (h, r, rq) in clusters.items():
                log(f"cluster {name}: {h} embedding hosts x {host_quota:g} core, {r} ranker(s) x "
                    f"{'no quota' if rq is None else f'{rq:g} core'}")
                states[name] = _up_checked(name, model, h, r, host_quota, rq, routing, requests, reference)
            _interleave(cells, states, requests, rounds, seconds / rounds, clients_per_ranker, log)
            results_cells += [c.result(states[c.cluster], host_quota, workload.batch) for c in cells]
        finally:
            for name in reversed(list(clusters)):
                if (lifecycle.cluster_dir(name) / "state.json").exists():
                    lifecycle.down(name)
    cells = results_cells
    for c in cells:
        log(f"  {c['embedding_hosts']} hosts, {c['rankers']} ranker(s): {c['samples_per_s']:,.0f} samples/s; "
            f"saturated: {c['saturates']}")
    h1, h2, h4, r1, r2 = cells
    nan = float("nan")
    verdicts = {}
    for key, num, den in (("hosts_2x", h2, h1), ("hosts_4x", h4, h1), ("rankers_2x", r2, r1)):
        ratio = num["samples_per_s"] / (den["samples_per_s"] or nan)
        ok = ratio >= TARGETS[key]
        verdicts[key] = {"ratio": round(ratio, 2), "target": TARGETS[key], "met": ok,
                         "note": "" if ok else f"saturates: {num['saturates']}"}
    results = {
        "workload": workload.__dict__, "seconds": seconds, "rounds": rounds, "host_quota_cores": host_quota,
        "ranker_quota_cores": ranker_quota, "clients_per_ranker": clients_per_ranker, "routing": routing,
        "cells": cells,
        "ratios": verdicts,
    }
    (out / "scale.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "scale.png")
    results["plot"] = str(out / "scale.png")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot()

    one = [c for c in results["cells"] if c["series"] == "hosts"]
    xs = [c["embedding_hosts"] for c in one]
    ys = [c["samples_per_s"] for c in one]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [ys[0] * x for x in xs], "--", color="grey", label="ideal (linear in hosts)")
    ax.plot(xs, ys, "o-", label="1 ranker")
    rk = [c for c in results["cells"] if c["series"] == "rankers"]
    if rk:
        q = results["ranker_quota_cores"]
        for c, marker in zip(rk, ("^", "s")):
            ax.plot([c["embedding_hosts"]], [c["samples_per_s"]], marker, color="C3" if c["rankers"] == 2 else "C2",
                    markersize=9, label=f"{c['rankers']} ranker(s) x {q:g} core")
    ax.set_xlabel(f"embedding hosts ({results['host_quota_cores']:g} core each)")
    ax.set_ylabel("samples/s")
    ax.set_xticks(xs)
    ax.set_title("flexemr scale-out (pooling-dominated workload)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_ratios(results: dict[str, Any]) -> str:
    lines = [f"{'cell':<34} {'samples/s':>10}  saturates"]
    for c in results["cells"]:
        rq = "no quota" if c["ranker_quota_cores"] is None else f"{c['ranker_quota_cores']:g} core"
        cell = f"{c['embedding_hosts']} hosts, {c['rankers']} ranker(s) ({rq})"
        lines.append(f"{cell:<34} {c['samples_per_s']:>10,.0f}  {c['saturates']}")
    for key, v in results["ratios"].items():
        lines.append(f"{key}: {v['ratio']:.2f}x (target {v['target']}x) {'met' if v['met'] else 'MISSED'}"
                     + (f" - {v['note']}" if v["note"] else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexemr_bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seconds", type=float, default=9.0, help="measured seconds per cell, over all its rounds")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per cell")
    p.add_argument("--host-quota", type=float, default=0.2, help="cores per embedding host")
    p.add_argument("--ranker-quota", type=float, default=0.1, help="cores per ranker in the ranker series")
    p.add_argument("--clients", type=int, default=3, help="closed-loop clients per ranker")
    p.add_argument("--routing", choices=("rows", "tables"), default="tables",
                   help="tables: each host returns partials of its own tables only (constant ranker work per "
                        "request); rows: every host returns a partial for every bag")
    p.add_argument("--ids-per-bag", type=int, default=Workload.ids_per_bag)
    p.add_argument("--batch", type=int, default=Workload.batch)
    p.add_argument("--tables", type=int, default=Workload.tables)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    w = Workload(tables=args.tables, ids_per_bag=args.ids_per_bag, batch=args.batch)
    from emrctl.cluster.errors import ClusterError

    try:
        results = run_scale(args.out, args.seconds, args.host_quota, args.ranker_quota, args.clients, w, args.routing,
                            args.rounds)
    except ClusterError as e:
        print(f"flexemr_bench.scale: {e}")
        return e.code
    print(format_ratios(results))
    print(f"results: {args.out / 'scale.json'}; plot: {results['plot']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
