"""Tests of the ``transformer`` entry: the shipped checkpoint's loss against least squares on
fresh tasks, and the boundary against a brute-force reading of its definition."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from misalign.experiments.transformer import CHECKPOINT, ICL_FACTOR, N, boundary, icl_losses
from misalign.runtime.shipped import shipped


def test_the_shipped_checkpoint_is_within_the_stated_factor_of_least_squares():
    """Loaded from the package as ``reproduce transformer`` loads it, evaluated on tasks its
    training and its evaluation never drew: its loss at n = 20 examples is within
    ``ICL_FACTOR`` of least squares', better than averaging, and worse past its context's
    trained length than at n (the known degradation of Garg et al.)."""
    with shipped(CHECKPOINT) as (path,):
        curve = icl_losses(path, 4096)
    assert curve["transformer"][N] <= ICL_FACTOR * curve["least_squares"][N]
    assert curve["transformer"][N] < curve["averaging"][N]
    assert curve["transformer"][2 * N] > curve["transformer"][N]


@given(
    st.lists(st.one_of(st.floats(0, 0.2), st.just(float("nan")), st.just(float("inf"))), max_size=8)
)
def test_the_boundary_is_the_last_gap_of_the_first_run_within_tolerance(errors):
    gaps = list(range(len(errors)))
    within = [bool(e <= 0.1) for e in errors]
    first_miss = within.index(False) if False in within else len(errors)
    expected = float("nan") if first_miss == 0 else float(gaps[first_miss - 1])
    found = boundary(gaps, errors, 0.1)
    assert found == expected or (np.isnan(found) and np.isnan(expected))


@pytest.mark.parametrize(
    ("errors", "edge"), [([0.0, 0.01, 0.2, 0.0], 1.0), ([0.3, 0.0], float("nan")), ([0.0], 0.0)]
)
def test_boundary_examples(errors, edge):
    found = boundary(list(range(len(errors))), errors, 0.1)
    assert found == edge or (np.isnan(found) and np.isnan(edge))
