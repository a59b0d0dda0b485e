"""Sizes larger than this host's memory are refused by name: in a config, in ``emrctl cache resize``, in the daemon.

The host's memory is what ``psutil.virtual_memory().total`` says; every test
phrases its expectation with the same number, so it holds on any machine.
"""

from __future__ import annotations

import dataclasses

import psutil
import pytest
from click.testing import CliRunner

from emrctl.cli import cli
from flexemr.config import format_size, parse_config, parse_size
from flexemr.control.commands import BadCommand, CacheResize, Command
from flexemr.errors import ConfigError
from flexemrd.control.supervisor_side import SupervisorControl

HOST = psutil.virtual_memory().total
HOST_TEXT = f"exceeds this host's memory ({format_size(HOST)})"
PIB = 1 << 50

SIZE_KEYS = [("ranker", "ring_bytes"), ("ranker", "max_request_bytes"), ("embedding", "max_payload"),
             ("cache", "capacity"), ("cache", "budget"), ("cache", "margin")]


def _ranker(**sections) -> dict:
    return {"daemon": {"role": "ranker", "model": "/m"}, **sections}


def test_format_size_reads_like_the_error_messages():
    assert format_size(PIB) == "1.0 PiB"
    assert format_size(int(23.4 * (1 << 30))) == "23.4 GiB"
    assert format_size(512) == "512 B"
    assert parse_size("1PiB") == PIB and parse_size("2PB") == 2 * 10**15


@pytest.mark.parametrize("section,key", SIZE_KEYS)
def test_a_size_beyond_host_memory_is_refused_by_its_key(section, key):
    with pytest.raises(ConfigError) as ei:
        parse_config(_ranker(**{section: {key: "1PiB"}}), "c.toml")
    assert f"c.toml: [{section}].{key} = 1.0 PiB {HOST_TEXT}" in str(ei.value)


def test_the_issue_example_and_every_bad_size_at_once():
    with pytest.raises(ConfigError) as ei:
        parse_config(_ranker(cache={"capacity": "1PiB", "budget": HOST + 1}, ranker={"ring_bytes": "64MiB"}),
                     "flexemr.toml")
    msg = str(ei.value)
    assert f"[cache].capacity = 1.0 PiB {HOST_TEXT}" in msg
    assert f"[cache].budget = {format_size(HOST + 1)} {HOST_TEXT}" in msg
    assert "ring_bytes" not in msg


def test_sizes_that_fit_are_accepted():
    cfg = parse_config(_ranker(cache={"capacity": "64MiB", "budget": HOST // 2}, ranker={"ring_bytes": HOST // 16}))
    assert cfg.cache.budget == HOST // 2
    assert parse_config({}).cache.capacity == 64 << 20   # defaults are never the operator's mistake


def test_rings_of_all_engines_together_must_fit():
    """Each ring fits, but 2 rings x 64 engines of them do not: the message shows the product."""
    ring = HOST // 64
    with pytest.raises(ConfigError) as ei:
        parse_config(_ranker(ranker={"ring_bytes": ring, "engines": 64}), "r.toml")
    assert f"r.toml: [ranker].ring_bytes x 2 rings x 64 engines = {format_size(2 * 64 * ring)} {HOST_TEXT}" \
        in str(ei.value)


def test_cache_resize_command_refuses_more_than_host_memory():
    with pytest.raises(BadCommand) as ei:
        CacheResize(size_bytes=1000 << 40)
    assert str(ei.value) == f"cache_resize: size_bytes = 1000.0 TiB {HOST_TEXT}"
    with pytest.raises(BadCommand):                   # the supervisor decodes emrctl's dict through the same check
        Command.from_dict({"cmd": "cache_resize", "size_bytes": 1000 << 40})
    assert CacheResize(size_bytes=64 << 20).size_bytes == 64 << 20


def test_emrctl_cache_resize_1000tib_is_refused_before_any_round_trip(instance):
    """No daemon runs for ``instance``: the refusal comes from the size, not from a missing segment."""
    res = CliRunner().invoke(cli, ["--instance", instance, "cache", "resize", "1000TiB"])
    assert res.exit_code == 2, res.output
    assert f"1000.0 TiB {HOST_TEXT}" in res.output
    assert "not running" not in res.output


@dataclasses.dataclass
class _Plan:
    """The one part of a RankerPlan that cmd_cache_resize reads before touching the control block."""

    cfg: object


def test_daemon_refuses_a_resize_beyond_its_cache_budget():
    cfg = parse_config(_ranker(cache={"budget": "2GiB"}))
    control = SupervisorControl(_Plan(cfg), resources=None)
    with pytest.raises(ValueError) as ei:
        control.cmd_cache_resize(CacheResize(size_bytes=3 << 30))
    assert str(ei.value) == ("cache resize to 3.0 GiB exceeds [cache].budget (2.0 GiB), "
                             "the memory the NN and the cache share")
