"""Tables held by the ranker itself (``--embedding-servers 0``): the monolithic layout.

Same front end, batching, validation and NN as the disaggregated path; only
the pooling happens here, over read-only maps of the model's tables.
"""

from __future__ import annotations

import numpy as np

from flexemr.model.spec import ModelSpec


class LocalPooler:
    def __init__(self, spec: ModelSpec, tables: dict[str, np.ndarray]) -> None:
        import warnings

        import torch

        self.spec = spec
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only maps; torch only reads
            self.weights = [torch.from_numpy(tables[t.name]) for t in spec.tables]
        self.modes = [t.pooling.label for t in spec.tables]

    def pool(self, table: int, values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        out = F.embedding_bag(torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64)), self.weights[table],
                              torch.from_numpy(offsets), mode=self.modes[table], include_last_offset=True)
        return out.numpy()
