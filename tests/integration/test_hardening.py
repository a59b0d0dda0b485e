"""Hostile input against a real ``flexemrd local``: a file at the socket path, oversized resizes, other uids.

Real processes: the daemon and ``emrctl`` run as subprocesses; the other-uid
client is a process forked from this one and switched to uid 65534.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from flexemr import naming
from flexemr.config import format_size

from tests.conftest import LocalCluster
from tests.lib.test_hardening_mailbox import NOBODY, emrctl as emrctl_main, run_as


def emrctl(instance: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emrctl", "--instance", instance, *args],
                          capture_output=True, text=True, timeout=timeout)


def test_daemon_refuses_to_start_over_a_regular_file_and_names_it(tiny_model, tmp_path):
    """A regular file at the socket path is someone's data: never deleted, the daemon says which file."""
    instance = "t" + uuid.uuid4().hex[:10]
    victim = tmp_path / f"{instance}.sock"      # the path LocalCluster passes as --socket
    victim.write_text("precious\n")
    with pytest.raises(RuntimeError) as ei:
        LocalCluster(tiny_model, tmp_path, servers=1, engines=1, instance=instance)
    log = str(ei.value)
    assert f"{victim} exists and is not a socket: refusing to replace it" in log
    assert victim.read_text() == "precious\n" and stat.S_ISREG(victim.stat().st_mode)
    # nothing of the instance survives the refusal
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if instance in " ".join(p.info["cmdline"] or [])]
    for p in leftovers:
        p.wait(10)
    assert not [p for p in leftovers if p.is_running()], "processes of the refused daemon are still running"
    assert naming.list_instance_segments(instance) == []


@pytest.fixture(scope="module")
def live(tiny_model, tmp_path_factory):
    c = LocalCluster(tiny_model, tmp_path_factory.mktemp("harden"), servers=1, engines=1,
                     extra=["--cache-policy", "fixed", "--cache-budget", "1GiB"])
    yield c
    c.stop()


def test_cache_resize_beyond_host_memory_is_refused_by_emrctl(live):
    r = emrctl(live.instance, "cache", "resize", "1000TiB")
    assert r.returncode == 2, r.stderr
    assert f"1000.0 TiB exceeds this host's memory ({format_size(psutil.virtual_memory().total)})" in r.stderr
    assert json.loads(emrctl(live.instance, "status", "--json").stdout)["cache"]["capacity_bytes"] < 1 << 40


def test_cache_resize_beyond_the_budget_is_refused_by_the_daemon(live):
    r = emrctl(live.instance, "cache", "resize", "2GiB")
    assert r.returncode == 1, r.stderr
    assert "cache resize to 2.0 GiB exceeds [cache].budget (1.0 GiB)" in r.stderr
    ok = emrctl(live.instance, "cache", "resize", "32MiB")
    assert ok.returncode == 0, ok.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_the_daemons_segment_refuses_commands_from_another_uid(live):
    """The live daemon's own segment and semaphores, not one built by the test."""
    ctl = Path(naming.SHM_DIR) / naming.control_name(live.instance).lstrip("/")
    st = ctl.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o640, os.geteuid())
    os.chown(ctl, -1, NOBODY)                     # nobody joins the daemon's group: it may read status
    code, out = run_as(NOBODY, NOBODY, emrctl_main("--instance", live.instance, "status", "--json"))
    assert code == 0, out
    code, out = run_as(NOBODY, NOBODY, emrctl_main("--instance", live.instance, "shutdown", "--now"))
    assert code == 1, out
    assert f"refused: emrctl runs as uid {NOBODY}, the daemon accepts commands from uid {os.geteuid()} only" in out
    assert live.proc.poll() is None, "the daemon obeyed a shutdown from another uid"
    assert emrctl(live.instance, "reload").returncode == 0
