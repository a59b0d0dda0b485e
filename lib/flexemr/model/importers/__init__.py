"""Importers: turn models trained elsewhere into flexemr model directories.

    from flexemr.model.importers import import_checkpoint
    from flexemr.model.importers.common import ImportOptions, StderrProgress
    plan = import_checkpoint("torchrec", "dlrm.pt", "models/mine", ImportOptions(), StderrProgress())

``torchrec`` reads a ``torchrec.models.dlrm.DLRM`` state_dict, ``dlrm`` a
facebookresearch/dlrm ``dlrm_s_pytorch.py --save-model`` checkpoint.  Each
importer module imports torch; this package's ``__init__`` imports them lazily
so that naming the sources costs nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flexemr.model.importers.common import ImportOptions, ImportPlan, Progress

__all__ = ["SOURCES", "plan_checkpoint", "import_checkpoint"]

# --from NAME -> "module:function" reading such a checkpoint: (checkpoint, options) -> ImportPlan.
SOURCES: dict[str, str] = {
    "torchrec": "flexemr.model.importers.torchrec:plan_torchrec",
    "dlrm": "flexemr.model.importers.dlrm:plan_dlrm",
}


def plan_checkpoint(source: str, checkpoint: str | Path, options: ImportOptions | None = None) -> ImportPlan:
    """Read and check ``checkpoint`` (of kind ``source``, a key of SOURCES); writes nothing.

    Raises CheckpointError (every problem, each naming its key) or ValueError for an unknown source.
    """
    import importlib

    try:
        target = SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown checkpoint source {source!r} (expected one of {', '.join(SOURCES)})") from None
    module, _, name = target.partition(":")
    fn: Callable[..., ImportPlan] = getattr(importlib.import_module(module), name)
    return fn(checkpoint, options)


def import_checkpoint(source: str, checkpoint: str | Path, out: str | Path,
                      options: ImportOptions | None = None, progress: Progress | None = None) -> ImportPlan:
    """Import ``checkpoint`` into the model directory ``out``; returns what was imported."""
    from flexemr.model.importers.common import write_model_dir

    plan = plan_checkpoint(source, checkpoint, options)
    write_model_dir(out, plan, progress)
    return plan
