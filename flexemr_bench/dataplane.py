"""Data-plane micro-benchmark: one embedding server over loopback TCP vs embedding_bag in process.

    python -m flexemr_bench.dataplane --out bench-out/dataplane [--rows-cap 100000] [--batch 2048] [--seconds 10]
                                      [--threads 1,2] [--reps 10] [--credits priority|off]

Workload: the rmc2 shape (32 tables x 500k rows x 64 dims, capped at
``--rows-cap`` rows per table so it is written quickly), sum pooling, 20 ids
per bag (fixed), Zipf ids (s = 1.05) scattered over each table by a random
permutation.  A handful of distinct batches is generated before any clock
starts and replayed to both systems.

Side by side, in one run, at each torch intra-op thread count of ``--threads``
(default: 1, the daemon's ``[embedding].threads``, and every cpu), the same
count for both systems:

(a) server   ONE embedding server process (the daemon's own entry
             ``embedding_main``, from :mod:`flexemr_bench.daemon`) holding
             every table; this process
             sends a LOOKUP frame for the whole batch (all tables) and waits for
             the LOOKUP_RESP, keeping 2 requests in flight to hide the round trip
             (a sender and a receiver thread, so a large request and a large
             response can never block each other).  The connection is opened
             as the daemon's ranker opens it: HELLO granting credits, one credit
             returned per response on a separate priority connection
             (``--credits off``: no flow control).
(b) local    ``torch.nn.functional.embedding_bag`` over the same memory-mapped
             rows in this process: the local limit.

Both run in alternating repetitions (``--reps``, default 10) sharing
``--seconds`` each, so drift on a shared host hits both alike.  Reported:
throughput of the median repetition, the median over repetitions of the
paired ratio server/local (the headline: each pair shares the host's load of
its moment), per-batch latency p50/p99 pooled over repetitions, and CPU
milliseconds per batch (this process, and the server process plus this
client for the server path), with the host's load average alongside.

(c) wire bytes per sample, counted from the frames actually encoded (headers
    included) and cross-checked with the server's own byte counters:
    partial pooling with the 1-server placement and with the 3-server "rows"
    placement (every bag fans out to 3 servers, 3 partials come back), against
    raw rows (every id's row shipped back: ids x dim x 4, plus ids x 8 out),
    and, for context, raw rows after de-duplicating ids per batch and table.

Pooled lookups/s = bags pooled per second = batch x tables / time per batch.
Targets: server >= 0.8x local; partial pooling >= 5x fewer wire bytes than raw.
Writes ``DIR/dataplane.json`` and ``DIR/dataplane.png``; progress on stderr.

Where the time goes (2-core developer host, defaults, 1 torch thread; per
batch of 2048 x 32 tables x 20 ids, CPU from /proc per thread): local pooling
~31 ms.  Server process ~40 ms: worker ~35 ms (84% inside embedding_bag, which
runs ~10% slower than in process because 27 MB of socket copies per batch
evict its hot rows; the rest decode and per-table glue), sender ~4 ms
(sendmsg of the 16.8 MB LOOKUP_RESP), reader ~3.5 ms (recv of the 10.5 MB
LOOKUP); plus ~7 ms in the client for the same bytes.  The server path thus
needs ~1.5x the local CPU, and on two shared cores throughput follows CPU:
~0.6-0.7x local, short of 0.8x.  What is left is the bytes themselves (8-byte
ids, f32 partials, each copied twice over loopback); it would take a wire
change (int32 ids, fp16 partials) or the shared-memory transport to go
further.  With 2 torch threads, OpenMP barrier waits under any other load
inflate both sides' CPU several-fold; the daemon's default is 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

PRESET = "rmc2"
IDS_PER_BAG = 20
ZIPF = 1.05
IN_FLIGHT = 2
CONN_ID = 1
N_BATCHES = 6
TARGET_RATIO = 0.8
TARGET_WIRE = 5.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ setup


def ensure_model(out: Path, rows_cap: int) -> Path:
    """``out/models/rmc2-<cap>``, written once (progress on stderr) and reused."""
    from flexemr.model.presets import init_model_dir

    model = out / "models" / f"{PRESET}-{rows_cap}"
    if (model / "model.toml").exists():
        return model
    _log(f"writing model {PRESET} capped at {rows_cap:,} rows/table to {model} ...")
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.monotonic() - last[0] > 1 or done == total:
            last[0] = time.monotonic()
            _log(f"  tables: {done / 2**20:,.0f} / {total / 2**20:,.0f} MiB ({100 * done / max(total, 1):.0f}%)")

    init_model_dir(model, PRESET, seed=11, rows_cap=rows_cap, progress=progress)
    return model


def make_batches(spec, batch: int, n: int, seed: int = 5) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """``n`` batches as (values per table, lengths per table), table order."""
    from flexemr.reqgen import RequestGenerator

    gen = RequestGenerator(spec, ids_per_bag=IDS_PER_BAG, zipf_exponent=ZIPF, seed=seed, empty_bag_prob=0.0,
                           length_dist="fixed")
    out = []
    for _ in range(n):
        _, sparse = gen.batch(batch)
        out.append(([sparse[t.name][0] for t in spec.tables], [sparse[t.name][1] for t in spec.tables]))
    return out


class ServerProcess:
    """One embedding server holding every table, run by the daemon's entry; stopped by pid."""

    def __init__(self, model: Path, threads: int, log: Path) -> None:
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "flexemr_bench.dataplane", "--serve", str(model), "--threads", str(threads)],
            stdout=subprocess.PIPE, stderr=self._log, text=True,
        )
        port_line, ready = self.proc.stdout.readline(), self.proc.stdout.readline()
        if not port_line.startswith("PORT") or "READY" not in ready:
            self.stop()
            raise RuntimeError(f"embedding server did not start; see {log}")
        self.port = int(port_line.split()[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        from flexemr_bench.daemon import stop_process

        stop_process(self.proc, timeout=20)
        self._log.close()


def _serve(model: str, threads: int) -> None:
    """Child: the daemon's embedding entry on a loopback port; prints PORT then READY."""
    from flexemr.model.spec import load_spec
    from flexemr.routing.table import RoutingTable
    from flexemr_bench.daemon import EmbeddingPlan, ReadyPipe, embedding_main

    spec = load_spec(model)
    routing = RoutingTable.build(spec, 1, "tables")
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    plan = EmbeddingPlan(0, model, spec, routing.shards_of(0), listener, threads=threads,
                         max_payload=1 << 30, log_level="warning")
    embedding_main(plan, ReadyPipe(os.dup(sys.stdout.fileno())))


# ------------------------------------------------------------------ the two systems


class LocalPool:
    """(b) embedding_bag over the mapped tables in this process: what a serving thread would call."""

    def __init__(self, model: Path, spec) -> None:
        from flexemr.model.tables import open_tables
        from flexemr.pooling import as_weight

        maps = open_tables(model, spec)
        self.weights = [as_weight(maps[t.name]) for t in spec.tables]

    def __call__(self, values: list[np.ndarray], lengths: list[np.ndarray]) -> list:
        import torch
        import torch.nn.functional as F

        out = []
        for w, v, ln in zip(self.weights, values, lengths):
            offsets = np.zeros(len(ln) + 1, dtype=np.int64)
            np.cumsum(ln, out=offsets[1:])
            out.append(F.embedding_bag(torch.from_numpy(v), w, torch.from_numpy(offsets), mode="sum",
                                       include_last_offset=True))
        return out


def run_local(pool: LocalPool, batches: list, seconds: float) -> tuple[int, float, list[float]]:
    """Back to back for ``seconds``: (batches done, elapsed, per-batch latencies)."""
    lat = []
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < seconds:
        v, ln = batches[n % len(batches)]
        t = time.perf_counter()
        pool(v, ln)
        lat.append(time.perf_counter() - t)
        n += 1
    return n, time.perf_counter() - t0, lat


class ServerClient:
    """(a) a ranker-side connection keeping ``IN_FLIGHT`` whole-batch LOOKUPs outstanding."""

    def __init__(self, port: int, frames: list[list], credits: bool = True) -> None:
        from flexemr.wire.stream import FrameReader

        self.sock = self._connect(port)
        self.reader = FrameReader(self.sock, max_payload=1 << 31)
        self.frames = frames  # pre-encoded requests (header + referenced arrays), replayed
        self.credit_sock: socket.socket | None = None
        if credits:
            # As the daemon's ranker does by default ("priority" credits): grant
            # IN_FLIGHT response slots on the data connection's HELLO and return
            # one per response on a separate credit connection.
            self._hello(self.sock, self.reader, "data", IN_FLIGHT)
            self.credit_sock = self._connect(port)
            self._hello(self.credit_sock, FrameReader(self.credit_sock), "credit", 0)

    @staticmethod
    def _connect(port: int) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    @staticmethod
    def _hello(sock: socket.socket, reader, channel: str, credits: int) -> None:
        from flexemr.wire import codec
        from flexemr.wire.frame import FrameType, pack_header
        from flexemr.wire.stream import send_buffers

        frame = codec.encode_hello(0, codec.ROLE_RANKER, f"dataplane-{os.getpid()}/{CONN_ID}/{channel}")
        plen = sum(memoryview(b).nbytes for b in frame[1:])
        send_buffers(sock, [pack_header(FrameType.HELLO, 0, plen, aux=credits), *frame[1:]])
        h, _ = reader.read_frame()
        if h.type != FrameType.HELLO:
            raise RuntimeError(f"server answered HELLO with {h}")

    def _credit(self) -> None:
        if self.credit_sock is not None:
            from flexemr.wire import codec
            from flexemr.wire.stream import send_buffers

            send_buffers(self.credit_sock, codec.encode_credit(CONN_ID, 1, time.monotonic_ns()))

    def request(self, i: int) -> tuple[int, memoryview]:
        """One request, nothing else in flight (warm-up and checks)."""
        from flexemr.wire.stream import send_buffers

        send_buffers(self.sock, self.frames[i % len(self.frames)])
        h, payload = self.reader.read_frame()
        self._credit()
        return h.type, payload

    def run(self, seconds: float) -> tuple[int, float, list[float]]:
        from flexemr.wire.frame import FrameType
        from flexemr.wire.stream import send_buffers

        slots = threading.Semaphore(IN_FLIGHT)
        sent_at: dict[int, float] = {}
        stop = threading.Event()
        failures: list[BaseException] = []
        n_sent = [0]

        def sender() -> None:
            try:
                i = 0
                while not stop.is_set():
                    if not slots.acquire(timeout=0.1):
                        continue
                    if stop.is_set():
                        break
                    sent_at[i] = time.perf_counter()
                    n_sent[0] = i + 1  # before sending: the receiver must wait for its answer
                    send_buffers(self.sock, self.frames[i % len(self.frames)])
                    i += 1
            except BaseException as e:
                failures.append(e)
                stop.set()

        lat: list[float] = []
        t0 = time.perf_counter()
        th = threading.Thread(target=sender, daemon=True)
        th.start()
        done = 0
        while True:
            if time.perf_counter() - t0 >= seconds:
                stop.set()
            if done >= n_sent[0]:
                # Nothing outstanding.  Never block on the sender while it may be
                # mid-send: the server answers in order, so only reading unblocks it.
                if stop.is_set() and not th.is_alive():
                    break
                th.join(0.005)
                continue
            h = self.reader.read_header()
            # Receive into the reader's reusable buffer and leave it there: the
            # benchmark measures delivery, a ranker would combine from this view.
            self.reader.read_payload(h)
            self._credit()  # the response slot is free again
            if h.type != FrameType.LOOKUP_RESP:
                raise RuntimeError(f"server answered {h}")
            lat.append(time.perf_counter() - sent_at.pop(done))
            done += 1
            if time.perf_counter() - t0 < seconds:
                slots.release()
        elapsed = time.perf_counter() - t0
        th.join(5)
        if failures:
            raise failures[0]
        return done, elapsed, lat

    def close(self) -> None:
        self.sock.close()
        if self.credit_sock is not None:
            self.credit_sock.close()


def encode_batches(batches: list) -> list[list]:
    from flexemr.wire import codec

    return [codec.encode_lookup(i + 1, len(ln[0]), list(range(len(v))), ln, v) for i, (v, ln) in enumerate(batches)]


def server_stats(port: int) -> dict[str, int]:
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.stream import FrameReader, send_buffers

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        send_buffers(s, [pack_header(FrameType.STATS, 1, 0)])
        _h, payload = FrameReader(s).read_frame()
        return codec.decode_stats(payload)


# ------------------------------------------------------------------ wire bytes


def _frame_bytes(frame: list) -> int:
    return sum(memoryview(b).nbytes for b in frame)


def wire_bytes(spec, batches: list, n_servers: int, strategy: str) -> dict:
    """Bytes per sample both ways for partial pooling under a placement, from frames really encoded."""
    from flexemr.routing import RoutingTable, split_batch
    from flexemr.wire import codec

    routing = RoutingTable.build(spec, n_servers, strategy)
    tidx = list(range(len(spec.tables)))
    out_b = back_b = samples = ids = 0
    for values, lengths in batches:
        b = len(lengths[0])
        plan = split_batch(routing, b, tidx, values, lengths)
        for part in plan.parts.values():
            out_b += _frame_bytes(codec.encode_lookup(1, b, part.tables, part.lengths, part.values))
            pooled = [np.empty((b, spec.tables[t].dim), np.float32) for t in part.tables]
            back_b += _frame_bytes(codec.encode_lookup_response(1, np.asarray(part.tables, np.uint32), pooled))
        samples += b
        ids += sum(len(v) for v in values)
    return {"servers": n_servers, "placement": strategy, "ids_per_sample": ids / samples,
            "out_per_sample": out_b / samples, "back_per_sample": back_b / samples,
            "total_per_sample": (out_b + back_b) / samples}


def raw_bytes(spec, batches: list) -> dict:
    """Raw rows: every id's row comes back (ids x dim x 4) and every id goes out (ids x 8)."""
    samples = ids = rows_b = uniq_b = 0
    for values, lengths in batches:
        samples += len(lengths[0])
        for t, v in zip(spec.tables, values):
            ids += len(v)
            rows_b += len(v) * (8 + 4 * t.dim)
            uniq_b += len(np.unique(v)) * (8 + 4 * t.dim)
    return {"ids_per_sample": ids / samples, "total_per_sample": rows_b / samples,
            "dedup_total_per_sample": uniq_b / samples}


# ------------------------------------------------------------------ run


def _cpu(pid: int) -> tuple[float, float]:
    """CPU seconds (user + system) of this process and of process ``pid``."""
    import psutil

    t = os.times()
    st = psutil.Process(pid).cpu_times()
    return t.user + t.system, st.user + st.system


def _cpu_pressure() -> float | None:
    """Share of the last minute some task waited for a CPU (Linux PSI): other load on the host."""
    try:
        with open("/proc/pressure/cpu") as f:
            return float(f.readline().split()[2].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def _summary(runs: list[tuple[int, float, list[float]]], batch: int, tables: int) -> dict:
    rates = [n * batch * tables / el for n, el, _ in runs]
    lat = np.concatenate([np.asarray(x) for _, _, x in runs]) * 1e3
    return {
        "pooled_lookups_per_s": float(np.median(rates)),
        "pooled_lookups_per_s_reps": [round(r) for r in rates],
        "samples_per_s": float(np.median(rates)) / tables,
        "batches": int(sum(n for n, _, _ in runs)),
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p99": float(np.percentile(lat, 99)),
                       "mean": float(lat.mean())},
    }


def measure(model: Path, spec, batches: list, threads: int, seconds: float, reps: int, credits: str,
            log: Path) -> dict:
    """Server vs local at one torch thread count, alternating repetitions."""
    import torch

    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType

    torch.set_num_threads(threads)
    batch, T = len(batches[0][1][0]), len(spec.tables)
    _log(f"[{threads} torch thread(s)] starting one embedding server process ...")
    server = ServerProcess(model, threads, log)
    local = LocalPool(model, spec)
    client = ServerClient(server.port, encode_batches(batches), credits=credits == "priority")
    try:
        _log(f"[{threads} torch thread(s)] warming up (page cache, kernels) and checking the server's answers ...")
        max_err = 0.0
        for i in range(len(batches)):
            want = local(*batches[i])
            ftype, payload = client.request(i)
            if ftype != FrameType.LOOKUP_RESP:
                raise RuntimeError(f"server answered frame type {ftype}: {codec.decode_error(payload)}")
            _, got = codec.decode_lookup_response(payload)
            for g, w in zip(got, want):
                w = w.numpy()
                max_err = max(max_err, float(np.max(np.abs(g - w)) / max(1e-6, float(np.max(np.abs(w))))))
        if max_err > 1e-5:
            raise RuntimeError(f"server and local pooling disagree (max relative error {max_err:.2e})")
        s0 = server_stats(server.port)
        per = seconds / reps
        local_runs, server_runs = [], []
        local_cpu: list[tuple[float, int]] = []             # (this process's CPU s, batches)
        server_cpu: list[tuple[float, float, int]] = []     # (client CPU s, server CPU s, batches)
        for r in range(reps):
            c0 = _cpu(server.pid)
            local_runs.append(run_local(local, batches, per))
            c1 = _cpu(server.pid)
            server_runs.append(client.run(per))
            c2 = _cpu(server.pid)
            local_cpu.append((c1[0] - c0[0], local_runs[-1][0]))
            server_cpu.append((c2[0] - c1[0], c2[1] - c1[1], server_runs[-1][0]))
            _log(f"[{threads} torch thread(s)] rep {r + 1}/{reps} ({per:.1f} s each): local "
                 f"{local_runs[-1][0] * batch * T / local_runs[-1][1]:,.0f} vs server "
                 f"{server_runs[-1][0] * batch * T / server_runs[-1][1]:,.0f} pooled lookups/s")
        s1 = server_stats(server.port)
    finally:
        client.close()
        server.stop()

    res_local = _summary(local_runs, batch, T)
    res_server = _summary(server_runs, batch, T)
    # CPU time per batch: less sensitive than wall time to other load on the host,
    # and it shows where the server path spends its cycles.
    nl = max(1, sum(n for _, n in local_cpu))
    ns = max(1, sum(n for _, _, n in server_cpu))
    res_local["cpu_ms_per_batch"] = 1e3 * sum(c for c, _ in local_cpu) / nl
    cpu = {"client": 1e3 * sum(c for c, _, _ in server_cpu) / ns, "server": 1e3 * sum(c for _, c, _ in server_cpu) / ns}
    cpu["total"] = cpu["client"] + cpu["server"]
    res_server["cpu_ms_per_batch"] = cpu
    wire_measured = (s1["bytes_in"] + s1["bytes_out"] - s0["bytes_in"] - s0["bytes_out"]) / max(1, res_server["batches"]
                                                                                               * batch)
    # Each repetition runs the two systems back to back, so its ratio shares the
    # host's load at that moment: the median of these is robust to drift.
    paired = [a / b for a, b in zip(res_server["pooled_lookups_per_s_reps"], res_local["pooled_lookups_per_s_reps"])]
    return {
        "threads": threads,
        "local": res_local,
        "server": res_server,
        "server_over_local": res_server["pooled_lookups_per_s"] / res_local["pooled_lookups_per_s"],
        "server_over_local_paired_median": float(np.median(paired)),
        "server_over_local_per_rep": [round(x, 3) for x in paired],
        "cpu_local_over_server_path": res_local["cpu_ms_per_batch"] / cpu["total"],
        "wire_measured_by_server_per_sample": wire_measured,
        "max_relative_error": max_err,
    }


def run(out: Path, rows_cap: int, batch: int, seconds: float, threads: list[int], reps: int,
        credits: str = "priority") -> dict:
    import torch

    from flexemr.model.spec import load_spec

    out.mkdir(parents=True, exist_ok=True)
    load0, psi0 = os.getloadavg()[0], _cpu_pressure()
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    T = len(spec.tables)
    _log(f"generating {N_BATCHES} batches of {batch} samples x {T} tables x {IDS_PER_BAG} ids ...")
    batches = make_batches(spec, batch, N_BATCHES)

    _log("wire bytes: partial pooling (1 server, 3 servers by rows) vs raw rows ...")
    wire = {"partial_1_server": wire_bytes(spec, batches, 1, "tables"),
            "partial_3_servers_rows": wire_bytes(spec, batches, 3, "rows"),
            "raw_rows": raw_bytes(spec, batches)}
    raw = wire["raw_rows"]["total_per_sample"]
    for k in ("partial_1_server", "partial_3_servers_rows"):
        wire[k]["raw_over_partial"] = raw / wire[k]["total_per_sample"]

    runs = [measure(model, spec, batches, n, seconds, reps, credits, out / f"dataplane-server-{n}t.log")
            for n in threads]
    wire["partial_1_server"]["measured_by_server_per_sample"] = runs[-1]["wire_measured_by_server_per_sample"]
    results = {
        "benchmark": "dataplane",
        "command": " ".join(["python -m flexemr_bench.dataplane", "--out", str(out), "--rows-cap", str(rows_cap),
                             "--batch", str(batch), "--seconds", f"{seconds:g}", "--threads",
                             ",".join(map(str, threads)), "--reps", str(reps), "--credits", credits]),
        "workload": {"preset": PRESET, "tables": T, "rows_per_table": spec.tables[0].rows, "dim": spec.tables[0].dim,
                     "pooling": "sum", "batch": batch, "ids_per_bag": IDS_PER_BAG, "zipf": ZIPF,
                     "distinct_batches": N_BATCHES},
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                 "loadavg_1m_before": load0, "loadavg_1m_after": os.getloadavg()[0],
                 "cpu_pressure_some_avg60_before": psi0, "cpu_pressure_some_avg60_after": _cpu_pressure()},
        "in_flight": IN_FLIGHT,
        "credits": credits,
        "reps": reps,
        "seconds_per_system": seconds,
        "runs": runs,
        "wire_bytes": wire,
        "targets": {"server_over_local": TARGET_RATIO, "wire_reduction": TARGET_WIRE,
                    "server_over_local_met": {str(r["threads"]): r["server_over_local_paired_median"] >= TARGET_RATIO
                                              for r in runs},
                    "wire_reduction_met": all(wire[k]["raw_over_partial"] >= TARGET_WIRE
                                              for k in ("partial_1_server", "partial_3_servers_rows"))},
    }
    (out / "dataplane.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "dataplane.png")
    return results


def _plot(results: dict, path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot()

    runs = results["runs"]
    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4.8))
    x = np.arange(len(runs))
    loc = [r["local"]["pooled_lookups_per_s"] / 1e6 for r in runs]
    srv = [r["server"]["pooled_lookups_per_s"] / 1e6 for r in runs]
    b1 = a1.bar(x - 0.2, loc, 0.4, label="local embedding_bag", color="#888888")
    b2 = a1.bar(x + 0.2, srv, 0.4, label="1 server, loopback TCP", color="#1f77b4")
    a1.bar_label(b1, [f"{v:.2f}M" for v in loc], fontsize=8)
    a1.bar_label(b2, [f"{v:.2f}M\n({r['server_over_local_paired_median']:.2f}x)" for v, r in zip(srv, runs)],
                 fontsize=8)
    for i, v in enumerate(loc):
        a1.plot([i - 0.4, i + 0.4], [v * TARGET_RATIO] * 2, "k--", lw=1,
                label=f"{TARGET_RATIO}x local (target)" if i == 0 else None)
    a1.set_xticks(x, [f"{r['threads']} torch thread(s)" for r in runs])
    a1.set_ylabel("pooled lookups / s (millions, median rep)")
    a1.set_title("throughput (label: paired median server/local)")
    a1.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, fontsize=8)

    w = 0.2
    for k, (name, key) in enumerate([("local p50", ("local", "p50")), ("local p99", ("local", "p99")),
                                     ("server p50", ("server", "p50")), ("server p99", ("server", "p99"))]):
        a2.bar(x + (k - 1.5) * w, [r[key[0]]["latency_ms"][key[1]] for r in runs], w, label=name,
               color=["#bbbbbb", "#666666", "#9ecae1", "#1f77b4"][k])
    a2.set_xticks(x, [f"{r['threads']} torch thread(s)" for r in runs])
    a2.set_ylabel("ms per batch")
    a2.set_title(f"latency per batch of {results['workload']['batch']} ({IN_FLIGHT} in flight to the server)")
    a2.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=4, fontsize=8)

    wb = results["wire_bytes"]
    labels = ["partial\n1 server", "partial\n3 srv (rows)", "raw rows\ndedup'd", "raw rows"]
    kb = [wb["partial_1_server"]["total_per_sample"], wb["partial_3_servers_rows"]["total_per_sample"],
          wb["raw_rows"]["dedup_total_per_sample"], wb["raw_rows"]["total_per_sample"]]
    bars = a3.bar(labels, [k / 1024 for k in kb], color=["#1f77b4", "#2ca02c", "#bbbbbb", "#888888"])
    a3.bar_label(bars, [f"{k / 1024:.1f}" for k in kb], fontsize=8)
    a3.set_ylabel("KiB on the wire per sample (both ways)")
    a3.set_title("partial pooling vs raw rows")
    wl, h = results["workload"], results["host"]
    fig.suptitle(f"data plane: {wl['preset']} {wl['tables']} x {wl['rows_per_table']:,} rows x {wl['dim']}, "
                 f"{wl['ids_per_bag']} ids/bag, batch {wl['batch']}; {h['cpus']} cpus, "
                 f"load {h['loadavg_1m_before']:.1f}->{h['loadavg_1m_after']:.1f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flexemr_bench.dataplane", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, help="output directory (model, dataplane.json, dataplane.png)")
    p.add_argument("--rows-cap", type=int, default=100_000, help="rows per table (rmc2 has 500k)")
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per system and thread count")
    p.add_argument("--reps", type=int, default=10, help="alternating repetitions sharing --seconds")
    cpus = os.cpu_count() or 1
    p.add_argument("--threads", default=",".join(str(n) for n in sorted({1, cpus})),
                   help="torch intra-op thread counts to compare at, comma-separated; each count is used by "
                        "the server and the local kernel alike (default: 1 and every cpu)")
    p.add_argument("--credits", choices=("priority", "off"), default="priority",
                   help="flow control of the server connection: the daemon's default (priority channel) or none")
    p.add_argument("--serve", metavar="MODEL", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    try:
        threads = [int(x) for x in str(a.threads).split(",") if x.strip()]
    except ValueError:
        p.error(f"--threads: expected comma-separated integers, got {a.threads!r}")
    if not threads or min(threads) < 1:
        p.error("--threads: every count must be >= 1")
    if a.serve:
        _serve(a.serve, threads[0])
        return 0
    if a.out is None:
        p.error("--out is required")
    r = run(a.out, a.rows_cap, a.batch, a.seconds, threads, a.reps, a.credits)
    for x in r["runs"]:
        loc, srv = x["local"], x["server"]
        print(f"[{x['threads']} thread(s)] pooled lookups/s  local {loc['pooled_lookups_per_s']:>11,.0f}  "
              f"server {srv['pooled_lookups_per_s']:>11,.0f}  server/local {x['server_over_local_paired_median']:.2f}"
              f" (paired median; target {TARGET_RATIO})")
        print(f"[{x['threads']} thread(s)] ms/batch  local p50 {loc['latency_ms']['p50']:.1f} p99 "
              f"{loc['latency_ms']['p99']:.1f}  server p50 {srv['latency_ms']['p50']:.1f} p99 "
              f"{srv['latency_ms']['p99']:.1f};  CPU ms/batch local {loc['cpu_ms_per_batch']:.1f}  server path "
              f"{srv['cpu_ms_per_batch']['total']:.1f} (server {srv['cpu_ms_per_batch']['server']:.1f} + client "
              f"{srv['cpu_ms_per_batch']['client']:.1f})")
    w = r["wire_bytes"]
    raw = w["raw_rows"]["total_per_sample"]
    for k in ("partial_1_server", "partial_3_servers_rows"):
        print(f"wire bytes/sample  {k:<24} {w[k]['total_per_sample']:>9,.0f}   raw rows {raw:,.0f}"
              f"   {w[k]['raw_over_partial']:.1f}x fewer (target {TARGET_WIRE})")
    print(f"host load {r['host']['loadavg_1m_before']:.1f} -> {r['host']['loadavg_1m_after']:.1f} (1-min loadavg, "
          f"{r['host']['cpus']} cpus)")
    print(f"wrote {a.out / 'dataplane.json'} and {a.out / 'dataplane.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
