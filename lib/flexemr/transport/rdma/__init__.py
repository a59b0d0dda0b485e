"""DATA PATH: the verbs layer of the RDMA transport (pyverbs, RC queue pairs).

Self-contained building blocks the ``rdma`` transport is assembled from;
nothing here knows about frames, rings or the daemon:

- ``loader``   imports pyverbs (Debian's python3-pyverbs) -- the one place that does
- ``device``   which device / port / GID index; ``available()``; the "RDMA on ..." log line
- ``endpoint`` one verbs context + PD + CQ + completion channel per process;
  registering existing memory (numpy arrays, mmap'd shm) as memory regions
- ``blob``     the versioned connection blob exchanged in the authenticated HELLO
- ``qp``       RC queue pairs: state transitions, SEND / WRITE WITH IMM / READ / receives, errors
- ``channel``  ``RankerChannel`` / ``ServerChannel``: a data QP and a higher-priority
  credit QP per connection; lookups by SEND, replies by WRITE WITH IMM into the
  ranker's memory, cache fills by RDMA READ

Importing this package does not import pyverbs (or numpy): ``device.available()``
is the cheap question, and everything else loads pyverbs when first used.
See docs/RDMA.md.
"""

from __future__ import annotations

from flexemr.transport.rdma.blob import ConnectionBlob, ReadTable, RemoteRegion
from flexemr.transport.rdma.errors import BlobError, QueuePairError, RdmaUnavailable

__all__ = ["BlobError", "ConnectionBlob", "QueuePairError", "RdmaUnavailable", "ReadTable", "RemoteRegion"]
