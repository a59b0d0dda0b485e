"""Fronts side by side: the unix socket vs KServe HTTP (binary) vs KServe gRPC, one run.

    python -m flexemr_bench.fronts --out bench-out/fronts [--seconds 5] [--clients 2]

One ``flexemrd local`` (model ``bench8`` capped at ``--rows-cap`` rows per
table) with its KServe fronts inside the inference process (``--layout
daemon``, the default: ``flexemrd local --http-port --grpc-port``), or one
``python -m flexemr.kserve`` process in front of its socket (``--layout sidecar``).
For each batch size (256 and 2048 by default) and each front, ``--clients``
threads send the same pre-generated batches in a closed loop for
``--seconds`` (in interleaved 1 s rounds): the unix socket through ``InferenceClient.predict``, HTTP and
gRPC through the real ``tritonclient`` with KJT-convention inputs (binary
tensor data on HTTP).  Reported: samples/s, p50/p99 latency, and each KServe
front's ratio to the socket.  Writes ``fronts.json`` and ``fronts.png``.

What the ratio contains: inside the daemon, a KServe request pays the protocol
(HTTP or gRPC parsing, tensor conversion) and then joins the same batcher as
socket requests; as a sidecar it also pays one more local hop.  The client is Python too (tritonclient), as an
HPS user's would be.  tritonclient's PyPI wheel ships no ``perf_analyzer``
binary, so there is no perf_analyzer run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np

from flexemr_bench.daemon import ReadyProcess, free_ports

FRONTS = ("socket", "http", "grpc")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ensure_model(out: Path, rows_cap: int) -> Path:
    from flexemr.model.presets import init_model_dir

    model = out / f"bench8-{rows_cap}"
    if not ((model / "model.toml").exists() and (model / "dense.pt").exists()):
        _log(f"writing model bench8 ({rows_cap} rows/table) to {model}")
        init_model_dir(model, "bench8", seed=3, rows_cap=rows_cap)
    return model


def _kjt_inputs(mod: Any, dense: np.ndarray, sparse: dict) -> list:
    tensors = [("DES", dense, "FP32")]
    for name, (values, lengths) in sparse.items():
        tensors += [(f"{name}__values", values, "INT64"), (f"{name}__lengths", lengths, "INT32")]
    out = []
    for name, arr, dt in tensors:
        i = mod.InferInput(name, list(arr.shape), dt)
        i.set_data_from_numpy(arr)  # binary data on HTTP (tritonclient's default)
        out.append(i)
    return out


def _closed_loop(make_call: Callable[[], Callable[[int], object]], n_requests: int, clients: int,
                 seconds: float) -> tuple[list[float], int, float]:
    """``clients`` threads, each with its own connection, calling request i, i+1, ... for ``seconds``.

    Returns (latencies in s, errors, elapsed s).
    """
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    start_gate = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def worker(k: int) -> None:
        call = make_call()
        call(k % n_requests)  # warm the connection before the clock starts
        start_gate.wait()
        i = k
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            try:
                call(i % n_requests)
            except Exception:
                errors[k] += 1
            lat[k].append(time.perf_counter() - t0)
            i += clients

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start_gate.wait()
    t_begin = time.perf_counter()
    stop_at[0] = t_begin + seconds
    for t in threads:
        t.join()
    return [x for per in lat for x in per], int(sum(errors)), time.perf_counter() - t_begin


def _summary(lat_s: list[float], errors: int, elapsed: float, batch: int) -> dict[str, float | None]:
    ms = np.array(lat_s) * 1e3
    n = len(ms)
    return {"requests": n, "errors": errors, "seconds": round(elapsed, 3),
            "samples_per_s": round(n * batch / elapsed, 1) if elapsed else 0.0,
            "p50_ms": round(float(np.percentile(ms, 50)), 3) if n else None,
            "p99_ms": round(float(np.percentile(ms, 99)), 3) if n else None}


def run(out: Path, seconds: float, clients: int, batches: list[int], rows_cap: int, n_requests: int = 8,
        ids_per_bag: int = 20, layout: str = "daemon") -> dict[str, Any]:
    import tritonclient.grpc as tg
    import tritonclient.http as th

    from flexemr.client import InferenceClient
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    out.mkdir(parents=True, exist_ok=True)
    model = ensure_model(out, rows_cap)
    spec = load_spec(model)
    tmp = Path(tempfile.mkdtemp(prefix="flexemr-fronts-"))
    instance = "bf" + uuid.uuid4().hex[:8]
    sock = str(tmp / "ranker.sock")
    in_daemon = []
    if layout == "daemon":
        http_port, grpc_port = free_ports(2)
        in_daemon = ["--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    daemon = ReadyProcess([sys.executable, "-m", "flexemrd", "local", "--model", str(model), "--embedding-servers",
                           "2", "--engines", "1", "--socket", sock, "--instance", instance, "--log-level", "warning",
                           "--max-batch", str(max(batches) * clients), *in_daemon], tmp / "daemon.log")
    front = None
    try:
        if layout == "daemon":
            http_url, grpc_url = f"127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
        else:
            front = ReadyProcess([sys.executable, "-m", "flexemr.kserve", "--socket", sock, "--model", str(model),
                                  "--http-port", "0", "--grpc-port", "0", "--threads", str(max(2, clients)),
                                  "--log-level", "warning"], tmp / "kserve.log")
            ports = dict(kv.split("=") for kv in front.line.split()[1:])
            http_url, grpc_url = f"127.0.0.1:{ports['http']}", f"127.0.0.1:{ports['grpc']}"
        cells: dict[str, dict[str, dict[str, float | None]]] = {}
        rounds = max(1, round(seconds))
        for batch in batches:
            gen = RequestGenerator(spec, ids_per_bag, seed=batch)
            reqs = [gen.batch(batch) for _ in range(n_requests)]
            http_in = [_kjt_inputs(th, d, s) for d, s in reqs]
            grpc_in = [_kjt_inputs(tg, d, s) for d, s in reqs]

            def socket_call() -> Callable[[int], object]:
                c = InferenceClient(sock)
                return lambda i: c.predict(*reqs[i])

            def http_call() -> Callable[[int], object]:
                c = th.InferenceServerClient(http_url, connection_timeout=120, network_timeout=120)
                return lambda i: c.infer("flexemr", http_in[i]).as_numpy("OUTPUT0")

            def grpc_call() -> Callable[[int], object]:
                c = tg.InferenceServerClient(grpc_url)
                return lambda i: c.infer("flexemr", grpc_in[i]).as_numpy("OUTPUT0")

            # Interleaved rounds: each front gets a 1 s slice per round, so load from
            # elsewhere on the host (or a warming cache) falls on all three alike.
            fronts = (("socket", socket_call), ("http", http_call), ("grpc", grpc_call))
            acc: dict[str, tuple[list[float], int, float]] = {name: ([], 0, 0.0) for name, _ in fronts}
            for _ in range(rounds):
                for name, make in fronts:
                    lat, err, el = _closed_loop(make, n_requests, clients, seconds / rounds)
                    a = acc[name]
                    acc[name] = (a[0] + lat, a[1] + err, a[2] + el)
            cells[str(batch)] = {}
            for name, _ in fronts:
                r = _summary(*acc[name], batch)
                cells[str(batch)][name] = r
                _log(f"batch {batch:5d}  {name:6s}  {r['samples_per_s']:>10,.0f} samples/s  "
                     f"p99 {r['p99_ms']} ms  ({r['requests']} requests, {r['errors']} errors)")
            base = cells[str(batch)]["socket"]["samples_per_s"] or 1.0
            for name in ("http", "grpc"):
                cells[str(batch)][name]["ratio_to_socket"] = round(cells[str(batch)][name]["samples_per_s"] / base, 3)
    finally:
        if front is not None:
            front.stop()
        daemon.stop()
    results = {"benchmark": "fronts", "model": f"bench8 rows_cap={rows_cap}", "ids_per_bag": ids_per_bag,
               "clients": clients, "seconds": seconds,
               "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
               "layout": layout,
               "note": ("KServe fronts inside the inference process, feeding its batcher" if layout == "daemon" else
                        "KServe fronts run as their own process over the ranker's unix socket (one extra local hop)"),
               "results": cells}
    (out / "fronts.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, out / "fronts.png")
    return results


def plot(results: dict[str, Any], path: Path) -> None:
    from flexemr_bench.plots import pyplot

    plt = pyplot()

    batches = list(results["results"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    width = 0.8 / len(FRONTS)
    x = np.arange(len(batches))
    for k, name in enumerate(FRONTS):
        thr = [results["results"][b][name]["samples_per_s"] for b in batches]
        p99 = [results["results"][b][name]["p99_ms"] or 0 for b in batches]
        label = {"socket": "unix socket", "http": "KServe HTTP (binary)", "grpc": "KServe gRPC"}[name]
        ax1.bar(x + k * width, thr, width, label=label)
        ax2.bar(x + k * width, p99, width, label=label)
    for ax, title, unit in ((ax1, "throughput", "samples/s"), (ax2, "p99 latency", "ms")):
        ax.set_xticks(x + width, [f"batch {b}" for b in batches])
        ax.set_ylabel(unit)
        ax.set_title(f"{title} ({results['clients']} clients, closed loop)")
        ax.grid(axis="y", alpha=0.3)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.3)  # head room for the legend
    ax1.legend(loc="upper left", fontsize=8, ncols=3)
    fig.suptitle(f"flexemr fronts, {results['model']}, {results['host']['cpus']} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench-out/fronts"))
    ap.add_argument("--seconds", type=float, default=5.0, help="per front and batch size")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--batches", default="256,2048")
    ap.add_argument("--rows-cap", type=int, default=20000)
    ap.add_argument("--layout", choices=("daemon", "sidecar"), default="daemon",
                    help="KServe fronts inside the ranker (default) or as a separate process")
    args = ap.parse_args(argv)
    results = run(args.out, args.seconds, args.clients, [int(b) for b in args.batches.split(",")], args.rows_cap,
                  layout=args.layout)
    for b, row in results["results"].items():
        _log(f"batch {b}: http/socket {row['http']['ratio_to_socket']:.2f}x, "
             f"grpc/socket {row['grpc']['ratio_to_socket']:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
