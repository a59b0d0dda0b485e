"""Credit modes as strategies: how an engine gives embedding servers their response slots back.

A server sends a response only against a credit (one free response slot on
the ranker).  The engine grants ``per_connection`` credits in its HELLO and
one more each time a response has landed in the completion ring::

    mode       HELLO credits   a response landed (receiver)      sender
    --------   -------------   -------------------------------   ------------------------------------
    off        0               nothing                           sleeps up to 0.2 s when idle
    priority   per_connection  CREDIT frame on the priority      sleeps up to 0.2 s when idle
                               channel (a second socket)
    inband     per_connection  count it (grants_made)            piggybacks the count on the next
                                                                 LOOKUP it sends (header aux + the
                                                                 frame's trailer); a CREDIT frame on
                                                                 the data socket when nothing is
                                                                 sent within ~1 ms

Each counter has one writer (see connections.py), so no mode takes a lock.
"""

from __future__ import annotations

import time
from flexemr.wire import codec
from flexemr.wire.frame import FrameFlag, header_flags

from flexemrd.engine.connections import ConnState, ConnTable

MODES = ("off", "priority", "inband")


class CreditMode:
    """No flow control ("off"); the base of the other modes."""

    name = "off"
    credit_channel = False   # whether each connection gets a priority credit socket
    sender_wait_s = 0.2      # how long the sender may sleep on an empty submission ring

    def __init__(self, per_connection: int = 0) -> None:
        self.initial = 0

    def on_response(self, st: ConnState) -> None:
        """Receiver: one response slot of ``st`` is free again."""

    def before_send(self, st: ConnState, frame: memoryview) -> None:
        """Sender: ``frame`` (whole, writable: a submission-ring slot) is about to go out on ``st``."""

    def flush(self, table: ConnTable, exclude: int | None) -> None:
        """Sender, once per loop: send grants that found nothing to ride on (``exclude``: about to send)."""


class PriorityCredits(CreditMode):
    """A CREDIT frame per response on the connection's high-priority socket, from the receiver."""

    name = "priority"
    credit_channel = True

    def __init__(self, per_connection: int) -> None:
        self.initial = per_connection

    def on_response(self, st: ConnState) -> None:
        if st.credit_conn is None:
            return
        try:
            st.credit_conn.send_frame(codec.encode_credit(st.conn_id, 1, time.monotonic_ns()))
            st.granted += 1
        except OSError:
            pass  # the data socket fails too and reports the loss


class InbandCredits(CreditMode):
    """Credits ride on the next LOOKUP of the data connection (no second socket)."""

    name = "inband"
    # Grants must not sit idle for long: wake often to flush them.
    sender_wait_s = 0.001

    def __init__(self, per_connection: int) -> None:
        self.initial = per_connection

    def on_response(self, st: ConnState) -> None:
        if st.grants_made == st.grants_sent:
            st.grant_ns = time.monotonic_ns()  # the oldest grant not yet sent: its age is what the server measures
        st.grants_made += 1

    def before_send(self, st: ConnState, frame: memoryview) -> None:
        n = st.grants_made - st.grants_sent
        # Only frames encoded with the trailer can carry credits (a FETCH for a
        # cache fill has none: its grants wait for the next LOOKUP or flush()).
        if n and header_flags(frame) & FrameFlag.INBAND_CREDIT:
            st.grants_sent += n
            codec.set_inband_credit(frame, n, st.grant_ns)
            st.granted += n

    def flush(self, table: ConnTable, exclude: int | None) -> None:
        # Retiring connections too: their last answers wait for these grants.
        for cid, st in table.items() + table.retiring_items():
            n = st.grants_made - st.grants_sent
            if n and cid != exclude:
                st.grants_sent += n
                try:
                    st.conn.send_frame(codec.encode_credit(cid, n, st.grant_ns))
                    st.granted += n
                except OSError:
                    pass


def credit_mode(name: str, per_connection: int) -> CreditMode:
    """The strategy for ``[ranker].credits = name``; ValueError naming the known modes."""
    if name == "off":
        return CreditMode()
    if per_connection < 1:
        raise ValueError(f"credits_per_connection must be >= 1 with credits = {name!r}, got {per_connection}")
    if name == "priority":
        return PriorityCredits(per_connection)
    if name == "inband":
        return InbandCredits(per_connection)
    raise ValueError(f"unknown credit mode {name!r} (known: {', '.join(MODES)})")
