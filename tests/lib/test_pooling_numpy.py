"""The numpy pooling kernel (``[embedding].kernel = "numpy"``) answers exactly what the torch kernel does.

Every pooling mode, odd shapes, empty bags (leading, trailing, all), repeated
ids, int32 and int64 ids, and the partials an embedding server sends; compared
bit for bit with ``pool_torch``.  An embedding store on the numpy kernel
never imports torch (a fresh interpreter checks ``sys.modules``), and rejects
an out-of-range id, negative ones included, by name.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexemr.pooling import TablePooler, pool_numpy, pool_reference, pool_torch
from flexemr.types import Pooling

REPO = Path(__file__).resolve().parents[2]


def bags(rng: np.random.Generator, rows: int, batch: int, max_len: int, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(0, max_len + 1, batch).astype(np.int64)
    lengths[rng.random(batch) < 0.2] = 0
    values = rng.integers(0, rows, int(lengths.sum())).astype(dtype)
    return values, lengths


@pytest.mark.parametrize("pooling", list(Pooling))
@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (1001, 13), (257, 64)])
def test_numpy_kernel_equals_the_torch_kernel_bit_for_bit(pooling: Pooling, dtype: type, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] * 31 + shape[1])
    table = rng.standard_normal(shape).astype(np.float32)
    for batch, max_len in [(1, 0), (1, 5), (9, 40), (300, 12)]:
        values, lengths = bags(rng, shape[0], batch, max_len, dtype)
        got = pool_numpy(table, values, lengths, pooling)
        want = pool_torch(table, values, lengths, pooling)
        assert got.dtype == np.float32 and got.shape == (batch, shape[1])
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, pool_reference(table, values, lengths, pooling), rtol=1e-4, atol=1e-5)


def test_empty_bags_pool_to_zeros_and_partials_match() -> None:
    table = np.arange(12, dtype=np.float32).reshape(4, 3) - 6.0   # all negative rows in max: zeros stay zeros
    values = np.array([3, 3, 0], np.int64)
    lengths = np.array([0, 2, 0, 1, 0], np.int64)
    for pooling in Pooling:
        by_numpy = TablePooler(table, pooling, kernel="numpy")
        by_torch = TablePooler(table, pooling)
        np.testing.assert_array_equal(by_numpy.pool(values, lengths), by_torch.pool(values, lengths))
        np.testing.assert_array_equal(by_numpy.partial(values, lengths), by_torch.partial(values, lengths))
        assert not by_numpy.pool(values, lengths)[[0, 2, 4]].any()


def test_bad_kernel_and_bad_ids_are_named() -> None:
    table = np.zeros((5, 2), np.float32)
    with pytest.raises(ValueError, match="kernel must be one of torch, numpy, got 'cuda'"):
        TablePooler(table, Pooling.SUM, kernel="cuda")
    with pytest.raises(ValueError, match="id -1 is outside"):
        pool_numpy(table, np.array([-1]), np.array([1]), Pooling.SUM)
    with pytest.raises(ValueError, match="id 5 is outside"):
        pool_numpy(table, np.array([5]), np.array([1]), Pooling.MAX)


def test_a_numpy_kernel_store_never_imports_torch_and_pools_like_torch(tmp_path: Path) -> None:
    from flexemr.model.presets import init_model_dir
    from flexemr.model.spec import load_spec
    from flexemr.model.tables import open_tables
    from flexemr.pooling import partial_pooling

    model = tmp_path / "m"
    init_model_dir(model, "tiny", seed=5)
    code = f"""
import sys
import numpy as np
from flexemr.model.spec import load_spec
from flexemr.routing.table import RoutingTable
from flexemrd.embedding.store import EmbeddingStore
spec = load_spec({str(model)!r})
store = EmbeddingStore({str(model)!r}, spec, RoutingTable.build(spec, 1).shards_of(0), kernel="numpy")
rng = np.random.default_rng(3)
out = {{}}
for t in spec.tables:
    lengths = rng.integers(0, 4, 5)
    values = rng.integers(0, t.rows, int(lengths.sum()))
    out[t.name + ".v"], out[t.name + ".l"] = values, lengths
    out[t.name] = store.tables[spec.table_index(t.name)].pooler.partial(values, lengths)
assert "torch" not in sys.modules, "the numpy kernel imported torch"
np.savez(sys.argv[1], **out)
"""
    out = tmp_path / "numpy.npz"
    env = {"PYTHONPATH": f"{REPO / 'lib'}:{REPO}", "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", code, str(out)], check=True, env=env, cwd=REPO, timeout=120)
    spec = load_spec(model)
    tables = open_tables(model, spec, [t.name for t in spec.tables])
    got = np.load(out)
    for t in spec.tables:
        want = pool_torch(tables[t.name], got[t.name + ".v"], got[t.name + ".l"], partial_pooling(t.pooling))
        np.testing.assert_array_equal(got[t.name], want, err_msg=t.name)
