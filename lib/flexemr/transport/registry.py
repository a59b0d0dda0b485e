"""Which transport this host uses: ``select_transport`` picks it at start-up and logs why.

Kept apart from base.py so that the interface imports no implementation and
the implementations import only the interface (no import loop).
"""

from __future__ import annotations

import logging

from flexemr.transport import verbs
from flexemr.transport.base import Transport
from flexemr.transport.tcp import TcpTransport

logger = logging.getLogger(__name__)

__all__ = ["select_transport"]


def select_transport(preference: str = "auto") -> Transport:
    """Pick the transport for this host ("auto", "tcp" or "rdma") and log which one and why."""
    if preference == "tcp":
        logger.info("transport: tcp (configured)")
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
        logger.info("transport: rdma on %s (auto: an RDMA device is present)", devices[0])
        return verbs.RdmaTransport(devices[0])
    logger.info("transport: tcp (%s)", why)
    return TcpTransport()
