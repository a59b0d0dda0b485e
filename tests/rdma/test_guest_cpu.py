"""The guest's emulated CPU computes what numpy promises (the rest of the suite relies on it).

Under QEMU's TCG with ``-cpu max``, numpy dispatches its AVX2 argsort, which
the emulator gets wrong: ``np.argsort`` and ``np.unique(..., return_inverse=True)``
of unsorted int64 arrays came back unsorted for two thirds of random inputs.
The engine plans cache-fill READs with that ``np.unique`` and posted READs of
negative length (it exited).  scripts/rxe-vm runs the guest without AVX2; this
fails if a guest model brings the bug back.
"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.rdma


def test_argsort_and_unique_sort_unsorted_int64() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        a = rng.permutation(5000)[: int(rng.integers(100, 3000))].astype(np.int64)
        assert (np.diff(a[np.argsort(a)]) > 0).all(), "np.argsort returned a wrong order on this CPU"
        u, inverse = np.unique(a, return_inverse=True)
        assert (np.diff(u) > 0).all() and (u[inverse] == a).all(), "np.unique returned a wrong order on this CPU"
