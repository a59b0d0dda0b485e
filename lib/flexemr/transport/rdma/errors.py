"""Errors of the verbs layer.

``QueuePairError`` is also a ``ConnectionError`` so the code that resets and
reconnects a TCP connection handles a broken queue pair the same way.
"""

from __future__ import annotations

from flexemr.errors import FlexemrError, ProtocolError


class RdmaUnavailable(FlexemrError):
    """pyverbs or a usable RDMA device is missing; the message says which."""


class BlobError(ProtocolError):
    """A connection blob is malformed; the message names the field."""


class QueuePairError(FlexemrError, ConnectionError):
    """A queue pair to ``peer`` failed (error completion or error state).

    The QP cannot be used again: the caller resets the connection and opens a
    fresh one (new QPs, new blob exchange), as it would reconnect a TCP socket.
    """

    def __init__(self, peer: str, qpn: int, what: str) -> None:
        self.peer = peer
        self.qpn = qpn
        self.what = what
        super().__init__(f"RDMA queue pair 0x{qpn:06x} to {peer} failed: {what}; reset and reconnect")
