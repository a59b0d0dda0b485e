"""SplitAccumulator: a batch's global pooling written into one array per run of bags (a client's reply slot).

Whatever partials arrive (full or compact, any pooling, any cut of the batch into segments, segments of
zero bags included), the segments must end up holding exactly what the single-array Accumulator holds.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flexemr.routing.combine import Accumulator, SplitAccumulator
from flexemr.types import Pooling


@st.composite
def feeds(draw):
    batch = draw(st.integers(1, 12))
    dim = draw(st.integers(1, 3))
    pooling = draw(st.sampled_from(list(Pooling)))
    cuts = sorted(draw(st.lists(st.integers(0, batch), max_size=4)))
    starts = [0] + cuts
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, batch).astype(np.int32)
    partials = []
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):   # a compact partial: some bags, ascending
            rows = np.flatnonzero(rng.random(batch) < 0.6).astype(np.int64)
            partials.append((rng.standard_normal((len(rows), dim)).astype(np.float32),
                             rng.integers(1, 3, len(rows)).astype(np.int32), rows))
        else:
            partials.append((rng.standard_normal((batch, dim)).astype(np.float32),
                             rng.integers(0, 3, batch).astype(np.int32), None))
    return batch, dim, pooling, starts, lengths, partials


@settings(max_examples=300, deadline=None)
@given(feeds())
def test_the_segments_hold_what_one_accumulator_holds(case):
    batch, dim, pooling, starts, lengths, partials = case
    whole = Accumulator(pooling, batch, dim, lengths)
    stops = starts[1:] + [batch]
    outs = [np.full((b - a, dim), 7.0, np.float32) for a, b in zip(starts, stops)]   # garbage until written
    split = SplitAccumulator(pooling, lengths, list(zip(starts, outs)))
    for p, c, r in partials:
        whole.add(p, c, r)
        split.add(p, c, r)
    expect = whole.result()
    got = split.result()
    assert all(g is o for g, o in zip(got, outs))          # finished in place, in the arrays it was given
    np.testing.assert_array_equal(np.concatenate(outs), expect)


@pytest.mark.parametrize("segments", [[(1, np.zeros((5, 2), np.float32))],
                                      [(0, np.zeros((2, 2), np.float32)), (3, np.zeros((3, 2), np.float32))],
                                      [(0, np.zeros((5, 2), np.float32))]])
def test_segments_that_do_not_tile_the_batch_are_refused(segments):
    with pytest.raises(ValueError, match="do not tile a batch of 6 bags"):
        SplitAccumulator(Pooling.SUM, np.ones(6, np.int32), segments)
