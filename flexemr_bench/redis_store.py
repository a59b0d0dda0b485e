"""The Redis baseline's server and key format (HugeCTR HPS's Redis tier).

Rows live in a redis-server as binary values (float32 bytes), one key per
(table, row).  The client that looks them up as fast as the protocol allows
(de-duplicated ids, numpy-built MGETs, pooling on the ranker) is
:class:`flexemr_bench.systems.RedisRanker`.

Keys are 5 bytes without a zero byte (so numpy's fixed-width bytes views are
exact): ``0x80|table`` then the row in four 7-bit groups with the high bit set.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time

import numpy as np

from flexemr_bench.daemon import free_ports, stop_process


MAX_ROWS = 1 << 28


def key_bytes(table: int, rows: np.ndarray) -> np.ndarray:
    """uint8 [n, 5]: the keys of ``rows`` of ``table`` as an array (RedisRanker builds RESP from it)."""
    r = rows.astype(np.uint32, copy=False)
    k = np.empty((len(r), 5), dtype=np.uint8)
    k[:, 0] = 0x80 | table
    k[:, 1] = 0x80 | ((r >> 21) & 0x7F)
    k[:, 2] = 0x80 | ((r >> 14) & 0x7F)
    k[:, 3] = 0x80 | ((r >> 7) & 0x7F)
    k[:, 4] = 0x80 | (r & 0x7F)
    return k


def encode_keys(table: int, rows: np.ndarray) -> list[bytes]:
    """5-byte keys, vectorised (no per-id Python beyond numpy's tolist)."""
    return key_bytes(table, rows).view("S5").ravel().tolist()


class RedisServer:
    """A private redis-server on loopback (no persistence), stopped by pid."""

    def __init__(self, port: int = 0, maxmemory: str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        if port == 0:
            port = free_ports(1)[0]
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="flexemr-redis-")
        args = [exe, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--protected-mode", "yes", "--io-threads", "1"]
        if maxmemory:
            args += ["--maxmemory", maxmemory]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("redis-server did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


__all__ = ["RedisServer", "encode_keys", "key_bytes"]
