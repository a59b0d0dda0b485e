"""The control segment ``/flexemr.<instance>.ctl``: create, attach, close (live stats, runtime state, mailbox).

One POSIX shared-memory segment per daemon instance, created and unlinked by
the supervisor only; engines, the inference process and emrctl ``attach`` it by
instance name.  The package splits it by job:

    layout.py    the byte layout: header, section table, row dtypes (the diagram)
    seqlock.py   one-writer seqlocked rows, the runtime area, the topology area
    slots.py     the rows of one engine / one connection, merged for readers
    snapshot.py  the status JSON and the rates derived for it
    block.py     this module: ControlBlock.create / attach / close / unlink and
                 the supervisor's writes that span several rows (set_owner, ...)
    mailbox.py   the emrctl command mailbox in the segment's last area

Everything that used to be imported from here still is (re-exported below).
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import posix_ipc

from flexemr import naming
from flexemr.naming import pid_alive
from flexemr.control.layout import (
    CACHE,
    CONN_CTL,
    CONN_STATIC,
    CONN_STATS,
    ENGINE_PROC,
    ENGINE_STATS,
    HEADER,
    HEADER_BYTES,
    INFERENCE_PROC,
    MAGIC,
    MAILBOX_HEADER_BYTES,
    MAILBOX_REQUEST_BYTES,
    MAILBOX_RESPONSE_BYTES,
    MAILBOX_SEMAPHORE_MODE,
    PAGE,
    RANKER,
    ROW_ALIGN,
    RT_CACHE_CAPACITY,
    RT_CACHE_POLICY,
    RT_EPOCH,
    RT_OWNERS,
    RT_PUBLICATIONS,
    RT_REBALANCE,
    SECTION_ENTRY,
    SECTION_TABLE_OFF,
    SECTIONS,
    SEGMENT_MODE,
    SERVER_PROC,
    SERVER_STATS,
    TABLE_NAME,
    TABLE_NAME_BYTES,
    TABLES,
    TOPO_DATA_OFF,
    TOPOLOGY_MIN_BYTES,
    VERSION,
    EngineState,
    ServerState,
    align,
    plan_layout,
    read_section_table,
    section_dtypes,
)
from flexemr.control.seqlock import Row, Runtime, RuntimeState, Section, TopologyArea
from flexemr.control.slots import ConnSlot, ConnStatsMatrix, EngineSlot, ServerSlot, process_fields
from flexemr.control.snapshot import EngineRates, apply_rates, build_snapshot
from flexemr.errors import ControlError
from flexemr.types import CacheMode  # the one cache-policy enum (values stored in this segment)

__all__ = [
    # this module
    "ControlBlock", "InstanceNotRunning", "mailbox_semaphore_names", "pid_alive", "segment_path", "semaphore_path",
    "unlink_control",
    # re-exported from layout / seqlock / slots / snapshot / types (their old home was here)
    "CACHE", "CONN_CTL", "CONN_STATIC", "CONN_STATS", "ENGINE_PROC", "ENGINE_STATS", "HEADER_BYTES",
    "INFERENCE_PROC", "MAGIC", "MAILBOX_HEADER_BYTES", "MAILBOX_REQUEST_BYTES", "MAILBOX_RESPONSE_BYTES",
    "MAILBOX_SEMAPHORE_MODE", "PAGE", "RANKER", "ROW_ALIGN", "RT_CACHE_CAPACITY", "RT_CACHE_POLICY", "RT_EPOCH",
    "RT_OWNERS", "RT_PUBLICATIONS", "RT_REBALANCE", "SECTIONS", "SEGMENT_MODE", "SERVER_PROC", "SERVER_STATS",
    "TABLE_NAME", "TABLE_NAME_BYTES", "TABLES", "TOPO_DATA_OFF",
    "TOPOLOGY_MIN_BYTES", "VERSION", "CacheMode", "ConnSlot", "EngineSlot", "EngineState", "Row", "Runtime",
    "RuntimeState", "ServerSlot", "ServerState", "apply_rates",
]


class InstanceNotRunning(ControlError):
    """No control segment for this instance (or only a stale one): the daemon is not running."""


def mailbox_semaphore_names(instance: str) -> tuple[str, str, str]:
    """(mutex, ready, done) semaphores of the mailbox: ``/flexemr.<instance>.ctl.{mutex,ready,done}``."""
    return (naming.shm_name(instance, "ctl", "mutex"), naming.shm_name(instance, "ctl", "ready"),
            naming.shm_name(instance, "ctl", "done"))


def segment_path(name: str) -> str:
    """The file behind shm segment ``name`` (``/dev/shm/NAME``)."""
    return os.path.join(naming.SHM_DIR, name.lstrip("/"))


def semaphore_path(name: str) -> str:
    """The file behind named semaphore ``name`` (``/dev/shm/sem.NAME``, glibc's convention)."""
    return os.path.join(naming.SHM_DIR, naming.SEM_FILE_PREFIX + name.lstrip("/"))


def _describe_owner(name: str) -> str:
    try:
        st = os.stat(segment_path(name))
    except OSError:
        return "owner unknown"
    return f"mode {stat.S_IMODE(st.st_mode):04o}, owner uid {st.st_uid}, group {st.st_gid}"


class ControlBlock:
    """The mapped control segment of one instance (see the module docstring for the layout).

    Supervisor: :meth:`create` ... :meth:`close` + :meth:`unlink`.  Everyone
    else: :meth:`attach` ... :meth:`close`.  Each row has one writer process;
    its threads may write through the same ControlBlock (never through two).
    """

    def __init__(self, instance: str, name: str, mm: mmap.mmap, owner: bool, writable: bool = True) -> None:
        self.instance = instance
        self.name = name
        self._mm: mmap.mmap | None = mm
        self._owner = owner
        self.writable = writable  # False: mapped read-only (a group member reading status)
        (_magic, version, _hb, total, n_eng, n_conn, n_tab, _row_align, sup_pid, mono_ns,
         unix_ns, n_srv) = HEADER.unpack_from(mm, 0)
        self.version = version
        self.total_bytes = total
        self.n_engines = n_eng
        self.n_connections = n_conn
        self.n_tables = n_tab
        self.n_servers = n_srv
        self.supervisor_pid = sup_pid
        self.created_mono_ns = mono_ns
        self.created_unix_ns = unix_ns
        self._layout = read_section_table(mm)
        dtypes = section_dtypes()
        self._sec: dict[str, Section] = {}
        for sname, dt in dtypes.items():
            off, count, row_bytes = self._layout[sname]
            if row_bytes != dt.itemsize:
                raise ControlError(f"{name}: section {sname} has {row_bytes}-byte rows, this flexemr expects "
                                   f"{dt.itemsize} (mismatched builds: restart the daemon)")
            self._sec[sname] = Section(sname, mm, off, count, dt)
        self._conn_stats = ConnStatsMatrix(self._sec["conn_stats"], mm, n_eng, n_conn)
        self.engines = [EngineSlot(e, self._sec["engine_proc"], self._sec["engine_stats"], mm, self._conn_stats)
                        for e in range(n_eng)]
        servers = self._sec["conn_static"].arr["server"]
        self.runtime = Runtime(mm, self._layout["runtime"][0], n_conn)
        self.connections = [ConnSlot(c, int(servers[c]), self._sec["conn_ctl"], mm, self._conn_stats, self.runtime)
                            for c in range(n_conn)]
        self.servers = [ServerSlot(s, self._sec["server_proc"], self._sec["server_stats"], mm)
                        for s in range(n_srv)]
        self.inference = Row(self._sec["inference_proc"], 0, mm, "inference.process")
        self.ranker = Row(self._sec["ranker"], 0, mm, "ranker")
        self.cache = Row(self._sec["cache"], 0, mm, "cache")
        self.table_names = [bytes(n).rstrip(b"\0").decode() for n in self._sec["table_names"].arr["name"]]
        self.tables = {t: Row(self._sec["tables"], i, mm, f"table[{t}]") for i, t in enumerate(self.table_names)}
        self._topology = TopologyArea(mm, self._layout["topology"][0], name)
        self._rates = EngineRates()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, instance: str, n_engines: int, n_connections: int, table_names: Sequence[str],
               topology: Mapping[str, Any], *, conn_servers: Sequence[int] | None = None,
               owners: Sequence[int] | None = None, cache_policy: CacheMode | str = CacheMode.OFF,
               cache_capacity_bytes: int = 0, rebalance: bool = False,
               supervisor_pid: int | None = None, n_servers: int | None = None) -> ControlBlock:
        """Create the segment and the mailbox semaphores (supervisor only).

        ``conn_servers[c]`` is the topology server index of connection ``c``
        (default: ``topology["connections"][c]["server"]`` if present, else
        connections numbered in server order, as the ranker plan numbers
        them).  ``owners[c]`` is its first engine (default ``c % n_engines``).
        ``n_servers``: embedding servers with a server_proc / server_stats row
        (default: the length of ``topology["servers"]``).
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
        n_srv = len(topology.get("servers", [])) if n_servers is None else n_servers
        if n_srv < 0:
            raise ValueError(f"n_servers must be >= 0, got {n_srv}")
        servers = _conn_servers(topology, n_connections, conn_servers)
        own = list(owners) if owners is not None else [c % n_engines for c in range(n_connections)]
        if len(own) != n_connections or any(not 0 <= e < n_engines for e in own):
            raise ValueError(f"owners must list an engine in [0, {n_engines}) for each of {n_connections} connections")
        topo = TopologyArea.encode(topology)
        topo_bytes = align(max(TOPOLOGY_MIN_BYTES, 4 * len(topo) + TOPO_DATA_OFF), PAGE)
        layout, total = plan_layout(n_engines, n_connections, len(names), topo_bytes, n_srv)

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
                os.fchmod(shm.fd, SEGMENT_MODE)  # exactly, whatever the umask (see SEGMENT_MODE)
                mm = mmap.mmap(shm.fd, total)
            finally:
                shm.close_fd()
            for sem_name, initial in zip(mailbox_semaphore_names(instance), (1, 0, 0)):
                try:
                    posix_ipc.unlink_semaphore(sem_name)  # left by a crashed supervisor
                except posix_ipc.ExistentialError:
                    pass
                posix_ipc.Semaphore(sem_name, posix_ipc.O_CREX, mode=MAILBOX_SEMAPHORE_MODE,
                                    initial_value=initial).close()
                created_sems.append(sem_name)
                os.chmod(semaphore_path(sem_name), MAILBOX_SEMAPHORE_MODE)
            pid = os.getpid() if supervisor_pid is None else supervisor_pid
            HEADER.pack_into(mm, 0, b"\0" * 8, VERSION, HEADER_BYTES, total, n_engines, n_connections, len(names),
                              ROW_ALIGN, pid, time.monotonic_ns(), time.time_ns(), n_srv)
            for i, sname in enumerate(SECTIONS):
                SECTION_ENTRY.pack_into(mm, SECTION_TABLE_OFF + i * SECTION_ENTRY.size, *layout[sname])
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
        writable = True
        try:
            try:
                shm = posix_ipc.SharedMemory(name)
            except posix_ipc.PermissionsError:
                # the daemon's group reads status; only its own uid (and root) may write
                shm = posix_ipc.SharedMemory(name, read_only=True)
                writable = False
        except posix_ipc.ExistentialError:
            raise InstanceNotRunning(
                f"flexemr instance {instance!r} is not running (no control segment {name})") from None
        except posix_ipc.PermissionsError:
            raise ControlError(f"permission denied reading {name} ({_describe_owner(name)}): run emrctl as the "
                               f"daemon's user, root, or a member of its group") from None
        try:
            if shm.size < HEADER_BYTES:
                raise ControlError(f"{name} is {shm.size} bytes: not a flexemr control segment")
            mm = mmap.mmap(shm.fd, shm.size, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
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
            return cls(instance, name, mm, owner=False, writable=writable)
        except BaseException:
            mm.close()
            raise

    def close(self) -> None:
        """Unmap (idempotent).  Rows handed out earlier keep the mapping alive until dropped."""
        mm = self._mm
        if mm is None:
            return
        self._mm = None
        self.engines, self.connections, self.servers, self.tables = [], [], [], {}
        self._sec.clear()
        del self.runtime, self.inference, self.ranker, self.cache, self._topology, self._conn_stats
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

    def owner_uid(self) -> int:
        """The uid that owns the segment: the daemon's (only it and root may send commands)."""
        return os.stat(segment_path(self.name)).st_uid

    def mailbox_offset(self) -> int:
        return self._layout["mailbox"][0]

    def supervisor_alive(self) -> bool:
        """False when the segment is stale (its supervisor died without unlinking it)."""
        return pid_alive(self.supervisor_pid)

    def uptime_s(self) -> float:
        return (time.monotonic_ns() - self.created_mono_ns) / 1e9

    # ------------------------------------------------------------------ writer helpers

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
        self.inference.update(**process_fields(pid=pid, state=state, restarts=restarts, started_ns=started_ns))

    def update_rates(self, now_ns: int | None = None, min_interval_s: float = 0.25) -> None:
        """Supervisor side (call from its ~1 s tick): per-engine rates into its engine_proc rows (see EngineRates)."""
        self._rates.update(self.engines, now_ns, min_interval_s)

    # ------------------------------------------------------------------ topology

    def read_topology(self) -> tuple[int, dict[str, Any]]:
        """(generation, topology dict); parsed again only when the generation changed."""
        if self._mm is None:
            raise ControlError(f"control block {self.name} is closed")
        return self._topology.read()

    @property
    def topology(self) -> dict[str, Any]:
        return self.read_topology()[1]

    def set_topology(self, topology: Mapping[str, Any]) -> int:
        """Supervisor side: replace the topology JSON; returns the new generation."""
        if self._mm is None:
            raise ControlError(f"control block {self.name} is closed")
        return self._topology.write(topology)

    # ------------------------------------------------------------------ snapshot

    def snapshot(self, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The status JSON (``emrctl status --json``); see :func:`flexemr.control.snapshot.build_snapshot`."""
        return build_snapshot(self, previous)


def unlink_control(instance: str) -> None:
    """Remove the control segment and mailbox semaphores of ``instance`` (missing ones are fine)."""
    for unlink, obj in ((posix_ipc.unlink_shared_memory, naming.control_name(instance)),
                        *((posix_ipc.unlink_semaphore, s) for s in mailbox_semaphore_names(instance))):
        try:
            unlink(obj)
        except posix_ipc.ExistentialError:
            pass


# ---------------------------------------------------------------------- helpers


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
