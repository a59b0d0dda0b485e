"""Embedding tables of a model directory: ``tables/NAME.npy`` memory maps.

Tables are opened read-only with ``np.load(mmap_mode="r")``: opening is
instant whatever the size, pages come from the page cache and are shared by
every process that maps the same file, and only the rows a process touches
become resident.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from flexemr.errors import ModelError
from flexemr.model.spec import ModelSpec, TableSpec


def table_path(model_dir: str | Path, name: str) -> Path:
    return Path(model_dir) / "tables" / f"{name}.npy"


def _check_table(path: Path, t: TableSpec, arr: np.ndarray) -> list[str]:
    problems = []
    if arr.dtype != np.float32:
        problems.append(f"{path}: dtype is {arr.dtype}, table {t.name!r} must be float32")
    if arr.shape != (t.rows, t.dim):
        problems.append(f"{path}: shape is {arr.shape}, model.toml says table {t.name!r} is ({t.rows}, {t.dim})")
    if not arr.flags.c_contiguous:
        problems.append(f"{path}: table {t.name!r} must be stored in C order")
    return problems


def open_tables(model_dir: str | Path, spec: ModelSpec, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Map the named tables (all by default) read-only; report every problem at once."""
    wanted = spec.tables if names is None else tuple(spec.table(n) for n in names)
    problems: list[str] = []
    out: dict[str, np.ndarray] = {}
    for t in wanted:
        path = table_path(model_dir, t.name)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            problems.append(f"{path}: missing (model.toml declares table {t.name!r})")
            continue
        except (ValueError, OSError) as e:
            problems.append(f"{path}: not a readable .npy file: {e}")
            continue
        found = _check_table(path, t, arr)
        if found:
            problems += found
            continue
        out[t.name] = arr
    if problems:
        raise ModelError(problems)
    return out


def write_table(model_dir: str | Path, t: TableSpec, seed: int, chunk_rows: int = 1 << 18, progress=None) -> Path:
    """Write a random N(0, 0.1) float32 table in chunks (bounded memory for big presets).

    ``progress`` is called with the number of rows just written.
    """
    path = table_path(model_dir, t.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(t.rows, t.dim))
    rng = np.random.default_rng(seed)
    for start in range(0, t.rows, chunk_rows):
        end = min(t.rows, start + chunk_rows)
        arr[start:end] = rng.standard_normal((end - start, t.dim), dtype=np.float32) * np.float32(0.1)
        if progress is not None:
            progress(end - start)
    arr.flush()
    del arr
    return path
