"""Drive overlapping live migrations through the control mailbox, as emrctl or the rebalancer would.

Each move is started with ``Migrate(wait=False)``: the supervisor answers as
soon as it published the new owner (its ``epoch``), and the move is confirmed
when the ranker's acknowledged epoch (``epoch_seen``) reaches it, i.e. the new
engine's connection serves and the old one drained and closed.  So a move is
*started* every ``period_s`` while earlier ones are still reopening, each on a
different connection (a connection is never moved again before its previous
move is confirmed).  Used by the host test (tests/integration) and the guest
test (tests/rdma).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable


@dataclasses.dataclass
class Burst:
    """What happened to each move of a burst, in start order (times: time.monotonic())."""

    moves: list[tuple[int, int]]           # (conn, to_engine)
    started: list[float]                   # when the supervisor published the new owner
    confirmed: list[float | None]
    late: list[float] = dataclasses.field(default_factory=list)   # started - its slot on the schedule
    overlapped: int = 0                    # moves started while an earlier one was not confirmed yet

    @property
    def intervals_s(self) -> list[float]:
        return [b - a for a, b in zip(self.started, self.started[1:])]

    @property
    def took_s(self) -> list[float | None]:
        return [None if c is None else c - s for s, c in zip(self.started, self.confirmed)]

    def describe(self) -> str:
        took = ", ".join("-" if t is None else f"{t:.2f}" for t in self.took_s)
        gaps = ", ".join(f"{g:.2f}" for g in self.intervals_s)
        return (f"{len(self.moves)} moves started {gaps} s apart (at most {max(self.late, default=0):.2f} s after "
                f"their slot), {self.overlapped} while an earlier one was under way; each confirmed after {took} s")


def move_all(ctl, moves: list[tuple[int, int]], period_s: float, confirm_timeout_s: float,
             give_up: Callable[[], bool] = lambda: False) -> Burst:
    """Start ``moves`` one every ``period_s`` without waiting, then wait until each is confirmed.

    ``ctl`` is an emrctl DaemonClient.  Every conn in ``moves`` must differ.
    Stops early (leaving moves unconfirmed) when ``give_up()`` turns true.
    """
    from flexemr.control.commands import Migrate

    conns = [c for c, _e in moves]
    if len(set(conns)) != len(conns):
        raise ValueError(f"a burst moves each connection once, got {conns}")
    burst = Burst(list(moves), [], [None] * len(moves))
    epochs: list[int] = []

    def confirm() -> None:
        seen = ctl.block.ranker.read()["epoch_seen"]
        now = time.monotonic()
        for i, epoch in enumerate(epochs):
            if burst.confirmed[i] is None and seen >= epoch:
                burst.confirmed[i] = now

    t0 = time.monotonic()   # the schedule; from the first start on, slots count from when it really started
    for k, (conn, engine) in enumerate(moves):
        while time.monotonic() < t0 + k * period_s:
            confirm()
            time.sleep(min(0.01, max(0.0, t0 + k * period_s - time.monotonic())))
        confirm()
        if any(c is None for c in burst.confirmed[:k]):
            burst.overlapped += 1
        res = ctl.send(Migrate(conn=conn, to_engine=engine, wait=False))
        if not res.get("moved"):
            raise AssertionError(f"move of connection {conn} to engine {engine} was not started: {res}")
        # The supervisor's clock (CLOCK_MONOTONIC, shared on one host) says when it published the owner.
        started = res["started_ns"] / 1e9 if "started_ns" in res else time.monotonic()
        if k == 0:
            t0 = started
        burst.started.append(started)
        burst.late.append(started - (t0 + k * period_s))
        epochs.append(int(res["epoch"]))
        if give_up():
            return burst
    deadline = time.monotonic() + confirm_timeout_s
    while any(c is None for c in burst.confirmed) and time.monotonic() < deadline and not give_up():
        confirm()
        time.sleep(0.01)
    return burst
