"""flexemr.naming: the names of every shm segment, semaphore and socket."""

from __future__ import annotations

import os
import stat
import uuid

import posix_ipc
import pytest

from flexemr import naming


def test_names_follow_the_documented_scheme() -> None:
    assert naming.shm_name("prod", "ring", "e03", "sub") == "/flexemr.prod.ring.e03.sub"
    assert naming.ring_names("prod", 3) == ("/flexemr.prod.ring.e03.sub", "/flexemr.prod.ring.e03.cmp")
    assert naming.ring_names("prod", 123)[0] == "/flexemr.prod.ring.e123.sub"
    assert naming.doorbell_name("prod", "cmp") == "/flexemr.prod.db.cmp"
    assert naming.control_name("prod") == "/flexemr.prod.ctl"
    assert naming.ring_doorbell_names("/flexemr.prod.ring.e03.sub") == (
        "/flexemr.prod.ring.e03.sub.data",
        "/flexemr.prod.ring.e03.sub.space",
    )


@pytest.mark.parametrize(
    ("instance", "problem"),
    [
        ("", "empty"),
        ("x" * 33, "33 characters"),
        ("a.b", "'.'"),
        ("a/b", "'/'"),
        ("héllo", "'é'"),
        ("two words", "' '"),
    ],
)
def test_bad_instance_names_say_what_is_wrong(instance: str, problem: str) -> None:
    with pytest.raises(ValueError, match="instance name") as exc:
        naming.shm_name(instance, "ctl")
    assert problem in str(exc.value)


def test_good_instance_names() -> None:
    for inst in ("default", "a", "x" * 32, "Test_1-b"):
        assert naming.validate_instance(inst) == inst


def test_bad_components_and_engine_ids() -> None:
    with pytest.raises(ValueError):
        naming.shm_name("ok")
    with pytest.raises(ValueError):
        naming.shm_name("ok", "a.b")
    for bad in (-1, True, 1.0, "3"):
        with pytest.raises(ValueError, match="engine id"):
            naming.ring_names("ok", bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not built by"):
        naming.ring_doorbell_names("/other.ring")


def test_runtime_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.setenv("FLEXEMR_RUNTIME_DIR", str(tmp_path))
    assert naming.runtime_dir() == str(tmp_path)
    monkeypatch.delenv("FLEXEMR_RUNTIME_DIR")
    # make /run/flexemr unusable so the fallbacks show
    monkeypatch.setattr(naming, "SYSTEM_RUNTIME_DIR", "/nonexistent-flexemr/run/flexemr")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert naming.runtime_dir() == os.path.join(str(tmp_path), "flexemr")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert naming.runtime_dir() == f"/tmp/flexemr-{os.getuid()}"


def test_runtime_dir_prefers_writable_system_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    monkeypatch.delenv("FLEXEMR_RUNTIME_DIR", raising=False)
    system = os.path.join(str(tmp_path), "run", "flexemr")
    os.makedirs(system)
    monkeypatch.setattr(naming, "SYSTEM_RUNTIME_DIR", system)
    assert naming.runtime_dir() == system


def test_ensure_runtime_dir_and_default_socket(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    target = os.path.join(str(tmp_path), "rt")
    monkeypatch.setenv("FLEXEMR_RUNTIME_DIR", target)
    assert naming.ensure_runtime_dir() == target
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o700
    assert naming.default_socket("prod") == os.path.join(target, "prod.sock")
    monkeypatch.setenv("FLEXEMR_RUNTIME_DIR", "/" + "d" * 120)
    with pytest.raises(ValueError, match="FLEXEMR_RUNTIME_DIR"):
        naming.default_socket("prod")


def test_list_and_unlink_instance_segments() -> None:
    inst = "t" + uuid.uuid4().hex[:12]
    other = inst + "x"  # shares the prefix: must not be listed
    shm = posix_ipc.SharedMemory(naming.shm_name(inst, "ctl"), posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    sem = posix_ipc.Semaphore(naming.doorbell_name(inst, "cmp"), posix_ipc.O_CREX)
    sem.close()
    shm2 = posix_ipc.SharedMemory(naming.shm_name(other, "ctl"), posix_ipc.O_CREX, size=4096)
    shm2.close_fd()
    try:
        assert naming.list_instance_segments(inst) == [f"flexemr.{inst}.ctl", f"sem.flexemr.{inst}.db.cmp"]
        assert naming.unlink_instance_segments(inst) == [f"flexemr.{inst}.ctl", f"sem.flexemr.{inst}.db.cmp"]
        assert naming.list_instance_segments(inst) == []
        assert naming.list_instance_segments(other) == [f"flexemr.{other}.ctl"]
    finally:
        naming.unlink_instance_segments(inst)
        naming.unlink_instance_segments(other)
    assert naming.list_instance_segments(other) == []
