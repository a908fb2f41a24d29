"""quant_math: scales, INT8 rounding against ONNX Runtime, and histogram-based thresholds vs numpy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.solve.quant_math import (
    AMAX_FLOOR,
    INT8_MAX,
    activation_amax,
    dequantize,
    mse_amax,
    percentile_amax,
    quantize_int8,
    scale_from_amax,
    sqnr_db,
    weight_scales,
)


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats.empty()
    s.update(x)
    return s


# -- scale_from_amax ----------------------------------------------------------------------------
def test_scale_from_amax_is_amax_over_127_in_float32():
    s = scale_from_amax(np.array([1.0, 12.7, 254.0]))
    assert s.dtype == np.float32
    np.testing.assert_array_equal(s, np.array([1 / 127, 0.1, 2.0], np.float32))
    assert float(scale_from_amax(6.0, qmax=7)) == pytest.approx(6 / 7)


@pytest.mark.parametrize("amax", [0.0, -3.0, np.nan, 1e-30])
def test_scale_from_amax_floors_dead_and_invalid_amax(amax):
    s = float(scale_from_amax(amax))
    assert np.isfinite(s) and s > 0
    assert s == pytest.approx(AMAX_FLOOR / INT8_MAX)


def test_scale_from_amax_is_finite_for_infinite_amax():
    s = scale_from_amax(np.array([np.inf, 1e39]))
    assert np.isfinite(s).all() and (s > 0).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=1, max_size=20))
def test_scale_from_amax_always_positive_and_finite(values):
    """Any float32 amax (what observers produce), including NaN, +-inf and negatives."""
    s = scale_from_amax(np.array(values, np.float32))
    assert s.dtype == np.float32 and np.isfinite(s).all() and (s > 0).all()


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_scale_from_amax_is_finite_for_a_float64_amax_beyond_float32_range():
    assert np.isfinite(scale_from_amax(np.array([1e41]))).all()


# -- weight_scales --------------------------------------------------------------------------------
@pytest.mark.parametrize("op, shape, axis", [
    ("MatMul [K, N]", (16, 32), 1),
    ("Gemm transB=1 [N, K]", (32, 16), 0),
    ("Gemm transB=0 [K, N]", (16, 32), 1),
    ("Conv [O, I, kh, kw]", (8, 3, 3, 3), 0),
])
def test_weight_scales_are_per_output_channel(op, shape, axis):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    s = weight_scales(w, axis)
    assert s.shape == (shape[axis],), op
    other = tuple(i for i in range(w.ndim) if i != axis)
    np.testing.assert_allclose(s, np.abs(w).max(axis=other) / 127, rtol=1e-6)
    # the largest weight of each channel lands exactly on +-127
    q = quantize_int8(w, s, axis)
    np.testing.assert_array_equal(np.abs(q.astype(np.int32)).max(axis=other), 127)


def test_weight_scales_of_a_dead_channel_are_positive():
    w = np.ones((4, 3), np.float32)
    w[:, 1] = 0
    s = weight_scales(w, 1)
    assert (s > 0).all() and s[1] == pytest.approx(AMAX_FLOOR / 127)
    np.testing.assert_array_equal(quantize_int8(w, s, 1)[:, 1], 0)


# -- quantize_int8 vs ONNX Runtime's QuantizeLinear ----------------------------------------------
def ort_quantize(x: np.ndarray, scale: np.ndarray, axis: int = 1) -> np.ndarray:
    scale = np.asarray(scale, np.float32)
    node = helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["y"], axis=axis)
    graph = helper.make_graph(
        [node], "q", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.INT8, list(x.shape))],
        initializer=[numpy_helper.from_array(scale, "s"),
                     numpy_helper.from_array(np.zeros(scale.shape, np.int8), "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def test_quantize_int8_rounds_half_to_even_and_saturates_like_ort():
    scale = np.float32(0.25)  # a power of two: x / scale is exact, so the halves are exact ties
    k = np.arange(-6, 6, dtype=np.float32)
    ties = (k + 0.5) * scale  # -5.5, -4.5, ..., 5.5
    far = np.array([1e6, -1e6, 127.6 * scale, -128.4 * scale, -128.6 * scale, 0.0, -0.0], np.float32)
    x = np.concatenate([ties, far]).astype(np.float32)
    ours = quantize_int8(x, np.array(scale, np.float32))
    np.testing.assert_array_equal(ours, ort_quantize(x, scale))
    np.testing.assert_array_equal(ours[:12], [-6, -4, -4, -2, -2, 0, 0, 2, 2, 4, 4, 6])  # half to even
    np.testing.assert_array_equal(ours[12:17], [127, -128, 127, -128, -128])  # saturation
    assert ours.dtype == np.int8


def test_quantize_int8_matches_ort_on_random_data_per_tensor():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 8, 16)) * 3).astype(np.float32)
    scale = scale_from_amax(np.abs(x).max() * 0.7)  # some values saturate
    np.testing.assert_array_equal(quantize_int8(x, scale), ort_quantize(x, scale))


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_quantize_int8_matches_ort_per_channel(axis):
    rng = np.random.default_rng(2 + axis)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32) * rng.uniform(0.1, 10)
    scale = weight_scales(x, axis) * np.float32(0.9)
    np.testing.assert_array_equal(quantize_int8(x, scale, axis), ort_quantize(x, scale, axis))


def test_dequantize_inverts_quantize_within_half_a_step():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 32)).astype(np.float32)
    s = weight_scales(w, 1)
    err = np.abs(dequantize(quantize_int8(w, s, 1), s, 1) - w)
    assert (err <= s[None, :] / 2 * (1 + 1e-5)).all()


# -- histogram thresholds ------------------------------------------------------------------------
@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9, 99.99])
def test_percentile_amax_is_within_a_bin_of_numpy(percentile):
    x = np.random.default_rng(6).standard_normal(200_000).astype(np.float32)
    s = stats_of(x)
    bin_width = s.hist_range / len(s.hist)
    got = percentile_amax(s, percentile)
    want = np.percentile(np.abs(x), percentile)
    assert abs(got - want) <= bin_width
    assert got <= s.amax
    assert activation_amax(s, "percentile", percentile) == got


def test_percentile_100_is_amax():
    x = np.random.default_rng(7).standard_normal(1000).astype(np.float32)
    s = stats_of(x)
    assert percentile_amax(s, 100.0) == pytest.approx(s.amax)


def fake_quant_mse(x: np.ndarray, threshold: float) -> float:
    """Mean squared error of symmetric INT8 fake quantization with scale threshold / 127 (numpy)."""
    s = np.float64(threshold) / 127
    q = np.clip(np.rint(x.astype(np.float64) / s), -128, 127) * s
    return float(np.mean((q - x) ** 2))


def test_mse_amax_clips_a_huge_outlier_and_lowers_the_error():
    rng = np.random.default_rng(8)
    x = rng.standard_normal(2**19).astype(np.float32)
    x[123] = 50.0  # one outlier at 50 sigma
    s = stats_of(x)
    t = mse_amax(s)
    assert 0 < t < s.amax
    assert t > np.abs(np.delete(x, 123)).max() * 0.5  # it does not clip the Gaussian bulk away
    e_mse, e_max = fake_quant_mse(x, t), fake_quant_mse(x, s.amax)
    assert e_mse <= e_max
    assert e_mse < 0.5 * e_max  # a real gain, not a tie
    assert activation_amax(s, "mse") == t


def test_mse_amax_keeps_the_range_of_uniform_data():
    """Nothing to clip in uniform data: the threshold stays near amax."""
    x = np.random.default_rng(9).uniform(-4, 4, 100_000).astype(np.float32)
    s = stats_of(x)
    t = mse_amax(s)
    assert 0.95 * s.amax <= t <= s.amax
    assert fake_quant_mse(x, t) <= fake_quant_mse(x, s.amax) * 1.05


def test_mse_amax_of_no_data_is_zero_and_its_scale_positive():
    s = TensorStats.empty()
    assert mse_amax(s) == 0.0
    assert float(scale_from_amax(mse_amax(s))) > 0


def test_activation_amax_max_and_unknown_method():
    s = stats_of(np.array([-3.0, 2.0], np.float32))
    assert activation_amax(s, "max") == 3.0
    with pytest.raises(ValueError, match="bogus"):
        activation_amax(s, "bogus")


def test_sqnr_db():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")
    assert sqnr_db(0.0, 1.0) == float("-inf")


# -- cases the mutation check (mutmut on quant_math.py) found untested ----------------------------------------
def test_quantize_int8_divides_in_float32_like_ort():
    """Values whose float32 quotient by the scale lands on a half step while the float64 one does not (or the
    other way round): the rounding follows float32, as QuantizeLinear computes."""
    s = np.float32(0.1)
    x = np.array([-9.949999809265137, -9.850000381469727, -9.75, -9.050000190734863], np.float32)
    assert (np.rint(x.astype(np.float64) / np.float64(s)) != np.rint(x / s)).all()  # the cases differ
    np.testing.assert_array_equal(quantize_int8(x, s), ort_quantize(x, s))


@pytest.mark.parametrize("axis", [0, 1])
def test_dequantize_per_channel_is_q_times_its_channels_scale(axis):
    q = np.arange(-6, 6, dtype=np.int8).reshape(3, 4)
    scale = np.array([0.5, 0.25, 2.0, 4.0][: q.shape[axis]], np.float32)
    want = q.astype(np.float32) * (scale[:, None] if axis == 0 else scale[None, :])
    np.testing.assert_array_equal(dequantize(q, scale, axis), want)


def test_sqnr_db_of_small_powers():
    assert sqnr_db(0.5, 0.005) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.1) == pytest.approx(10.0)


@pytest.mark.parametrize("method", ["mse", "entropy"])
@pytest.mark.parametrize("scale", [0.5, 3e-3])
def test_thresholds_of_small_tensors_are_not_zero(method, scale):
    """amax below 1: the thresholds are still read from the histogram (tests/references.py)."""
    import references

    x = (np.random.default_rng(0).laplace(size=(256, 16)) * scale).astype(np.float32)
    x[3, 3] = 12 * scale
    got = activation_amax(stats_of(x), method)
    assert 0 < got == references.threshold(x, method)


@pytest.mark.parametrize("data", ["uniform", "sparse_tail", "two_bumps"])
def test_entropy_amax_equals_the_reference_on_other_shapes(data):
    """Uniform data keep their whole range (the last candidate); a tail of single values (bins holding one
    count) and two separated bumps move the optimum elsewhere."""
    import references

    rng = np.random.default_rng(1)
    x = {"uniform": rng.uniform(-4, 4, 20000),
         "sparse_tail": np.concatenate([rng.normal(0, 1, 3000), rng.uniform(4, 60, 40)]),
         "two_bumps": np.concatenate([rng.normal(0, 0.5, 5000), rng.normal(20, 0.5, 300)])}[data].astype(np.float32)
    want = references.threshold(x, "entropy")
    assert activation_amax(stats_of(x), "entropy") == want
    if data == "uniform":
        assert want == float(np.abs(x).max())


def test_entropy_amax_equals_the_reference_on_a_very_heavy_tail():
    """Cubed Laplace data: the mass above a candidate, added to its last bin, moves the optimum (to replace
    that bin's own mass by it would choose 176 here, not 208)."""
    import references

    x = (np.random.default_rng(18).laplace(size=17893) ** 3).astype(np.float32)
    want = references.threshold(x, "entropy")
    assert activation_amax(stats_of(x), "entropy") == want == 208.0


def test_smoothing_vector_is_computed_in_float64_and_rounded_once():
    from segquant_onnx.solve.quant_math import smoothing_vector

    rng = np.random.default_rng(0)
    a = rng.uniform(0.01, 50, 4096).astype(np.float32)
    w = rng.uniform(0.001, 2, 4096).astype(np.float32)
    for alpha in (0.5, 0.7):
        want = np.clip(a.astype(np.float64) ** alpha / w.astype(np.float64) ** (1 - alpha), 1e-4, 1e4)
        np.testing.assert_array_equal(smoothing_vector(a, w, alpha), want.astype(np.float32))


def test_weight_scales_of_a_one_dimensional_weight_are_per_element():
    np.testing.assert_array_equal(weight_scales(np.array([-2.54, 1.27, 0.0], np.float32), 0),
                                  np.array([2.54 / 127, 1.27 / 127, AMAX_FLOOR / 127], np.float32))


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_the_thresholds_of_a_single_value_are_the_reference(method):
    import references

    x = np.array([0.3], np.float32)
    assert activation_amax(stats_of(x), method) == references.threshold(x, method) > 0
