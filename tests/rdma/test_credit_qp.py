"""Credits travel on their own queue pair at a higher service level and traffic class.

The credit QP's path carries CREDIT_TRAFFIC_CLASS (DSCP 46) in the device's
own QP attributes, on both ends, while the data QP's carries 0; every credit
grant arrives as a completion of the credit QP, never of the data QP.
(Soft-RoCE does not store the service level and reports it as 0; on RoCE the
traffic class is what switches prioritise, on InfiniBand the SL.)  The
in-band comparison mode sends the same grants on the data QP instead, and
both ends refuse to connect when they disagree about the mode.
"""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.transport.rdma import channel as channel_mod
from flexemr.transport.rdma.channel import (CREDIT_SL, CREDIT_TRAFFIC_CLASS, DATA_SL, DATA_TRAFFIC_CLASS,
                                            RankerChannel)
from flexemr.transport.rdma.endpoint import Endpoint
from flexemr.transport.rdma.errors import BlobError
from tests.rdma.lookups import REPLY_SLOT_BYTES, REQUEST_BYTES, drain_credits, run_lookups, serve
from tests.rdma.peers import Peer

pytestmark = pytest.mark.rdma


def lookups_recording_grants(endpoint: Endpoint, rdma_device: str, credits: str) -> tuple[RankerChannel, list[int], dict]:
    """30 lookups through 2 receive slots; the QP number of every credit grant's completion."""
    requests = endpoint.register(np.zeros(8 * REQUEST_BYTES, np.uint8))
    completions = endpoint.register(np.zeros(30 * REPLY_SLOT_BYTES, np.uint8), remote_write=True)
    grants_on: list[int] = []
    original = RankerChannel._event

    def spy(self, qp, wc):  # which QP each completion really came from, as the device reports it
        ev = original(self, qp, wc)
        if isinstance(ev, channel_mod.CreditGrant):
            grants_on.append(int(wc.qp_num))
        return ev

    with Peer(serve, rdma_device, 2, credits) as peer:
        ch = RankerChannel(endpoint, "server-0", requests, completions, depth=8, credits=credits)
        blob = peer.recv()
        peer.send(ch.blob())
        ch.connect(blob)
        RankerChannel._event = spy
        try:
            run_lookups(ch, list(range(30)), request_slots=8)
            drain_credits(ch, 2)
        finally:
            RankerChannel._event = original
        peer.send("stats")
        stats = peer.recv()
        peer.send("stop")
        peer.recv()
    ch.close()
    requests.close()
    completions.close()
    return ch, grants_on, stats


def test_credit_qp_runs_at_the_higher_priority(endpoint: Endpoint, rdma_device: str) -> None:
    assert CREDIT_SL > DATA_SL and CREDIT_TRAFFIC_CLASS > DATA_TRAFFIC_CLASS
    ch, grants_on, stats = lookups_recording_grants(endpoint, rdma_device, "priority")
    assert ch.credit.sl == CREDIT_SL and ch.data.sl == DATA_SL
    assert stats["credit_route"][1] == CREDIT_TRAFFIC_CLASS and stats["data_route"][1] == DATA_TRAFFIC_CLASS
    assert stats["credit_state"] == "RTS"
    # 30 lookups through 2 receive slots: the credits came back over and over, all on the credit QP
    assert len(grants_on) >= 14 and set(grants_on) == {ch.credit.qpn}
    assert ch.credit.qpn != ch.data.qpn and ch.credits == 2


def test_route_as_the_device_holds_it(endpoint: Endpoint, rdma_device: str) -> None:
    requests = endpoint.register(np.zeros(64, np.uint8))
    ch = RankerChannel(endpoint, "server-0", requests, requests, depth=4)
    ch.connect(ch.blob())  # a loopback pair is enough to program the paths
    assert ch.credit.query_route()[1] == CREDIT_TRAFFIC_CLASS  # asks the kernel driver
    assert ch.data.query_route()[1] == DATA_TRAFFIC_CLASS
    assert ch.qp_states() == ("RTS", "RTS")
    ch.close()
    requests.close()


def test_in_band_credits_travel_on_the_data_qp(endpoint: Endpoint, rdma_device: str) -> None:
    ch, grants_on, stats = lookups_recording_grants(endpoint, rdma_device, "in_band")
    assert len(grants_on) >= 14 and set(grants_on) == {ch.data.qpn}
    assert ch.credits == 2 and stats["requests"] == 30


def test_ends_that_disagree_about_credits_do_not_connect(endpoint: Endpoint) -> None:
    requests = endpoint.register(np.zeros(64, np.uint8))
    priority = RankerChannel(endpoint, "server-0", requests, requests, depth=4)
    in_band = RankerChannel(endpoint, "server-1", requests, requests, depth=4, credits="in_band")
    with pytest.raises(BlobError, match="server-0 sends credits in_band, this side expects priority"):
        priority.connect(in_band.blob())
    priority.close()
    in_band.close()
    requests.close()
