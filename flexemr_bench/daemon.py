"""The daemon's pieces the benchmarks reuse: the only module of flexemr_bench that imports ``flexemrd``.

The benchmarks run the daemon's own code paths so that what they measure is
what serves: the global-pooling combine (:mod:`flexemr_bench.cache`) and the
embedding server's entry (:mod:`flexemr_bench.dataplane`).  They reach them
through here alone, so a move inside the daemon is a one-line change below.

Callers import this module lazily, inside the function that needs it, so a
benchmark's parent process pays for none of it unless it uses it.
"""

from __future__ import annotations

from flexemr.routing.combine import Accumulator
from flexemrd.embedding.main import EmbeddingPlan, embedding_main
from flexemrd.process import ReadyPipe

__all__ = ["Accumulator", "EmbeddingPlan", "ReadyPipe", "embedding_main"]
