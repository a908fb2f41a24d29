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
