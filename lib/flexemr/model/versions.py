"""Model versions on disk: the delta format and applying a delta to a table exactly.

A *full* version is an ordinary model directory (model.toml, dense.pt,
tables/NAME.npy) with the same architecture as the version it replaces.  A
*delta* version names a base version and carries only changed rows::

    DELTA_DIR/
      delta/NAME.ids.npy    int64 [n]: changed row ids of table NAME, strictly increasing
      delta/NAME.rows.npy   float32 [n, dim]: their new values
      dense.pt              optional: the new dense NN (absent: the base's)

Tables without files are unchanged.  A delta is applied to a table by a
copy-on-write map of the base file (``np.load(mmap_mode="c")``) with the
changed rows written into it: pooling then runs the same kernel over the
same values a full copy would hold, so sum, mean and max stay exact, and
the memory cost is the pages the changed rows touch (each written page is
copied once; the rest stay shared with the page cache).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from flexemr.errors import ModelError
from flexemr.model.spec import ModelSpec, TableSpec

__all__ = ["DELTA_DIR", "is_delta", "read_delta", "write_delta", "apply_delta", "same_architecture",
           "BOOT_VERSION"]

DELTA_DIR = "delta"
BOOT_VERSION = 1   # the version id of the model a daemon was started with


def is_delta(path: str | Path) -> bool:
    """A delta directory has ``delta/`` and no ``model.toml``."""
    p = Path(path)
    return (p / DELTA_DIR).is_dir() and not (p / "model.toml").exists()


def _files(path: Path, name: str) -> tuple[Path, Path]:
    return path / DELTA_DIR / f"{name}.ids.npy", path / DELTA_DIR / f"{name}.rows.npy"


def read_delta(path: str | Path, spec: ModelSpec) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Changed (ids, rows) per table of the delta at ``path``, rows memory-mapped; every problem reported."""
    p = Path(path)
    if not (p / DELTA_DIR).is_dir():
        raise ModelError([f"{p}: not a delta directory (no {DELTA_DIR}/ inside)"])
    known = set(spec.table_names)
    problems: list[str] = []
    for f in sorted((p / DELTA_DIR).glob("*.npy")):
        stem = f.name[: -len(".ids.npy")] if f.name.endswith(".ids.npy") else f.name[: -len(".rows.npy")]
        if stem not in known:
            problems.append(f"{f}: the model has no table {stem!r} (tables: {', '.join(spec.table_names)})")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for t in spec.tables:
        ids_f, rows_f = _files(p, t.name)
        if not ids_f.exists() and not rows_f.exists():
            continue
        try:
            ids = np.load(ids_f, allow_pickle=False)
            rows = np.load(rows_f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            problems.append(f"{p}: table {t.name!r}: unreadable delta ({e})")
            continue
        problems += _check(p, t, ids, rows)
        out[t.name] = (ids, rows)
    if problems:
        raise ModelError(problems)
    return out


def _check(p: Path, t: TableSpec, ids: np.ndarray, rows: np.ndarray) -> list[str]:
    where = f"{p}/{DELTA_DIR}/{t.name}"
    if ids.dtype != np.int64 or ids.ndim != 1:
        return [f"{where}.ids.npy: must be int64 [n], got {ids.dtype} {ids.shape}"]
    if rows.dtype != np.float32 or rows.shape != (len(ids), t.dim):
        return [f"{where}.rows.npy: must be float32 ({len(ids)}, {t.dim}), got {rows.dtype} {rows.shape}"]
    if len(ids) and (ids[0] < 0 or ids[-1] >= t.rows):
        return [f"{where}.ids.npy: ids must lie in [0, {t.rows}), got {int(ids.min())}..{int(ids.max())}"]
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        return [f"{where}.ids.npy: ids must be strictly increasing (sorted, no repeats)"]
    return []


def write_delta(path: str | Path, changes: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write a delta directory (ids are sorted here; a dense.pt, if any, is the caller's to save)."""
    p = Path(path)
    (p / DELTA_DIR).mkdir(parents=True, exist_ok=True)
    for name, (ids, rows) in changes.items():
        ids = np.asarray(ids, dtype=np.int64)
        order = np.argsort(ids, kind="stable")
        ids_f, rows_f = _files(p, name)
        np.save(ids_f, ids[order])
        np.save(rows_f, np.ascontiguousarray(np.asarray(rows, dtype=np.float32)[order]))
    return p


def apply_delta(table_file: str | Path, deltas: Iterable[tuple[np.ndarray, np.ndarray]],
                ranges: Iterable[tuple[int, int]] | None = None) -> np.ndarray:
    """A copy-on-write map of ``table_file`` with each delta's rows written in order (later wins).

    Only rows inside ``ranges`` (the shards a server holds) are written: the
    others are never read there, so their pages stay shared.
    """
    arr = np.load(table_file, mmap_mode="c", allow_pickle=False)
    spans = list(ranges) if ranges is not None else [(0, arr.shape[0])]
    for ids, rows in deltas:
        keep = np.zeros(len(ids), dtype=bool)
        for a, b in spans:
            keep |= (ids >= a) & (ids < b)
        if keep.all():
            arr[ids] = rows
        elif keep.any():
            arr[ids[keep]] = np.asarray(rows)[keep]
    return arr


def same_architecture(a: ModelSpec, b: ModelSpec) -> list[str]:
    """Why model ``b`` cannot replace ``a`` live (empty: it can)."""
    problems = []
    for field in ("dense_features", "bottom_mlp", "top_mlp", "interaction"):
        if getattr(a, field) != getattr(b, field):
            problems.append(f"{field} is {getattr(b, field)!r}, the serving model has {getattr(a, field)!r}")
    if a.table_names != b.table_names:
        problems.append(f"tables are {list(b.table_names)}, the serving model has {list(a.table_names)}")
    else:
        for ta, tb in zip(a.tables, b.tables):
            if (ta.rows, ta.dim, ta.pooling) != (tb.rows, tb.dim, tb.pooling):
                problems.append(f"table {ta.name!r} is {tb.rows}x{tb.dim} {tb.pooling}, the serving model has "
                                f"{ta.rows}x{ta.dim} {ta.pooling}")
    return problems


def dense_dir_of(path: str | Path, base_dense_dir: str | None) -> str | None:
    """Where a pushed version's dense NN comes from: its own dense.pt, else (a delta) its base's."""
    return str(path) if (Path(path) / "dense.pt").exists() else base_dense_dir

