"""DATA PATH: transports between ranker engines and embedding servers.

One interface for both ends (base.py: ``Transport``, ``Listener``,
``Connection``), chosen at start-up from what the host has
(``select_transport`` in registry.py): TCP everywhere (tcp.py), RDMA where
pyverbs finds a device (verbs.py).
"""

from flexemr.transport.base import Connection, Listener, Transport
from flexemr.transport.registry import select_transport

__all__ = ["Connection", "Listener", "Transport", "select_transport"]
