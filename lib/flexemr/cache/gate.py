"""Does the cache pay here?  An online A/B test of serving with and without it.

A cache hit saves the ranker a remote lookup, but serving it costs the
ranker's own CPU (looking ids up, pooling hits, combining one more partial).
Over a slow network a hit saves far more than it costs; on loopback or shared
memory, where the "remote" servers share the ranker's cores, it may save
nothing.  No model of the hardware predicts which: ``PayoffGate`` measures it.

A *probe* alternates time windows of ``window_s`` in which batches are served
through the cache and windows in which they bypass it, ``rounds`` of each.
Per window it counts the samples dispatched (after a ``settle_s`` lead-in, so
batches of the previous arm still in flight do not count for this one): under
load that is the throughput of each arm; a window in which the ranker was
idle (no batch) is left out, and a probe with no busy window in one arm
starts over.  It also keeps each batch's lookup
time per sample (creation until every partial is in).  The cache *wins* when
its median throughput is higher by ``margin``, or, with throughputs within
``margin`` of each other (light load: both carry the offered rate), when its
median lookup time is lower by ``margin``.  A cache that does not win is
bypassed (no lookups, no hit pooling, no fills: it costs nothing) for
``hold_s``, doubling on each consecutive loss up to ``max_hold_s``; then it is
probed again, since the load or the network may have changed.  A winning
cache is served for ``hold_s`` and then re-checked.
"""

from __future__ import annotations

import enum
import logging
import time
from typing import Callable

import numpy as np

__all__ = ["GateState", "PayoffGate"]

logger = logging.getLogger(__name__)


class GateState(enum.Enum):
    PROBING = "probing"
    OPEN = "open"        # the cache pays: serve through it
    CLOSED = "closed"    # hits save nothing measurable: bypass the cache


class PayoffGate:
    def __init__(self, window_s: float = 1.0, settle_s: float = 0.25, rounds: int = 2, margin: float = 0.05,
                 hold_s: float = 30.0, max_hold_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= settle_s or settle_s < 0 or rounds < 1:
            raise ValueError(f"need window_s > settle_s >= 0 and rounds >= 1, got window_s={window_s}, "
                             f"settle_s={settle_s}, rounds={rounds}")
        self.window_s = window_s
        self.settle_s = settle_s
        self.rounds = rounds
        self.margin = margin
        self.hold_s = hold_s
        self.max_hold_s = max_hold_s
        self.clock = clock
        self.state = GateState.PROBING
        self.losses = 0                   # consecutive probes the cache lost
        self.last: dict[str, float] = {}  # the last probe's medians (throughput and lookup time, per arm)
        self._until = 0.0
        self._start_probe()

    # ---------------------------------------------------------------- per batch (batcher thread)

    def use_cache(self, samples: int = 0) -> bool:
        """The arm of the next batch of ``samples`` (True = serve it through the cache)."""
        now = self.clock()
        if self.state is not GateState.PROBING:
            if now < self._until:
                return self.state is GateState.OPEN
            self._start_probe(now)
        window, into = divmod(now - self._t0, self.window_s)
        window = int(window)
        if window >= 2 * self.rounds:
            self._decide()
            return self.use_cache(samples)
        arm = window % 2 == 0              # cache first, then bypass, alternating
        if into >= self.settle_s:
            self._samples[window] += samples
        return arm

    def record(self, used_cache: bool, seconds_per_sample: float) -> None:
        """A finished probe batch: its lookup stage's time per sample."""
        if self.state is GateState.PROBING:
            self._lookup[used_cache].append(seconds_per_sample)

    # ---------------------------------------------------------------- decisions

    def _start_probe(self, now: float | None = None) -> None:
        self.state = GateState.PROBING
        self._t0 = self.clock() if now is None else now
        self._samples = [0] * (2 * self.rounds)
        self._lookup: dict[bool, list[float]] = {True: [], False: []}

    def _decide(self) -> None:
        span = self.window_s - self.settle_s
        # A window without a batch (the ranker was idle) says nothing about either arm: leave it out,
        # and probe again when an arm has no window with traffic at all.
        busy = {arm: [n / span for w, n in enumerate(self._samples) if (w % 2 == 0) == arm and n]
                for arm in (True, False)}
        if not busy[True] or not busy[False]:
            logger.debug("cache payoff probe saw no traffic in one arm's windows; probing again")
            self._start_probe()
            return
        thr = {arm: float(np.median(v)) for arm, v in busy.items()}
        lat = {arm: float(np.median(v)) if v else float("nan") for arm, v in self._lookup.items()}
        if thr[True] > thr[False] * (1 + self.margin):
            wins = True
        elif thr[True] < thr[False] * (1 - self.margin):
            wins = False
        else:
            wins = lat[True] < lat[False] * (1 - self.margin)   # NaN (no finished batch) never wins
        self.last = {"cache_samples_per_s": thr[True], "bypass_samples_per_s": thr[False],
                     "cache_lookup_s_per_sample": lat[True], "bypass_lookup_s_per_sample": lat[False]}
        if wins:
            self.state, self.losses = GateState.OPEN, 0
            hold = self.hold_s
        else:
            self.state = GateState.CLOSED
            hold = min(self.max_hold_s, self.hold_s * 2 ** self.losses)
            self.losses += 1
        self._until = self.clock() + hold
        logger.info("cache payoff probe: %.0f vs %.0f samples/s, lookup %.3g vs %.3g us/sample (cache vs bypass): "
                    "%s for %.0f s", thr[True], thr[False], lat[True] * 1e6, lat[False] * 1e6,
                    "serving through the cache" if wins else "bypassing the cache", hold)

    def snapshot(self) -> dict:
        return {"state": self.state.value, "consecutive_losses": self.losses,
                **{k: round(v, 9) for k, v in self.last.items() if v == v}}
