"""The NN memory model against the peak measured while the real DLRM forward runs.

How the peak is measured on CPU: torch has no ``max_memory_allocated`` for its
CPU allocator, and tracemalloc does not see torch's allocations.  But with
``torch.profiler.profile(profile_memory=True)`` the CPU allocator reports every
allocation and free to the profiler together with the running total of bytes
allocated since profiling started (``total_allocated`` of each allocation
event).  The largest running total during one ``inference_mode`` forward is the
peak of what the forward allocates; the tensors that exist before it (weights,
buffers and the batch's inputs) are added from their ``nbytes``.  One warm-up
forward runs first, outside the profiler, so one-time allocations are excluded
as they would be in a serving process.  On CUDA the variant below uses
``torch.cuda.max_memory_allocated`` instead.
"""

from __future__ import annotations

import pytest
import torch

from flexemr.cache import estimate_activation_bytes, estimate_nn_peak_bytes, weights_bytes
from flexemr.model.dense import DLRM
from flexemr.model.presets import get_preset

BATCHES = (256, 1024, 8192)
PRESETS = ("tiny-cat", "bench8", "rmc2", "rmc3")


def _inputs(spec, batch: int, device: str = "cpu"):
    dense = torch.randn(batch, spec.dense_features, device=device)
    pooled = [torch.randn(batch, t.dim, device=device) for t in spec.tables]
    return dense, pooled


def _resident_bytes(model: torch.nn.Module, dense: torch.Tensor, pooled: list[torch.Tensor]) -> int:
    tensors = [*model.parameters(), *model.buffers(), dense, *pooled]
    return sum(t.numel() * t.element_size() for t in tensors)


def _forward_peak_cpu(model: torch.nn.Module, dense: torch.Tensor, pooled: list[torch.Tensor]) -> int:
    """Peak bytes the forward allocates on the CPU allocator (see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    try:
        from torch._C._profiler import _EventType
    except ImportError:  # pragma: no cover - profiler internals moved
        pytest.skip("this torch's profiler does not expose allocation events")
    with torch.inference_mode():
        model(dense, pooled)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(dense, pooled)
    peak = 0
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation:
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    if peak == 0:  # pragma: no cover
        pytest.skip("the profiler recorded no CPU allocations")
    return peak


@pytest.mark.parametrize("preset", PRESETS)
def test_estimate_tracks_measured_peak_on_cpu(preset):
    spec = get_preset(preset).spec
    model = DLRM(spec).eval().requires_grad_(False)
    rows = []
    for b in BATCHES:
        dense, pooled = _inputs(spec, b)
        activations = _forward_peak_cpu(model, dense, pooled)
        measured = _resident_bytes(model, dense, pooled) + activations
        est = estimate_nn_peak_bytes(spec, b)
        rows.append((b, measured, est, est / measured - 1, estimate_activation_bytes(spec, b) / activations - 1))
    report = "\n".join(f"B={b}: measured {m} estimate {e} error {err:+.2%} (activations {aerr:+.2%})"
                       for b, m, e, err, aerr in rows)
    for b, measured, est, err, _ in rows:
        assert abs(err) <= 0.25, report
        assert est >= 0.9 * measured, report  # the policy must not under-reserve


def test_weights_bytes_counts_every_parameter_and_buffer():
    for name in PRESETS:
        spec = get_preset(name).spec
        model = DLRM(spec)
        exact = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
        n_tensors = len(list(model.parameters())) + len(list(model.buffers()))
        assert exact <= weights_bytes(spec) < exact + 512 * n_tensors  # only the allocator's rounding on top


def test_estimate_is_linear_in_the_batch():
    spec = get_preset("bench8").spec
    w = weights_bytes(spec)
    a, b = estimate_nn_peak_bytes(spec, 1024) - w, estimate_nn_peak_bytes(spec, 8192) - w
    assert b == pytest.approx(8 * a, rel=0.01)
    assert estimate_nn_peak_bytes(spec, 0) == w


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("preset", PRESETS)
def test_estimate_tracks_measured_peak_on_cuda(preset):
    spec = get_preset(preset).spec
    model = DLRM(spec).eval().requires_grad_(False).cuda()
    for b in BATCHES:
        dense, pooled = _inputs(spec, b, "cuda")
        with torch.inference_mode():
            model(dense, pooled)  # warm-up: cuBLAS workspaces are allocated once, here
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            overhead = base - _resident_bytes(model, dense, pooled)  # workspaces, context-held buffers
            torch.cuda.reset_peak_memory_stats()
            model(dense, pooled)
            torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        est = estimate_nn_peak_bytes(spec, b, overhead_bytes=max(overhead, 0))
        assert abs(est / measured - 1) <= 0.25, (b, measured, est)
        assert est >= 0.9 * measured, (b, measured, est)
        del dense, pooled
