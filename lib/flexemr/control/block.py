"""The control segment ``/flexemr.<instance>.ctl``: live stats, runtime state and the mailbox.

One POSIX shared-memory segment per daemon instance, created and unlinked by
the supervisor only; engines, the inference process and emrctl ``attach`` it by
instance name.  Stats are numpy structured arrays, one row per engine /
connection / table, each row guarded by its own **seqlock**.  All integers are
little-endian; every stats field is a u64, i64 or f64, 8-byte aligned::

    segment offset  size   field                 written by   meaning
    --------------  -----  --------------------  -----------  ----------------------------------
         0            8    magic                 creator      b"FXCTL\\x00\\x00\\x01", stored LAST
         8            4    version               creator      VERSION; attach refuses any other
        12            4    header_bytes          creator      4096
        16            8    total_bytes           creator      segment size (multiple of 4096)
        24            4    n_engines             creator
        28            4    n_connections         creator
        32            4    n_tables              creator
        36            4    row_align             creator      64: rows never share a cache line
        40            8    supervisor_pid        creator
        48            8    created_mono_ns       creator      CLOCK_MONOTONIC (system-wide on Linux)
        56            8    created_unix_ns       creator      wall clock, for display only
        64     13 x 24     section table         creator      per section: offset, count, row_bytes
      4096    ...          sections, each 64-byte aligned, in SECTION order:

    section         rows              writer (one process)   fields
    --------------  ----------------  ---------------------  -----------------------------------------
    engine_proc     n_engines         supervisor             pid cpu state restarts started_ns
                                                             requests_per_s subrequests_per_s busy_ratio
    engine_stats    n_engines         engine i               active_connections queue_depth inflight
                                                             subrequests_total requests_total bytes_sent
                                                             bytes_received busy_ns heartbeat_ns epoch_seen
    conn_static     n_connections     creator (no seqlock)   server
    conn_ctl        n_connections     supervisor             migrations last_migration_ns
    conn_stats      n_engines x n_c   engine e (row e*n_c+c) queued inflight credits subrequests_total
                                                             bytes_sent bytes_received rtt_p50_us rtt_p99_us
                                                             credit_latency_p50_us credit_latency_p99_us
                                                             updated_ns
    inference_proc  1                 supervisor             pid state restarts started_ns
    ranker          1                 inference              requests_total errors_total samples_total
                                                             batches_total latency_p50_ms latency_p99_ms
                                                             mean_batch requests_per_s inflight_batches
                                                             heartbeat_ns epoch_seen
    cache           1                 inference              policy capacity_bytes used_bytes hits lookups
                                                             evictions fills entries
    table_names     n_tables          creator (no seqlock)   name (64 bytes, NUL-padded UTF-8)
    tables          n_tables          inference              lookups hits ids_total bytes_wire
    runtime         1 area            supervisor             epoch, desired cache policy/capacity,
                                                             rebalance, owners[n_connections]
    topology        1 area            supervisor             generation, length, JSON text
    mailbox         1 area (4096 al.) see mailbox.py         request and response of emrctl commands

Every stats row starts with ``seq`` (u64).  **One writer per row** is what
makes a seqlock correct (threads of that process are serialised by a lock in
the ControlBlock object), so fields an entity has from two processes live in
two rows (``engine_proc`` from the supervisor, ``engine_stats`` from the
engine), and connection stats are a matrix with one row per (engine, conn):
whichever engine owns a connection writes only its own row, so a migration
never has two writers on one row; readers sum the counters over engines and
take the gauges from the most recently written row.

Seqlock write order (one update = one seqlock write, a few µs from Python)::

    writer: seq = s+1 (odd) ; store fields ; seq = s+2 (even)
    reader: s1 = seq ; odd -> retry ; copy row bytes ; s2 = seq ; s1 != s2 -> retry

x86-64 is TSO: stores become visible in program order and loads are not
reordered with older loads, and CPython performs the stores of separate
statements in program order, so a reader that sees the same even ``seq``
before and after its copy copied a row no writer touched in between (the same
argument as the data-path ring in :mod:`flexemr.ring.layout`).  A writer that
died between its two ``seq`` stores leaves ``seq`` odd: readers give up after
~0.1 s and return what they copied, and the next writer of that row (the
restarted engine) starts from the next even value.

Derived in :meth:`ControlBlock.snapshot` (the status JSON), not stored:
``engines[].connections`` is the owner-map count (what the supervisor
decided; ``active_connections`` is what the engine serves right now, so the
two differ only while a migration is in flight); ``hit_rate`` is hits/lookups;
``heartbeat_age_s`` is now - heartbeat_ns.  Per-engine rates are computed by
the supervisor once a second (:meth:`ControlBlock.update_rates`, into its own
engine_proc rows) so a one-shot ``emrctl status`` has them and engines only
count; ``snapshot(previous)`` recomputes them from two snapshots instead
(``--watch``).  The ranker's ``requests_per_s`` is computed by the inference
process itself.

Runtime area (the supervisor's mutable control state, polled by the data
path between batches with ONE u64 load of ``epoch``)::

    word  field                  meaning
    ----  ---------------------  ----------------------------------------------
      0   epoch                  seqlock of the whole area: odd while written,
                                 +2 per publication; a changed even value means
                                 "re-read the runtime state"
      1   cache_policy           desired CacheMode (the inference applies it)
      2   cache_capacity_bytes   desired cache capacity
      3   rebalance              1 = the automatic rebalancer may migrate
      4   publications           how many times the area was published
    5-7   (zero)
    8+c   owner of connection c  engine id (i64)

Topology area: word 0 generation (seqlock: odd while written), word 1 length,
word 2 capacity, JSON text from byte 64.  Only the control path reads it.
"""

from __future__ import annotations

import enum
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import posix_ipc

from flexemr import naming
from flexemr.errors import ControlError
from flexemr.types import CacheMode  # the one cache-policy enum (values stored in this segment)

MAGIC = b"FXCTL\x00\x00\x01"
VERSION = 1
HEADER_BYTES = 4096
ROW_ALIGN = 64
PAGE = 4096
TABLE_NAME_BYTES = 64
SEGMENT_MODE = 0o660  # group members may run emrctl, like the inference socket's default mode

# magic, version, header_bytes, total_bytes, n_engines, n_connections, n_tables,
# row_align, supervisor_pid, created_mono_ns, created_unix_ns
_HEADER = struct.Struct("<8sIIQIIIIqQQ")
_SECTION_TABLE_OFF = 64
_SECTION_ENTRY = struct.Struct("<QQQ")  # offset, count, row_bytes
SECTIONS = ("engine_proc", "engine_stats", "conn_static", "conn_ctl", "conn_stats", "inference_proc",
            "ranker", "cache", "table_names", "tables", "runtime", "topology", "mailbox")

# runtime area words
RT_EPOCH, RT_CACHE_POLICY, RT_CACHE_CAPACITY, RT_REBALANCE, RT_PUBLICATIONS = 0, 1, 2, 3, 4
RT_OWNERS = 8
# topology area
TOPO_DATA_OFF = 64
TOPOLOGY_MIN_BYTES = 64 << 10
# mailbox area (protocol in mailbox.py)
MAILBOX_HEADER_BYTES = 4096
MAILBOX_REQUEST_BYTES = 64 << 10
MAILBOX_RESPONSE_BYTES = 1 << 20

_READ_GIVE_UP_S = 0.1  # a writer that died mid-update must not hang readers


class InstanceNotRunning(ControlError):
    """No control segment for this instance (or only a stale one): the daemon is not running."""


class EngineState(enum.IntEnum):
    """Lifecycle state of an engine (and of the inference process), written by the supervisor."""

    UNUSED = 0
    STARTING = 1
    READY = 2
    STOPPING = 3
    DEAD = 4
    RESTARTING = 5

    @classmethod
    def parse(cls, value: EngineState | str | int) -> EngineState:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                raise ValueError(f"unknown engine state {value!r} "
                                 f"(expected {', '.join(s.label for s in cls)})") from None
        return cls(value)

    @property
    def label(self) -> str:
        return self.name.lower()


def _row_dtype(fields: Sequence[tuple[str, str]]) -> np.dtype:
    """``seq`` + 8-byte fields, padded to a multiple of ROW_ALIGN so two writers never share a line."""
    names = ["seq", *(n for n, _ in fields)]
    formats = ["<u8", *(f for _, f in fields)]
    size = 8 * len(names)
    return np.dtype({"names": names, "formats": formats, "offsets": [8 * i for i in range(len(names))],
                     "itemsize": (size + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN})


U, I, F = "<u8", "<i8", "<f8"
ENGINE_PROC = _row_dtype([("pid", I), ("cpu", I), ("state", I), ("restarts", U), ("started_ns", U),
                          ("requests_per_s", F), ("subrequests_per_s", F), ("busy_ratio", F)])
ENGINE_STATS = _row_dtype([("active_connections", U), ("queue_depth", U), ("inflight", U),
                           ("subrequests_total", U), ("requests_total", U), ("bytes_sent", U),
                           ("bytes_received", U), ("busy_ns", U), ("heartbeat_ns", U), ("epoch_seen", U)])
CONN_STATIC = np.dtype([("server", I)])
CONN_CTL = _row_dtype([("migrations", U), ("last_migration_ns", U)])
CONN_STATS = _row_dtype([("queued", U), ("inflight", U), ("credits", U), ("subrequests_total", U),
                         ("bytes_sent", U), ("bytes_received", U), ("rtt_p50_us", F), ("rtt_p99_us", F),
                         ("credit_latency_p50_us", F), ("credit_latency_p99_us", F), ("updated_ns", U)])
INFERENCE_PROC = _row_dtype([("pid", I), ("state", I), ("restarts", U), ("started_ns", U)])
RANKER = _row_dtype([("requests_total", U), ("errors_total", U), ("samples_total", U), ("batches_total", U),
                     ("latency_p50_ms", F), ("latency_p99_ms", F), ("mean_batch", F), ("requests_per_s", F),
                     ("inflight_batches", U), ("heartbeat_ns", U), ("epoch_seen", U)])
CACHE = _row_dtype([("policy", I), ("capacity_bytes", U), ("used_bytes", U), ("hits", U), ("lookups", U),
                    ("evictions", U), ("fills", U), ("entries", U)])
TABLE_NAME = np.dtype([("name", f"S{TABLE_NAME_BYTES}")])
TABLES = _row_dtype([("lookups", U), ("hits", U), ("ids_total", U), ("bytes_wire", U)])


def mailbox_semaphore_names(instance: str) -> tuple[str, str, str]:
    """(mutex, ready, done) semaphores of the mailbox: ``/flexemr.<instance>.ctl.{mutex,ready,done}``."""
    return (naming.shm_name(instance, "ctl", "mutex"), naming.shm_name(instance, "ctl", "ready"),
            naming.shm_name(instance, "ctl", "done"))


def pid_alive(pid: int) -> bool:
    """True if a process ``pid`` exists (EPERM means it exists but is not ours)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Section:
    """A numpy structured array over one section plus per-field column views (built once)."""

    __slots__ = ("name", "arr", "cols", "seq", "fields", "offset", "row_bytes", "dtype", "lock")

    def __init__(self, name: str, mm: mmap.mmap, offset: int, count: int, dtype: np.dtype) -> None:
        self.name = name
        self.dtype = dtype
        self.offset = offset
        self.row_bytes = dtype.itemsize
        self.arr = np.ndarray((count,), dtype=dtype, buffer=mm, offset=offset)
        # column views make a field store one numpy setitem (~0.1 µs), no row object
        self.cols = {n: self.arr[n] for n in dtype.names}
        self.seq = self.cols.get("seq")
        self.fields = frozenset(n for n in dtype.names if n != "seq")
        # serialises writer THREADS of this process (a publisher thread and the batcher
        # may both write the ranker row); uncontended it costs ~0.1 µs per update
        self.lock = threading.Lock()

    def _check(self, names: Any) -> None:
        if not self.fields.issuperset(names):
            bad = sorted(set(names) - self.fields)
            raise ValueError(f"{self.name}: unknown field(s) {', '.join(bad)} "
                             f"(known: {', '.join(sorted(self.fields))})")

    def update_all(self, add: bool, values: Mapping[str, Any]) -> None:
        """One seqlock write on every row at once (vectorised: per-table counters per batch)."""
        self._check(values.keys())
        seq = self.seq
        with self.lock:
            start = seq + (seq & 1)  # recover rows whose previous writer died mid-update
            seq[:] = start + 1
            try:
                for k, v in values.items():
                    if add:
                        self.cols[k][:] += np.asarray(v, dtype=self.dtype[k])
                    else:
                        self.cols[k][:] = v
            finally:
                seq[:] = start + 2


class Row:
    """One seqlocked row: exactly one writer process, any number of lock-free readers.

    Threads of the writer process may share it (through one ControlBlock: a
    per-section lock serialises them); readers never take a lock.
    """

    __slots__ = ("_sec", "_i", "_mm", "_lo", "_hi", "label")

    def __init__(self, section: _Section, index: int, mm: mmap.mmap, label: str) -> None:
        self._sec = section
        self._i = index
        self._mm = mm
        self._lo = section.offset + index * section.row_bytes
        self._hi = self._lo + section.row_bytes
        self.label = label

    def update(self, **fields: float) -> None:
        """Store ``fields`` as one consistent change (writer only; no JSON, no syscalls)."""
        sec, i = self._sec, self._i
        if not sec.fields.issuperset(fields):
            sec._check(fields)
        seq, cols = sec.seq, sec.cols
        with sec.lock:
            s = int(seq[i])
            s += s & 1  # previous writer died between its two seq stores
            seq[i] = s + 1
            try:
                for k, v in fields.items():
                    cols[k][i] = v
            finally:
                seq[i] = s + 2

    def add(self, **deltas: float) -> None:
        """Add to counters as one consistent change (safe: this process is the row's only writer)."""
        sec, i = self._sec, self._i
        if not sec.fields.issuperset(deltas):
            sec._check(deltas)
        seq, cols = sec.seq, sec.cols
        with sec.lock:
            s = int(seq[i])
            s += s & 1
            seq[i] = s + 1
            try:
                for k, v in deltas.items():
                    col = cols[k]
                    col[i] = col[i] + v
            finally:
                seq[i] = s + 2

    def read_raw(self) -> np.void:
        """A consistent copy of the row (a numpy record that no longer refers to the segment)."""
        seq, i, mm, lo, hi = self._sec.seq, self._i, self._mm, self._lo, self._hi
        attempt = 0
        deadline = 0.0
        while True:
            s1 = int(seq[i])
            if not s1 & 1:
                data = mm[lo:hi]
                if int(seq[i]) == s1:
                    break
            attempt += 1
            if attempt > 8:
                # the writer was descheduled mid-update: let it run, but not forever
                os.sched_yield()
                if attempt == 9:
                    deadline = time.monotonic() + _READ_GIVE_UP_S
                elif time.monotonic() > deadline:
                    data = mm[lo:hi]  # its writer died mid-update: best effort
                    break
        return np.frombuffer(data, dtype=self._sec.dtype)[0]

    def read(self) -> dict[str, Any]:
        """A consistent copy of the row as a dict of Python numbers (``seq`` included)."""
        raw = self.read_raw()
        return dict(zip(self._sec.dtype.names, raw.item()))

    def __repr__(self) -> str:
        return f"Row({self.label})"


@dataclass(frozen=True)
class RuntimeState:
    """A consistent copy of the runtime area."""

    epoch: int
    owners: tuple[int, ...]
    cache_policy: CacheMode
    cache_capacity_bytes: int
    rebalance: bool
    publications: int

    def connections_of(self, engine: int) -> list[int]:
        """Connections that ``engine`` owns under this epoch."""
        return [c for c, e in enumerate(self.owners) if e == engine]


class Runtime:
    """Mutable control state: conn->engine owners, desired cache settings, rebalance switch.

    The supervisor ``publish``es; the data path polls :attr:`epoch` between
    batches and calls :meth:`read` only when it changed.
    """

    __slots__ = ("_w", "_owners", "_mm", "_lo", "_hi", "n_connections", "_lock")

    def __init__(self, mm: mmap.mmap, offset: int, n_connections: int) -> None:
        self.n_connections = n_connections
        self._mm = mm
        self._w = np.ndarray((RT_OWNERS,), dtype="<u8", buffer=mm, offset=offset)
        self._owners = np.ndarray((n_connections,), dtype="<i8", buffer=mm, offset=offset + 8 * RT_OWNERS)
        self._lo = offset
        self._hi = offset + 8 * (RT_OWNERS + n_connections)
        self._lock = threading.Lock()

    @property
    def epoch(self) -> int:
        """The current epoch: one aligned u64 load, cheap enough to poll between batches."""
        return int(self._w[RT_EPOCH])

    def read(self) -> RuntimeState:
        """A consistent copy of the whole area."""
        w, mm = self._w, self._mm
        data = b""
        deadline = time.monotonic() + _READ_GIVE_UP_S
        while True:
            e1 = int(w[RT_EPOCH])
            if not e1 & 1:
                data = mm[self._lo:self._hi]
                if int(w[RT_EPOCH]) == e1:
                    break
            if time.monotonic() > deadline:
                data = mm[self._lo:self._hi]
                break
            os.sched_yield()
        words = np.frombuffer(data, dtype="<u8", count=RT_OWNERS)
        owners = np.frombuffer(data, dtype="<i8", offset=8 * RT_OWNERS)
        return RuntimeState(epoch=int(words[RT_EPOCH]), owners=tuple(int(x) for x in owners),
                            cache_policy=CacheMode(int(words[RT_CACHE_POLICY])),
                            cache_capacity_bytes=int(words[RT_CACHE_CAPACITY]),
                            rebalance=bool(words[RT_REBALANCE]), publications=int(words[RT_PUBLICATIONS]))

    def publish(self, *, owners: Mapping[int, int] | Sequence[int] | None = None,
                cache_policy: CacheMode | str | None = None, cache_capacity_bytes: int | None = None,
                rebalance: bool | None = None) -> int:
        """Change the runtime state as one consistent update and return the new epoch (supervisor only).

        ``owners`` is either a full list (one engine per connection) or a
        mapping of just the connections that move.  Validate ids before calling
        (``ControlBlock.set_owner`` does).
        """
        policy = None if cache_policy is None else CacheMode.parse(cache_policy)
        if owners is not None and not isinstance(owners, Mapping) and len(owners) != self.n_connections:
            raise ValueError(f"owners has {len(owners)} entries, expected {self.n_connections}")
        w = self._w
        with self._lock:
            e = int(w[RT_EPOCH])
            e += e & 1
            w[RT_EPOCH] = e + 1
            try:
                if isinstance(owners, Mapping):
                    for c, eng in owners.items():
                        self._owners[c] = eng
                elif owners is not None:
                    self._owners[:] = owners
                if policy is not None:
                    w[RT_CACHE_POLICY] = int(policy)
                if cache_capacity_bytes is not None:
                    w[RT_CACHE_CAPACITY] = cache_capacity_bytes
                if rebalance is not None:
                    w[RT_REBALANCE] = int(bool(rebalance))
                w[RT_PUBLICATIONS] += 1
            finally:
                w[RT_EPOCH] = e + 2
        return e + 2


class EngineSlot:
    """Everything about engine ``id``: ``process`` (supervisor's row) and ``stats`` (the engine's row)."""

    __slots__ = ("id", "process", "stats", "_block")

    def __init__(self, block: ControlBlock, engine_id: int) -> None:
        self.id = engine_id
        self._block = block
        self.process = Row(block._sec["engine_proc"], engine_id, block._mm, f"engine[{engine_id}].process")
        self.stats = Row(block._sec["engine_stats"], engine_id, block._mm, f"engine[{engine_id}].stats")

    def update(self, **stats: float) -> None:
        """Engine side: one seqlock write of this engine's stats row (ENGINE_STATS fields)."""
        self.stats.update(**stats)

    def add(self, **deltas: float) -> None:
        """Engine side: add to this engine's counters."""
        self.stats.add(**deltas)

    def conn(self, conn_id: int) -> Row:
        """Engine side: this engine's stats row for connection ``conn_id`` (CONN_STATS fields)."""
        return self._block._conn_row(self.id, conn_id)

    def set_process(self, *, pid: int | None = None, cpu: int | None = None,
                    state: EngineState | str | None = None, restarts: int | None = None,
                    started_ns: int | None = None) -> None:
        """Supervisor side: process facts of this engine (one seqlock write)."""
        fields: dict[str, int] = {}
        if pid is not None:
            fields["pid"] = pid
        if cpu is not None:
            fields["cpu"] = cpu
        if state is not None:
            fields["state"] = int(EngineState.parse(state))
        if restarts is not None:
            fields["restarts"] = restarts
        if started_ns is not None:
            fields["started_ns"] = started_ns
        self.process.update(**fields)

    def read(self) -> dict[str, Any]:
        """Both rows merged (each one consistent), ``state`` as a label."""
        proc = self.process.read()
        stats = self.stats.read()
        del proc["seq"], stats["seq"]
        proc["state"] = _label(EngineState, proc["state"])
        return {"id": self.id, **proc, **stats}


class ConnSlot:
    """Connection ``id``: its server (static), the supervisor's ``control`` row, per-engine stats rows."""

    __slots__ = ("id", "server", "control", "_block")

    def __init__(self, block: ControlBlock, conn_id: int, server: int) -> None:
        self.id = conn_id
        self.server = server
        self._block = block
        self.control = Row(block._sec["conn_ctl"], conn_id, block._mm, f"conn[{conn_id}].control")

    def stats_row(self, engine_id: int) -> Row:
        """Engine ``engine_id``'s stats row for this connection (that engine is its only writer)."""
        return self._block._conn_row(engine_id, self.id)

    def read(self, owners: Sequence[int] | None = None) -> dict[str, Any]:
        """Merged view: counters summed over engines, gauges from the freshest engine row."""
        owner = (owners if owners is not None else self._block.runtime.read().owners)[self.id]
        rows = [self._block._conn_row(e, self.id).read() for e in range(self._block.n_engines)]
        # after a migration the new owner's row becomes the freshest; on a tie prefer the owner
        fresh = max(enumerate(rows), key=lambda er: (er[1]["updated_ns"], er[0] == owner))[1]
        ctl = self.control.read()
        out: dict[str, Any] = {"id": self.id, "server": self.server, "engine": owner}
        for g in ("queued", "inflight", "credits", "rtt_p50_us", "rtt_p99_us",
                  "credit_latency_p50_us", "credit_latency_p99_us"):
            out[g] = fresh[g]
        for c in ("subrequests_total", "bytes_sent", "bytes_received"):
            out[c] = sum(r[c] for r in rows)
        out["migrations"] = ctl["migrations"]
        out["last_migration_ns"] = ctl["last_migration_ns"]
        out["updated_ns"] = fresh["updated_ns"]
        return out


class ControlBlock:
    """The mapped control segment of one instance (see the module docstring for the layout).

    Supervisor: :meth:`create` ... :meth:`close` + :meth:`unlink`.  Everyone
    else: :meth:`attach` ... :meth:`close`.  Each row has one writer process;
    its threads may write through the same ControlBlock (never through two).
    """

    def __init__(self, instance: str, name: str, mm: mmap.mmap, owner: bool) -> None:
        self.instance = instance
        self.name = name
        self._mm: mmap.mmap | None = mm
        self._owner = owner
        (magic, version, _hb, total, n_eng, n_conn, n_tab, _align, sup_pid, mono_ns,
         unix_ns) = _HEADER.unpack_from(mm, 0)
        self.version = version
        self.total_bytes = total
        self.n_engines = n_eng
        self.n_connections = n_conn
        self.n_tables = n_tab
        self.supervisor_pid = sup_pid
        self.created_mono_ns = mono_ns
        self.created_unix_ns = unix_ns
        self._layout = _read_section_table(mm)
        dtypes = _section_dtypes()
        self._sec: dict[str, _Section] = {}
        for sname, dt in dtypes.items():
            off, count, row_bytes = self._layout[sname]
            if row_bytes != dt.itemsize:
                raise ControlError(f"{name}: section {sname} has {row_bytes}-byte rows, this flexemr expects "
                                   f"{dt.itemsize} (mismatched builds: restart the daemon)")
            self._sec[sname] = _Section(sname, mm, off, count, dt)
        self.engines = [EngineSlot(self, e) for e in range(n_eng)]
        servers = self._sec["conn_static"].arr["server"]
        self.connections = [ConnSlot(self, c, int(servers[c])) for c in range(n_conn)]
        self.inference = Row(self._sec["inference_proc"], 0, mm, "inference.process")
        self.ranker = Row(self._sec["ranker"], 0, mm, "ranker")
        self.cache = Row(self._sec["cache"], 0, mm, "cache")
        self.table_names = [bytes(n).rstrip(b"\0").decode() for n in self._sec["table_names"].arr["name"]]
        self.tables = {t: Row(self._sec["tables"], i, mm, f"table[{t}]") for i, t in enumerate(self.table_names)}
        self.runtime = Runtime(mm, self._layout["runtime"][0], n_conn)
        self._topo_off, _, self._topo_bytes = self._layout["topology"]
        self._topo_w = np.ndarray((3,), dtype="<u8", buffer=mm, offset=self._topo_off)
        self._topo_cache: tuple[int, dict[str, Any]] | None = None
        self._topo_lock = threading.Lock()
        self._rate_prev: dict[int, tuple[int, int, int, int]] = {}

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, instance: str, n_engines: int, n_connections: int, table_names: Sequence[str],
               topology: Mapping[str, Any], *, conn_servers: Sequence[int] | None = None,
               owners: Sequence[int] | None = None, cache_policy: CacheMode | str = CacheMode.OFF,
               cache_capacity_bytes: int = 0, rebalance: bool = False,
               supervisor_pid: int | None = None) -> ControlBlock:
        """Create the segment and the mailbox semaphores (supervisor only).

        ``conn_servers[c]`` is the topology server index of connection ``c``
        (default: ``topology["connections"][c]["server"]`` if present, else
        connections numbered in server order, as the ranker plan numbers
        them).  ``owners[c]`` is its first engine (default ``c % n_engines``).
        A stale segment whose supervisor is gone is replaced; a live one is an
        error.  On failure nothing is left behind.
        """
        naming.validate_instance(instance)
        if n_engines < 1 or n_connections < 0:
            raise ValueError(f"need n_engines >= 1 and n_connections >= 0, got {n_engines}, {n_connections}")
        names = [str(t) for t in table_names]
        for t in names:
            if not t or len(t.encode()) >= TABLE_NAME_BYTES:
                raise ValueError(f"table name {t!r} must be 1-{TABLE_NAME_BYTES - 1} bytes")
        servers = _conn_servers(topology, n_connections, conn_servers)
        own = list(owners) if owners is not None else [c % n_engines for c in range(n_connections)]
        if len(own) != n_connections or any(not 0 <= e < n_engines for e in own):
            raise ValueError(f"owners must list an engine in [0, {n_engines}) for each of {n_connections} connections")
        topo = _encode_topology(topology)
        topo_bytes = _align(max(TOPOLOGY_MIN_BYTES, 4 * len(topo) + TOPO_DATA_OFF), PAGE)
        layout, total = _plan_layout(n_engines, n_connections, len(names), topo_bytes)

        name = naming.control_name(instance)
        _remove_stale(instance, name)
        try:
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=SEGMENT_MODE, size=total)
        except posix_ipc.ExistentialError:
            raise ControlError(f"control segment {name} appeared while creating it: "
                               f"another supervisor of instance {instance!r} is starting") from None
        created_sems: list[str] = []
        mm: mmap.mmap | None = None
        try:
            try:
                mm = mmap.mmap(shm.fd, total)
            finally:
                shm.close_fd()
            for sem_name, initial in zip(mailbox_semaphore_names(instance), (1, 0, 0)):
                try:
                    posix_ipc.unlink_semaphore(sem_name)  # left by a crashed supervisor
                except posix_ipc.ExistentialError:
                    pass
                posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=SEGMENT_MODE, initial_value=initial).close()
                created_sems.append(sem_name)
            pid = os.getpid() if supervisor_pid is None else supervisor_pid
            _HEADER.pack_into(mm, 0, b"\0" * 8, VERSION, HEADER_BYTES, total, n_engines, n_connections, len(names),
                              ROW_ALIGN, pid, time.monotonic_ns(), time.time_ns())
            for i, sname in enumerate(SECTIONS):
                _SECTION_ENTRY.pack_into(mm, _SECTION_TABLE_OFF + i * _SECTION_ENTRY.size, *layout[sname])
            # cpu -1 = "not pinned yet", not "cpu 0"
            np.ndarray((n_engines,), dtype=ENGINE_PROC, buffer=mm, offset=layout["engine_proc"][0])["cpu"] = -1
            off = layout["conn_static"][0]
            np.ndarray((n_connections,), dtype=CONN_STATIC, buffer=mm, offset=off)["server"] = servers
            off = layout["table_names"][0]
            np.ndarray((len(names),), dtype=TABLE_NAME, buffer=mm, offset=off)["name"] = [t.encode() for t in names]
            topo_off = layout["topology"][0]
            struct.pack_into("<QQQ", mm, topo_off, 0, len(topo), topo_bytes - TOPO_DATA_OFF)
            mm[topo_off + TOPO_DATA_OFF:topo_off + TOPO_DATA_OFF + len(topo)] = topo
            mb_off = layout["mailbox"][0]
            struct.pack_into("<QQ", mm, mb_off + 8 * 8, MAILBOX_REQUEST_BYTES, MAILBOX_RESPONSE_BYTES)
            rt = Runtime(mm, layout["runtime"][0], n_connections)
            rt.publish(owners=own, cache_policy=cache_policy, cache_capacity_bytes=cache_capacity_bytes,
                       rebalance=rebalance)
            del rt
            # magic last: an attacher that sees it sees a fully initialised segment
            mm[0:8] = MAGIC
            return cls(instance, name, mm, owner=True)
        except BaseException:
            posix_ipc.unlink_shared_memory(name)
            for sem_name in created_sems:
                posix_ipc.unlink_semaphore(sem_name)
            if mm is not None:
                try:
                    mm.close()
                except BufferError:
                    pass
            raise

    @classmethod
    def attach(cls, instance: str, wait_s: float = 1.0) -> ControlBlock:
        """Map the control segment of a running instance.

        Raises :class:`InstanceNotRunning` when there is none, ControlError when
        it is not a control segment of this layout version.  ``wait_s``: how
        long to wait for a supervisor that is still initialising it.
        """
        naming.validate_instance(instance)
        name = naming.control_name(instance)
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise InstanceNotRunning(
                f"flexemr instance {instance!r} is not running (no control segment {name})") from None
        try:
            if shm.size < HEADER_BYTES:
                raise ControlError(f"{name} is {shm.size} bytes: not a flexemr control segment")
            mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        try:
            deadline = time.monotonic() + wait_s
            while mm[0:8] == b"\0" * 8 and time.monotonic() < deadline:
                time.sleep(0.01)  # the supervisor stores the magic last
            magic = mm[0:8]
            if magic == b"\0" * 8:
                raise ControlError(f"control segment {name} is still being created "
                                   f"(the supervisor of {instance!r} is starting; try again)")
            if magic[:5] != MAGIC[:5]:
                raise ControlError(f"{name} is not a flexemr control segment (magic {magic!r})")
            version = struct.unpack_from("<I", mm, 8)[0]
            if magic != MAGIC or version != VERSION:
                raise ControlError(f"control segment {name} has layout version {version}; this flexemr "
                                   f"understands version {VERSION} (use emrctl from the daemon's install)")
            return cls(instance, name, mm, owner=False)
        except BaseException:
            mm.close()
            raise

    def close(self) -> None:
        """Unmap (idempotent).  Rows handed out earlier keep the mapping alive until dropped."""
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        self.engines, self.connections, self.tables = [], [], {}
        self._sec.clear()
        del self.runtime, self.inference, self.ranker, self.cache, self._topo_w
        try:
            mm.close()
        except BufferError:
            pass  # unmapped when the last exported view dies

    def unlink(self) -> None:
        """Remove the segment and mailbox semaphore names (supervisor only); missing names are fine."""
        unlink_control(self.instance)

    def __enter__(self) -> ControlBlock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            raise ControlError(f"control block {self.name} is closed")
        return self._mm

    def mailbox_offset(self) -> int:
        return self._layout["mailbox"][0]

    def supervisor_alive(self) -> bool:
        """False when the segment is stale (its supervisor died without unlinking it)."""
        return pid_alive(self.supervisor_pid)

    def uptime_s(self) -> float:
        return (time.monotonic_ns() - self.created_mono_ns) / 1e9

    # ------------------------------------------------------------------ writer helpers

    def _conn_row(self, engine_id: int, conn_id: int) -> Row:
        if not 0 <= engine_id < self.n_engines or not 0 <= conn_id < self.n_connections:
            raise IndexError(f"no connection stats row for engine {engine_id}, connection {conn_id}")
        return Row(self._sec["conn_stats"], engine_id * self.n_connections + conn_id, self.mm,
                   f"engine[{engine_id}].conn[{conn_id}]")

    def add_tables(self, **deltas: Sequence[int] | np.ndarray) -> None:
        """Inference side: add per-table counters (arrays in ``table_names`` order) in one write per row."""
        self._sec["tables"].update_all(True, deltas)

    def set_owner(self, conn_id: int, engine_id: int) -> int:
        """Supervisor side: move ``conn_id`` to ``engine_id`` in the owner map; returns the new epoch.

        Counts a migration on the connection.  The engines and the inference
        process see the new epoch between batches and hand the connection over.
        """
        if not 0 <= conn_id < self.n_connections:
            raise ValueError(f"no connection {conn_id} (connections: 0-{self.n_connections - 1})")
        if not 0 <= engine_id < self.n_engines:
            raise ValueError(f"no engine {engine_id} (engines: 0-{self.n_engines - 1})")
        epoch = self.runtime.publish(owners={conn_id: engine_id})
        self.connections[conn_id].control.add(migrations=1)
        self.connections[conn_id].control.update(last_migration_ns=time.monotonic_ns())
        return epoch

    def set_inference(self, *, pid: int | None = None, state: EngineState | str | None = None,
                      restarts: int | None = None, started_ns: int | None = None) -> None:
        """Supervisor side: process facts of the inference process."""
        fields: dict[str, int] = {}
        if pid is not None:
            fields["pid"] = pid
        if state is not None:
            fields["state"] = int(EngineState.parse(state))
        if restarts is not None:
            fields["restarts"] = restarts
        if started_ns is not None:
            fields["started_ns"] = started_ns
        self.inference.update(**fields)

    def update_rates(self, now_ns: int | None = None, min_interval_s: float = 0.25) -> None:
        """Supervisor side (call from its ~1 s tick): per-engine rates from the engines' counters.

        Engines only count; the supervisor derives ``requests_per_s``,
        ``subrequests_per_s`` and ``busy_ratio`` into its own engine_proc rows,
        so a one-shot ``emrctl status`` shows rates and the data path does no
        arithmetic for them.  A counter that went backwards (restarted engine)
        counts as 0 for that interval.
        """
        now = time.monotonic_ns() if now_ns is None else now_ns
        for eng in self.engines:
            st = eng.stats.read()
            cur = (now, st["requests_total"], st["subrequests_total"], st["busy_ns"])
            prev = self._rate_prev.get(eng.id)
            if prev is not None:
                dt = (now - prev[0]) / 1e9
                if dt < min_interval_s:
                    continue
                eng.process.update(requests_per_s=max(0, cur[1] - prev[1]) / dt,
                                   subrequests_per_s=max(0, cur[2] - prev[2]) / dt,
                                   busy_ratio=min(1.0, max(0, cur[3] - prev[3]) / 1e9 / dt))
            self._rate_prev[eng.id] = cur

    # ------------------------------------------------------------------ topology

    def read_topology(self) -> tuple[int, dict[str, Any]]:
        """(generation, topology dict); parsed again only when the generation changed."""
        w, mm = self._topo_w, self.mm
        lo = self._topo_off + TOPO_DATA_OFF
        deadline = time.monotonic() + _READ_GIVE_UP_S
        while True:
            g1 = int(w[0])
            cached = self._topo_cache
            if cached is not None and cached[0] == g1:
                return g1 // 2, cached[1]
            if not g1 & 1:
                length = int(w[1])
                data = mm[lo:lo + length]
                if int(w[0]) == g1:
                    break
            if time.monotonic() > deadline:
                raise ControlError(f"{self.name}: topology is being rewritten by a writer that stopped")
            os.sched_yield()
        topo = json.loads(data.decode()) if data else {}
        self._topo_cache = (g1, topo)
        return g1 // 2, topo

    @property
    def topology(self) -> dict[str, Any]:
        return self.read_topology()[1]

    def set_topology(self, topology: Mapping[str, Any]) -> int:
        """Supervisor side: replace the topology JSON; returns the new generation."""
        data = _encode_topology(topology)
        cap = int(self._topo_w[2])
        if len(data) > cap:
            raise ControlError(f"topology is {len(data)} bytes; the control segment holds at most {cap}")
        w, mm = self._topo_w, self.mm
        lo = self._topo_off + TOPO_DATA_OFF
        with self._topo_lock:
            g = int(w[0])
            g += g & 1
            w[0] = g + 1
            try:
                mm[lo:lo + len(data)] = data
                w[1] = len(data)
            finally:
                w[0] = g + 2
        return (g + 2) // 2

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The status JSON (``emrctl status --json``): every row read consistently.

        Rates: ``engines[].requests_per_s`` etc. come from the supervisor's
        :meth:`update_rates`; with ``previous`` (an earlier snapshot from any
        reader) they are recomputed from the counter deltas between the two
        snapshots instead (``emrctl status --watch``).
        """
        if self._mm is None:
            raise ControlError(f"control block {self.name} is closed")
        now = time.monotonic_ns()
        rt = self.runtime.read()
        gen, topo = self.read_topology()
        engines = []
        owned = [0] * self.n_engines
        for e in rt.owners:
            if 0 <= e < self.n_engines:
                owned[e] += 1
        for eng in self.engines:
            d = eng.read()
            hb = d.pop("heartbeat_ns")
            d["heartbeat_age_s"] = None if hb == 0 else round(max(0, now - hb) / 1e9, 3)
            d["connections"] = owned[eng.id]
            engines.append(d)
        conns = []
        addrs = [s.get("address", s.get("name", "")) if isinstance(s, Mapping) else str(s)
                 for s in topo.get("servers", [])]
        for slot in self.connections:
            d = slot.read(rt.owners)
            d["address"] = addrs[slot.server] if 0 <= slot.server < len(addrs) else ""
            conns.append(d)
        ranker = self.ranker.read()
        del ranker["seq"]
        hb = ranker.pop("heartbeat_ns")
        ranker["heartbeat_age_s"] = None if hb == 0 else round(max(0, now - hb) / 1e9, 3)
        inf = self.inference.read()
        ranker["pid"] = inf["pid"]
        ranker["state"] = _label(EngineState, inf["state"])
        ranker["restarts"] = inf["restarts"]
        cache = self.cache.read()
        del cache["seq"]
        cache["policy"] = _label(CacheMode, cache["policy"])
        cache["hit_rate"] = _ratio(cache["hits"], cache["lookups"])
        cache["target_policy"] = rt.cache_policy.label
        cache["target_capacity_bytes"] = rt.cache_capacity_bytes
        tables: dict[str, dict[str, Any]] = {}
        for t, row in self.tables.items():
            d = row.read()
            del d["seq"]
            d["hit_rate"] = _ratio(d["hits"], d["lookups"])
            tables[t] = d
        cache["tables"] = {t: {"hit_rate": d["hit_rate"], "hits": d["hits"], "lookups": d["lookups"]}
                           for t, d in tables.items()}
        snap: dict[str, Any] = {
            "version": VERSION,
            "instance": self.instance,
            "supervisor_pid": self.supervisor_pid,
            "uptime_s": round((now - self.created_mono_ns) / 1e9, 3),
            "taken_ns": now,
            "mode": topo.get("mode", ""),
            "epoch": rt.epoch,
            "rebalance": rt.rebalance,
            "topology_generation": gen,
            "servers": topo.get("servers", []),
            "engines": engines,
            "connections": conns,
            "ranker": ranker,
            "cache": cache,
            "tables": tables,
        }
        if previous is not None:
            apply_rates(snap, previous)
        return snap


def apply_rates(snap: dict[str, Any], previous: Mapping[str, Any]) -> None:
    """Recompute rates in ``snap`` from counter deltas since ``previous`` (both from snapshot())."""
    dt = (snap["taken_ns"] - previous.get("taken_ns", 0)) / 1e9
    if dt <= 0:
        return
    prev_eng = {e["id"]: e for e in previous.get("engines", [])}
    for e in snap["engines"]:
        p = prev_eng.get(e["id"])
        if p is not None:
            e["requests_per_s"] = max(0, e["requests_total"] - p["requests_total"]) / dt
            e["subrequests_per_s"] = max(0, e["subrequests_total"] - p["subrequests_total"]) / dt
            e["busy_ratio"] = min(1.0, max(0, e["busy_ns"] - p["busy_ns"]) / 1e9 / dt)
    prev_conn = {c["id"]: c for c in previous.get("connections", [])}
    for c in snap["connections"]:
        p = prev_conn.get(c["id"])
        if p is not None:
            c["subrequests_per_s"] = max(0, c["subrequests_total"] - p["subrequests_total"]) / dt
    pr = previous.get("ranker")
    if pr:
        snap["ranker"]["requests_per_s"] = max(0, snap["ranker"]["requests_total"] - pr["requests_total"]) / dt


def unlink_control(instance: str) -> None:
    """Remove the control segment and mailbox semaphores of ``instance`` (missing ones are fine)."""
    for unlink, obj in ((posix_ipc.unlink_shared_memory, naming.control_name(instance)),
                        *((posix_ipc.unlink_semaphore, s) for s in mailbox_semaphore_names(instance))):
        try:
            unlink(obj)
        except posix_ipc.ExistentialError:
            pass


# ---------------------------------------------------------------------- helpers


def _label(enum_cls: type[EngineState] | type[CacheMode], value: int) -> str:
    try:
        return enum_cls(value).label
    except ValueError:
        return f"unknown({value})"  # written by a newer build: show it rather than fail


def _ratio(num: int, den: int) -> float:
    return float(num) / den if den else 0.0


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _section_dtypes() -> dict[str, np.dtype]:
    return {"engine_proc": ENGINE_PROC, "engine_stats": ENGINE_STATS, "conn_static": CONN_STATIC,
            "conn_ctl": CONN_CTL, "conn_stats": CONN_STATS, "inference_proc": INFERENCE_PROC,
            "ranker": RANKER, "cache": CACHE, "table_names": TABLE_NAME, "tables": TABLES}


def _plan_layout(n_eng: int, n_conn: int, n_tab: int, topo_bytes: int) -> tuple[dict[str, tuple[int, int, int]], int]:
    counts = {"engine_proc": n_eng, "engine_stats": n_eng, "conn_static": n_conn, "conn_ctl": n_conn,
              "conn_stats": n_eng * n_conn, "inference_proc": 1, "ranker": 1, "cache": 1,
              "table_names": n_tab, "tables": n_tab}
    dtypes = _section_dtypes()
    layout: dict[str, tuple[int, int, int]] = {}
    off = HEADER_BYTES
    for sname in SECTIONS:
        if sname in dtypes:
            size = counts[sname] * dtypes[sname].itemsize
            layout[sname] = (off, counts[sname], dtypes[sname].itemsize)
        elif sname == "runtime":
            size = 8 * (RT_OWNERS + n_conn)
            layout[sname] = (off, 1, size)
        elif sname == "topology":
            size = topo_bytes
            layout[sname] = (off, 1, size)
        else:  # mailbox: page aligned so the big request/response buffers start on a page
            off = _align(off, PAGE)
            size = MAILBOX_HEADER_BYTES + MAILBOX_REQUEST_BYTES + MAILBOX_RESPONSE_BYTES
            layout[sname] = (off, 1, size)
        off = _align(off + size, ROW_ALIGN)
    return layout, _align(off, PAGE)


def _read_section_table(mm: mmap.mmap) -> dict[str, tuple[int, int, int]]:
    return {sname: _SECTION_ENTRY.unpack_from(mm, _SECTION_TABLE_OFF + i * _SECTION_ENTRY.size)
            for i, sname in enumerate(SECTIONS)}


def _encode_topology(topology: Mapping[str, Any]) -> bytes:
    try:
        return json.dumps(dict(topology), sort_keys=True, separators=(",", ":")).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"topology must be JSON-serialisable: {e}") from None


def _conn_servers(topology: Mapping[str, Any], n_conn: int, explicit: Sequence[int] | None) -> list[int]:
    if explicit is not None:
        servers = [int(s) for s in explicit]
    elif isinstance(topology.get("connections"), Sequence) and len(topology["connections"]) == n_conn:
        servers = [int(c["server"]) if isinstance(c, Mapping) else int(c) for c in topology["connections"]]
    else:
        n_srv = len(topology.get("servers", [])) or 1
        servers = [c * n_srv // n_conn for c in range(n_conn)] if n_conn else []
    if len(servers) != n_conn:
        raise ValueError(f"conn_servers has {len(servers)} entries, expected {n_conn}")
    return servers


def _remove_stale(instance: str, name: str) -> None:
    """Unlink a control segment left by a dead supervisor; refuse to replace a live one."""
    try:
        # wait a little: a segment without magic may be another supervisor mid-create
        old = ControlBlock.attach(instance, wait_s=1.0)
    except InstanceNotRunning:
        return
    except ControlError:
        unlink_control(instance)  # unreadable (older layout, never finished): nobody can use it
        return
    try:
        pid = old.supervisor_pid
        if pid != os.getpid() and pid_alive(pid):
            raise ControlError(f"flexemr instance {instance!r} is already running "
                               f"(supervisor pid {pid} owns {name})")
    finally:
        old.close()
    unlink_control(instance)
