"""The RDMA connection blob round-trips and refuses malformed input; no RDMA device needed.

Also checks that the verbs layer imports and reports "unavailable" cleanly on
a host without pyverbs or without a device (the default suite runs there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexemr.transport.rdma import BlobError, ConnectionBlob, RemoteRegion
from flexemr.transport.rdma.blob import (FLAG_CREDITS_IN_BAND, HEADER, MAX_REGIONS, REGION, VERSION, gid_bytes,
                                         gid_text)

REPO = Path(__file__).resolve().parents[2]
GID = gid_bytes("0000:0000:0000:0000:0000:ffff:0a00:020f")


def blob(**kw: object) -> ConnectionBlob:
    fields: dict[str, object] = dict(qpn=0x11, psn=0xABCDEF, credit_qpn=0x12, credit_psn=7, gid=GID, mtu=1024,
                                     recv_slots=64, recv_slot_bytes=65536, flags=FLAG_CREDITS_IN_BAND,
                                     regions=(RemoteRegion(0x7F00_0000_1000, 8 << 20, 0x1234),
                                              RemoteRegion(0x7F00_1000_0000, 4096, 0xFFFF_FFFF)))
    fields.update(kw)
    return ConnectionBlob(**fields)  # type: ignore[arg-type]


def test_round_trip_keeps_every_field() -> None:
    b = blob()
    data = b.pack()
    assert len(data) == HEADER.size + 2 * REGION.size
    assert data[:4] == b"FXRB" and int.from_bytes(data[4:6], "big") == b.version == 1
    assert ConnectionBlob.unpack(data) == b
    assert ConnectionBlob.unpack(data).flags == FLAG_CREDITS_IN_BAND
    assert ConnectionBlob.unpack(memoryview(bytearray(data))) == b


def test_blob_without_regions_is_64_bytes() -> None:
    b = blob(regions=(), recv_slots=0, recv_slot_bytes=0, flags=0)
    assert len(b.pack()) == 64
    assert ConnectionBlob.unpack(b.pack()) == b


def test_gid_text_round_trip() -> None:
    assert gid_text(GID) == "0000:0000:0000:0000:0000:ffff:0a00:020f"
    assert GID[-4:] == bytes([10, 0, 2, 15])


@pytest.mark.parametrize("mutate, field", [
    (lambda d: b"XXXX" + d[4:], "magic"),
    (lambda d: d[:4] + (VERSION + 1).to_bytes(2, "big") + d[6:], "version"),
    (lambda d: d[:6] + (MAX_REGIONS + 1).to_bytes(2, "big") + d[8:], "regions"),
    (lambda d: d[:-1], "bytes"),
    (lambda d: d + b"\0", "bytes"),
    (lambda d: d[:40], "header"),
    (lambda d: d[:8] + (0).to_bytes(4, "big") + d[12:], "qpn"),
    (lambda d: d[:12] + (1 << 24).to_bytes(4, "big") + d[16:], "psn"),
    (lambda d: d[:24] + bytes(16) + d[40:], "gid"),
    (lambda d: d[:40] + (1500).to_bytes(4, "big") + d[44:], "mtu"),
    (lambda d: d[:52] + (4).to_bytes(4, "big") + d[56:], "flags"),
    (lambda d: d[:64 + 8] + (0).to_bytes(8, "big") + d[64 + 16:], "region[0]"),
])
def test_malformed_blob_is_refused_naming_the_field(mutate, field: str) -> None:
    with pytest.raises(BlobError, match=field.replace("[", r"\[").replace("]", r"\]")):
        ConnectionBlob.unpack(mutate(blob().pack()))


def test_constructing_an_invalid_blob_fails_early() -> None:
    with pytest.raises(BlobError, match="credit_qpn"):
        blob(credit_qpn=1 << 24)
    with pytest.raises(BlobError, match="regions exceed"):
        blob(regions=tuple(RemoteRegion(4096 * (i + 1), 4096, i) for i in range(MAX_REGIONS + 1)))


def test_remote_region_bounds() -> None:
    r = RemoteRegion(0x1000, 100, 5)
    assert r.check(10, 90, "write") == 0x100A
    with pytest.raises(ValueError, match=r"write: bytes \[10, 101\) are outside"):
        r.check(10, 91, "write")


def test_without_pyverbs_the_layer_reports_unavailable() -> None:
    """A Python that cannot find pyverbs anywhere: imports work, probe says what to install."""
    code = (
        "import flexemr.transport.rdma.loader as l; l.DIST_PACKAGES = '/nonexistent';"
        "import sys; sys.path = [p for p in sys.path if 'dist-packages' not in p];"
        "from flexemr.transport.rdma import device, channel, endpoint, qp;"
        "names, why = device.probe(); assert names == [] and not device.available();"
        "print(why)"
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'lib'}:{REPO}")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "python3-pyverbs" in out.stdout


def test_this_host_without_a_device_is_not_available() -> None:
    from flexemr.transport.rdma import device

    names, why = device.probe()
    if names:
        pytest.skip(f"this host has RDMA devices {names}")
    assert not device.available() and why
