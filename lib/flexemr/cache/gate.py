"""Does the cache pay here?  An online A/B test of serving with and without it.

A cache hit saves the ranker a remote lookup, but serving it costs the
ranker's own CPU (looking ids up, pooling hits, combining one more partial).
Over a slow network a hit saves far more than it costs; on loopback or shared
memory, where the "remote" servers share the ranker's cores, it may save
nothing.  No model of the hardware predicts which: ``PayoffGate`` measures it.

A *probe* first *warms* the cache: batches are served through it, uncounted,
until its hit rate stops rising (the hit rate of a ``window_s`` window, from
:meth:`note_hits`, no more than ``warm_rise`` above the window before; at
least ``min_warm_s``, at most ``max_warm_s``).  A cache the gate bypassed
gets no fills, so at each probe it is cold, and judged cold it loses where it
pays: behind an 800 Mbit/s link the adaptive cache was probed at a 12-14% hit
rate (20 MB of 2 GiB filled) and bypassed, while a fixed 64 MiB cache kept on
(92% hits) served 1.11-1.19x.  A cache with nothing to warm (no lookups
noted) is measured after ``min_warm_s``.
Then the probe alternates time windows of ``window_s`` in which batches are served
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
                 hold_s: float = 30.0, max_hold_s: float = 600.0, min_warm_s: float = 1.0,
                 max_warm_s: float = 30.0, warm_rise: float = 0.01,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window_s <= settle_s or settle_s < 0 or rounds < 1 or not 0 <= min_warm_s <= max_warm_s:
            raise ValueError(f"need window_s > settle_s >= 0, rounds >= 1 and 0 <= min_warm_s <= max_warm_s, got "
                             f"window_s={window_s}, settle_s={settle_s}, rounds={rounds}, "
                             f"min_warm_s={min_warm_s}, max_warm_s={max_warm_s}")
        self.window_s = window_s
        self.min_warm_s = min_warm_s
        self.max_warm_s = max_warm_s
        self.warm_rise = warm_rise
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
            self._start_probe()
        if self._t0 is None:
            if not self._warmed(now):
                return True                # warming the cache before its arm is measured: not counted
            self._t0 = now
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
        # Batches of the warm-up (finishing up to settle_s into the first window) are not evidence.
        if self.state is GateState.PROBING and self._t0 is not None and self.clock() >= self._t0 + self.settle_s:
            self._lookup[used_cache].append(seconds_per_sample)

    def note_hits(self, hits: int, lookups: int) -> None:
        """A batch served through the cache found ``hits`` of its ``lookups`` ids there (for the warm-up)."""
        if self.state is GateState.PROBING and self._t0 is None:
            self._warm_hits += hits
            self._warm_lookups += lookups

    def _warmed(self, now: float) -> bool:
        """Has the cache's hit rate stopped rising (checked once per window_s), or is max_warm_s up?"""
        if self._warm_start is None:       # the warm-up starts with the probe's first batch, not at boot
            self._warm_start = self._warm_window = now
        if now - self._warm_start >= self.max_warm_s:
            return True
        if now - self._warm_window < self.window_s:
            return False
        rate = self._warm_hits / self._warm_lookups if self._warm_lookups else None
        prev, self._warm_rate = self._warm_rate, rate
        self._warm_window, self._warm_hits, self._warm_lookups = now, 0, 0
        if now - self._warm_start < self.min_warm_s:
            return False
        if rate is None:
            logger.debug("no ids looked up in the cache while warming it: probing it as it is")
            return True
        if prev is not None and rate <= prev + self.warm_rise:
            logger.info("cache warmed for the payoff probe in %.1f s (hit rate %.2f)", now - self._warm_start, rate)
            return True
        return False

    # ---------------------------------------------------------------- decisions

    def _start_probe(self) -> None:
        self.state = GateState.PROBING
        self._t0: float | None = None      # the first measured window's start, once warm
        self._warm_start: float | None = None
        self._warm_window = 0.0
        self._warm_hits = self._warm_lookups = 0
        self._warm_rate: float | None = None
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
