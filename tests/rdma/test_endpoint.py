"""The endpoint on a real device: the choice it logs, memory it registers, how it waits, whose it is.

Single-process checks (the two-process data path is in the other modules):
the "RDMA on rxe0 port 1 gid 1" line and its RoCE v2 IPv4-mapped GID, clear
errors for a wrong device name, an idle wait that sleeps on the completion
channel instead of spinning, a POSIX shared-memory mapping (what the rings
are) registered in place and written by WRITE WITH IMM through a loopback
pair, and an endpoint that refuses to be used after fork.
"""

from __future__ import annotations

import logging
import mmap
import os
import resource
import time
import uuid

import numpy as np
import pytest

from flexemr.transport.rdma import device
from flexemr.transport.rdma.channel import RankerChannel, Response, ServerChannel, WriteDone
from flexemr.transport.rdma.endpoint import Endpoint
from flexemr.transport.rdma.errors import RdmaUnavailable
from tests.rdma.peers import Peer, counter

pytestmark = pytest.mark.rdma


def test_device_choice_is_logged_and_prefers_roce_v2_ipv4(rdma_device: str, caplog) -> None:
    assert device.available()
    with caplog.at_level(logging.INFO, logger="flexemr.transport.rdma.device"):
        ctx, choice = device.open_device(rdma_device)
    ctx.close()
    line = f"RDMA on {rdma_device} port {choice.port} gid {choice.gid_index}"
    assert any(r.getMessage().startswith(line) for r in caplog.records), caplog.text
    if rdma_device.startswith("rxe"):  # the guest: rxe0 on 10.0.2.15 has ::ffff:10.0.2.15 at index 1
        assert (choice.port, choice.gid_index, choice.gid_type) == (1, 1, "RoCE v2")
        assert choice.gid == bytes(10) + b"\xff\xff" + bytes([10, 0, 2, 15])
        assert choice.link_layer == "Ethernet"


def test_unknown_device_name_is_a_clear_error(rdma_device: str) -> None:
    with pytest.raises(RdmaUnavailable, match=rf"'mlx9_9' not found \(devices: .*{rdma_device}"):
        Endpoint("mlx9_9")
    with pytest.raises(RdmaUnavailable, match="port 9 does not exist"):
        Endpoint(rdma_device, port=9)


def test_idle_wait_sleeps_on_the_completion_channel(endpoint: Endpoint) -> None:
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    assert endpoint.wait(1.5) == []
    took = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert took >= 1.4
    assert cpu < 0.5 * took, f"{cpu:.2f} s of CPU in a {took:.2f} s idle wait: spinning"
    assert os.readlink(f"/proc/self/fd/{endpoint.fileno()}") == "anon_inode:[infinibandevent]"


def write_into(pipe, dev: str) -> None:
    ep = Endpoint(dev)
    src = ep.register(np.arange(50_000, dtype=np.float32))
    receive = ep.register(np.zeros(64, np.uint8))
    ch = ServerChannel(ep, "ranker", receive, src, recv_slots=1)
    pipe.send(ch.blob())
    ch.connect(pipe.recv())
    assert ch.reply(77, 4000, 100_000, 4096)  # floats 1000.. of the source, at byte 4096
    while not [e for e in ch.wait(60) if isinstance(e, WriteDone)]:
        pass
    pipe.send("written")
    pipe.recv()
    ch.close()
    ep.close()


def test_shared_memory_mapping_is_registered_in_place(endpoint: Endpoint, rdma_device: str) -> None:
    """The ranker's completion ring is a shm mapping: the server writes into it, another mapping sees it."""
    path = f"/dev/shm/flexemr-rdma-{uuid.uuid4().hex[:8]}"
    size = 1 << 20
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
        engine_map = mmap.mmap(fd, size)  # the engine's mapping, registered
        reader_map = mmap.mmap(fd, size, prot=mmap.PROT_READ)  # e.g. the inference process's
        ring = endpoint.register(engine_map, remote_write=True)
        requests = endpoint.register(np.zeros(64, np.uint8))
        before = counter(rdma_device, "rcvd_pkts")
        with Peer(write_into, rdma_device) as peer:
            ch = RankerChannel(endpoint, "server-0", requests, ring, depth=4)
            blob = peer.recv()
            peer.send(ch.blob())
            ch.connect(blob)
            events = ch.wait(60)
            assert peer.recv() == "written"
            peer.send("bye")
        assert events == [Response(77, 100_000)]
        seen = np.frombuffer(reader_map, np.float32, 25_000, 4096)
        np.testing.assert_array_equal(seen, np.arange(1000, 26_000, dtype=np.float32))
        assert counter(rdma_device, "rcvd_pkts") - before >= 100_000 // endpoint.device.mtu
        ch.close()
        ring.close()
        requests.close()
        del seen
        reader_map.close()
        engine_map.close()
    finally:
        os.close(fd)
        os.unlink(path)


def use_parents_endpoint(pipe, ep: Endpoint) -> None:
    try:
        ep.register(np.zeros(16, np.uint8))
    except RdmaUnavailable as e:
        pipe.send(str(e))
    else:
        pipe.send("registered")


def test_an_endpoint_is_never_shared_across_processes(endpoint: Endpoint) -> None:
    with Peer(use_parents_endpoint, endpoint) as peer:
        msg = peer.recv()
    assert "cannot be used after fork" in msg and str(os.getpid()) in msg
