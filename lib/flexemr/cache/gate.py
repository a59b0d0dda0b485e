"""Does the cache pay here?  An online A/B test of serving with and without it.

A cache hit saves the ranker a remote lookup, but serving it costs the
ranker's own CPU (looking ids up, pooling hits, combining one more partial).
Over a slow network a hit saves far more than it costs; on loopback or shared
memory, where the "remote" server shares the ranker's cores, it may save
nothing.  No model of the hardware predicts which: ``PayoffGate`` measures it.

It alternates *probe windows* of ``probe_batches`` batches served through the
cache and bypassing it, ``rounds`` times each, and compares the median time per
sample of the batches' lookup stage (from the batch's creation until every
partial is in).  If the cache arm is not faster by ``margin``, the gate
*closes*: batches bypass the cache (no lookups, no hit pooling, no fills: it
costs nothing) for ``hold_s``, doubling on each consecutive loss up to
``max_hold_s``; then it probes again, since the load or the network may have
changed.  If the cache wins, the gate stays *open* for ``hold_s`` and then
re-checks.  Probing costs at most ``probe_batches * rounds`` batches served the
slower way per hold period.
"""

from __future__ import annotations

import enum
import time
from typing import Callable

import numpy as np

__all__ = ["GateState", "PayoffGate"]


class GateState(enum.Enum):
    PROBING = "probing"
    OPEN = "open"        # the cache pays: serve through it
    CLOSED = "closed"    # hits save nothing measurable: bypass the cache


class PayoffGate:
    def __init__(self, probe_batches: int = 8, rounds: int = 2, margin: float = 0.05, hold_s: float = 30.0,
                 max_hold_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if probe_batches < 1 or rounds < 1:
            raise ValueError(f"probe_batches and rounds must be >= 1, got {probe_batches} and {rounds}")
        self.probe_batches = probe_batches
        self.rounds = rounds
        self.margin = margin
        self.hold_s = hold_s
        self.max_hold_s = max_hold_s
        self.clock = clock
        self.state = GateState.PROBING
        self.losses = 0                   # consecutive probes the cache lost
        self.last_ratio = float("nan")    # median time per sample, cache arm / bypass arm
        self._until = 0.0
        self._issued = 0                  # batches handed an arm in this probe
        self._times: dict[bool, list[float]] = {True: [], False: []}

    def use_cache(self) -> bool:
        """The arm of the next batch: True = serve it through the cache."""
        if self.state is not GateState.PROBING and self.clock() >= self._until:
            self._start_probe()
        if self.state is GateState.OPEN:
            return True
        if self.state is GateState.CLOSED:
            return False
        window = self._issued // self.probe_batches
        self._issued += 1
        return window % 2 == 0            # cache first, then bypass, alternating

    def record(self, used_cache: bool, seconds_per_sample: float) -> None:
        """A finished batch of the probe: its lookup stage's time per sample."""
        if self.state is not GateState.PROBING:
            return
        arm = self._times[used_cache]
        arm.append(seconds_per_sample)
        need = self.probe_batches * self.rounds
        if len(self._times[True]) >= need and len(self._times[False]) >= need:
            self._decide()

    def _start_probe(self) -> None:
        self.state = GateState.PROBING
        self._issued = 0
        self._times = {True: [], False: []}

    def _decide(self) -> None:
        on = float(np.median(self._times[True]))
        off = float(np.median(self._times[False]))
        self.last_ratio = on / off if off > 0 else float("inf")
        if on < off * (1.0 - self.margin):
            self.state, self.losses = GateState.OPEN, 0
            hold = self.hold_s
        else:
            self.state = GateState.CLOSED
            hold = min(self.max_hold_s, self.hold_s * 2 ** self.losses)
            self.losses += 1
        self._until = self.clock() + hold

    def snapshot(self) -> dict:
        return {"state": self.state.value, "cache_over_bypass": round(self.last_ratio, 3)
                if self.last_ratio == self.last_ratio else None, "consecutive_losses": self.losses}
