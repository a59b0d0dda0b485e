"""The control segment ``/flexemr.<instance>.ctl``: its byte layout (header, sections, row dtypes).

This module is the one place the layout is written down; :mod:`~flexemr.control.block` maps it,
:mod:`~flexemr.control.seqlock` reads and writes its rows, :mod:`~flexemr.control.snapshot`
turns it into the status JSON.

One POSIX shared-memory segment per daemon instance, created and unlinked by
the supervisor only; engines, the inference process and emrctl ``attach`` it by
instance name.  Stats are numpy structured arrays, one row per engine /
connection / embedding server / table, each row guarded by its own **seqlock**.  All integers are
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
        64            4    n_servers             creator      embedding servers (the topology's servers)
        68           60    (zero)
       128     15 x 24     section table         creator      per section: offset, count, row_bytes
      4096    ...          sections, each 64-byte aligned, in SECTION order:

    section         rows              writer (one process)   fields
    --------------  ----------------  ---------------------  -----------------------------------------
    engine_proc     n_engines         supervisor             pid cpu state restarts started_ns
                                                             requests_per_s subrequests_per_s busy_ratio
    engine_stats    n_engines         engine i               active_connections queue_depth inflight
                                                             subrequests_total requests_total bytes_sent
                                                             bytes_received busy_ns heartbeat_ns epoch_seen
                                                             bytes_lent bytes_copied large_bytes_copied
                                                             fills_read rows_read
    conn_static     n_connections     creator (no seqlock)   server
    conn_ctl        n_connections     supervisor             migrations last_migration_ns
    conn_stats      n_engines x n_c   engine e (row e*n_c+c) queued inflight credits subrequests_total
                                                             bytes_sent bytes_received rtt_p50_us rtt_p99_us
                                                             credit_latency_p50_us credit_latency_p99_us
                                                             updated_ns
    server_proc     n_servers         supervisor             pid state restarts started_ns
                                                             (state unused: not a child of this
                                                             daemon; pid 0 while it is down)
    server_stats    n_servers         inference              state outstanding connections_up changed_ns
    inference_proc  1                 supervisor             pid state restarts started_ns
    ranker          1                 inference              requests_total errors_total samples_total
                                                             batches_total latency_p50_ms latency_p99_ms
                                                             mean_batch requests_per_s inflight_batches
                                                             heartbeat_ns epoch_seen reissued_total
                                                             hedges_sent hedges_won failovers_total
    cache           1                 inference              policy capacity_bytes used_bytes hits lookups
                                                             evictions fills entries
    table_names     n_tables          creator (no seqlock)   name (64 bytes, NUL-padded UTF-8)
    tables          n_tables          inference              lookups hits ids_total bytes_wire
    runtime         1 area            supervisor             epoch, desired cache policy/capacity,
                                                             rebalance, owners[n_connections]
    topology        1 area            supervisor             generation, length, JSON text
    mailbox         1 area (4096 al.) see mailbox.py         request and response of emrctl commands

Every stats row starts with ``seq`` (u64), its seqlock (:mod:`flexemr.control.seqlock`), and is
padded to ROW_ALIGN so two writers never share a cache line.

An embedding server has two rows, like an engine: ``server_proc`` holds the
supervisor's process facts (``state`` an EngineState; only for servers that
are children of this daemon, as under ``flexemrd local``), ``server_stats``
the inference process's view of it (``state`` a ServerState: up, down = marked
down while connected (timeouts), reconnecting = every connection lost and the
engines reopening them; ``changed_ns`` when that view last changed).  Which
servers hold which shard group is in the topology JSON (``holders``: per
primary, its replicas, primary first).

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
import mmap
import struct
from collections.abc import Sequence
from typing import Self

import numpy as np

from flexemr.types import CacheMode  # the one cache-policy enum; its values are stored here

MAGIC = b"FXCTL\x00\x00\x01"
VERSION = 2  # 2: n_servers, server_proc/server_stats, failover counters in ranker
HEADER_BYTES = 4096
ROW_ALIGN = 64
PAGE = 4096
TABLE_NAME_BYTES = 64
# The daemon's group reads status (emrctl status); only the daemon's uid and root
# write: the runtime area (owners, cache size) and the mailbox are commands too,
# and the kernel's permission check is the only sender identity shm can offer.
SEGMENT_MODE = 0o640
MAILBOX_SEMAPHORE_MODE = 0o600  # posting "ready" or taking the mutex is sending a command

# magic, version, header_bytes, total_bytes, n_engines, n_connections, n_tables,
# row_align, supervisor_pid, created_mono_ns, created_unix_ns, n_servers
# (magic and version keep their offsets in every version, so any build can refuse any other)
HEADER = struct.Struct("<8sIIQIIIIqQQI4x")
SECTION_TABLE_OFF = 128
SECTION_ENTRY = struct.Struct("<QQQ")  # offset, count, row_bytes
SECTIONS = ("engine_proc", "engine_stats", "conn_static", "conn_ctl", "conn_stats", "server_proc",
            "server_stats", "inference_proc", "ranker", "cache", "table_names", "tables", "runtime", "topology",
            "mailbox")

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


class _StoredState(enum.IntEnum):
    """A state stored as an integer in a row: parsed from a label or a number, shown by its label."""

    @classmethod
    def parse(cls, value: Self | str | int) -> Self:
        if isinstance(value, str):
            try:
                return cls[value.upper()]
            except KeyError:
                # "EngineState" -> "engine state": the error names the kind of state it expected
                what = cls.__name__.removesuffix("State").lower() + " state"
                raise ValueError(f"unknown {what} {value!r} "
                                 f"(expected {', '.join(s.label for s in cls)})") from None
        return cls(value)

    @property
    def label(self) -> str:
        return self.name.lower()


class EngineState(_StoredState):
    """Lifecycle state of an engine (and of the inference process), written by the supervisor."""

    UNUSED = 0
    STARTING = 1
    READY = 2
    STOPPING = 3
    DEAD = 4
    RESTARTING = 5


class ServerState(_StoredState):
    """An embedding server as the inference process sees it (``server_stats.state``)."""

    UNKNOWN = 0        # the inference process has not published yet
    UP = 1
    DOWN = 2           # connected but marked down (subrequests timed out in a row)
    RECONNECTING = 3   # every connection lost; the engines reopen them with backoff


def row_dtype(fields: Sequence[tuple[str, str]]) -> np.dtype:
    """``seq`` + 8-byte fields, padded to a multiple of ROW_ALIGN so two writers never share a line."""
    names = ["seq", *(n for n, _ in fields)]
    formats = ["<u8", *(f for _, f in fields)]
    size = 8 * len(names)
    return np.dtype({"names": names, "formats": formats, "offsets": [8 * i for i in range(len(names))],
                     "itemsize": (size + ROW_ALIGN - 1) // ROW_ALIGN * ROW_ALIGN})


U, I, F = "<u8", "<i8", "<f8"
ENGINE_PROC = row_dtype([("pid", I), ("cpu", I), ("state", I), ("restarts", U), ("started_ns", U),
                         ("requests_per_s", F), ("subrequests_per_s", F), ("busy_ratio", F)])
ENGINE_STATS = row_dtype([("active_connections", U), ("queue_depth", U), ("inflight", U),
                          ("subrequests_total", U), ("requests_total", U), ("bytes_sent", U),
                          ("bytes_received", U), ("busy_ns", U), ("heartbeat_ns", U), ("epoch_seen", U),
                          # Answers' payload bytes read in place by the ranker / copied into the ring (and of
                          # those, in payloads big enough to lend); cache fills answered by RDMA READ, rows.
                          # They filled the row's padding: 16 fields, still 128 bytes, no offset moved.
                          ("bytes_lent", U), ("bytes_copied", U), ("large_bytes_copied", U),
                          ("fills_read", U), ("rows_read", U)])
CONN_STATIC = np.dtype([("server", I)])
CONN_CTL = row_dtype([("migrations", U), ("last_migration_ns", U)])
CONN_STATS = row_dtype([("queued", U), ("inflight", U), ("credits", U), ("subrequests_total", U),
                        ("bytes_sent", U), ("bytes_received", U), ("rtt_p50_us", F), ("rtt_p99_us", F),
                        ("credit_latency_p50_us", F), ("credit_latency_p99_us", F), ("updated_ns", U)])
SERVER_PROC = row_dtype([("pid", I), ("state", I), ("restarts", U), ("started_ns", U)])
SERVER_STATS = row_dtype([("state", I), ("outstanding", U), ("connections_up", U), ("changed_ns", U)])
INFERENCE_PROC = row_dtype([("pid", I), ("state", I), ("restarts", U), ("started_ns", U)])
RANKER = row_dtype([("requests_total", U), ("errors_total", U), ("samples_total", U), ("batches_total", U),
                    ("latency_p50_ms", F), ("latency_p99_ms", F), ("mean_batch", F), ("requests_per_s", F),
                    ("inflight_batches", U), ("heartbeat_ns", U), ("epoch_seen", U), ("reissued_total", U),
                    ("hedges_sent", U), ("hedges_won", U), ("failovers_total", U)])
CACHE = row_dtype([("policy", I), ("capacity_bytes", U), ("used_bytes", U), ("hits", U), ("lookups", U),
                   ("evictions", U), ("fills", U), ("entries", U)])
TABLE_NAME = np.dtype([("name", f"S{TABLE_NAME_BYTES}")])
TABLES = row_dtype([("lookups", U), ("hits", U), ("ids_total", U), ("bytes_wire", U)])


Layout = dict[str, tuple[int, int, int]]  # section name -> (offset, count, row_bytes)


def align(n: int, a: int) -> int:
    """``n`` rounded up to a multiple of ``a``."""
    return (n + a - 1) // a * a


def section_dtypes() -> dict[str, np.dtype]:
    """The row dtype of every section that holds rows (the areas have none)."""
    return {"engine_proc": ENGINE_PROC, "engine_stats": ENGINE_STATS, "conn_static": CONN_STATIC,
            "conn_ctl": CONN_CTL, "conn_stats": CONN_STATS, "server_proc": SERVER_PROC,
            "server_stats": SERVER_STATS, "inference_proc": INFERENCE_PROC,
            "ranker": RANKER, "cache": CACHE, "table_names": TABLE_NAME, "tables": TABLES}


def plan_layout(n_eng: int, n_conn: int, n_tab: int, topo_bytes: int, n_srv: int = 0) -> tuple[Layout, int]:
    """(section table, total segment bytes) for these counts: sections in SECTIONS order, 64-byte aligned."""
    counts = {"engine_proc": n_eng, "engine_stats": n_eng, "conn_static": n_conn, "conn_ctl": n_conn,
              "conn_stats": n_eng * n_conn, "server_proc": n_srv, "server_stats": n_srv,
              "inference_proc": 1, "ranker": 1, "cache": 1,
              "table_names": n_tab, "tables": n_tab}
    dtypes = section_dtypes()
    layout: Layout = {}
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
            off = align(off, PAGE)
            size = MAILBOX_HEADER_BYTES + MAILBOX_REQUEST_BYTES + MAILBOX_RESPONSE_BYTES
            layout[sname] = (off, 1, size)
        off = align(off + size, ROW_ALIGN)
    return layout, align(off, PAGE)


def read_section_table(mm: mmap.mmap) -> Layout:
    """The section table a creator wrote into the header."""
    return {sname: SECTION_ENTRY.unpack_from(mm, SECTION_TABLE_OFF + i * SECTION_ENTRY.size)
            for i, sname in enumerate(SECTIONS)}


def label_of(enum_cls: type[EngineState] | type[ServerState] | type[CacheMode], value: int) -> str:
    """The label of a stored enum value; a value from a newer build shows as ``unknown(N)`` rather than failing."""
    try:
        return enum_cls(value).label
    except ValueError:
        return f"unknown({value})"
