"""``flexemrd local --transport rdma`` as a test fixture: started, waited for, stopped, its segments removed.

Shared by the daemon modules of the rdma suite (one cluster per module: the
guest's emulated CPU boots a daemon in minutes).  The embedding servers pool
with numpy, so only the ranker imports torch.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
BOOT_S = float(os.environ.get("FLEXEMR_RDMA_BOOT_S", "1200"))


@contextmanager
def rdma_cluster(model: str, tmp: Path, servers: int, engines: int, prefix: str,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Iterator[dict]:
    """Run the cluster until the block ends; yields socket, log path, process and instance.

    ``args``: more ``flexemrd local`` options (e.g. the cache's, ``--connections-per-server``).
    """
    instance = prefix + uuid.uuid4().hex[:8]
    sock = str(tmp / "api.sock")
    log = tmp / "cluster.log"
    cmd = [sys.executable, "-m", "flexemrd", "local", "--model", model, "--embedding-servers", str(servers),
           "--engines", str(engines), "--socket", sock, "--instance", instance, "--transport", "rdma",
           "--no-rebalance", "--heartbeat-timeout", "0", "--boot-timeout", str(BOOT_S),
           "--embedding-kernel", "numpy", *args]
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=logf, text=True, cwd=REPO,
                                env={**os.environ, **(env or {})})
        t0 = time.monotonic()
        line = ""
        while time.monotonic() < t0 + BOOT_S + 60:
            line = proc.stdout.readline()
            if "ready" in line or not line:
                break
        if "ready" not in line:
            proc.kill()
            pytest.fail(f"flexemrd local --transport rdma did not become ready:\n{log.read_text()[-4000:]}")
        print(f"flexemrd local --transport rdma ready after {time.monotonic() - t0:.0f} s", file=sys.stderr)
        try:
            yield {"socket": sock, "log": log, "proc": proc, "instance": instance}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            from flexemr import naming

            naming.unlink_instance_segments(instance)


def engine_status(instance: str, wait_s: float = 1.0) -> list[dict]:
    """``emrctl status --json``'s engines, read from the control block after the publishers' next round."""
    import time

    from flexemr.control.block import ControlBlock

    time.sleep(wait_s)   # engines publish ~10x a second
    block = ControlBlock.attach(instance)
    try:
        return block.snapshot()["engines"]
    finally:
        block.close()
