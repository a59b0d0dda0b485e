"""Network-layer benchmark (FlexEMR 3.2), one run, side by side:

    python -m flexemr_bench.netlayer --out bench-out/netlayer [--seconds 6]
    python -m flexemr_bench.netlayer --transport rdma --out DIR   # verbs-level: see netlayer_rdma.py

1. Engine mapping with 2 engines: "owned" (each connection belongs to one
   engine, no locks) vs "shared" (every engine sends on every connection under
   a per-connection cross-process lock): lookup() samples/s and p99.
2. Credit latency under load, priority channel vs in band: time from the
   ranker granting a credit to the server applying it, measured by the servers
   (both ends on this host, so CLOCK_MONOTONIC is common) and read with STATS
   frames.
3. p99 during live migrations (a connection moved every 0.5 s, back and forth)
   vs steady state, at the same open-loop offered load.

Writes ``netlayer.json`` and ``netlayer.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from flexemr_bench.ranker import Daemon
from flexemr.loadgen import run_load, socket_caller
from flexemr.wire import codec
from flexemr.wire.frame import FrameType, pack_header
from flexemr.wire.stream import FrameReader, send_buffers


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def server_stats(address: str, secret_file: str = "") -> dict[str, int]:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        if secret_file:   # `flexemrd local` servers want the instance's secret first
            from flexemr.auth import load_secret
            from flexemr.wire.handshake import client_hello

            client_hello(lambda f: send_buffers(s, f), FrameReader(s).read_frame, address, codec.ROLE_CLIENT,
                         f"netlayer/{os.getpid()}", secret=load_secret(secret_file))
        send_buffers(s, [pack_header(FrameType.STATS, 1, 0)])
        h, payload = FrameReader(s).read_frame()
        return codec.decode_stats(payload)


def _status(instance: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, "status", "--json"],
                       capture_output=True, text=True, timeout=20)
    return json.loads(r.stdout)


def _migrate(instance: str, conn: int, to: int) -> None:
    """The same mailbox command ``emrctl migrate`` sends, without starting a Python per move
    (an interpreter start costs more CPU than the migration on a 2-core host)."""
    from flexemr.control.block import ControlBlock
    from flexemr.control.mailbox import MailboxClient

    with ControlBlock.attach(instance) as block:
        r = MailboxClient(block).request({"cmd": "migrate", "conn": conn, "to_engine": to}, timeout=10)
    if r.get("status") != "ok":
        raise RuntimeError(f"migrate failed: {r}")


def run(out: Path, rows_cap: int, seconds: float, clients: int, batch: int) -> dict:
    from flexemr_bench.ranker import ensure_model
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    gen = RequestGenerator(spec, ids_per_bag=20, seed=5, empty_bag_prob=0.0, length_dist="fixed")
    reqs = [gen.batch(batch) for _ in range(16)]
    res: dict = {"workload": {"batch": batch, "tables": len(spec.tables), "rows_per_table": spec.tables[0].rows,
                              "ids_per_bag": 20}, "clients": clients, "seconds": seconds}
    pid = os.getpid() % 10000

    # 1. owned vs shared
    mapping = {}
    for mode in ("owned", "shared"):
        _log(f"mapping {mode}: 4 servers, 2 engines, lookup closed loop ...")
        d = Daemon(model, 4, 2, f"/tmp/fx-net-{mode}-{pid}.sock", f"net{mode[:3]}{pid}",
                   ["--mapping", mode, "--no-rebalance", "--routing", "tables"])
        try:
            r = run_load(socket_caller(d.sock, "lookup"), reqs, clients, seconds)
            mapping[mode] = r.summary()
        finally:
            d.stop()
    res["mapping"] = mapping
    res["mapping"]["owned_over_shared"] = round(mapping["owned"]["samples_per_s"] / mapping["shared"]["samples_per_s"], 3)

    # 2. credit latency: priority vs in-band, under closed-loop load
    credit = {}
    for mode in ("priority", "inband"):
        _log(f"credits {mode}: lookup closed loop, then server STATS ...")
        inst = f"netc{mode[:3]}{pid}"
        d = Daemon(model, 2, 2, f"/tmp/fx-net-c{mode}-{pid}.sock", inst, ["--credits", mode, "--no-rebalance"])
        try:
            addrs = [s["address"] for s in _status(inst)["servers"]]
            r = run_load(socket_caller(d.sock, "lookup"), reqs, clients, seconds)
            from flexemr import naming

            stats = [server_stats(a, secret_file=naming.local_secret_path(inst)) for a in addrs]
            lat50 = max(s["credit_latency_p50_ns"] for s in stats) / 1e3
            lat99 = max(s["credit_latency_p99_ns"] for s in stats) / 1e3
            waits = sum(s["credit_waits"] for s in stats)
            credit[mode] = {**r.summary(), "credit_latency_p50_us": round(lat50, 1),
                            "credit_latency_p99_us": round(lat99, 1), "server_credit_waits": waits,
                            "credits_received": sum(s["credits_received"] for s in stats)}
        finally:
            d.stop()
    credit["priority_latency_reduction_p50"] = round(
        1 - credit["priority"]["credit_latency_p50_us"] / max(1e-9, credit["inband"]["credit_latency_p50_us"]), 3)
    credit["priority_latency_reduction_p99"] = round(
        1 - credit["priority"]["credit_latency_p99_us"] / max(1e-9, credit["inband"]["credit_latency_p99_us"]), 3)
    res["credits"] = credit

    # 3. p99 during migrations vs steady state at the same open-loop load
    _log("migration: open loop, steady window then a window with a move every 0.5 s ...")
    inst = f"netm{pid}"
    d = Daemon(model, 2, 2, f"/tmp/fx-net-m-{pid}.sock", inst, ["--no-rebalance"])
    try:
        probe = run_load(socket_caller(d.sock, "lookup"), reqs, clients, min(3.0, seconds))
        rate = 0.6 * probe.requests_per_s
        steady = run_load(socket_caller(d.sock, "lookup"), reqs, clients, seconds, rate / clients)
        moves = []
        stop = threading.Event()

        def mover() -> None:
            to = 1
            while not stop.is_set():
                t0 = time.perf_counter()
                _migrate(inst, 0, to)
                moves.append(time.perf_counter() - t0)
                to = 1 - to
                stop.wait(0.5)

        th = threading.Thread(target=mover, daemon=True)
        th.start()
        during = run_load(socket_caller(d.sock, "lookup"), reqs, clients, seconds, rate / clients)
        stop.set()
        th.join(30)
    finally:
        d.stop()
    res["migration"] = {"offered_requests_per_s": round(rate, 2), "steady": steady.summary(),
                        "during_migrations": during.summary(), "migrations": len(moves),
                        "p99_during_over_steady": round(during.percentile_ms(99) / steady.percentile_ms(99), 3),
                        "failed_requests_during": during.errors}
    (out / "netlayer.json").write_text(json.dumps(res, indent=2))
    _plot(res, out / "netlayer.png")
    return res


def _plot(res: dict, path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot(required=False)
    if plt is None:
        return
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8))
    m = res["mapping"]
    ax[0].bar(["owned", "shared"], [m["owned"]["samples_per_s"] / 1e3, m["shared"]["samples_per_s"] / 1e3])
    ax[0].set_ylabel("k samples/s")
    ax[0].set_title(f"engine mapping (owned/shared = {m['owned_over_shared']}x)")
    c = res["credits"]
    x = np.arange(2)
    ax[1].bar(x - 0.2, [c["priority"]["credit_latency_p50_us"], c["inband"]["credit_latency_p50_us"]], 0.4, label="p50")
    ax[1].bar(x + 0.2, [c["priority"]["credit_latency_p99_us"], c["inband"]["credit_latency_p99_us"]], 0.4, label="p99")
    ax[1].set_xticks(x, ["priority channel", "in band"])
    ax[1].set_ylabel("credit latency (µs)")
    ax[1].set_yscale("log")
    ax[1].legend()
    ax[1].set_title("credit delivery under load")
    g = res["migration"]
    ax[2].bar(["steady", "during migrations"], [g["steady"]["p99_ms"], g["during_migrations"]["p99_ms"]])
    ax[2].set_ylabel("p99 ms")
    ax[2].set_title(f"p99 during migrations ({g['p99_during_over_steady']}x)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--transport", choices=("tcp", "rdma"), default="tcp")
    known, rest = pre.parse_known_args(argv)
    if known.transport == "rdma":  # verbs-level and torch-free, its own options
        from flexemr_bench import netlayer_rdma

        return netlayer_rdma.main(rest)
    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.netlayer", description=__doc__.split("\n\n")[0])
    ap.add_argument("--transport", choices=("tcp", "rdma"), default="tcp",
                    help="tcp: the daemon over TCP (below); rdma: the verbs-level benchmark (--transport rdma --help)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/netlayer"))
    ap.add_argument("--rows-cap", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=512)
    a = ap.parse_args(argv)
    r = run(a.out, a.rows_cap, a.seconds, a.clients, a.batch)
    print(json.dumps({"owned_over_shared": r["mapping"]["owned_over_shared"],
                      "credit_latency_us": {k: (r["credits"][k]["credit_latency_p50_us"],
                                                r["credits"][k]["credit_latency_p99_us"]) for k in ("priority", "inband")},
                      "priority_latency_reduction": (r["credits"]["priority_latency_reduction_p50"],
                                                     r["credits"]["priority_latency_reduction_p99"]),
                      "p99_during_over_steady": r["migration"]["p99_during_over_steady"],
                      "failed_requests_during_migrations": r["migration"]["failed_requests_during"]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
