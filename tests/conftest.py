"""Shared fixtures: unique instance names, model directories, a running local cluster."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from tests.helpers.daemons import REPO, named_children, server_pids, stop_process, wait_ready

__all__ = ["REPO", "LocalCluster"]


@pytest.fixture
def instance() -> str:
    """A unique instance name; every segment it names is unlinked afterwards."""
    name = "t" + uuid.uuid4().hex[:10]
    yield name
    from flexemr import naming

    naming.unlink_instance_segments(name)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from flexemr.model.presets import init_model_dir

    out = tmp_path_factory.mktemp("models") / "tiny"
    init_model_dir(out, "tiny", seed=7)
    return out


class LocalCluster:
    """``flexemrd local`` as a real subprocess tree."""

    def __init__(self, model: Path, tmp: Path, servers: int = 3, engines: int = 2, extra: list[str] | None = None,
                 instance: str | None = None) -> None:
        self.instance = instance or "t" + uuid.uuid4().hex[:10]
        self.socket = str(tmp / f"{self.instance}.sock")
        self.log = tmp / f"{self.instance}.log"
        cmd = [sys.executable, "-m", "flexemrd", "local", "--model", str(model), "--embedding-servers", str(servers),
               "--engines", str(engines), "--socket", self.socket, "--instance", self.instance, *(extra or [])]
        self._logf = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._logf, text=True, cwd=REPO)
        if not wait_ready(self.proc):
            self.proc.kill()
            raise RuntimeError(f"flexemrd local did not become ready:\n{self.log.read_text()[-4000:]}")

    def children(self) -> list[int]:
        try:
            return [p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def processes(self, prefix: str) -> list[psutil.Process]:
        """This cluster's processes whose name starts with ``prefix`` (``flexemr-eng``, ``flexemr-emb``)."""
        return named_children(self.proc.pid, prefix)

    def listening_ports(self) -> list[int]:
        """The TCP ports the supervisor listens on (it holds the embedding servers' listening sockets)."""
        conns = psutil.Process(self.proc.pid).net_connections(kind="tcp")
        return sorted({k.laddr.port for k in conns if k.status == psutil.CONN_LISTEN})

    def server_pids(self) -> dict[int, int]:
        """embedding server index -> pid (process names are flexemr-emb[i])."""
        return server_pids(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        stop_process(self.proc, sig, timeout)
        self._logf.close()
        from flexemr import naming

        naming.unlink_instance_segments(self.instance)
        return self.proc.returncode

    def logs(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("cluster"))
    yield c
    c.stop()
