"""Making a host stand for a smaller machine: CPU quotas (cgroup v1) and link rates (tc).

CPU: one cgroup per host under the v1 cpu controller,
``/sys/fs/cgroup/cpu/flexemr/<cluster>/<host>``, with
``cpu.cfs_quota_us = cores * cpu.cfs_period_us`` (-1: no quota).  Every host
gets a cgroup, quota or not: its ``cgroup.procs`` is how ``down`` finds
every process of a host even when ``up`` died before recording a pid.
``cpu.stat`` (nr_periods, nr_throttled, throttled_time) says whether the
quota is what limits a host.

Rate: a ``tc`` token bucket (tbf) on both ends of a host's veth pair, so
the host's egress and ingress are both limited.  This kernel has no netem
(delay, loss); tbf is in every kernel.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from emrctl.cluster.errors import EXIT_USAGE, ClusterError

CPU_ROOT = Path(os.environ.get("FLEXEMR_CGROUP_CPU_ROOT") or "/sys/fs/cgroup/cpu")
TOP = "flexemr"
PERIOD_US = 100_000
MIN_QUOTA_US = 1_000   # the kernel refuses quotas under 1 ms


def check_quota(cores: float | None, option: str = "--cpu-quota") -> None:
    if cores is None:
        return
    if not cores > 0:
        raise ClusterError(f"{option}: must be > 0 cores, got {cores:g}", EXIT_USAGE)
    if cores * PERIOD_US < MIN_QUOTA_US:
        raise ClusterError(f"{option}: {cores:g} cores is under the kernel's minimum of "
                           f"{MIN_QUOTA_US / PERIOD_US:g} cores", EXIT_USAGE)
    ncpu = os.cpu_count() or 1
    if cores > ncpu:
        raise ClusterError(f"{option}: {cores:g} cores per host is more than this machine's {ncpu}", EXIT_USAGE)


def require_cpu_controller() -> None:
    if not (CPU_ROOT / "cpu.cfs_quota_us").is_file():
        raise ClusterError(f"no cgroup v1 cpu controller at {CPU_ROOT} (cpu.cfs_quota_us missing): "
                           f"CPU quotas and process tracking need it", EXIT_USAGE)


def cgroup_path(cluster: str, host: str | None = None) -> Path:
    p = CPU_ROOT / TOP / cluster
    return p / host if host else p


def make_cgroup(path: Path, cores: float | None) -> None:
    """Create ``path`` (its parent must exist) and set its quota; -1 means unlimited."""
    path.mkdir(exist_ok=True)
    if cores is None:
        return
    (path / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (path / "cpu.cfs_quota_us").write_text(str(int(round(cores * PERIOD_US))))


def join_cgroup(path: str) -> None:
    """Move the calling process into ``path`` (used between fork and exec)."""
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))


def cgroup_pids(path: str) -> list[int]:
    try:
        return [int(x) for x in Path(path, "cgroup.procs").read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def remove_cgroup(path: str) -> None:
    """rmdir (a cgroup directory is removed empty, its control files with it).

    A shared parent still holding another cluster's cgroup stays (EBUSY or
    ENOTEMPTY): it is removed by the last cluster to go.
    """
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if Path(path).name in (TOP,) or _has_children(path):
            return
        raise ClusterError(f"cannot remove cgroup {path}: {e.strerror} (processes left: {cgroup_pids(path)})") from None


def _has_children(path: str) -> bool:
    try:
        return any(p.is_dir() for p in Path(path).iterdir())
    except OSError:
        return False


def cpu_stat(path: str) -> dict[str, int]:
    """``cpu.stat`` of a cgroup: nr_periods, nr_throttled, throttled_time (ns)."""
    out: dict[str, int] = {}
    try:
        for line in Path(path, "cpu.stat").read_text().splitlines():
            k, _, v = line.partition(" ")
            if v.strip().isdigit():
                out[k] = int(v)
    except OSError:
        pass
    return out


def quota_cores(path: str) -> float | None:
    try:
        q = int(Path(path, "cpu.cfs_quota_us").read_text())
        p = int(Path(path, "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if q < 0 else q / p


# ---------------------------------------------------------------- link rates


def check_rate(gbit: float | None) -> None:
    if gbit is not None and not (0 < gbit <= 400):
        raise ClusterError(f"--rate-gbit: must be in (0, 400] Gbit/s, got {gbit:g}", EXIT_USAGE)


def add_rate_limit(netns: str, dev: str, gbit: float) -> None:
    """A tbf root qdisc on ``dev``: ``gbit`` Gbit/s with a burst of ~4 ms (at least one 64 KiB GSO packet)."""
    rate_bytes = gbit * 1e9 / 8
    burst = max(256 << 10, int(rate_bytes * 0.004))
    cmd = ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{int(gbit * 1000)}mbit",
           "burst", str(burst), "latency", "50ms"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {r.stderr.strip()}")


def remove_rate_limit(netns: str, dev: str) -> None:
    if not os.path.exists(os.path.join("/run/netns", netns)):
        return  # gone with its namespace
    subprocess.run(["tc", "-n", netns, "qdisc", "del", "dev", dev, "root"], capture_output=True)


def rate_limit_of(netns: str, dev: str) -> str:
    r = subprocess.run(["tc", "-n", netns, "qdisc", "show", "dev", dev], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if " tbf " in f" {line} ":
            words = line.split()
            if "rate" in words:
                return words[words.index("rate") + 1]
    return ""
