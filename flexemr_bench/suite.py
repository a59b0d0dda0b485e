"""``emrctl bench``: every system side by side on the same requests, one run, one results.json.

    emrctl bench --suite quick|full --out DIR [--zipf 1.05]

What a run does, in order:

1. **Models.**  ``DIR/models/<preset>-<rows_cap>``: the DeepRecSys RMC1/2/3
   shapes with every table capped to fit this machine, written once (by
   ``emrctl model init`` in a child process, progress on stderr) and reused by
   later runs.
2. **Requests.**  Per model and batch size, a list of batches from one
   :class:`~flexemr.reqgen.RequestGenerator`: Zipf ids (exponent ``--zipf``)
   scattered over each table by a permutation (never clustered at low ids),
   Poisson bag lengths around the preset's ids/bag, a hot set that drifts
   every ``drift_every`` batches.  Generated once, before any clock starts,
   and replayed identically to every system (the client processes are forked
   and inherit them).
3. **Systems**, started as real processes and stopped by pid:

   ``flexemr``         ``flexemrd local``: 2 embedding servers, a ranker with 2
                       engines, the daemon's defaults (owned mapping, priority
                       credits, cache off).  Clients talk to its unix socket.
   ``inprocess``       the monolithic reference (:class:`~flexemr.monolithic.MonolithicModel`):
                       same model and tables in one process, torch on all cores.
   ``redis``           2 redis-servers holding every row, one key per row
                       (HugeCTR HPS's Redis tier); the ranker de-duplicates
                       ids per batch, fetches rows with MGETs pipelined to
                       both shards at once (RESP built and parsed with numpy),
                       pools with embedding_bag and runs the NN.
   ``flexemr-<knob>``  ablations: one daemon flag changed against ``flexemr``
                       (``--mapping shared``, ``--credits inband``, ``--engines 1``,
                       ``--cache-policy fixed|adaptive``), and ``flexemr-rawrows``:
                       flexemr's own embedding servers asked for raw rows (FETCH of
                       the de-duplicated ids) with pooling and the NN on the
                       ranker, i.e. no partial pooling.  An ablation whose flag
                       this build's ``flexemrd local`` lacks is skipped with a
                       note in results.json.

   The runners live in :mod:`flexemr_bench.systems`.

   **How the in-process limit is driven.**  It has no socket, so the load
   generator's client process *is* the system: one process calls
   ``predict`` back to back (closed loop) with torch's intra-op threads on
   every core, the way one monolithic host serves.  Open loop, that one
   process receives the same Poisson arrival stream (same aggregate rate) and
   serves it first come first served, latency counted from each scheduled
   arrival, so queueing shows exactly as for the socket systems.  The Redis
   ranker likewise lives in the client processes (one torch thread each,
   ``clients`` of them: the ranker's worker count).  Socket systems get
   ``clients`` closed-loop clients and ``open_clients`` open-loop clients
   whose requests the daemon batches together.

4. **Measurements.**  For each model: closed-loop maximum throughput at every
   batch size; ablations at one batch size, each repetition right after a
   fresh flexemr run; then open-loop Poisson arrivals at ``open_batch`` at two
   kinds of offered load: fractions of the *slowest* core system's
   closed-loop maximum (a load every system carries: latencies compare like
   for like; cells ``<model>-b<B>-open<pct>``) and fractions of *flexemr's*
   maximum (``...-open<pct>-flexemr``), where a system that cannot carry the
   load is still driven, for a window cut to the same amount of work, and
   marked ``saturated``.  An open-loop cell lasts until about
   ``open_min_requests`` arrivals (at most ``open_max_stretch`` times its duration).  Each
   measurement records samples/s, p50/p95/p99, a 101-point latency CDF,
   wire bytes per sample, CPU seconds per sample, client CPU, errors, and
   ``background_cpu_cores``: the CPU other processes of the machine took
   meanwhile (this is a shared 2-core host; the table flags noisy cells).
   A measurement that fails is recorded under the cell's ``failed``; a
   system that then cannot answer one small request is not driven again.

   * **Wire bytes** cross between the ranker and its embedding store, both
     directions, read from the store's own counters before and after:
     flexemr's servers answer a ``STATS`` frame (``bytes_in + bytes_out``,
     headers included), redis-server's ``INFO stats``
     (``total_net_input_bytes + total_net_output_bytes``).  In-process: 0.
   * **CPU seconds** are user+system time of everything the system runs:
     the daemon's process tree or redis-server by psutil, plus the client
     processes' own CPU for the systems whose work runs there (inprocess,
     redis, flexemr-rawrows).  ``client_cpu_s_per_sample`` is reported
     separately for every system (for socket systems it is the harness).

5. **MLPerf LoadGen** (:mod:`flexemr_bench.mlperf`) drives flexemr's unix
   socket in the Offline and Server scenarios and reports the highest Server
   QPS whose p99 stays under the stated bound.

Each workload entry of ``results.json`` is one (model, batch size, loop)
cell: ``{"name": "rmc1-b1024-closed", "systems": {"flexemr": {...}, ...},
"ratios": {"flexemr/inprocess": {...}, ...}}``.  Plots go next to it.

The parent process never runs a torch operation: forked children of a process
whose OpenMP pool is live hang in their first parallel region.  It may import
torch (that starts no pool), so children skip the import.
"""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flexemr_bench.systems import (
    FlexemrDaemon,
    InprocessSystem,
    RawRowsSystem,
    RedisSystem,
    System,
    tree_cpu_seconds,
)
from flexemr.loadgen import _client_proc

CORE_SYSTEMS = ("flexemr", "inprocess", "redis")
BASELINES = ("inprocess", "redis")
RESULTS_VERSION = 1
NOISY_CORES = 0.3   # other processes' CPU during a cell above which the table flags it


# --------------------------------------------------------------------------- suites


@dataclasses.dataclass(frozen=True)
class ModelWorkload:
    """One model shape, capped, and the batch sizes it is measured at."""

    name: str
    preset: str
    rows_cap: int
    batch_sizes: tuple[int, ...]
    open_batch: int                      # batch size of the open-loop phase
    ablation_batch: int                  # batch size of the ablation phase (closed loop)
    max_ids_per_set: int = 24_000_000    # bounds the requests generated per batch size (memory, set-up time)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A flexemr variant: ``flags`` added to ``flexemrd local``; ``raw_rows``: pool on the ranker instead."""

    name: str
    flags: tuple[str, ...] = ()
    raw_rows: bool = False
    what: str = ""


ABLATIONS: tuple[Ablation, ...] = (
    Ablation("flexemr-rawrows", raw_rows=True, what="raw rows from flexemr's servers, pooling on the ranker"),
    Ablation("flexemr-shared", ("--mapping", "shared"), what="engines share every connection (locks)"),
    Ablation("flexemr-1engine", ("--engines", "1"), what="one engine instead of 2"),
    Ablation("flexemr-inband", ("--credits", "inband"), what="credits in band on the data connection"),
    Ablation("flexemr-cache-fixed", ("--cache-policy", "fixed"), what="ranker cache, fixed 64 MiB"),
    Ablation("flexemr-cache-adaptive", ("--cache-policy", "adaptive"), what="ranker cache, adaptive size"),
)


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    name: str
    workloads: tuple[ModelWorkload, ...]
    seconds: float                       # per measurement
    clients: int = 4                     # closed loop: socket clients / redis ranker workers
    open_clients: int = 8                # open loop: socket clients
    open_levels: tuple[float, ...] = (0.5,)           # of the slowest core system's closed-loop maximum
    flexemr_open_levels: tuple[float, ...] = (0.5,)   # of flexemr's closed-loop maximum
    open_seconds: float | None = None                 # per open-loop measurement (default: seconds)
    open_min_requests: int = 40        # an open-loop cell lasts until about this many arrivals ...
    open_max_stretch: float = 3.0      # ... but at most this many times its duration
    reps: int = 1                        # repetitions of every closed-loop cell (median kept)
    ablations: tuple[str, ...] = ()      # names from ABLATIONS
    ablation_workloads: tuple[str, ...] = ()
    ablation_open_levels: tuple[float, ...] = ()   # open-loop levels the ablations are also driven at
    drift_every: int = 4
    requests_per_set: int = 16
    mlperf_workload: str | None = None
    mlperf_batch: int = 256
    mlperf_seconds: float = 3.0
    mlperf_probes: int = 4
    mlperf_bound_ms: float = 50.0


_ALL_ABLATIONS = tuple(a.name for a in ABLATIONS)

SUITES: dict[str, SuiteSpec] = {
    "quick": SuiteSpec(
        "quick",
        (
            ModelWorkload("rmc1", "rmc1", 100_000, (64, 512, 4096), open_batch=64, ablation_batch=512),
            ModelWorkload("rmc2", "rmc2", 50_000, (64, 512), open_batch=64, ablation_batch=512),
            ModelWorkload("rmc3", "rmc3", 100_000, (64, 512, 4096), open_batch=64, ablation_batch=512),
        ),
        seconds=2.0,
        open_seconds=2.5,
        open_min_requests=20,
        open_max_stretch=1.6,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1",),
        requests_per_set=8,
        mlperf_workload="rmc1",
        mlperf_seconds=2.0,
        mlperf_probes=4,
    ),
    "full": SuiteSpec(
        "full",
        (
            ModelWorkload("rmc1", "rmc1", 200_000, (64, 256, 1024, 4096), open_batch=256, ablation_batch=1024),
            ModelWorkload("rmc2", "rmc2", 100_000, (64, 256, 1024, 4096), open_batch=64, ablation_batch=256),
            ModelWorkload("rmc3", "rmc3", 200_000, (64, 256, 1024, 4096), open_batch=256, ablation_batch=1024),
        ),
        seconds=6.0,
        open_levels=(0.25, 0.5, 0.8),
        flexemr_open_levels=(0.5, 0.8),
        reps=3,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1", "rmc2", "rmc3"),
        ablation_open_levels=(0.5,),
        mlperf_workload="rmc1",
        mlperf_seconds=6.0,
        mlperf_probes=6,
    ),
    # tests and a one-minute sanity check: the tiny model, 1-second cells
    "smoke": SuiteSpec(
        "smoke",
        (ModelWorkload("tiny", "tiny", 5_000, (64, 256), open_batch=64, ablation_batch=64),),
        seconds=1.0,
        open_min_requests=20,
        open_max_stretch=1.5,
        clients=2,
        open_clients=2,
        ablations=("flexemr-rawrows",),
        ablation_workloads=("tiny",),
        requests_per_set=4,
        mlperf_workload="tiny",
        mlperf_batch=64,
        mlperf_seconds=1.0,
        mlperf_probes=1,
    ),
}


# --------------------------------------------------------------------------- progress


class Progress:
    """Progress lines on stderr, stamped with the seconds since the run began."""

    def __init__(self, stream=None) -> None:
        self.t0 = time.monotonic()
        self.stream = stream or sys.stderr

    def __call__(self, msg: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {msg}", file=self.stream, flush=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0


# --------------------------------------------------------------------------- models and requests


def ensure_model(models_dir: Path, preset: str, rows_cap: int, log: Progress, seed: int = 0) -> Path:
    """``models_dir/<preset>-<rows_cap>``, written by ``emrctl model init`` unless already whole."""
    from flexemr.model.loader import validate_model_dir
    from flexemr.model.presets import capped, get_preset
    from flexemr.model.spec import load_spec

    out = models_dir / f"{preset}-{rows_cap}"
    want = capped(get_preset(preset).spec, rows_cap)
    if (out / "model.toml").exists():
        try:
            if load_spec(out) == want and not validate_model_dir(out):
                log(f"model {out} exists, reusing it")
                return out
        except Exception:  # any problem: rewrite it
            pass
    log(f"writing model {preset} capped at {rows_cap:,} rows per table to {out} "
        f"({want.embedding_bytes / 2**20:,.0f} MiB of tables) ...")
    # A child process: writing dense.pt runs torch ops, which this process must not (see module docstring).
    cmd = [sys.executable, "-m", "emrctl", "model", "init", "--preset", preset, "--out", str(out),
           "--rows-cap", str(rows_cap), "--seed", str(seed), "--force"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return out


def make_requests(gen, batch: int, ids_per_sample: int, wl: ModelWorkload, per_set: int) -> list:
    """Batches of ``batch`` samples from ``gen`` (its drift carries over from set to set)."""
    n = int(min(per_set, max(2, wl.max_ids_per_set // max(1, batch * ids_per_sample))))
    return [gen.batch(batch) for _ in range(n)]


# --------------------------------------------------------------------------- the load driver


@dataclasses.dataclass
class Measured:
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


def _client(make_call, requests, seconds, rate, seed, go, ready, out) -> None:
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


class _ListQueue:
    """Collects what ``_client_proc`` puts (it reports through a queue)."""

    def __init__(self) -> None:
        self.items: list = []

    def put(self, item) -> None:
        self.items.append(item)


def run_clients(make_call: Callable[[], Callable], requests: Sequence, clients: int, seconds: float,
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


def measure(system: System, requests: Sequence, clients: int, seconds: float, rate_per_client: float = 0.0) -> dict:
    """Drive ``system`` and return its row of results.json (see the module docstring for each field)."""
    snap: dict[str, float] = {}

    def on_start() -> None:
        snap["cpu"] = tree_cpu_seconds(system.server_pids())
        snap["wire"] = system.wire_bytes()
        snap["busy"] = _machine_busy_s()
        snap["t"] = time.monotonic()

    m = run_clients(system.make_call(), requests, clients, seconds, rate_per_client, on_start)
    busy = _machine_busy_s() - snap["busy"]
    wall = time.monotonic() - snap["t"]
    cpu = tree_cpu_seconds(system.server_pids()) - snap["cpu"]
    wire = system.wire_bytes() - snap["wire"]
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


def _machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (every core, every process)."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0) + getattr(t, "steal", 0.0)


def _median(runs: list[dict]) -> dict:
    """The run with the median samples/s (the lower of the middle two), with every run's rate."""
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    out = dict(ordered[(len(ordered) - 1) // 2])
    if len(runs) > 1:
        out["samples_per_s_runs"] = [r["samples_per_s"] for r in runs]
    return out


def ratios(systems: dict[str, dict]) -> dict[str, dict]:
    """Every flexemr variant against each baseline (and ablations against flexemr): >1 = more of it."""
    out: dict[str, dict] = {}
    pairs = [(s, b) for s in systems if s.startswith("flexemr") for b in BASELINES if b in systems]
    pairs += [(s, "flexemr") for s in systems if s.startswith("flexemr-") and "flexemr" in systems]
    for s, b in pairs:
        a, z = systems[s], systems[b]
        out[f"{s}/{b}"] = {k: _ratio(a.get(k), z.get(k))
                           for k in ("samples_per_s", "p50_ms", "p99_ms", "wire_bytes_per_sample", "cpu_s_per_sample")}
    return out


def _ratio(a, b) -> float | None:
    if a is None or b is None or not b or (isinstance(a, float) and math.isnan(a)) or math.isnan(b):
        return None
    return round(a / b, 3)


def _answer_child(make_call, request, out) -> None:
    try:
        out.put(("ok", np.asarray(make_call()(*request), dtype=np.float32)))
    except BaseException as e:
        out.put(("error", f"{type(e).__name__}: {e}"))


def answer(system: System, request, timeout: float = 300.0) -> np.ndarray:
    """``system``'s scores for one request, computed in a forked client (as the load generator would)."""
    import queue

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


def check_answers(systems: dict[str, System], request, reference: str = "inprocess") -> dict[str, float | str]:
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


REQUIRED_SYSTEM_KEYS = ("samples_per_s", "p50_ms", "p99_ms", "wire_bytes_per_sample")


def validate_results(results: dict) -> list[str]:
    """Problems with the results.json contract (empty: fine).

    ``workloads``: a list of objects with ``name`` and ``systems``, a map from
    system name (at least flexemr, inprocess, redis) to an object with at least
    samples_per_s, p50_ms, p99_ms, wire_bytes_per_sample (numbers).
    """
    problems = []
    wls = results.get("workloads")
    if not isinstance(wls, list) or not wls:
        return ["workloads: missing or not a non-empty list"]
    for i, c in enumerate(wls):
        where = f"workloads[{i}]"
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            problems.append(f"{where}: no name")
            continue
        where = f"workloads[{i}] ({c['name']})"
        systems = c.get("systems")
        if not isinstance(systems, dict):
            problems.append(f"{where}: systems is not a map")
            continue
        for name in CORE_SYSTEMS:
            if name not in systems:
                problems.append(f"{where}: system {name} missing")
        for name, r in systems.items():
            for k in REQUIRED_SYSTEM_KEYS:
                if not isinstance(r.get(k), (int, float)):
                    problems.append(f"{where}: systems.{name}.{k} missing or not a number")
    return problems


# --------------------------------------------------------------------------- machine


def machine_info() -> dict:
    import psutil

    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_version = torch.__version__
    except ImportError:
        torch_version = None
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model,
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch_version,
        "numpy": np.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _flexemrd_flags() -> str:
    """``flexemrd local --help``: which ablation flags this build has."""
    p = subprocess.run([sys.executable, "-m", "flexemrd", "local", "--help"], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    return p.stdout


def _ablation_supported(ab: Ablation, help_text: str) -> str | None:
    """None if supported, else why not."""
    for i in range(0, len(ab.flags), 2):
        flag, value = ab.flags[i], ab.flags[i + 1] if i + 1 < len(ab.flags) else None
        if flag not in help_text:
            return f"flexemrd local has no {flag} option in this build"
        m = re.search(re.escape(flag) + r" \[([^\]]+)\]", help_text)
        if value is not None and m and value not in m.group(1).split("|"):
            return f"flexemrd local {flag} does not accept {value!r} in this build"
    return None


# --------------------------------------------------------------------------- orchestration


class BenchInterrupted(Exception):
    """SIGTERM or SIGHUP arrived: every system was stopped, results so far are in results.json."""


def run_suite(suite: SuiteSpec | str, out: Path, zipf: float = 1.05, seed: int = 0, seconds: float | None = None,
              mlperf: bool = True, ablations: bool = True, workloads: Sequence[str] | None = None,
              command: str | None = None, log: Progress | None = None) -> dict:
    """Run ``suite``; write ``out/results.json`` and the plots; return the results."""
    import torch  # noqa: F401  imported (not used) here so that forked clients do not pay for the import

    spec = SUITES[suite] if isinstance(suite, str) else suite
    if seconds is not None:
        spec = dataclasses.replace(spec, seconds=seconds, open_seconds=None,
                                   mlperf_seconds=min(spec.mlperf_seconds, seconds))
    log = log or Progress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    selected = [w for w in spec.workloads if not workloads or w.name in workloads]
    if not selected:
        raise ValueError(f"no workload of suite {spec.name} is called {', '.join(workloads or [])} "
                         f"(known: {', '.join(w.name for w in spec.workloads)})")
    help_text = _flexemrd_flags()
    results: dict[str, Any] = {
        "version": RESULTS_VERSION,
        "suite": spec.name,
        "command": command or f"emrctl bench --suite {spec.name} --out {out}",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "settings": {"zipf_exponent": zipf, "seed": seed, "seconds_per_cell": spec.seconds,
                     "closed_loop_clients": spec.clients, "open_loop_clients": spec.open_clients,
                     "open_levels_of_slowest_max": list(spec.open_levels),
                     "open_levels_of_flexemr_max": list(spec.flexemr_open_levels),
                     "open_loop_seconds": spec.open_seconds or spec.seconds, "repetitions": spec.reps,
                     "drift_every_batches": spec.drift_every},
        "systems": {},
        "workloads": [],
        "models": {},
        "skipped": [],
        "issues": [],
    }

    def on_signal(signum, _frame):
        raise BenchInterrupted(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for wl in selected:
            _run_workload(spec, wl, out, zipf, seed, help_text, ablations, mlperf, results, log)
            _write(out, results)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        results["duration_s"] = round(log.elapsed, 1)
        results["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
        _write(out, results)
    try:
        from flexemr_bench.plots import write_plots

        results["plots"] = write_plots(results, out)
    except Exception as e:  # a plot must never lose the numbers
        results["issues"].append(f"plots: {type(e).__name__}: {e}")
    _write(out, results)
    (out / "summary.md").write_text(format_markdown(results))
    log(f"done in {log.elapsed:.0f} s: {out / 'results.json'}")
    return results


def _write(out: Path, results: dict) -> None:
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out / "results.json")


def _run_workload(spec: SuiteSpec, wl: ModelWorkload, out: Path, zipf: float, seed: int, help_text: str,
                  do_ablations: bool, do_mlperf: bool, results: dict, log: Progress) -> None:
    from flexemr.model.presets import get_preset
    from flexemr.model.spec import load_spec
    from flexemr.reqgen import RequestGenerator

    preset = get_preset(wl.preset)
    model = ensure_model(out / "models", wl.preset, wl.rows_cap, log)
    mspec = load_spec(model)
    results["models"][wl.name] = {
        "preset": wl.preset, "dir": str(model), "tables": len(mspec.tables),
        "rows_per_table": max(t.rows for t in mspec.tables), "dims": sorted({t.dim for t in mspec.tables}),
        "ids_per_bag": preset.ids_per_bag, "dense_features": mspec.dense_features,
        "interaction": mspec.interaction.value, "embedding_mib": round(mspec.embedding_bytes / 2**20, 1),
    }
    ids_per_sample = preset.ids_per_bag * len(mspec.tables)

    # --- systems (all boot at once; idle ones sleep while another is measured)
    wanted_ab: list[Ablation] = []
    if do_ablations and wl.name in spec.ablation_workloads:
        for ab in ABLATIONS:
            if ab.name not in spec.ablations:
                continue
            why = _ablation_supported(ab, help_text)
            if why:
                results["skipped"].append({"workload": wl.name, "system": ab.name, "why": why})
                log(f"  skipping {ab.name}: {why}")
            else:
                wanted_ab.append(ab)
    logs = out / "logs"
    flexemr = FlexemrDaemon("flexemr", model, logs / wl.name)
    systems: dict[str, System] = {"flexemr": flexemr, "inprocess": InprocessSystem(model),
                                  "redis": RedisSystem(model, log)}
    ablation_systems: dict[str, System] = {}
    for ab in wanted_ab:
        ablation_systems[ab.name] = (RawRowsSystem(flexemr) if ab.raw_rows
                                     else FlexemrDaemon(ab.name, model, logs / wl.name, ab.flags))
    started: list[System] = []
    try:
        log(f"{wl.name}: starting flexemr{''.join(', ' + n for n in ablation_systems)} and redis ...")
        for s in [*systems.values(), *ablation_systems.values()]:
            s.launch()
            started.append(s)
        # Requests are generated while the daemons boot.
        gen = RequestGenerator(mspec, preset.ids_per_bag, zipf_exponent=zipf, seed=seed + 17,
                               drift_every=spec.drift_every)
        reqsets: dict[int, list] = {}
        for b in sorted({*wl.batch_sizes, wl.open_batch, wl.ablation_batch}):
            reqsets[b] = make_requests(gen, b, ids_per_sample, wl, spec.requests_per_set)
        log(f"  generated requests: " + ", ".join(f"{len(v)} x {b}" for b, v in reqsets.items())
            + f" samples (zipf {zipf}, ~{ids_per_sample} ids/sample)")
        for s in [*systems.values(), *ablation_systems.values()]:
            s.wait_ready()
        log("  all systems ready; checking that every system gives the same scores ...")
        try:
            diffs = check_answers({**systems, **ablation_systems}, reqsets[min(reqsets)][0])
        except RuntimeError as e:
            diffs = {}
            results["issues"].append(f"{wl.name}: answer check failed: {e}")
            log(f"  ISSUE answer check failed: {e}")
        results.setdefault("answer_check", {})[wl.name] = {
            k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in diffs.items()}
        for name, d in diffs.items():
            if isinstance(d, str):
                results["issues"].append(f"{wl.name}: {name} could not answer one request: {d}")
                log(f"  ISSUE {name} could not answer one request: {d}")
            elif not d <= 1e-3:
                results["issues"].append(f"{wl.name}: {name} scores differ from inprocess by up to {d:.3g}")
                log(f"  ISSUE {name}: scores differ from inprocess by up to {d:.3g}")
        for name, s in {**systems, **ablation_systems}.items():
            results["systems"].setdefault(name, s.describe())

        def clients_for(s: System, open_loop: bool) -> int:
            if s.workers is not None:
                return s.workers
            if s.resident:
                return spec.clients
            return spec.open_clients if open_loop else spec.clients

        cells: dict[str, dict] = {}
        broken: dict[str, str] = {}
        probe = reqsets[min(reqsets)][0]

        def cell(name: str, **kw) -> dict:
            if name not in cells:
                cells[name] = {"name": name, "model": wl.name, **kw, "systems": {}}
                results["workloads"].append(cells[name])
            return cells[name]

        def try_measure(c: dict, name: str, s: System, *args) -> dict | None:
            """One measurement.  A failure is recorded (cell "failed", issues); a system that then cannot
            answer one small request within 60 s (dead or wedged) is not driven again."""
            if name in broken:
                return None
            try:
                r = measure(s, *args)
                if r["requests"] == 0:
                    raise RuntimeError("no request completed")
                return r
            except RuntimeError as e:
                c.setdefault("failed", {})[name] = str(e)
                results["issues"].append(f"{wl.name}: {name} failed in {c['name']}: {e}")
                log(f"    FAILED: {e}")
                try:
                    answer(s, probe, timeout=60)
                except RuntimeError as e2:
                    broken[name] = str(e2)
                    results["issues"].append(f"{wl.name}: {name} no longer answers ({e2}); not driven again")
                    log(f"    {name} no longer answers ({e2}); not driven again")
                return None

        # --- closed loop: maximum throughput per batch size (systems interleaved, repetitions interleaved)
        closed_runs: dict[int, dict[str, list]] = {}
        for b in wl.batch_sizes:
            c = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            runs = closed_runs.setdefault(b, {})
            for rep in range(spec.reps):
                for name, s in systems.items():
                    if name in broken:
                        continue
                    n = clients_for(s, False)
                    log(f"  {c['name']}: {name} [{rep + 1}/{spec.reps}] closed loop, {n} client(s), {spec.seconds:g} s")
                    r = try_measure(c, name, s, reqsets[b], n, spec.seconds)
                    if r is not None:
                        runs.setdefault(name, []).append(r)
                        _say(log, r)
            for name, rs in runs.items():
                c["systems"][name] = _median(rs)
            c["ratios"] = ratios(c["systems"])

        # --- ablations: closed loop at one batch size, each repetition right after flexemr again
        # (same time window: a noisy neighbour hits both), flexemr's runs pooled with the first phase's
        if ablation_systems:
            b = wl.ablation_batch
            c = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            c["ablation"] = True
            runs = closed_runs.setdefault(b, {})
            order = {"flexemr": flexemr, **ablation_systems}
            if b not in wl.batch_sizes:
                order = {**systems, **ablation_systems}
            for rep in range(spec.reps):
                for name, s in order.items():
                    if name in broken:
                        continue
                    n = clients_for(s, False)
                    log(f"  {c['name']}: {name} [{rep + 1}/{spec.reps}] closed loop, {n} client(s), {spec.seconds:g} s")
                    r = try_measure(c, name, s, reqsets[b], n, spec.seconds)
                    if r is not None:
                        runs.setdefault(name, []).append(r)
                        _say(log, r)
            for name, rs in runs.items():
                c["systems"][name] = _median(rs)
            c["ratios"] = ratios(c["systems"])

        # --- open loop: Poisson arrivals.  Two references: the slowest core system's closed-loop maximum
        # (an equal load every system carries) and flexemr's own maximum (a load the slow baselines may
        # not carry: such a system is still driven, for a window shortened to the same amount of work,
        # and marked saturated).
        b = wl.open_batch
        ref_cell = cells.get(f"{wl.name}-b{b}-closed")
        if ref_cell is None:
            ref_cell = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            for name, s in systems.items():
                r = try_measure(ref_cell, name, s, reqsets[b], clients_for(s, False), spec.seconds)
                if r is not None:
                    ref_cell["systems"][name] = r
            ref_cell["ratios"] = ratios(ref_cell["systems"])
        maxima = {n: r["samples_per_s"] for n, r in ref_cell["systems"].items()}
        slowest = min((maxima[n] for n in CORE_SYSTEMS if n in maxima), default=0.0)
        plan = [(lv, "slowest", slowest, "") for lv in spec.open_levels if slowest > 0]
        plan += [(lv, "flexemr", maxima["flexemr"], "-flexemr") for lv in spec.flexemr_open_levels
                 if maxima.get("flexemr")]
        for level, rel, ref, suffix in plan:
            offered = level * ref
            rate = offered / b     # requests/s offered in total
            c = cell(f"{wl.name}-b{b}-open{int(round(level * 100))}{suffix}", batch=b, mode="open",
                     offered_samples_per_s=round(offered, 1), offered_requests_per_s=round(rate, 3),
                     load_level=level, load_relative_to=rel)
            open_systems = dict(systems)
            if rel == "slowest" and level in spec.ablation_open_levels:
                open_systems.update(ablation_systems)
            for name, s in open_systems.items():
                if name in broken:
                    continue
                n = clients_for(s, True)
                base = spec.open_seconds or spec.seconds
                secs = min(max(base, spec.open_min_requests / rate), spec.open_max_stretch * base)
                cap = maxima.get(name)
                saturated = cap is not None and cap < offered
                if saturated:
                    secs = max(0.5, secs * cap / offered)
                log(f"  {c['name']}: {name} open loop, {rate:.2f} req/s ({offered:,.0f} samples/s), {n} client(s), "
                    f"{secs:.2g} s" + (f" (saturated: its maximum is {cap:,.0f} samples/s)" if saturated else ""))
                r = try_measure(c, name, s, reqsets[b], n, secs, rate / n)
                if r is not None:
                    if saturated:
                        r["saturated"] = True
                        r["max_samples_per_s"] = cap
                    c["systems"][name] = r
                    _say(log, r)
            c["ratios"] = ratios(c["systems"])

        # --- MLPerf LoadGen against flexemr's socket
        if do_mlperf and spec.mlperf_workload == wl.name and "flexemr" not in broken:
            from flexemr_bench.mlperf import run_mlperf

            mreq = make_requests(gen, spec.mlperf_batch, ids_per_sample, wl, max(spec.requests_per_set, 16))
            results["mlperf"] = run_mlperf(flexemr.sock, mreq, out / "mlperf", seconds=spec.mlperf_seconds,
                                           bound_ms=spec.mlperf_bound_ms, probes=spec.mlperf_probes, log=log,
                                           system="flexemr", workload=wl.name, batch=spec.mlperf_batch)
    except BenchInterrupted as e:
        results["issues"].append(f"interrupted by {e}")
        raise
    finally:
        log(f"{wl.name}: stopping {len(started)} system(s)")
        for s in reversed(started):
            try:
                s.stop()
            except Exception as e:
                results["issues"].append(f"{s.name}: stop failed: {type(e).__name__}: {e}")
        for s in started:
            for issue in s.issues():
                results["issues"].append(f"{wl.name}: {issue}")
                log(f"  ISSUE {issue}")


def _say(log: Progress, r: dict) -> None:
    err = f", {r['errors']} ERRORS" if r["errors"] else ""
    log(f"    {r['samples_per_s']:>12,.0f} samples/s  p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  "
        f"wire {r['wire_bytes_per_sample']:,.0f} B/sample  cpu {r['cpu_s_per_sample'] * 1e6:,.0f} us/sample{err}")


# --------------------------------------------------------------------------- the table


def format_table(results: dict) -> str:
    """The summary printed at the end: one line per (workload cell, system).

    ``vs inproc`` / ``vs redis``: samples/s ratio in closed-loop cells (more is
    better), p99 ratio in open-loop cells (same offered load; less is better).
    ``bg`` is the CPU (in cores) that other processes took during the cell;
    ``*`` marks cells where that exceeded NOISY_CORES (numbers less trustworthy).
    """
    head = (f"{'workload':20} {'system':22} {'samples/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} "
            f"{'wire B/smp':>10} {'cpu us/smp':>10} {'vs inproc':>10} {'vs redis':>10} {'bg':>4}")
    lines = [head, "-" * len(head)]
    for c in results["workloads"]:
        key = "samples_per_s" if c["mode"] == "closed" else "p99_ms"
        tag = "" if c["mode"] == "closed" else "p99 "
        for name, r in c["systems"].items():
            ri = c.get("ratios", {}).get(f"{name}/inprocess", {}).get(key)
            rr = c.get("ratios", {}).get(f"{name}/redis", {}).get(key)
            lines.append(f"{c['name']:20} {name:22} {r['samples_per_s']:>10,.0f} {r['p50_ms']:>8.2f} "
                         f"{r['p95_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['wire_bytes_per_sample']:>10,.0f} "
                         f"{r['cpu_s_per_sample'] * 1e6:>10,.0f} {_fmt_ratio(ri, tag):>10} {_fmt_ratio(rr, tag):>10} "
                         f"{r.get('background_cpu_cores', 0):>4.1f}"
                         + ("*" if r.get("background_cpu_cores", 0) > NOISY_CORES else "")
                         + (f"  ({r['errors']} errors)" if r.get("errors") else ""))
        for name, why in c.get("failed", {}).items():
            lines.append(f"{c['name']:20} {name:22} FAILED: {why[:120]}")
        lines.append("")
    m = results.get("mlperf")
    if m:
        lines.append(mlperf_line(m))
    noisy = sum(1 for c in results["workloads"] for r in c["systems"].values()
                if r.get("background_cpu_cores", 0) > NOISY_CORES)
    if noisy:
        lines.append(f"* {noisy} measurement(s) shared the machine with other processes using > {NOISY_CORES} "
                     f"cores (column bg); repeat on a quiet machine for firm numbers")
    for s in results.get("skipped", []):
        lines.append(f"skipped {s['system']} on {s['workload']}: {s['why']}")
    for i in results.get("issues", []):
        lines.append(f"ISSUE: {i}")
    return "\n".join(lines)


def mlperf_line(m: dict) -> str:
    off = m.get("offline", {})
    srv = m.get("server", {})
    best = srv.get("best_qps")
    return (f"MLPerf LoadGen ({m.get('system')}, {m.get('workload')}, {m.get('batch')} samples/query): "
            f"Offline {off.get('qps', float('nan')):,.1f} QPS; Server: highest QPS with p99 <= "
            f"{srv.get('bound_ms')} ms = " + (f"{best:,.1f}" if best else "none found")
            + (f" (p99 {srv.get('best_p99_ms'):.1f} ms)" if best else ""))


def format_markdown(results: dict) -> str:
    """results.json as Markdown tables (written to DIR/summary.md; pasted into docs/PERFORMANCE.md)."""
    m = results.get("machine", {})
    out = [f"Command: `{results.get('command')}` ({results.get('duration_s', 0):.0f} s, {results.get('started')})",
           "",
           f"Machine: {m.get('nproc')} CPUs ({m.get('cpu_model')}), {m.get('ram_gib')} GiB RAM, Linux "
           f"{m.get('kernel')}, Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}; load "
           f"average {m.get('loadavg_at_start')} at start, {m.get('loadavg_at_end')} at end.",
           "",
           "### Headline: flexemr against each baseline",
           "",
           "Closed loop: samples/s ratio (> 1: flexemr is faster).  Open loop (same Poisson load for every "
           "system): p99 ratio (< 1: flexemr answers faster).",
           "",
           "| workload | flexemr samples/s | p99 ms | flexemr / inprocess | flexemr / redis |",
           "|---|---:|---:|---:|---:|"]
    for c in results["workloads"]:
        f = c["systems"].get("flexemr")
        if f is None:
            continue
        key = "samples_per_s" if c["mode"] == "closed" else "p99_ms"
        tag = "" if c["mode"] == "closed" else "p99 "
        r = c.get("ratios", {})
        out.append(f"| {c['name']} | {f['samples_per_s']:,.0f} | {f['p99_ms']:.1f} | "
                   f"{_fmt_ratio(r.get('flexemr/inprocess', {}).get(key), tag)} | "
                   f"{_fmt_ratio(r.get('flexemr/redis', {}).get(key), tag)} |")
    out += ["", "### Every measurement", "",
            "| workload | system | samples/s | p50 ms | p95 ms | p99 ms | wire B/sample | CPU us/sample | other CPU (cores) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for c in results["workloads"]:
        for name, r in c["systems"].items():
            bg = r.get("background_cpu_cores", 0)
            out.append(f"| {c['name']} | {name} | {r['samples_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} | "
                       f"{r['p99_ms']:.1f} | {r['wire_bytes_per_sample']:,.0f} | {r['cpu_s_per_sample'] * 1e6:,.0f} | "
                       f"{bg:.1f}{' *' if bg > NOISY_CORES else ''} |")
        for name, why in c.get("failed", {}).items():
            out.append(f"| {c['name']} | {name} | failed: {why[:100]} | | | | | | |")
    mp_ = results.get("mlperf")
    if mp_:
        out += ["", "### MLPerf LoadGen", "", mlperf_line(mp_)]
    for sk in results.get("skipped", []):
        out.append(f"\nSkipped {sk['system']} on {sk['workload']}: {sk['why']}")
    if results.get("issues"):
        out += ["", "### Issues seen during the run", ""] + [f"- {i}" for i in results["issues"]]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m flexemr_bench.suite DIR``: print the table of DIR/results.json again and rewrite summary.md."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m flexemr_bench.suite DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    results = json.loads((out / "results.json").read_text())
    (out / "summary.md").write_text(format_markdown(results))
    print(format_table(results))
    return 0


def _fmt_ratio(x, tag: str = "") -> str:
    return "-" if x is None else f"{tag}{x:.2f}"


__all__ = ["BenchInterrupted", "SUITES", "SuiteSpec", "ModelWorkload", "ABLATIONS", "run_suite", "format_table", "measure", "run_clients",
           "ratios", "check_answers", "validate_results", "machine_info", "format_markdown"]


if __name__ == "__main__":
    sys.exit(main())
