"""The socket front with requests in shared memory: what admission gets, what a dead client leaves, turning it off.

A real ``SocketFrontend`` (real unix socket, real memfds, real client
processes) whose batcher is replaced by a plain function: one that answers at
once, or one that never answers (a request in flight).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from flexemr.client import InferenceClient
from flexemr.model.spec import load_spec

from flexemrd.inference.admission import Admission, Work
from flexemrd.inference.frontend import FrontendLimits, SocketFrontend, bind_unix_socket


class Front:
    """A SocketFrontend on a fresh socket; ``works`` collects what admission handed on."""

    def __init__(self, model: Path, tmp: Path, answer: bool = True, limits: FrontendLimits = FrontendLimits()) -> None:
        self.spec = load_spec(model)
        self.works: list[Work] = []
        self.answer = answer
        self.path = str(tmp / "front.sock")
        self.front = SocketFrontend(Admission(self.spec), self._submit, lambda n: None, 64 << 20, limits)
        self.front.start(bind_unix_socket(self.path))

    def _submit(self, work: Work) -> None:
        self.works.append(work)
        if self.answer:
            work.reply.scores(work.request_id, np.arange(work.batch, dtype=np.float32))

    def close(self) -> None:
        self.front.stop_accepting()
        self.front.close_sessions()


def sample(spec, batch: int = 32, seed: int = 1) -> tuple[np.ndarray, dict]:
    rng = np.random.default_rng(seed)
    sparse = {}
    for t in spec.tables:
        ln = rng.integers(0, 4, batch).astype(np.int32)
        sparse[t.name] = (rng.integers(0, t.rows, int(ln.sum())).astype(np.int64), ln)
    return rng.standard_normal((batch, spec.dense_features)).astype(np.float32), sparse


def wait_for(cond, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def front(tiny_model, tmp_path):
    f = Front(tiny_model, tmp_path)
    yield f
    f.close()


def test_admission_gets_exactly_the_arrays_the_client_wrote_into_its_region(front):
    dense, sparse = sample(front.spec)
    with InferenceClient(front.path) as c:
        assert c.shm_requests_active
        for _ in range(3):          # the area is rewritten for each request, after the last was answered
            np.testing.assert_array_equal(c.predict(dense, sparse), np.arange(32, dtype=np.float32))
        assert c.shm_requests_sent == 3
    w = front.works[-1]
    np.testing.assert_array_equal(w.dense, dense)
    for i, t in enumerate(front.spec.tables):
        np.testing.assert_array_equal(w.tables[i][0], sparse[t.name][0])
        np.testing.assert_array_equal(w.tables[i][1], sparse[t.name][1])
    assert front.front.budget.used == 0     # every request's bytes were given back with its answer


def _hang(path: str, dense: np.ndarray, sparse: dict) -> None:
    c = InferenceClient(path)
    assert c.shm_requests_active
    c.predict(dense, sparse)       # never answered: the parent kills us while the ranker holds it


def test_a_client_killed_mid_request_leaves_no_bytes_held(tiny_model, tmp_path):
    f = Front(tiny_model, tmp_path, answer=False)
    try:
        dense, sparse = sample(f.spec, batch=256)
        child = multiprocessing.get_context("fork").Process(target=_hang, args=(f.path, dense, sparse))
        child.start()
        budget, regions = f.front.budget, f.front.regions
        assert wait_for(lambda: len(f.works) == 1), "the request never reached admission"
        assert budget.used > 0 and regions.used > 0     # its request bytes and its region are held
        os.kill(child.pid, signal.SIGKILL)
        child.join(10)
        assert wait_for(lambda: budget.used == 0 and regions.used == 0), (budget.used, regions.used)
    finally:
        f.close()


def test_a_ranker_with_shm_requests_off_gets_frames_and_the_client_says_why(tiny_model, tmp_path, caplog):
    f = Front(tiny_model, tmp_path, limits=FrontendLimits(shm_requests=False))
    try:
        dense, sparse = sample(f.spec)
        with caplog.at_level(logging.INFO, logger="flexemr.client"), InferenceClient(f.path) as c:
            assert c.shm_active and not c.shm_requests_active     # answers still come through the region
            np.testing.assert_array_equal(c.predict(dense, sparse), np.arange(32, dtype=np.float32))
            assert c.shm_requests_sent == 0
        assert "reads no requests from shared memory" in caplog.text
        np.testing.assert_array_equal(f.works[-1].dense, dense)
    finally:
        f.close()
