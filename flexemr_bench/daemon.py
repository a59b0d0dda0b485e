"""The daemon's pieces the benchmarks reuse: the only module of flexemr_bench that imports ``flexemrd``.

The benchmarks run the daemon's own code paths so that what they measure is
what serves: the global-pooling combine (:mod:`flexemr_bench.cache`) and the
embedding server's entry (:mod:`flexemr_bench.dataplane`).  They reach them
through here alone, so a move inside the daemon is a one-line change below.

It also holds the one way a benchmark runs the daemon (or any server) as a
child process: ``ReadyProcess`` starts a command and waits for the line
containing ``ready`` it prints on stdout (and, if given, for its socket),
``stop_process`` stops a child with SIGTERM and then SIGKILL, and
``tree_cpu_seconds`` reads the CPU time a process tree used, ``free_ports``
finds ports to give a child.

Importing this module costs about 0.3 s (flexemrd's embedding entry, not
torch); the benchmarks that only drive clients import it lazily.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from flexemr.loadgen import wait_for_socket
from flexemr.routing.combine import Accumulator
from flexemrd.embedding.main import EmbeddingPlan, embedding_main
from flexemrd.process import ReadyPipe

__all__ = ["Accumulator", "EmbeddingPlan", "ReadyPipe", "ReadyProcess", "embedding_main", "free_ports",
           "stop_process", "tree_cpu_by_prefix", "tree_cpu_seconds"]


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


def stop_process(proc: subprocess.Popen, timeout: float = 30.0) -> int | None:
    """SIGTERM ``proc`` (a daemon drains and unlinks its shm), SIGKILL it after ``timeout`` s; its exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tree_cpu(pids: Sequence[int]) -> Iterator[tuple[str, float]]:
    """(process name, user+system seconds) of ``pids`` and all their descendants, each process once."""
    import psutil

    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                name, t = p.name(), p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            yield name, t.user + t.system


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """user+system seconds of ``pids`` and all their descendants (threads included)."""
    return sum(cpu for _name, cpu in _tree_cpu(pids))


def tree_cpu_by_prefix(pid: int, roles: Sequence[tuple[str, str]], other: str) -> dict[str, float]:
    """CPU seconds of ``pid``'s tree summed per role: a process counts for the first (name prefix, role)
    its name starts with (flexemrd's process titles name their role), else for ``other``."""
    out = {role: 0.0 for _prefix, role in roles}
    out[other] = 0.0
    for name, cpu in _tree_cpu([pid]):
        out[next((r for prefix, r in roles if name.startswith(prefix)), other)] += cpu
    return out


class ReadyProcess:
    """A child that prints a line containing ``ready`` when it serves (``flexemrd local``, the KServe front).

    ``line`` is that line (a front prints its ports on it).  With
    ``ready_line=False`` (``flexemrd run`` prints none) its stdout goes to the
    log too and only ``sock`` is waited for.  The log file is the child's stderr.
    """

    def __init__(self, cmd: list[str], log: str | Path, sock: str | None = None, ready_line: bool = True,
                 sock_timeout_s: float = 90.0) -> None:
        self.sock = sock
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE if ready_line else self.log, stderr=self.log,
                                     text=True)
        self.line = (self.proc.stdout.readline() or "") if ready_line else ""
        if ready_line and "ready" not in self.line:
            self.stop()
            raise RuntimeError(f"{' '.join(cmd)} did not start; see {log}")
        if sock:
            wait_for_socket(sock, sock_timeout_s, self.proc)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()
