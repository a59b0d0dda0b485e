"""Load the configs the pods run, as the installed flexemr parses them.

``PENDING_KEYS`` are keys the manifests already set for features that land
separately (the auth secret file); while the installed ``flexemr.config``
does not know one yet it is dropped before parsing, so the check stays honest
about everything else, and starts checking the key itself the day it lands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

try:
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - 3.10
    import tomli as _toml  # type: ignore[no-redef]

PENDING_KEYS = {("daemon", "secret_file")}


def known_keys(section: str) -> set[str]:
    from flexemr.config import _SECTIONS

    return {f.name for f in dataclasses.fields(_SECTIONS[section])}


def load_pod_config(path: str | Path, index: int | None = None, text: str | None = None) -> Any:
    """parse_config of a pod's TOML (``index`` overrides [embedding].index, as the init step does)."""
    from flexemr.config import parse_config

    doc = _toml.loads(text if text is not None else Path(path).read_text())
    for section, key in PENDING_KEYS:
        if key in doc.get(section, {}) and key not in known_keys(section):
            del doc[section][key]
    overrides = {"embedding": {"index": index}} if index is not None else None
    return parse_config(doc, str(path), overrides)
