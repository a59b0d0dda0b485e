"""The client checks shapes and dtypes before anything is sent."""

from __future__ import annotations

import numpy as np
import pytest

from flexemr.client import prepare_sparse
from flexemr.errors import RequestError


@pytest.mark.parametrize("sparse, match", [
    ({}, "non-empty mapping"),
    ({"a": (np.array([1.5]), np.array([1]))}, r"sparse\['a'\] values: ids must be integers"),
    ({"a": (np.array([1, 2]), np.array([1]))}, r"sum to 1 but there are 2 values"),
    ({"a": (np.array([1]), np.array([-1, 2]))}, r"must be >= 0"),
    ({"a": (np.array([[1]]), np.array([1]))}, "must be 1-D"),
    ({"a": (np.array([1]), np.array([1])), "b": (np.array([1, 2]), np.array([1, 1]))}, "has 2 bags but the batch has 1"),
    ({"a": np.array([1])}, r"must be a \(values, lengths\) pair"),
])
def test_bad_sparse_input_names_the_field(sparse, match):
    with pytest.raises(RequestError, match=match):
        prepare_sparse(sparse, None)


def test_integer_ids_of_any_width_are_widened_losslessly():
    names, values, lengths, batch = prepare_sparse({"a": (np.array([3, 4], np.int32), np.array([2], np.int64))}, None)
    assert values[0].dtype == np.int64 and lengths[0].dtype == np.int32 and batch == 1
