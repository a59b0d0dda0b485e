"""The Redis baseline: an embedding store like HugeCTR HPS's Redis tier.

Rows live in a redis-server as binary values (float32 bytes), one key per
(table, row).  A lookup is as fast as we could honestly make it: per batch and
table the ids are de-duplicated (``np.unique``), fetched with pipelined MGETs
parsed by hiredis, joined with one ``b"".join`` into a numpy array, and pooled
on the ranker with torch's ``embedding_bag`` over the fetched rows.

Keys are 5 bytes without a zero byte (so numpy's fixed-width bytes views are
exact): ``0x80|table`` then the row in four 7-bit groups with the high bit set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Callable

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.types import Pooling

MAX_ROWS = 1 << 28
MGET_CHUNK = 16384


def encode_keys(table: int, rows: np.ndarray) -> list[bytes]:
    """5-byte keys, vectorised (no per-id Python beyond numpy's tolist)."""
    r = rows.astype(np.uint32, copy=False)
    k = np.empty((len(r), 5), dtype=np.uint8)
    k[:, 0] = 0x80 | table
    k[:, 1] = 0x80 | ((r >> 21) & 0x7F)
    k[:, 2] = 0x80 | ((r >> 14) & 0x7F)
    k[:, 3] = 0x80 | ((r >> 7) & 0x7F)
    k[:, 4] = 0x80 | (r & 0x7F)
    return k.view("S5").ravel().tolist()


class RedisServer:
    """A private redis-server on loopback (no persistence), stopped by pid."""

    def __init__(self, port: int = 0, maxmemory: str | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
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
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisEmbeddingStore:
    """Lookups against tables loaded into Redis; pooling happens here (the ranker)."""

    def __init__(self, spec: ModelSpec, port: int, host: str = "127.0.0.1") -> None:
        import redis

        self.spec = spec
        self.r = redis.Redis(host=host, port=port, socket_timeout=60)
        self.bytes_received = 0
        self.bytes_sent = 0

    def load(self, tables: dict[str, np.ndarray], progress: Callable[[int], None] | None = None,
             chunk: int = 8192) -> None:
        for ti, t in enumerate(self.spec.tables):
            arr = tables[t.name]
            if t.rows >= MAX_ROWS:
                raise ValueError(f"table {t.name}: {t.rows} rows exceed the key format's {MAX_ROWS}")
            for start in range(0, t.rows, chunk):
                end = min(t.rows, start + chunk)
                keys = encode_keys(ti, np.arange(start, end))
                block = np.ascontiguousarray(arr[start:end], dtype=np.float32)
                vals = [block[i].tobytes() for i in range(end - start)]  # setup only, not timed
                self.r.mset(dict(zip(keys, vals)))
                if progress:
                    progress(end - start)

    def fetch_rows(self, table: int, rows: np.ndarray) -> np.ndarray:
        """Rows [n, dim] for unique ``rows``, by pipelined MGETs."""
        dim = self.spec.tables[table].dim
        keys = encode_keys(table, rows)
        pipe = self.r.pipeline(transaction=False)
        for i in range(0, len(keys), MGET_CHUNK):
            pipe.mget(keys[i : i + MGET_CHUNK])
        parts = pipe.execute()
        blob = b"".join(v for chunk in parts for v in chunk)
        self.bytes_sent += 5 * len(keys) + 16 * len(parts)
        self.bytes_received += len(blob)
        if len(blob) != 4 * dim * len(rows):
            raise RuntimeError(f"table {self.spec.tables[table].name}: redis is missing rows")
        return np.frombuffer(blob, dtype=np.float32).reshape(len(rows), dim)

    def lookup(self, sparse: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
        import torch
        import torch.nn.functional as F

        out = {}
        for name, (values, lengths) in sparse.items():
            ti = self.spec.table_index(name)
            t = self.spec.tables[ti]
            uniq, inverse = np.unique(values, return_inverse=True)
            rows = self.fetch_rows(ti, uniq)
            offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
            np.cumsum(lengths, out=offsets[1:])
            mode = {Pooling.SUM: "sum", Pooling.MEAN: "mean", Pooling.MAX: "max"}[t.pooling]
            pooled = F.embedding_bag(torch.from_numpy(inverse.astype(np.int64)), torch.from_numpy(rows.copy()),
                                     torch.from_numpy(offsets), mode=mode, include_last_offset=True)
            out[name] = pooled.numpy()
        return out


def wire_bytes_per_sample(store: RedisEmbeddingStore, samples: int) -> float:
    return (store.bytes_received + store.bytes_sent) / max(1, samples)


__all__ = ["RedisServer", "RedisEmbeddingStore", "encode_keys", "wire_bytes_per_sample"]
