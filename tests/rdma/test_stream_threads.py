"""Frame streams used as the engine uses them: a sender thread, a receiver thread selecting on several fds.

The engine's receiver selects on each connection's ``fileno()`` and reads a
whole frame, blocking, from whichever is readable; its sender thread sends
lookups on the data connections meanwhile, and the receiver itself sends a
CREDIT frame on the credit connection for every answer (priority credits).
A verbs stream's fd also wakes for this side's own send completions (the
sends, the slot grants), which carry nothing to read: a receiver that read
blocking on such a wake-up sat in the credit connection's read forever
while the answers waited on the others (the first lookup of ``flexemrd
local --transport rdma`` timed out).  ``ready_to_read()`` says whether bytes
wait; the receiver here reads only then, as flexemrd/engine/receiver.py does.

The forked peer plays three embedding-server connections in one selector
loop: it echoes every frame on the two data connections and swallows the
credit connection's frames, answering none of them.
"""

from __future__ import annotations

import selectors
import threading
import time

import numpy as np
import pytest

from tests.rdma.peers import Peer

pytestmark = pytest.mark.rdma

FRAMES = 60           # per data connection
CONNS = 3             # 0 = the credit connection (never answered), 1 and 2 echo
TIMEOUT_S = 180.0


def three_connection_server(pipe, frames: int) -> None:
    from flexemr.transport.tcp import TcpTransport
    from flexemr.transport.verbs import upgrade_server_connection
    from flexemr.wire import codec
    from flexemr.wire.frame import FrameType, pack_header
    from flexemr.wire.stream import FrameAssembler

    listener = TcpTransport().listen("127.0.0.1:0")
    pipe.send(listener.address)
    sel = selectors.DefaultSelector()
    sel.register(listener.fileno(), selectors.EVENT_READ)
    conns = []
    while len(conns) < CONNS:
        sel.select(60)
        tcp = listener.accept()
        if tcp is None:
            continue
        h = tcp.recv_header()
        hello = codec.decode_hello(tcp.recv_payload(h))
        assert h.type == FrameType.HELLO and hello.blob
        conn, blob = upgrade_server_connection(tcp, hello.blob, priority=len(conns) == 0)
        tcp.send_frame(codec.encode_hello(h.request_id, codec.ROLE_EMBEDDING, "echo", blob=blob))
        conns.append(conn)
    sel.unregister(listener.fileno())
    readers = []
    for i, conn in enumerate(conns):
        sel.register(conn.fileno(), selectors.EVENT_READ, i)
        readers.append(FrameAssembler(1 << 30))
    got = [0] * CONNS
    # Serve until the test speaks (it has every answer by then): answers the
    # ranker's rings could not take yet wait in a backlog this loop pushes.
    while not pipe.conn.poll(0):
        for key, _ in sel.select(0.05):
            i = key.data
            while (frame := readers[i].next(conns[i].recv_nowait)) is not None:
                fh, payload = frame
                got[i] += 1
                if i:
                    conns[i].send_nowait([memoryview(pack_header(fh.type, fh.request_id, fh.payload_len, aux=fh.aux)),
                                          memoryview(bytes(payload))])
        for c in conns:
            c.send_nowait([])
    assert pipe.recv() == "stats"
    pipe.send({"got": got, "transports": [c.transport_name for c in conns]})
    pipe.recv()
    for c in conns:
        c.close()


def test_a_receiver_thread_never_blocks_on_a_connection_woken_only_by_its_own_sends(rdma_device: str) -> None:
    from flexemr.transport.verbs import RdmaTransport
    from flexemr.wire.frame import FrameType, pack_header
    from flexemrd.engine.connections import say_hello

    rng = np.random.default_rng(7)
    payloads = {(c, i): rng.integers(0, 256, int(rng.integers(0, 70_000)), dtype=np.uint8)
                for c in (1, 2) for i in range(FRAMES)}
    with Peer(three_connection_server, FRAMES) as peer:
        address = peer.recv()
        transport = RdmaTransport(rdma_device)
        conns = []
        for cid in range(CONNS):
            conn = transport.connect(address, cid, 0, priority=cid == 0)
            say_hello(conn, "tok", "credit" if cid == 0 else "data", 0)
            conns.append(conn)
        assert [c.transport_name for c in conns] == ["rdma"] * CONNS

        answered: dict[tuple[int, int], bytes] = {}
        problems: list[BaseException] = []
        stop = threading.Event()

        def receive() -> None:
            sel = selectors.DefaultSelector()
            for cid in (0, 1, 2):
                sel.register(conns[cid].fileno(), selectors.EVENT_READ, cid)
            try:
                while len(answered) < 2 * FRAMES and not stop.is_set():
                    for key, _ in sel.select(0.2):
                        conn = conns[key.data]
                        if not conn.ready_to_read():   # as the engine's receiver does
                            continue
                        h = conn.recv_header()
                        out = np.empty(h.payload_len, np.uint8)
                        conn.recv_payload_into(h, memoryview(out))
                        answered[(key.data, h.request_id)] = out.tobytes()
                        # priority credits: the receiver grants on the credit connection
                        conns[0].send_frame([pack_header(FrameType.CREDIT, h.request_id, 8), bytes(8)])
            except BaseException as e:  # noqa: BLE001 -- reported by the test thread
                problems.append(e)

        def send() -> None:
            try:
                for i in range(FRAMES):
                    for c in (1, 2):
                        p = payloads[(c, i)]
                        conns[c].send_frame([pack_header(FrameType.LOOKUP, i, p.nbytes, aux=c), p])
            except BaseException as e:  # noqa: BLE001
                problems.append(e)

        receiver = threading.Thread(target=receive, daemon=True)
        sender = threading.Thread(target=send, daemon=True)
        t0 = time.monotonic()
        receiver.start()
        sender.start()
        sender.join(TIMEOUT_S)
        receiver.join(max(1.0, TIMEOUT_S - (time.monotonic() - t0)))
        stop.set()
        assert not problems, problems
        assert len(answered) == 2 * FRAMES, (
            f"{2 * FRAMES - len(answered)} answers never reached the receiver thread in {TIMEOUT_S:g} s "
            f"(receiver alive: {receiver.is_alive()})")
        for key, p in payloads.items():
            assert answered[key] == p.tobytes(), key
        peer.send("stats")
        stats = peer.recv()
        assert stats["got"][1:] == [FRAMES, FRAMES]
        assert stats["transports"] == ["rdma"] * CONNS
        peer.send("stop")
        for c in conns:
            c.close()
