"""A 1% delta on the bench8 preset (8 x 1M x 64, 2 GB of tables) goes live in seconds.

Needs a bench8 model directory: ``emrctl model init --preset bench8 --out DIR``
and ``FLEXEMR_BENCH8_MODEL=DIR``; skipped otherwise (it is 2 GB).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec
from flexemr.model.versions import write_delta
from flexemr.reqgen import RequestGenerator

from tests.conftest import LocalCluster
from tests.integration.test_model_push import _emrctl

BENCH8 = os.environ.get("FLEXEMR_BENCH8_MODEL")

pytestmark = pytest.mark.skipif(not BENCH8, reason="set FLEXEMR_BENCH8_MODEL to a bench8 model directory")


def test_one_percent_delta_on_bench8_goes_live_in_seconds(tmp_path):
    model = Path(BENCH8)
    spec = load_spec(model)
    rng = np.random.default_rng(11)
    changes = {t.name: (np.sort(rng.choice(t.rows, t.rows // 100, replace=False)),
                        rng.normal(0, 0.1, (t.rows // 100, t.dim)).astype(np.float32)) for t in spec.tables}
    delta = write_delta(tmp_path / "delta", changes)
    c = LocalCluster(model, tmp_path, servers=2, engines=1)
    try:
        gen = RequestGenerator(spec, ids_per_bag=20, seed=1)
        with InferenceClient(c.socket) as client:
            for _ in range(3):
                client.predict(*gen.batch(64))
            before = _emrctl(c.instance, "status")["model"]
            t0 = time.perf_counter()
            result = _emrctl(c.instance, "model", "push", str(delta), "--delta")
            took = time.perf_counter() - t0
            # the changed rows are served: a bag of exactly one changed id pools to its new row
            t = spec.tables[0]
            ids, rows = changes[t.name]
            pooled = client.lookup({t.name: (ids[:4], np.ones(4, np.int32))})
            np.testing.assert_allclose(pooled[t.name], rows[:4], rtol=1e-6) if t.pooling == "sum" else None
            assert client.last_version == 2
        servers = result["servers"]
        print(f"\nbench8, delta of 1% of every table ({sum(len(i) for i, _ in changes.values())} rows): live after "
              f"{result['live_after_s']:.2f} s, switched after {result['switched_after_s']:.2f} s, emrctl returned "
              f"after {took:.2f} s; per server: " + ", ".join(
                  f"{i}: load {e.get('load_s', 0):.2f} s, RSS {e['rss_bytes'] / 2**20:.0f} MiB, peak "
                  f"{e['peak_rss_bytes'] / 2**20:.0f} MiB" for i, e in sorted(servers.items())))
        assert result["status"] == "ok" and result["switched_after_s"] < 10.0
        del before
    finally:
        c.stop()
