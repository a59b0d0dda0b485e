"""Fixtures for the cluster suite: root check, the emrctl command, machine snapshots, load.

Every test here runs real namespaces, cgroups and daemons (``-m cluster``,
root only; CI runs it after the default suite with scripts/test-cluster.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.load import ClientLoad

REPO = Path(__file__).resolve().parents[2]
CPU_CGROUPS = Path("/sys/fs/cgroup/cpu")


def _skip_reason() -> str:
    if os.geteuid() != 0:
        return "the cluster suite needs root (network namespaces, cgroups, tc)"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "the cluster suite needs iproute2 (ip, tc)"
    if not (CPU_CGROUPS / "cpu.cfs_quota_us").exists():
        return "the cluster suite needs the cgroup v1 cpu controller"
    return ""


def pytest_collection_modifyitems(config, items):
    reason = _skip_reason()
    if reason:
        for item in items:
            if "cluster" in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


def emrctl(*args: str, timeout: float = 400, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m emrctl ARGS`` from this checkout, as a user would."""
    r = subprocess.run([sys.executable, "-m", "emrctl", *args], capture_output=True, text=True, timeout=timeout,
                       cwd=REPO, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"emrctl {' '.join(args)} exited {r.returncode}:\n{r.stdout}\n{r.stderr}")
    return r


def cluster_status(name: str) -> dict:
    return json.loads(emrctl("cluster", "status", "--name", name, "--json").stdout)


def unique_name() -> str:
    return "t" + uuid.uuid4().hex[:7]


@pytest.fixture(scope="session")
def reference(tiny_model):   # tiny_model: tests/conftest.py
    from flexemr.monolithic import MonolithicModel

    return MonolithicModel(tiny_model)


# ------------------------------------------------------------------------------------------ machine snapshots


def machine(name: str) -> dict:
    """What a cluster may create, as seen from the root namespace.

    Namespaces, root-namespace links, cpu cgroup directories, /run/netns and
    its mount, the cluster record tree (/run/flexemr/cluster), and the
    processes and /dev/shm entries that carry the cluster's name (other engineers' tests run on this
    machine at the same time: their shm and processes are not ours to compare).
    """
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout.splitlines()
    cgroups = sorted(str(p) for p in CPU_CGROUPS.rglob("*") if p.is_dir())
    with open("/proc/self/mountinfo") as f:
        mounts = sorted(line.split()[4] for line in f if "/run/netns" in line or "/run/flexemr" in line)
    # /run/flexemr itself is shared with other daemons and tests (secrets, sockets): only our subtree counts
    records = Path("/run/flexemr/cluster")
    run = sorted(str(p) for p in records.rglob("*")) if records.exists() else []
    procs = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/cluster/{name}/" in cmd or f"flexemr-{name}" in cmd:
            procs.append(f"{pid} {cmd}")
    shm = sorted(e for e in os.listdir("/dev/shm") if f".{name}-" in e)
    return {
        "netns": sorted(n.split()[0] for n in netns if n.strip()),
        "links": sorted(line.split(":")[1].strip().split("@")[0] for line in links),
        "cgroups": cgroups,
        "netns_dir": os.path.isdir("/run/netns"),
        "mounts": mounts,
        "cluster_records": [records.exists(), run],
        "processes": sorted(procs),
        "shm": shm,
    }


def assert_same_machine(before: dict, after: dict) -> None:
    diff = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    assert not diff, "the machine changed:\n" + "\n".join(f"  {k}: before {b!r}\n  {' ' * len(k)}  after  {a!r}"
                                                         for k, (b, a) in diff.items())


# ------------------------------------------------------------------------------------------ load


class Load(ClientLoad):
    """Concurrent predict clients on one ranker socket; every answer checked against the reference."""

    def __init__(self, socket: str, reference, clients: int = 2, seed: int = 0, batch: int = 16) -> None:
        super().__init__(clients)
        self.socket, self.reference, self.batch, self.seed = socket, reference, batch, seed
        self.failures: list[tuple[float, float, str]] = []   # (started, seconds, message)
        self.latencies: list[tuple[float, float]] = []        # (started, seconds)

    def _run(self, k: int) -> None:
        from flexemr.client import InferenceClient
        from flexemr.errors import RemoteError
        from flexemr.reqgen import RequestGenerator

        gen = RequestGenerator(self.reference.spec, ids_per_bag=6, seed=self.seed * 100 + k)
        try:
            client = InferenceClient(self.socket, timeout=60)
        except OSError as e:
            self.failed((time.monotonic(), 0.0, f"connect: {e}"))
            return
        with client as c:
            while not self.stop.is_set():
                dense, sparse = gen.batch(self.batch)
                t0 = time.monotonic()
                try:
                    got = c.predict(dense, sparse)
                except (RemoteError, ConnectionError, OSError) as e:
                    self.failed((t0, time.monotonic() - t0, str(e)))
                    continue
                took = time.monotonic() - t0
                want = self.reference.predict(dense, sparse)
                with self._lock:
                    self.latencies.append((t0, took))
                self.answered(np.allclose(got, want, rtol=1e-5, atol=1e-6))
