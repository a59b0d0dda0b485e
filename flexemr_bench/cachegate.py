"""Cache on vs off where hits save nothing (loopback) and where they save a slow network, side by side.

    python -m flexemr_bench.cachegate --out bench-out/cachegate [--rows-cap 100000] [--seconds 6] [--reps 3]
        [--slow-netns emrslow --slow-addr 10.77.0.2 [--slow-veth veth-emr]
         [--capacities 16MiB,64MiB,128MiB,256MiB]] [--cache-size 64MiB] [--skip-loopback]

Loopback: two ``flexemrd local --embedding-servers 2`` daemons, one with the
cache off and one with ``--cache-policy adaptive``; they take turns
(closed loop, 4 clients, batch 1024 predict), medians of the repetitions.

Slow network (only with ``--slow-netns``): one embedding server runs inside
that network namespace, reached over a veth pair whose both ends are rate
limited by a ``tc tbf`` qdisc (set up by the caller, e.g.)::

    ip netns add emrslow; ip link add veth-emr type veth peer name veth-emrs
    ip link set veth-emrs netns emrslow
    ip addr add 10.77.0.1/24 dev veth-emr; ip link set veth-emr up
    ip netns exec emrslow sh -c 'ip addr add 10.77.0.2/24 dev veth-emrs; ip link set veth-emrs up; ip link set lo up'
    tc qdisc add dev veth-emr root tbf rate 800mbit burst 256kb latency 20ms
    ip netns exec emrslow tc qdisc add dev veth-emrs root tbf rate 800mbit burst 256kb latency 20ms

and two rankers (``flexemrd run``, role ranker, cache off / adaptive) on this
side share it, taking turns.  Each cell behind the slow link also records
what crossed it: the bytes each way on the host end of the veth (``tx``:
ids to the server, ``rx``: partials back) per sample, and the share of
(bag, table) pairs answered wholly from the cache (the server's own
``bags_pooled`` counter against samples x tables: such a pair leaves the
subrequest, protocol 3).  ``--capacities`` adds a curve: a ranker with a
*fixed* cache of each size in turn, interleaved with the cache-off ranker
(JSON and ``cachegate-capacity.png``).  Writes ``cachegate.json``; prints
the ratios with the cache sizes used.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from flexemr.loadgen import run_load, socket_caller
from flexemr_bench.daemon import ReadyProcess

BATCH = 1024
BUDGET = "2GiB"
SERVER_PORT = 7101


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _toml(path: Path, sections: dict[str, dict]) -> Path:
    lines = []
    for name, kv in sections.items():
        lines.append(f"[{name}]")
        for k, v in kv.items():
            lines.append(f"{k} = {json.dumps(v)}")
    path.write_text("\n".join(lines) + "\n")
    return path


def _pair_loopback(model: Path, out: Path, cache_size: str) -> dict[str, ReadyProcess]:
    procs = {}
    cache = ["--cache-size", cache_size, "--cache-budget", BUDGET]
    for name, extra in (("off", ["--cache-policy", "off"]), ("adaptive", ["--cache-policy", "adaptive", *cache])):
        sock = str(out / f"loop-{name}.sock")
        procs[name] = ReadyProcess([sys.executable, "-m", "flexemrd", "local", "--model", str(model),
                                    "--embedding-servers", "2", "--engines", "2", "--socket", sock,
                                    "--instance", f"cg{name[:3]}{os.getpid() % 10000}", "--log-level", "warning",
                                    *extra], out / f"loop-{name}.log", sock)
    return procs


class SlowLink:
    """The embedding server inside the namespace, and what the rankers on this side send through the veth."""

    def __init__(self, model: Path, out: Path, netns: str, addr: str, veth: str) -> None:
        from flexemr.auth import write_secret

        self.model, self.out, self.addr, self.veth = model, out, addr, veth
        # The server listens beyond loopback (on the veth), which it refuses to do without a secret.
        self.secret = out / "slow.secret"
        write_secret(str(self.secret))
        emb = _toml(out / "slow-embedding.toml", {
            "daemon": {"role": "embedding", "instance": f"cgemb{os.getpid() % 10000}", "model": str(model),
                       "log_level": "warning", "secret_file": str(self.secret)},
            "embedding": {"listen": f"{addr}:{SERVER_PORT}", "index": 0, "servers": 1, "threads": 1}})
        self.server = ReadyProcess(["ip", "netns", "exec", netns, sys.executable, "-m", "flexemrd", "run",
                                    "--config", str(emb)], out / "slow-embedding.log", ready_line=False)
        time.sleep(8)   # the server maps its tables before it listens; the rankers retry meanwhile
        if self.server.proc.poll() is not None:
            self.server.stop()
            raise RuntimeError(f"the embedding server in {netns} exited with {self.server.proc.returncode}; "
                               f"see {out / 'slow-embedding.log'}")

    def ranker(self, name: str, policy: str, capacity: str) -> ReadyProcess:
        """A ``flexemrd run`` ranker (one engine, TCP) on this side with cache ``policy`` of ``capacity``."""
        sock = str(self.out / f"slow-{name}.sock")
        cfg = _toml(self.out / f"slow-{name}.toml", {
            "daemon": {"role": "ranker", "instance": self.instance(name), "model": str(self.model),
                       "log_level": "warning", "secret_file": str(self.secret)},
            "ranker": {"socket": sock, "engines": 1, "servers": [f"{self.addr}:{SERVER_PORT}"], "metrics_port": 0,
                       "transport": "tcp"},
            "cache": {"policy": policy, "capacity": capacity, "budget": BUDGET}})
        return ReadyProcess([sys.executable, "-m", "flexemrd", "run", "--config", str(cfg)],
                            self.out / f"slow-{name}.log", sock, ready_line=False)

    @staticmethod
    def instance(name: str) -> str:
        return f"cgr{name.replace('MiB', 'm').replace('-', '')[:8]}{os.getpid() % 10000}"

    def counters(self) -> dict[str, int]:
        """The server's bags_pooled and the veth's bytes so far (host end: tx to the server, rx from it)."""
        from flexemr_bench.systems import server_stats

        st = server_stats((self.addr, SERVER_PORT), secret_file=str(self.secret))
        net = Path("/sys/class/net") / self.veth / "statistics"
        return {"bags_pooled": st["bags_pooled"], "tx_bytes": int((net / "tx_bytes").read_text()),
                "rx_bytes": int((net / "rx_bytes").read_text())}

    def stop(self) -> None:
        self.server.stop()


def _qdisc(dev: str) -> str:
    """``tc qdisc show dev DEV`` (this side's rate limit), kept with the results."""
    r = subprocess.run(["tc", "qdisc", "show", "dev", dev], capture_output=True, text=True, timeout=10)
    return r.stdout.strip() or r.stderr.strip()


def _cache_status(instance: str) -> dict:
    """The ranker's cache as ``emrctl status --json`` shows it (capacity, hit rate, the gate's state)."""
    r = subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, "status", "--json"],
                       capture_output=True, text=True, timeout=30)
    if r.returncode:
        return {"error": r.stderr.strip()[-300:]}
    c = json.loads(r.stdout).get("cache", {})
    keep = ("policy", "capacity_bytes", "used_bytes", "hit_rate", "payoff")
    return {k: c[k] for k in keep if k in c}


def _cell(link: SlowLink, n_tables: int, before: dict[str, int], samples: int) -> dict:
    """What one cell sent over the link, per sample, and the share of (bag, table) pairs the cache answered."""
    after = link.counters()
    d = {k: after[k] - before[k] for k in after}
    pairs = max(1, samples * n_tables)
    return {"bytes_to_server_per_sample": round(d["tx_bytes"] / max(1, samples), 1),
            "bytes_from_server_per_sample": round(d["rx_bytes"] / max(1, samples), 1),
            "link_mbit_s_from_server": None,
            "pairs_wholly_cached": round(1.0 - d["bags_pooled"] / pairs, 4)}


def _alternate(procs: dict[str, ReadyProcess], requests: list, seconds: float, reps: int, clients: int,
               link: SlowLink | None = None, n_tables: int = 0) -> dict:
    runs: dict[str, list[float]] = {n: [] for n in procs}
    cells: dict[str, list[dict]] = {n: [] for n in procs}
    for rep in range(reps):
        for name, p in procs.items():
            before = link.counters() if link is not None else {}
            res = run_load(socket_caller(p.sock, "predict"), requests, clients, seconds)
            extra = ""
            if link is not None:
                cell = _cell(link, n_tables, before, res.samples)
                cell["link_mbit_s_from_server"] = round(cell["bytes_from_server_per_sample"] * res.samples_per_s
                                                        * 8 / 1e6, 1)
                cells[name].append(cell)
                extra = (f", {cell['bytes_from_server_per_sample']:,.0f} B/sample back "
                         f"({cell['link_mbit_s_from_server']:,.0f} Mbit/s), {cell['bytes_to_server_per_sample']:,.0f}"
                         f" B/sample out, {100 * cell['pairs_wholly_cached']:.1f}% of (bag, table) pairs wholly cached")
            _log(f"  [{rep + 1}/{reps}] cache {name}: {res.samples_per_s:,.0f} samples/s, {res.errors} errors{extra}")
            runs[name].append(res.samples_per_s)
    med = {n: statistics.median(v) for n, v in runs.items()}
    if not med["off"]:
        raise RuntimeError(f"cache off served nothing ({runs}); see the logs of {', '.join(procs)} beside the JSON")
    names = [n for n in procs if n != "off"]
    out: dict = {"samples_per_s": med, "runs": runs,
                 "over_off": {n: round(med[n] / med["off"], 3) for n in names}}
    if "adaptive" in med:
        out["adaptive_over_off"] = out["over_off"]["adaptive"]
    if link is not None:
        out["link"] = {n: {k: statistics.median(c[k] for c in cs) for k in cs[0]} for n, cs in cells.items()}
        out["link_runs"] = cells
    return out


def _capacity_curve(link: SlowLink, off: ReadyProcess, capacities: list[str], requests: list, seconds: float,
                    reps: int, clients: int, n_tables: int) -> list[dict]:
    """Throughput with a fixed cache of each size against cache off, each size interleaved with off."""
    curve = []
    for cap in capacities:
        name = f"fixed-{cap}"
        _log(f"slow network: cache fixed {cap} vs off")
        r = link.ranker(name, "fixed", cap)
        try:
            run_load(socket_caller(r.sock, "predict"), requests[:4], clients, 6.0)   # fill the cache first
            res = _alternate({"off": off, name: r}, requests, seconds, reps, clients, link, n_tables)
            res["cache"] = _cache_status(link.instance(name))
        finally:
            r.stop()
        curve.append({"capacity": cap, "capacity_bytes": _bytes(cap), "ratio": res["over_off"][name],
                      "pairs_wholly_cached": res["link"][name]["pairs_wholly_cached"], **res})
    return curve


def _bytes(size: str) -> int:
    from flexemr.config import parse_size

    return parse_size(size)


def _plot_curve(curve: list[dict], path: Path) -> bool:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None or not curve:
        return False
    mib = [c["capacity_bytes"] / 2**20 for c in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(mib, [c["ratio"] for c in curve], "o-", label="fixed cache / cache off (samples/s)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("cache capacity (MiB, [cache].capacity)")
    ax.set_ylabel("throughput vs cache off")
    ax2 = ax.twinx()
    ax2.plot(mib, [100 * c["pairs_wholly_cached"] for c in curve], "s:", color="tab:orange",
             label="(bag, table) pairs wholly cached")
    ax2.set_ylabel("% of (bag, table) pairs wholly cached")
    ax.set_title("behind an 800 Mbit/s tbf link: predict, batch 1024, 20 Zipf-1.05 ids/bag", fontsize=9)
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(out: Path, rows_cap: int, seconds: float, reps: int, clients: int, netns: str | None, addr: str,
        veth: str = "veth-emr", cache_size: str = "64MiB", capacities: list[str] | None = None,
        loopback: bool = True, distinct_batches: int = 96) -> dict:
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    from flexemr_bench.ranker import ensure_model

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    n_tables = len(spec.tables)
    gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=1.05, seed=11, empty_bag_prob=0.0, length_dist="fixed")
    # Many distinct batches: the clients cycle through them, and a short cycle would let a cache hold every
    # row the benchmark ever asks for (a working set no stationary Zipf stream has).
    requests = [gen.batch(BATCH) for _ in range(distinct_batches)]
    result: dict = {"batch": BATCH, "clients": clients, "seconds": seconds, "repetitions": reps,
                    "rows_per_table": rows_cap, "cache_size": cache_size, "cache_budget": BUDGET,
                    "distinct_batches": distinct_batches,
                    "workload": f"bench8 (8 tables x {rows_cap:,} rows x 64), 20 Zipf-1.05 ids per bag, predict",
                    "load_before": os.getloadavg()[0]}
    if loopback:
        procs = _pair_loopback(model, out, cache_size)
        try:
            _log(f"loopback: cache off vs adaptive ({cache_size})")
            _alternate(procs, requests[:2], 2.0, 1, clients)   # warm both (and let the gate decide)
            result["loopback"] = _alternate(procs, requests, seconds, reps, clients)
        finally:
            for p in procs.values():
                p.stop()
    if netns:
        link = SlowLink(model, out, netns, addr, veth)
        result["link_qdisc"] = _qdisc(veth)
        rankers: dict[str, ReadyProcess] = {}
        try:
            rankers = {"off": link.ranker("off", "off", cache_size),
                       "adaptive": link.ranker("adaptive", "adaptive", cache_size)}
            _log(f"slow network ({netns}): cache off vs adaptive ({cache_size})")
            _alternate(rankers, requests[:4], 3.0, 1, clients)   # warm both, fill the cache, let the gate decide
            result["slow_network"] = _alternate(rankers, requests, seconds, reps, clients, link, n_tables)
            result["slow_network"]["cache"] = _cache_status(link.instance("adaptive"))
            rankers.pop("adaptive").stop()
            if capacities:
                result["capacity_curve"] = _capacity_curve(link, rankers["off"], capacities, requests, seconds,
                                                           reps, clients, n_tables)
                crossing = [c["capacity"] for c in result["capacity_curve"] if c["ratio"] > 1.0]
                result["smallest_capacity_over_1x"] = crossing[0] if crossing else None
                _plot_curve(result["capacity_curve"], out / "cachegate-capacity.png")
        finally:
            for p in rankers.values():
                p.stop()
            link.stop()
    result["load_after"] = os.getloadavg()[0]
    (out / "cachegate.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.cachegate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/cachegate"))
    ap.add_argument("--rows-cap", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--cache-size", default="64MiB", help="[cache].capacity of the cached rankers (and --cache-size)")
    ap.add_argument("--skip-loopback", action="store_true")
    ap.add_argument("--slow-netns", default=None, help="network namespace holding the rate-limited embedding server")
    ap.add_argument("--slow-addr", default="10.77.0.2")
    ap.add_argument("--slow-veth", default="veth-emr", help="this side's end of the veth (its byte counters)")
    ap.add_argument("--capacities", default="", help="comma-separated fixed cache sizes for the curve (slow link)")
    ap.add_argument("--distinct-batches", type=int, default=96, help="request batches the clients cycle through")
    a = ap.parse_args(argv)
    caps = [c.strip() for c in a.capacities.split(",") if c.strip()]
    r = run(a.out, a.rows_cap, a.seconds, a.reps, a.clients, a.slow_netns, a.slow_addr, a.slow_veth,
            a.cache_size, caps, not a.skip_loopback, a.distinct_batches)
    for k in ("loopback", "slow_network"):
        if k in r:
            s = r[k]["samples_per_s"]
            print(f"{k:13} cache off {s['off']:>10,.0f}  adaptive ({r['cache_size']}) {s['adaptive']:>10,.0f}  "
                  f"ratio {r[k]['adaptive_over_off']:.2f}")
    if "link_qdisc" in r:
        print(f"link: {r['link_qdisc']}")
    for c in r.get("capacity_curve", []):
        s = c["samples_per_s"]
        print(f"fixed {c['capacity']:>8}  cache off {s['off']:>10,.0f}  cached {s['fixed-' + c['capacity']]:>10,.0f}  "
              f"ratio {c['ratio']:.2f}  ({100 * c['pairs_wholly_cached']:.1f}% of (bag, table) pairs wholly cached)")
    if "capacity_curve" in r:
        print(f"smallest capacity over 1x: {r['smallest_capacity_over_1x']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
