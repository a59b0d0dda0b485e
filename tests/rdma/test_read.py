"""Cache fills by one-sided RDMA READ of rows from the server's registered table.

The server (a forked peer) maps a [4099, 24] float32 table from its .npy,
registers it for remote reads and then does nothing but wait: the rows arrive without a single
completion on its side, which is what "no server CPU" means.
"""

from __future__ import annotations

import logging
import os
import uuid

import numpy as np
import pytest

from flexemr.transport.rdma.channel import RankerChannel, ServerChannel
from flexemr.transport.rdma.endpoint import Endpoint, map_table
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


def expose_table(pipe, device: str, path: str) -> None:
    ep = Endpoint(device)
    t = ep.register_for_reads(map_table(path), "t0")  # mapped from its .npy as the server keeps tables
    assert t is not None
    receive = ep.register(np.zeros(64, np.uint8))
    ch = ServerChannel(ep, "ranker", receive, receive, recv_slots=1, tables=(t,))
    pipe.send(ch.blob())
    ch.connect(pipe.recv())
    pipe.recv()  # the ranker finished reading
    pipe.send({"completions": len(ep.poll()), "state": ch.data.state()})
    ch.close()
    ep.close()


@pytest.fixture
def table_file() -> str:
    path = f"/dev/shm/flexemr-rdma-t0-{uuid.uuid4().hex[:8]}.npy"
    np.save(path, table())
    yield path
    os.unlink(path)


def test_rdma_read_of_rows_from_a_registered_table(endpoint: Endpoint, rdma_device: str, table_file: str) -> None:
    ids = ids_to_fill()
    dest_arr = np.zeros((ids.size + 1, DIM), np.float32)
    dest = endpoint.register(dest_arr)
    requests = endpoint.register(np.zeros(64, np.uint8))
    sent0 = counter(rdma_device, "rcvd_pkts")
    with Peer(expose_table, rdma_device, table_file) as peer:
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


def test_table_registration_says_how_cache_fills_will_go(endpoint: Endpoint, table_file: str, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="flexemr.transport.rdma.endpoint"):
        private = endpoint.register_for_reads(map_table(table_file), "t0")
        shared = endpoint.register_for_reads(np.load(table_file, mmap_mode="r"), "t0-shared")
    assert private is not None and private.length == ROWS * ROW_BYTES
    assert "cache fills of t0: RDMA READ" in caplog.text
    # a shared read-only mapping: soft-RoCE on Debian's 6.1 kernel refuses it; either way the log says which
    if shared is None:
        assert "cache fills of t0-shared: FETCH frames (RDMA READ unavailable:" in caplog.text
    else:
        assert "cache fills of t0-shared: RDMA READ" in caplog.text
        shared.close()
    private.close()
