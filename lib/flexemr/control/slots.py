"""Per-entity views of the control segment: the rows of one engine, one embedding server, one connection.

An engine has two rows (``engine_proc`` written by the supervisor,
``engine_stats`` by the engine itself); so has an embedding server
(``server_proc`` by the supervisor when the server is its child,
``server_stats`` by the inference process); a connection has a ``conn_ctl`` row
(supervisor) and one ``conn_stats`` row per engine, so whichever engine owns it
writes only its own row and a migration never has two writers on one row.
These classes bundle those rows and merge them for readers.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Any

from flexemr.control.layout import EngineState, ServerState, label_of
from flexemr.control.seqlock import Row, Runtime, Section

__all__ = ["ConnSlot", "ConnStatsMatrix", "EngineSlot", "ServerSlot", "given_fields", "process_fields"]


def given_fields(**values: int | None) -> dict[str, int]:
    """The fields the caller gave, as ints for one seqlock write: None means "leave this field as it is"."""
    return {k: int(v) for k, v in values.items() if v is not None}


def process_fields(*, pid: int | None = None, cpu: int | None = None, state: EngineState | str | None = None,
                   restarts: int | None = None, started_ns: int | None = None) -> dict[str, int]:
    """The supervisor's process facts of one child (engine, server, inference) as row fields.

    Every ``*_proc`` row is written through this one function, so a state label
    is parsed the same way (``EngineState.parse``) whichever child it is about.
    """
    return given_fields(pid=pid, cpu=cpu, state=None if state is None else EngineState.parse(state),
                        restarts=restarts, started_ns=started_ns)


class ConnStatsMatrix:
    """The ``conn_stats`` section: row ``e * n_connections + c`` is engine ``e``'s view of connection ``c``."""

    __slots__ = ("_sec", "_mm", "n_engines", "n_connections")

    def __init__(self, section: Section, mm: mmap.mmap, n_engines: int, n_connections: int) -> None:
        self._sec = section
        self._mm = mm
        self.n_engines = n_engines
        self.n_connections = n_connections

    def row(self, engine_id: int, conn_id: int) -> Row:
        """Engine ``engine_id``'s stats row for connection ``conn_id`` (that engine is its only writer)."""
        if not 0 <= engine_id < self.n_engines or not 0 <= conn_id < self.n_connections:
            raise IndexError(f"no connection stats row for engine {engine_id}, connection {conn_id}")
        return Row(self._sec, engine_id * self.n_connections + conn_id, self._mm,
                   f"engine[{engine_id}].conn[{conn_id}]")


class EngineSlot:
    """Everything about engine ``id``: ``process`` (supervisor's row) and ``stats`` (the engine's row)."""

    __slots__ = ("id", "process", "stats", "_conns")

    def __init__(self, engine_id: int, proc: Section, stats: Section, mm: mmap.mmap, conns: ConnStatsMatrix) -> None:
        self.id = engine_id
        self._conns = conns
        self.process = Row(proc, engine_id, mm, f"engine[{engine_id}].process")
        self.stats = Row(stats, engine_id, mm, f"engine[{engine_id}].stats")

    def update(self, **stats: float) -> None:
        """Engine side: one seqlock write of this engine's stats row (ENGINE_STATS fields)."""
        self.stats.update(**stats)

    def add(self, **deltas: float) -> None:
        """Engine side: add to this engine's counters."""
        self.stats.add(**deltas)

    def conn(self, conn_id: int) -> Row:
        """Engine side: this engine's stats row for connection ``conn_id`` (CONN_STATS fields)."""
        return self._conns.row(self.id, conn_id)

    def set_process(self, *, pid: int | None = None, cpu: int | None = None,
                    state: EngineState | str | None = None, restarts: int | None = None,
                    started_ns: int | None = None) -> None:
        """Supervisor side: process facts of this engine (one seqlock write)."""
        self.process.update(**process_fields(pid=pid, cpu=cpu, state=state, restarts=restarts,
                                             started_ns=started_ns))

    def read(self) -> dict[str, Any]:
        """Both rows merged (each one consistent), ``state`` as a label."""
        proc = self.process.read()
        stats = self.stats.read()
        del proc["seq"], stats["seq"]
        proc["state"] = label_of(EngineState, proc["state"])
        return {"id": self.id, **proc, **stats}


class ServerSlot:
    """Embedding server ``id``: ``process`` (the supervisor's row) and ``stats`` (the inference process's row)."""

    __slots__ = ("id", "process", "stats")

    def __init__(self, server_id: int, proc: Section, stats: Section, mm: mmap.mmap) -> None:
        self.id = server_id
        self.process = Row(proc, server_id, mm, f"server[{server_id}].process")
        self.stats = Row(stats, server_id, mm, f"server[{server_id}].stats")

    def set_process(self, *, pid: int | None = None, state: EngineState | str | None = None,
                    restarts: int | None = None, started_ns: int | None = None) -> None:
        """Supervisor side: process facts of a server that is this daemon's child (one seqlock write)."""
        self.process.update(**process_fields(pid=pid, state=state, restarts=restarts, started_ns=started_ns))

    def update(self, *, state: ServerState | str | int | None = None, outstanding: int | None = None,
               connections_up: int | None = None, changed_ns: int | None = None) -> None:
        """Inference side: how the ranker sees this server right now (one seqlock write)."""
        self.stats.update(**given_fields(state=None if state is None else ServerState.parse(state),
                                         outstanding=outstanding, connections_up=connections_up,
                                         changed_ns=changed_ns))

    def read(self) -> dict[str, Any]:
        """Both rows merged (each one consistent): ``state`` is the ranker's view, ``process`` the supervisor's.

        ``process`` is None when the server is not a child of this daemon
        (a remote embedding host: the supervisor never wrote its row).
        """
        proc = self.process.read()
        stats = self.stats.read()
        local = proc["state"] != EngineState.UNUSED
        return {"id": self.id, "state": label_of(ServerState, stats["state"]),
                "process": label_of(EngineState, proc["state"]) if local else None,
                "pid": proc["pid"], "restarts": proc["restarts"], "started_ns": proc["started_ns"],
                "outstanding": stats["outstanding"], "connections_up": stats["connections_up"],
                "changed_ns": stats["changed_ns"]}


class ConnSlot:
    """Connection ``id``: its server (static), the supervisor's ``control`` row, per-engine stats rows."""

    __slots__ = ("id", "server", "control", "_conns", "_runtime")

    def __init__(self, conn_id: int, server: int, ctl: Section, mm: mmap.mmap, conns: ConnStatsMatrix,
                 runtime: Runtime) -> None:
        self.id = conn_id
        self.server = server
        self._conns = conns
        self._runtime = runtime
        self.control = Row(ctl, conn_id, mm, f"conn[{conn_id}].control")

    def stats_row(self, engine_id: int) -> Row:
        """Engine ``engine_id``'s stats row for this connection (that engine is its only writer)."""
        return self._conns.row(engine_id, self.id)

    def read(self, owners: Sequence[int] | None = None) -> dict[str, Any]:
        """Merged view: counters summed over engines, gauges from the freshest engine row."""
        owner = (owners if owners is not None else self._runtime.read().owners)[self.id]
        rows = [self._conns.row(e, self.id).read() for e in range(self._conns.n_engines)]
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
