"""``model.toml``: the architecture of a DLRM-family model.

Layout of a model directory (a contract, see DESIGN.md)::

    MODEL_DIR/
      model.toml          architecture (this module)
      dense.pt            torch state_dict of the MLPs (flexemr.model.dense)
      tables/NAME.npy     float32 [rows, dim], C order (flexemr.model.tables)

This module needs no torch, so emrctl and the embedding servers can read specs
cheaply.  Every problem is reported at once, each naming its file and key.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from flexemr.errors import ModelError
from flexemr.types import Interaction, Pooling

try:  # Python 3.11+
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as _toml  # type: ignore[no-redef]

_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True, slots=True)
class TableSpec:
    """One embedding table: serves the sparse feature of the same name."""

    name: str
    rows: int
    dim: int
    pooling: Pooling = Pooling.SUM

    @property
    def nbytes(self) -> int:
        return self.rows * self.dim * 4


@dataclasses.dataclass(frozen=True, slots=True)
class ModelSpec:
    """The architecture read from ``model.toml``."""

    dense_features: int
    bottom_mlp: tuple[int, ...]
    top_mlp: tuple[int, ...]
    interaction: Interaction
    tables: tuple[TableSpec, ...]

    @property
    def table_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.tables)

    def table(self, name: str) -> TableSpec:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def table_index(self, name: str) -> int:
        for i, t in enumerate(self.tables):
            if t.name == name:
                return i
        raise KeyError(name)

    @property
    def top_input_width(self) -> int:
        """Width of the top MLP's input after the interaction."""
        d = self.bottom_mlp[-1]
        n = len(self.tables)
        if self.interaction is Interaction.DOT:
            return d + (n + 1) * n // 2
        return d + sum(t.dim for t in self.tables)

    @property
    def embedding_bytes(self) -> int:
        return sum(t.nbytes for t in self.tables)

    def to_toml(self) -> str:
        lines = [
            "[model]",
            f"dense_features = {self.dense_features}",
            f"bottom_mlp = {list(self.bottom_mlp)}",
            f"top_mlp = {list(self.top_mlp)}",
            f'interaction = "{self.interaction.value}"',
        ]
        for t in self.tables:
            lines += [
                "",
                "[[tables]]",
                f'name = "{t.name}"',
                f"rows = {t.rows}",
                f"dim = {t.dim}",
                f'pooling = "{t.pooling.label}"',
            ]
        return "\n".join(lines) + "\n"


def _int_list(v: object) -> bool:
    return isinstance(v, list) and len(v) > 0 and all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in v)


def parse_spec(doc: dict, source: str = "model.toml") -> ModelSpec:
    """Build a ModelSpec from a parsed TOML document, reporting every problem."""
    problems: list[str] = []
    model = doc.get("model")
    if not isinstance(model, dict):
        raise ModelError([f"{source}: missing [model] section"])
    known_model = {"dense_features", "bottom_mlp", "top_mlp", "interaction"}
    for key in sorted(set(model) - known_model):
        problems.append(f"{source}: [model].{key}: unknown key (expected one of {sorted(known_model)})")
    for key in sorted(set(doc) - {"model", "tables"}):
        problems.append(f"{source}: [{key}]: unknown section (expected [model] and [[tables]])")

    dense = model.get("dense_features")
    if not (isinstance(dense, int) and not isinstance(dense, bool) and dense > 0):
        problems.append(f"{source}: [model].dense_features: must be a positive integer, got {dense!r}")
    bottom = model.get("bottom_mlp")
    if not _int_list(bottom):
        problems.append(f"{source}: [model].bottom_mlp: must be a non-empty list of positive integers, got {bottom!r}")
    top = model.get("top_mlp")
    if not _int_list(top):
        problems.append(f"{source}: [model].top_mlp: must be a non-empty list of positive integers, got {top!r}")
    elif top[-1] != 1:
        problems.append(f"{source}: [model].top_mlp: last width must be 1 (the score), got {top[-1]}")
    inter_raw = model.get("interaction", "dot")
    try:
        interaction = Interaction(inter_raw)
    except ValueError:
        problems.append(f"{source}: [model].interaction: must be \"dot\" or \"cat\", got {inter_raw!r}")
        interaction = Interaction.DOT

    raw_tables = doc.get("tables")
    tables: list[TableSpec] = []
    if not isinstance(raw_tables, list) or not raw_tables:
        problems.append(f"{source}: [[tables]]: at least one table is required")
        raw_tables = []
    seen: set[str] = set()
    bad_dim: set[int] = set()  # tables whose dim was already reported: no second, invented complaint
    for i, t in enumerate(raw_tables):
        where = f"{source}: [[tables]][{i}]"
        if not isinstance(t, dict):
            problems.append(f"{where}: must be a table")
            continue
        for key in sorted(set(t) - {"name", "rows", "dim", "pooling"}):
            problems.append(f"{where}.{key}: unknown key (expected name, rows, dim, pooling)")
        name = t.get("name")
        if not (isinstance(name, str) and _NAME_RE.match(name)):
            problems.append(f"{where}.name: must be an identifier-like string, got {name!r}")
            name = f"#{i}"
        elif name in seen:
            problems.append(f"{where}.name: duplicate table name {name!r}")
        seen.add(name)
        rows, dim = t.get("rows"), t.get("dim")
        if not (isinstance(rows, int) and not isinstance(rows, bool) and rows > 0):
            problems.append(f"{where}.rows ({name}): must be a positive integer, got {rows!r}")
            rows = 1
        if not (isinstance(dim, int) and not isinstance(dim, bool) and dim > 0):
            problems.append(f"{where}.dim ({name}): must be a positive integer, got {dim!r}")
            dim = 1
            bad_dim.add(len(tables))
        try:
            pooling = Pooling.parse(str(t.get("pooling", "sum")))
        except ValueError as e:
            problems.append(f"{where}.pooling ({name}): {e}")
            pooling = Pooling.SUM
        tables.append(TableSpec(name=name, rows=rows, dim=dim, pooling=pooling))

    if _int_list(bottom) and interaction is Interaction.DOT:
        for i, t in enumerate(tables):
            if i not in bad_dim and t.dim != bottom[-1]:
                problems.append(
                    f"{source}: [[tables]][{i}].dim ({t.name}): {t.dim} must equal the last bottom_mlp width "
                    f"{bottom[-1]} under interaction \"dot\""
                )
    if problems:
        raise ModelError(problems)
    return ModelSpec(
        dense_features=dense,
        bottom_mlp=tuple(bottom),
        top_mlp=tuple(top),
        interaction=interaction,
        tables=tuple(tables),
    )


def load_spec(model_dir: str | Path) -> ModelSpec:
    """Read and validate ``MODEL_DIR/model.toml``."""
    path = Path(model_dir) / "model.toml"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ModelError([f"{path}: missing (a model directory needs model.toml)"]) from None
    try:
        doc = _toml.loads(text)
    except _toml.TOMLDecodeError as e:
        raise ModelError([f"{path}: not valid TOML: {e}"]) from None
    return parse_spec(doc, str(path))


def write_spec(model_dir: str | Path, spec: ModelSpec) -> Path:
    path = Path(model_dir) / "model.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.to_toml())
    return path
