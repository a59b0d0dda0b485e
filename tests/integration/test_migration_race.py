"""The completion ring keeps one producer while connections migrate under multi-MB responses.

Failure mode this guards against: an engine's sender thread wrote
COMP_MIGRATED (and COMP_LOST) into the completion ring while its receiver
thread held a reservation in the same single-producer ring for a large
response arriving on another connection.  The two producers then collide
(a "reservation is pending" error that kills a thread, or interleaved
slots), and the engine dies or hangs and requests fail.

Real processes: ``flexemrd local`` with 3 embedding servers and 2 engines;
connection 0 moves back and forth between the engines hundreds of times
through the control mailbox (in-process client, as emrctl does it), while
clients keep the other connections of both engines busy with ~3 MB
responses.  Every answer must equal numpy pooling of the tables, and the
engine processes must be the ones that started.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.presets import Preset, init_model_dir
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.types import Interaction, Pooling
from flexemr.model.tables import open_tables
from flexemr.reqgen import RequestGenerator

from tests.conftest import LocalCluster

MIGRATIONS = 300
TIME_BUDGET_S = 150.0
BATCH = 768          # 768 bags x 4 tables x 256 floats = 3 MiB per server response
DIM = 256

WIDE = Preset(
    "wide-race",
    ModelSpec(dense_features=4, bottom_mlp=(8,), top_mlp=(8, 1), interaction=Interaction.CAT,
              tables=tuple(TableSpec(f"w{i}", 3001 + 17 * i, DIM, Pooling.SUM) for i in range(4))),
    ids_per_bag=4,
    description="tests: wide tables so responses are multi-MB",
)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("models") / "wide"
    init_model_dir(out, WIDE, seed=11)
    return out


def _expected(tables: dict[str, np.ndarray], sparse) -> dict[str, np.ndarray]:
    """Sum pooling with numpy on whole arrays (the reference, independent of the daemon)."""
    out = {}
    for name, (values, lengths) in sparse.items():
        rows = tables[name][values]
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
        pooled = np.add.reduceat(rows, starts, axis=0) if len(values) else np.zeros((len(lengths), DIM), np.float32)
        pooled[np.asarray(lengths) == 0] = 0.0  # reduceat copies a row for empty bags
        out[name] = pooled
    return out


def _engine_pids(c: LocalCluster) -> list[int]:
    import psutil

    return sorted(p.pid for p in psutil.Process(c.proc.pid).children() if p.name().startswith("flexemr-eng"))


def test_migrating_while_large_responses_arrive_keeps_answers_exact_and_engines_alive(wide_model, tmp_path):
    from emrctl.client import CommandFailed, DaemonClient
    from flexemr.control.commands import Migrate

    spec = WIDE.spec
    tables = open_tables(wide_model, spec)
    gen = RequestGenerator(spec, ids_per_bag=4, seed=5)
    requests = [gen.batch(BATCH)[1] for _ in range(6)]
    expected = [_expected(tables, s) for s in requests]

    c = LocalCluster(wide_model, tmp_path, servers=3, engines=2,
                     extra=["--no-rebalance", "--max-batch", str(BATCH), "--max-wait-ms", "0.5"])
    try:
        pids = _engine_pids(c)
        assert len(pids) == 2
        stop = threading.Event()
        failures: list[str] = []
        answered = [0]

        def client(k: int) -> None:
            with InferenceClient(c.socket, timeout=30) as cl:
                i = k
                while not stop.is_set():
                    j = i % len(requests)
                    i += 1
                    try:
                        got = cl.lookup(requests[j])
                    except Exception as e:  # every failed request is a finding
                        failures.append(f"request failed: {e!r}")
                        continue
                    for name, want in expected[j].items():
                        if not np.allclose(got[name], want, rtol=1e-5, atol=1e-4):
                            failures.append(f"wrong answer for table {name}")
                            break
                    answered[0] += 1

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(3)]
        for t in threads:
            t.start()
        moves = 0
        t0 = time.monotonic()
        try:
            with DaemonClient(c.instance, timeout=10) as ctl:
                while answered[0] == 0 and time.monotonic() - t0 < 30:
                    time.sleep(0.05)
                while moves < MIGRATIONS and time.monotonic() - t0 < TIME_BUDGET_S and not failures:
                    try:
                        ctl.send(Migrate(conn=0, to_engine=(moves + 1) % 2))
                    except CommandFailed as e:
                        failures.append(f"migration #{moves + 1} failed: {e}")
                        break
                    moves += 1
        finally:
            served_during_moves = answered[0]
            stop.set()
            for t in threads:
                t.join(60)
        assert failures == [], f"{len(failures)} failures after {moves} moves, first: {failures[:3]}"
        assert moves >= 200, f"only {moves} migrations in {TIME_BUDGET_S:.0f} s"
        assert served_during_moves > 50, "large responses kept arriving while the connection moved"
        assert _engine_pids(c) == pids, "an engine died and was restarted during the migrations"
        assert "restarting" not in c.logs()
    finally:
        c.stop()
