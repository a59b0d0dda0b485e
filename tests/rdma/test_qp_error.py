"""A queue pair in the error state is detected, named, and a fresh one reconnects.

Both directions: the ranker's own QP forced to ERR (its posted receives are
flushed at once) and the server's QP forced to ERR (the ranker's next SEND is
never acknowledged and fails after its retries).  Either way the ranker gets a
QueuePairError naming the server, closes the channel, opens a new one with
new QPs, exchanges blobs again, and lookups are exact again.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from flexemr.transport.rdma.channel import RankerChannel
from flexemr.transport.rdma.endpoint import Endpoint
from flexemr.transport.rdma.errors import QueuePairError
from tests.rdma.lookups import REPLY_SLOT_BYTES, REQUEST_BYTES, run_lookups, serve
from tests.rdma.peers import Peer

pytestmark = pytest.mark.rdma

PEER = "server-7"


def connect(endpoint: Endpoint, peer: Peer, requests, completions) -> RankerChannel:
    ch = RankerChannel(endpoint, PEER, requests, completions, depth=8)
    blob = peer.recv()
    peer.send(ch.blob())
    ch.connect(blob)
    return ch


def wait_for_failure(ch: RankerChannel, timeout_s: float) -> QueuePairError:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ch.wait(0.5)
        except QueuePairError as err:
            return err
    raise AssertionError(f"no QueuePairError within {timeout_s} s; QP states {ch.qp_states()}")


@pytest.fixture
def memory(endpoint: Endpoint):
    requests = endpoint.register(np.zeros(8 * REQUEST_BYTES, np.uint8))
    completions = endpoint.register(np.zeros(40 * REPLY_SLOT_BYTES, np.uint8), remote_write=True)
    yield requests, completions
    requests.close()
    completions.close()


def reconnect_and_check(endpoint: Endpoint, peer: Peer, old: RankerChannel, requests, completions) -> None:
    old.close()
    peer.send("reconnect")
    assert peer.recv() == "bye"
    fresh = connect(endpoint, peer, requests, completions)
    assert fresh.data.qpn != old.data.qpn and fresh.qp_states() == ("RTS", "RTS")
    assert sorted(run_lookups(fresh, list(range(20, 40)), request_slots=8)) == list(range(20, 40))
    peer.send("stats")
    stats = peer.recv()
    assert stats["sessions"] == 2 and stats["qpns"][1][0] == fresh.remote.qpn
    peer.send("stop")
    peer.recv()
    fresh.close()


def test_local_qp_forced_to_error_is_reported_and_replaced(endpoint: Endpoint, rdma_device: str, memory) -> None:
    requests, completions = memory
    with Peer(serve, rdma_device, 4) as peer:
        ch = connect(endpoint, peer, requests, completions)
        assert sorted(run_lookups(ch, list(range(10)), request_slots=8)) == list(range(10))
        ch.data.to_error()
        err = wait_for_failure(ch, 30)
        assert err.peer == PEER and err.qpn == ch.data.qpn
        assert PEER in str(err) and "IBV_WC_WR_FLUSH_ERR" in str(err) and "reconnect" in str(err)
        assert ch.data.state() == "ERR"
        assert isinstance(err, ConnectionError)  # the TCP path's reconnect logic catches it too
        with pytest.raises(QueuePairError, match=PEER):
            ch.send_lookup(99, 0, REQUEST_BYTES)
        reconnect_and_check(endpoint, peer, ch, requests, completions)


def test_peer_qp_in_error_state_fails_the_senders_request(endpoint: Endpoint, rdma_device: str, memory) -> None:
    requests, completions = memory
    with Peer(serve, rdma_device, 4) as peer:
        ch = connect(endpoint, peer, requests, completions)
        assert sorted(run_lookups(ch, list(range(10)), request_slots=8)) == list(range(10))
        peer.send("force_error")
        assert peer.recv() == ("ERR", "ERR")
        np.frombuffer(requests.array, np.int64)[:4] = (10, 10 * REPLY_SLOT_BYTES, 5, 100)
        assert ch.send_lookup(10, 0, REQUEST_BYTES)
        t0 = time.monotonic()
        err = wait_for_failure(ch, 60)
        took = time.monotonic() - t0
        assert err.peer == PEER and PEER in str(err)
        assert "RETRY_EXC_ERR" in str(err), str(err)  # never acknowledged: retries ran out
        assert took < 30, took
        reconnect_and_check(endpoint, peer, ch, requests, completions)
