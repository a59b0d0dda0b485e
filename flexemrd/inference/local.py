"""Tables held by the ranker itself (``--embedding-servers 0``): the monolithic layout.

Same front end, batching, validation and NN as the disaggregated path; only
the pooling happens here, with the one pooling kernel over read-only maps of
the model's tables.
"""

from __future__ import annotations

import numpy as np

from flexemr.model.spec import ModelSpec
from flexemr.pooling import TablePooler


class LocalPooler:
    def __init__(self, spec: ModelSpec, tables: dict[str, np.ndarray]) -> None:
        self.spec = spec
        self.poolers = [TablePooler(tables[t.name], t.pooling) for t in spec.tables]

    def pool(self, table: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # Admission checked every id against the table already.
        return self.poolers[table].pool(values, lengths, check=False)
