"""Presets, init_model_dir and `emrctl model init/validate/list-presets`."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from emrctl.model_cmd import model
from flexemr.model.loader import open_model, validate_model_dir
from flexemr.model.presets import PRESETS, get_preset, init_model_dir
from flexemr.model.spec import load_spec
from flexemr.types import Interaction, Pooling


def test_tiny_creates_a_valid_directory_in_seconds(tmp_path):
    seen = []
    t0 = time.perf_counter()
    spec = init_model_dir(tmp_path / "m", "tiny", seed=1, progress=lambda d, t: seen.append((d, t)))
    assert time.perf_counter() - t0 < 10
    assert validate_model_dir(tmp_path / "m") == []
    assert load_spec(tmp_path / "m") == spec == PRESETS["tiny"].spec
    rows = [t.rows for t in spec.tables]
    assert len(set(rows)) == len(rows) and all(r % 2 == 1 for r in rows)   # unequal, odd
    assert {t.pooling for t in spec.tables} == set(Pooling)
    loaded = open_model(tmp_path / "m")
    assert [a.shape for a in loaded.tables.values()] == [(t.rows, t.dim) for t in spec.tables]
    # progress: monotone, from 0 to the total, which covers every table byte
    done = [d for d, _ in seen]
    assert done[0] == 0 and done == sorted(done) and done[-1] == seen[-1][1] >= spec.embedding_bytes


def test_tiny_cat_has_mixed_dims_and_cat():
    spec = PRESETS["tiny-cat"].spec
    assert spec.interaction is Interaction.CAT and len({t.dim for t in spec.tables}) > 1


@pytest.mark.parametrize("name, tables, rows, dim, ids, dense, bottom, top, inter", [
    ("rmc1", 8, 4_000_000, 32, 80, 128, (64, 32), (256, 64, 1), "cat"),
    ("rmc2", 32, 500_000, 64, 120, 256, (128, 64), (128, 64, 1), "cat"),
    ("rmc3", 10, 2_000_000, 32, 20, 2560, (1024, 256, 32), (512, 256, 1), "cat"),
    ("bench8", 8, 1_000_000, 64, 20, 13, (256, 64), (256, 64, 1), "dot"),
])
def test_big_preset_shapes(name, tables, rows, dim, ids, dense, bottom, top, inter):
    p = get_preset(name)
    s = p.spec
    assert (len(s.tables), p.ids_per_bag, s.dense_features, s.bottom_mlp, s.top_mlp, s.interaction.value) == \
        (tables, ids, dense, bottom, top, inter)
    assert all((t.rows, t.dim) == (rows, dim) for t in s.tables)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown preset 'rmc9'.*tiny.*rmc1"):
        get_preset("rmc9")


def test_rows_cap_caps_every_table(tmp_path):
    spec = init_model_dir(tmp_path, "rmc1", rows_cap=777)
    assert all(t.rows == 777 for t in spec.tables) and len(spec.tables) == 8
    assert validate_model_dir(tmp_path) == []
    assert np.load(tmp_path / "tables" / "t7.npy", mmap_mode="r").shape == (777, 32)
    assert load_spec(tmp_path).tables[0].rows == 777
    # tables smaller than the cap keep their size
    assert [t.rows for t in init_model_dir(tmp_path / "t", "tiny", rows_cap=1500).tables] == [1001, 1500, 517, 1500]


def test_same_seed_same_files(tmp_path):
    init_model_dir(tmp_path / "a", "tiny", seed=4)
    init_model_dir(tmp_path / "b", "tiny", seed=4)
    init_model_dir(tmp_path / "c", "tiny", seed=5)
    for f in ("tables/t0.npy", "tables/t3.npy"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        assert (tmp_path / "a" / f).read_bytes() != (tmp_path / "c" / f).read_bytes()
    t0, t1 = (np.load(tmp_path / "a" / "tables" / f"t{i}.npy") for i in (0, 1))
    assert not np.array_equal(t0[:500], t1[:500]), "each table has its own random stream"


# --------------------------------------------------------------------------- emrctl model


def test_cli_init_validate_and_refuse_non_empty(tmp_path):
    runner = CliRunner()
    out = tmp_path / "m"
    r = runner.invoke(model, ["init", "--preset", "tiny", "--out", str(out), "--seed", "3"])
    assert r.exit_code == 0, r.output
    assert str(out.resolve()) in r.output
    assert "tables:   4" in r.stdout and "rows:     7,620" in r.stdout and "487,680" in r.stdout
    assert "writing tiny" in r.stderr and "writing" not in r.stdout, "progress goes to stderr"

    r = runner.invoke(model, ["validate", str(out)])
    assert r.exit_code == 0 and r.output.startswith("ok: ") and "4 tables" in r.output

    before = (out / "dense.pt").read_bytes()
    r = runner.invoke(model, ["init", "--preset", "tiny-cat", "--out", str(out)])
    assert r.exit_code != 0
    assert "is not empty" in r.output and "--force" in r.output
    assert (out / "dense.pt").read_bytes() == before, "a refused init touches nothing"

    (out / "tables" / "stale.npy").write_bytes(b"x")
    (out / "NOTES.txt").write_text("mine")
    r = runner.invoke(model, ["init", "--preset", "tiny-cat", "--out", str(out), "--force"])
    assert r.exit_code == 0, r.output
    assert not (out / "tables" / "stale.npy").exists(), "--force clears stale tables"
    assert (out / "NOTES.txt").read_text() == "mine", "--force removes model files only"
    assert load_spec(out).interaction is Interaction.CAT
    assert runner.invoke(model, ["validate", str(out)]).exit_code == 0


def test_cli_validate_reports_corrupted_tables_and_dense_by_file(tmp_path):
    init_model_dir(tmp_path, "tiny", seed=0)
    np.save(tmp_path / "tables" / "t1.npy", np.zeros((2003, 16), np.float64))     # wrong dtype
    np.save(tmp_path / "tables" / "t2.npy", np.zeros((517, 15), np.float32))      # wrong shape
    (tmp_path / "tables" / "t3.npy").unlink()
    (tmp_path / "dense.pt").write_bytes(b"not a checkpoint")
    r = CliRunner().invoke(model, ["validate", str(tmp_path)])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert any("tables/t1.npy: dtype is float64" in ln for ln in lines)
    assert any("tables/t2.npy: shape is (517, 15)" in ln and "(517, 16)" in ln for ln in lines)
    assert any("tables/t3.npy: missing" in ln for ln in lines)
    assert any("dense.pt: not a loadable torch state_dict" in ln for ln in lines)
    assert "4 problems" in r.output

    r = CliRunner().invoke(model, ["validate", "--json", str(tmp_path)])
    doc = json.loads(r.output.splitlines()[0])
    assert r.exit_code == 1 and doc["ok"] is False and len(doc["problems"]) == 4


def test_cli_validate_of_a_missing_directory(tmp_path):
    r = CliRunner().invoke(model, ["validate", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "not a directory" in r.output


def test_cli_list_presets():
    r = CliRunner().invoke(model, ["list-presets"])
    assert r.exit_code == 0
    for name in PRESETS:
        assert name in r.output
    doc = json.loads(CliRunner().invoke(model, ["list-presets", "--json"]).output)
    assert {d["name"] for d in doc} == set(PRESETS)
    assert next(d for d in doc if d["name"] == "rmc2")["embedding_bytes"] == 32 * 500_000 * 64 * 4


def test_emrctl_model_imports_no_torch():
    code = "import sys, emrctl.model_cmd; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
