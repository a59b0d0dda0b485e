"""The automatic rebalancer: which connection to move between engines (pure: the caller applies it).

It watches each engine's load (submission-ring depth + subrequests in
flight, smoothed) and moves one connection from the most to the least loaded
engine when the gap is large and the busy engine owns more than one
connection.  The move itself is the same whatever the transport: the
supervisor names the new owner and the ranker hands the socket over, or
reopens the connection where it cannot move (RDMA; ``[ranker].migration``),
so rebalancing works over every transport.  A reopening move takes a
connect, a HELLO and a drain rather than one sendmsg, which the cooldown
(``cooldown_s``, seconds) leaves ample room for.  The supervisor applies a
move by publishing the new owner and does not wait for it (like
``Migrate(wait=False)``): moves of other connections, its own or emrctl's,
may start while a reopen is still under way (ARCHITECTURE.md, "Overlapping
moves").
"""

from __future__ import annotations

from typing import Any


class Rebalancer:
    """Decides which connection to move (pure: the caller applies it)."""

    def __init__(self, min_gap: float = 2.0, ratio: float = 2.0, cooldown_s: float = 3.0, alpha: float = 0.5) -> None:
        self.min_gap = min_gap
        self.ratio = ratio
        self.cooldown_s = cooldown_s
        self.alpha = alpha
        self.load: dict[int, float] = {}
        self.conn_rate: dict[int, float] = {}
        self._prev_sub: dict[int, tuple[float, int]] = {}
        self.last_move = 0.0

    def observe(self, snap: dict[str, Any], now: float) -> None:
        for e in snap["engines"]:
            cur = float(e["queue_depth"] + e["inflight"])
            self.load[e["id"]] = self.alpha * cur + (1 - self.alpha) * self.load.get(e["id"], cur)
        for c in snap["connections"]:
            prev = self._prev_sub.get(c["id"])
            if prev is not None and now > prev[0]:
                rate = max(0, c["subrequests_total"] - prev[1]) / (now - prev[0])
                self.conn_rate[c["id"]] = self.alpha * rate + (1 - self.alpha) * self.conn_rate.get(c["id"], rate)
            self._prev_sub[c["id"]] = (now, c["subrequests_total"])

    def decide(self, owners: tuple[int, ...], n_engines: int, now: float) -> tuple[int, int, int] | None:
        """(conn, from_engine, to_engine) or None."""
        if n_engines < 2 or now - self.last_move < self.cooldown_s or not self.load:
            return None
        busy = max(self.load, key=self.load.get)
        idle = min(self.load, key=self.load.get)
        hi, lo = self.load[busy], self.load[idle]
        mine = [c for c, e in enumerate(owners) if e == busy]
        if busy == idle or hi - lo < self.min_gap or hi < self.ratio * (lo + 0.5) or len(mine) < 2:
            return None
        # Move the connection whose traffic best evens out the two engines' rates.
        rate = {e: sum(self.conn_rate.get(c, 0.0) for c, o in enumerate(owners) if o == e) for e in (busy, idle)}
        gap = rate[busy] - rate[idle]
        conn = min(mine, key=lambda c: abs(gap - 2 * self.conn_rate.get(c, 0.0)))
        self.last_move = now
        return conn, busy, idle
