"""CONTROL PATH: sizing the embedding cache from the load (FlexEMR 3.1.1, "Tracing temporal dynamics").

The cache shares the ranker's memory budget (GPU memory, or a configured
number on CPU) with the NN, whose peak grows with the batch size.  So:

``LoadMonitor``
    sliding window over the batches the ranker forms: ``windows`` buckets of
    ``window_s`` seconds each, keeping the largest batch and the queue depth.
``AdaptivePolicy``
    ``target = budget - nn_peak(bucket(largest batch in the window)) - margin``,
    clamped to [min_bytes, max_bytes] and >= 0, where ``nn_peak`` is
    :func:`flexemr.cache.memory_model.estimate_nn_peak_bytes` (weights, inputs
    and activations).  Rising load shrinks the cache at once (the NN must not
    run short); falling load grows it by at most ``grow_step_bytes`` per update
    and only when the target exceeds the capacity by more than
    ``hysteresis_bytes``.  The largest batch only leaves the window after
    ``windows * window_s`` seconds, which is the other half of the hysteresis:
    a lull between two bursts does not make the cache flap.
``CachePolicy``
    the operator's mode (``emrctl cache policy adaptive|fixed|off``) applied to
    a cache: *adaptive* follows the policy above, starting from the last
    ``resize``; *fixed* holds the size set by ``resize``; *off* is capacity 0.

Batch sizes are rounded up to a power of two (at least ``min_bucket``) before
estimating, so small fluctuations in batch size do not move the target.

Runs between batches on the inference process; nothing here touches the data
path.  No torch import except in :func:`memory_budget_bytes` on CUDA.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from typing import Protocol

from flexemr.cache.memory_model import estimate_nn_peak_bytes, max_batch_that_fits
from flexemr.model.spec import ModelSpec
from flexemr.types import CacheMode

__all__ = [
    "LoadMonitor",
    "AdaptivePolicy",
    "CachePolicy",
    "PolicyMode",
    "CacheMode",
    "bucket_batch",
    "memory_budget_bytes",
    "max_batch_that_fits",
]


# The one cache-policy enum is flexemr.types.CacheMode (integers, stored in the control segment).
# PolicyMode is its label form (``PolicyMode.FIXED.value == "fixed"``, as the inference process reports
# it), generated from CacheMode so the two cannot drift apart.
PolicyMode = enum.Enum("PolicyMode", [(m.name, m.label) for m in reversed(list(CacheMode))],  # type: ignore[misc]
                       type=str, module=__name__)


class LoadMonitor:
    """Largest batch and mean queue depth over the last ``windows`` windows of ``window_s`` seconds."""

    def __init__(self, window_s: float = 1.0, windows: int = 5) -> None:
        if window_s <= 0 or windows < 1:
            raise ValueError(f"LoadMonitor: window_s must be > 0 and windows >= 1, got {window_s}, {windows}")
        self.window_s = float(window_s)
        self.windows = int(windows)
        # One bucket per window that saw batches: [window index, largest batch, queue depth sum, batches].
        self._buckets: deque[list[int]] = deque()
        self._now = 0.0

    def observe(self, batch_size: int, queue_depth: int = 0, now: float | None = None) -> None:
        """Record one batch formed by the batcher and the requests still queued behind it."""
        now = time.monotonic() if now is None else float(now)
        self._now = max(self._now, now)
        w = int(now // self.window_s)
        if self._buckets and self._buckets[-1][0] == w:
            b = self._buckets[-1]
            b[1] = max(b[1], int(batch_size))
            b[2] += int(queue_depth)
            b[3] += 1
        else:
            self._buckets.append([w, int(batch_size), int(queue_depth), 1])
        self._expire(w)

    def _expire(self, w: int) -> None:
        while self._buckets and self._buckets[0][0] <= w - self.windows:
            self._buckets.popleft()

    def _current(self, now: float | None) -> None:
        now = self._now if now is None else max(self._now, float(now))
        self._now = now
        self._expire(int(now // self.window_s))

    def largest_batch(self, now: float | None = None) -> int:
        """The largest batch seen in the window (0 when idle)."""
        self._current(now)
        return max((b[1] for b in self._buckets), default=0)

    def mean_queue_depth(self, now: float | None = None) -> float:
        """Mean queue depth behind the batches of the window (0.0 when idle)."""
        self._current(now)
        n = sum(b[3] for b in self._buckets)
        return sum(b[2] for b in self._buckets) / n if n else 0.0

    def batches(self, now: float | None = None) -> int:
        self._current(now)
        return sum(b[3] for b in self._buckets)


def bucket_batch(batch: int, min_bucket: int = 256) -> int:
    """``batch`` rounded up to a power of two, at least ``min_bucket``."""
    b = max(int(batch), int(min_bucket), 1)
    return 1 << (b - 1).bit_length()


class _Monitor(Protocol):
    def largest_batch(self, now: float | None = None) -> int: ...
    def mean_queue_depth(self, now: float | None = None) -> float: ...


class AdaptivePolicy:
    """The cache size that leaves the NN room for the largest recent batch; see the module docstring.

    ``margin`` is ``max(margin_bytes, margin_fraction * budget)``: room for what
    the model does not see (allocator fragmentation, request buffers).  With
    ``max_batch`` and ``overload_queue_depth`` set, a mean queue depth at or
    above the threshold plans for ``max_batch``: a backlog means the batcher is
    about to form full batches even if the window has not seen one yet.
    """

    def __init__(
        self,
        budget_bytes: int,
        spec: ModelSpec,
        *,
        margin_bytes: int = 64 << 20,
        margin_fraction: float = 0.0,
        min_bytes: int = 0,
        max_bytes: int | None = None,
        grow_step_bytes: int | None = None,
        hysteresis_bytes: int | None = None,
        min_bucket: int = 256,
        max_batch: int | None = None,
        overload_queue_depth: float | None = None,
        dtype_bytes: int = 4,
        overhead_bytes: int = 0,
    ) -> None:
        if budget_bytes < 0 or margin_bytes < 0 or min_bytes < 0 or not 0.0 <= margin_fraction < 1.0:
            raise ValueError("AdaptivePolicy: budget, margin and min_bytes must be >= 0 and margin_fraction in [0, 1)")
        self.budget_bytes = int(budget_bytes)
        self.spec = spec
        self.margin = max(int(margin_bytes), int(margin_fraction * budget_bytes))
        self.min_bytes = int(min_bytes)
        self.max_bytes = None if max_bytes is None else int(max_bytes)
        # Default: regrow the whole budget in about 16 updates.
        self.grow_step_bytes = (int(grow_step_bytes) if grow_step_bytes is not None
                                else max(self.budget_bytes // 16, 1 << 20))
        self.hysteresis_bytes = (int(hysteresis_bytes) if hysteresis_bytes is not None
                                 else max(self.grow_step_bytes // 4, 1 << 20))
        self.min_bucket = int(min_bucket)
        self.max_batch = max_batch
        self.overload_queue_depth = overload_queue_depth
        self.dtype_bytes = int(dtype_bytes)
        self.overhead_bytes = int(overhead_bytes)

    def planned_batch(self, monitor: _Monitor, now: float | None = None) -> int:
        """The batch size the NN must have room for (bucketed)."""
        b = monitor.largest_batch(now)
        if (self.max_batch is not None and self.overload_queue_depth is not None
                and monitor.mean_queue_depth(now) >= self.overload_queue_depth):
            b = max(b, int(self.max_batch))
        return bucket_batch(b, self.min_bucket)

    def nn_reserve_bytes(self, batch: int) -> int:
        """What the NN needs for ``batch`` (already bucketed) plus the margin."""
        return estimate_nn_peak_bytes(self.spec, batch, self.dtype_bytes, self.overhead_bytes) + self.margin

    def target_capacity(self, monitor: _Monitor, now: float | None = None) -> int:
        """budget - nn_peak(planned batch) - margin, clamped to [min_bytes, max_bytes] and >= 0."""
        t = self.budget_bytes - self.nn_reserve_bytes(self.planned_batch(monitor, now))
        if self.max_bytes is not None:
            t = min(t, self.max_bytes)
        return max(t, self.min_bytes, 0)

    def next_capacity(self, current: int, monitor: _Monitor, now: float | None = None) -> int:
        """Shrink to the target at once; grow towards it by one step when it is clearly above."""
        target = self.target_capacity(monitor, now)
        if target < current:
            return target
        if target - current > self.hysteresis_bytes:
            return min(target, current + self.grow_step_bytes)
        return current


class _Resizable(Protocol):
    @property
    def capacity_bytes(self) -> int: ...
    def resize(self, capacity_bytes: int) -> int: ...
    def clear(self) -> None: ...


class CachePolicy:
    """The operator's cache mode applied to a cache (``RowCache`` or anything with resize/clear).

    Call :meth:`update` between batches (cheap: a few arithmetic operations
    unless the capacity changes).  ``resize`` is ``emrctl cache resize``: the
    size of a fixed cache and the starting point of an adaptive one.
    """

    def __init__(self, cache: _Resizable, mode: PolicyMode | str = PolicyMode.OFF, fixed_bytes: int = 0,
                 adaptive: AdaptivePolicy | None = None) -> None:
        self.cache = cache
        self.adaptive = adaptive
        self.fixed_bytes = int(fixed_bytes)
        self.mode = PolicyMode.OFF
        self.set_mode(mode)

    def set_mode(self, mode: PolicyMode | str) -> None:
        mode = PolicyMode(CacheMode.parse(mode).label)  # accepts labels, CacheMode, PolicyMode
        if mode is PolicyMode.ADAPTIVE and self.adaptive is None:
            raise ValueError("cache policy adaptive needs an AdaptivePolicy (a memory budget and the model spec)")
        self.mode = mode
        if mode is PolicyMode.OFF:
            self.cache.resize(0)
            self.cache.clear()
        elif mode is PolicyMode.FIXED:
            self.cache.resize(self.fixed_bytes)
        # adaptive: the next update moves from the current size

    def resize(self, capacity_bytes: int) -> None:
        """Set the fixed size; in adaptive mode, the size the policy starts from."""
        if capacity_bytes < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity_bytes}")
        self.fixed_bytes = int(capacity_bytes)
        if self.mode is not PolicyMode.OFF:
            self.cache.resize(self.fixed_bytes)

    def update(self, monitor: _Monitor, now: float | None = None) -> int:
        """Apply the mode; returns the capacity now in force."""
        current = self.cache.capacity_bytes
        if self.mode is PolicyMode.OFF:
            want = 0
        elif self.mode is PolicyMode.FIXED:
            want = self.fixed_bytes
        else:
            assert self.adaptive is not None
            want = self.adaptive.next_capacity(current, monitor, now)
        if want != current:
            self.cache.resize(want)
        return want


def memory_budget_bytes(device: str, configured_bytes: int) -> int:
    """The memory the NN and the cache share: the configured number on CPU; on CUDA what this process can use.

    On CUDA that is the free device memory plus what torch's caching allocator
    already holds for this process (``mem_get_info`` counts the latter as used).
    """
    if not str(device).startswith("cuda"):
        return int(configured_bytes)
    import torch

    dev = torch.device(device)
    free, _total = torch.cuda.mem_get_info(dev)
    return int(free + torch.cuda.memory_reserved(dev))
