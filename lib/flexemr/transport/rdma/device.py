"""Which RDMA device, port and GID index this process uses, and whether there is one.

``available()`` answers "can this host do verbs at all" without logging;
``open_device`` opens a verbs context on the chosen device and logs the one
line an operator looks for ("RDMA on rxe0 port 1 gid 1 ...").

GID choice: RoCE needs a GID table entry whose type and address both sides
can route.  RoCE v2 with an IPv4-mapped address (::ffff:a.b.c.d) is routable
over any IPv4 network and is what rdma_cm would pick, so it comes first; then
other RoCE v2 entries (IPv6), then link-local ones, then RoCE v1 / InfiniBand.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flexemr.transport.rdma.blob import gid_bytes
from flexemr.transport.rdma.errors import RdmaUnavailable
from flexemr.transport.rdma.loader import load_pyverbs

logger = logging.getLogger(__name__)

# GID table entries scanned per port: real NICs list a handful (one per IP
# address and RoCE version); scanning the whole 1024-entry table of rxe would
# cost a sysfs read each.
GID_SCAN_LIMIT = 32
_IPV4_MAPPED = bytes(10) + b"\xff\xff"
_LINK_LOCAL = b"\xfe\x80"


@dataclass(frozen=True, slots=True)
class DeviceChoice:
    """Where this process's verbs traffic leaves the host."""

    name: str
    port: int
    gid_index: int
    gid: bytes
    gid_type: str  # "RoCE v2", "RoCE v1/IB"
    mtu: int  # active path MTU of the port, bytes
    link_layer: str  # "Ethernet" or "InfiniBand"


def device_names() -> list[str]:
    """Names of the RDMA devices on this host ([] when there are none).

    Raises RdmaUnavailable when pyverbs itself is missing.
    """
    pv = load_pyverbs()
    try:
        devs = pv.device.get_device_list()
    except pv.pyverbs_error.PyverbsError:  # rdma-core raises when the kernel has no device at all
        return []
    return [d.name.decode() if isinstance(d.name, bytes) else str(d.name) for d in devs]


def probe() -> tuple[list[str], str]:
    """Device names, and a sentence saying why the list is empty (for the transport choice log)."""
    try:
        names = device_names()
    except RdmaUnavailable as e:
        return [], str(e)
    return names, "" if names else "no RDMA device (the kernel lists none under /sys/class/infiniband)"


def available() -> bool:
    """True when pyverbs loads and at least one RDMA device exists."""
    return bool(probe()[0])


def open_device(name: str | None = None, port: int | None = None,
                gid_index: int | None = None) -> tuple[Any, DeviceChoice]:
    """Open a verbs context on ``name`` (default: the first device with an active port).

    Returns the pyverbs ``Context`` and what was chosen; logs the choice.
    ``port`` / ``gid_index`` force a port or GID table entry (checked).
    """
    pv = load_pyverbs()
    names = device_names()
    if not names:
        raise RdmaUnavailable("no RDMA device on this host")
    if name is not None and name not in names:
        raise RdmaUnavailable(f"RDMA device {name!r} not found (devices: {', '.join(names)})")
    problems = []
    for candidate in [name] if name is not None else names:
        ctx = pv.device.Context(name=candidate)
        try:
            choice = describe(ctx, candidate, port, gid_index)
        except RdmaUnavailable as e:
            problems.append(str(e))
            ctx.close()
            continue
        logger.info("RDMA on %s port %d gid %d (%s, %s, mtu %d)", choice.name, choice.port, choice.gid_index,
                    choice.gid_type, choice.link_layer, choice.mtu)
        return ctx, choice
    raise RdmaUnavailable("no usable RDMA port: " + "; ".join(problems))


def describe(ctx: Any, name: str, port: int | None = None, gid_index: int | None = None) -> DeviceChoice:
    """Pick port and GID index on an open context (see the module docstring for the order)."""
    pv = load_pyverbs()
    e = pv.enums
    nports = ctx.query_device().phys_port_cnt
    ports = [port] if port is not None else list(range(1, nports + 1))
    best: tuple[int, DeviceChoice] | None = None
    for p in ports:
        if not 1 <= p <= nports:
            raise RdmaUnavailable(f"{name}: port {p} does not exist (ports 1..{nports})")
        attr = ctx.query_port(p)
        if attr.state != e.IBV_PORT_ACTIVE:
            if port is not None:
                raise RdmaUnavailable(f"{name}: port {p} is not active (state {attr.state})")
            continue
        link = "InfiniBand" if attr.link_layer == e.IBV_LINK_LAYER_INFINIBAND else "Ethernet"
        mtu = 128 << int(attr.active_mtu)
        indexes = [gid_index] if gid_index is not None else range(min(attr.gid_tbl_len, GID_SCAN_LIMIT))
        for i in indexes:
            try:
                raw = gid_bytes(ctx.query_gid(p, i).gid)
                v2 = ctx.query_gid_type(p, i) == e.IBV_GID_TYPE_SYSFS_ROCE_V2
            except Exception:  # an empty or unreadable entry: pyverbs raises for some providers
                if gid_index is not None:
                    raise RdmaUnavailable(f"{name}: port {p} has no GID at index {i}") from None
                continue
            if raw == bytes(16):
                if gid_index is not None:
                    raise RdmaUnavailable(f"{name}: port {p} GID index {i} is empty")
                continue
            rank = _gid_rank(raw, v2)
            choice = DeviceChoice(name, p, i, raw, "RoCE v2" if v2 else "RoCE v1/IB", mtu, link)
            if best is None or rank < best[0]:
                best = (rank, choice)
    if best is None:
        raise RdmaUnavailable(f"{name}: no active port with a GID")
    return best[1]


def _gid_rank(raw: bytes, v2: bool) -> int:
    if not v2:
        return 3
    if raw.startswith(_IPV4_MAPPED):
        return 0
    return 2 if raw.startswith(_LINK_LOCAL) else 1
