"""SmoothQuant and the calibration search: quant_math formulas and solve against numpy references, and,
end to end, SmoothQuant lifting the output SQNR of a linear whose input has outlier channels.

The references are written out here in plain numpy (loops where the library uses cumulative sums) so
a mistake in either shows as a mismatch.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import references
from conftest import build_linear_model, calib_inputs, run_model
from references import fq as fq_ref
from segquant_onnx.config import QuantConfig, SmoothQuantConfig
from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.pipeline import quantize
from segquant_onnx.plan import DualSite, LinearSite, QuantPlan
from segquant_onnx.solve.quant_math import (INT8_MAX, activation_amax, entropy_amax, fake_quant, mse_amax, percentile_amax,
                                      scale_from_amax, smoothing_vector, weight_scales)
from segquant_onnx.ir.linear import scale_input_channels as smoothed_weight
from segquant_onnx.params import Quantization, SiteParams
from segquant_onnx.solve.choose import choose, layer_sqnr
from segquant_onnx.solve.fit import fit
from segquant_onnx.solve.recipe import Variant

METHODS = ("max", "percentile", "mse", "entropy")


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats.empty()
    s.update(x)
    return s


def site_of(op: str, k: int, n: int, trans_b: bool = False) -> LinearSite:
    shape = (n, k) if trans_b else (k, n)
    return LinearSite("lin", op, "X", "W", shape, 0 if trans_b else 1, 2 * k * n)


# -- numpy references (tests/references.py) ---------------------------------------------------------
def layer_sqnr_ref(rows, w, trans_b, smooth, act_scale, w_scale) -> float:
    """10 log10(|X W|^2 / |X W - fq(X / s) fq(s W)|^2), W as stored ([N, K] for transB=1)."""
    w_kn = w.T if trans_b else w
    ws_kn = w_kn if smooth is None else w_kn * smooth[:, None]
    xs = rows if smooth is None else rows / smooth
    y = rows.astype(np.float64) @ w_kn.astype(np.float64)
    yq = fq_ref(xs, act_scale) @ fq_ref(ws_kn, w_scale, axis=1)
    return float(10 * np.log10((y**2).sum() / ((y - yq) ** 2).sum()))


def tensorrt_entropy_amax(stats: TensorStats, stride: int = 16) -> float:
    return references.entropy_threshold(stats.hist, stats.bin_edges, stats.amax, stride)


def mse_ref(stats: TensorStats, qmax: int = INT8_MAX) -> float:
    return references.mse_threshold(stats.hist, stats.bin_edges, stats.amax, qmax)


# -- smoothing_vector ---------------------------------------------------------------------------------
@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0.0, 1e-3, 0.1, 1.0, 7.5, 300.0]),
                          st.sampled_from([0.0, 1e-3, 0.02, 0.5, 2.0])), min_size=1, max_size=40),
       st.floats(0.0, 1.0))
def test_smoothing_vector_matches_the_formula(channels, alpha):
    a = np.array([c[0] for c in channels], np.float32)
    w = np.array([c[1] for c in channels], np.float32)
    s = smoothing_vector(a, w, alpha)
    ref = np.ones(len(a))
    for k in range(len(a)):
        if a[k] > 0 and w[k] > 0:
            ref[k] = min(max(float(a[k]) ** alpha / float(w[k]) ** (1 - alpha), 1e-4), 1e4)
    assert s.dtype == np.float32 and s.shape == a.shape
    np.testing.assert_allclose(s, ref, rtol=1e-6)


def test_smoothing_vector_dead_channels_and_clipping():
    a = np.array([0.0, 4.0, 1e9, 1e-9, 9.0], np.float32)
    w = np.array([3.0, 0.0, 1e-9, 1e9, 4.0], np.float32)
    s = smoothing_vector(a, w, 0.5)
    np.testing.assert_allclose(s, [1.0, 1.0, 1e4, 1e-4, 9.0**0.5 / 4.0**0.5], rtol=1e-6)
    # alpha 0: s = 1 / max|W|; alpha 1: s = max|X|
    np.testing.assert_allclose(smoothing_vector(a[4:], w[4:], 0.0), [0.25])
    np.testing.assert_allclose(smoothing_vector(a[4:], w[4:], 1.0), [9.0])


def test_smoothing_balances_the_channel_ranges_at_alpha_one_half():
    """At alpha 0.5 every channel of X / s and of s * W has the same range sqrt(max|X| max|W|)."""
    rng = np.random.default_rng(0)
    a, w = rng.uniform(0.1, 50, 32), rng.uniform(0.01, 2, 32)
    s = smoothing_vector(a, w, 0.5).astype(np.float64)
    np.testing.assert_allclose(a / s, np.sqrt(a * w), rtol=1e-6)
    np.testing.assert_allclose(w * s, np.sqrt(a * w), rtol=1e-6)


# -- histogram thresholds ---------------------------------------------------------------------------
GAUSS = np.random.default_rng(0).standard_normal(200_000).astype(np.float32)  # sigma 1


@pytest.mark.parametrize("outlier", [None, 12.0], ids=["gaussian", "gaussian+outlier12"])
def test_entropy_amax_of_a_gaussian_is_between_2_and_6_sigma(outlier):
    x = GAUSS.copy()
    if outlier is not None:
        x[:3] = outlier
    s = stats_of(x)
    t = entropy_amax(s)
    assert 2.0 <= t <= 6.0
    if outlier is not None:
        assert t < s.amax


def test_entropy_amax_clips_a_far_outlier():
    x = GAUSS.copy()
    x[:3] = 40.0
    s = stats_of(x)
    assert 2.0 <= entropy_amax(s) < s.amax == 40.0


def test_entropy_amax_equals_a_brute_force_kl_search_on_the_same_candidates():
    s = stats_of(GAUSS)
    ref = tensorrt_entropy_amax(s)
    assert 2.0 <= ref <= 6.0  # the reference itself is sane (measured 4.1875)
    assert entropy_amax(s) == ref


def test_entropy_amax_is_a_bin_edge_at_most_amax_and_zero_without_data():
    s = stats_of(GAUSS * 3)
    t = entropy_amax(s)
    assert t <= s.amax and (np.isclose(s.bin_edges, t).any() or t == s.amax)
    assert entropy_amax(TensorStats.empty()) == 0.0


@pytest.mark.parametrize("data", ["gaussian", "outlier", "uniform"])
def test_mse_amax_equals_a_brute_force_search_over_bin_edges(data):
    rng = np.random.default_rng(3)
    x = {"gaussian": rng.standard_normal(50_000), "uniform": rng.uniform(-2, 2, 50_000),
         "outlier": np.append(rng.standard_normal(50_000), [60.0, -45.0])}[data].astype(np.float32)
    s = stats_of(x)
    assert mse_amax(s) == pytest.approx(mse_ref(s), rel=1e-12)


@pytest.mark.parametrize("percentile", [99.0, 99.9])
def test_percentile_amax_leaves_the_right_share_above(percentile):
    s = stats_of(GAUSS)
    t = percentile_amax(s, percentile)
    width = s.hist_range / len(s.hist)
    a = np.abs(GAUSS)
    assert (a <= t).mean() >= percentile / 100 > (a <= t - width).mean()


def test_fake_quant_is_rint_and_saturate_times_scale():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((6, 5)) * 3).astype(np.float32)
    np.testing.assert_array_equal(fake_quant(x, np.float32(0.02)), fq_ref(x, 0.02))
    s = rng.uniform(0.01, 0.05, 5).astype(np.float32)
    np.testing.assert_array_equal(fake_quant(x, s, axis=1), fq_ref(x, s, axis=1))


# -- solve: layer_sqnr, smoothed_weight, the searches -----------------------------------------------
def solve(plan, stats, weight, config: QuantConfig, samples) -> Quantization:
    """choose -> fit on the same statistics, with the config's modes as the one variant."""
    recipe = choose(plan, stats, samples, weight, config, Variant(config.smoothquant.mode, config.dualscale.mode,
                                                                  config.smoothquant.alpha))
    return fit(plan, recipe, stats, weight, percentile=config.calibration.percentile)


def outlier_rows(n: int, k: int = 32, seed: int = 0, channels=(1, 9, 20), factor: float = 50.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32)
    x[:, list(channels)] *= factor
    return x


@pytest.mark.parametrize("op, trans_b", [("MatMul", False), ("Gemm", False), ("Gemm", True)])
@pytest.mark.parametrize("smoothed", [False, True])
def test_layer_sqnr_equals_a_direct_numpy_fake_quant_computation(op, trans_b, smoothed):
    k, n = 32, 24
    rows = outlier_rows(200, k)
    w = np.random.default_rng(1).standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    site = site_of(op, k, n, trans_b)
    smooth = smoothing_vector(np.abs(rows).max(0), np.abs(w).max(0 if trans_b else 1), 0.5) if smoothed else None
    w_s = smoothed_weight(w, site, smooth)
    act_scale = float(scale_from_amax(np.abs(rows if smooth is None else rows / smooth).max()))
    p = SiteParams(1.0, act_scale, weight_scales(w_s, site.weight_axis), "max", smooth, 0.5 if smoothed else None)
    assert layer_sqnr(rows, w, site, p) == pytest.approx(
        layer_sqnr_ref(rows, w, trans_b, smooth, act_scale, p.weight_scale), rel=1e-9)


@pytest.mark.parametrize("op, trans_b", [("MatMul", False), ("Gemm", False), ("Gemm", True)])
def test_smoothed_weight_keeps_the_product(op, trans_b):
    k, n = 16, 8
    rows = outlier_rows(10, k, channels=(2,))
    w = np.random.default_rng(2).standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    s = (10.0 ** np.random.default_rng(3).uniform(-1, 1, k)).astype(np.float32)
    w_s = smoothed_weight(w, site_of(op, k, n, trans_b), s)
    w_kn, ws_kn = (w.T, w_s.T) if trans_b else (w, w_s)
    np.testing.assert_allclose((rows / s).astype(np.float64) @ ws_kn, rows.astype(np.float64) @ w_kn,
                               rtol=1e-5, atol=1e-4)
    assert smoothed_weight(w, site_of(op, k, n, trans_b), None) is w


def _one_site_problem(op="MatMul", trans_b=False, k=32, n=24):
    calib, sample = outlier_rows(512, k, seed=0), outlier_rows(256, k, seed=1)
    w = (np.random.default_rng(4).standard_normal((n, k) if trans_b else (k, n)) / 6).astype(np.float32)
    site = site_of(op, k, n, trans_b)
    return QuantPlan(sites=(site,)), {"X": stats_of(calib)}, w, calib, sample, site


def _reference_params(stats: TensorStats, w, site, trans_b, alpha):
    """What solve should build for a given alpha with calib_method=max."""
    smooth = None if alpha is None else smoothing_vector(stats.channel_amax, np.abs(w).max(0 if trans_b else 1), alpha)
    amax = stats.amax if smooth is None else float((stats.channel_amax / smooth).max())
    return smooth, amax, weight_scales(smoothed_weight(w, site, smooth), site.weight_axis)


@pytest.mark.parametrize("op, trans_b", [("MatMul", False), ("Gemm", True)])
def test_solve_smoothquant_auto_picks_the_alpha_with_the_best_layer_sqnr(op, trans_b):
    plan, stats, w, calib, sample, site = _one_site_problem(op, trans_b)
    config = QuantConfig(smoothquant={"mode": "auto"})
    p = solve(plan, stats, lambda name: w, config, {"X": sample}).params["lin"]
    scores = {}
    for alpha in (None,) + config.smoothquant.alphas:
        smooth, amax, ws = _reference_params(stats["X"], w, site, trans_b, alpha)
        scores[alpha] = layer_sqnr_ref(sample, w, trans_b, smooth, float(scale_from_amax(amax)), ws)
    best = max(scores, key=scores.get)
    assert best is not None and scores[best] > scores[None] + 1  # outlier channels: smoothing wins
    assert p.alpha == best and p.method == "max"
    assert p.layer_sqnr_db == pytest.approx(scores[best], abs=1e-3)
    smooth, amax, ws = _reference_params(stats["X"], w, site, trans_b, best)
    np.testing.assert_array_equal(p.smooth, smooth)
    # the activation range of X / s, exact from the per-channel maxima: that of the data itself
    assert p.act_amax == pytest.approx(float(np.abs(calib / smooth).max()), rel=1e-6)
    assert p.act_scale == pytest.approx(p.act_amax / 127, rel=1e-6)
    np.testing.assert_allclose(p.weight_scale, ws, rtol=1e-6)


def test_solve_smoothquant_auto_keeps_no_smoothing_where_no_alpha_beats_it():
    """The other way: channels of one range (no outliers), where every alpha only unbalances them."""
    k, n = 32, 24
    calib = np.random.default_rng(1).standard_normal((512, k)).astype(np.float32)
    sample = np.random.default_rng(11).standard_normal((256, k)).astype(np.float32)
    w = (np.random.default_rng(4).standard_normal((k, n)) / 6).astype(np.float32)
    site = site_of("MatMul", k, n)
    stats = {"X": stats_of(calib)}
    p = solve(QuantPlan(sites=(site,)), stats, lambda name: w, QuantConfig(smoothquant={"mode": "auto"}),
              {"X": sample}).params["lin"]
    scores = {}
    for alpha in (None,) + QuantConfig().smoothquant.alphas:
        smooth, amax, ws = _reference_params(stats["X"], w, site, False, alpha)
        scores[alpha] = layer_sqnr_ref(sample, w, False, smooth, float(scale_from_amax(amax)), ws)
    # measured: none 39.79 dB, alphas 0.25 / 0.5 / 0.75: 38.47 / 38.35 / 38.15
    assert scores[None] > max(v for a, v in scores.items() if a is not None) + 1.0
    assert (p.alpha, p.smooth) == (None, None) and p.act_amax == stats["X"].amax
    assert p.layer_sqnr_db == pytest.approx(scores[None], abs=1e-3)


def test_solve_fixed_alpha_and_off():
    plan, stats, w, _, sample, site = _one_site_problem()
    p = solve(plan, stats, lambda name: w, QuantConfig(smoothquant={"mode": "fixed", "alpha": 0.75}),
              {"X": sample}).params["lin"]
    assert p.alpha == 0.75
    np.testing.assert_array_equal(p.smooth, smoothing_vector(stats["X"].channel_amax, np.abs(w).max(1), 0.75))
    off = solve(plan, stats, lambda name: w, QuantConfig(smoothquant={"mode": "off"}), {"X": sample}).params["lin"]
    assert off.smooth is None and off.alpha is None and off.act_amax == stats["X"].amax


@pytest.mark.parametrize("mode", ["auto", "0.5"])
def test_a_conv_sharing_its_input_with_a_matmul_is_not_smoothed(mode):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["X", "Wc"], ["C"], name="conv"),
             helper.make_node("MatMul", ["X", "Wm"], ["M"], name="mm")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, [1, 8, 6, 6]),
         helper.make_tensor_value_info("M", TensorProto.FLOAT, [1, 4, 6, 5])],
        [numpy_helper.from_array(rng.standard_normal((8, 4, 1, 1)).astype(np.float32), "Wc"),
         numpy_helper.from_array(rng.standard_normal((6, 5)).astype(np.float32), "Wm")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = [{"X": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)} for _ in range(8)]
    r = quantize(model, feeds, QuantConfig(smoothquant=SmoothQuantConfig.from_flag(mode)), progress=False)
    assert r.params["conv"].smooth is None
    assert mode == "auto" or r.params["mm"].alpha == 0.5


def test_solve_calib_method_auto_picks_the_method_with_the_best_layer_sqnr():
    plan, _, w, _, _, site = _one_site_problem()
    # one value of 900 in the statistics (the held-back sample has none): clipping it pays
    calib = outlier_rows(512, 32, seed=0, factor=1.0)
    calib[7, 5] = 900.0
    stats = {"X": stats_of(calib)}
    sample = outlier_rows(256, 32, seed=1, factor=1.0)
    p = solve(plan, stats, lambda name: w, QuantConfig(calibration={"method": "auto"}), {"X": sample}).params["lin"]
    scores = {m: layer_sqnr_ref(sample, w, False, None, float(scale_from_amax(activation_amax(stats["X"], m))),
                                weight_scales(w, 1)) for m in METHODS}
    assert p.method == max(scores, key=scores.get)
    assert p.layer_sqnr_db == pytest.approx(max(scores.values()), abs=1e-3)
    assert scores[p.method] > scores["max"] + 10


def test_solve_calib_method_auto_keeps_max_where_clipping_hurts_the_sample():
    """The other way: the statistics have one value at 6 (the histogram methods clip near 4), the held-back
    sample spreads evenly up to 6: every clipped value costs more than the finer step saves."""
    plan, _, w, _, _, site = _one_site_problem()
    calib = outlier_rows(512, 32, seed=1, factor=1.0)
    calib[0, 0] = 6.0
    stats = {"X": stats_of(calib)}
    sample = np.random.default_rng(2).uniform(-6, 6, (256, 32)).astype(np.float32)
    p = solve(plan, stats, lambda name: w, QuantConfig(calibration={"method": "auto"}), {"X": sample}).params["lin"]
    thresholds = {m: references.threshold(calib, m) for m in METHODS}
    scores = {m: layer_sqnr_ref(sample, w, False, None, float(references.int8_scale(t)), weight_scales(w, 1))
              for m, t in thresholds.items()}
    assert all(thresholds[m] < thresholds["max"] for m in METHODS[1:])  # the others clip
    # measured: max 43.65 dB; mse (5.54) 33.62, percentile (3.93) 13.99, entropy (3.94) 14.02
    assert scores["max"] > max(scores[m] for m in METHODS[1:]) + 5.0
    assert (p.method, p.act_amax) == ("max", 6.0)
    assert p.layer_sqnr_db == pytest.approx(scores["max"], abs=1e-3)


def test_solve_without_a_sample_uses_the_configured_method_and_no_smoothing():
    plan, stats, w, _, _, _ = _one_site_problem()
    p = solve(plan, stats, lambda name: w, QuantConfig(calibration={"method": "auto"}, smoothquant={"mode": "auto"}),
              {}).params["lin"]
    assert (p.smooth, p.method, p.layer_sqnr_db, p.act_amax) == (None, "max", None, stats["X"].amax)


def test_solve_dual_takes_polarity_statistics_after_smoothing():
    k, n = 16, 8
    h = outlier_rows(400, k, seed=5, channels=(3,), factor=20.0)
    # quick GELU: a negative part down to about -0.28
    a = (h / (1 + np.exp(-1.702 * h.astype(np.float64)))).astype(np.float32)
    w = (np.random.default_rng(6).standard_normal((k, n)) / 4).astype(np.float32)
    site = site_of("MatMul", k, n)
    plan = QuantPlan(sites=(site,), dual=(DualSite("lin", "act", "quick_gelu"),))
    stats = {"X": stats_of(a)}
    config = QuantConfig(dualscale={"mode": "all"}, smoothquant={"mode": "fixed", "alpha": 0.5})
    q = solve(plan, stats, lambda name: w, config, {"X": a[:200]})
    smooth = q.params["lin"].smooth
    assert smooth is not None
    dual, decisions = q.dual, q.decisions
    d = dual["lin"]
    assert d.pos_scale == pytest.approx(float(np.maximum(a / smooth, 0).max()) / 127, rel=1e-6)
    assert d.neg_scale == pytest.approx(float(np.maximum(-a / smooth, 0).max()) / 128, rel=1e-6)
    np.testing.assert_allclose(d.weight_scale, weight_scales(w * smooth[:, None], 1), rtol=1e-6)
    assert decisions[0].apply and decisions[0].measured


# -- end to end: SmoothQuant helps where it should -----------------------------------------------------
OUTLIER_CHANNELS = [3, 17, 40, 55]  # 4 of 64 input channels, x50


def _outlier_inputs(feeds: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((feeds, 32, 64)).astype(np.float32)
    x[..., OUTLIER_CHANNELS] *= 50
    return x


def _proj_model():
    w = (np.random.default_rng(0).standard_normal((64, 48)) / 8).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"], name="proj")], "proj",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [32, 64])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [32, 48])],
                              [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.fixture(scope="module")
def outlier_runs(tmp_path_factory):
    """quantize() on the outlier linear: 16 calibration feeds, 8 held-out evaluation feeds."""
    d = tmp_path_factory.mktemp("smoothing")
    np.savez(d / "calib.npz", X=_outlier_inputs(16, 1))
    np.savez(d / "eval.npz", X=_outlier_inputs(8, 2))
    runs = {}
    for mode, method in [("off", "max"), ("auto", "max"), ("0.5", "max"), ("auto", "auto")]:
        runs[mode, method] = quantize(_proj_model(), d / "calib.npz",
                                      QuantConfig(calibration={"method": method},
                                                  smoothquant=SmoothQuantConfig.from_flag(mode),
                                                  dualscale={"mode": "off"},
                                                  precision={"high_precision": "fp32"}),  # numpy references
                                      eval_data=d / "eval.npz", progress=False)
    return runs


def test_smoothquant_auto_beats_no_smoothing_on_held_out_data(outlier_runs):
    off = outlier_runs["off", "max"].report["output_error"]["Y"]["sqnr_db"]
    auto = outlier_runs["auto", "max"].report["output_error"]["Y"]["sqnr_db"]
    assert auto - off > 8.0  # measured 29.25 -> 40.13 dB (+10.9)
    assert auto > 36.0


def test_smoothquant_auto_reports_the_chosen_alpha(outlier_runs):
    (row,) = outlier_runs["auto", "max"].report["sites"]
    assert row["smooth_alpha"] in QuantConfig().smoothquant.alphas  # measured: 0.5
    assert row["layer_sqnr_db"] > 36.0  # measured 40.07, on the held-back sample
    (off,) = outlier_runs["off", "max"].report["sites"]
    assert off["smooth_alpha"] is None


def test_the_smoothed_graph_computes_fq_x_over_s_times_fq_s_w(outlier_runs):
    result = outlier_runs["auto", "max"]
    p = result.params["proj"]
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    mul = next(nd for nd in result.model.graph.node if nd.op_type == "Mul")
    assert mul.name == "proj/smooth" and mul.input[0] == "X"
    np.testing.assert_array_equal(inits[mul.input[1]], (1 / p.smooth).astype(np.float32))
    x = _outlier_inputs(1, 9)[0]
    w = numpy_helper.to_array(_proj_model().graph.initializer[0])
    ref = fq_ref(x / p.smooth, p.act_scale) @ fq_ref(w * p.smooth[:, None], p.weight_scale, axis=1)
    got = run_model(result.model, {"X": x})[0]
    bound = (64 + 4) * 2.0**-23 * np.abs(fq_ref(x / p.smooth, p.act_scale)) @ np.abs(w * p.smooth[:, None])
    assert (np.abs(got - ref) <= bound + 1e-30).all()


@pytest.mark.parametrize("kind", ["matmul", "gemm"])
def test_a_fixed_alpha_applies_everywhere_possible(kind, tmp_path):
    np.savez(tmp_path / "c.npz", X=calib_inputs(kind, 8))
    r = quantize(build_linear_model(kind), tmp_path / "c.npz", QuantConfig(smoothquant={"mode": "fixed",
                                                                                        "alpha": 0.5}), progress=False)
    assert [row["smooth_alpha"] for row in r.report["sites"]] == [0.5, 0.5]
    assert sorted(nd.name for nd in r.model.graph.node if nd.name.endswith("/smooth")) == ["fc1/smooth", "fc2/smooth"]


@pytest.mark.parametrize("mode", ["auto", "0.5"])
def test_conv_sites_are_never_smoothed(mode, tmp_path):
    np.savez(tmp_path / "c.npz", X=calib_inputs("conv", 8))
    r = quantize(build_linear_model("conv"), tmp_path / "c.npz",
                 QuantConfig(smoothquant=SmoothQuantConfig.from_flag(mode)), progress=False)
    assert [row["smooth_alpha"] for row in r.report["sites"]] == [None, None]
    assert all(p.smooth is None for p in r.params.values())
    assert not [nd for nd in r.model.graph.node if nd.name.endswith("/smooth")]


def test_a_fixed_alpha_needs_no_row_sample(tmp_path):
    np.savez(tmp_path / "c.npz", X=_outlier_inputs(3, 1))  # 3 feeds < holdout_every = 4
    r = quantize(_proj_model(), tmp_path / "c.npz", QuantConfig(dualscale={"mode": "off"},
                                                                smoothquant={"mode": "fixed",
                                                                             "alpha": 0.5}), progress=False)
    assert r.report["sites"][0]["smooth_alpha"] == 0.5


def test_calib_method_auto_is_not_worse_than_max_on_held_out_data(outlier_runs):
    auto = outlier_runs["auto", "auto"].report["output_error"]["Y"]["sqnr_db"]
    plain_max = outlier_runs["auto", "max"].report["output_error"]["Y"]["sqnr_db"]
    assert auto >= plain_max - 1.0
