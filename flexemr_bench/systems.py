"""The systems ``emrctl bench`` measures: started as real processes, driven, stopped by pid.

``FlexemrDaemon``   ``flexemrd local`` (a process tree; log = its stderr); wire
                    bytes from its embedding servers' STATS frames
``InprocessSystem`` the monolithic model, living in the load-generator process
``RedisSystem``     redis-server shards; ``RedisRanker`` is the ranker's client
``RawRowsSystem``   a flexemr daemon's embedding servers asked for raw rows
                    (``FetchRanker``), pooling on the ranker

A system's ``make_call()`` returns a factory that runs in each forked client
process and returns ``call(dense, sparse) -> scores``.  Resident systems
(``resident = True``) do their work inside those client processes, so their
CPU is counted there.  See :mod:`flexemr_bench.suite` for how they are
driven and measured.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from flexemr.loadgen import wait_for_socket
from flexemr_bench.daemon import tree_cpu_seconds
from flexemr_bench.redis_store import key_bytes


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
               "--socket", self.sock, "--instance", self.instance, "--log-level", "info",
               # The suite counts wire bytes at the servers' TCP ports and its FETCH ablation speaks TCP to
               # them: it measures the between-hosts transport (shm vs TCP: flexemr_bench.transports).
               "--transport", "tcp"]
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
                server_stats(addr, secret_file=self.secret_file)
                out.append(addr)
            except (OSError, ValueError):
                pass
        return out

    @property
    def secret_file(self) -> str:
        """The secret ``flexemrd local`` made for this instance (its servers want it)."""
        from flexemr import naming

        return naming.local_secret_path(self.instance)

    @property
    def server_addresses(self) -> list[tuple[str, int]]:
        return list(self._stats_addrs)

    def wire_bytes(self) -> int:
        total = 0
        for addr in self._stats_addrs:
            s = server_stats(addr, secret_file=self.secret_file)
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

            return InferenceClient(sock, timeout=120).predict

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


def server_stats(addr: tuple[str, int], timeout: float = 5.0, secret_file: str = "") -> dict[str, int]:
    """One embedding server's counters (a STATS frame, after authenticating when ``secret_file`` exists)."""
    from flexemr.auth import load_secret
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.handshake import client_hello
    from flexemr.wire.stream import FrameReader, send_buffers

    with socket.create_connection(addr, timeout=timeout) as s:
        if secret_file and os.path.exists(secret_file):
            reader = FrameReader(s, 1 << 16)
            client_hello(lambda f: send_buffers(s, f), reader.read_frame, f"{addr}", codec.ROLE_CLIENT,
                         f"bench-stats/{os.getpid()}", secret=load_secret(secret_file))
        s.sendall(pack_header(FrameType.STATS, 1, 0))
        h, payload = FrameReader(s, 1 << 16).read_frame()
        if h.type != FrameType.STATS_RESP:
            raise ValueError(f"{addr}: answered frame type {h.type} to STATS")
        return codec.decode_stats(payload)


class InprocessSystem(System):
    """The monolithic reference: the client process holds the model and calls it (all cores).

    ``concurrent=False`` (``inprocess``): one caller, torch threads on every
    core, one request at a time.  ``concurrent=True`` (``inprocess-all``): as
    many callers as the daemons get clients, each with its share of the cores
    and the tables' pages shared: the most the host gets out of the model
    without a socket, so flexemr's ratios are against the stronger of the two.
    """

    resident = True

    def __init__(self, model: Path, concurrent: bool = False) -> None:
        self.model = model
        self.concurrent = concurrent
        self.name = "inprocess-all" if concurrent else "inprocess"
        self.workers = None if concurrent else 1   # None: the suite's client count

    def make_call(self) -> Callable[[], Callable]:
        model = str(self.model)
        concurrent = self.concurrent

        def make() -> Callable:
            import torch

            from flexemr.monolithic import MonolithicModel

            cores = os.cpu_count() or 1
            torch.set_num_threads(1 if concurrent else cores)
            return MonolithicModel(model, resident=True).predict   # as the daemons gather: huge-page copies

        return make

    def describe(self) -> dict:
        if self.concurrent:
            return {"how": "MonolithicModel.predict in every load-generator process at once (the suite's client "
                           "count), one torch thread each, the tables' pages shared: all cores busy"}
        return {"how": "MonolithicModel.predict in the load-generator process, torch threads = all cores, "
                       "one request at a time"}


class RedisSystem(System):
    """Redis shards holding every row (HPS's Redis tier); the ranker (pooling + NN) runs in the client processes.

    ``shards`` redis-servers (as many as flexemr has embedding servers), row
    ``r`` of every table on shard ``r % shards``, keys as in
    :mod:`flexemr_bench.redis_store`.  The client is :class:`RedisRanker`.
    """

    name = "redis"
    resident = True

    def __init__(self, model: Path, log: Callable[[str], None], shards: int = 2) -> None:
        self.model = model
        self.log = log
        self.n_shards = shards
        self.servers: list = []

    def launch(self) -> None:
        from flexemr_bench.redis_store import RedisServer

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
        from flexemr_bench.redis_store import MAX_ROWS

        if len(self.spec.tables) > 128:
            raise ValueError(f"{len(self.spec.tables)} tables: the key format holds at most 128")
        for ti, t in enumerate(self.spec.tables):
            if t.rows >= MAX_ROWS:
                raise ValueError(f"table {t.name}: {t.rows} rows exceed the key format's {MAX_ROWS}")
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
        return _ranker_call(self.daemon.model, "fetch", self.daemon.server_addresses, self.daemon.secret_file)

    def describe(self) -> dict:
        return {"how": "the flexemr daemon's embedding servers; per batch, table and server: np.unique ids, one "
                       "FETCH frame, raw rows back, embedding_bag and the NN in the ranker = client processes"}


def _ranker_call(model: Path, store_kind: str, where, secret_file: str = "") -> Callable[[], Callable]:
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
            lookup = FetchRanker(spec, where, secret_file).lookup
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

    def __init__(self, spec, addrs: Sequence[tuple[str, int]], secret_file: str = "") -> None:
        from flexemr.auth import load_secret
        from flexemr.wire import codec
        from flexemr.wire.frame import FrameType
        from flexemr.wire.handshake import client_hello
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
            secret = load_secret(secret_file) if secret_file and os.path.exists(secret_file) else None
            hello = client_hello(lambda f, s=s: send_buffers(s, f), lambda r=reader: r.read_frame(), f"{addr}",
                                 codec.ROLE_CLIENT, f"bench-rawrows/{os.getpid()}", secret=secret, require_auth=False)
            for sh in hello.shards:
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


def _tail(path: Path, n: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


__all__ = ["System", "FlexemrDaemon", "InprocessSystem", "RedisSystem", "RawRowsSystem", "RedisRanker",
           "FetchRanker", "server_stats", "tree_cpu_seconds", "key_bytes"]
