"""RDMA responses land where the ranker reads them: no copy on the engine (rdma/landing.py, blob v3).

The forked peer is the echo server of test_frame_stream (an embedding
server's event loop: ``upgrade_server_connection``, ``send_nowait``).  This
process is the engine with ``land_responses_in_shm``: its data stream
receives into a shm ``Ring`` segment, and every echoed payload of 4 KiB or
more must come back through ``lend_payload`` (a ``Lent``: the copying path
returns None and fails the test) and read through a ``Borrower`` of that
segment, exactly as the inference process does, byte for byte.  Then a
ranker that stops giving space back (more answers in flight than the
landing holds): the server waits, nothing is lost; giving back lets it go
on.  And after close: the segment stays while a lend is out, then nothing
is left in /dev/shm.  A server that does not place its writes (an old peer)
makes the engine copy, and says so.
"""

from __future__ import annotations

import os
import time
import uuid

import numpy as np
import pytest

from flexemr import naming
from tests.rdma.peers import Peer
from tests.rdma.test_frame_stream import _hello, echo_server

pytestmark = pytest.mark.rdma

SIZES = [4096, 31, 65537, 200_000, 1 << 20, 0, 3 << 20, 5000]


def _engine_conn(rdma_device: str, address: str, instance: str):
    from flexemr.transport import verbs
    from flexemr.transport.rdma.landing import landing_prefix
    from flexemr.transport.verbs import RdmaTransport

    verbs.land_responses_in_shm(landing_prefix(instance, 0))
    conn = RdmaTransport(rdma_device).connect(address, 1, 0)
    _hello(conn)
    return conn


def test_large_answers_are_read_in_place_never_copied_and_space_comes_back(rdma_device: str) -> None:
    from flexemr.ring import Borrower
    from flexemr.wire.frame import FrameType, pack_header

    instance = f"rl{uuid.uuid4().hex[:8]}"
    rng = np.random.default_rng(7)
    try:
        with Peer(echo_server, 0, False) as peer:
            conn = _engine_conn(rdma_device, peer.recv(), instance)
            stream = conn.stream
            assert conn.transport_name == "rdma" and stream.lands_in_place, "the server must place its writes"
            name = stream.landing.name
            assert os.path.exists(naming.SHM_DIR + name)
            borrower = Borrower.attach(name)

            def round_trip(payloads: list[np.ndarray], give_back: bool) -> list:
                for i, p in enumerate(payloads):
                    conn.send_frame([pack_header(FrameType.LOOKUP, i, p.nbytes, aux=i), p])
                held = []
                for i, p in enumerate(payloads):
                    h = conn.recv_header()
                    assert (h.request_id, h.payload_len) == (i, p.nbytes)
                    if p.nbytes < 4096:
                        out = np.empty(p.nbytes, np.uint8)
                        conn.recv_payload_into(h, memoryview(out))
                        np.testing.assert_array_equal(out, p)
                        continue
                    lent = conn.lend_payload(h)
                    assert lent is not None, f"a {p.nbytes}-byte answer was not lent: the copying path"
                    assert (lent.ring, lent.ino) == (name, borrower.ino)
                    view = borrower.view(lent.seq, lent.pos, lent.nbytes)
                    np.testing.assert_array_equal(np.frombuffer(view, np.uint8), p)
                    held.append(lent)
                    if give_back:
                        borrower.give_back(lent.seq, lent.pos + lent.nbytes)
                        borrower.flush()
                return held

            payloads = [rng.integers(0, 256, n, dtype=np.uint8) for n in SIZES]
            round_trip(payloads, give_back=True)
            large = sum(n for n in SIZES if n >= 4096)
            assert stream.bytes_lent == large

            # A ranker that holds on to its answers: 12 MiB sent back against an 8 MiB landing.
            big = [rng.integers(0, 256, 1 << 20, dtype=np.uint8) for _ in range(12)]
            base = stream._rx_head
            for i, p in enumerate(big):
                conn.send_frame([pack_header(FrameType.LOOKUP, i, p.nbytes, aux=i), p])

            def take_one() -> object:
                h = conn.recv_header()
                lent = conn.lend_payload(h)
                assert lent is not None, "a 1 MiB answer was not lent: the copying path"
                np.testing.assert_array_equal(
                    np.frombuffer(borrower.view(lent.seq, lent.pos, lent.nbytes), np.uint8), big[h.request_id])
                return lent

            held = [take_one() for _ in range(5)]   # these fit whatever the chunking: 5 MiB of 8
            time.sleep(2.0)
            conn.ready_to_read()                    # polls what landed meanwhile
            landed = stream._rx_head - base
            assert landed < 12 << 20, "every answer landed although the ranker gave no space back"
            assert stream._rx_head - stream.landing.reclaim() <= stream.landing.capacity, "written past the grants"
            # Give them back out of order (as two completion rings may): the server goes on.
            for lent in reversed(held):
                borrower.give_back(lent.seq, lent.pos + lent.nbytes)
            borrower.flush()
            while len(held) < len(big):
                lent = take_one()
                borrower.give_back(lent.seq, lent.pos + lent.nbytes)
                borrower.flush()
                held.append(lent)
            assert len(held) == len(big)

            # One last answer held over close: its segment stays until it is given back.
            last = round_trip([payloads[4]], give_back=False)[0]
            peer.send("stats")
            stats = peer.recv()
            peer.send("stop")
            conn.close()
            assert stats["qp"] == "RTS"
            assert os.path.exists(naming.SHM_DIR + name), "unlinked while the ranker still held a lend"
            borrower.give_back(last.seq, last.pos + last.nbytes)
            borrower.flush()
            for _ in range(100):
                if not os.path.exists(naming.SHM_DIR + name):
                    break
                time.sleep(0.1)
            borrower.close()
        assert naming.list_instance_segments(instance) == [], "nothing may be left in /dev/shm"
    finally:
        naming.unlink_instance_segments(instance)


def test_a_server_that_does_not_place_its_writes_keeps_the_copying_path(rdma_device: str, monkeypatch) -> None:
    from flexemr.transport.rdma import landing
    from flexemr.wire.frame import FrameType, pack_header

    # The forked server inherits this: it refuses every landing, as a v2 server would ignore it.
    monkeypatch.setattr(landing, "MIN_LANDING_BYTES", 1 << 40)
    instance = f"rl{uuid.uuid4().hex[:8]}"
    try:
        with Peer(echo_server, 0, False) as peer:
            conn = _engine_conn(rdma_device, peer.recv(), instance)
            assert conn.transport_name == "rdma" and not conn.stream.lands_in_place
            p = np.arange(65536, dtype=np.uint8)
            conn.send_frame([pack_header(FrameType.LOOKUP, 1, p.nbytes), p])
            h = conn.recv_header()
            assert conn.lend_payload(h) is None
            out = np.empty(p.nbytes, np.uint8)
            conn.recv_payload_into(h, memoryview(out))
            np.testing.assert_array_equal(out, p)
            peer.send("stats")
            peer.recv()
            peer.send("stop")
            conn.close()
        assert naming.list_instance_segments(instance) == []
    finally:
        naming.unlink_instance_segments(instance)
