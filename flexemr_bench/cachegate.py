"""Cache on vs off where hits save nothing (loopback) and where they save a slow network, side by side.

    python -m flexemr_bench.cachegate --out bench-out/cachegate [--rows-cap 100000] [--seconds 6] [--reps 3]
        [--slow-netns emrslow --slow-addr 10.77.0.2]

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
side share it, taking turns.  Writes ``cachegate.json``; prints the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from flexemr.loadgen import run_load, socket_caller
from flexemr_bench.daemon import ReadyProcess

BATCH = 1024
CACHE = ["--cache-size", "64MiB", "--cache-budget", "2GiB"]


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


def _pair_loopback(model: Path, out: Path) -> dict[str, ReadyProcess]:
    procs = {}
    for name, extra in (("off", ["--cache-policy", "off"]), ("adaptive", ["--cache-policy", "adaptive", *CACHE])):
        sock = str(out / f"loop-{name}.sock")
        procs[name] = ReadyProcess([sys.executable, "-m", "flexemrd", "local", "--model", str(model),
                                    "--embedding-servers", "2", "--engines", "2", "--socket", sock,
                                    "--instance", f"cg{name[:3]}{os.getpid() % 10000}", "--log-level", "warning",
                                    *extra], out / f"loop-{name}.log", sock)
    return procs


def _pair_slow(model: Path, out: Path, netns: str, addr: str) -> tuple[ReadyProcess, dict[str, ReadyProcess]]:
    from flexemr.auth import write_secret

    # The server listens beyond loopback (on the veth), which it refuses to do without a secret.
    secret = out / "slow.secret"
    write_secret(str(secret))
    emb = _toml(out / "slow-embedding.toml", {
        "daemon": {"role": "embedding", "instance": f"cgemb{os.getpid() % 10000}", "model": str(model),
                   "log_level": "warning", "secret_file": str(secret)},
        "embedding": {"listen": f"{addr}:7101", "index": 0, "servers": 1, "threads": 1}})
    server = ReadyProcess(["ip", "netns", "exec", netns, sys.executable, "-m", "flexemrd", "run", "--config",
                           str(emb)], out / "slow-embedding.log", ready_line=False)
    time.sleep(8)   # the server maps its tables before it listens; the rankers retry meanwhile
    if server.proc.poll() is not None:
        server.stop()
        raise RuntimeError(f"the embedding server in {netns} exited with {server.proc.returncode}; "
                           f"see {out / 'slow-embedding.log'}")
    rankers = {}
    for name, policy in (("off", "off"), ("adaptive", "adaptive")):
        sock = str(out / f"slow-{name}.sock")
        cfg = _toml(out / f"slow-{name}.toml", {
            "daemon": {"role": "ranker", "instance": f"cgr{name[:3]}{os.getpid() % 10000}", "model": str(model),
                       "log_level": "warning", "secret_file": str(secret)},
            "ranker": {"socket": sock, "engines": 1, "servers": [f"{addr}:7101"], "metrics_port": 0,
                       "transport": "tcp"},
            "cache": {"policy": policy, "capacity": "64MiB", "budget": "2GiB"}})
        rankers[name] = ReadyProcess([sys.executable, "-m", "flexemrd", "run", "--config", str(cfg)],
                                     out / f"slow-{name}.log", sock, ready_line=False)
    return server, rankers


def _alternate(procs: dict[str, ReadyProcess], requests: list, seconds: float, reps: int, clients: int) -> dict:
    runs: dict[str, list[float]] = {n: [] for n in procs}
    for rep in range(reps):
        for name, p in procs.items():
            res = run_load(socket_caller(p.sock, "predict"), requests, clients, seconds)
            _log(f"  [{rep + 1}/{reps}] cache {name}: {res.samples_per_s:,.0f} samples/s, {res.errors} errors")
            runs[name].append(res.samples_per_s)
    med = {n: statistics.median(v) for n, v in runs.items()}
    if not med["off"]:
        raise RuntimeError(f"cache off served nothing ({runs}); see the logs of {', '.join(procs)} beside the JSON")
    return {"samples_per_s": med, "runs": runs, "adaptive_over_off": round(med["adaptive"] / med["off"], 3)}


def run(out: Path, rows_cap: int, seconds: float, reps: int, clients: int, netns: str | None, addr: str) -> dict:
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    from flexemr_bench.ranker import ensure_model

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    gen = RequestGenerator(spec, ids_per_bag=20, zipf_exponent=1.05, seed=11, empty_bag_prob=0.0, length_dist="fixed")
    requests = [gen.batch(BATCH) for _ in range(16)]
    result: dict = {"batch": BATCH, "clients": clients, "seconds": seconds, "repetitions": reps,
                    "workload": "bench8 (8 tables x 64), 20 Zipf-1.05 ids per bag, predict"}
    procs = _pair_loopback(model, out)
    try:
        _log("loopback: cache off vs adaptive")
        _alternate(procs, requests[:2], 2.0, 1, clients)   # warm both (and let the gate decide)
        result["loopback"] = _alternate(procs, requests, seconds, reps, clients)
    finally:
        for p in procs.values():
            p.stop()
    if netns:
        server, rankers = _pair_slow(model, out, netns, addr)
        try:
            _log(f"slow network ({netns}): cache off vs adaptive")
            _alternate(rankers, requests[:2], 2.0, 1, clients)
            result["slow_network"] = _alternate(rankers, requests, seconds, reps, clients)
        finally:
            for p in rankers.values():
                p.stop()
            server.stop()
    (out / "cachegate.json").write_text(json.dumps(result, indent=2))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.cachegate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/cachegate"))
    ap.add_argument("--rows-cap", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--slow-netns", default=None, help="network namespace holding the rate-limited embedding server")
    ap.add_argument("--slow-addr", default="10.77.0.2")
    a = ap.parse_args(argv)
    r = run(a.out, a.rows_cap, a.seconds, a.reps, a.clients, a.slow_netns, a.slow_addr)
    for k in ("loopback", "slow_network"):
        if k in r:
            s = r[k]["samples_per_s"]
            print(f"{k:13} cache off {s['off']:>10,.0f}  adaptive {s['adaptive']:>10,.0f}  "
                  f"ratio {r[k]['adaptive_over_off']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
