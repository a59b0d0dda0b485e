"""What every system is measured on: the model directory and the request sets, made before any clock starts.

A model is written once per (preset, rows cap) under ``DIR/models`` by
``emrctl model init`` in a child process (writing dense.pt runs torch ops,
which the suite's parent process must not: see :mod:`flexemr_bench.suite`)
and reused by later runs.  Requests come from one
:class:`~flexemr.reqgen.RequestGenerator` per workload and are replayed
identically to every system (forked clients inherit them).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flexemr_bench.workloads import ModelWorkload

if TYPE_CHECKING:
    from flexemr.model.spec import ModelSpec
    from flexemr.reqgen import Batch, RequestGenerator

Log = Callable[[str], None]


def ensure_model(models_dir: Path, preset: str, rows_cap: int, log: Log, seed: int = 0) -> Path:
    """``models_dir/<preset>-<rows_cap>``, written by ``emrctl model init`` unless already whole."""
    from flexemr.model.loader import validate_model_dir
    from flexemr.model.presets import capped, get_preset
    from flexemr.model.spec import load_spec

    out = models_dir / f"{preset}-{rows_cap}"
    want = capped(get_preset(preset).spec, rows_cap)
    if (out / "model.toml").exists():
        try:
            if load_spec(out) == want and not validate_model_dir(out):
                log(f"model {out} exists, reusing it")
                return out
        except Exception:  # any problem: rewrite it
            pass
    log(f"writing model {preset} capped at {rows_cap:,} rows per table to {out} "
        f"({want.embedding_bytes / 2**20:,.0f} MiB of tables) ...")
    # A child process: writing dense.pt runs torch ops, which this process must not (see module docstring).
    cmd = [sys.executable, "-m", "emrctl", "model", "init", "--preset", preset, "--out", str(out),
           "--rows-cap", str(rows_cap), "--seed", str(seed), "--force"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}")
    return out


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    """A workload's model on disk, with what request generation needs to know about it."""

    workload: ModelWorkload
    dir: Path
    spec: ModelSpec
    ids_per_bag: int                     # the preset's mean ids per bag

    @property
    def ids_per_sample(self) -> int:
        return self.ids_per_bag * len(self.spec.tables)

    def summary(self) -> dict[str, Any]:
        """The workload's entry under results.json ``models``."""
        s = self.spec
        return {
            "preset": self.workload.preset, "dir": str(self.dir), "tables": len(s.tables),
            "rows_per_table": max(t.rows for t in s.tables), "dims": sorted({t.dim for t in s.tables}),
            "ids_per_bag": self.ids_per_bag, "dense_features": s.dense_features,
            "interaction": s.interaction.value, "embedding_mib": round(s.embedding_bytes / 2**20, 1),
        }


def prepare_model(wl: ModelWorkload, models_dir: Path, log: Log) -> PreparedModel:
    """``wl``'s model, written unless already there (see :func:`ensure_model`)."""
    from flexemr.model.presets import get_preset
    from flexemr.model.spec import load_spec

    preset = get_preset(wl.preset)
    model = ensure_model(models_dir, wl.preset, wl.rows_cap, log)
    return PreparedModel(wl, model, load_spec(model), preset.ids_per_bag)


def request_generator(model: PreparedModel, zipf: float, seed: int, drift_every: int) -> RequestGenerator:
    """The workload's one request stream: Zipf ids scattered over each table, a hot set that drifts."""
    from flexemr.reqgen import RequestGenerator

    return RequestGenerator(model.spec, model.ids_per_bag, zipf_exponent=zipf, seed=seed + 17,
                            drift_every=drift_every)


def make_requests(gen: RequestGenerator, batch: int, ids_per_sample: int, wl: ModelWorkload,
                  per_set: int) -> list[Batch]:
    """Batches of ``batch`` samples from ``gen`` (its drift carries over from set to set)."""
    n = int(min(per_set, max(2, wl.max_ids_per_set // max(1, batch * ids_per_sample))))
    return [gen.batch(batch) for _ in range(n)]


def request_sets(gen: RequestGenerator, model: PreparedModel, per_set: int) -> dict[int, list[Batch]]:
    """One request set per batch size any phase drives, smallest batch first."""
    wl = model.workload
    return {b: make_requests(gen, b, model.ids_per_sample, wl, per_set) for b in wl.all_batches()}
