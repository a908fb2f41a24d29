"""fit: recipe + statistics -> parameters. The scales come from the statistics given, the decisions
from the recipe, checked against numpy references and quant_math's own formulas."""

from __future__ import annotations

import numpy as np
import pytest

import references

from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.config import QuantConfig
from segquant_onnx.params import DualDecision
from segquant_onnx.plan import DualSite, LinearSite, QuantPlan
from segquant_onnx.solve.choose import choose
from segquant_onnx.solve.fit import fit, masked_stats
from segquant_onnx.solve.quant_math import (entropy_amax, mse_amax, percentile_amax, scale_from_amax,
                                            smoothing_vector, weight_scales)
from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant

K, N = 32, 24


def stats_of(x: np.ndarray) -> TensorStats:
    s = TensorStats.empty()
    s.update(x)
    return s


def rows(n: int, seed: int, channels=(1, 9, 20), factor: float = 50.0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, K)).astype(np.float32)
    x[:, list(channels)] *= factor
    return x


def quick_gelu(h: np.ndarray) -> np.ndarray:
    return (h / (1 + np.exp(-1.702 * h.astype(np.float64)))).astype(np.float32)


SITE = LinearSite("lin", "MatMul", "X", "W", (K, N), 1, 2 * K * N)
W = (np.random.default_rng(4).standard_normal((K, N)) / 6).astype(np.float32)
PLAN = QuantPlan(sites=(SITE,))
DUAL_PLAN = QuantPlan(sites=(SITE,), dual=(DualSite("lin", "act", "quick_gelu"),))


def weight(name: str) -> np.ndarray:
    assert name == "W"
    return W


def fitted(recipe: Recipe, x: np.ndarray, plan=PLAN, percentile: float = 99.99):
    return fit(plan, recipe, {"X": stats_of(x)}, weight, percentile=percentile)


# -- decided on one set of statistics, fitted on another ------------------------------------------------------
def test_a_recipe_fitted_on_other_statistics_takes_their_scales_and_keeps_its_decisions():
    fit_rows, sample = rows(512, seed=0), rows(256, seed=1)
    config = QuantConfig(calibration={"method": "auto"})
    recipe = choose(PLAN, {"X": stats_of(fit_rows)}, {"X": sample}, weight, config, Variant("auto", "off"))
    choice = recipe.sites["lin"]
    assert choice.alpha is not None  # outlier channels: a smoothed candidate wins on this sample
    other = 3.0 * rows(512, seed=2, channels=(4, 9), factor=30.0)  # other maxima, other outlier channels
    p = fitted(recipe, other).params["lin"]
    # the decisions of the first
    assert (p.alpha, p.method, p.layer_sqnr_db) == (choice.alpha, choice.method, choice.layer_sqnr_db)
    # the scales of the second, from numpy on its data
    smooth = smoothing_vector(np.abs(other).max(0), np.abs(W).max(1), choice.alpha)
    np.testing.assert_array_equal(p.smooth, smooth)
    assert p.act_amax == pytest.approx(float(np.abs(other / smooth).max()), rel=1e-6)
    assert p.act_scale == pytest.approx(p.act_amax / 127, rel=1e-6)
    np.testing.assert_allclose(p.weight_scale, weight_scales(W * smooth[:, None], 1), rtol=1e-6)
    # and not those of the first
    first = fitted(recipe, fit_rows).params["lin"]
    assert first.act_amax < 0.8 * p.act_amax and not np.allclose(first.smooth, p.smooth, rtol=0.1)


def test_dual_scales_are_fitted_on_the_statistics_given_after_smoothing():
    a_fit = quick_gelu(rows(400, seed=5, channels=(3,), factor=20.0))
    a_all = np.concatenate([a_fit, 2.0 * quick_gelu(rows(100, seed=6, channels=(3,), factor=20.0))])
    recipe = choose(DUAL_PLAN, {"X": stats_of(a_fit)}, {"X": a_fit[:200]}, weight,
                    QuantConfig(), Variant("fixed", "all", 0.5))
    assert [d.apply for d in recipe.dual] == [True]
    q = fitted(recipe, a_all, plan=DUAL_PLAN)
    smooth = q.params["lin"].smooth
    np.testing.assert_array_equal(smooth, smoothing_vector(np.abs(a_all).max(0), np.abs(W).max(1), 0.5))
    d = q.dual["lin"]
    assert d.pos_scale == pytest.approx(float(np.maximum(a_all / smooth, 0).max()) / 127, rel=1e-6)
    assert d.neg_scale == pytest.approx(float(np.maximum(-a_all / smooth, 0).max()) / 128, rel=1e-6)
    np.testing.assert_allclose(d.weight_scale, weight_scales(W * smooth[:, None], 1), rtol=1e-6)
    assert q.decisions == list(recipe.dual)


# -- each calibration method reaches fit ----------------------------------------------------------------------
def heavy_tailed() -> np.ndarray:
    x = np.random.default_rng(0).laplace(size=(4096, K)).astype(np.float32)
    x[5, 3], x[9, 7] = 80.0, -60.0
    return x


@pytest.mark.parametrize("method, reference", [
    ("percentile", lambda st, pct: percentile_amax(st, pct)),
    ("mse", lambda st, pct: mse_amax(st)),
    ("entropy", lambda st, pct: entropy_amax(st)),
])
@pytest.mark.parametrize("with_sample", [False, True])
def test_a_fixed_calibration_method_gives_the_threshold_of_its_formula(method, reference, with_sample):
    x = heavy_tailed()
    st = stats_of(x)
    config = QuantConfig(calibration={"method": method, "percentile": 99.9})
    samples = {"X": x[:256]} if with_sample else {}
    recipe = choose(PLAN, {"X": st}, samples, weight, config, Variant("off", "off"))
    assert recipe.sites["lin"].method == method
    p = fit(PLAN, recipe, {"X": st}, weight, percentile=config.calibration.percentile).params["lin"]
    expected = reference(st, 99.9)
    assert expected < 0.7 * st.amax  # clipped: a method that fell back to max would fail below
    assert p.method == method and p.act_amax == expected
    assert p.act_scale == float(scale_from_amax(expected))
    assert p.smooth is None and p.alpha is None
    np.testing.assert_array_equal(p.weight_scale, weight_scales(W, 1))
    assert expected == references.threshold(x, method, 99.9)  # the formula, written out in tests/references.py
    if with_sample:  # what choose scored is what fit gives: these scales on the sample, the config's percentile
        want = references.layer_sqnr(x[:256], W, references.int8_scale(expected))
        assert recipe.sites["lin"].layer_sqnr_db == pytest.approx(want, abs=1e-3)


def test_percentile_is_read_from_the_fit_argument():
    st = stats_of(heavy_tailed())
    recipe = Recipe({"lin": SiteChoice("percentile")})
    p999 = fit(PLAN, recipe, {"X": st}, weight, percentile=99.9).params["lin"]
    p9999 = fit(PLAN, recipe, {"X": st}, weight, percentile=99.99).params["lin"]
    assert (p999.act_amax, p9999.act_amax) == (percentile_amax(st, 99.9), percentile_amax(st, 99.99))
    assert p999.act_amax < p9999.act_amax


# -- outlier channels, float sites, the recipe's own invariants ----------------------------------------------
def test_outlier_sites_are_fitted_on_their_bulk_with_the_exact_maximum():
    x = heavy_tailed()
    x[:, 11] *= 40  # an outlier channel
    idx = np.array([11], np.int64)
    recipe = Recipe({"lin": SiteChoice("entropy")}, outliers={"lin": idx})
    q = fitted(recipe, x)
    p = q.params["lin"]
    bulk = x.copy()
    bulk[:, 11] = 0
    assert p.method == "max" and p.act_amax == float(np.abs(bulk).max())  # histogram has every channel: max
    w_bulk = W.copy()
    w_bulk[11] = 0
    np.testing.assert_array_equal(p.weight_scale, weight_scales(w_bulk, 1))
    np.testing.assert_array_equal(q.outliers["lin"], idx)
    assert masked_stats(stats_of(x), idx).amax == p.act_amax


def test_floating_sites_get_no_dual_scales_and_lose_their_outliers():
    a = quick_gelu(rows(300, seed=7))
    decision = DualDecision("lin", "quick_gelu", True, 2.0, True, SITE.flops)
    recipe = Recipe({"lin": SiteChoice("max")}, (decision,), {"lin": np.array([1], np.int64)})
    assert set(fitted(recipe, a, plan=DUAL_PLAN).dual) == {"lin"}
    floating = recipe.in_float(["lin"])
    q = fitted(floating, a, plan=DUAL_PLAN)
    assert q.dual == {} and q.outliers == {} and q.floating == frozenset({"lin"})
    assert q.decisions == [decision]  # the report still shows the decision and its gain
    assert recipe.outliers["lin"].tolist() == [1]  # in_float made a new recipe


def test_a_recipe_is_frozen():
    idx = np.array([2, 5], np.int64)
    recipe = Recipe({"lin": SiteChoice("max")}, outliers={"lin": idx})
    with pytest.raises(TypeError):
        recipe.sites["other"] = SiteChoice("max")
    with pytest.raises(ValueError):
        recipe.outliers["lin"][0] = 7
    idx[0] = 3  # the caller's array is not the recipe's
    assert recipe.outliers["lin"].tolist() == [2, 5]
    with pytest.raises(ValueError):
        SiteChoice("auto")  # a recipe holds decisions, not modes
    with pytest.raises(ValueError):
        Recipe({}, outliers={"lin": idx})


def test_the_weight_scales_memo_gives_each_site_and_outlier_set_its_own_scales():
    """fit's `weight_scales` memo (the run's fits share it) returns what fitting without it gives: two sites whose
    weights have the same shape never share scales, nor one site with and without outlier channels (its bulk's
    weight has them zeroed); dual sites take their site's weight scales."""
    other = LinearSite("lin2", "MatMul", "X", "W2", (K, N), 1, 2 * K * N)
    w = W.copy()
    w[[1, 9]] *= 10  # input channels 1 and 9 hold every output channel's largest weight
    weights_ = {"W": w, "W2": W * np.linspace(0.5, 3.0, N, dtype=np.float32)}
    plan = QuantPlan(sites=(SITE, other), dual=(DualSite("lin2", "act", "quick_gelu"),))
    x = quick_gelu(rows(512, seed=6))
    stats = {"X": stats_of(x)}
    plain = Recipe({"lin": SiteChoice("max"), "lin2": SiteChoice("max")},
                   (DualDecision("lin2", "quick_gelu", True, 3.0, True, 1),))
    # the bulk of lin has input channels 1 and 9 zeroed, so other scales
    split = Recipe(plain.sites, plain.dual, outliers={"lin": np.array([1, 9])})
    reads, memo = [], {}

    def counted(name):
        reads.append(name)
        return weights_[name]

    for recipe in (plain, split, plain, split):
        got = fit(plan, recipe, stats, counted, percentile=99.99, weight_scales=memo)
        want = fit(plan, recipe, stats, weights_.__getitem__, percentile=99.99)
        for name in ("lin", "lin2"):
            np.testing.assert_array_equal(got.params[name].weight_scale, want.params[name].weight_scale)
        np.testing.assert_array_equal(got.dual["lin2"].weight_scale, want.params["lin2"].weight_scale)
    assert not np.array_equal(memo[next(k for k in memo if k[1] == "lin" and k[3] is None)],
                              memo[next(k for k in memo if k[1] == "lin" and k[3] is not None)])
    assert sorted(reads) == ["W", "W", "W2"]  # each (site, outliers) read once: lin twice, lin2 once
