"""`emrctl model import --from dlrm`: facebookresearch/dlrm checkpoints score as the reference does.

``RefDLRMNet`` re-implements, small, the parts of ``dlrm_s_pytorch.DLRM_Net``
that decide a checkpoint's layout and its forward: ``create_mlp`` (an
nn.Sequential of Linear / activation pairs, Sigmoid after the layer at
``sigmoid_layer``), ``create_emb`` (nn.EmbeddingBag mode="sum"; PrEmbeddingBag
under --md-flag; learned per-row pooling weights ``v_W_l``), ``interact_features``
(``arch_interaction_itself`` False or True; "dot" or "cat") and the sequential
forward.  The checkpoint is written as ``--save-model`` writes it (numpy
scalars and optimizer state beside the state_dict).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from emrctl.model_cmd import model as model_cli
from flexemr.client import InferenceClient
from flexemr.model.importers.common import CheckpointError, ImportOptions, UnsupportedCheckpoint
from flexemr.model.importers.dlrm import import_dlrm, plan_dlrm
from flexemr.model.loader import open_model
from flexemr.pooling import pool_torch
from flexemr.types import Interaction
from tests.conftest import LocalCluster

ROWS = [50, 301, 7, 128]
M = 8              # --arch-sparse-feature-size
BOT = "6-16-8"     # --arch-mlp-bot
TOP = "24-12-1"    # --arch-mlp-top (the script prepends the interaction width)


class _PrEmbeddingBag(nn.Module):
    """--md-flag: a narrow table and a bias-free projection up to the base dim."""

    def __init__(self, n: int, dim: int, base: int) -> None:
        super().__init__()
        self.embs = nn.EmbeddingBag(n, dim, mode="sum")
        self.proj = nn.Linear(dim, base, bias=False) if dim < base else nn.Identity()

    def forward(self, idx, offsets, per_sample_weights=None):
        return self.proj(self.embs(idx, offsets, per_sample_weights=per_sample_weights))


class RefDLRMNet(nn.Module):
    """The reference DLRM_Net, small: same module layout (so the same state_dict keys), same forward."""

    def __init__(self, rows: list[int], m: int, ln_bot: np.ndarray, ln_top: np.ndarray, op: str = "dot",
                 itself: bool = False, md_dims: list[int] | None = None, learned_weights: bool = False) -> None:
        super().__init__()
        self.op, self.itself = op, itself
        self.emb_l = nn.ModuleList(
            nn.EmbeddingBag(n, m, mode="sum") if md_dims is None or md_dims[i] == m else _PrEmbeddingBag(n, md_dims[i], m)
            for i, n in enumerate(rows))
        self.weighted = learned_weights
        if learned_weights:
            self.v_W_l = nn.ParameterList(nn.Parameter(torch.ones(n)) for n in rows)
        self.bot_l = self._mlp(ln_bot, sigmoid_layer=-1)                # as the script: sigmoid_bot=-1
        self.top_l = self._mlp(ln_top, sigmoid_layer=len(ln_top) - 2)   # sigmoid_top = ln_top.size - 2

    @staticmethod
    def _mlp(ln: np.ndarray, sigmoid_layer: int) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(len(ln) - 1):
            layers.append(nn.Linear(int(ln[i]), int(ln[i + 1]), bias=True))
            layers.append(nn.Sigmoid() if i == sigmoid_layer else nn.ReLU())
        return nn.Sequential(*layers)

    def interact(self, x: torch.Tensor, ly: list[torch.Tensor]) -> torch.Tensor:
        if self.op == "cat":
            return torch.cat([x, *ly], dim=1)
        b, d = x.shape
        t = torch.cat([x, *ly], dim=1).view(b, -1, d)
        z = torch.bmm(t, t.transpose(1, 2))
        n = z.shape[1]
        extra = 1 if self.itself else 0
        li = torch.tensor([i for i in range(n) for _ in range(i + extra)])
        lj = torch.tensor([j for i in range(n) for j in range(i + extra)])
        return torch.cat([x, z[:, li, lj]], dim=1)

    def forward(self, dense_x: torch.Tensor, ls_o: list[torch.Tensor], ls_i: list[torch.Tensor]) -> torch.Tensor:
        x = self.bot_l(dense_x)
        ly = []
        for k, emb in enumerate(self.emb_l):
            w = self.v_W_l[k].gather(0, ls_i[k]) if self.weighted else None
            ly.append(emb(ls_i[k], ls_o[k], per_sample_weights=w))
        return self.top_l(self.interact(x, ly))


def build_ref(seed: int, op: str = "dot", itself: bool = False, md_dims=None, learned_weights=False,
              rows=ROWS, m=M, bot=BOT, top=TOP) -> RefDLRMNet:
    ln_bot = np.fromstring(bot, dtype=int, sep="-")
    n_fea = len(rows) + 1
    d = int(ln_bot[-1])
    if op == "dot":
        num_int = d + (n_fea * (n_fea + 1) // 2 if itself else n_fea * (n_fea - 1) // 2)
    else:
        num_int = n_fea * d
    ln_top = np.fromstring(f"{num_int}-{top}", dtype=int, sep="-")
    torch.manual_seed(seed)
    net = RefDLRMNet(list(rows), m, ln_bot, ln_top, op, itself, md_dims, learned_weights)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # large enough that every interaction term moves the score
        for name, p in net.named_parameters():
            if name.startswith("v_W_l"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)
            elif name.startswith("emb_l"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / sum(p.shape)) ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def save_like_save_model(net: nn.Module, path: Path) -> Path:
    """What ``dlrm_s_pytorch.py --save-model`` writes: the state_dict among training state and numpy scalars."""
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.save({
        "epoch": 0, "nepochs": 1, "nbatches": 100, "nbatches_test": 10, "iter": 100,
        "state_dict": net.state_dict(),
        "train_acc": np.float64(0.71), "train_loss": np.float64(0.52),
        "test_acc": np.float64(0.70), "test_loss": np.float64(0.53),
        "total_loss": np.float64(0.0), "total_accu": np.int64(0),
        "opt_state_dict": opt.state_dict(),
    }, path)
    return path


def make_batch(rng: np.random.Generator, b: int, rows=ROWS, dense_in: int = 6):
    """Dense input and bags (``t{i}`` -> (values, lengths)) with empty bags and repeated ids."""
    dense = rng.standard_normal((b, dense_in)).astype(np.float32)
    sparse = {}
    for i, n in enumerate(rows):
        lengths = rng.integers(0, 6, size=b).astype(np.int32)
        lengths[0] = 0
        lengths[1] = 3
        values = rng.integers(0, n, size=int(lengths.sum())).astype(np.int64)
        values[:3] = values[0]
        sparse[f"t{i}"] = (values, lengths)
    return dense, sparse


def ref_scores(net: RefDLRMNet, dense: np.ndarray, sparse) -> np.ndarray:
    ls_o, ls_i = [], []
    for i in range(len(net.emb_l)):
        values, lengths = sparse[f"t{i}"]
        ls_o.append(torch.from_numpy((np.cumsum(lengths) - lengths).astype(np.int64)))   # bag start offsets
        ls_i.append(torch.from_numpy(values))
    with torch.no_grad():
        return net(torch.from_numpy(dense), ls_o, ls_i).squeeze(1).numpy()


def our_scores(model_dir: Path, dense: np.ndarray, sparse) -> np.ndarray:
    loaded = open_model(model_dir)
    with torch.inference_mode():
        pooled = [torch.from_numpy(pool_torch(loaded.tables[t.name], *sparse[t.name], t.pooling)) for t in loaded.spec.tables]
        return loaded.dense(torch.from_numpy(dense), pooled).numpy()


def _check_equal(net, out, seeds=(1, 2), b=31):
    for seed in seeds:
        dense, sparse = make_batch(np.random.default_rng(seed), b)
        want = ref_scores(net, dense, sparse)
        assert want.std() > 0.05, "scores barely move: the comparison would prove little"
        np.testing.assert_allclose(our_scores(out, dense, sparse), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("op", ["dot", "cat"])
def test_scores_equal_the_reference(tmp_path, op):
    net = build_ref(seed=3, op=op)
    plan = import_dlrm(save_like_save_model(net, tmp_path / "dlrm.pt"), tmp_path / "out")
    assert plan.spec.interaction is Interaction(op)   # read from top_l.0's width, no option needed
    assert [(t.name, t.rows, t.dim) for t in plan.spec.tables] == [(f"t{i}", n, M) for i, n in enumerate(ROWS)]
    assert (plan.spec.dense_features, plan.spec.bottom_mlp, plan.spec.top_mlp) == (6, (16, 8), (24, 12, 1))
    assert any("ignored the training state" in n for n in plan.notes)
    _check_equal(net, tmp_path / "out")


def test_learned_pooling_weights_and_mixed_dims_are_folded_in_exactly(tmp_path):
    net = build_ref(seed=5, md_dims=[4, 8, 2, 8], learned_weights=True)
    keys = set(net.state_dict())
    assert {"emb_l.0.embs.weight", "emb_l.0.proj.weight", "emb_l.1.weight", "v_W_l.3"} <= keys
    plan = import_dlrm(save_like_save_model(net, tmp_path / "dlrm.pt"), tmp_path / "out")
    assert [t.dim for t in plan.spec.tables] == [M] * 4
    assert sum("folded" in n for n in plan.notes) == 4 + 2
    _check_equal(net, tmp_path / "out")


def test_emrctl_import_renames_tables(tmp_path):
    net = build_ref(seed=7)
    ckpt = save_like_save_model(net, tmp_path / "dlrm.pt")
    res = CliRunner().invoke(model_cli, ["import", "--from", "dlrm", str(ckpt), "--out", str(tmp_path / "out"),
                                         "--name-map", "0=user", "--name-map", "emb_l.1=item",
                                         "--name-map", "t2=cat"])
    assert res.exit_code == 0, res.output
    assert "user" in res.output and "emb_l.0.weight" in res.output
    assert open_model(tmp_path / "out").spec.table_names == ("user", "item", "cat", "t3")
    dense, sparse = make_batch(np.random.default_rng(4), 19)
    renamed = {"user": sparse["t0"], "item": sparse["t1"], "cat": sparse["t2"], "t3": sparse["t3"]}
    np.testing.assert_allclose(our_scores(tmp_path / "out", dense, renamed), ref_scores(net, dense, sparse),
                               rtol=0, atol=1e-5)


def test_served_by_flexemrd_local_equals_the_reference(tmp_path):
    net = build_ref(seed=9)
    out = tmp_path / "out"
    import_dlrm(save_like_save_model(net, tmp_path / "dlrm.pt"), out)
    c = LocalCluster(out, tmp_path, servers=2, engines=1)
    try:
        with InferenceClient(c.socket) as client:
            for seed in (31, 32):
                dense, sparse = make_batch(np.random.default_rng(seed), 27)
                np.testing.assert_allclose(client.predict(dense, sparse), ref_scores(net, dense, sparse),
                                           rtol=0, atol=1e-5)
    finally:
        rc = c.stop()
    assert rc == 0, c.logs()[-3000:]


def test_a_bare_state_dict_is_accepted(tmp_path):
    net = build_ref(seed=2)
    torch.save(net.state_dict(), tmp_path / "bare.pt")
    import_dlrm(tmp_path / "bare.pt", tmp_path / "out")
    _check_equal(net, tmp_path / "out", seeds=(3,))


# --------------------------------------------------------------------------- ambiguity and bad checkpoints

def test_a_width_that_fits_dot_and_cat_needs_interaction(tmp_path):
    # d = 2 and 3 tables: dot gives 2 + 6 inputs, cat 2 + 3*2: both 8
    net = build_ref(seed=1, op="cat", rows=[5, 6, 7], m=2, bot="6-4-2", top="4-1")
    ckpt = save_like_save_model(net, tmp_path / "dlrm.pt")
    with pytest.raises(CheckpointError, match=r"top_l\.0\.weight: .* fit both .* pass --interaction"):
        plan_dlrm(ckpt)
    plan = import_dlrm(ckpt, tmp_path / "out", ImportOptions(interaction=Interaction.CAT))
    assert plan.spec.interaction is Interaction.CAT
    dense, sparse = make_batch(np.random.default_rng(2), 23, rows=[5, 6, 7])
    np.testing.assert_allclose(our_scores(tmp_path / "out", dense, sparse), ref_scores(net, dense, sparse),
                               rtol=0, atol=1e-5)


def test_arch_interaction_itself_is_refused_clearly(tmp_path):
    ckpt = save_like_save_model(build_ref(seed=1, itself=True), tmp_path / "dlrm.pt")
    with pytest.raises(UnsupportedCheckpoint, match=r"--arch-interaction-itself .* not supported"):
        plan_dlrm(ckpt)


def test_tables_missing_from_the_end_are_named(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    del state["emb_l.3.weight"], state["emb_l.2.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"emb_l\.2\.weight \.\. emb_l\.3\.weight: missing"):
        plan_dlrm(tmp_path / "bad.pt")


def test_qr_embeddings_are_refused_clearly(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    w = state.pop("emb_l.1.weight")
    state["emb_l.1.weight_q"], state["emb_l.1.weight_r"] = w[:80], w[:4]
    torch.save({"state_dict": state}, tmp_path / "qr.pt")
    with pytest.raises(UnsupportedCheckpoint, match=r"emb_l\.1\.weight_q: quotient-remainder .* not supported"):
        plan_dlrm(tmp_path / "qr.pt")


def test_missing_key_is_named(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    del state["top_l.2.bias"]
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"top_l\.2\.bias: missing"):
        plan_dlrm(tmp_path / "bad.pt")


def test_wrong_shape_is_named(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    state["bot_l.2.weight"] = torch.zeros(8, 15)
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    res = CliRunner().invoke(model_cli, ["import", "--from", "dlrm", str(tmp_path / "bad.pt"),
                                         "--out", str(tmp_path / "out")])
    assert res.exit_code == 1
    assert "bot_l.2.weight: shape (8, 15), expected (*, 16)" in res.output


def test_a_sequential_of_another_layout_is_refused(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    state["top_l.3.weight"], state["top_l.3.bias"] = state.pop("top_l.2.weight"), state.pop("top_l.2.bias")
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"top_l\.3\.weight: a layer at an odd index"):
        plan_dlrm(tmp_path / "bad.pt")


def test_non_finite_table_rows_are_named(tmp_path):
    state = dict(build_ref(seed=1).state_dict())
    state["emb_l.2.weight"][4, 1] = float("nan")
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"emb_l\.2\.weight: row 4 holds NaN"):
        import_dlrm(tmp_path / "bad.pt", tmp_path / "out")
    assert not (tmp_path / "out" / "model.toml").exists()


def test_a_torchrec_checkpoint_is_pointed_to_from_torchrec(tmp_path):
    torch.save({"sparse_arch.embedding_bag_collection.embedding_bags.t.weight": torch.zeros(3, 2)}, tmp_path / "tr.pt")
    with pytest.raises(CheckpointError, match=r"--from torchrec"):
        plan_dlrm(tmp_path / "tr.pt")


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a loadable torch checkpoint"):
        plan_dlrm(tmp_path / "junk.pt")


def test_a_bad_checkpoint_never_costs_the_model_already_there(tmp_path):
    out = tmp_path / "out"
    import_dlrm(save_like_save_model(build_ref(seed=1), tmp_path / "good.pt"), out)
    before = {p.name: p.read_bytes() for p in [out / "model.toml", out / "dense.pt", *sorted((out / "tables").iterdir())]}
    state = dict(build_ref(seed=2).state_dict())
    del state["emb_l.1.weight"]
    torch.save({"state_dict": state}, tmp_path / "bad.pt")
    res = CliRunner().invoke(model_cli, ["import", "--from", "dlrm", str(tmp_path / "bad.pt"), "--out", str(out),
                                         "--force", "--json"])
    assert res.exit_code == 1 and '"emb_l.1.weight: missing' in res.output
    after = {p.name: p.read_bytes() for p in [out / "model.toml", out / "dense.pt", *sorted((out / "tables").iterdir())]}
    assert after == before
