"""TensorStats: running statistics match numpy on the same data; shards merge exactly."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segquant_onnx.calib.observers import NUM_BINS, TensorStats, merge_stats


def reference_hist(values: np.ndarray, hist_range: float, num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin i holds |x| in [i, i+1) * hist_range / num_bins; the last bin also takes the top edge."""
    a = np.abs(values.astype(np.float64)).ravel()
    idx = np.minimum(np.floor(a * num_bins / hist_range).astype(np.int64), num_bins - 1)
    return np.bincount(idx, minlength=num_bins)


def stats_of(*batches: np.ndarray) -> TensorStats:
    s = TensorStats.empty()
    for b in batches:
        s.update(b)
    return s


def assert_same_stats(a: TensorStats, b: TensorStats) -> None:
    assert a.count == b.count
    assert a.amax == b.amax
    assert a.pos_amax == b.pos_amax
    assert a.neg_amax == b.neg_amax
    np.testing.assert_array_equal(a.channel_amax, b.channel_amax)
    assert a.hist_range == b.hist_range
    np.testing.assert_array_equal(a.hist, b.hist)


def test_update_matches_numpy_on_random_data():
    rng = np.random.default_rng(0)
    batches = [rng.standard_normal((2, 5, 12)).astype(np.float32) * s for s in (0.5, 3.0, 1.0)]
    batches[1][0, 0, 3] = -40.0  # the negative side holds the largest magnitude
    s = stats_of(*batches)
    data = np.concatenate(batches)

    assert s.count == data.size
    assert s.amax == pytest.approx(float(np.abs(data).max()), abs=0)
    assert s.amax == 40.0
    assert s.pos_amax == float(data.max())
    assert s.neg_amax == float(-data.min())
    np.testing.assert_array_equal(s.channel_amax, np.abs(data).reshape(-1, 12).max(axis=0))
    assert s.channel_amax.shape == (12,)


def test_polarity_amax_of_one_sided_data():
    """SiLU-like data: tiny negatives, large positives; an all-positive tensor has neg_amax 0."""
    x = np.array([-0.25, -0.1, 0.0, 3.0, 17.5], np.float32)
    s = stats_of(x)
    assert (s.pos_amax, s.neg_amax, s.amax) == (17.5, 0.25, 17.5)
    s = stats_of(np.abs(x) + 1)
    assert s.neg_amax == 0.0
    assert s.pos_amax == 18.5


def test_histogram_counts_every_element_and_matches_numpy_bins():
    x = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    s = stats_of(x)
    assert s.hist.sum() == x.size == s.count
    assert len(s.hist) == NUM_BINS
    assert s.hist_range > s.amax  # the top value falls inside the range
    assert np.log2(s.hist_range) == int(np.log2(s.hist_range))  # power of two
    np.testing.assert_array_equal(s.hist, reference_hist(x, s.hist_range))
    np.testing.assert_array_equal(s.bin_edges[[0, -1]], [0.0, s.hist_range])


def test_widening_keeps_counts_exact_when_a_later_batch_has_a_larger_max():
    rng = np.random.default_rng(2)
    small = rng.uniform(-0.3, 0.3, (50, 8)).astype(np.float32)
    large = rng.uniform(-100, 100, (50, 8)).astype(np.float32)
    s = stats_of(small)
    first_range = s.hist_range
    s.update(large)
    assert s.hist_range > first_range
    data = np.concatenate([small, large])
    assert s.hist.sum() == data.size
    # identical to a histogram built at the final range in one go
    np.testing.assert_array_equal(s.hist, reference_hist(data, s.hist_range))
    assert_same_stats(s, stats_of(data))


def test_widening_by_more_than_the_bin_count_puts_old_values_in_bin_zero():
    s = stats_of(np.full(10, 1e-3, np.float32))
    s.update(np.array([1e4], np.float32))  # range grows by far more than NUM_BINS
    assert s.hist[0] == 10 and s.hist.sum() == 11
    np.testing.assert_array_equal(s.hist, reference_hist(np.array([1e-3] * 10 + [1e4]), s.hist_range))


def test_empty_batch_and_zeros():
    s = TensorStats.empty()
    s.update(np.zeros((0, 4), np.float32))
    assert s.count == 0 and s.hist.sum() == 0
    s.update(np.zeros((3, 4), np.float32))
    assert s.count == 12 and s.hist[0] == 12 and s.amax == 0.0
    np.testing.assert_array_equal(s.channel_amax, np.zeros(4))


@st.composite
def shards(draw):
    channels = draw(st.integers(1, 6))
    elements = st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)
    a = draw(hnp.arrays(np.float32, (draw(st.integers(1, 12)), channels), elements=elements))
    b = draw(hnp.arrays(np.float32, (draw(st.integers(1, 12)), channels), elements=elements))
    return a, b


@settings(max_examples=60, deadline=None)
@given(shards())
def test_merging_two_shards_equals_one_pass_over_the_concatenation(ab):
    a, b = ab
    merged = stats_of(a).merge(stats_of(b))
    assert_same_stats(merged, stats_of(np.concatenate([a, b])))


def test_merge_stats_merges_shared_names_and_adopts_new_ones():
    rng = np.random.default_rng(3)
    x1, x2, y = (rng.standard_normal((4, 3)).astype(np.float32) * k for k in (1, 9, 2))
    a = {"x": stats_of(x1)}
    out = merge_stats(a, {"x": stats_of(x2), "y": stats_of(y)})
    assert out is a and set(out) == {"x", "y"}
    assert_same_stats(out["x"], stats_of(np.concatenate([x1, x2])))
    assert_same_stats(out["y"], stats_of(y))


def test_merge_into_an_empty_shard_keeps_the_per_channel_amax():
    x = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
    merged = TensorStats.empty().merge(stats_of(x))
    assert_same_stats(merged, stats_of(x))
    merged = merge_stats({"t": TensorStats.empty()}, {"t": stats_of(x)})["t"]
    assert_same_stats(merged, stats_of(x))


@pytest.mark.parametrize("num_bins", [100, 1000, 3])
def test_widening_with_a_bin_count_that_is_not_a_power_of_two(num_bins):
    rng = np.random.default_rng(5)
    small = rng.uniform(-0.9, 0.9, 200).astype(np.float32)  # range 1.0
    large = rng.uniform(-7, 7, 200).astype(np.float32)  # range 8.0: factor 8 need not divide num_bins
    s = TensorStats.empty(num_bins=num_bins)
    s.update(small)
    s.update(large)
    data = np.concatenate([small, large])
    assert s.hist.sum() == data.size
    np.testing.assert_array_equal(s.hist, reference_hist(data, s.hist_range, num_bins))
