"""The one place that imports pyverbs.

Debian ships pyverbs as python3-pyverbs under /usr/lib/python3/dist-packages,
built for the distribution's Python; PyPI's pyverbs does not build against the
distribution's rdma-core.  A virtualenv or pyenv interpreter of the same
minor version can load that copy, so when a plain ``import pyverbs`` fails the
directory is appended (last, so nothing this interpreter already has is
shadowed) and the import is retried.  Every other module of the verbs layer
gets pyverbs through ``load_pyverbs``, so the path juggling happens once.
"""

from __future__ import annotations

import functools
import importlib
import sys
import types

from flexemr.transport.rdma.errors import RdmaUnavailable

DIST_PACKAGES = "/usr/lib/python3/dist-packages"

# The submodules the layer uses, bound as attributes of the returned namespace.
_SUBMODULES = ("device", "enums", "pd", "cq", "mr", "qp", "wr", "addr", "pyverbs_error")


@functools.cache
def load_pyverbs() -> types.SimpleNamespace:
    """pyverbs' submodules as one namespace (``pv.qp.QP``, ``pv.enums.IBV_WR_SEND``...).

    Raises ``RdmaUnavailable`` naming the package to install when pyverbs
    cannot be imported from this interpreter.
    """
    try:
        importlib.import_module("pyverbs")
    except ImportError:
        if DIST_PACKAGES not in sys.path:
            sys.path.append(DIST_PACKAGES)
        try:
            importlib.import_module("pyverbs")
        except ImportError as e:
            raise RdmaUnavailable(
                f"pyverbs is not importable from {sys.executable} ({e}); "
                "install python3-pyverbs (scripts/setup-rdma.sh)"
            ) from e
    try:
        mods = {name: importlib.import_module(f"pyverbs.{name}") for name in _SUBMODULES}
    except ImportError as e:  # e.g. a pyverbs built for another Python minor version
        raise RdmaUnavailable(f"pyverbs is installed but does not load in {sys.executable}: {e}") from e
    return types.SimpleNamespace(**mods)


def pyverbs_importable() -> bool:
    """True when ``load_pyverbs`` would succeed (no exception, no log)."""
    try:
        load_pyverbs()
    except RdmaUnavailable:
        return False
    return True
