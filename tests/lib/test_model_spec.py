"""model.toml: every problem reported at once, each naming its file and key."""

from __future__ import annotations

import pytest

from flexemr.errors import ModelError
from flexemr.model.presets import PRESETS
from flexemr.model.spec import load_spec, parse_spec, write_spec
from flexemr.types import Interaction, Pooling


def _doc(**model):
    base = {"dense_features": 13, "bottom_mlp": [32, 16], "top_mlp": [32, 1], "interaction": "dot"}
    base.update(model)
    return {"model": base, "tables": [{"name": "a", "rows": 10, "dim": 16}, {"name": "b", "rows": 20, "dim": 16}]}


def _problems(doc) -> list[str]:
    with pytest.raises(ModelError) as ei:
        parse_spec(doc, "m/model.toml")
    return ei.value.problems


def test_valid_document_parses_with_defaults():
    spec = parse_spec(_doc())
    assert spec.table_names == ("a", "b")
    assert spec.tables[0].pooling is Pooling.SUM
    assert spec.interaction is Interaction.DOT
    assert spec.top_input_width == 16 + 3  # x plus pairs (a,x), (b,x), (b,a)


def test_every_bad_key_is_named_in_one_error():
    doc = _doc(dense_features=0, top_mlp=[32, 2], colour="red", interaction="concat")
    doc["tables"] = [
        {"name": "a", "rows": -1, "dim": 16, "size": 3},
        {"name": "a", "rows": 5, "dim": 16},
        {"name": "9bad", "rows": 5, "dim": "x"},
    ]
    doc["extra"] = {}
    probs = _problems(doc)
    expected = [
        "[model].colour: unknown key",
        "[extra]: unknown section",
        "[model].dense_features: must be a positive integer, got 0",
        "[model].top_mlp: last width must be 1",
        "[model].interaction: must be \"dot\" or \"cat\", got 'concat'",
        "[[tables]][0].size: unknown key",
        "[[tables]][0].rows (a): must be a positive integer, got -1",
        "[[tables]][1].name: duplicate table name 'a'",
        "[[tables]][2].name: must be an identifier-like string, got '9bad'",
        "[[tables]][2].dim (#2): must be a positive integer, got 'x'",
    ]
    for want in expected:
        assert any(want in p for p in probs), f"{want!r} not reported in {probs}"
    assert all(p.startswith("m/model.toml: ") for p in probs)
    assert len(probs) == len(expected)


def test_an_invalid_dim_is_reported_once():
    doc = _doc()
    doc["tables"][1]["dim"] = "x"
    probs = _problems(doc)
    assert probs == ["m/model.toml: [[tables]][1].dim (b): must be a positive integer, got 'x'"]


def test_dim_mismatch_under_dot_names_the_table_and_the_rule():
    doc = _doc()
    doc["tables"][1]["dim"] = 8
    probs = _problems(doc)
    assert len(probs) == 1
    assert "[[tables]][1].dim (b): 8 must equal the last bottom_mlp width 16" in probs[0]
    assert "dot" in probs[0]
    # The same tables are fine under "cat": each pooled vector is simply concatenated.
    doc["model"]["interaction"] = "cat"
    spec = parse_spec(doc)
    assert spec.top_input_width == 16 + 16 + 8


def test_unknown_pooling_is_named_with_the_accepted_modes():
    doc = _doc()
    doc["tables"][1]["pooling"] = "median"
    probs = _problems(doc)
    assert len(probs) == 1
    assert "[[tables]][1].pooling (b)" in probs[0]
    assert "'median'" in probs[0] and "sum, mean or max" in probs[0]


def test_missing_tables_and_model_section():
    assert "at least one table" in _problems({"model": _doc()["model"]})[0]
    assert "missing [model] section" in _problems({"tables": []})[0]


def test_load_spec_names_the_file(tmp_path):
    with pytest.raises(ModelError, match=r"model\.toml: missing"):
        load_spec(tmp_path)
    (tmp_path / "model.toml").write_text("[model\n")
    with pytest.raises(ModelError, match=r"model\.toml: not valid TOML"):
        load_spec(tmp_path)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_through_model_toml(tmp_path, name):
    spec = PRESETS[name].spec
    write_spec(tmp_path, spec)
    assert load_spec(tmp_path) == spec
