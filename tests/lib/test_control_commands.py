"""Commands (dict round trips, validation, sizes) and the dispatcher's error results."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flexemr.config import host_memory_bytes
from flexemr.control.commands import (
    COMMANDS,
    BadCommand,
    CachePolicy,
    CacheResize,
    Command,
    Migrate,
    Rebalance,
    Reload,
    Shutdown,
    Status,
    parse_size,
)
from flexemr.control.dispatch import Dispatcher
from flexemr.errors import ControlError


@pytest.mark.parametrize("text, size", [
    ("123", 123), ("0", 0), ("64MiB", 64 << 20), ("2GiB", 2 << 30), ("1.5GB", 1_500_000_000),
    ("4KiB", 4096), ("10kb", 10_000), (" 8 MiB ", 8 << 20), (4096, 4096),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "  ", "abc", "-1", "64XB", "1.2.3GiB", "GiB", True])
def test_parse_size_rejects_nonsense_with_a_clear_message(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_parse_size_rejects_negative_ints():
    with pytest.raises(ValueError, match=">= 0"):
        parse_size(-5)


_commands = st.one_of(
    st.just(Status()), st.just(Reload()),
    st.builds(Migrate, conn=st.integers(0, 10**6), to_engine=st.integers(0, 1024)),
    st.builds(CacheResize, size_bytes=st.integers(0, host_memory_bytes())),  # larger: refused (test_hardening_sizes)
    st.builds(CachePolicy, policy=st.sampled_from(["adaptive", "fixed", "off"])),
    st.builds(Shutdown, graceful=st.booleans()),
    st.builds(Rebalance, enabled=st.booleans()),
)


@given(_commands)
def test_commands_round_trip_through_dicts(cmd):
    d = cmd.to_dict()
    assert d["cmd"] == cmd.name and Command.from_dict(d) == cmd


def test_wire_names_match_handlers():
    assert sorted(COMMANDS) == ["cache_policy", "cache_resize", "migrate", "rebalance", "reload", "shutdown",
                                "status"]
    assert Migrate(3, 1).to_dict() == {"cmd": "migrate", "conn": 3, "to_engine": 1}
    assert Shutdown().to_dict() == {"cmd": "shutdown", "graceful": True}


@pytest.mark.parametrize("data, message", [
    ({"cmd": "fly"}, "unknown command 'fly'"),
    ({}, "unknown command None"),
    ({"cmd": "migrate", "conn": 1}, "missing argument.*to_engine"),
    ({"cmd": "migrate", "conn": 1, "to_engine": 0, "force": True}, "unknown argument.*force"),
    ({"cmd": "migrate", "conn": "1", "to_engine": 0}, "conn must be an integer"),
    ({"cmd": "migrate", "conn": True, "to_engine": 0}, "conn must be an integer"),
    ({"cmd": "migrate", "conn": -1, "to_engine": 0}, "conn must be >= 0"),
    ({"cmd": "cache_policy", "policy": "lru"}, "policy must be one of adaptive, fixed, off"),
    ({"cmd": "cache_resize", "size_bytes": 1.5}, "size_bytes must be an integer"),
    ({"cmd": "rebalance", "enabled": "yes"}, "enabled must be true or false"),
])
def test_from_dict_names_the_problem(data, message):
    with pytest.raises(BadCommand, match=message):
        Command.from_dict(data)


class Target:
    def __init__(self) -> None:
        self.calls: list[Command] = []

    def cmd_status(self, cmd: Status) -> dict[str, Any]:
        return {"engines": 2}

    def cmd_migrate(self, cmd: Migrate) -> dict[str, Any]:
        self.calls.append(cmd)
        if cmd.to_engine > 1:
            raise ValueError(f"no engine {cmd.to_engine} (engines: 0-1)")
        return {"conn": cmd.conn, "engine": cmd.to_engine}

    def cmd_cache_resize(self, cmd: CacheResize) -> None:
        raise ZeroDivisionError("oops")

    def cmd_cache_policy(self, cmd: CachePolicy) -> dict[str, Any]:
        return {"status": "error", "error": "cache is disabled in this build"}

    def cmd_reload(self, cmd: Reload) -> None:
        self.calls.append(cmd)

    def cmd_shutdown(self, cmd: Shutdown) -> dict[str, Any]:
        self.calls.append(cmd)
        if not cmd.graceful:
            raise ControlError("already stopping")
        return {"stopping": True}


def test_dispatcher_results():
    t = Target()
    d = Dispatcher(t)
    assert d.dispatch(Status()) == {"status": "ok", "cmd": "status", "engines": 2}
    assert d({"cmd": "migrate", "conn": 3, "to_engine": 1}) == {"status": "ok", "cmd": "migrate", "conn": 3,
                                                                "engine": 1}
    assert d({"cmd": "migrate", "conn": 3, "to_engine": 7}) == {
        "status": "error", "cmd": "migrate", "error": "no engine 7 (engines: 0-1)"}
    assert d({"cmd": "reload"}) == {"status": "ok", "cmd": "reload"}
    r = d({"cmd": "cache_resize", "size_bytes": 5})
    assert r["status"] == "error" and r["error"] == "cache_resize failed: ZeroDivisionError: oops"
    assert d({"cmd": "cache_policy", "policy": "off"}) == {
        "status": "error", "cmd": "cache_policy", "error": "cache is disabled in this build"}
    assert d({"cmd": "rebalance", "enabled": True}) == {
        "status": "error", "cmd": "rebalance", "error": "this daemon does not support 'rebalance'"}
    r = d({"cmd": "nope"})
    assert r["status"] == "error" and "unknown command 'nope'" in r["error"] and r["cmd"] == "nope"
    r = d({"cmd": "migrate", "conn": "x", "to_engine": 0})
    assert r["status"] == "error" and "conn must be an integer" in r["error"]
    r = d(["not", "a", "dict"])  # type: ignore[arg-type]
    assert r["status"] == "error" and "JSON object" in r["error"]


def test_signals_take_the_same_path(caplog):
    t = Target()
    d = Dispatcher(t)
    with caplog.at_level(logging.INFO, logger="flexemr.control.dispatch"):
        assert d.dispatch_signal("SIGHUP") == {"status": "ok", "cmd": "reload"}
        assert d.dispatch_signal("term") == {"status": "ok", "cmd": "shutdown", "stopping": True}
        assert d.dispatch_signal("SIGINT")["error"] == "already stopping"
        assert d.dispatch_signal("SIGUSR1")["status"] == "error"
    assert t.calls == [Reload(), Shutdown(graceful=True), Shutdown(graceful=False)]
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("reload from SIGHUP: ok (")
    assert lines[1].startswith("shutdown graceful=True from SIGTERM: ok")
    assert lines[2].startswith("shutdown graceful=False from SIGINT: error: already stopping")


def test_one_info_line_per_command(caplog):
    d = Dispatcher(Target())
    with caplog.at_level(logging.INFO, logger="flexemr.control.dispatch"):
        d({"cmd": "migrate", "conn": 3, "to_engine": 1})
    records = [r for r in caplog.records if r.name == "flexemr.control.dispatch"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith("migrate conn=3 to_engine=1 from emrctl: ok (")
