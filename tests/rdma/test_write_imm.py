"""A multi-MB partial lands by RDMA WRITE WITH IMM at an offset of the ranker's registered memory.

The server (a forked peer) writes 3 MiB + 12 bytes of float32 partials in one
work request; the ranker's receive completes with the immediate, and the
bytes before and after the target range are untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.transport.rdma.channel import RankerChannel, Response, ServerChannel, WriteDone
from flexemr.transport.rdma.endpoint import Endpoint
from tests.rdma.peers import Peer, counter

pytestmark = pytest.mark.rdma

FLOATS = (3 << 20) // 4 + 3  # 3 MiB + 12 bytes: not a multiple of the MTU or a page
OFFSET = (1 << 20) + 64 + 4  # not page aligned either
IMM = 0x5EED_0007
SENTINEL = 0xAB


def partial() -> np.ndarray:
    return np.random.default_rng(12).standard_normal(FLOATS).astype(np.float32)


def write_partial(pipe, device: str) -> None:
    ep = Endpoint(device)
    data = ep.register(partial())  # registered where it was computed: no copy into a send buffer
    receive = ep.register(np.zeros(64, np.uint8))
    ch = ServerChannel(ep, "ranker", receive, data, recv_slots=1)
    pipe.send(ch.blob())
    ch.connect(pipe.recv())
    assert ch.reply(IMM, 0, FLOATS * 4, OFFSET, wr_id=3)
    events = []
    while not any(isinstance(e, WriteDone) for e in events):
        events += ch.wait(60)
    pipe.send({"done": [e.wr_id for e in events if isinstance(e, WriteDone)], "bytes": ch.bytes_sent})
    pipe.recv()
    ch.close()
    ep.close()


def test_write_with_imm_of_a_multi_mb_partial_at_an_offset(endpoint: Endpoint, rdma_device: str) -> None:
    region = np.full(8 << 20, SENTINEL, np.uint8)
    completions = endpoint.register(region, remote_write=True)
    requests = endpoint.register(np.zeros(64, np.uint8))
    sent0 = counter(rdma_device, "sent_pkts")
    with Peer(write_partial, rdma_device) as peer:
        ch = RankerChannel(endpoint, "server-0", requests, completions, depth=4)
        blob = peer.recv()
        peer.send(ch.blob())
        ch.connect(blob)
        events = ch.wait(120)
        report = peer.recv()
        peer.send("bye")
    assert events == [Response(IMM, FLOATS * 4)]
    assert report == {"done": [3], "bytes": FLOATS * 4}
    landed = np.frombuffer(region, np.float32, FLOATS, OFFSET)
    np.testing.assert_array_equal(landed, partial())
    assert (region[:OFFSET] == SENTINEL).all() and (region[OFFSET + FLOATS * 4:] == SENTINEL).all()
    # really verbs: the device carried the payload in MTU-sized packets
    assert counter(rdma_device, "sent_pkts") - sent0 >= FLOATS * 4 // endpoint.device.mtu
    assert endpoint.device.name == rdma_device and ch.data.state() == "RTS"
    ch.close()
    completions.close()
