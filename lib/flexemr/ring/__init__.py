"""Data path: SPSC shared-memory message rings and their doorbells.

See :mod:`flexemr.ring.layout` for the memory layout and publication order,
:mod:`flexemr.ring.ring` for the API, :mod:`flexemr.ring.lend` for lending a
message's bytes to a third process (zero-copy responses).  Nothing here logs or serialises: a full
ring is a None, not an exception.
"""

from __future__ import annotations

from flexemr.ring.layout import MAGIC, VERSION, RingError, max_message_for, slot_bytes
from flexemr.ring.ring import Doorbell, Message, Ring, RingStats, wait_any
from flexemr.ring.lend import Borrower

__all__ = [
    "Borrower",
    "MAGIC",
    "VERSION",
    "Doorbell",
    "Message",
    "Ring",
    "RingError",
    "RingStats",
    "max_message_for",
    "slot_bytes",
    "wait_any",
]
