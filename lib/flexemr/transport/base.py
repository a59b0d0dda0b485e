"""The transport interface that engines program against.

A ``Connection`` carries whole frames to one embedding server.  Buffer
management and message layout live above it (the engine receives payloads
straight into shared-memory ring slots through ``recv_payload_into``), so an
RDMA implementation only has to move bytes: one queue pair per connection,
one thread domain + parent domain per engine so QPs of different engines
never share a UAR (FlexEMR 3.2).  ``detach``/``Transport.adopt`` move a live
connection to another engine process (TCP: the socket itself over
SCM_RIGHTS; RDMA: re-associating the QP with the new engine's domain).
"""

from __future__ import annotations

import abc
import logging

from flexemr.wire.frame import Header

logger = logging.getLogger(__name__)


class Connection(abc.ABC):
    conn_id: int
    server: int
    address: str

    @abc.abstractmethod
    def send_frame(self, buffers: list) -> int:
        """Send one frame given as a buffer list; returns bytes sent."""

    @abc.abstractmethod
    def recv_header(self) -> Header:
        """Block until the next frame header (ConnectionError on EOF)."""

    @abc.abstractmethod
    def recv_payload_into(self, header: Header, view: memoryview) -> None:
        """Receive the payload of ``header`` into ``view`` (no intermediate copy)."""

    @abc.abstractmethod
    def recv_payload(self, header: Header) -> memoryview:
        """Receive a payload into the connection's own reusable buffer."""

    @abc.abstractmethod
    def fileno(self) -> int:
        """A pollable descriptor that is readable when a frame is arriving."""

    @abc.abstractmethod
    def detach(self) -> int:
        """Give up the connection for migration; returns the handle to pass on."""

    @abc.abstractmethod
    def close(self) -> None: ...


class Transport(abc.ABC):
    name: str

    @abc.abstractmethod
    def connect(self, address: str, conn_id: int, server: int, priority: bool = False) -> Connection:
        """Open a connection; ``priority`` marks the credit channel."""

    @abc.abstractmethod
    def adopt(self, handle: int, conn_id: int, server: int, address: str) -> Connection:
        """Take over a connection detached by another engine."""


def select_transport(preference: str = "auto") -> Transport:
    """Pick the transport for this host and log which one and why."""
    from flexemr.transport.tcp import TcpTransport
    from flexemr.transport import verbs

    if preference == "tcp":
        logger.info("transport: tcp (configured)")
        return TcpTransport()
    devices, why = verbs.probe_devices()
    if preference == "rdma":
        if not devices:
            raise RuntimeError(f"transport 'rdma' configured but unusable: {why}")
        return verbs.RdmaTransport(devices[0])
    if devices and verbs.IMPLEMENTED:
        logger.info("transport: rdma on %s", devices[0])
        return verbs.RdmaTransport(devices[0])
    logger.info("transport: tcp (%s)", why)
    return TcpTransport()
