"""Cache on vs off where hits save nothing (loopback) and where they save a slow network, side by side.

    python -m flexemr_bench.cachegate --out bench-out/cachegate [--rows-cap 100000] [--seconds 6] [--reps 3]
        [--slow-netns emrslow --slow-addr 10.77.0.2 [--slow-veth veth-emr] [--slow-peer veth-emrs]
         [--capacities 16MiB,64MiB,128MiB,256MiB] [--rates 200,400,800]] [--cache-size 64MiB] [--skip-loopback]

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

``--rates`` adds a link-rate curve: at each rate (tbf re-set on both ends of
the veth, then put back) cache off, a fresh adaptive ranker and a fixed one
of ``--cache-size`` take turns; each point carries the adaptive gate's
decisions (parsed from its log: cached rankers log at info level, where the
gate logs) and ``cachegate-rates.png`` plots both ratios with the gate's
state.  Every cell also records each role's CPU ms per 1,000 samples
(``cpu_ms_per_1000_samples``: robust on a shared host, where throughput is
not; a link-bound ranker's includes what its threads burn while waiting).

Warm-up: before the measured runs each ranker serves alone, a cached one for
``gate_warmup_s()`` (the gate's first probe, 2 x rounds x window_s of its
defaults, plus 1 s), so what is measured is the gate's steady state, and its
later re-probes as they fall due, not its first probe.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
ROLES = (("flexemr-emb", "embedding servers"), ("flexemr-eng", "engines"), ("flexemr-inf", "ranker"))


def gate_warmup_s() -> float:
    """Seconds of traffic an adaptive ranker gets alone before it is measured: its gate's first probe
    (its longest warm-up and 2 x rounds windows, the gate's own defaults) and one more second, so the measured window starts
    after the gate's first decision instead of inside its probe."""
    from flexemr.cache.gate import PayoffGate

    g = PayoffGate()
    return g.max_warm_s + 2 * g.rounds * g.window_s + 1.0


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
        level = "info" if name == "adaptive" else "warning"   # the gate logs its decisions at info
        procs[name] = ReadyProcess([sys.executable, "-m", "flexemrd", "local", "--model", str(model),
                                    "--embedding-servers", "2", "--engines", "2", "--socket", sock,
                                    "--instance", f"cg{name[:3]}{os.getpid() % 10000}", "--log-level", level,
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
            # info for a cached ranker: its gate logs each decision (gate_decisions reads them back)
            "daemon": {"role": "ranker", "instance": self.instance(name), "model": str(self.model),
                       "log_level": "info" if policy == "adaptive" else "warning", "secret_file": str(self.secret)},
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


_DECISION = re.compile(r"cache payoff probe: (\d+) vs (\d+) samples/s, lookup (\S+) vs (\S+) us/sample "
                       r"\(cache vs bypass\): (serving through|bypassing) the cache for (\d+) s")


def gate_decisions(log: Path) -> list[dict]:
    """The adaptive gate's decisions, in order, from a ranker's log (it logs each one at info level)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return []
    return [{"cache_samples_per_s": int(m[0]), "bypass_samples_per_s": int(m[1]),
             "state": "open" if m[4] == "serving through" else "closed", "hold_s": int(m[5])}
            for m in _DECISION.findall(text)]


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
    from flexemr_bench.daemon import tree_cpu_by_prefix

    runs: dict[str, list[float]] = {n: [] for n in procs}
    cells: dict[str, list[dict]] = {n: [] for n in procs}
    cpu: dict[str, list[dict[str, float]]] = {n: [] for n in procs}
    for rep in range(reps):
        for name, p in procs.items():
            before = link.counters() if link is not None else {}
            cpu0 = tree_cpu_by_prefix(p.proc.pid, ROLES, "supervisor")
            res = run_load(socket_caller(p.sock, "predict"), requests, clients, seconds)
            cpu1 = tree_cpu_by_prefix(p.proc.pid, ROLES, "supervisor")
            # CPU per 1,000 samples per role: robust where throughput is not (a shared host).
            per = {r: round((cpu1[r] - cpu0[r]) * 1e6 / max(1, res.samples), 2) for r in cpu0 if cpu1[r] > cpu0[r]}
            cpu[name].append(per)
            extra = f", ranker CPU {per.get('ranker', 0.0):.1f} ms/1000 samples"
            if link is not None:
                cell = _cell(link, n_tables, before, res.samples)
                cell["link_mbit_s_from_server"] = round(cell["bytes_from_server_per_sample"] * res.samples_per_s
                                                        * 8 / 1e6, 1)
                cells[name].append(cell)
                extra += (f", {cell['bytes_from_server_per_sample']:,.0f} B/sample back "
                         f"({cell['link_mbit_s_from_server']:,.0f} Mbit/s), {cell['bytes_to_server_per_sample']:,.0f}"
                         f" B/sample out, {100 * cell['pairs_wholly_cached']:.1f}% of (bag, table) pairs wholly cached")
            _log(f"  [{rep + 1}/{reps}] cache {name}: {res.samples_per_s:,.0f} samples/s, {res.errors} errors{extra}")
            runs[name].append(res.samples_per_s)
    med = {n: statistics.median(v) for n, v in runs.items()}
    if not med["off"]:
        raise RuntimeError(f"cache off served nothing ({runs}); see the logs of {', '.join(procs)} beside the JSON")
    names = [n for n in procs if n != "off"]
    out: dict = {"samples_per_s": med, "runs": runs,
                 "over_off": {n: round(med[n] / med["off"], 3) for n in names},
                 "cpu_ms_per_1000_samples": {n: {r: statistics.median(c.get(r, 0.0) for c in cs) for r in cs[0]}
                                             for n, cs in cpu.items()},
                 "cpu_runs": cpu}
    if "adaptive" in med:
        out["adaptive_over_off"] = out["over_off"]["adaptive"]
    if link is not None:
        out["link"] = {n: {k: statistics.median(c[k] for c in cs) for k in cs[0]} for n, cs in cells.items()}
        out["link_runs"] = cells
    return out


def _warm(procs: dict[str, ReadyProcess], requests: list, clients: int) -> dict[str, list[dict]]:
    """Each ranker alone: cached ones long enough for the gate's first decision (``gate_warmup_s``), so the
    measured runs see the gate's steady state (and its re-probes when they fall due), not its first probe.
    Returns each adaptive ranker's gate decisions so far (from its log)."""
    warm = gate_warmup_s()
    shown = {}
    for name, p in procs.items():
        run_load(socket_caller(p.sock, "predict"), requests, clients, warm if name != "off" else 2.0)
        if name.startswith("adaptive"):
            shown[name] = gate_decisions(Path(p.log.name))
            last = shown[name][-1] if shown[name] else {}
            _log(f"  warmed {name} for {warm:.0f} s: gate {last.get('state', 'undecided')} "
                 f"({last.get('cache_samples_per_s', '-')} vs {last.get('bypass_samples_per_s', '-')} samples/s)")
    return shown


def _tbf(dev: str, rate_mbit: int, netns: str | None = None) -> None:
    """Rate-limit ``dev`` (inside ``netns`` if given) with the tbf the docs set up, at ``rate_mbit``."""
    cmd = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_mbit}mbit", "burst", "256kb",
           "latency", "20ms"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=10)


def _rate_curve(link: SlowLink, netns: str, veth: str, peer: str, rates: list[int], cache_size: str,
                requests: list, seconds: float, reps: int, clients: int, n_tables: int) -> list[dict]:
    """Cache off vs adaptive vs fixed at each link rate (tbf on both ends), the adaptive gate's decision per point.

    A fresh adaptive ranker per rate (its gate decides for the link it sees, after ``gate_warmup_s``); the
    off and fixed rankers are kept.  The qdisc is put back to its first rate afterwards.
    """
    m = re.search(r"rate (\d+)([KMG])bit", _qdisc(veth))
    first = int(m.group(1)) * {"K": 1e-3, "M": 1, "G": 1000}[m.group(2)] if m else None
    curve = []
    off = link.ranker("off", "off", cache_size)
    fixed = link.ranker("fixed", "fixed", cache_size)
    try:
        for rate in rates:
            _tbf(veth, rate)
            _tbf(peer, rate, netns)
            _log(f"link at {rate} Mbit/s: cache off vs adaptive vs fixed ({cache_size})")
            adaptive = link.ranker(f"adaptive{rate}", "adaptive", cache_size)
            try:
                procs = {"off": off, "adaptive": adaptive, "fixed": fixed}
                names = {n: link.instance(n if n != "adaptive" else f"adaptive{rate}") for n in procs}
                _warm(procs, requests, clients)
                res = _alternate(procs, requests, seconds, reps, clients, link, n_tables)
                res["gate_decisions"] = gate_decisions(Path(adaptive.log.name))
                res["cache"] = {n: _cache_status(names[n]) for n in ("adaptive", "fixed")}
            finally:
                adaptive.stop()
            last = res["gate_decisions"][-1] if res["gate_decisions"] else {}
            curve.append({"rate_mbit": rate, "adaptive_over_off": res["over_off"]["adaptive"],
                          "fixed_over_off": res["over_off"]["fixed"], "gate_state": last.get("state"), **res})
    finally:
        off.stop()
        fixed.stop()
        if first:
            _tbf(veth, int(first))
            _tbf(peer, int(first), netns)
    return curve


def _plot_rates(curve: list[dict], cache_size: str, path: Path) -> bool:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None or not curve:
        return False
    rates = [c["rate_mbit"] for c in curve]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(rates, [c["fixed_over_off"] for c in curve], "s:", color="#7f7f7f", label=f"fixed {cache_size} / off")
    ax.plot(rates, [c["adaptive_over_off"] for c in curve], "o-", color="#17becf", label="adaptive / off")
    for c in curve:   # the gate's decision at each point
        ax.annotate(str(c.get("gate_state") or "?"), (c["rate_mbit"], c["adaptive_over_off"]),
                    textcoords="offset points", xytext=(0, 8), ha="center", fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("link rate (Mbit/s, tc tbf each way)")
    ax.set_ylabel("throughput vs cache off")
    ax.set_title("cache behind a rate-limited link: predict, batch 1024, 20 Zipf-1.05 ids/bag", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


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
        loopback: bool = True, distinct_batches: int = 96, rates: list[int] | None = None,
        peer: str = "veth-emrs") -> dict:
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
                    "distinct_batches": distinct_batches, "gate_warmup_s": gate_warmup_s(),
                    "workload": f"bench8 (8 tables x {rows_cap:,} rows x 64), 20 Zipf-1.05 ids per bag, predict",
                    "load_before": os.getloadavg()[0]}
    if loopback:
        procs = _pair_loopback(model, out, cache_size)
        try:
            _log(f"loopback: cache off vs adaptive ({cache_size})")
            _warm(procs, requests, clients)
            result["loopback"] = _alternate(procs, requests, seconds, reps, clients)
            result["loopback"]["gate_decisions"] = gate_decisions(Path(procs["adaptive"].log.name))
            result["loopback"]["cache"] = _cache_status(f"cgada{os.getpid() % 10000}")
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
            _warm(rankers, requests, clients)
            result["slow_network"] = _alternate(rankers, requests, seconds, reps, clients, link, n_tables)
            result["slow_network"]["gate_decisions"] = gate_decisions(Path(rankers["adaptive"].log.name))
            result["slow_network"]["cache"] = _cache_status(link.instance("adaptive"))
            rankers.pop("adaptive").stop()
            if rates:
                rankers.pop("off").stop()    # the curve runs its own (one ranker name each)
                result["rate_curve"] = _rate_curve(link, netns, veth, peer, rates, cache_size, requests, seconds,
                                                   reps, clients, n_tables)
                _plot_rates(result["rate_curve"], cache_size, out / "cachegate-rates.png")
                rankers["off"] = link.ranker("off", "off", cache_size)
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
    ap.add_argument("--rates", default="", help="comma-separated link rates in Mbit/s for the rate curve (slow "
                    "link; re-sets tc tbf on both ends, needs root)")
    ap.add_argument("--slow-peer", default="veth-emrs", help="the namespace's end of the veth (for --rates)")
    ap.add_argument("--distinct-batches", type=int, default=96, help="request batches the clients cycle through")
    a = ap.parse_args(argv)
    caps = [c.strip() for c in a.capacities.split(",") if c.strip()]
    rates = [int(x) for x in a.rates.split(",") if x.strip()]
    r = run(a.out, a.rows_cap, a.seconds, a.reps, a.clients, a.slow_netns, a.slow_addr, a.slow_veth,
            a.cache_size, caps, not a.skip_loopback, a.distinct_batches, rates, a.slow_peer)
    for k in ("loopback", "slow_network"):
        if k in r:
            s = r[k]["samples_per_s"]
            print(f"{k:13} cache off {s['off']:>10,.0f}  adaptive ({r['cache_size']}) {s['adaptive']:>10,.0f}  "
                  f"ratio {r[k]['adaptive_over_off']:.2f}")
    if "link_qdisc" in r:
        print(f"link: {r['link_qdisc']}")
    for c in r.get("rate_curve", []):
        s = c["samples_per_s"]
        print(f"link {c['rate_mbit']:>5} Mbit/s  off {s['off']:>10,.0f}  adaptive {s['adaptive']:>10,.0f} "
              f"({c['adaptive_over_off']:.2f}, gate {c['gate_state']})  fixed {s['fixed']:>10,.0f} "
              f"({c['fixed_over_off']:.2f})")
    for c in r.get("capacity_curve", []):
        s = c["samples_per_s"]
        print(f"fixed {c['capacity']:>8}  cache off {s['off']:>10,.0f}  cached {s['fixed-' + c['capacity']]:>10,.0f}  "
              f"ratio {c['ratio']:.2f}  ({100 * c['pairs_wholly_cached']:.1f}% of (bag, table) pairs wholly cached)")
    if "capacity_curve" in r:
        print(f"smallest capacity over 1x: {r['smallest_capacity_over_1x']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
