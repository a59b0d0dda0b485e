"""Daemon processes for tests: free ports, ``flexemrd run`` wrappers, readiness, child pids by role.

``LocalCluster`` (tests/conftest.py) and ``Daemon`` here both start a real
``flexemrd`` and wait for the "ready" line it prints on stdout; the child
processes are found by the names flexemrd gives them (``flexemr-emb[i]``,
``flexemr-eng[i]``), so a test can kill or inspect one role.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 180.0   # a shared 2-core CI host may take this long to import torch in every child


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 right now (all bound at once, so no two are the same)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def wait_ready(proc: subprocess.Popen, timeout: float = READY_TIMEOUT_S) -> bool:
    """Read ``proc``'s stdout until flexemrd prints its "ready" line; False on EOF or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "ready" in line:
            return True
        if not line:
            return False
    return False


def named_children(root_pid: int, prefix: str) -> list[psutil.Process]:
    """The descendants of ``root_pid`` whose process name starts with ``prefix`` (``flexemr-emb``, ...)."""
    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in children:
        try:
            if p.name().startswith(prefix):
                out.append(p)
        except psutil.NoSuchProcess:
            continue
    return out


def server_pids(root_pid: int) -> dict[int, int]:
    """embedding server index -> pid, for the daemon tree under ``root_pid`` (names are flexemr-emb[i])."""
    out = {}
    for p in named_children(root_pid, "flexemr-emb["):
        try:
            name = p.name()
        except psutil.NoSuchProcess:
            continue
        out[int(name[len("flexemr-emb["):-1])] = p.pid
    return out


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    """Send ``sig`` and wait up to ``timeout`` s, then SIGKILL; returns the exit code."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


class Daemon:
    """One ``flexemrd run --config FILE`` process, its stderr in ``log``."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config, self.log = config, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._logf = open(self.log, "a")
        self.proc = subprocess.Popen([sys.executable, "-m", "flexemrd", "run", "--config", str(self.config)],
                                     stdout=subprocess.PIPE, stderr=self._logf, text=True, cwd=REPO)
        wait_ready(self.proc)
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.config.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        rc = stop_process(self.proc) if self.proc is not None else 0
        self._logf.close()
        return rc
