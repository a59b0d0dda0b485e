"""Resource requests for the Kubernetes manifests, computed from the model and the configs.

    python deploy/kubernetes/sizing.py --preset bench8            # or --model MODEL_DIR
        [--embedding-config deploy/kubernetes/base/config/embedding.toml]
        [--ranker-config deploy/kubernetes/base/config/ranker.toml]

How the numbers come about (the base manifests hold the output for the
``bench8`` preset; tests/lib/test_kubernetes_manifests.py checks they agree):

- **embedding pod, memory** = the largest shard set one server holds (bytes of
  its row ranges under ``RoutingTable.build(spec, servers, routing)``) + 512 MiB
  for the process (Python, torch, pooling buffers).  Shards are memory maps:
  their page cache is charged to the pod's cgroup, so a request below the shard
  size means pages evicted and re-read from disk under load.  Limit = request.
- **embedding pod, CPU** = ``[embedding].threads`` (torch pooling threads).
- **ranker pod, memory** = ``[cache].budget`` (the NN and the embedding cache
  share it) + two rings of ``[ranker].ring_bytes`` per engine (submission and
  completion) + 256 MiB per process (supervisor, inference, each engine) +
  256 MiB for the KServe front.
- **ranker pod, CPU** = one core per engine + one for the inference process
  (the front's share is a quarter core on top).
- **model volume** = every table + 64 MiB (dense.pt, model.toml), rounded up to GiB.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
MiB = 1 << 20
PROCESS_OVERHEAD = 256 * MiB
EMBEDDING_OVERHEAD = 512 * MiB
FRONT_OVERHEAD = 256 * MiB


def _mi(nbytes: int) -> str:
    return f"{math.ceil(nbytes / MiB)}Mi"


def size(spec: Any, embedding_cfg: Any, ranker_cfg: Any) -> dict[str, dict[str, str]]:
    """Requests per pod kind, as Kubernetes quantities."""
    from flexemr.routing import RoutingTable

    e = embedding_cfg.embedding
    table = RoutingTable.build(spec, e.servers, e.routing)
    dims = {t.name: t.dim for t in spec.tables}
    held = [sum((s.end - s.start) * dims[s.table] * 4 for s in table.shards_of(i)) for i in range(e.servers)]
    r, cache = ranker_cfg.ranker, ranker_cfg.cache
    ranker_mem = cache.budget + 2 * r.engines * r.ring_bytes + (r.engines + 2) * PROCESS_OVERHEAD
    model_bytes = spec.embedding_bytes + 64 * MiB
    return {
        "embedding": {"memory": _mi(max(held) + EMBEDDING_OVERHEAD), "cpu": str(e.threads)},
        "ranker": {"memory": _mi(ranker_mem), "cpu": str(r.engines + 1)},
        "kserve": {"memory": _mi(FRONT_OVERHEAD), "cpu": "250m"},
        "model_volume": {"storage": f"{math.ceil(model_bytes / (1 << 30))}Gi"},
    }


def main(argv: list[str] | None = None) -> int:
    from flexemr.model.presets import get_preset
    from flexemr.model.spec import load_spec

    ap = argparse.ArgumentParser(description="resource requests from a model and the configs")
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", type=Path, help="model directory")
    g.add_argument("--preset", help="a model preset (emrctl model init --preset)")
    ap.add_argument("--embedding-config", type=Path, default=HERE / "base/config/embedding.toml")
    ap.add_argument("--ranker-config", type=Path, default=HERE / "base/config/ranker.toml")
    args = ap.parse_args(argv)
    spec = load_spec(args.model) if args.model else get_preset(args.preset).spec
    sys.path.insert(0, str(HERE))
    from podconfig import load_pod_config  # noqa: E402  (strips keys the installed flexemr predates)

    emb = load_pod_config(args.embedding_config, index=0)
    rk = load_pod_config(args.ranker_config)
    print(json.dumps(size(spec, emb, rk), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
