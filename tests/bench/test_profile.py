"""flexemr_bench.profile: perf samples land in the category a reader of the table expects, and a real run
writes a table whose roles add up to what they were measured to use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexemr_bench import profile
from flexemr_bench.profile import CATEGORY_KEYS, breakdown, classify, gil_holders, parse_perf_script, weights_by_pid

REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).with_name("fixtures") / "perf_script.txt"

# One per sample of the fixture (recorded with perf 6.1 under the ranker benchmark's load), in order.
EXPECTED = ["gather", "numpy_torch", "python", "memcpy", "numpy_torch", "kernel_socket", "kernel_sched",
            "kernel_sched", "kernel_page_faults", "kernel_other", "other"]


def test_perf_script_samples_are_classified_by_leaf_and_chain():
    samples = list(parse_perf_script(FIXTURE.read_text().splitlines()))
    assert [classify(s.frames) for s in samples] == EXPECTED
    jit = samples[0]
    assert (jit.pid, jit.tid, jit.period, jit.time) == (10338, 10338, 4_000_000, 34037.5)
    # Offsets are dropped and C++ names keep their spaces and parentheses.
    assert jit.frames[1].sym == "at::native::_embedding_bag_cpu_impl_out"
    assert jit.frames[1].dso.endswith("libtorch_cpu.so")


def test_every_category_of_the_table_is_reachable():
    assert set(EXPECTED) == set(CATEGORY_KEYS)


def test_shares_are_multiplied_by_each_roles_cpu_and_the_window_selects_samples():
    samples = list(parse_perf_script(FIXTURE.read_text().splitlines()))
    w = weights_by_pid(samples, start=34037.0, end=34038.0)        # the two samples at 34039.9x fall outside
    roles = {18802: "ranker", 18805: "ranker", 18939: "ranker", 18945: "ranker", 10338: "embedding servers"}
    out = breakdown(w, roles, {"ranker": 2.0, "embedding servers": 5.0, "clients": 1.0})
    r = out["ranker"]
    assert r["shares"]["memcpy"] == pytest.approx(1 / 3, abs=1e-3)
    assert r["shares"]["kernel_socket"] == 0.0
    assert r["ms_per_1k_samples"]["kernel_sched"] == pytest.approx(2.0 / 3, abs=1e-3)
    assert sum(r["ms_per_1k_samples"].values()) == pytest.approx(2.0, abs=1e-2)
    assert out["embedding servers"]["ms_per_1k_samples"]["gather"] == 5.0
    # A role perf never saw keeps its measured CPU and no shares.
    assert out["clients"]["cpu_ms_per_1k_samples"] == 1.0 and out["clients"]["perf_cpu_s"] == 0.0


def test_gil_holders_are_counted_per_role_by_the_last_process_frame():
    raw = [
        'process 1:"python -m bench";process 20:"flexemr-inf";run (flexemrd/inference/finisher.py:40);'
        'ring (flexemr/ring/ring.py:88) 30',
        'process 1:"python -m bench";process 20:"flexemr-inf";ring (flexemr/ring/ring.py:91) 10',
        'process 1:"python -m bench";process 20:"flexemr-inf";merge (flexemr/routing/split.py:12) 20',
        'process 1:"python -m bench";process 31:"python";_call (flexemr/client.py:7) 5',
        'process 1:"python -m bench";wait (threading.py:320) 99',             # the profiler itself: no role
        "not a py-spy line",
    ]
    top = gil_holders(raw, {20: "ranker", 31: "clients"})
    assert top["ranker"][0] == {"function": "ring (flexemr/ring/ring.py)", "samples": 40, "share": round(40 / 60, 4)}
    assert [t["function"] for t in top["ranker"]] == ["ring (flexemr/ring/ring.py)", "merge (flexemr/routing/split.py)"]
    assert top["clients"][0]["samples"] == 5
    assert set(top) == {"ranker", "clients"}


def test_the_markdown_table_has_a_row_per_category_and_the_role_totals():
    run = {"system": "flexemr", "kind": "lookup",
           "roles": breakdown({7: {"gather": 3_000_000_000, "python": 1_000_000_000}}, {7: "embedding servers"},
                              {"embedding servers": 4.0, "clients": 0.5})}
    table = profile.markdown(run).splitlines()
    assert len(table) == 2 + len(CATEGORY_KEYS) + 1
    assert "| gather: embedding_bag kernel | 3.00 (75%) | – |" in table
    assert table[-1] == "| **role total** | **4.00** | **0.50** |"


def test_a_missing_perf_is_named_not_raised(monkeypatch, tmp_path):
    monkeypatch.setattr(profile, "PERF", str(tmp_path / "perf"))
    assert profile.perf_problem() == f"{tmp_path / 'perf'} is missing"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_short_profile_run_writes_json_png_and_a_table(tmp_path):
    """The whole command on a small model: every role recorded, and its categories add up to its CPU."""
    problem = profile.perf_problem()
    if problem:
        pytest.skip(problem)
    cmd = [sys.executable, "-m", "flexemr_bench.profile", "--out", str(tmp_path), "--rows-cap", "5000",
           "--seconds", "2", "--system", "flexemr", "--kind", "lookup", "--no-py-spy"]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'lib'}:{REPO}"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| **role total** |" in r.stdout
    res = json.loads((tmp_path / "profile.json").read_text())
    assert (tmp_path / "profile.png").stat().st_size > 0
    roles = res["runs"]["lookup"]["roles"]
    for role in ("embedding servers", "engines", "ranker", "clients", "in-process limit"):
        d = roles[role]
        assert d["perf_cpu_s"] > 0, role
        assert sum(d["ms_per_1k_samples"].values()) == pytest.approx(d["cpu_ms_per_1k_samples"], rel=0.02), role
    assert roles["embedding servers"]["shares"]["gather"] > 0.1
    assert roles["in-process limit"]["shares"]["gather"] > 0.1

