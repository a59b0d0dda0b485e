"""The status JSON (``emrctl status --json``) built from the control segment, and the fields derived for it.

Derived in :meth:`ControlBlock.snapshot` (the status JSON), not stored:
``engines[].connections`` is the owner-map count (what the supervisor
decided; ``active_connections`` is what the engine serves right now, so the
two differ only while a migration is in flight); ``hit_rate`` is hits/lookups;
``heartbeat_age_s`` is now - heartbeat_ns; ``shards`` is, per shard group
(the shards of one primary), how many of its holders (topology ``holders``)
the ranker sees up, and ``replicas`` how many each group should have.
Per-engine rates are computed by
the supervisor once a second (:meth:`ControlBlock.update_rates`, into its own
engine_proc rows) so a one-shot ``emrctl status`` has them and engines only
count; ``snapshot(previous)`` recomputes them from two snapshots instead
(``--watch``).  The ranker's ``requests_per_s`` is computed by the inference
process itself.

Nothing here writes the segment except :meth:`EngineRates.update` (the supervisor's engine_proc rows).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from flexemr.control.layout import VERSION, EngineState, label_of
from flexemr.control.slots import EngineSlot
from flexemr.errors import ControlError
from flexemr.types import CacheMode

if TYPE_CHECKING:  # only for annotations: block.py imports this module
    from flexemr.control.block import ControlBlock

__all__ = ["EngineRates", "apply_rates", "build_snapshot", "live_replicas", "ratio", "server_entries",
           "shard_holders"]


def ratio(num: int, den: int) -> float:
    """num / den, 0.0 when nothing was counted (a hit rate before the first lookup)."""
    return float(num) / den if den else 0.0


def build_snapshot(block: ControlBlock, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The status JSON (``emrctl status --json``): every row read consistently.

    Rates: ``engines[].requests_per_s`` etc. come from the supervisor's
    :meth:`EngineRates.update`; with ``previous`` (an earlier snapshot from any
    reader) they are recomputed from the counter deltas between the two
    snapshots instead (``emrctl status --watch``).
    """
    if block.closed:
        raise ControlError(f"control block {block.name} is closed")
    now = time.monotonic_ns()
    rt = block.runtime.read()
    gen, topo = block.read_topology()
    engines = []
    owned = [0] * block.n_engines
    for e in rt.owners:
        if 0 <= e < block.n_engines:
            owned[e] += 1
    for eng in block.engines:
        d = eng.read()
        hb = d.pop("heartbeat_ns")
        d["heartbeat_age_s"] = None if hb == 0 else round(max(0, now - hb) / 1e9, 3)
        d["connections"] = owned[eng.id]
        engines.append(d)
    conns = []
    topo_servers = topo.get("servers", [])
    addrs = [s.get("address", s.get("name", "")) if isinstance(s, Mapping) else str(s) for s in topo_servers]
    for slot in block.connections:
        d = slot.read(rt.owners)
        d["address"] = addrs[slot.server] if 0 <= slot.server < len(addrs) else ""
        conns.append(d)
    ranker = block.ranker.read()
    del ranker["seq"]
    hb = ranker.pop("heartbeat_ns")
    ranker["heartbeat_age_s"] = None if hb == 0 else round(max(0, now - hb) / 1e9, 3)
    inf = block.inference.read()
    ranker["pid"] = inf["pid"]
    ranker["state"] = label_of(EngineState, inf["state"])
    ranker["restarts"] = inf["restarts"]
    ranker["failover"] = {"reissued": ranker.pop("reissued_total"), "hedges_sent": ranker.pop("hedges_sent"),
                          "hedges_won": ranker.pop("hedges_won"), "failovers": ranker.pop("failovers_total")}
    servers = server_entries(block, topo_servers, now)
    holders = shard_holders(topo, block.n_servers)
    cache = block.cache.read()
    del cache["seq"]
    cache["policy"] = label_of(CacheMode, cache["policy"])
    cache["hit_rate"] = ratio(cache["hits"], cache["lookups"])
    cache["target_policy"] = rt.cache_policy.label
    cache["target_capacity_bytes"] = rt.cache_capacity_bytes
    tables: dict[str, dict[str, Any]] = {}
    for t, row in block.tables.items():
        d = row.read()
        del d["seq"]
        d["hit_rate"] = ratio(d["hits"], d["lookups"])
        tables[t] = d
    cache["tables"] = {t: {"hit_rate": d["hit_rate"], "hits": d["hits"], "lookups": d["lookups"]}
                       for t, d in tables.items()}
    snap: dict[str, Any] = {
        "version": VERSION,
        "instance": block.instance,
        "supervisor_pid": block.supervisor_pid,
        "uptime_s": round((now - block.created_mono_ns) / 1e9, 3),
        "taken_ns": now,
        "mode": topo.get("mode", ""),
        "epoch": rt.epoch,
        "rebalance": rt.rebalance,
        "topology_generation": gen,
        "servers": servers,
        "shards": live_replicas(holders, servers),
        "replicas": min((len(h) for h in holders.values()), default=1),
        "engines": engines,
        "connections": conns,
        "ranker": ranker,
        "cache": cache,
        "tables": tables,
        "model": model_versions(topo),
    }
    if previous is not None:
        apply_rates(snap, previous)
    return snap


def model_versions(topo: Mapping[str, Any]) -> dict[str, Any]:
    """Model versions (topology ``model``, written by the supervisor's rollout): active, loading, last switches."""
    m = topo.get("model") or {}
    return {"active": m.get("active", 1), "previous": m.get("previous"), "loading": m.get("loading"),
            "last_error": m.get("last_error"), "history": m.get("history", []), "servers": m.get("servers", {})}


def server_entries(block: ControlBlock, topo_servers: Sequence[Any], now_ns: int) -> list[dict[str, Any]]:
    """One entry per embedding server: its topology name and address merged with its two rows."""
    out = []
    for slot in block.servers:
        t = topo_servers[slot.id] if slot.id < len(topo_servers) else {}
        t = t if isinstance(t, Mapping) else {"address": str(t)}
        d = slot.read()
        changed = d.pop("changed_ns")
        d["changed_age_s"] = None if changed == 0 else round(max(0, now_ns - changed) / 1e9, 3)
        out.append({"id": slot.id, "name": t.get("name", f"embedding[{slot.id}]"),
                    "address": t.get("address", ""), **d})
    return out


def shard_holders(topo: Mapping[str, Any], n_servers: int) -> dict[int, list[int]]:
    """Primary -> servers holding its shards (topology ``holders``; without it each primary holds its own)."""
    listed = topo.get("holders")
    if isinstance(listed, Sequence) and listed:
        return {p: [int(s) for s in h] for p, h in enumerate(listed)}
    return {p: [p] for p in range(n_servers)}


def live_replicas(holders: Mapping[int, Sequence[int]], servers: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Shard group (primary, as a JSON key) -> how many of its holders the ranker sees up."""
    up = {s["id"] for s in servers if s["state"] == "up"}
    return {str(p): sum(1 for s in h if s in up) for p, h in holders.items()}


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



class EngineRates:
    """Supervisor side: per-engine rates from the engines' counters (call from its ~1 s tick).

    Engines only count; the supervisor derives ``requests_per_s``,
    ``subrequests_per_s`` and ``busy_ratio`` into its own engine_proc rows,
    so a one-shot ``emrctl status`` shows rates and the data path does no
    arithmetic for them.  A counter that went backwards (restarted engine)
    counts as 0 for that interval.
    """

    __slots__ = ("_prev",)

    def __init__(self) -> None:
        self._prev: dict[int, tuple[int, int, int, int]] = {}

    def update(self, engines: Sequence[EngineSlot], now_ns: int | None = None, min_interval_s: float = 0.25) -> None:
        """Write the rates since the previous call (at least ``min_interval_s`` ago) into each engine_proc row."""
        now = time.monotonic_ns() if now_ns is None else now_ns
        for eng in engines:
            st = eng.stats.read()
            cur = (now, st["requests_total"], st["subrequests_total"], st["busy_ns"])
            prev = self._prev.get(eng.id)
            if prev is not None:
                dt = (now - prev[0]) / 1e9
                if dt < min_interval_s:
                    continue
                eng.process.update(requests_per_s=max(0, cur[1] - prev[1]) / dt,
                                   subrequests_per_s=max(0, cur[2] - prev[2]) / dt,
                                   busy_ratio=min(1.0, max(0, cur[3] - prev[3]) / 1e9 / dt))
            self._prev[eng.id] = cur
