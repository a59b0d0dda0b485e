"""The ranker's adaptive embedding cache (FlexEMR 3.1.1).

``rowcache``      RowCache: raw embedding rows on the NN's device; split / fill / resize (data path)
``policy``        LoadMonitor, AdaptivePolicy, CachePolicy: how big the cache may be (control path)
``memory_model``  the NN's peak memory at a batch size, from the architecture
``lru_sim``       offline exact LRU simulation, the yardstick for the hit rate

``RowCache`` and ``CacheSplit`` load torch, so they are imported on first use:
``from flexemr.cache import AdaptivePolicy`` stays torch-free.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flexemr.cache.lru_sim import LruResult, simulate_lru, trace_keys
from flexemr.cache.memory_model import (
    estimate_activation_bytes,
    estimate_nn_peak_bytes,
    input_bytes,
    max_batch_that_fits,
    weights_bytes,
)
from flexemr.cache.policy import AdaptivePolicy, CachePolicy, LoadMonitor, PolicyMode, bucket_batch, memory_budget_bytes

if TYPE_CHECKING:
    from flexemr.cache.rowcache import CacheSplit, RowCache

__all__ = [
    "RowCache",
    "CacheSplit",
    "LoadMonitor",
    "AdaptivePolicy",
    "CachePolicy",
    "PolicyMode",
    "bucket_batch",
    "memory_budget_bytes",
    "estimate_nn_peak_bytes",
    "estimate_activation_bytes",
    "weights_bytes",
    "input_bytes",
    "max_batch_that_fits",
    "simulate_lru",
    "trace_keys",
    "LruResult",
]


def __getattr__(name: str) -> Any:
    if name in ("RowCache", "CacheSplit"):
        from flexemr.cache import rowcache

        return getattr(rowcache, name)
    raise AttributeError(f"module 'flexemr.cache' has no attribute {name!r}")
