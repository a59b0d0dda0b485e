"""Cache fills by one-sided RDMA READ of rows from the server's registered table.

The server (a forked peer) registers a [4099, 24] float32 table for remote
reads and then does nothing but wait: the rows arrive without a single
completion on its side, which is what "no server CPU" means.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.transport.rdma.channel import RankerChannel, ServerChannel
from flexemr.transport.rdma.endpoint import Endpoint
from tests.rdma.peers import Peer, counter

pytestmark = pytest.mark.rdma

ROWS, DIM = 4099, 24
ROW_BYTES = DIM * 4


def table() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32)


def ids_to_fill() -> np.ndarray:
    rng = np.random.default_rng(9)
    # runs of consecutive ids (one READ each), scattered ids, a repeat, both ends of the table
    return np.concatenate([np.arange(10, 60), [7, 7, 0], np.arange(ROWS - 40, ROWS),
                           rng.integers(0, ROWS, 200)]).astype(np.int64)


def expose_table(pipe, device: str) -> None:
    ep = Endpoint(device)
    t = ep.register(table(), remote_read=True)
    receive = ep.register(np.zeros(64, np.uint8))
    ch = ServerChannel(ep, "ranker", receive, receive, recv_slots=1, tables=(t,))
    pipe.send(ch.blob())
    ch.connect(pipe.recv())
    pipe.recv()  # the ranker finished reading
    pipe.send({"completions": len(ep.poll()), "state": ch.data.state()})
    ch.close()
    ep.close()


def test_rdma_read_of_rows_from_a_registered_table(endpoint: Endpoint, rdma_device: str) -> None:
    ids = ids_to_fill()
    dest_arr = np.zeros((ids.size + 1, DIM), np.float32)
    dest = endpoint.register(dest_arr)
    requests = endpoint.register(np.zeros(64, np.uint8))
    sent0 = counter(rdma_device, "rcvd_pkts")
    with Peer(expose_table, rdma_device) as peer:
        ch = RankerChannel(endpoint, "server-0", requests, dest, depth=16)
        blob = peer.recv()
        peer.send(ch.blob())
        ch.connect(blob)
        assert ch.table(0).length == ROWS * ROW_BYTES
        reads = ch.read_rows(0, ids, ROW_BYTES, dest, ROW_BYTES)  # row i lands in dest row i + 1
        peer.send("done")
        server = peer.recv()
    np.testing.assert_array_equal(dest_arr[1:], table()[ids])
    assert not dest_arr[0].any()
    runs = 1 + int(np.count_nonzero(np.diff(ids) != 1))
    assert reads == runs < ids.size  # consecutive ids were coalesced into one READ each
    assert ch.bytes_read == ids.size * ROW_BYTES
    assert server == {"completions": 0, "state": "RTS"}  # the server's CPU saw nothing
    # really verbs: the responses came in as device packets
    assert counter(rdma_device, "rcvd_pkts") - sent0 >= runs
    with pytest.raises(ValueError, match="ids must be in"):
        ch.read_rows(0, np.array([ROWS]), ROW_BYTES, dest)
    ch.close()
    dest.close()
