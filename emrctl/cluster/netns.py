"""Network namespaces, the bridge and veth pairs, through the ``ip`` command.

Layout of cluster ``c`` (subnet 10.213.K.0/24, K chosen by ``up``):

    netns flexemr-c            bridge "br0" (no address: nothing routes anywhere)
       ├── e0 ─veth─ eth0 in netns flexemr-c-e0   10.213.K.10/24
       ├── e1 ─veth─ eth0 in netns flexemr-c-e1   10.213.K.11/24
       └── r0 ─veth─ eth0 in netns flexemr-c-r0   10.213.K.100/24

Both ends of each veth pair are created directly inside their namespaces
(``ip link add ... netns A type veth peer ... netns B``), so the root
namespace never holds a cluster link, address or route; deleting the
namespaces deletes every link with them.  ``ip netns add`` bind-mounts
/run/netns the first time; ``cleanup_netns_dir`` undoes that when the
directory is empty and was not there before.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess

from emrctl.cluster.errors import EXIT_USAGE, ClusterError

NETNS_DIR = "/run/netns"
HOST_DEV = "eth0"              # the host's end of its veth pair, inside its namespace
BRIDGE_DEV = "br0"
EMBEDDING_BASE = 10            # 10.213.K.10 + i
RANKER_BASE = 100              # 10.213.K.100 + j
MAX_HOSTS_PER_ROLE = 64


def require_tools(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        raise ClusterError(f"missing {', '.join(map(repr, missing))} (iproute2): install it to run a cluster",
                           EXIT_USAGE)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS``; a failure raises ClusterError with the command and its stderr."""
    return _run(["ip", *args], check)


def _run(cmd: list[str], check: bool) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.stdout.strip()}")
    return r


def _gone(r: subprocess.CompletedProcess) -> bool:
    """A delete that failed only because the thing is already gone."""
    msg = r.stderr.lower()
    return r.returncode == 0 or "no such" in msg or "cannot find" in msg or "does not exist" in msg


# ---------------------------------------------------------------- addresses


def embedding_address(subnet_index: int, i: int) -> str:
    return f"10.213.{subnet_index}.{EMBEDDING_BASE + i}"


def ranker_address(subnet_index: int, j: int) -> str:
    return f"10.213.{subnet_index}.{RANKER_BASE + j}"


def subnet_in_use_here(subnet_index: int) -> str:
    """A root-namespace address or route that overlaps 10.213.K.0/24 ("" if none): we never share a range."""
    net = ipaddress.ip_network(f"10.213.{subnet_index}.0/24")
    for line in ip("-4", "-o", "addr", "show").stdout.splitlines() + ip("-4", "route", "show").stdout.splitlines():
        for word in line.split():
            try:
                other = ipaddress.ip_network(word, strict=False)
            except ValueError:
                continue
            if other.version == 4 and other.prefixlen > 0 and other.overlaps(net):
                return line.strip()
    return ""


# ---------------------------------------------------------------- namespaces


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


def add_netns(name: str) -> None:
    if netns_exists(name):
        raise ClusterError(f"network namespace {name!r} already exists (left by another tool? "
                           f"`ip netns del {name}` if it is stale)")
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def del_netns(name: str) -> None:
    r = ip("netns", "del", name, check=False)
    if not _gone(r):
        raise ClusterError(f"`ip netns del {name}` failed: {r.stderr.strip()}")


def netns_pids(name: str) -> list[int]:
    """Every process whose network namespace is ``name`` (a daemon's whole tree)."""
    if not netns_exists(name):
        return []
    r = ip("netns", "pids", name, check=False)
    return [int(w) for w in r.stdout.split() if w.isdigit()]


def list_netns() -> list[str]:
    r = ip("netns", "list", check=False)
    return sorted(line.split()[0] for line in r.stdout.splitlines() if line.strip())


def netns_dir_was_there() -> bool:
    return os.path.isdir(NETNS_DIR)


def cleanup_netns_dir() -> None:
    """Unmount and remove /run/netns if it is empty (``ip netns add`` made it for us)."""
    try:
        if os.listdir(NETNS_DIR):
            return
    except FileNotFoundError:
        return
    if _is_mountpoint(NETNS_DIR):
        subprocess.run(["umount", NETNS_DIR], capture_output=True)
    try:
        os.rmdir(NETNS_DIR)
    except OSError:
        pass


def _is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == path for line in f)
    except OSError:
        return False


# ---------------------------------------------------------------- links


def add_bridge(netns: str, bridge: str = BRIDGE_DEV) -> None:
    ip("-n", netns, "link", "add", bridge, "type", "bridge")
    ip("-n", netns, "link", "set", bridge, "up")


def add_host_link(bridge_netns: str, link: str, host_netns: str, address: str, bridge: str = BRIDGE_DEV) -> None:
    """A veth pair: ``link`` on the bridge, ``eth0`` with ``address``/24 inside ``host_netns``."""
    ip("link", "add", link, "netns", bridge_netns, "type", "veth", "peer", "name", HOST_DEV, "netns", host_netns)
    ip("-n", bridge_netns, "link", "set", link, "master", bridge)
    ip("-n", bridge_netns, "link", "set", link, "up")
    ip("-n", host_netns, "addr", "add", f"{address}/24", "dev", HOST_DEV)
    ip("-n", host_netns, "link", "set", HOST_DEV, "up")


def del_link(netns: str, link: str) -> None:
    if not netns_exists(netns):
        return  # the namespace took its links with it
    r = ip("-n", netns, "link", "del", link, check=False)
    if not _gone(r):
        raise ClusterError(f"`ip -n {netns} link del {link}` failed: {r.stderr.strip()}")


def set_link(netns: str, link: str, up: bool) -> None:
    """Cut (``up=False``) or restore a host's link: its veth end on the bridge."""
    ip("-n", netns, "link", "set", link, "up" if up else "down")


def link_is_up(netns: str, link: str) -> bool | None:
    r = ip("-n", netns, "-o", "link", "show", link, check=False)
    if r.returncode != 0:
        return None
    flags = r.stdout.split("<", 1)[-1].split(">", 1)[0].split(",")
    return "UP" in flags
