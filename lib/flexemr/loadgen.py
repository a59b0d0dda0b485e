"""Drive a ranker's inference socket with concurrent clients and measure it.

Closed loop: each client sends its next request as soon as the previous one
is answered (maximum throughput).  Open loop: requests arrive as a Poisson
process at a target rate, and latency counts from the scheduled arrival, so
queueing delay is not hidden (no coordinated omission).

Clients are separate processes (fork) so the load generator's own Python
work does not serialise behind one GIL; requests are generated before the
clock starts.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np

from flexemr.client import InferenceClient


@dataclasses.dataclass
class LoadResult:
    requests: int
    samples: int
    errors: int
    seconds: float
    latencies_s: np.ndarray

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        if not len(self.latencies_s):
            return float("nan")
        return float(np.percentile(self.latencies_s, q) * 1e3)

    def summary(self) -> dict:
        return {
            "requests": self.requests,
            "samples": self.samples,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "samples_per_s": round(self.samples_per_s, 1),
            "requests_per_s": round(self.requests_per_s, 2),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p95_ms": round(self.percentile_ms(95), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
        }


Request = tuple  # (dense, sparse)


def _client_proc(call: Callable, requests: Sequence[Request], seconds: float, rate: float, seed: int,
                 start_at: float, out) -> None:
    rng = np.random.default_rng(seed)
    lat: list[float] = []
    n = samples = errors = 0
    try:
        while time.time() < start_at:
            time.sleep(0.001)
        t_start = time.perf_counter()
        t_end = t_start + seconds
        next_at = t_start
        i = 0
        while True:
            if rate > 0:
                next_at += rng.exponential(1.0 / rate)
                if next_at >= t_end:
                    break
                delay = next_at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                t0 = next_at
            else:
                t0 = time.perf_counter()
                if t0 >= t_end:
                    break
            dense, sparse = requests[i % len(requests)]
            i += 1
            try:
                call(dense, sparse)
                lat.append(time.perf_counter() - t0)
                n += 1
                samples += len(dense)
            except Exception:
                errors += 1
        out.put((n, samples, errors, time.perf_counter() - t_start, np.asarray(lat)))
    except BaseException as e:  # report rather than hang the parent
        out.put((n, samples, errors + 1, 0.0, np.asarray(lat)))
        print(f"load client failed: {e}", file=sys.stderr)


def run_load(
    make_call: Callable[[], Callable],
    requests: Sequence[Request],
    clients: int = 8,
    seconds: float = 5.0,
    rate_per_client: float = 0.0,
) -> LoadResult:
    """Run ``clients`` processes for ``seconds``; ``make_call`` runs in each child."""
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3
    procs = []
    for c in range(clients):
        p = ctx.Process(target=_child, args=(make_call, requests[c::clients] or requests, seconds, rate_per_client,
                                             c, start_at, out), daemon=True)
        p.start()
        procs.append(p)
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(10)
    lat = np.concatenate([r[4] for r in results]) if results else np.zeros(0)
    return LoadResult(
        requests=sum(r[0] for r in results),
        samples=sum(r[1] for r in results),
        errors=sum(r[2] for r in results),
        seconds=max((r[3] for r in results), default=0.0),
        latencies_s=lat,
    )


def _child(make_call, requests, seconds, rate, seed, start_at, out) -> None:
    call = make_call()
    _client_proc(call, requests, seconds, rate, seed, start_at, out)


def socket_caller(path: str, kind: str = "predict") -> Callable[[], Callable]:
    """A factory (run in each client process) of a predict or lookup call."""

    def make() -> Callable:
        client = InferenceClient(path)
        if kind == "predict":
            return client.predict
        return lambda dense, sparse: client.lookup(sparse)

    return make


def wait_for_socket(path: str, timeout: float = 120.0, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with {proc.returncode} before serving {path}")
        if os.path.exists(path):
            try:
                InferenceClient(path, timeout=5).close()
                return
            except OSError:
                pass
        time.sleep(0.05)
    raise TimeoutError(f"nothing served {path} within {timeout:g} s")


def main(argv: list[str] | None = None) -> int:
    """``python -m flexemr.loadgen``: drive a running ranker and print what it did."""
    import argparse
    import json

    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    ap = argparse.ArgumentParser(prog="python -m flexemr.loadgen", description=main.__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--model", required=True, help="model directory (for table shapes)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=256, help="samples per request")
    ap.add_argument("--ids-per-bag", type=int, default=20)
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--kind", choices=["predict", "lookup"], default="predict")
    ap.add_argument("--rate", type=float, default=0.0, help="open loop: requests/s per client (0 = closed loop)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    spec = load_spec(a.model)
    gen = RequestGenerator(spec, ids_per_bag=a.ids_per_bag, zipf_exponent=a.zipf, seed=1)
    n_req = max(a.clients * 4, 32)
    print(f"generating {n_req} requests of {a.batch} samples ...", file=sys.stderr, flush=True)
    reqs = [gen.batch(a.batch) for _ in range(n_req)]
    wait_for_socket(a.socket)
    mode = f"open loop at {a.rate:g} req/s per client" if a.rate else "closed loop"
    print(f"driving {a.socket}: {a.clients} clients, {a.kind}, {mode}, {a.seconds:g} s ...", file=sys.stderr, flush=True)
    res = run_load(socket_caller(a.socket, a.kind), reqs, a.clients, a.seconds, a.rate)
    s = res.summary()
    if a.json:
        print(json.dumps(s))
    else:
        print(f"{'requests':>10} {'samples/s':>12} {'req/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>7}")
        print(f"{s['requests']:>10} {s['samples_per_s']:>12,.0f} {s['requests_per_s']:>9.1f} {s['p50_ms']:>8.2f} "
              f"{s['p95_ms']:>8.2f} {s['p99_ms']:>8.2f} {s['errors']:>7}")
    return 1 if res.errors else 0


if __name__ == "__main__":
    sys.exit(main())
