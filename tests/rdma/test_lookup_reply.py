"""Lookups by SEND, replies by WRITE WITH IMM into the ranker's memory, many in flight.

Two processes on the guest's rxe0: this one is the ranker, a forked peer is
the embedding server.  Up to 24 lookups in flight through 24 receive slots on
the server, 300 lookups in all: every receive is reposted a dozen times and the ranker spends and regains
its credits throughout; each reply is checked byte for byte where it landed.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.transport.rdma.channel import RankerChannel
from tests.rdma.lookups import REPLY_SLOT_BYTES, REQUEST_BYTES, drain_credits, run_lookups, serve
from tests.rdma.peers import Peer, counter

pytestmark = pytest.mark.rdma

RECV_SLOTS = 24
LOOKUPS = 300


def test_many_lookups_in_flight_each_reply_exact(endpoint, rdma_device: str) -> None:
    requests = endpoint.register(np.zeros(32 * REQUEST_BYTES, np.uint8))
    completions = endpoint.register(np.zeros(LOOKUPS * REPLY_SLOT_BYTES, np.uint8), remote_write=True)
    sent0, rcvd0 = counter(rdma_device, "sent_pkts"), counter(rdma_device, "rcvd_pkts")
    with Peer(serve, rdma_device, RECV_SLOTS) as peer:
        ch = RankerChannel(endpoint, "server-0", requests, completions, depth=32)
        server_blob = peer.recv()
        peer.send(ch.blob())
        ch.connect(server_blob)
        assert ch.credits == RECV_SLOTS  # the server's posted receives, announced in its blob
        got = run_lookups(ch, list(range(LOOKUPS)), request_slots=32)
        peer.send("stats")
        stats = peer.recv()
        peer.send("stop")
        assert peer.recv() == "bye"
    assert sorted(got) == list(range(LOOKUPS))
    assert stats["requests"] == LOOKUPS and stats["replies"] == LOOKUPS and not stats["errors"]
    # every credit comes back over the credit QP once the last replies are out
    drain_credits(ch, RECV_SLOTS)
    assert ch.credits == RECV_SLOTS
    # really verbs: RTS queue pairs on the RDMA device, packets counted by the device
    assert endpoint.device.name == rdma_device
    assert ch.qp_states() == ("RTS", "RTS")
    assert ch.remote is not None and ch.remote.qpn == stats["qpns"][0][0]
    payload = sum(got.values())
    sent = counter(rdma_device, "sent_pkts") - sent0
    assert sent >= LOOKUPS * 2 + payload // endpoint.device.mtu, (sent, payload)
    assert counter(rdma_device, "rcvd_pkts") - rcvd0 >= LOOKUPS * 2
    assert ch.bytes_sent == LOOKUPS * REQUEST_BYTES
    ch.close()
