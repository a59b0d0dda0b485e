"""emrctl bench: the pieces (Redis client, ratios, schema, LoadGen summary parsing, plots) and a smoke run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr_bench import report, suite, systems, workloads
from flexemr_bench.mlperf import _parse_summary
from flexemr_bench.plots import write_plots
from flexemr_bench.redis_store import encode_keys

REPO = Path(__file__).resolve().parents[2]
needs_redis = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def test_key_bytes_are_the_redis_store_keys():
    rows = np.array([0, 1, 127, 128, 2**21 + 5, 2**28 - 1], dtype=np.int64)
    for table in (0, 3, 31):
        assert [bytes(k) for k in systems.key_bytes(table, rows)] == encode_keys(table, rows)


def test_resp_bulk_records():
    rec = systems._resp_bulk(np.frombuffer(b"abcdeVWXYZ", dtype=np.uint8).reshape(2, 5))
    assert rec.tobytes() == b"$5\r\nabcde\r\n$5\r\nVWXYZ\r\n"


@needs_redis
def test_redis_ranker_pools_what_the_tables_hold(tiny_model):
    """Sharded load + numpy MGET parsing give exactly the monolithic pooled vectors (all pooling modes)."""
    from flexemr_bench.redis_store import RedisServer
    from flexemr.model.spec import load_spec
    from flexemr.model.tables import open_tables
    from flexemr.monolithic import MonolithicModel
    from flexemr.reqgen import RequestGenerator

    spec = load_spec(tiny_model)
    servers = [RedisServer(), RedisServer()]
    try:
        ranker = systems.RedisRanker(spec, [s.port for s in servers])
        ranker.load(open_tables(tiny_model, spec))
        assert sum(ranker.dbsize(i) for i in range(2)) == sum(t.rows for t in spec.tables)
        gen = RequestGenerator(spec, 8, seed=3, empty_bag_prob=0.2)
        mono = MonolithicModel(tiny_model)
        for b in (1, 7, 300):
            _dense, sparse = gen.batch(b)
            got, want = ranker.lookup(sparse), mono.lookup(sparse)
            for name in want:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
        # a table whose bags are all empty pools to zeros
        empty = {"t0": (np.zeros(0, dtype=np.int64), np.zeros(4, dtype=np.int32))}
        assert not ranker.lookup(empty)["t0"].any()
        ranker.close()
    finally:
        for s in servers:
            s.stop()


def _row(sps: float, p99: float = 10.0, wire: float = 100.0) -> dict:
    return {"samples_per_s": sps, "p50_ms": p99 / 2, "p95_ms": p99 * 0.9, "p99_ms": p99,
            "wire_bytes_per_sample": wire, "cpu_s_per_sample": 1e-5, "errors": 0, "background_cpu_cores": 0.0,
            "latency_cdf_ms": list(np.linspace(1, p99 * 1.2, 101))}


def _results() -> dict:
    closed = [{"name": f"m-b{b}-closed", "model": "m", "batch": b, "mode": "closed",
               "systems": {"flexemr": _row(1000 * b ** 0.5), "inprocess": _row(2000 * b ** 0.5, wire=0.0),
                           "redis": _row(500 * b ** 0.5, wire=900.0)}} for b in (64, 512)]
    closed[1]["ablation"] = True
    closed[1]["systems"]["flexemr-shared"] = _row(900 * 512 ** 0.5)
    opened = {"name": "m-b64-open50", "model": "m", "batch": 64, "mode": "open", "offered_samples_per_s": 4000.0,
              "load_level": 0.5, "load_relative_to": "slowest",
              "systems": {"flexemr": _row(4000, 20), "inprocess": _row(4000, 5, 0.0), "redis": _row(4000, 40)},
              "failed": {"flexemr-inband": "RemoteError: boom"}}
    cells = [*closed, opened]
    for c in cells:
        c["ratios"] = report.ratios(c["systems"])
    return {"workloads": cells, "models": {"m": {"tables": 4, "rows_per_table": 5000, "dims": [16],
                                                  "ids_per_bag": 8}},
            "mlperf": {"system": "flexemr", "workload": "m", "batch": 64, "offline": {"qps": 100.0},
                       "server": {"bound_ms": 50.0, "best_qps": 60.0, "best_p99_ms": 30.0,
                                  "probes": [{"target_qps": 60.0, "p99_ms": 30.0, "pass": True},
                                             {"target_qps": 80.0, "p99_ms": 90.0, "pass": False}]}},
            "skipped": [], "issues": []}


def test_ratios_against_each_baseline_and_flexemr():
    systems = {"flexemr": _row(300, 10), "inprocess": _row(600, 5, 0.0), "redis": _row(100, 40),
               "flexemr-shared": _row(150, 20)}
    r = report.ratios(systems)
    assert r["flexemr/inprocess"]["samples_per_s"] == 0.5
    assert r["flexemr/redis"]["samples_per_s"] == 3.0
    assert r["flexemr/redis"]["p99_ms"] == 0.25
    assert r["flexemr-shared/flexemr"]["samples_per_s"] == 0.5
    assert r["flexemr/inprocess"]["wire_bytes_per_sample"] is None   # in-process moves no bytes: no ratio
    assert "inprocess/redis" not in r


def test_schema_validation_names_what_is_missing():
    res = _results()
    assert report.validate_results(res) == []
    del res["workloads"][0]["systems"]["redis"]
    res["workloads"][1]["systems"]["flexemr"]["p99_ms"] = None
    problems = report.validate_results(res)
    assert any("m-b64-closed" in p and "redis missing" in p for p in problems)
    assert any("systems.flexemr.p99_ms" in p for p in problems)
    assert report.validate_results({}) == ["workloads: missing or not a non-empty list"]


def test_table_and_plots_from_results(tmp_path):
    res = _results()
    table = report.format_table(res)
    assert "m-b512-closed" in table and "flexemr-shared" in table
    assert "FAILED: RemoteError: boom" in table
    assert "p99 4.00" in table                 # open loop: flexemr's p99 against inprocess
    assert "highest QPS with p99 <= 50.0 ms = 60.0" in table
    files = write_plots(res, tmp_path)
    assert set(files) == {"throughput.png", "latency_cdf.png", "efficiency.png", "ablations.png", "mlperf.png"}
    for f in files:
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SUMMARY = """\
================================================
MLPerf Results Summary
================================================
SUT name : PySUT
Scenario : Server
Mode     : PerformanceOnly
Completed samples per second    : 194.18
Result is : INVALID
  Performance constraints satisfied : Yes
  Min duration satisfied : Yes
  Early stopping satisfied: NO
================================================
Additional Stats
================================================
Scheduled samples per second : 194.70
50.00 percentile latency (ns)   : 5341699
99.00 percentile latency (ns)   : 6991237
"""


def test_loadgen_summary_parsing(tmp_path):
    p = tmp_path / "mlperf_log_summary.txt"
    p.write_text(SUMMARY)
    s = _parse_summary(p)
    assert s["completed_qps"] == 194.18 and s["scheduled_qps"] == 194.70
    assert s["p99_ms"] == 6.991 and s["p50_ms"] == 5.342
    assert s["constraints_satisfied"] and not s["valid"] and not s["early_stopping_satisfied"]
    assert "offline_qps" not in s
    p.write_text("Scenario : Offline\nSamples per second: 812.5\nResult is : VALID\n")
    assert _parse_summary(p)["offline_qps"] == 812.5


def test_ablation_flags_are_checked_against_the_daemon_help():
    help_text = "  --mapping [owned|shared]\n  --credits [priority|inband|off]\n"
    by_name = {a.name: a for a in workloads.ABLATIONS}
    assert workloads.ablation_unsupported(by_name["flexemr-shared"], help_text) is None
    assert "no --cache-policy" in workloads.ablation_unsupported(by_name["flexemr-cache-fixed"], help_text)
    assert "does not accept 'inband'" in workloads.ablation_unsupported(
        by_name["flexemr-inband"], "  --credits [priority|off]\n")
    assert workloads.ablation_unsupported(by_name["flexemr-rawrows"], "") is None   # needs no daemon flag


def test_open_loop_cells_and_their_windows():
    """Which open-loop cells a run makes, at what load, and how long each system is driven there."""
    spec = workloads.SUITES["smoke"]     # levels 0.5 of the slowest and of flexemr; 1 s cells, 20 arrivals, x1.5
    wl = spec.workloads[0]
    loads = workloads.open_loop_loads(spec, {"flexemr": 4000.0, "inprocess": 8000.0, "redis": 1000.0})
    assert [ld.cell_name(wl) for ld in loads] == ["tiny-b64-open50", "tiny-b64-open50-flexemr"]
    assert [ld.offered_samples_per_s for ld in loads] == [500.0, 2000.0]
    assert workloads.open_loop_loads(spec, {}) == []     # every closed-loop measurement failed: no open loop
    # carried load: the base duration, stretched towards 20 arrivals, at most 1.5 times
    assert workloads.open_loop_seconds(spec, rate=2000 / 64, offered=2000, cap=4000) == (1.0, False)
    assert workloads.open_loop_seconds(spec, rate=5.0, offered=320, cap=None) == (1.5, False)
    # a baseline below the offered load: saturated, driven for the same amount of work it can do
    assert workloads.open_loop_seconds(spec, rate=2000 / 64, offered=2000, cap=1500) == (0.75, True)


def test_ablations_wanted_and_skipped_per_workload():
    quick = workloads.SUITES["quick"]
    rmc1, rmc2 = quick.workloads[0], quick.workloads[1]
    help_text = "  --mapping [owned|shared]\n  --credits [priority|inband|off]\n  --engines INTEGER\n"
    wanted, skipped = workloads.wanted_ablations(quick, rmc1, help_text)
    assert [a.name for a in wanted] == ["flexemr-rawrows", "flexemr-shared", "flexemr-1engine", "flexemr-inband"]
    assert set(skipped) == {"flexemr-cache-fixed", "flexemr-cache-adaptive"}
    assert "no --cache-policy" in skipped["flexemr-cache-fixed"]
    assert workloads.wanted_ablations(quick, rmc2, help_text) == ([], {})   # ablations run on rmc1 only


def test_only_daemon_py_imports_the_daemon():
    """flexemr_bench reaches flexemrd through one module, so a move inside the daemon is a one-file change."""
    import ast

    importers = set()
    for path in sorted((REPO / "flexemr_bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            if any(n == "flexemrd" or n.startswith("flexemrd.") for n in names):
                importers.add(path.name)
    assert importers == {"daemon.py"}


@pytest.mark.parametrize("module", ["suite", "plots", "ranker", "netlayer", "cache", "dataplane", "mlperf"])
def test_every_benchmark_answers_help(module):
    """The commands README.md and docs/PERFORMANCE.md give (python -m flexemr_bench.<module>) exist and start."""
    proc = subprocess.run([sys.executable, "-m", f"flexemr_bench.{module}", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"python -m flexemr_bench.{module}" in proc.stdout


def _bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, Path, float]:
    """Run ``emrctl bench --suite smoke`` in a fresh process (its children fork; see suite's docstring)."""
    import psutil

    out = tmp_path / "bench"
    before = {p.pid for p in psutil.process_iter()}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "emrctl", "bench", "--suite", "smoke", "--out", str(out), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every process it started is gone (daemon trees, redis-servers, clients)
    time.sleep(0.5)
    left = []
    for p in psutil.process_iter(["pid", "ppid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if p.pid not in before and (("flexemrd" in cmd and str(out) in cmd)
                                    or ("redis-server" in cmd and p.info["ppid"] == 1)):
            left.append(cmd)
    assert not left, left
    return proc, json.loads((out / "results.json").read_text()), out, took


@needs_redis
def test_bench_starts_measures_and_stops_everything(tmp_path):
    """The real thing, smallest: daemon, redis-servers and clients start, are measured and are all stopped."""
    proc, res, out, took = _bench(tmp_path, "--seconds", "0.5", "--no-mlperf", "--no-ablations")
    assert report.validate_results(res) == []
    assert [c["name"] for c in res["workloads"]] == ["tiny-b64-closed", "tiny-b256-closed", "tiny-b64-open50",
                                                    "tiny-b64-open50-flexemr"]
    for c in res["workloads"]:
        for name, r in c["systems"].items():
            assert r["samples_per_s"] > 0 and r["errors"] == 0, (c["name"], name)
            # no embedding servers, no wire: the in-process limits and the monolithic daemon
            assert (r["wire_bytes_per_sample"] == 0) == (name in ("inprocess", "inprocess-all", "monolithic")), \
                (c["name"], name)
            assert r["cpu_s_per_sample"] > 0
    assert all(abs(d) <= 1e-3 for d in res["answer_check"]["tiny"].values())
    assert res["issues"] == [], res["issues"]
    for f in ("throughput.png", "latency_cdf.png", "efficiency.png", "summary.md"):
        assert (out / f).exists()
    assert "tiny-b64-closed" in proc.stdout and "samples/s" in proc.stdout
    assert "closed loop" in proc.stderr                              # progress lines
    assert took < 150, f"took {took:.0f} s"   # a smoke of every system, including the monolithic daemon


@pytest.mark.slow
@needs_redis
def test_smoke_suite_with_ablation_and_loadgen(tmp_path):
    proc, res, out, took = _bench(tmp_path)
    assert report.validate_results(res) == []
    assert "flexemr-rawrows" in res["workloads"][0]["systems"]
    raw, pooled = res["workloads"][0]["systems"]["flexemr-rawrows"], res["workloads"][0]["systems"]["flexemr"]
    assert raw["errors"] == 0 and raw["wire_bytes_per_sample"] > 0
    m = res["mlperf"]
    assert m["offline"]["qps"] > 0 and m["server"]["bound_ms"] == 50.0 and m["server"]["probes"]
    assert (out / "mlperf" / "offline" / "mlperf_log_summary.txt").exists()
    assert (out / "ablations.png").exists() and (out / "mlperf.png").exists()
    assert "MLPerf LoadGen" in proc.stdout
    assert took < 180, f"took {took:.0f} s"
