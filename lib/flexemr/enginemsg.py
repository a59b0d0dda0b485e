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
      SUB_OPEN      prefix(conn, 0)        | migration by reopening: open your own connection
                                             for ``conn`` (HELLO, auth, credits), answer COMP_OPENED
      SUB_RETIRE    prefix(conn, engine)   | migration by reopening: nothing more comes for
                                             ``conn`` here (``engine`` has it now); wait for its
                                             answers in flight, close it, answer COMP_MIGRATED

    completion ring (engine -> inference)
      COMP_FRAME    prefix(conn, 0)        | 32-byte header + payload, received
                                             straight into the slot
      COMP_LOST     prefix(conn, 0)        | utf-8 reason: the connection failed
      COMP_MIGRATED prefix(conn, engine)   | the connection now lives in ``engine``
      COMP_CONNECTED prefix(conn, 0)       | the connection is (re)established and serving
      COMP_OPENED   prefix(conn, engine)   | ``engine``'s own connection for ``conn`` is ready
                                             (SUB_OPEN): route ``conn`` there from now on
      COMP_OPEN_FAILED prefix(conn, engine) | utf-8 reason: SUB_OPEN gave up; ``conn`` stays where it is
      COMP_REF      prefix(conn, 0)        | 32-byte header + REF(ino, seq, pos) + ring name (ascii):
                                             the payload was not copied; it is lend ``seq`` at
                                             stream position ``pos`` of shm ring ``name``
                                             (inode ``ino``), header.payload_len bytes.  The
                                             inference reads it there and gives the lend back
                                             (flexemr.ring.lend); see flexemrd/inference/landing.py

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
REF = struct.Struct("<QQQ")   # ino, lend seq, stream position
REF_SIZE = REF.size
# Payloads at least this large travel as COMP_REF where the transport can lend
# them (shm): below it, copying the bytes costs less than the reference's
# bookkeeping on both sides.
REF_MIN_PAYLOAD = 4096

SUB_FRAME = 1
SUB_MIGRATE = 2
SUB_STOP = 3
SUB_OPEN = 4
SUB_RETIRE = 5

COMP_FRAME = 1
COMP_LOST = 2
COMP_MIGRATED = 3
COMP_CONNECTED = 4
COMP_OPENED = 5
COMP_OPEN_FAILED = 6
COMP_REF = 7
