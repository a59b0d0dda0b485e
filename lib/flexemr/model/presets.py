"""Named model shapes and ``init_model_dir``, which writes a random model directory.

Presets:

=========  ==========================  =====  ========  ===========  ======  ================  ==============
name       tables x rows               dim    ids/bag   interaction  dense   bottom_mlp        top_mlp
=========  ==========================  =====  ========  ===========  ======  ================  ==============
tiny       4 x 1001/2003/517/4099      16     8         dot          13      [32, 16]          [32, 16, 1]
tiny-cat   4 x 1001/2003/517/4099      16/8/  8         cat          13      [32, 16]          [32, 16, 1]
                                       24/12
rmc1       8 x 4,000,000               32     80        cat          128     [64, 32]          [256, 64, 1]
rmc2       32 x 500,000                64     120       cat          256     [128, 64]         [128, 64, 1]
rmc3       10 x 2,000,000              32     20        cat          2560    [1024, 256, 32]   [512, 256, 1]
bench8     8 x 1,000,000               64     20        dot          13      [256, 64]         [256, 64, 1]
=========  ==========================  =====  ========  ===========  ======  ================  ==============

The tiny presets use unequal, odd row counts (shard boundaries never line up
with powers of two) and every pooling mode; the RMC shapes are DeepRecSys'
(Gupta et al., ISCA 2020) recommendation model classes; ``bench8`` is the ranker
benchmark's model.  This module imports no torch until ``init_model_dir`` writes
``dense.pt``, so emrctl can list presets instantly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from flexemr.model.spec import ModelSpec, TableSpec, write_spec
from flexemr.model.tables import write_table
from flexemr.types import Interaction, Pooling

__all__ = ["Preset", "PRESETS", "get_preset", "init_model_dir"]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A model shape plus the typical number of ids per bag of its traffic."""

    name: str
    spec: ModelSpec
    ids_per_bag: int
    description: str = ""


def _uniform(n: int, rows: int, dim: int, pooling: Pooling = Pooling.SUM) -> tuple[TableSpec, ...]:
    return tuple(TableSpec(name=f"t{i}", rows=rows, dim=dim, pooling=pooling) for i in range(n))


_TINY_ROWS = (1001, 2003, 517, 4099)
_TINY_POOL = (Pooling.SUM, Pooling.MEAN, Pooling.MAX, Pooling.SUM)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny",
            ModelSpec(
                dense_features=13, bottom_mlp=(32, 16), top_mlp=(32, 16, 1), interaction=Interaction.DOT,
                tables=tuple(TableSpec(f"t{i}", r, 16, pl) for i, (r, pl) in enumerate(zip(_TINY_ROWS, _TINY_POOL))),
            ),
            ids_per_bag=8,
            description="tests: 4 small tables, every pooling mode, dot interaction",
        ),
        Preset(
            "tiny-cat",
            ModelSpec(
                dense_features=13, bottom_mlp=(32, 16), top_mlp=(32, 16, 1), interaction=Interaction.CAT,
                tables=tuple(TableSpec(f"t{i}", r, d, pl)
                             for i, (r, d, pl) in enumerate(zip(_TINY_ROWS, (16, 8, 24, 12), _TINY_POOL))),
            ),
            ids_per_bag=8,
            description="tests: like tiny, mixed dims, cat interaction",
        ),
        Preset(
            "rmc1",
            ModelSpec(dense_features=128, bottom_mlp=(64, 32), top_mlp=(256, 64, 1), interaction=Interaction.CAT,
                      tables=_uniform(8, 4_000_000, 32)),
            ids_per_bag=80,
            description="DeepRecSys RMC1: few tables, many lookups",
        ),
        Preset(
            "rmc2",
            ModelSpec(dense_features=256, bottom_mlp=(128, 64), top_mlp=(128, 64, 1), interaction=Interaction.CAT,
                      tables=_uniform(32, 500_000, 64)),
            ids_per_bag=120,
            description="DeepRecSys RMC2: many tables, embedding-dominated",
        ),
        Preset(
            "rmc3",
            ModelSpec(dense_features=2560, bottom_mlp=(1024, 256, 32), top_mlp=(512, 256, 1),
                      interaction=Interaction.CAT, tables=_uniform(10, 2_000_000, 32)),
            ids_per_bag=20,
            description="DeepRecSys RMC3: MLP-dominated",
        ),
        Preset(
            "bench8",
            ModelSpec(dense_features=13, bottom_mlp=(256, 64), top_mlp=(256, 64, 1), interaction=Interaction.DOT,
                      tables=_uniform(8, 1_000_000, 64)),
            ids_per_bag=20,
            description="ranker benchmark: 8 x 1M x 64, sum pooling",
        ),
    )
}


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})") from None


def capped(spec: ModelSpec, rows_cap: int | None) -> ModelSpec:
    """``spec`` with every table's rows limited to ``rows_cap`` (None: unchanged)."""
    if rows_cap is None:
        return spec
    if rows_cap < 1:
        raise ValueError(f"rows_cap must be a positive integer, got {rows_cap}")
    return dataclasses.replace(
        spec, tables=tuple(dataclasses.replace(t, rows=min(t.rows, rows_cap)) for t in spec.tables)
    )


def dense_param_count(spec: ModelSpec) -> int:
    from flexemr.model.loader import dense_shapes

    n = 0
    for shape in dense_shapes(spec).values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def init_model_dir(
    out: str | Path,
    preset: str | Preset,
    seed: int = 0,
    rows_cap: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ModelSpec:
    """Write a random model directory for ``preset`` into ``out`` and return its spec.

    Tables are written in chunks (memory stays bounded whatever the preset) with
    seeds derived from ``seed`` and the table index; ``dense.pt`` from
    ``init_dense_state(spec, seed)``.  ``progress(done_bytes, total_bytes)`` is
    called as bytes land.  ``model.toml`` is written last, so an interrupted run
    leaves a directory that fails validation instead of one that looks whole.
    Existing files of the same names are overwritten; the caller decides whether
    ``out`` may be non-empty.
    """
    from flexemr.model.dense import init_dense_state, save_dense  # imports torch

    p = get_preset(preset) if isinstance(preset, str) else preset
    spec = capped(p.spec, rows_cap)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # A stale model.toml would make a half-rewritten directory look whole.
    (out / "model.toml").unlink(missing_ok=True)
    dense_bytes = dense_param_count(spec) * 4
    total = spec.embedding_bytes + dense_bytes
    done = 0
    if progress is not None:
        progress(0, total)

    for i, t in enumerate(spec.tables):
        row_bytes = t.dim * 4

        def on_rows(n: int, row_bytes: int = row_bytes) -> None:
            nonlocal done
            done += n * row_bytes
            if progress is not None:
                progress(done, total)

        # Independent streams per table: the same (seed, index) always gives the
        # same table, whatever the other tables are.
        write_table(out, t, seed=seed * 1_000_003 + i, progress=on_rows)
    save_dense(out, init_dense_state(spec, seed))
    done += dense_bytes
    if progress is not None:
        progress(done, total)
    write_spec(out, spec)
    return spec
