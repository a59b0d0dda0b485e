"""How much memory the dense network needs at a batch size, from the architecture alone.

The adaptive cache (FlexEMR 3.1.1) may only use what the NN does not need::

    cache target = budget - nn_peak(batch) - margin

so the estimate must not fall short of the real peak (the cache would then
take memory a large batch needs) and should not overshoot much either (the
cache would give up hit rate for nothing).

The estimate replays the tensor lifetimes of :class:`flexemr.model.dense.DLRM`
in ``torch.inference_mode`` (no autograd graph keeps anything alive), as a list
of allocations and frees, and takes the running maximum:

    resident      weights + biases + the int64 tril index buffers, the dense
                  input [B, F] and the pooled inputs T x [B, d_t], alive throughout
    bottom layer  ``x = relu(linear(x))``: input x, the linear output and the
                  relu output are alive at once; then the linear output and the
                  old x (unless it is the caller's dense input) are freed
    dot           Z = stack([x, *pooled]) [B, T+1, d], ZZ = bmm(Z, Zᵀ) [B, T+1, T+1],
                  the tril gather [B, P] and h = cat([x, gather]) [B, d+P];
                  the gather is freed after the cat, but x, Z and ZZ are locals
                  of ``forward`` and stay alive until it returns
    cat           h = cat([x, *pooled]) [B, d + Σd_t]
    top layer     ``h = linear(h)`` (old h freed after), then ``h = relu(h)``
    score         sigmoid [B, 1]

Every allocation is rounded up to ``ALLOC_GRANULE`` bytes, as CUDA's caching
allocator rounds block sizes (on CPU the rounding is a few hundred bytes of
overestimate).  On CPU this replay matches the allocations torch's profiler
records for the current forward byte for byte; tests/lib/test_memory_model.py
checks it at batches 256..8192, so a change to ``DLRM.forward`` that changes
lifetimes shows up there.

Device-side allocations outside the model (cuBLAS workspaces on CUDA) are not
part of the architecture; pass them as ``overhead_bytes``, measured once at
start-up (``torch.cuda.memory_allocated()`` after a warm-up forward, minus
weights and inputs).

No torch import: the supervisor and emrctl may use this module.
"""

from __future__ import annotations

from flexemr.model.spec import ModelSpec
from flexemr.types import Interaction

__all__ = [
    "ALLOC_GRANULE",
    "weights_bytes",
    "input_bytes",
    "estimate_nn_peak_bytes",
    "estimate_activation_bytes",
    "max_batch_that_fits",
]

#: CUDA's caching allocator rounds every block to a multiple of 512 bytes.
ALLOC_GRANULE = 512


def _r(n: int) -> int:
    return -(-n // ALLOC_GRANULE) * ALLOC_GRANULE


def _linear_shapes(spec: ModelSpec) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    bottom = list(zip((spec.dense_features, *spec.bottom_mlp[:-1]), spec.bottom_mlp))
    top = list(zip((spec.top_input_width, *spec.top_mlp[:-1]), spec.top_mlp))
    return bottom, top


def weights_bytes(spec: ModelSpec, dtype_bytes: int = 4) -> int:
    """Bytes of the NN's parameters on the device (each tensor rounded to the allocator's granule)."""
    bottom, top = _linear_shapes(spec)
    total = sum(_r(i * o * dtype_bytes) + _r(o * dtype_bytes) for i, o in bottom + top)
    # DLRM keeps the int64 tril row/column index buffers whatever the interaction.
    n = len(spec.tables) + 1
    total += 2 * _r(n * (n - 1) // 2 * 8)
    return total


def input_bytes(spec: ModelSpec, batch_size: int, dtype_bytes: int = 4) -> int:
    """Bytes of one batch's NN inputs: dense [B, F] and the pooled embeddings T x [B, d_t]."""
    b = int(batch_size)
    return _r(b * spec.dense_features * dtype_bytes) + sum(_r(b * t.dim * dtype_bytes) for t in spec.tables)


class _Live:
    """Running total and peak of a replayed allocation sequence."""

    __slots__ = ("cur", "peak")

    def __init__(self, start: int = 0) -> None:
        self.cur = start
        self.peak = start

    def alloc(self, n: int) -> int:
        n = _r(n)
        self.cur += n
        if self.cur > self.peak:
            self.peak = self.cur
        return n

    def free(self, n: int) -> None:
        self.cur -= n


def estimate_activation_bytes(spec: ModelSpec, batch_size: int, dtype_bytes: int = 4) -> int:
    """Peak bytes allocated by one forward on top of weights and inputs (see the module docstring)."""
    b = int(batch_size)
    if b <= 0:
        return 0
    e = dtype_bytes
    live = _Live()
    x = 0  # the caller's dense input: never freed by the forward
    for w in spec.bottom_mlp:
        y = live.alloc(b * w * e)    # linear output
        r = live.alloc(b * w * e)    # relu output (torch.relu is not in-place)
        live.free(y)
        live.free(x)
        x = r
    d = spec.bottom_mlp[-1]
    if spec.interaction is Interaction.DOT:
        n = len(spec.tables) + 1
        pairs = n * (n - 1) // 2
        live.alloc(b * n * d * e)            # Z: alive until forward returns
        live.alloc(b * n * n * e)            # Z·Zᵀ: likewise
        g = live.alloc(b * pairs * e)        # tril gather
        h = live.alloc(b * (d + pairs) * e)  # cat([x, gather])
        live.free(g)
    else:
        h = live.alloc(b * (d + sum(t.dim for t in spec.tables)) * e)
    last = len(spec.top_mlp) - 1
    for i, w in enumerate(spec.top_mlp):
        o = live.alloc(b * w * e)
        live.free(h)
        h = o
        if i < last:
            r = live.alloc(b * w * e)
            live.free(o)
            h = r
    live.alloc(b * e)  # sigmoid
    return live.peak


def estimate_nn_peak_bytes(spec: ModelSpec, batch_size: int, dtype_bytes: int = 4, overhead_bytes: int = 0) -> int:
    """Peak device bytes of the NN serving one batch: weights + inputs + activations + overhead."""
    return (
        weights_bytes(spec, dtype_bytes)
        + input_bytes(spec, batch_size, dtype_bytes)
        + estimate_activation_bytes(spec, batch_size, dtype_bytes)
        + int(overhead_bytes)
    )


def max_batch_that_fits(
    budget_bytes: int,
    spec: ModelSpec,
    cache_bytes: int,
    margin_bytes: int = 0,
    dtype_bytes: int = 4,
    overhead_bytes: int = 0,
    limit: int = 1 << 24,
) -> int:
    """The largest batch whose NN peak fits next to a cache of ``cache_bytes`` (0 if none does).

    This is the trade-off of the paper's Figure 7: a bigger fixed cache leaves
    room only for smaller batches.  The peak grows with the batch, so a binary
    search over [0, limit] finds the answer.
    """
    room = int(budget_bytes) - int(cache_bytes) - int(margin_bytes)

    def fits(b: int) -> bool:
        return estimate_nn_peak_bytes(spec, b, dtype_bytes, overhead_bytes) <= room

    if not fits(1):
        return 0
    lo, hi = 1, int(limit)
    if fits(hi):
        return hi
    while hi - lo > 1:  # invariant: fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo
