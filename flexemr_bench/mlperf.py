"""MLPerf LoadGen (``mlcommons-loadgen``) driving a ranker's unix socket: Offline and Server.

One LoadGen *query sample* is one inference request of ``batch``
recommendation samples (a user and ``batch`` candidate items, as MLPerf's
DLRM benchmark aggregates several items per sample); the QSL holds
pre-generated requests in memory, so load/unload are no-ops.

The SUT hands each query sample to a pool of worker threads, each with its
own :class:`~flexemr.client.InferenceClient` (a client serves one request at
a time), and completes it with ``QuerySamplesComplete`` when the scores come
back.  The client spends its time in ``sendmsg``/``recv`` with the GIL
released, so threads suffice.

* **Offline**: every sample at once; the result is samples (queries) per second.
* **Server**: Poisson arrivals at ``server_target_qps``; LoadGen measures each
  query from its scheduled arrival.  :func:`server_search` bisects for the
  highest QPS whose p99 latency stays under ``bound_ms`` (default 50 ms; a
  probe passes when LoadGen's 99th percentile is within the bound and it
  completed what it scheduled), between 0 and the Offline rate.  Short probes
  do not satisfy LoadGen's early-stopping statistics, so its VALID/INVALID
  verdict is recorded but not required.

    python -m flexemr_bench.mlperf --socket /tmp/r.sock --model DIR [--batch 256] [--bound-ms 50]
"""

from __future__ import annotations

import queue
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

DEFAULT_BOUND_MS = 50.0


def _parse_summary(path: Path) -> dict:
    text = path.read_text()

    def num(label: str) -> float | None:
        m = re.search(re.escape(label) + r"\s*:\s*([0-9.eE+-]+)", text)
        return float(m.group(1)) if m else None

    out = {
        "valid": bool(re.search(r"Result is\s*:\s*VALID", text)),
        "constraints_satisfied": bool(re.search(r"Performance constraints satisfied\s*:\s*Yes", text)),
        "early_stopping_satisfied": bool(re.search(r"Early stopping satisfied\s*:\s*Yes", text)),
    }
    for key, label in (("completed_qps", "Completed samples per second"),
                       ("scheduled_qps", "Scheduled samples per second"),
                       ("offline_qps", "Samples per second")):
        v = num(label)
        if v is not None:
            out[key] = v
    for q in ("50.00", "90.00", "95.00", "99.00"):
        v = num(f"{q} percentile latency (ns)")
        if v is not None:
            out[f"p{q[:2]}_ms"] = round(v / 1e6, 3)
    return out


class SocketSUT:
    """LoadGen SUT over ``workers`` InferenceClients on ``sock``; ``requests`` is the QSL."""

    def __init__(self, sock: str, requests: Sequence, workers: int = 8) -> None:
        import mlperf_loadgen as lg

        from flexemr.client import InferenceClient

        self.lg = lg
        self.requests = requests
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.errors = 0
        self.clients = [InferenceClient(sock, timeout=300) for _ in range(workers)]
        self.threads = [threading.Thread(target=self._work, args=(c,), daemon=True, name=f"sut-{i}")
                        for i, c in enumerate(self.clients)]
        for t in self.threads:
            t.start()
        self.sut = lg.ConstructSUT(self._issue, self._flush)
        n = len(requests)
        self.qsl = lg.ConstructQSL(n, n, lambda _idx: None, lambda _idx: None)

    def _issue(self, samples) -> None:
        for s in samples:
            self.q.put(s)

    def _flush(self) -> None:
        pass

    def _work(self, client) -> None:
        lg = self.lg
        while True:
            s = self.q.get()
            if s is None:
                return
            dense, sparse = self.requests[s.index % len(self.requests)]
            try:
                client.predict(dense, sparse)
            except Exception:
                self.errors += 1   # still completed: LoadGen would otherwise wait forever
            lg.QuerySamplesComplete([lg.QuerySampleResponse(s.id, 0, 0)])

    def run(self, settings, outdir: Path) -> dict:
        lg = self.lg
        outdir.mkdir(parents=True, exist_ok=True)
        log = lg.LogSettings()
        log.log_output.outdir = str(outdir)
        log.log_output.copy_summary_to_stdout = False
        log.enable_trace = False
        errors0 = self.errors
        t0 = time.monotonic()
        lg.StartTestWithLogSettings(self.sut, self.qsl, settings, log)
        res = _parse_summary(outdir / "mlperf_log_summary.txt")
        res["wall_s"] = round(time.monotonic() - t0, 2)
        res["errors"] = self.errors - errors0
        for f in ("mlperf_log_trace.json", "mlperf_log_accuracy.json"):   # large or empty; the summary stays
            (outdir / f).unlink(missing_ok=True)
        return res

    def close(self) -> None:
        for _ in self.threads:
            self.q.put(None)
        for t in self.threads:
            t.join(30)
        for c in self.clients:
            c.close()
        self.lg.DestroyQSL(self.qsl)
        self.lg.DestroySUT(self.sut)


def _settings(scenario: str, seconds: float, qps: float, bound_ms: float):
    import mlperf_loadgen as lg

    st = lg.TestSettings()
    st.mode = lg.TestMode.PerformanceOnly
    st.min_duration_ms = int(seconds * 1000)
    st.min_query_count = 1
    if scenario == "offline":
        st.scenario = lg.TestScenario.Offline
        st.offline_expected_qps = max(1.0, qps)
    else:
        st.scenario = lg.TestScenario.Server
        st.server_target_qps = max(0.1, qps)
        st.server_target_latency_ns = int(bound_ms * 1e6)
        st.server_target_latency_percentile = 0.99
    return st


def estimate_qps(sut: SocketSUT, seconds: float = 1.0) -> float:
    """A rough closed-loop rate (every worker busy), to size the Offline run."""
    done = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def loop(c) -> None:
        i = 0
        while time.monotonic() < stop:
            c.predict(*sut.requests[i % len(sut.requests)])
            i += 1
            with lock:
                done[0] += 1

    # separate clients: the SUT's are owned by its workers
    from flexemr.client import InferenceClient

    clients = [InferenceClient(sut.clients[0].path, timeout=300) for _ in sut.clients]
    t0 = time.monotonic()
    ts = [threading.Thread(target=loop, args=(c,)) for c in clients]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for c in clients:
        c.close()
    return done[0] / (time.monotonic() - t0)


def server_search(sut: SocketSUT, outdir: Path, ceiling_qps: float, seconds: float, bound_ms: float, probes: int,
                  log: Callable[[str], None]) -> dict:
    """Bisect (0, ceiling] for the highest Server QPS with p99 <= bound_ms."""
    lo, hi = 0.0, ceiling_qps
    tried = []
    best = None
    q = 0.6 * ceiling_qps
    for i in range(max(1, probes)):
        res = sut.run(_settings("server", seconds, q, bound_ms), outdir / f"server-{i}")
        p99 = res.get("p99_ms", float("inf"))
        kept_up = res.get("completed_qps", 0.0) >= 0.9 * res.get("scheduled_qps", q)
        ok = p99 <= bound_ms and kept_up and not res["errors"]
        tried.append({"target_qps": round(q, 3), "pass": ok, **res})
        log(f"    Server {q:,.1f} QPS: p99 {p99:.1f} ms, completed {res.get('completed_qps', 0):,.1f} QPS "
            f"-> {'pass' if ok else 'fail'}")
        if ok:
            lo = q
            if best is None or q > best["target_qps"]:
                best = tried[-1]
        else:
            hi = q
        q = (lo + hi) / 2
    return {
        "bound_ms": bound_ms,
        "percentile": 99,
        "best_qps": round(best["target_qps"], 3) if best else None,
        "best_p99_ms": best.get("p99_ms") if best else None,
        "probes": tried,
    }


def run_mlperf(sock: str, requests: Sequence, outdir: Path, seconds: float = 5.0, bound_ms: float = DEFAULT_BOUND_MS,
               probes: int = 4, log: Callable[[str], None] = print, workers: int = 8, system: str = "flexemr",
               workload: str = "", batch: int | None = None) -> dict:
    """Offline, then the Server search; returns the ``mlperf`` section of results.json."""
    outdir = Path(outdir)
    shutil.rmtree(outdir, ignore_errors=True)
    batch = batch or len(requests[0][0])
    sut = SocketSUT(sock, requests, workers)
    try:
        est = estimate_qps(sut, min(1.0, seconds))
        log(f"  mlperf: {system} on {workload}, {batch} samples/query, {workers} SUT threads; "
            f"Offline (expecting ~{est:,.1f} QPS, {seconds:g} s) ...")
        off = sut.run(_settings("offline", seconds, est, bound_ms), outdir / "offline")
        off_qps = off.get("offline_qps") or est
        log(f"    Offline: {off_qps:,.1f} QPS ({off_qps * batch:,.0f} samples/s)")
        log(f"  mlperf: Server search, p99 bound {bound_ms:g} ms, {probes} probe(s) of {seconds:g} s ...")
        srv = server_search(sut, outdir, off_qps, seconds, bound_ms, probes, log)
    finally:
        sut.close()
    return {
        "system": system,
        "workload": workload,
        "batch": batch,
        "sut_threads": workers,
        "seconds_per_run": seconds,
        "offline": {"qps": round(off_qps, 3), "samples_per_s": round(off_qps * batch, 1), **off},
        "server": {**srv, "best_samples_per_s": round(srv["best_qps"] * batch, 1) if srv["best_qps"] else None},
        "logs": str(outdir),
    }


def main(argv: list[str] | None = None) -> int:
    """Drive a running ranker with LoadGen and print the result."""
    import argparse
    import json

    from flexemr.model.presets import PRESETS
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    ap = argparse.ArgumentParser(prog="python -m flexemr_bench.mlperf", description=main.__doc__)
    ap.add_argument("--socket", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ids-per-bag", type=int, default=None, help="default: the preset's, else 20")
    ap.add_argument("--zipf", type=float, default=1.05)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--bound-ms", type=float, default=DEFAULT_BOUND_MS)
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("mlperf-out"))
    a = ap.parse_args(argv)
    spec = load_spec(a.model)
    ipb = a.ids_per_bag or next((p.ids_per_bag for p in PRESETS.values() if p.spec.tables[0].dim == spec.tables[0].dim
                                 and len(p.spec.tables) == len(spec.tables)), 20)
    gen = RequestGenerator(spec, ipb, zipf_exponent=a.zipf, seed=5)
    reqs = [gen.batch(a.batch) for _ in range(32)]
    r = run_mlperf(a.socket, reqs, a.out, a.seconds, a.bound_ms, a.probes,
                   log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
