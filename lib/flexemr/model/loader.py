"""Validate and open a whole model directory (model.toml + tables/*.npy + dense.pt).

``validate_model_dir`` reports every problem of all three parts at once and needs
**no torch**: emrctl must answer fast, and the supervisor validates the model
before it forks, where importing torch is unwelcome (DESIGN.md, STYLE.md).  It
reads ``dense.pt`` with the torch-free reader in :mod:`flexemr.model.dense_file`;
an archive that reader does not understand (an older torch format, say) falls
back to ``torch.load`` with ``weights_only=True`` through
:func:`flexemr.model.dense.load_dense`.

``open_model`` loads everything for serving and raises one ModelError listing
every problem.  :mod:`flexemr.model.dense` is imported only inside the functions
that need torch, and it imports :mod:`~flexemr.model.dense_file`, never this
module, so there is no import loop.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from flexemr.errors import ModelError
from flexemr.model.dense_file import (
    DENSE_FILE,
    check_dense_entries,
    dense_file_problems,
    dense_path,
    dense_shapes,
    sniff_dense,
)
from flexemr.model.spec import ModelSpec, load_spec
from flexemr.model.tables import open_tables

if TYPE_CHECKING:  # torch is imported lazily, by open_model only
    from flexemr.model.dense import DLRM

__all__ = [
    "LoadedModel",
    "validate_model_dir",
    "open_model",
    "dense_path",
    "dense_shapes",
    "check_dense_entries",
    "dense_problems",
    "sniff_dense",
]


def dense_problems(model_dir: str | Path, spec: ModelSpec) -> list[str]:
    """Every problem of ``dense.pt`` against ``spec``; torch is imported only for unusual archives."""
    path = dense_path(model_dir)
    if not path.is_file():
        return [f"{path}: missing (a model directory needs dense.pt, the MLP weights)"]
    problems = dense_file_problems(path, spec)
    if problems is not None:
        return problems
    from flexemr.model.dense import load_dense  # an archive the torch-free reader does not know: imports torch

    try:
        load_dense(model_dir, spec)
    except ModelError as e:
        return e.problems
    return []


# --------------------------------------------------------------------------- whole directory

def validate_model_dir(model_dir: str | Path) -> list[str]:
    """Every problem of a model directory (spec, tables, dense weights); empty if it is valid.

    Tables and dense.pt are checked only when model.toml is valid, since both are
    checked against it.  Needs no torch.
    """
    d = Path(model_dir)
    if not d.is_dir():
        return [f"{d}: not a directory"]
    try:
        spec = load_spec(d)
    except ModelError as e:
        return e.problems
    problems: list[str] = []
    try:
        open_tables(d, spec)
    except ModelError as e:
        problems += e.problems
    problems += dense_problems(d, spec)
    return problems


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model directory opened for serving: spec, read-only table maps, the NN (eval mode, CPU)."""

    path: Path
    spec: ModelSpec
    tables: dict[str, np.ndarray]
    dense: DLRM


def open_model(model_dir: str | Path) -> LoadedModel:
    """Open spec, tables and dense.pt; raise one ModelError listing every problem."""
    from flexemr.model.dense import load_dense  # imports torch

    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError([f"{d}: not a directory"])
    spec = load_spec(d)
    problems: list[str] = []
    tables: dict[str, np.ndarray] = {}
    dense = None
    try:
        tables = open_tables(d, spec)
    except ModelError as e:
        problems += e.problems
    try:
        dense = load_dense(d, spec)
    except ModelError as e:
        problems += e.problems
    if problems:
        raise ModelError(problems)
    return LoadedModel(path=d, spec=spec, tables=tables, dense=dense)
