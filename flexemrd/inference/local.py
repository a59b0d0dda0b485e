"""Tables held by the ranker itself (``--embedding-servers 0``): the monolithic layout.

Same front end, batching, validation and NN as the disaggregated path; only
the pooling happens here, with the one pooling kernel over read-only maps of
the model's tables (copied into huge pages while they fit, as an embedding
server does: see flexemr.hugepages).
"""

from __future__ import annotations

import numpy as np

from flexemr.hugepages import resident_copies
from flexemr.model.spec import ModelSpec
from flexemr.pooling import TablePooler


class LocalPooler:
    def __init__(self, spec: ModelSpec, tables: dict[str, np.ndarray], resident: bool = False) -> None:
        self.spec = spec
        if resident:
            # As an embedding server does: huge-page copies gather faster than the maps (flexemr.hugepages).
            tables = resident_copies({t.name: tables[t.name] for t in spec.tables})
        self.poolers = [TablePooler(tables[t.name], t.pooling) for t in spec.tables]

    def pool(self, table: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # Admission checked every id against the table already.
        return self.poolers[table].pool(values, lengths, check=False)
