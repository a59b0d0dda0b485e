"""Request validation: the one place the daemon and the monolithic reference check a request."""

from __future__ import annotations

import numpy as np

from flexemr.errors import RequestError
from flexemr.model.spec import ModelSpec
from flexemr.wire.codec import ClientRequest


def validate_request(spec: ModelSpec, req: ClientRequest, predict: bool) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Check a decoded request against the model; returns ids by table index."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    index = {t.name: i for i, t in enumerate(spec.tables)}
    for k, name in enumerate(req.names):
        i = index.get(name)
        if i is None:
            raise RequestError(f"sparse: unknown table {name!r} (the model has {', '.join(spec.table_names)})")
        if i in out:
            raise RequestError(f"sparse: table {name!r} appears twice")
        values, lengths = req.kjt.table(k)
        if len(values):
            lo, hi = int(values.min()), int(values.max())
            rows = spec.tables[i].rows
            if lo < 0:
                raise RequestError(f"sparse[{name!r}] values: id {lo} is negative")
            if hi >= rows:
                raise RequestError(f"sparse[{name!r}] values: id {hi} is past the end of table {name!r} ({rows} rows)")
        out[i] = (values, lengths)
    if predict:
        missing = [t.name for i, t in enumerate(spec.tables) if i not in out]
        if missing:
            raise RequestError(f"sparse: predict needs every table; missing {', '.join(map(repr, missing))}")
        assert req.dense is not None
        if req.dense.shape[1] != spec.dense_features:
            raise RequestError(
                f"dense: has {req.dense.shape[1]} features per sample, the model expects {spec.dense_features}"
            )
    return out
