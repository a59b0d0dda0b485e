"""Reference answers for the daemon-over-RDMA test, made on the host before the guest boots.

The guest's emulated CPU needs ~80 s to import torch; the test process there
needs none if the model directory, the requests and the monolithic model's
answers (lib/flexemr/monolithic.py) are written beforehand by the host:

    python -m tests.rdma.reference OUT_DIR      # scripts/test-rdma.sh does this

The test reads ``OUT_DIR/answers.pkl`` (``load``) and compares the RDMA
cluster's lookup() and predict() with it; without FLEXEMR_RDMA_REFERENCE it
makes the same files itself (a host with a real RNIC: torch imports fast).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import numpy as np

PRESET = "tiny"          # odd table sizes (1001/2003/517/4099 rows), every pooling mode
REQUESTS = 48
BATCH_SIZES = (1, 3, 17, 64, 64, 64)


def prepare(out: Path) -> Path:
    """Write ``out/model`` and ``out/answers.pkl``; returns the answers' path."""
    from flexemr.model.presets import init_model_dir
    from flexemr.model.spec import load_spec
    from flexemr.monolithic import MonolithicModel
    from flexemr.reqgen import RequestGenerator

    model = out / "model"
    init_model_dir(model, PRESET, seed=11)
    spec = load_spec(model)
    gen = RequestGenerator(spec, ids_per_bag=6, zipf_exponent=1.05, seed=12)
    rng = np.random.default_rng(13)
    ref = MonolithicModel(model)
    cases = []
    for _ in range(REQUESTS):
        dense, sparse = gen.batch(int(rng.choice(BATCH_SIZES)))
        cases.append({"dense": dense, "sparse": sparse, "predict": ref.predict(dense, sparse),
                      "lookup": ref.lookup(sparse)})
    path = out / "answers.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": str(model), "cases": cases}, f)
    return path


def load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


if __name__ == "__main__":
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    print(prepare(out))
