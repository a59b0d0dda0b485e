"""How many pooling workers each embedding server of a host gets."""

from __future__ import annotations

import os
import socket

import pytest

from flexemr.config import parse_config
from flexemr.model.presets import get_preset
from flexemr.routing.table import RoutingTable
from flexemrd.embedding.main import default_workers, embedding_plans


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def test_the_hosts_cores_are_shared_among_its_servers():
    cores = _cores()
    assert default_workers(1) == max(1, min(8, cores))
    assert default_workers(cores) == 1
    assert default_workers(4 * cores) == 1      # never zero: a server always pools
    assert default_workers(0) == default_workers(1)


@pytest.mark.parametrize("configured", [0, 3])
def test_plans_take_the_configured_workers_or_share_the_cores(configured):
    spec = get_preset("tiny").spec
    cfg = parse_config({"daemon": {"role": "embedding", "model": "/nonexistent"},
                        "embedding": {"servers": 2, "workers": configured}}, source="test")
    socks = [socket.socket(), socket.socket()]
    try:
        plans = embedding_plans(cfg, spec, RoutingTable.build(spec, 2, "tables"), socks, [0, 1])
    finally:
        for s in socks:
            s.close()
    assert [p.workers for p in plans] == [configured or default_workers(2)] * 2
