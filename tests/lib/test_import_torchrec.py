"""`emrctl model import --from torchrec`: a real TorchRec DLRM, imported, scores exactly as TorchRec does.

Each check compares with ``torch.sigmoid(dlrm(dense, kjt))`` computed by
TorchRec itself, for batches with empty bags and repeated ids: in-process
(our loader, pooling and DLRM forward) and served by a real ``flexemrd local``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

try:
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
except Exception as e:  # ImportError, or fbgemm's CUDA build failing to load (scripts/setup.sh installs the CPU one)
    pytest.skip(f"torchrec is not usable here: {e}", allow_module_level=True)

from emrctl.model_cmd import model as model_cli
from flexemr.client import InferenceClient
from flexemr.model.importers.common import CheckpointError, ImportOptions, UnsupportedCheckpoint, write_model_dir
from flexemr.model.importers.torchrec import import_torchrec, interaction_columns, plan_torchrec
from flexemr.model.loader import open_model
from flexemr.pooling import pool_torch
from flexemr.types import Pooling
from tests.conftest import LocalCluster

REPO = Path(__file__).resolve().parents[2]
D = 8
DENSE_IN = 6
# (table, feature, rows): different sizes, feature names unlike table names (so --name-map is exercised)
TABLES = [("user_tbl", "user", 97), ("item_tbl", "item", 1009), ("cat_tbl", "cat", 13), ("geo_tbl", "geo", 250)]
NAME_MAP = {t: f for t, f, _ in TABLES}
FEATURES = [f for _, f, _ in TABLES]


def _randomise(module: torch.nn.Module, seed: int) -> None:
    """Weights large enough that every interaction term moves the score (TorchRec's init keeps them tiny)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "embedding_bags" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / sum(p.shape)) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _ebc(pooling: dict[str, PoolingType] | None = None, features: dict[str, list[str]] | None = None):
    pooling = pooling or {}
    features = features or {}
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=t, embedding_dim=D, num_embeddings=rows, feature_names=features.get(t, [f]),
                           pooling=pooling.get(t, PoolingType.SUM))
        for t, f, rows in TABLES])


def build_dlrm(seed: int, pooling: dict[str, PoolingType] | None = None) -> DLRM:
    torch.manual_seed(seed)
    m = DLRM(embedding_bag_collection=_ebc(pooling), dense_in_features=DENSE_IN,
             dense_arch_layer_sizes=[16, D], over_arch_layer_sizes=[24, 12, 1])
    _randomise(m, seed)
    return m.eval()


def make_batch(rng: np.random.Generator, b: int) -> tuple[np.ndarray, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """Dense [b, DENSE_IN] and bags with empty bags (a wholly empty sample too) and repeated ids."""
    dense = rng.standard_normal((b, DENSE_IN)).astype(np.float32)
    sparse = {}
    for _, f, rows in TABLES:
        lengths = rng.integers(0, 6, size=b).astype(np.int32)
        lengths[0] = 0                         # sample 0 has no id in any table
        lengths[1] = 4
        lengths[2 % b] = max(int(lengths[2 % b]), 1)
        values = rng.integers(0, rows, size=int(lengths.sum())).astype(np.int64)
        values[:4] = values[0]                 # sample 1: one id four times
        values[-1] = rows - 1                  # the last row of the table is reached
        sparse[f] = (values, lengths)
    return dense, sparse


def torchrec_scores(m: torch.nn.Module, dense: np.ndarray, sparse, keys=FEATURES) -> np.ndarray:
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys),
        values=torch.from_numpy(np.concatenate([sparse[k][0] for k in keys])),
        lengths=torch.from_numpy(np.concatenate([sparse[k][1] for k in keys])),
    )
    with torch.no_grad():
        return torch.sigmoid(m(torch.from_numpy(dense), kjt)).squeeze(1).numpy()


def our_scores(model_dir: Path, dense: np.ndarray, sparse, dense_model=None) -> np.ndarray:
    """Our loader, our pooling kernel and our DLRM forward (lib/flexemr/model/dense.py)."""
    loaded = open_model(model_dir)
    net = dense_model or loaded.dense
    with torch.inference_mode():
        pooled = [torch.from_numpy(pool_torch(loaded.tables[t.name], *sparse[t.name], t.pooling)) for t in loaded.spec.tables]
        return net(torch.from_numpy(dense), pooled).numpy()


def save(m: torch.nn.Module, path: Path) -> Path:
    torch.save(m.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrec")
    m = build_dlrm(seed=11)
    ckpt = save(m, tmp / "dlrm.pt")
    out = tmp / "model"
    plan = import_torchrec(ckpt, out, ImportOptions(name_map=NAME_MAP))
    return m, out, plan


def test_tables_and_shapes_come_from_the_weights(imported):
    m, out, plan = imported
    spec = plan.spec
    assert [(t.name, t.rows, t.dim) for t in spec.tables] == [(f, rows, D) for _, f, rows in TABLES]
    assert (spec.dense_features, spec.bottom_mlp, spec.top_mlp) == (DENSE_IN, (16, D), (24, 12, 1))
    loaded = open_model(out)
    for t, f, _ in TABLES:
        want = m.sparse_arch.embedding_bag_collection.embedding_bags[t].weight.detach().numpy()
        np.testing.assert_array_equal(loaded.tables[f], want)


@pytest.mark.parametrize("seed", [1, 2])
def test_scores_equal_torchrec_in_process(imported, seed):
    m, out, _ = imported
    dense, sparse = make_batch(np.random.default_rng(seed), 33)
    want = torchrec_scores(m, dense, sparse)
    got = our_scores(out, dense, sparse)
    assert want.std() > 0.05, "scores barely move: the comparison would prove little"
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_copying_the_interaction_columns_unpermuted_would_be_wrong(imported):
    """The column permutation is necessary: the naive import is visibly off on the same batch."""
    m, out, _ = imported
    dense, sparse = make_batch(np.random.default_rng(5), 33)
    naive = open_model(out).dense
    raw = m.over_arch.model[0]._mlp[0]._linear.weight.detach()
    with torch.no_grad():
        naive.top_mlp[0].weight.copy_(raw)
    assert np.abs(our_scores(out, dense, sparse, naive) - torchrec_scores(m, dense, sparse)).max() > 1e-3


def test_interaction_columns_map_torchrec_pairs_to_ours():
    # F = 2: theirs (0,1) (0,2) (1,2); ours (1,0) (2,0) (2,1): the same order for 3 vectors...
    assert interaction_columns(2).tolist() == [0, 1, 2]
    # ...but not for 4: ours (1,0) (2,0) (2,1) (3,0) (3,1) (3,2) are theirs 0, 1, 3, 2, 4, 5.
    assert interaction_columns(3).tolist() == [0, 1, 3, 2, 4, 5]
    cols = interaction_columns(7)
    assert sorted(cols.tolist()) == list(range(28))


def test_emrctl_import_with_mean_pooling_equals_torchrec(tmp_path):
    m = build_dlrm(seed=3, pooling={"item_tbl": PoolingType.MEAN})
    ckpt = save(m, tmp_path / "dlrm.pt")
    args = ["import", "--from", "torchrec", str(ckpt), "--out", str(tmp_path / "out"),
            *[a for t, f in NAME_MAP.items() for a in ("--name-map", f"{t}={f}")], "--table-pooling", "item=mean"]
    res = CliRunner().invoke(model_cli, args)
    assert res.exit_code == 0, res.output
    assert "item" in res.output and "mean" in res.output and "reordered" in res.output
    spec = open_model(tmp_path / "out").spec
    assert spec.table("item").pooling is Pooling.MEAN and spec.table("user").pooling is Pooling.SUM
    dense, sparse = make_batch(np.random.default_rng(8), 17)
    np.testing.assert_allclose(our_scores(tmp_path / "out", dense, sparse), torchrec_scores(m, dense, sparse),
                               rtol=0, atol=1e-5)
    # a second import into the same directory needs --force
    again = CliRunner().invoke(model_cli, args)
    assert again.exit_code != 0 and "--force" in again.output
    assert CliRunner().invoke(model_cli, [*args, "--force"]).exit_code == 0


def test_served_by_flexemrd_local_equals_torchrec(imported, tmp_path):
    m, out, _ = imported
    c = LocalCluster(out, tmp_path, servers=2, engines=1)
    try:
        with InferenceClient(c.socket) as client:
            for seed in (21, 22, 23):
                dense, sparse = make_batch(np.random.default_rng(seed), 29)
                got = client.predict(dense, sparse)
                np.testing.assert_allclose(got, torchrec_scores(m, dense, sparse), rtol=0, atol=1e-5)
    finally:
        rc = c.stop()
    assert rc == 0, c.logs()[-3000:]


def test_tables_are_copied_in_chunks_with_progress(imported, tmp_path):
    m, _, _ = imported
    plan = plan_torchrec(save(m, tmp_path / "dlrm.pt"), ImportOptions(name_map=NAME_MAP))
    seen: dict[str, list[int]] = {}
    write_model_dir(tmp_path / "out", plan, progress=lambda t, done, total: seen.setdefault(t, []).append(done),
                    chunk_bytes=100 * D * 4)  # 100 rows per chunk
    assert seen["item"] == [0, *range(100, 1009, 100), 1009]
    assert seen["cat"] == [0, 13]
    loaded = open_model(tmp_path / "out")
    want = m.sparse_arch.embedding_bag_collection.embedding_bags["item_tbl"].weight.detach().numpy()
    np.testing.assert_array_equal(loaded.tables["item"], want)


# --------------------------------------------------------------------------- bad checkpoints

def _state(seed: int = 4) -> dict[str, torch.Tensor]:
    return dict(build_dlrm(seed).state_dict())


def test_missing_key_is_named(tmp_path):
    state = _state()
    del state["over_arch.model.1.bias"]
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"over_arch\.model\.1\.bias: missing"):
        plan_torchrec(tmp_path / "bad.pt")


def test_wrong_shape_is_named(tmp_path):
    state = _state()
    state["dense_arch.model._mlp.1._linear.weight"] = torch.zeros(D, 15)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"dense_arch\.model\._mlp\.1\._linear\.weight: shape \(8, 15\)"):
        plan_torchrec(tmp_path / "bad.pt")


def test_embedding_dim_unlike_the_dense_output_is_named(tmp_path):
    state = _state()
    state["sparse_arch.embedding_bag_collection.embedding_bags.cat_tbl.weight"] = torch.zeros(13, 4)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"embedding_bags\.cat_tbl\.weight: embedding dim 4"):
        plan_torchrec(tmp_path / "bad.pt")


def test_dense_features_option_is_checked(tmp_path):
    with pytest.raises(CheckpointError, match=r"reads 6 dense features, but --dense-features says 13"):
        plan_torchrec(save(build_dlrm(1), tmp_path / "m.pt"), ImportOptions(dense_features=13))


def test_bad_table_name_asks_for_name_map(tmp_path):
    with pytest.raises(CheckpointError, match=r"user_tbl\.weight: table name '9lives' is not a valid flexemr table"):
        plan_torchrec(save(build_dlrm(1), tmp_path / "m.pt"), ImportOptions(name_map={"user_tbl": "9lives"}))
    with pytest.raises(CheckpointError, match=r"--name-map nope=x: the checkpoint has no table 'nope'"):
        plan_torchrec(tmp_path / "m.pt", ImportOptions(name_map={"nope": "x"}))


def test_dlrm_dcn_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    m = DLRM_DCN(embedding_bag_collection=_ebc(), dense_in_features=DENSE_IN, dense_arch_layer_sizes=[16, D],
                 over_arch_layer_sizes=[24, 1], dcn_num_layers=2, dcn_low_rank_dim=4)
    with pytest.raises(UnsupportedCheckpoint, match=r"DLRM_DCN checkpoints are not supported: .*inter_arch\.crossnet"):
        plan_torchrec(save(m, tmp_path / "dcn.pt"))
    res = CliRunner().invoke(model_cli, ["import", "--from", "torchrec", str(tmp_path / "dcn.pt"),
                                         "--out", str(tmp_path / "out")])
    assert res.exit_code == 1 and "DLRM_DCN checkpoints are not supported" in res.output
    assert not (tmp_path / "out" / "model.toml").exists()


def test_dlrm_projection_is_refused_clearly(tmp_path):
    torch.manual_seed(0)
    m = DLRM_Projection(embedding_bag_collection=_ebc(), dense_in_features=DENSE_IN, dense_arch_layer_sizes=[16, D],
                        over_arch_layer_sizes=[24, 1], interaction_branch1_layer_sizes=[4 * D, 3 * D],
                        interaction_branch2_layer_sizes=[4 * D, 2 * D])
    with pytest.raises(UnsupportedCheckpoint, match=r"DLRM_Projection checkpoints are not supported"):
        plan_torchrec(save(m, tmp_path / "proj.pt"))


def test_a_table_shared_by_two_features_is_refused(tmp_path):
    torch.manual_seed(0)
    ebc = _ebc(features={"geo_tbl": ["geo", "geo2"]})
    m = DLRM(embedding_bag_collection=ebc, dense_in_features=DENSE_IN, dense_arch_layer_sizes=[16, D],
             over_arch_layer_sizes=[24, 1])
    with pytest.raises(CheckpointError, match=r"5 sparse features: some table serves several features"):
        plan_torchrec(save(m, tmp_path / "shared.pt"))


def test_a_dlrm_reference_checkpoint_is_pointed_to_from_dlrm(tmp_path):
    torch.save({"emb_l.0.weight": torch.zeros(3, 2), "bot_l.0.weight": torch.zeros(2, 2)}, tmp_path / "ref.pt")
    with pytest.raises(CheckpointError, match=r"--from dlrm"):
        plan_torchrec(tmp_path / "ref.pt")


def test_a_pickled_module_is_refused_without_running_it(tmp_path):
    torch.save(build_dlrm(1), tmp_path / "module.pt")
    with pytest.raises(CheckpointError, match=r"weights-only load refuses .*state_dict"):
        plan_torchrec(tmp_path / "module.pt")


def test_emrctl_stays_torch_free():
    code = ("import sys, emrctl.cli, emrctl.model_cmd, flexemr.model.importers; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_large_table_is_never_held_twice_in_memory(tmp_path):
    """Importing a 244 MiB table raises the importer's peak RSS by well under the table's size.

    The checkpoint is memory-mapped and the rows go out chunk by chunk; without
    that, peak memory grows by the table once (read) or twice (read + written).
    """
    rows = 8_000_000  # x D=8 floats: 244 MiB
    state = _state()
    name = "sparse_arch.embedding_bag_collection.embedding_bags.item_tbl.weight"
    state[name] = torch.randn(rows, D)
    torch.save(state, tmp_path / "big.pt")
    del state
    table_bytes = rows * D * 4
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent (pytest) across exec.
    code = (
        "import re, sys\n"
        "from flexemr.model.importers.common import write_model_dir\n"
        "from flexemr.model.importers.torchrec import plan_torchrec\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024\n"
        "plan = plan_torchrec(sys.argv[1])\n"
        "before = peak()\n"
        "write_model_dir(sys.argv[2], plan)\n"
        "print(before, peak())\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.pt"), str(tmp_path / "out")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    before, after = map(int, res.stdout.split())
    assert after - before < table_bytes // 4, f"peak RSS grew by {(after - before) >> 20} MiB for a {table_bytes >> 20} MiB table"
    loaded = np.load(tmp_path / "out" / "tables" / "item_tbl.npy", mmap_mode="r")
    assert loaded.shape == (rows, D)
