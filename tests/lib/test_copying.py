"""copy_bytes: every size, both sides of the numpy threshold, any buffer type the data path hands it."""

from __future__ import annotations

import mmap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.copying import LARGE_COPY_BYTES, copy_bytes


@settings(max_examples=60, deadline=None)
@given(n=st.one_of(st.integers(0, 300), st.integers(LARGE_COPY_BYTES - 8, LARGE_COPY_BYTES + 8),
                   st.integers(LARGE_COPY_BYTES, 3 * LARGE_COPY_BYTES)),
       offset=st.integers(0, 64), seed=st.integers(0, 2**31))
def test_copies_exactly_the_source_and_nothing_after_it(n, offset, seed):
    src = np.random.default_rng(seed).integers(0, 256, n + 5, dtype=np.uint8)
    shm = mmap.mmap(-1, n + offset + 16)
    dst = memoryview(shm)
    dst[:] = b"\xaa" * len(dst)
    copy_bytes(dst[offset:], memoryview(src)[:n])
    got = np.frombuffer(shm, dtype=np.uint8)
    assert np.array_equal(got[offset:offset + n], src[:n])
    assert (got[:offset] == 0xAA).all() and (got[offset + n:] == 0xAA).all()


def test_a_float_array_is_copied_as_its_bytes():
    src = np.arange(40_000, dtype=np.float32)          # 160 kB: the numpy path
    dst = bytearray(src.nbytes)
    copy_bytes(memoryview(dst), memoryview(src).cast("B"))
    assert np.array_equal(np.frombuffer(dst, dtype=np.float32), src)
