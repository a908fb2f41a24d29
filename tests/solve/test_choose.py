"""choose: fit statistics + row sample -> Recipe. DualScale's measured gain against a numpy reference and
the minimum gain on both sides of it; the variant (not the config) sets the modes; outlier channels."""

from __future__ import annotations

import numpy as np
import pytest

from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.config import QuantConfig
from segquant_onnx.params import DualParams, SiteParams
from segquant_onnx.plan import DualSite, LinearSite, QuantPlan
from segquant_onnx.solve.choose import choose, choose_outliers, estimated_dual_gain
from segquant_onnx.solve.recipe import Recipe, Variant

K, N = 16, 8
SITE = LinearSite("lin", "MatMul", "X", "W", (K, N), 1, 2 * K * N)
PLAN = QuantPlan(sites=(SITE,), dual=(DualSite("lin", "act", "quick_gelu"),))
W = (np.random.default_rng(6).standard_normal((K, N)) / 4).astype(np.float32)


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats.empty()
    s.update(x)
    return s


def gelu_rows(n: int, seed: int) -> np.ndarray:
    h = np.random.default_rng(seed).standard_normal((n, K)).astype(np.float32) * 3
    return (h / (1 + np.exp(-1.702 * h.astype(np.float64)))).astype(np.float32)


def fq(x, scale, axis=None) -> np.ndarray:
    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim:
        s = s.reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return np.clip(np.rint(x.astype(np.float32) / s), -128, 127).astype(np.float64) * s.astype(np.float64)


def dual_gain_ref(fit_data: np.ndarray, sample: np.ndarray, w: np.ndarray = W) -> float:
    """SQNR(two scales) - SQNR(one scale) of sample @ w, scales from the fit data, in plain numpy."""
    s = np.float32(np.abs(fit_data).max() / 127)
    s_pos, s_neg = np.float32(fit_data.max() / 127), np.float32(-fit_data.min() / 128)
    wq = fq(w, np.abs(w).max(0) / 127, axis=1)
    y = sample.astype(np.float64) @ w
    single = fq(sample, s) @ wq
    dual = (fq(np.maximum(sample, 0), s_pos) + fq(np.minimum(sample, 0), s_neg)) @ wq
    snr = lambda approx: 10 * np.log10((y**2).sum() / ((y - approx) ** 2).sum())  # noqa: E731
    return float(snr(dual) - snr(single))


FIT, SAMPLE = gelu_rows(600, seed=1), gelu_rows(200, seed=2)


def decide(variant: Variant, **dualscale) -> Recipe:
    return choose(PLAN, {"X": stats_of(FIT)}, {"X": SAMPLE}, lambda name: W,
                  QuantConfig(dualscale=dualscale), variant)


def test_the_measured_dual_gain_is_the_layer_sqnr_difference():
    (d,) = decide(Variant("off", "all")).dual
    expected = dual_gain_ref(FIT, SAMPLE)
    assert expected > 1.0  # GELU's negative part: two scales win
    assert d.measured and d.gain_db == pytest.approx(expected, abs=2e-3)


@pytest.mark.parametrize("margin, applied", [(-0.05, True), (0.0, True), (0.05, False)])
def test_dualscale_auto_keeps_a_site_only_where_the_gain_reaches_the_minimum(margin, applied):
    gain = dual_gain_ref(FIT, SAMPLE)
    min_gain = round(gain, 3) + margin if margin else gain - 1e-3  # 0.0: just below the exact gain
    (d,) = decide(Variant("off", "auto"), min_gain_db=max(min_gain, 0.0)).dual
    assert d.apply is applied
    assert d.gain_db == pytest.approx(gain, abs=2e-3)  # reported either way


def test_dualscale_off_and_all_do_not_look_at_the_gain():
    huge = decide(Variant("off", "all"), min_gain_db=1e6).dual[0]
    off = decide(Variant("off", "off"), min_gain_db=0.0).dual[0]
    assert huge.apply and not off.apply
    assert off.gain_db == huge.gain_db  # measured and reported for the report either way


def test_no_negative_part_no_dualscale():
    positive = np.abs(FIT)
    recipe = choose(PLAN, {"X": stats_of(positive)}, {"X": np.abs(SAMPLE)}, lambda name: W, QuantConfig(),
                    Variant("off", "all"))
    assert not recipe.dual[0].apply


def test_without_a_sample_the_gain_is_the_rounding_noise_estimate():
    st = stats_of(FIT)
    recipe = choose(PLAN, {"X": st}, {}, lambda name: W, QuantConfig(), Variant("off", "all"))
    (d,) = recipe.dual
    s, s_pos, s_neg = float(np.abs(FIT).max() / 127), float(FIT.max() / 127), float(-FIT.min() / 128)
    n, n_neg = FIT.size, int((FIT < 0).sum())
    expected = 10 * np.log10(n * s**2 / ((n - n_neg) * s_pos**2 + n_neg * s_neg**2))
    assert not d.measured and d.gain_db == pytest.approx(expected, abs=2e-3)
    single = SiteParams(1.0, s, np.ones(N, np.float32), "max")
    assert estimated_dual_gain(st, single, DualParams(s_pos, s_neg, np.ones(N, np.float32))) == pytest.approx(
        expected, rel=1e-5)


def test_the_variant_sets_the_modes_not_the_config():
    x = np.random.default_rng(0).standard_normal((512, K)).astype(np.float32)
    x[:, [2, 9]] *= 50
    sample = np.random.default_rng(1).standard_normal((256, K)).astype(np.float32)
    sample[:, [2, 9]] *= 50
    args = (PLAN, {"X": stats_of(x)}, {"X": sample}, lambda name: W)
    smoothed = choose(*args, QuantConfig(dualscale={"mode": "off"}, smoothquant={"mode": "off"}), Variant("auto",
                                                                                                          "off"))
    plain = choose(*args, QuantConfig(dualscale={"mode": "all"}, smoothquant={"mode": "auto"}), Variant("off", "off"))
    fixed = choose(*args, QuantConfig(), Variant("fixed", "off", 0.75))
    assert smoothed.sites["lin"].alpha in QuantConfig().smoothquant.alphas
    assert plain.sites["lin"].alpha is None and not plain.dual[0].apply
    assert fixed.sites["lin"].alpha == 0.75
    assert smoothed.sites["lin"].layer_sqnr_db > plain.sites["lin"].layer_sqnr_db + 3


def test_variants_are_validated():
    with pytest.raises(ValueError):
        Variant("auto", "sometimes")
    with pytest.raises(ValueError):
        Variant("fixed", "off", 1.5)


def test_choose_outliers_takes_the_largest_channels_over_the_ratio_within_the_budget():
    x = np.random.default_rng(3).standard_normal((256, K)).astype(np.float32)
    x[:, 4] *= 100
    x[:, 11] *= 30
    x[:, 7] *= 5  # under the ratio
    plan = QuantPlan(sites=(SITE,))
    stats = {"X": stats_of(x)}
    assert choose_outliers(plan, stats, 8, 8.0, 100.0)["lin"].tolist() == [4, 11]
    assert choose_outliers(plan, stats, 1, 8.0, 100.0)["lin"].tolist() == [4]
    assert choose_outliers(plan, stats, 0, 8.0, 100.0) == {}
    # two of sixteen channels cost 12.5% of the site's FLOPs: over a 10% budget, under 13%
    assert choose_outliers(plan, stats, 8, 8.0, 10.0) == {}
    assert choose_outliers(plan, stats, 8, 8.0, 13.0)["lin"].tolist() == [4, 11]


def test_a_site_with_outliers_is_chosen_on_its_bulk():
    x = gelu_rows(600, seed=4)
    x[:, 5] *= 60
    sample = gelu_rows(200, seed=5)
    sample[:, 5] *= 60
    outliers = {"lin": np.array([5], np.int64)}
    recipe = choose(PLAN, {"X": stats_of(x)}, {"X": sample}, lambda name: W,
                    QuantConfig(calibration={"method": "auto"}),
                    Variant("off", "all"), outliers)
    assert recipe.sites["lin"].method == "max"  # the bulk's range is exact from the channel maxima
    bulk_fit, bulk_sample = x.copy(), sample.copy()
    bulk_fit[:, 5], bulk_sample[:, 5] = 0, 0
    w = W.copy()
    w[5] = 0
    assert recipe.dual[0].gain_db == pytest.approx(dual_gain_ref(bulk_fit, bulk_sample, w), abs=2e-3)
    assert recipe.outliers["lin"].tolist() == [5]


@pytest.mark.parametrize("top, chosen", [(8.0 * (1 + 2**-10), [4]), (8.0, []), (8.0 * (1 - 2**-10), [])])
def test_an_outlier_channel_is_one_strictly_over_ratio_times_the_median(top, chosen):
    x = np.ones((4, K), np.float32)  # every channel's abs-max 1: the median
    x[2, 4] = -top
    picked = choose_outliers(QuantPlan(sites=(SITE,)), {"X": stats_of(x)}, 4, 8.0, 100.0)
    assert picked.get("lin", np.zeros(0)).tolist() == chosen


# -- cases the mutation check (mutmut on choose.py) found untested ------------------------------------------------
def _outlier_stats(x: np.ndarray, axis: int = -1) -> TensorStats:
    s = TensorStats.empty(channel_axis=axis)
    s.update(x)
    return s


def _two_outliers(scale: float = 1.0) -> np.ndarray:
    x = np.full((4, K), scale, np.float32)  # every channel's abs-max `scale`: the median
    x[1, 4], x[2, 11] = 100 * scale, -30 * scale
    return x


def test_the_outlier_budget_may_be_spent_exactly():
    stats = {"X": stats_of(_two_outliers())}
    # two of sixteen channels cost 12.5% of the site's FLOPs, which is the whole plan's
    assert choose_outliers(QuantPlan(sites=(SITE,)), stats, 8, 8.0, 12.5)["lin"].tolist() == [4, 11]
    assert choose_outliers(QuantPlan(sites=(SITE,)), stats, 8, 8.0, 12.4) == {}


def test_the_ratio_is_to_the_median_however_small_it_is():
    """A median of 1/4: channels over 8 x 1/4 are outliers (a floor on the median is for dead tensors only)."""
    stats = {"X": stats_of(_two_outliers(0.25))}
    assert choose_outliers(QuantPlan(sites=(SITE,)), stats, 8, 8.0, 100.0)["lin"].tolist() == [4, 11]


def test_equal_outlier_channels_are_taken_in_channel_order_up_to_the_cap():
    x = np.ones((4, K), np.float32)
    x[0, [1, 6, 9, 14]] = 50.0
    assert choose_outliers(QuantPlan(sites=(SITE,)), {"X": stats_of(x)}, 3, 8.0, 100.0)["lin"].tolist() == [1, 6, 9]


def test_sites_that_cannot_take_outlier_channels_do_not_stop_the_others():
    """Before `lin`: a site whose activation is not channels-last, a Conv whose statistics run over the last
    axis (not its channels), and one whose statistics have another channel count."""
    not_last = LinearSite("transA", "Gemm", "A", "W", (K, N), 1, 2 * K * N, channels_last=False)
    conv = LinearSite("conv", "Conv", "C", "Wc", (N, K, 1, 1), 0, 2 * K * N)
    other_k = LinearSite("other", "MatMul", "B", "Wb", (K + 1, N), 1, 2 * K * N)
    plan = QuantPlan(sites=(not_last, conv, other_k, SITE))
    stats = {"A": stats_of(_two_outliers()), "C": stats_of(_two_outliers()), "B": stats_of(_two_outliers()),
             "X": stats_of(_two_outliers())}
    assert {k: v.tolist() for k, v in choose_outliers(plan, stats, 8, 8.0, 100.0).items()} == {"lin": [4, 11]}
    nchw = np.ones((1, K, 2, 2), np.float32)
    nchw[0, 4, 0, 0] = 100.0
    stats["C"] = _outlier_stats(nchw, axis=1)  # a Conv's statistics over its channel axis: it takes its own
    assert choose_outliers(plan, stats, 8, 8.0, 100.0)["conv"].tolist() == [4]


def test_the_searches_score_the_first_search_rows_of_the_sample():
    sample = gelu_rows(400, seed=2)
    config = QuantConfig(calibration={"search_rows": 64})
    recipe = choose(PLAN, {"X": stats_of(FIT)}, {"X": sample}, lambda name: W, config, Variant("off", "all"))
    (d,) = recipe.dual
    assert d.gain_db == pytest.approx(dual_gain_ref(FIT, sample[:64]), abs=2e-3)
    assert abs(dual_gain_ref(FIT, sample[:64]) - dual_gain_ref(FIT, sample)) > 0.01  # the cut matters
    y = sample[:64].astype(np.float64) @ W
    y_q = fq(sample[:64], np.abs(FIT).max() / 127) @ fq(W, np.abs(W).max(0) / 127, 1)
    want = 10 * np.log10((y**2).sum() / ((y - y_q) ** 2).sum())
    assert recipe.sites["lin"].layer_sqnr_db == pytest.approx(want, abs=2e-3)


def test_the_measured_dual_gain_of_a_transposed_weight():
    """Gemm transB=1: W stored [N, K], its output channels on axis 0."""
    site = LinearSite("lin", "Gemm", "X", "W", (N, K), 0, 2 * K * N)
    plan = QuantPlan(sites=(site,), dual=(DualSite("lin", "act", "quick_gelu"),))
    (d,) = choose(plan, {"X": stats_of(FIT)}, {"X": SAMPLE}, lambda name: W.T.copy(), QuantConfig(),
                  Variant("off", "all")).dual
    assert d.gain_db == pytest.approx(dual_gain_ref(FIT, SAMPLE), abs=2e-3)


def test_the_measured_dual_gain_after_smoothing_is_that_of_x_over_s_and_s_w():
    from segquant_onnx.solve.quant_math import smoothing_vector

    fit_x, sample = gelu_rows(600, seed=1), gelu_rows(200, seed=2)
    fit_x[:, 3] *= 20
    sample[:, 3] *= 20
    recipe = choose(PLAN, {"X": stats_of(fit_x)}, {"X": sample}, lambda name: W, QuantConfig(),
                    Variant("fixed", "all", 0.5))
    s = smoothing_vector(np.abs(fit_x).max(0), np.abs(W).max(1), 0.5)
    assert not np.allclose(s, 1)
    (d,) = recipe.dual
    assert d.gain_db == pytest.approx(dual_gain_ref(fit_x / s, sample / s, W * s[:, None]), abs=2e-3)


def test_the_decision_names_its_kind_and_flops_and_applies_at_exactly_the_minimum_gain(monkeypatch):
    import segquant_onnx.solve.choose as choose_module

    monkeypatch.setattr(choose_module, "measured_dual_gain", lambda *args: 1.25)
    (d,) = decide(Variant("off", "auto"), min_gain_db=1.25).dual
    assert (d.site, d.kind, d.apply, d.gain_db, d.measured, d.flops) == ("lin", "quick_gelu", True, 1.25, True,
                                                                          SITE.flops)
    (d,) = decide(Variant("off", "auto"), min_gain_db=1.25 + 2**-10).dual
    assert not d.apply


def test_the_rounding_noise_estimate_of_a_small_tensor():
    x = np.array([[0.5, -0.25, 0.125, -0.0625]], np.float32)  # n = 4, 2 negative
    st = stats_of(x)
    s, s_pos, s_neg = 0.5 / 127, 0.125 / 127, 0.25 / 128
    single = SiteParams(0.5, s, np.ones(N, np.float32), "max")
    expected = 10 * np.log10(4 * s**2 / (2 * s_pos**2 + 2 * s_neg**2))
    assert estimated_dual_gain(st, single, DualParams(s_pos, s_neg, np.ones(N, np.float32))) == pytest.approx(
        expected, rel=1e-6)


def test_under_fp8_the_searches_and_the_gains_are_scored_on_the_fp8_grid():
    """Scales amax / 448 (DualScale's negative side too) and E4M3 rounding, in the layer SQNR of the per-site
    search and in DualScale's measured gain."""
    from segquant_onnx.formats import FP8_E4M3

    recipe = choose(PLAN, {"X": stats_of(FIT)}, {"X": SAMPLE}, lambda name: W,
                    QuantConfig(precision={"format": "fp8"}), Variant("off", "all"))
    f8 = FP8_E4M3.fake_quant
    wq = f8(W, (np.abs(W).max(0) / 448).astype(np.float32), 1)
    y = SAMPLE.astype(np.float64) @ W
    snr = lambda approx: 10 * np.log10((y**2).sum() / ((y - approx) ** 2).sum())  # noqa: E731
    single = snr(f8(SAMPLE, np.float32(np.abs(FIT).max() / 448)) @ wq)
    dual = snr((f8(np.maximum(SAMPLE, 0), np.float32(FIT.max() / 448))
                + f8(np.minimum(SAMPLE, 0), np.float32(-FIT.min() / 448))) @ wq)
    assert recipe.sites["lin"].layer_sqnr_db == pytest.approx(single, abs=2e-3)
    (d,) = recipe.dual
    assert d.gain_db == pytest.approx(dual - single, abs=2e-3)
    assert abs(d.gain_db - dual_gain_ref(FIT, SAMPLE)) > 0.1  # INT8's gain is another number


def test_a_site_with_outliers_is_scored_with_its_bulk_maximum_whatever_the_method():
    """The bulk's histogram is not observed (it still holds the outlier channel), so a percentile of it is
    not the bulk's: the bulk is clipped at its exact maximum, method `max`."""
    x = gelu_rows(600, seed=4)
    x[:, 5] *= 60
    sample = gelu_rows(200, seed=5)
    sample[:, 5] *= 60
    recipe = choose(PLAN, {"X": stats_of(x)}, {"X": sample}, lambda name: W,
                    QuantConfig(calibration={"method": "percentile", "percentile": 90.0}), Variant("off", "off"),
                    {"lin": np.array([5], np.int64)})
    bulk_fit, bulk_sample, w = x.copy(), sample.copy(), W.copy()
    bulk_fit[:, 5], bulk_sample[:, 5], w[5] = 0, 0, 0
    y = bulk_sample.astype(np.float64) @ w
    y_q = fq(bulk_sample, np.abs(bulk_fit).max() / 127) @ fq(w, np.abs(w).max(0) / 127, 1)
    assert recipe.sites["lin"].method == "max"
    assert recipe.sites["lin"].layer_sqnr_db == pytest.approx(10 * np.log10((y**2).sum() / ((y - y_q) ** 2).sum()),
                                                              abs=2e-3)
