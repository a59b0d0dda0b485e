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

__all__ = ["SOURCES", "import_checkpoint"]

# --from NAME -> "module:function"; every function has the signature of import_checkpoint's tail.
SOURCES: dict[str, str] = {
    "torchrec": "flexemr.model.importers.torchrec:import_torchrec",
    "dlrm": "flexemr.model.importers.dlrm:import_dlrm",
}


def import_checkpoint(source: str, checkpoint: str | Path, out: str | Path,
                      options: ImportOptions | None = None, progress: Progress | None = None) -> ImportPlan:
    """Import ``checkpoint`` (of kind ``source``, a key of SOURCES) into the model directory ``out``."""
    import importlib

    try:
        target = SOURCES[source]
    except KeyError:
        raise ValueError(f"unknown checkpoint source {source!r} (expected one of {', '.join(SOURCES)})") from None
    module, _, name = target.partition(":")
    fn: Callable[..., ImportPlan] = getattr(importlib.import_module(module), name)
    return fn(checkpoint, out, options, progress)
