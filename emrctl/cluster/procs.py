"""A host's daemon: started inside its namespace and cgroup, waited for, stopped by pid.

``ip netns exec NS python -m flexemrd run --config FILE``: ``ip`` execs the
daemon in place, so the pid Popen returns is the daemon's supervisor.  The
cgroup is joined between fork and exec, so every worker the supervisor forks
is in it too.  A daemon is ready when its log holds the supervisor's
``flexemrd ready`` line.

Stopping: SIGTERM to the supervisor (it drains and stops its workers), then
SIGKILL to whatever is still in the host's namespace or cgroup after the
timeout.  A recorded pid is signalled only while its start time matches the
record, so a recycled pid is never hit; the namespace and cgroup lists need
no such check: everything in them is ours.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from emrctl.cluster import limits, netns
from emrctl.cluster.errors import ClusterError
from emrctl.cluster.state import Host

logger = logging.getLogger(__name__)

READY_MARK = b"flexemrd ready"
BOOT_TIMEOUT_S = 240.0        # torch imports and model maps on a 2-core machine shared with others
STOP_TIMEOUT_S = 20.0


@dataclasses.dataclass
class Started:
    """A daemon being started, and where in its (appended) log this run begins."""

    host: Host
    proc: subprocess.Popen
    log_offset: int


def start(host: Host) -> Started:
    """Start the host's daemon; records nothing (the caller saves pid and start time)."""
    cmd = ["ip", "netns", "exec", host.netns, sys.executable, "-m", "flexemrd", "run", "--config", host.config]
    cgroup = host.cgroup

    def in_child() -> None:   # between fork and exec: no logging, no locks
        if cgroup:
            limits.join_cgroup(cgroup)

    with open(host.log, "ab") as log:
        offset = log.tell()   # a restart appends: only what this run writes can say "ready"
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, preexec_fn=in_child, close_fds=True)
    return Started(host, proc, offset)


def start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def wait_ready(started: list[Started], timeout_s: float = BOOT_TIMEOUT_S) -> None:
    """Until every host's log says ready; a daemon that exits first is an error naming it and its log."""
    by_name = {s.host.name: s for s in started}
    offsets = {s.host.name: s.log_offset for s in started}
    waiting = set(by_name)
    deadline = time.monotonic() + timeout_s
    while waiting:
        for name in sorted(waiting):
            host, proc = by_name[name].host, by_name[name].proc
            seen, offsets[name] = _log_has(host.log, offsets[name])
            if seen:
                waiting.discard(name)
                continue
            rc = proc.poll()
            if rc is not None:
                raise ClusterError(f"host {name} ({host.role}, netns {host.netns}) exited with status {rc} before "
                                   f"it was ready; the end of {host.log}:\n{tail(host.log)}")
        if waiting and time.monotonic() > deadline:
            names = ", ".join(sorted(waiting))
            first = by_name[min(waiting)].host
            raise ClusterError(f"hosts {names} not ready after {timeout_s:.0f} s; the end of {first.log}:\n"
                               f"{tail(first.log)}")
        if waiting:
            time.sleep(0.1)


def _log_has(path: str, offset: int) -> tuple[bool, int]:
    """Whether the ready line appeared after ``offset``; the new offset (kept a line back for a split mark)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return False, offset
    if READY_MARK in data:
        return True, offset + len(data)
    keep = max(0, len(data) - len(READY_MARK))
    return False, offset + keep


def tail(path: str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def alive(host: Host) -> bool:
    """The recorded supervisor is running (same pid, same start time)."""
    return _ours(host) is not None


def _ours(host: Host) -> psutil.Process | None:
    if not host.pid:
        return None
    try:
        p = psutil.Process(host.pid)
        if abs(p.create_time() - host.pid_start) > 0.05 or p.status() == psutil.STATUS_ZOMBIE:
            return None
        return p
    except psutil.Error:
        return None


def host_pids(host: Host) -> list[int]:
    """Every process of the host: the supervisor, its workers, anything else in its namespace or cgroup."""
    pids = set(netns.netns_pids(host.netns)) | set(limits.cgroup_pids(host.cgroup) if host.cgroup else [])
    sup = _ours(host)
    if sup is not None:
        pids.add(sup.pid)
        try:
            pids.update(c.pid for c in sup.children(recursive=True))
        except psutil.Error:
            pass
    return sorted(pids)


def stop(host: Host, timeout_s: float = STOP_TIMEOUT_S) -> list[int]:
    """Stop every process of ``host``: SIGTERM, then SIGKILL after ``timeout_s``.  Returns the pids killed hard."""
    sup = _ours(host)
    if sup is not None:
        try:
            sup.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    deadline = time.monotonic() + (timeout_s if sup is not None else 0.0)
    while time.monotonic() < deadline and host_pids(host):
        _reap_children()
        time.sleep(0.1)
    hard = host_pids(host)
    for pid in hard:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and host_pids(host):
        _reap_children()
        time.sleep(0.05)
    left = host_pids(host)
    if left:
        raise ClusterError(f"host {host.name}: processes {left} survived SIGKILL for 10 s")
    if hard:
        logger.warning("host %s: killed %s after %.0f s", host.name, hard, timeout_s)
    return hard


def _reap_children() -> None:
    """Reap daemons this process started (``up`` failing half-way), so they do not linger as zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
