"""The RDMA network-layer benchmark runs end to end and reports both comparisons (smoke test).

A tiny configuration (one short run of each of the four modes) of
``python -m flexemr_bench.netlayer --transport rdma``, in this process (the
servers and engines are forked, as in the real run).  Checks what a reader of
netlayer-rdma.json relies on: both mapping modes and both credit modes with
lookups answered exactly, credit grants measured and paired one to one,
finite positive ratios, and that it all went over verbs (the device, RTS
queue pairs, the owned mode's two Endpoints against the shared mode's one,
the device's own packet counters).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from flexemr_bench import netlayer_rdma
from flexemr_bench.netlayer_rdma_wire import Workload

pytestmark = pytest.mark.rdma


def test_tiny_benchmark_writes_both_modes(tmp_path: Path, rdma_device: str) -> None:
    w = Workload(servers=2, rows=2000, dim=16, bags=8, ids_per_bag=5, window=4)
    netlayer_rdma.run(tmp_path, w, seconds=2.0, warmup_s=0.3, reps=1, device=rdma_device, plot=False)
    res = json.loads((tmp_path / netlayer_rdma.JSON_NAME).read_text())
    assert res["transport"] == "rdma" and res["device"] == rdma_device
    assert "only the ratios mean anything" in res["note"] and "one Endpoint" in res["shared_means"]
    runs = []
    for exp, modes in (("mapping", ("owned", "shared")), ("credits", ("priority", "in_band"))):
        for mode in modes:
            r = res[exp][mode]
            # a few only: the emulated guest on a loaded host may manage ~10 lookups/s
            assert r["lookups"] >= 5 and r["lookups_per_s"] > 0, (exp, mode, r)
            assert 0 < r["lookup_p50_us"] <= r["lookup_p99_us"], (exp, mode, r)
            assert r["grants"] > 0 and 0 < r["grant_p50_us"] <= r["grant_p99_us"], (exp, mode, r)
            (run,) = r["runs"]
            # every engine checked its first replies against local pooling: all exact
            assert run["verified_replies"] == 4 * 2 * w.servers and run["mismatched_replies"] == 0, run
            assert run["grants_unmatched"] == 0 and run["qp_states"] == ["RTS"] and run["device"] == rdma_device
            runs.append(run)
    assert res["mapping"]["owned"]["endpoints"] == 2 and res["mapping"]["shared"]["endpoints"] == 1
    assert res["credits"]["in_band"]["credits"] == "in_band" and res["credits"]["priority"]["credits"] == "priority"
    for key in ("owned_over_shared_lookups_per_s", "shared_over_owned_lookup_p99"):
        assert math.isfinite(res["mapping"][key]) and res["mapping"][key] > 0, key
    for key in ("in_band_over_priority_grant_p50", "in_band_over_priority_grant_p99",
                "in_band_over_priority_lookup_p99"):
        assert math.isfinite(res["credits"][key]) and res["credits"][key] > 0, key
    # the device itself counted the traffic: a SEND and a WRITE WITH IMM per lookup at least
    assert res["verbs"]["sent_pkts"] >= 2 * sum(r["lookups"] for r in runs), res["verbs"]
    table = netlayer_rdma.table(res)
    assert "owned/shared lookups/s" in table and "in_band/priority grant" in table
