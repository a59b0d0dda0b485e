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
   ``redis``           a redis-server holding every row (HugeCTR HPS's Redis
                       tier); the ranker de-duplicates ids per batch, fetches
                       rows with pipelined MGETs, pools with embedding_bag and
                       runs the NN (:mod:`flexemr.bench.redis_store`).
   ``flexemr-<knob>``  ablations: one daemon flag changed against ``flexemr``
                       (``--mapping shared``, ``--credits inband``, ``--engines 1``,
                       ``--cache-policy fixed|adaptive``), and ``flexemr-rawrows``:
                       flexemr's own embedding servers asked for raw rows (FETCH of
                       the de-duplicated ids) with pooling and the NN on the
                       ranker, i.e. no partial pooling.  An ablation whose flag
                       this build's ``flexemrd local`` lacks is skipped with a
                       note in results.json.

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
   batch size, then open-loop Poisson arrivals at fractions of the *slowest*
   core system's closed-loop maximum at ``open_batch`` (so every system can
   carry the offered load and latencies compare like for like).  Each
   measurement records samples/s, p50/p95/p99, a 101-point latency CDF,
   wire bytes per sample, CPU seconds per sample, client CPU and errors.

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

5. **MLPerf LoadGen** (:mod:`flexemr.bench.mlperf`) drives flexemr's unix
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
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from flexemr.loadgen import _client_proc, wait_for_socket

CORE_SYSTEMS = ("flexemr", "inprocess", "redis")
BASELINES = ("inprocess", "redis")
RESULTS_VERSION = 1


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
    open_levels: tuple[float, ...] = (0.5,)
    reps: int = 1                        # repetitions of every closed-loop cell (median kept)
    ablations: tuple[str, ...] = ()      # names from ABLATIONS
    ablation_workloads: tuple[str, ...] = ()
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
            ModelWorkload("rmc1", "rmc1", 100_000, (64, 512, 4096), open_batch=512, ablation_batch=512),
            ModelWorkload("rmc2", "rmc2", 50_000, (64, 512), open_batch=64, ablation_batch=512),
            ModelWorkload("rmc3", "rmc3", 100_000, (64, 512, 4096), open_batch=512, ablation_batch=512),
        ),
        seconds=2.5,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1",),
        requests_per_set=8,
        mlperf_workload="rmc1",
        mlperf_seconds=2.5,
        mlperf_probes=3,
    ),
    "full": SuiteSpec(
        "full",
        (
            ModelWorkload("rmc1", "rmc1", 200_000, (64, 256, 1024, 4096), open_batch=1024, ablation_batch=1024),
            ModelWorkload("rmc2", "rmc2", 100_000, (64, 256, 1024, 4096), open_batch=256, ablation_batch=256),
            ModelWorkload("rmc3", "rmc3", 200_000, (64, 256, 1024, 4096), open_batch=1024, ablation_batch=1024),
        ),
        seconds=8.0,
        open_levels=(0.25, 0.5, 0.8),
        reps=3,
        ablations=_ALL_ABLATIONS,
        ablation_workloads=("rmc1", "rmc2", "rmc3"),
        mlperf_workload="rmc1",
        mlperf_seconds=8.0,
        mlperf_probes=6,
    ),
    # tests and a one-minute sanity check: the tiny model, 1-second cells
    "smoke": SuiteSpec(
        "smoke",
        (ModelWorkload("tiny", "tiny", 5_000, (64, 256), open_batch=64, ablation_batch=64),),
        seconds=1.0,
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


# --------------------------------------------------------------------------- systems


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """user+system seconds of ``pids`` and all their descendants (threads included)."""
    import psutil

    seen: set[int] = set()
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total


class System:
    """Something measured: started, driven through ``make_call``, stopped by pid."""

    name = "system"
    resident = False        # True: its work runs inside the load-generator processes
    workers: int | None = None   # resident systems: fixed worker count (None: the suite's client count)

    def launch(self) -> None:
        """Start processes without waiting for them (several systems boot at once)."""

    def wait_ready(self) -> None:
        """Block until it serves."""

    def stop(self) -> None:
        """Stop every process it started, by pid."""

    def make_call(self) -> Callable[[], Callable]:
        raise NotImplementedError

    def server_pids(self) -> list[int]:
        return []

    def wire_bytes(self) -> int:
        return 0

    def describe(self) -> dict:
        return {}

    def issues(self) -> list[str]:
        """Problems noticed while running (log excerpts), for results.json and the operator."""
        return []


class FlexemrDaemon(System):
    """``flexemrd local`` as a subprocess tree; log (its stderr) at ``workdir/<name>.log``."""

    def __init__(self, name: str, model: Path, workdir: Path, flags: Sequence[str] = (), servers: int = 2,
                 engines: int = 2) -> None:
        self.name = name
        self.model = model
        self.flags = list(flags)
        self.servers = servers
        self.engines = engines
        tag = re.sub(r"[^A-Za-z0-9]", "", name)[-12:]
        self.instance = f"b{os.getpid() % 100000}{tag}"[:32]
        self.sock = f"/tmp/flexemr-bench-{self.instance}.sock"  # unix socket paths are short (108 bytes)
        self.log_path = workdir / f"{name}.log"
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._stats_addrs: list[tuple[str, int]] = []
        self._stop_note: str | None = None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "flexemrd", "local", "--model", str(self.model),
               "--embedding-servers", str(self.servers), "--engines", str(self.engines),
               "--socket", self.sock, "--instance", self.instance, "--log-level", "info"]
        # a repeated option takes its last value in click: ablation flags override the defaults above
        return cmd + self.flags

    def launch(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 240.0) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = ""
        while time.monotonic() < deadline:
            r, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                line = self.proc.stdout.readline()
                if "ready" in line or not line:
                    break
            elif self.proc.poll() is not None:
                break
        if "ready" not in line:
            self.stop()
            raise RuntimeError(f"{self.name}: flexemrd local did not become ready (exit {self.proc.returncode}); "
                               f"log {self.log_path}:\n{_tail(self.log_path, 40)}")
        wait_for_socket(self.sock, 60, self.proc)
        self._stats_addrs = self._find_servers()

    def _find_servers(self) -> list[tuple[str, int]]:
        """Embedding servers: the tree's listening TCP ports that answer a STATS frame."""
        import psutil

        ports: set[tuple[str, int]] = set()
        for pid in [self.proc.pid, *(c.pid for c in psutil.Process(self.proc.pid).children(recursive=True))]:
            try:
                for c in psutil.Process(pid).net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        ports.add((c.laddr.ip, c.laddr.port))
            except psutil.NoSuchProcess:
                pass
        out = []
        for addr in sorted(ports):
            try:
                server_stats(addr)
                out.append(addr)
            except (OSError, ValueError):
                pass
        return out

    @property
    def server_addresses(self) -> list[tuple[str, int]]:
        return list(self._stats_addrs)

    def wire_bytes(self) -> int:
        total = 0
        for addr in self._stats_addrs:
            s = server_stats(addr)
            total += s["bytes_in"] + s["bytes_out"]
        return total

    def server_pids(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def embedding_pids(self) -> list[int]:
        """The children holding the embedding listeners (not the supervisor, which keeps them too)."""
        import psutil

        ports = {p for _, p in self._stats_addrs}
        out = []
        for c in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if any(x.status == psutil.CONN_LISTEN and x.laddr.port in ports for x in c.net_connections("tcp")):
                    out.append(c.pid)
            except psutil.NoSuchProcess:
                pass
        return out

    def make_call(self) -> Callable[[], Callable]:
        sock = self.sock

        def make() -> Callable:
            from flexemr.client import InferenceClient

            return InferenceClient(sock, timeout=300).predict

        return make

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self._stop_note = "did not stop within 60 s of SIGTERM; killed its process group"
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        rc = self.proc.returncode
        if rc not in (0, -signal.SIGTERM) and self._stop_note is None:
            self._stop_note = f"exited with {rc}"
        if self._log:
            self._log.close()
            self._log = None

    def describe(self) -> dict:
        return {"command": " ".join(self.command()[1:]).replace("-m flexemrd", "flexemrd"),
                "log": str(self.log_path)}

    def issues(self) -> list[str]:
        out = []
        if self._stop_note:
            out.append(f"{self.name}: {self._stop_note}")
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return out
        bad = [ln for ln in text.splitlines()
               if re.search(r"\b(ERROR|CRITICAL|Traceback)\b|restart", ln) and "WARNING" not in ln]
        if bad:
            out.append(f"{self.name}: {len(bad)} error line(s) in {self.log_path}: " + " | ".join(bad[:6]))
        return out


def server_stats(addr: tuple[str, int], timeout: float = 5.0) -> dict[str, int]:
    """One embedding server's counters (a STATS frame; nothing else is said on the connection)."""
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.stream import FrameReader

    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(pack_header(FrameType.STATS, 1, 0))
        h, payload = FrameReader(s, 1 << 16).read_frame()
        if h.type != FrameType.STATS_RESP:
            raise ValueError(f"{addr}: answered frame type {h.type} to STATS")
        return codec.decode_stats(payload)


class InprocessSystem(System):
    """The monolithic reference: the client process holds the model and calls it (all cores)."""

    name = "inprocess"
    resident = True
    workers = 1

    def __init__(self, model: Path) -> None:
        self.model = model

    def make_call(self) -> Callable[[], Callable]:
        model = str(self.model)

        def make() -> Callable:
            import torch

            from flexemr.monolithic import MonolithicModel

            torch.set_num_threads(os.cpu_count() or 1)
            return MonolithicModel(model).predict

        return make

    def describe(self) -> dict:
        return {"how": "MonolithicModel.predict in the load-generator process, torch threads = all cores, "
                       "one request at a time"}


class RedisSystem(System):
    """Redis shards holding every row (HPS's Redis tier); the ranker (pooling + NN) runs in the client processes.

    ``shards`` redis-servers (as many as flexemr has embedding servers), row
    ``r`` of every table on shard ``r % shards``, keys as in
    :mod:`flexemr.bench.redis_store`.  The client is :class:`RedisRanker`.
    """

    name = "redis"
    resident = True

    def __init__(self, model: Path, log: Progress, shards: int = 2) -> None:
        self.model = model
        self.log = log
        self.n_shards = shards
        self.servers: list = []

    def launch(self) -> None:
        from flexemr.bench.redis_store import RedisServer

        for _ in range(self.n_shards):
            self.servers.append(RedisServer())

    def wait_ready(self) -> None:
        from flexemr.model.spec import load_spec
        from flexemr.model.tables import open_tables

        spec = load_spec(self.model)
        total = sum(t.rows for t in spec.tables)
        self.log(f"  redis: loading {total:,} rows into {self.n_shards} redis-server(s), pids "
                 f"{', '.join(str(s.pid) for s in self.servers)} ...")
        t0 = time.monotonic()
        store = RedisRanker(spec, self.ports)
        try:
            store.load(open_tables(self.model, spec))
            for i, port in enumerate(self.ports):
                keys = store.dbsize(i)
                if keys != sum(len(range(i, t.rows, self.n_shards)) for t in spec.tables):
                    raise RuntimeError(f"redis shard {i} holds {keys} keys, expected its share of {total}")
        finally:
            store.close()
        self.log(f"  redis: loaded in {time.monotonic() - t0:.1f} s")

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    def wire_bytes(self) -> int:
        import redis

        total = 0
        for port in self.ports:
            s = redis.Redis(port=port).info("stats")
            total += int(s["total_net_input_bytes"]) + int(s["total_net_output_bytes"])
        return total

    def server_pids(self) -> list[int]:
        return [s.pid for s in self.servers]

    def make_call(self) -> Callable[[], Callable]:
        return _ranker_call(self.model, "redis", self.ports)

    def stop(self) -> None:
        for s in self.servers:
            s.stop()

    def describe(self) -> dict:
        return {"how": f"{self.n_shards} redis-servers (no persistence, loopback), row r on shard r % "
                       f"{self.n_shards}, one key per row; per batch: np.unique ids per table, every table's MGET "
                       "pipelined to every shard at once, RESP built and parsed with numpy; embedding_bag and "
                       "the NN in the ranker = client processes, 1 torch thread each"}


def key_bytes(table: int, rows: np.ndarray) -> np.ndarray:
    """uint8 [n, 5]: the keys of :func:`flexemr.bench.redis_store.encode_keys`, as an array."""
    r = rows.astype(np.uint32, copy=False)
    k = np.empty((len(r), 5), dtype=np.uint8)
    k[:, 0] = 0x80 | table
    k[:, 1] = 0x80 | ((r >> 21) & 0x7F)
    k[:, 2] = 0x80 | ((r >> 14) & 0x7F)
    k[:, 3] = 0x80 | ((r >> 7) & 0x7F)
    k[:, 4] = 0x80 | (r & 0x7F)
    return k


def _resp_bulk(fields: np.ndarray) -> np.ndarray:
    """RESP bulk strings of equal length w: uint8 [n, w] -> [n, len("$w\r\n") + w + 2]."""
    n, w = fields.shape
    head = f"${w}\r\n".encode()
    out = np.empty((n, len(head) + w + 2), dtype=np.uint8)
    out[:, : len(head)] = np.frombuffer(head, dtype=np.uint8)
    out[:, len(head) : len(head) + w] = fields
    out[:, -2:] = (13, 10)
    return out


class RedisRanker:
    """The Redis client of the baseline ranker, as fast as the protocol allows.

    Every key is 5 bytes and every value ``4 * dim`` bytes, so an MGET command
    and its reply are arrays of fixed-size records: commands are built and
    replies parsed with numpy, no Python object per id.  Per batch, each
    table's ids are de-duplicated (``np.unique``), split over the shards, and
    every table's MGET goes out to every shard before any reply is read (one
    round trip per batch; redis buffers replies, so nothing blocks).
    """

    def __init__(self, spec, ports: Sequence[int], host: str = "127.0.0.1") -> None:
        from flexemr.wire.stream import recv_exact_into, send_buffers

        self.spec = spec
        self._recv_into, self._send = recv_exact_into, send_buffers
        self.socks = []
        for port in ports:
            s = socket.create_connection((host, port), timeout=120)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.socks.append(s)
        self.n = len(self.socks)

    def close(self) -> None:
        for s in self.socks:
            s.close()

    @staticmethod
    def _command(name: bytes, nargs: int) -> bytes:
        """``*argc $len name``: the head of a command whose ``nargs`` arguments follow as RESP records."""
        return f"*{nargs + 1}\r\n${len(name)}\r\n".encode() + name + b"\r\n"

    def _expect(self, i: int, expect: bytes) -> None:
        got = bytearray(len(expect))
        self._recv_into(self.socks[i], memoryview(got))
        if got != expect:
            raise RuntimeError(f"redis shard {i}: expected {expect!r}, got {bytes(got)!r}")

    def dbsize(self, i: int) -> int:
        self.socks[i].sendall(self._command(b"DBSIZE", 0))
        line = bytearray()
        while not line.endswith(b"\r\n"):
            line += self.socks[i].recv(1)
        return int(line[1:])

    def load(self, tables: dict[str, np.ndarray], chunk: int = 65536) -> None:
        """MSET every row (set-up, not timed)."""
        for ti, t in enumerate(self.spec.tables):
            arr = tables[t.name]
            for start in range(0, t.rows, chunk):
                rows = np.arange(start, min(t.rows, start + chunk))
                vals = np.ascontiguousarray(arr[start : start + len(rows)], dtype="<f4").view(np.uint8)
                for i in range(self.n):
                    sel = rows % self.n == i
                    k = int(sel.sum())
                    if k:
                        kv = np.concatenate([_resp_bulk(key_bytes(ti, rows[sel])), _resp_bulk(vals[sel])], axis=1)
                        self._send(self.socks[i], [self._command(b"MSET", 2 * k), kv])
                        self._expect(i, b"+OK\r\n")

    def lookup(self, sparse) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from flexemr.types import Pooling

        plan = []   # (name, table index, unique ids, inverse, lengths, [(shard, mask, count)])
        sends: list[list] = [[] for _ in range(self.n)]
        for name, (values, lengths) in sparse.items():
            ti = self.spec.table_index(name)
            uniq, inverse = np.unique(values, return_inverse=True)
            shard = uniq % self.n if self.n > 1 else np.zeros(len(uniq), dtype=np.int64)
            parts = []
            for i in range(self.n):
                mask = shard == i
                k = int(mask.sum())
                if k:
                    sends[i] += [self._command(b"MGET", k), _resp_bulk(key_bytes(ti, uniq[mask]))]
                    parts.append((i, mask, k))
            plan.append((name, ti, uniq, inverse, lengths, parts))
        for i, bufs in enumerate(sends):
            if bufs:
                self._send(self.socks[i], bufs)
        out = {}
        for name, ti, uniq, inverse, lengths, parts in plan:
            t = self.spec.tables[ti]
            w = 4 * t.dim
            head = f"${w}\r\n".encode()
            rec = len(head) + w + 2
            if not len(uniq):   # every bag empty: pooling gives zeros
                out[name] = np.zeros((len(lengths), t.dim), dtype=np.float32)
                continue
            rows = np.empty((len(uniq), t.dim), dtype=np.float32)
            for i, mask, k in parts:
                self._expect(i, f"*{k}\r\n".encode())
                buf = np.empty((k, rec), dtype=np.uint8)
                self._recv_into(self.socks[i], memoryview(buf).cast("B"))
                if not (buf[:, : len(head)] == np.frombuffer(head, dtype=np.uint8)).all():
                    raise RuntimeError(f"redis shard {i}: table {name}: a row is missing or has the wrong size")
                rows[mask] = buf[:, len(head) : len(head) + w].copy().view("<f4")
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            mode = {Pooling.SUM: "sum", Pooling.MEAN: "mean", Pooling.MAX: "max"}[t.pooling]
            out[name] = F.embedding_bag(torch.from_numpy(inverse.astype(np.int64, copy=False)), torch.from_numpy(rows),
                                        torch.from_numpy(offsets), mode=mode, include_last_offset=True).numpy()
        return out


class RawRowsSystem(System):
    """flexemr's embedding servers asked for raw rows (FETCH); pooling and NN on the ranker (client processes)."""

    name = "flexemr-rawrows"
    resident = True

    def __init__(self, daemon: FlexemrDaemon) -> None:
        self.daemon = daemon

    def wire_bytes(self) -> int:
        return self.daemon.wire_bytes()

    def server_pids(self) -> list[int]:
        return self.daemon.embedding_pids()

    def make_call(self) -> Callable[[], Callable]:
        return _ranker_call(self.daemon.model, "fetch", self.daemon.server_addresses)

    def describe(self) -> dict:
        return {"how": "the flexemr daemon's embedding servers; per batch, table and server: np.unique ids, one "
                       "FETCH frame, raw rows back, embedding_bag and the NN in the ranker = client processes"}


def _ranker_call(model: Path, store_kind: str, where) -> Callable[[], Callable]:
    """A client-resident ranker: fetch rows (Redis or FETCH frames), pool them, run the NN; one torch thread."""
    model_dir = str(model)

    def make() -> Callable:
        import torch

        from flexemr.model.dense import load_dense
        from flexemr.model.spec import load_spec

        torch.set_num_threads(1)
        spec = load_spec(model_dir)
        dlrm = load_dense(model_dir, spec)
        if store_kind == "redis":
            lookup = RedisRanker(spec, where).lookup
        else:
            lookup = FetchRanker(spec, where).lookup
        names = spec.table_names

        def call(dense, sparse):
            with torch.inference_mode():
                pooled = lookup(sparse)
                x = torch.from_numpy(np.ascontiguousarray(dense, dtype=np.float32))
                return dlrm(x, [torch.from_numpy(pooled[n]) for n in names]).numpy()

        return call

    return make


class FetchRanker:
    """Raw-row lookups against flexemr embedding servers (what partial pooling saves)."""

    def __init__(self, spec, addrs: Sequence[tuple[str, int]]) -> None:
        from flexemr.wire import codec
        from flexemr.wire.frame import FrameType
        from flexemr.wire.stream import FrameReader, send_buffers

        self.spec = spec
        self._codec, self._ft, self._send = codec, FrameType, send_buffers
        self.conns = []
        # per table: sorted shard starts, their ends and servers (from each server's HELLO)
        shards: dict[int, list[tuple[int, int, int]]] = {}
        for si, addr in enumerate(addrs):
            s = socket.create_connection(addr, timeout=300)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = FrameReader(s)
            send_buffers(s, codec.encode_hello(1, codec.ROLE_CLIENT, f"bench-rawrows/{os.getpid()}"))
            h, payload = reader.read_frame()
            if h.type != FrameType.HELLO:
                raise RuntimeError(f"{addr}: answered frame type {h.type} to HELLO")
            for sh in codec.decode_hello(payload).shards:
                shards.setdefault(int(sh["table_id"]), []).append((int(sh["start"]), int(sh["end"]), si))
            self.conns.append((s, reader))
        self.starts, self.servers = {}, {}
        for t, lst in shards.items():
            lst.sort()
            self.starts[t] = np.array([a for a, _, _ in lst], dtype=np.int64)
            self.servers[t] = np.array([s for _, _, s in lst], dtype=np.int64)
        self._rid = 1

    def fetch(self, ti: int, ids: np.ndarray) -> np.ndarray:
        """Rows [len(ids), dim] of table ``ti`` (``ids`` sorted and unique)."""
        dim = self.spec.tables[ti].dim
        srv = self.servers[ti][np.searchsorted(self.starts[ti], ids, side="right") - 1]
        out = np.empty((len(ids), dim), dtype=np.float32)
        sent = []
        for si in np.unique(srv).tolist():
            mask = srv == si
            self._rid += 1
            self._send(self.conns[si][0], self._codec.encode_fetch(self._rid, ti, ids[mask]))
            sent.append((si, mask, self._rid))
        for si, mask, rid in sent:   # one outstanding request per server: no send/send deadlock
            h, payload = self.conns[si][1].read_frame()
            if h.type != self._ft.FETCH_RESP or h.request_id != rid:
                msg = self._codec.decode_error(payload) if h.type == self._ft.ERROR else f"frame type {h.type}"
                raise RuntimeError(f"server {si}: {msg}")
            out[mask] = self._codec.decode_fetch_response(payload)[1]
        return out

    def lookup(self, sparse) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        from flexemr.types import Pooling

        out = {}
        for name, (values, lengths) in sparse.items():
            ti = self.spec.table_index(name)
            t = self.spec.tables[ti]
            uniq, inverse = np.unique(values, return_inverse=True)
            rows = self.fetch(ti, uniq)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            mode = {Pooling.SUM: "sum", Pooling.MEAN: "mean", Pooling.MAX: "max"}[t.pooling]
            out[name] = F.embedding_bag(torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(rows),
                                        torch.from_numpy(offsets), mode=mode, include_last_offset=True).numpy()
        return out


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
    ordered = sorted(runs, key=lambda r: r["samples_per_s"])
    out = dict(ordered[len(ordered) // 2])
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


def answer(system: System, request) -> np.ndarray:
    """``system``'s scores for one request, computed in a forked client (as the load generator would)."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_answer_child, args=(system.make_call(), request, q), daemon=True)
    p.start()
    try:
        status, val = q.get(timeout=300)
    finally:
        p.join(10)
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


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


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


class _Stop(Exception):
    pass


def run_suite(suite: SuiteSpec | str, out: Path, zipf: float = 1.05, seed: int = 0, seconds: float | None = None,
              mlperf: bool = True, ablations: bool = True, workloads: Sequence[str] | None = None,
              command: str | None = None, log: Progress | None = None) -> dict:
    """Run ``suite``; write ``out/results.json`` and the plots; return the results."""
    import torch  # noqa: F401  imported (not used) here so that forked clients do not pay for the import

    spec = SUITES[suite] if isinstance(suite, str) else suite
    if seconds is not None:
        spec = dataclasses.replace(spec, seconds=seconds, mlperf_seconds=min(spec.mlperf_seconds, seconds))
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
                     "open_levels_of_slowest_max": list(spec.open_levels), "repetitions": spec.reps,
                     "drift_every_batches": spec.drift_every},
        "systems": {},
        "workloads": [],
        "models": {},
        "skipped": [],
        "issues": [],
    }

    def on_signal(signum, _frame):
        raise _Stop(f"signal {signum}")

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
        from flexemr.bench.plots import write_plots

        results["plots"] = write_plots(results, out)
    except Exception as e:  # a plot must never lose the numbers
        results["issues"].append(f"plots: {type(e).__name__}: {e}")
    _write(out, results)
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

        def try_measure(c: dict, name: str, s: System, *args) -> dict | None:
            """One measurement; a system that fails is recorded (cell "failed", issues) and not driven again."""
            if name in broken:
                return None
            try:
                return measure(s, *args)
            except RuntimeError as e:
                broken[name] = str(e)
                c.setdefault("failed", {})[name] = str(e)
                results["issues"].append(f"{wl.name}: {name} failed in {c['name']}: {e}")
                log(f"    FAILED: {e}")
                return None

        def cell(name: str, **kw) -> dict:
            if name not in cells:
                cells[name] = {"name": name, "model": wl.name, **kw, "systems": {}}
                results["workloads"].append(cells[name])
            return cells[name]

        # --- closed loop: maximum throughput per batch size (systems interleaved, repetitions interleaved)
        for b in wl.batch_sizes:
            c = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            runs: dict[str, list] = {}
            for rep in range(spec.reps):
                for name, s in systems.items():
                    n = clients_for(s, False)
                    log(f"  {c['name']}: {name} [{rep + 1}/{spec.reps}] closed loop, {n} client(s), {spec.seconds:g} s")
                    r = try_measure(c, name, s, reqsets[b], n, spec.seconds)
                    if r is not None:
                        runs.setdefault(name, []).append(r)
                        _say(log, r)
            for name, rs in runs.items():
                c["systems"][name] = _median(rs)
            c["ratios"] = ratios(c["systems"])

        # --- ablations: closed loop at one batch size, next to flexemr
        if ablation_systems:
            b = wl.ablation_batch
            c = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            c["ablation"] = True
            for name, s in ablation_systems.items():
                n = clients_for(s, False)
                log(f"  {c['name']}: {name} closed loop, {n} client(s), {spec.seconds:g} s")
                r = try_measure(c, name, s, reqsets[b], n, spec.seconds)
                if r is not None:
                    c["systems"][name] = r
                    _say(log, r)
            for name in CORE_SYSTEMS:
                if name not in c["systems"]:
                    r = try_measure(c, name, systems[name], reqsets[b], clients_for(systems[name], False), spec.seconds)
                    if r is not None:
                        c["systems"][name] = r
            c["ratios"] = ratios(c["systems"])

        # --- open loop: Poisson arrivals at fractions of the slowest core system's maximum
        b = wl.open_batch
        ref_cell = cells.get(f"{wl.name}-b{b}-closed")
        if ref_cell is None:
            ref_cell = cell(f"{wl.name}-b{b}-closed", batch=b, mode="closed")
            for name, s in systems.items():
                r = try_measure(ref_cell, name, s, reqsets[b], clients_for(s, False), spec.seconds)
                if r is not None:
                    ref_cell["systems"][name] = r
            ref_cell["ratios"] = ratios(ref_cell["systems"])
        slowest = min((ref_cell["systems"][n]["samples_per_s"] for n in CORE_SYSTEMS if n in ref_cell["systems"]),
                      default=0.0)
        levels = spec.open_levels if slowest > 0 else ()
        for level in levels:
            rate = level * slowest / b     # requests/s offered in total
            c = cell(f"{wl.name}-b{b}-open{int(round(level * 100))}", batch=b, mode="open",
                     offered_samples_per_s=round(level * slowest, 1), offered_requests_per_s=round(rate, 3),
                     level_of_slowest_max=level)
            open_systems = dict(systems)
            open_systems.update({k: v for k, v in ablation_systems.items() if spec.name == "full"})
            for name, s in open_systems.items():
                n = clients_for(s, True)
                if name in broken:
                    continue
                log(f"  {c['name']}: {name} open loop, {rate:.2f} req/s ({rate * b:,.0f} samples/s), {n} client(s)")
                r = try_measure(c, name, s, reqsets[b], n, spec.seconds, rate / n)
                if r is not None:
                    c["systems"][name] = r
                    _say(log, r)
            c["ratios"] = ratios(c["systems"])

        # --- MLPerf LoadGen against flexemr's socket
        if do_mlperf and spec.mlperf_workload == wl.name and "flexemr" not in broken:
            from flexemr.bench.mlperf import run_mlperf

            mreq = make_requests(gen, spec.mlperf_batch, ids_per_sample, wl, max(spec.requests_per_set, 16))
            results["mlperf"] = run_mlperf(flexemr.sock, mreq, out / "mlperf", seconds=spec.mlperf_seconds,
                                           bound_ms=spec.mlperf_bound_ms, probes=spec.mlperf_probes, log=log,
                                           system="flexemr", workload=wl.name, batch=spec.mlperf_batch)
    except _Stop as e:
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
    ``bg`` is the CPU (in cores) that other processes took during the cell.
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
                         + (f"  ({r['errors']} errors)" if r.get("errors") else ""))
        for name, why in c.get("failed", {}).items():
            lines.append(f"{c['name']:20} {name:22} FAILED: {why[:120]}")
        lines.append("")
    m = results.get("mlperf")
    if m:
        lines.append(mlperf_line(m))
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


def _fmt_ratio(x, tag: str = "") -> str:
    return "-" if x is None else f"{tag}{x:.2f}"


__all__ = ["validate_results", "check_answers", "SUITES", "SuiteSpec", "ModelWorkload", "ABLATIONS", "run_suite", "format_table", "measure",
           "run_clients", "ratios", "machine_info", "server_stats", "FlexemrDaemon", "InprocessSystem",
           "RedisSystem", "RawRowsSystem", "FetchRanker"]
