"""Which embedding servers are up, and which replica a subrequest should go to.

A server is *down* once every connection to it is lost (the engine reports
COMP_LOST) or after ``DOWN_AFTER_TIMEOUTS`` consecutive timed-out
subrequests; it is *up* again when an engine reconnects (COMP_CONNECTED) or
when it answers.  A subrequest goes to the live holder of its shards with
the least outstanding work (FlexEMR's replicas, HugeCTR-style least-loaded
choice); no subrequest is sent to a server known to be down.

Shared by the batcher (choose, sent) and the completion thread (answered,
lost, connected): every method takes the lock for a few dict operations.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time

import numpy as np

from flexemr.routing.table import RoutingTable

logger = logging.getLogger(__name__)

DOWN_AFTER_TIMEOUTS = 3
SLOW_S = 5.0            # a subrequest unanswered this long counts against its server (short client deadlines do not)
PROBE_AFTER_S = 1.0     # a server marked down by timeouts, still connected, gets one probe this often
LATENCY_WINDOW = 256
# The completion thread asks for a server's latency quantiles for every part in flight on every
# timer pass; they are recomputed at most this often (a hedging threshold 50 ms stale is as good,
# and np.quantile per part per pass was 4% of the ranker's CPU).
QUANTILES_REFRESH_S = 0.05


@dataclasses.dataclass(slots=True)
class ServerState:
    server: int
    address: str
    conns: list[int]
    conn_up: dict[int, bool]
    outstanding: int = 0
    timeouts: int = 0
    down_reason: str = ""
    lost_reason: str = ""      # why its last connection went (shown while it is down)
    down_at: float = 0.0       # monotonic time it was marked down (or last probed)
    changed_ns: int = 0
    latencies: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=LATENCY_WINDOW))
    rr: int = 0
    quantiles: dict = dataclasses.field(default_factory=dict)   # qs -> (computed at, values): see quantiles_s

    @property
    def up(self) -> bool:
        return not self.down_reason and any(self.conn_up.values())

    def probe_due(self, now: float) -> bool:
        """Marked down by timeouts but still connected, and not probed for a while (half-open)."""
        return bool(self.down_reason) and any(self.conn_up.values()) and now - self.down_at >= PROBE_AFTER_S


class ServerHealth:
    def __init__(self, routing: RoutingTable, connections: dict[int, tuple[int, str]]) -> None:
        self.routing = routing
        self._lock = threading.Lock()
        self.servers: dict[int, ServerState] = {}
        for cid, (server, address) in sorted(connections.items()):
            st = self.servers.get(server)
            if st is None:
                st = self.servers[server] = ServerState(server, address, [], {})
            st.conns.append(cid)
            st.conn_up[cid] = True
        self._server_of_conn = {cid: s for cid, (s, _a) in connections.items()}
        self.failovers = 0

    # ---------------------------------------------------------------- batcher

    def choose(self, primary: int, exclude: tuple[int, ...] = ()) -> tuple[int, int] | None:
        """(server, connection) for a subrequest of ``primary``'s shards, or None when no holder is up."""
        with self._lock:
            best = None
            holders = [self.servers[s] for s in self.routing.holders_of(primary) if s in self.servers and s not in exclude]
            for st in holders:
                if st.up and (best is None or st.outstanding < best.outstanding):
                    best = st
            if best is None:
                # No live holder: let one subrequest probe a holder that timed out but is still connected;
                # its answer marks it up again (a circuit breaker's half-open state).
                now = time.monotonic()
                best = next((st for st in holders if st.probe_due(now)), None)
                if best is None:
                    return None
                best.down_at = now
            if not self.servers[primary].up:
                self.failovers += 1    # the primary is down: a replica serves its shards
            live = [c for c in best.conns if best.conn_up[c]]
            best.rr += 1
            conn = live[best.rr % len(live)]
            best.outstanding += 1
            return best.server, conn

    def describe_down(self, primary: int) -> str:
        with self._lock:
            parts = []
            for s in self.routing.holders_of(primary):
                st = self.servers[s]
                parts.append(f"embedding server {s} ({st.address}): "
                             f"{st.down_reason or st.lost_reason or 'connection lost'}")
        return "; ".join(parts) + " — no live replica holds these shards"

    # ---------------------------------------------------------------- completion thread

    def answered(self, server: int, seconds: float) -> None:
        with self._lock:
            st = self.servers[server]
            st.outstanding = max(0, st.outstanding - 1)
            st.latencies.append(seconds)
            st.timeouts = 0
            if st.down_reason and any(st.conn_up.values()):
                logger.info("embedding server %d (%s) answers again", server, st.address)
                st.down_reason = ""
                st.changed_ns = time.monotonic_ns()

    def released(self, server: int) -> None:
        """A subrequest to ``server`` ended without an answer (failed, lost, or its hedge won)."""
        with self._lock:
            st = self.servers[server]
            st.outstanding = max(0, st.outstanding - 1)

    def timed_out(self, server: int, age_s: float) -> None:
        """A subrequest to ``server`` expired after ``age_s``: only slow ones (≥ SLOW_S) count against it."""
        if age_s < SLOW_S:
            return
        with self._lock:
            st = self.servers[server]
            st.timeouts += 1
            if st.timeouts >= DOWN_AFTER_TIMEOUTS and not st.down_reason:
                st.down_reason = f"{st.timeouts} subrequests in a row unanswered for {SLOW_S:g} s or more"
                st.down_at = time.monotonic()
                st.changed_ns = time.monotonic_ns()
                logger.warning("embedding server %d (%s) marked down: %s", server, st.address, st.down_reason)

    def conn_lost(self, conn: int, reason: str) -> int:
        server = self._server_of_conn[conn]
        with self._lock:
            st = self.servers[server]
            was_up = st.up
            st.conn_up[conn] = False
            st.lost_reason = reason
            if was_up and not st.up:
                st.changed_ns = time.monotonic_ns()
                logger.warning("embedding server %d (%s) is down: %s", server, st.address, reason)
        return server

    def conn_connected(self, conn: int) -> None:
        server = self._server_of_conn[conn]
        with self._lock:
            st = self.servers[server]
            was_up = st.up
            st.conn_up[conn] = True
            st.down_reason = ""
            st.timeouts = 0
            if not was_up:
                st.changed_ns = time.monotonic_ns()
                logger.info("embedding server %d (%s) is up again", server, st.address)

    def server_of_conn(self, conn: int) -> int:
        return self._server_of_conn[conn]

    # ---------------------------------------------------------------- hedging and status

    def _quantiles_s(self, server: int, qs: tuple[float, ...]) -> tuple[float, ...] | None:
        """Recent latency quantiles of ``server`` (None until 20 answers), at most QUANTILES_REFRESH_S stale."""
        now = time.monotonic()
        with self._lock:
            st = self.servers[server]
            hit = st.quantiles.get(qs)
            if hit is not None and now - hit[0] < QUANTILES_REFRESH_S:
                return hit[1]
            lat = list(st.latencies)
        if len(lat) < 20:
            return None
        values = tuple(float(v) for v in np.quantile(np.asarray(lat), qs))
        with self._lock:
            st.quantiles[qs] = (now, values)
        return values

    def median_s(self, server: int) -> float | None:
        m = self._quantiles_s(server, (0.5,))
        return None if m is None else m[0]

    def hedge_after_s(self, server: int, q: float) -> float | None:
        """How old a subrequest to ``server`` may get before it is hedged: its recent ``q`` quantile,
        capped at 3x its median (a replica that stalls often inflates its own tail, which would
        otherwise delay exactly the hedges it needs); None until 20 answers were seen."""
        qs = self._quantiles_s(server, (q, 0.5))
        if qs is None:
            return None
        tail, median = qs
        return min(tail, 3.0 * median)

    def all_shards_live(self) -> bool:
        """Every primary's shards have at least one live holder."""
        with self._lock:
            return all(any(self.servers[s].up for s in self.routing.holders_of(p) if s in self.servers)
                       for p in self.servers)

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [{"server": s, "address": st.address, "state": "up" if st.up else "down",
                     "outstanding": st.outstanding, "reason": st.down_reason if not st.up else "",
                     "connections_up": sum(st.conn_up.values())}
                    for s, st in sorted(self.servers.items())]
