"""DATA PATH: messages on the rings between the inference process and engines.

Every ring message starts with an 8-byte prefix ``u32 conn_id, u32 arg``; the
ring's own ``kind`` field says what follows::

    submission ring (inference -> engine)
      SUB_FRAME     prefix(conn, 0)        | a complete wire frame to send as is
      SUB_MIGRATE   prefix(conn, engine)   | hand ``conn`` to ``engine`` now, answers
                                             still in flight included (everything
                                             for ``conn`` before this marker was
                                             submitted here)
      SUB_STOP      prefix(0, 0)           | finish what is queued, then exit

    completion ring (engine -> inference)
      COMP_FRAME    prefix(conn, 0)        | 32-byte header + payload, received
                                             straight into the slot
      COMP_LOST     prefix(conn, 0)        | utf-8 reason: the connection failed
      COMP_MIGRATED prefix(conn, engine)   | the connection now lives in ``engine``
      COMP_CONNECTED prefix(conn, 0)       | the connection is (re)established and serving

Each ring has one producer thread: the inference's batcher for submissions,
the engine's receiver thread for completions (other engine threads post
COMP_LOST / COMP_MIGRATED to it: flexemrd/engine/completions.py).  The one
exception is a dead engine: its completion ring has no producer left, and
the supervisor writes COMP_LOST for its connections until it restarts.
"""

from __future__ import annotations

import struct

PREFIX = struct.Struct("<II")
PREFIX_SIZE = PREFIX.size

SUB_FRAME = 1
SUB_MIGRATE = 2
SUB_STOP = 3

COMP_FRAME = 1
COMP_LOST = 2
COMP_MIGRATED = 3
COMP_CONNECTED = 4
