"""DATA PATH: transports between ranker engines and embedding servers.

One interface (base.py), chosen at start-up from what the host has
(``select_transport``): TCP everywhere (tcp.py), RDMA where pyverbs finds a
device (verbs.py).
"""

from flexemr.transport.base import Connection, Transport, select_transport

__all__ = ["Connection", "Transport", "select_transport"]
