"""Logging setup: called once per process, after fork, with the process's role."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(role: str, index: int | None = None, level: str | int | None = None) -> None:
    """Log to stderr (journald under systemd); every line carries role[index] and pid."""
    level = level or os.environ.get("FLEXEMR_LOG_LEVEL", "INFO")
    tag = role if index is None else f"{role}[{index}]"
    fmt = f"%(asctime)s {tag} pid=%(process)d %(levelname)s %(name)s: %(message)s"
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(level if isinstance(level, int) else level.upper())
