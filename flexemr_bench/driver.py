"""The load driver: starts and stops a workload's systems, drives them with forked clients, measures one cell.

:class:`SystemSet` holds one workload's systems (the core three and the
wanted ablations): they boot at once, idle ones sleep while another is
measured, and every process they started is stopped by pid.

:func:`run_clients` is ``flexemr.loadgen``'s client loop (closed loop when
``rate_per_client`` is 0, Poisson arrivals otherwise) in forked processes,
behind a ready barrier: each client builds its call and sends one warm-up
request, then the clock starts for everyone at once.  :func:`measure` wraps
it with the counters read before and after (CPU of the system's processes,
wire bytes, the machine's busy time) and returns one row of results.json.
:func:`answer` gets one request's scores the same way, for the answer check
and to tell a failed measurement from a dead system.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flexemr.loadgen import _client_proc
from flexemr_bench.systems import (
    FlexemrDaemon,
    InprocessSystem,
    RawRowsSystem,
    RedisSystem,
    System,
    tree_cpu_seconds,
)
from flexemr_bench.workloads import Ablation

Log = Callable[[str], None]
MakeCall = Callable[[], Callable]


# --------------------------------------------------------------------------- the systems of a workload


class SystemSet:
    """One workload's systems: ``flexemr``, ``inprocess``, ``redis`` and the ablations, started and stopped together."""

    def __init__(self, model: Path, logdir: Path, ablations: Sequence[Ablation], log: Log) -> None:
        self.flexemr = FlexemrDaemon("flexemr", model, logdir)
        # Baselines beside flexemr: the in-process limit with one caller and with
        # concurrent callers (the stronger one), the monolithic daemon (the same
        # ranker pooling its own tables: what the socket path alone costs), Redis.
        self.core: dict[str, System] = {"flexemr": self.flexemr, "inprocess": InprocessSystem(model),
                                        "inprocess-all": InprocessSystem(model, concurrent=True),
                                        "monolithic": FlexemrDaemon("monolithic", model, logdir, servers=0),
                                        "redis": RedisSystem(model, log)}
        self.ablations: dict[str, System] = {
            ab.name: RawRowsSystem(self.flexemr) if ab.raw_rows else FlexemrDaemon(ab.name, model, logdir, ab.flags)
            for ab in ablations}
        self.started: list[System] = []

    @property
    def all(self) -> dict[str, System]:
        """Core systems first, then the ablations (the order they are started, checked and described in)."""
        return {**self.core, **self.ablations}

    def launch(self) -> None:
        """Start every system without waiting (they boot while requests are generated)."""
        for s in self.all.values():
            s.launch()
            self.started.append(s)

    def wait_ready(self) -> None:
        for s in self.all.values():
            s.wait_ready()

    def stop(self) -> list[str]:
        """Stop what was started, last first; returns the stops that failed."""
        failed = []
        for s in reversed(self.started):
            try:
                s.stop()
            except Exception as e:
                failed.append(f"{s.name}: stop failed: {type(e).__name__}: {e}")
        return failed

    def issues(self) -> list[str]:
        """What the started systems noticed while running (log excerpts)."""
        return [issue for s in self.started for issue in s.issues()]


# --------------------------------------------------------------------------- load clients


@dataclasses.dataclass
class Measured:
    """What the clients of one measurement saw, summed over them."""

    requests: int
    samples: int
    errors: int
    seconds: float
    latencies_s: np.ndarray
    client_cpu_s: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1e3) if len(self.latencies_s) else float("nan")


class _ListQueue:
    """Collects what ``_client_proc`` puts (it reports through a queue)."""

    def __init__(self) -> None:
        self.items: list = []

    def put(self, item: Any) -> None:
        self.items.append(item)


def _client(make_call: MakeCall, requests: Sequence, seconds: float, rate: float, seed: int, go: Any,
            ready: Any, out: Any) -> None:
    """One forked load client: build the call, warm up, report ready, wait for ``go``, run, report."""
    try:
        call = make_call()
        call(*requests[0])  # warm: connections, page faults, torch's first-call set-up
    except BaseException as e:
        ready.put(("error", f"{type(e).__name__}: {e}"))
        return
    ready.put(("ok", ""))
    while go.value == 0.0:
        time.sleep(0.002)
    if go.value < 0:
        return
    inner = _ListQueue()
    c0 = time.process_time()   # the whole process: torch's worker threads too
    _client_proc(call, requests, seconds, rate, seed, go.value, inner)
    out.put((*inner.items[0], time.process_time() - c0))


def run_clients(make_call: MakeCall, requests: Sequence, clients: int, seconds: float,
                rate_per_client: float = 0.0, on_start: Callable[[], None] | None = None) -> Measured:
    """``flexemr.loadgen``'s closed/open loop (same client loop), plus a ready barrier and client CPU.

    Each forked client builds its call and sends one warm-up request; once all
    are ready ``on_start`` runs (the caller snapshots counters there) and the
    clock starts for everyone at once.
    """
    ctx = mp.get_context("fork")
    ready, out = ctx.Queue(), ctx.Queue()
    go = ctx.Value("d", 0.0, lock=False)
    procs = []
    for c in range(clients):
        part = list(requests[c::clients]) or list(requests)
        p = ctx.Process(target=_client, args=(make_call, part, seconds, rate_per_client, 1000 + c, go, ready, out),
                        daemon=True)
        p.start()
        procs.append(p)
    try:
        for _ in procs:
            status, msg = ready.get(timeout=300)
            if status != "ok":
                raise RuntimeError(f"load client could not start: {msg}")
        if on_start:
            on_start()
        go.value = time.time() + 0.05
        results = [out.get(timeout=seconds * 20 + 120) for _ in procs]
    finally:
        if go.value == 0.0:
            go.value = -1.0
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    lat = np.concatenate([r[4] for r in results]) if results else np.zeros(0)
    return Measured(requests=sum(r[0] for r in results), samples=sum(r[1] for r in results),
                    errors=sum(r[2] for r in results), seconds=max((r[3] for r in results), default=0.0),
                    latencies_s=lat, client_cpu_s=sum(r[5] for r in results))


# --------------------------------------------------------------------------- one measurement


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (every core, every process)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


class _Counters:
    """A system's counters and the machine's busy time, read when the clients' clock starts."""

    def __init__(self, system: System) -> None:
        self.system = system
        self.cpu = self.wire = self.busy = self.t = 0.0

    def snapshot(self) -> None:
        self.cpu = tree_cpu_seconds(self.system.server_pids())
        self.wire = self.system.wire_bytes()
        self.busy = _machine_busy_s()
        self.t = time.monotonic()


def measure(system: System, requests: Sequence, clients: int, seconds: float, rate_per_client: float = 0.0) -> dict:
    """Drive ``system`` and return its row of results.json (see :mod:`flexemr_bench.suite` for each field)."""
    start = _Counters(system)
    m = run_clients(system.make_call(), requests, clients, seconds, rate_per_client, start.snapshot)
    busy = _machine_busy_s() - start.busy
    wall = time.monotonic() - start.t
    cpu = tree_cpu_seconds(system.server_pids()) - start.cpu
    wire = system.wire_bytes() - start.wire
    # CPU the machine spent on anything but this system and its clients (other users, idle daemons)
    background = max(0.0, busy - cpu - m.client_cpu_s) / max(wall, 1e-9)
    if system.resident:
        cpu += m.client_cpu_s
    n = max(1, m.samples)
    lat_ms = m.latencies_s * 1e3
    cdf = np.percentile(lat_ms, np.arange(101)).round(3).tolist() if len(lat_ms) else []
    return {
        "samples_per_s": round(m.samples_per_s, 1),
        "requests_per_s": round(m.requests / m.seconds, 2) if m.seconds else 0.0,
        "p50_ms": round(m.percentile_ms(50), 3),
        "p95_ms": round(m.percentile_ms(95), 3),
        "p99_ms": round(m.percentile_ms(99), 3),
        "wire_bytes_per_sample": round(wire / n, 1),
        "cpu_s_per_sample": float(f"{cpu / n:.4g}"),
        "client_cpu_s_per_sample": float(f"{m.client_cpu_s / n:.4g}"),
        "requests": m.requests,
        "samples": m.samples,
        "errors": m.errors,
        "seconds": round(m.seconds, 3),
        "clients": clients,
        "background_cpu_cores": round(background, 2),
        "offered_requests_per_s": round(rate_per_client * clients, 3) if rate_per_client else None,
        "latency_cdf_ms": cdf,
    }


# --------------------------------------------------------------------------- one answer


def _answer_child(make_call: MakeCall, request: Any, out: Any) -> None:
    try:
        out.put(("ok", np.asarray(make_call()(*request), dtype=np.float32)))
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def answer(system: System, request: Any, timeout: float = 300.0) -> np.ndarray:
    """``system``'s scores for one request, computed in a forked client (as the load generator would)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_answer_child, args=(system.make_call(), request, q), daemon=True)
    p.start()
    try:
        status, val = q.get(timeout=timeout)
    except queue.Empty:
        status, val = "error", f"no answer within {timeout:g} s"
    finally:
        p.join(1)
        if p.is_alive():
            p.kill()
            p.join(5)
    if status != "ok":
        raise RuntimeError(f"{system.name}: {val}")
    return val


def check_answers(systems: dict[str, System], request: Any, reference: str = "inprocess") -> dict[str, float | str]:
    """Max |score - reference score| per system on one request (or why it could not answer)."""
    ref = answer(systems[reference], request)
    out: dict[str, float | str] = {}
    for name, s in systems.items():
        if name != reference:
            try:
                out[name] = float(np.max(np.abs(answer(s, request) - ref)))
            except RuntimeError as e:
                out[name] = str(e)
    return out
