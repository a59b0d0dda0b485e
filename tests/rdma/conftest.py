"""The rdma suite: real verbs on a real (soft-RoCE or hardware) RDMA device.

Outside the guest these tests skip unless ``FLEXEMR_RDMA_GUEST=1`` says an
RDMA device is there (scripts/test-rdma.sh sets it inside the soft-RoCE
guest; a host with an RNIC may set it too).  With the variable set, a missing
device or pyverbs is a failure, never a skip: the suite must not pass
without having moved a byte over verbs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

IN_GUEST = os.environ.get("FLEXEMR_RDMA_GUEST") == "1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [i for i in items if Path(i.path).resolve().is_relative_to(HERE)]
    for item in mine:
        item.add_marker(pytest.mark.rdma)
        if not IN_GUEST:
            item.add_marker(pytest.mark.skip(
                reason="needs an RDMA device: run scripts/test-rdma.sh (boots a soft-RoCE guest), "
                       "or set FLEXEMR_RDMA_GUEST=1 on a host with an RNIC"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Keep each test's call report on its item (``rep_call``): fixtures print logs when it failed."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call = rep


@pytest.fixture(autouse=True)
def cluster_log_on_failure(request):
    """The guest's files vanish with it: a failing test of a module with a ``cluster`` fixture prints its log."""
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed and "cluster" in request.fixturenames:
        log = request.getfixturevalue("cluster")["log"]
        text = f"\n----- {log} (last 12000 bytes) -----\n{log.read_text()[-12000:]}\n"
        # pytest captures fd 2 itself; the guest's console is what reaches the host.
        try:
            with open("/dev/console", "w") as console:
                console.write(text)
        except OSError:
            sys.__stderr__.write(text)


def _numpy_sorts_here() -> None:
    """The CPU computes what numpy promises (an error naming what broke, for every test, if not).

    Under QEMU's TCG with ``-cpu max``, numpy dispatches its AVX2 argsort,
    which the emulator gets wrong: ``np.argsort`` and ``np.unique(...,
    return_inverse=True)`` of unsorted int64 came back unsorted for two
    thirds of random inputs, and the engine planned cache-fill READs of
    negative length from them.  scripts/rxe-vm runs the guest without AVX2.
    """
    import numpy as np

    rng = np.random.default_rng(7)
    for _ in range(50):
        a = rng.permutation(5000)[: int(rng.integers(100, 3000))].astype(np.int64)
        u, inverse = np.unique(a, return_inverse=True)
        if not ((np.diff(a[np.argsort(a)]) > 0).all() and (np.diff(u) > 0).all() and (u[inverse] == a).all()):
            raise AssertionError("numpy's argsort/unique return wrong orders on this CPU (an emulated CPU with "
                                 "AVX2? scripts/rxe-vm boots the guest with -cpu max,avx2=off)")


@pytest.fixture(scope="session")
def rdma_device() -> str:
    """The device the suite runs on (fails, not skips, when there is none, or when numpy misbehaves on its CPU)."""
    from flexemr.transport.rdma import device

    _numpy_sorts_here()

    names, why = device.probe()
    assert names, f"FLEXEMR_RDMA_GUEST=1 but no usable RDMA device: {why}"
    return os.environ.get("FLEXEMR_RDMA_DEVICE", names[0])


@pytest.fixture(scope="module")
def endpoint(rdma_device: str):
    """This (ranker) process's endpoint; peers open their own after fork."""
    from flexemr.transport.rdma.endpoint import Endpoint

    ep = Endpoint(rdma_device)
    yield ep
    ep.close()


@pytest.fixture(scope="module")
def answers(tmp_path_factory):
    """The monolithic reference for the daemon tests (made on the host by scripts/test-rdma.sh, or here)."""
    from tests.rdma.reference import load, prepare

    made = os.environ.get("FLEXEMR_RDMA_REFERENCE")
    path = Path(made) / "answers.pkl" if made else prepare(tmp_path_factory.mktemp("reference"))
    return load(path)
