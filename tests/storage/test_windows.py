"""Evaluation windows spread over the whole split, the same for every model."""

import numpy as np

from storage.windows import spread_window_ids


def test_one_window_from_every_stratum_of_the_split():
    ids = spread_window_ids(1000, 50)
    assert len(ids) == 50 and (np.diff(ids) > 0).all()
    np.testing.assert_array_equal(ids // 20, np.arange(50))  # one id in each of the 50 equal strata
    assert ids[0] < 20 and ids[-1] >= 980


def test_same_ids_whatever_the_global_random_state():
    first = spread_window_ids(777, 64)
    np.random.seed(123)
    np.random.default_rng(5).random(10)
    np.testing.assert_array_equal(spread_window_ids(777, 64), first)


def test_all_windows_without_a_cap_or_with_a_large_one():
    np.testing.assert_array_equal(spread_window_ids(10, None), np.arange(10))
    np.testing.assert_array_equal(spread_window_ids(10, 10), np.arange(10))
    np.testing.assert_array_equal(spread_window_ids(10, 99), np.arange(10))
    assert len(spread_window_ids(0, 5)) == 0
    ids = spread_window_ids(7, 3)  # strata of 7/3 windows: ids are distinct and inside the split
    assert len(set(ids.tolist())) == 3 and ids.min() >= 0 and ids.max() <= 6
