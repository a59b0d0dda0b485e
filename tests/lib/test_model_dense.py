"""dense.pt: the DLRM forward against an independent numpy reference, and checkpoint validation."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch

from flexemr.errors import ModelError
from flexemr.model.dense import DLRM, init_dense_state, load_dense, reference_forward_numpy, save_dense
from flexemr.model.loader import dense_problems, dense_shapes
from flexemr.model.presets import PRESETS
from flexemr.model.spec import ModelSpec, TableSpec
from flexemr.types import Interaction

CONTRACT_KEYS_TINY = [
    f"{part}.{i}.{kind}" for part, n in (("bottom_mlp", 2), ("top_mlp", 3)) for i in range(n) for kind in ("weight", "bias")
]


def _inputs(spec: ModelSpec, b: int, seed: int):
    rng = np.random.default_rng(seed)
    dense = rng.standard_normal((b, spec.dense_features)).astype(np.float32)
    pooled = [(rng.standard_normal((b, t.dim)) * 0.3).astype(np.float32) for t in spec.tables]
    return dense, pooled


@pytest.mark.parametrize("preset", ["tiny", "tiny-cat"])
def test_torch_forward_matches_numpy_reference(preset):
    spec = PRESETS[preset].spec
    state = init_dense_state(spec, seed=3)
    model = DLRM(spec)
    model.load_state_dict(state)
    dense, pooled = _inputs(spec, 37, seed=1)
    with torch.inference_mode():
        got = model(torch.from_numpy(dense), [torch.from_numpy(p) for p in pooled]).numpy()
    want = reference_forward_numpy({k: v.numpy() for k, v in state.items()}, spec, dense, pooled)
    assert got.shape == (37,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Scores are spread over (0, 1), not saturated: otherwise every comparison would pass trivially.
    assert 0.01 < got.min() and got.max() < 0.99 and got.std() > 1e-3
    # Table order matters: swapping two pooled inputs changes the answer.
    swapped = [pooled[1], pooled[0], *pooled[2:]] if preset == "tiny" else None
    if swapped is not None:
        alt = reference_forward_numpy({k: v.numpy() for k, v in state.items()}, spec, dense, swapped)
        assert np.abs(alt - want).max() > 1e-4


def test_dot_interaction_order_is_numpy_tril_row_major():
    """Interaction feature k is the k-th pair of tril_indices(T+1, -1): (1,0), (2,0), (2,1), (3,0), ...

    Three tables, so row-major differs from column-major ((3,0) before (2,1)).
    """
    spec = ModelSpec(dense_features=2, bottom_mlp=(2,), top_mlp=(1,), interaction=Interaction.DOT,
                     tables=tuple(TableSpec(n, 5, 2) for n in "abc"))
    feats = [np.array([[1.0, 2.0]], np.float32),        # x: the bottom is the identity on positive inputs
             np.array([[3.0, -1.0]], np.float32),
             np.array([[0.5, 4.0]], np.float32),
             np.array([[-2.0, 0.25]], np.float32)]
    order = list(zip(*np.tril_indices(4, -1)))
    assert order == [(1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
    for k, (i, j) in enumerate(order):
        want = float((feats[i] * feats[j]).sum())
        model = DLRM(spec)
        top = torch.zeros(1, 2 + 6)
        top[0, 2 + k] = 1.0                            # select interaction feature k
        model.load_state_dict({"bottom_mlp.0.weight": torch.eye(2), "bottom_mlp.0.bias": torch.zeros(2),
                               "top_mlp.0.weight": top, "top_mlp.0.bias": torch.zeros(1)})
        with torch.inference_mode():
            score = float(model(torch.from_numpy(feats[0]), [torch.from_numpy(f) for f in feats[1:]])[0])
        assert score == pytest.approx(1 / (1 + np.exp(-want)), rel=1e-6), f"pair {k} = {(i, j)}"


def test_state_dict_keys_are_the_contract_and_layer_indexed():
    spec = PRESETS["tiny"].spec
    assert list(DLRM(spec).state_dict()) == CONTRACT_KEYS_TINY
    assert list(init_dense_state(spec, 0)) == CONTRACT_KEYS_TINY
    assert dense_shapes(spec)["top_mlp.0.weight"] == (32, 16 + 10)   # x + C(5, 2) pairs


def test_init_is_deterministic_per_seed():
    spec = PRESETS["tiny"].spec
    a, b, c = init_dense_state(spec, 1), init_dense_state(spec, 1), init_dense_state(spec, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bottom_mlp.0.weight"], c["bottom_mlp.0.weight"])


def test_save_load_round_trip(tmp_path):
    spec = PRESETS["tiny-cat"].spec
    state = init_dense_state(spec, 5)
    save_dense(tmp_path, state)
    model = load_dense(tmp_path, spec)
    assert not model.training
    loaded = model.state_dict()
    assert list(loaded) == list(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert dense_problems(tmp_path, spec) == []
    assert not list(tmp_path.glob(".*tmp")), "the atomic write leaves no temporary file"


def _both(tmp_path, spec) -> list[str]:
    """Problems from the torch loader; asserts the torch-free validator finds the same ones."""
    with pytest.raises(ModelError) as ei:
        load_dense(tmp_path, spec)
    assert dense_problems(tmp_path, spec) == ei.value.problems
    return ei.value.problems


def test_validation_lists_every_wrong_shape_with_file_and_key(tmp_path):
    spec = PRESETS["tiny"].spec
    # Weights for 12 dense features and 3 tables, checked against 13 features and 4 tables.
    other = dataclasses.replace(spec, dense_features=12, tables=spec.tables[:3])
    save_dense(tmp_path, init_dense_state(other, 0))
    probs = _both(tmp_path, spec)
    path = tmp_path / "dense.pt"
    assert probs == [
        f"{path}: bottom_mlp.0.weight has shape (32, 12), model.toml implies (32, 13)",
        f"{path}: top_mlp.0.weight has shape (32, 22), model.toml implies (32, 26)",
    ]


def test_validation_reports_missing_unexpected_dtype_and_nan_together(tmp_path):
    spec = PRESETS["tiny"].spec
    state = init_dense_state(spec, 0)
    del state["top_mlp.2.bias"]
    state["top_mlp.1.weight"] = state["top_mlp.1.weight"].double()
    state["bottom_mlp.1.bias"] = torch.full((16,), float("nan"))
    state["top_mlp.3.weight"] = torch.zeros(1, 1)
    save_dense(tmp_path, state)
    probs = _both(tmp_path, spec)
    assert len(probs) == 4
    joined = "\n".join(probs)
    assert "missing key top_mlp.2.bias (model.toml implies shape (1,))" in joined
    assert "top_mlp.1.weight has dtype float64, must be float32" in joined
    assert "bottom_mlp.1.bias contains NaN" in joined
    assert "unexpected key top_mlp.3.weight" in joined
    assert all(p.startswith(f"{tmp_path / 'dense.pt'}: ") for p in probs)


def test_missing_and_foreign_checkpoints(tmp_path):
    spec = PRESETS["tiny"].spec
    assert "dense.pt: missing" in _both(tmp_path, spec)[0]
    torch.save(DLRM(spec), tmp_path / "dense.pt")          # the module, not its state_dict
    assert "dense.pt: not a" in _both(tmp_path, spec)[0]
    (tmp_path / "dense.pt").write_bytes(b"garbage")
    assert "dense.pt: not a loadable torch state_dict: neither a zip archive nor a pickle" in _both(tmp_path, spec)[0]
    save_dense(tmp_path, init_dense_state(spec, 0))
    whole = (tmp_path / "dense.pt").read_bytes()
    (tmp_path / "dense.pt").write_bytes(whole[: len(whole) // 2])
    assert "dense.pt: not a loadable torch state_dict: corrupt or truncated zip" in _both(tmp_path, spec)[0]


def test_validation_needs_no_torch(tmp_path):
    """emrctl and the supervisor validate dense.pt without importing torch (slow, unfork-friendly)."""
    spec = PRESETS["tiny"].spec
    state = init_dense_state(spec, 0)
    state["top_mlp.0.bias"] = torch.zeros(31)
    save_dense(tmp_path, state)
    code = (
        "import sys\n"
        "from flexemr.model.loader import dense_problems\n"
        "from flexemr.model.presets import PRESETS\n"
        f"p = dense_problems({str(tmp_path)!r}, PRESETS['tiny'].spec)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(p)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "top_mlp.0.bias has shape (31,), model.toml implies (32,)" in out.stdout
    (tmp_path / "dense.pt").write_bytes(b"\0" * 100)        # corruption is diagnosed without torch too
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "neither a zip archive nor a pickle" in out.stdout
