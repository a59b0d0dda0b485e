"""Which transport this process uses: ``select_transport`` picks it at start-up and logs why.

Kept apart from base.py so that the interface imports no implementation and
the implementations import only the interface (no import loop).

The result is a :class:`RoutedTransport`: each connection goes over shm when
its address is a shm address (``shm:flexemr.<instance>.shm.sNN``, a server on
this host) and the preference allows it, over the network transport (tcp, or
rdma where it exists) otherwise, and the choice is logged per connection.
"""

from __future__ import annotations

import logging
import socket

from flexemr.transport import verbs
from flexemr.transport.base import Connection, Listener, Transport
from flexemr.transport.shm import ShmTransport, is_shm_address
from flexemr.transport.tcp import TcpTransport
from flexemr.wire.frame import DEFAULT_MAX_PAYLOAD

logger = logging.getLogger(__name__)

__all__ = ["MIGRATION_MODES", "PREFERENCES", "RoutedTransport", "listener_from_socket", "migrates_by_reopening",
           "select_transport", "server_stats"]

PREFERENCES = ("auto", "tcp", "shm", "rdma")
MIGRATION_MODES = ("auto", "handoff", "reopen")


class RoutedTransport(Transport):
    """Sends each address to the transport it needs; refuses (naming both) what the preference forbids."""

    def __init__(self, preference: str, shm: Transport | None, net: Transport | None) -> None:
        self.preference = preference
        self.shm = shm
        self.net = net
        self.name = "+".join(t.name for t in (shm, net) if t is not None)

    def for_address(self, address: str) -> Transport:
        """The transport that connections to ``address`` use (ValueError if the preference rules it out)."""
        t = self.shm if is_shm_address(address) else self.net
        if t is None:
            kind = "a shm address" if is_shm_address(address) else "not a shm address"
            raise ValueError(f"server address {address!r} is {kind}, but [ranker].transport = {self.preference!r}")
        return t

    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        t = self.for_address(address)
        conn = t.connect(address, conn_id, server, priority)
        logger.info("connection %d%s to server %d (%s): transport %s", conn_id, " (credits)" if priority else "",
                    server, address, t.name)
        return conn

    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        t = self.for_address(address)
        conn = t.adopt(handle, conn_id, server, address)
        logger.info("connection %d to server %d (%s): adopted, transport %s", conn_id, server, address, t.name)
        return conn

    def listen(self, address: str) -> Listener:
        return self.for_address(address).listen(address)


def migrates_by_reopening(migration: str, preference: str, address: str) -> bool:
    """Whether the ranker moves its connection to ``address`` between engines by reopening it.

    ``migration`` is ``[ranker].migration``: "handoff" passes the live
    connection (its descriptors) to the new engine, "reopen" has the new engine
    open its own and the old one drain and close, "auto" hands off where the
    transport can (TCP, shm) and reopens where it cannot (RDMA).  Decided from
    the settings alone, without opening a device, so the inference process and
    the engines agree on it.
    """
    if migration not in MIGRATION_MODES:
        raise ValueError(f"unknown migration mode {migration!r} (known: {', '.join(MIGRATION_MODES)})")
    if migration != "auto":
        return migration == "reopen"
    if is_shm_address(address) and preference in ("auto", "shm"):
        return not ShmTransport.MIGRATES
    # "auto" keeps TCP on a host with an RDMA device (see _network): only "rdma" means verbs.
    return not (verbs.RdmaTransport.MIGRATES if preference == "rdma" else TcpTransport.MIGRATES)


def _network(preference: str) -> Transport:
    if preference == "tcp":
        return TcpTransport()
    if preference not in ("auto", "rdma"):
        raise ValueError(f"transport {preference!r}: expected \"auto\", \"tcp\" or \"rdma\"")
    devices, why = verbs.probe_devices()
    if preference == "rdma":
        if not devices:
            raise RuntimeError(f"transport 'rdma' configured but unusable: {why}")
        logger.info("transport: rdma on %s (configured)", devices[0])
        return verbs.RdmaTransport(devices[0])
    if devices:
        # "auto" keeps TCP: transport = "rdma" opts in (its connections migrate by reopening,
        # migrates_by_reopening), and the inference process decides that without probing a device.
        logger.info("network transport: tcp (RDMA device %s present; auto keeps TCP: set transport = \"rdma\" "
                    "to use it)", devices[0])
        return TcpTransport()
    logger.info("network transport: tcp (%s)", why)
    return TcpTransport()


def select_transport(preference: str = "auto") -> RoutedTransport:
    """The transport for ``[ranker].transport = preference`` ("auto", "tcp", "shm" or "rdma"), logged.

    "auto": shm for shm addresses, rdma or tcp for the others; "shm": shm
    only (a host:port server is a configuration error, not a silent TCP
    fallback); "tcp" and "rdma": that network transport only.
    """
    if preference not in PREFERENCES:
        raise ValueError(f"unknown transport {preference!r} (known: {', '.join(PREFERENCES)})")
    shm = ShmTransport() if preference in ("auto", "shm") else None
    net = None if preference == "shm" else _network(preference)
    routed = RoutedTransport(preference, shm, net)
    logger.info("transport: %s (configured %r)", routed.name, preference)
    return routed


def listener_from_socket(sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD) -> Listener:
    """Wrap a listening socket the supervisor opened: a unix one is a shm listener, an inet one TCP."""
    if sock.family == socket.AF_UNIX:
        return ShmTransport(max_payload=max_payload).listener_from_socket(sock)
    return TcpTransport(max_payload=max_payload).listener_from_socket(sock)


def server_stats(address: str, secret: bytes | None = None) -> dict[str, int]:
    """An embedding server's own counters (one STATS frame), over whichever transport ``address`` needs.

    For tools and tests: a shm server has no TCP port to send STATS to.  A
    server with a secret answers only after the HELLO/AUTH exchange.
    """
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.handshake import client_hello

    conn = select_transport("auto").connect(address, 0, -1)
    try:
        if secret is not None:
            client_hello(conn.send_frame, lambda: _read_frame(conn), f"embedding server at {address}",
                         codec.ROLE_CLIENT, "stats", secret=secret)
        conn.send_frame([pack_header(FrameType.STATS, 1, 0)])
        h = conn.recv_header()
        return codec.decode_stats(conn.recv_payload(h))
    finally:
        conn.close()


def _read_frame(conn):
    h = conn.recv_header()
    return h, conn.recv_payload(h)
