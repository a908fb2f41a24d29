"""The model-output decision policy (analysis.decide): which global trial wins, DualScale's output check,
the per-site outlier refinement's keep rule; each decision driven one way and the other.

The policy runs on scores, so most cases script them (a stand-in for the held-back scoring) with values
that are exact in binary, which puts the thresholds' comparisons (`<` against `<=`) to the test. The
output check is also run for real on a GELU model, with the threshold a few hundredths of a dB either
side of the gain it measures there, and its effect on the written graph checked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

import numpy as np
import pytest

import segquant_onnx.analysis.decide as decide
from conftest import build_linear_model, calib_inputs, run_model
from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.analysis.outlier_search import SearchResult
from segquant_onnx.config import QuantConfig
from segquant_onnx.pipeline import quantize
from segquant_onnx.plan import DualSite, LinearSite, QuantPlan

SITE = LinearSite("lin", "MatMul", "X", "W", (16, 8), 1, 256)
PLAN = QuantPlan(sites=(SITE,), dual=(DualSite("lin", "act", "quick_gelu"),))


# -- scripted trials ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Q:
    """What the policy reads of a fitted quantization: its DualScale sites and outlier channels."""

    dual: dict
    outliers: dict
    key: tuple


class _Candidates:
    """decide._Candidates with scripted recipes: `by_cap` cap -> outlier channels; a DualScale `auto`
    variant applies a site when `dual_applies`."""

    def __init__(self, config: QuantConfig, by_cap: dict[int, dict], dual_applies=True):
        self.config, self.by_cap, self.dual_applies, self.progress = config, by_cap, dual_applies, False
        self.cal = SimpleNamespace(batches=8)  # calibration's batches: the per-site search's budget

    def outliers(self, cap, max_flop_pct=None):
        return self.by_cap[cap]

    def recipe(self, variant, outliers):
        return variant, tuple(sorted((k, tuple(v)) for k, v in outliers.items()))

    def score(self, held, graph, recipe, q):  # no memo here: every trial is scored (decide._Candidates.score)
        return held.score(graph, None, q)

    def fitted(self, recipe):
        variant, outliers = recipe
        applies = (self.dual_applies if isinstance(self.dual_applies, bool)
                   else variant.smoothquant_flag in self.dual_applies)  # a set: with these SmoothQuant settings
        dual = {"lin": "dual"} if variant.dualscale.value != "off" and applies else {}
        return _Q(dual, dict(outliers), (sum(len(v) for _, v in outliers), variant.smoothquant_flag,
                                         "dual" if dual else "plain"))


class _Held:
    """HeldBack with a score table: (outlier channels, smoothquant flag, 'dual' | 'plain') -> dB."""

    def __init__(self, table: dict):
        self.table, self.scored = table, []

    def score(self, graph, plan, q):
        self.scored.append(q.key)
        return self.table[q.key]


def _trials(config: QuantConfig, table: dict, by_cap=None, dual_applies=True):
    by_cap = by_cap or {0: {}}
    space = decide.search_space(PLAN, config)
    cand, held, rows = _Candidates(config, by_cap, dual_applies), _Held(table), []
    best = decide._global_trials(None, PLAN, cand, held, space, rows)
    return best, held, rows


def _applied(best) -> bool:
    return bool(best.q.dual)


MIN_OUT = 0.25  # exact in binary, like every scripted score below


@pytest.mark.parametrize("gain, applied", [(MIN_OUT - 0.125, False), (MIN_OUT, True), (MIN_OUT + 0.125, True)])
def test_dualscale_must_beat_the_best_plain_trial_by_the_minimum_output_gain(gain, applied):
    config = QuantConfig(dualscale={"mode": "auto", "min_output_gain_db": MIN_OUT})
    best, held, rows = _trials(config, {(0, "off", "dual"): 40.0, (0, "off", "plain"): 40.0 - gain})
    assert _applied(best) is applied
    assert best.score == (40.0 if applied else 40.0 - gain)
    assert [(r["dualscale"], r["dual_sites"], r["heldback_sqnr_db"]) for r in rows] == [
        ("auto", 1, 40.0), ("off", 0, 40.0 - gain)]


@pytest.mark.parametrize("gain, applied", [(MIN_OUT - 0.125, False), (MIN_OUT, True)])
def test_dualscale_is_compared_with_the_best_plain_trial_of_any_smoothquant_setting(gain, applied):
    """SmoothQuant auto and DualScale auto: four trials. DualScale (with SmoothQuant) scores best; the
    plain trial it must beat is the best of both plain ones, here the one without smoothing."""
    config = QuantConfig(smoothquant={"mode": "auto"}, dualscale={"mode": "auto", "min_output_gain_db": MIN_OUT})
    table = {(0, "auto", "dual"): 40.0, (0, "off", "dual"): 39.0,
             (0, "auto", "plain"): 38.5, (0, "off", "plain"): 40.0 - gain}
    best, held, rows = _trials(config, table)
    assert sorted(held.scored) == sorted(table)
    assert (best.variant.smoothquant_flag, best.variant.dualscale.value) == (("auto", "auto") if applied
                                                                              else ("off", "off"))


@pytest.mark.parametrize("auto_score, chosen", [(30.125, "auto"), (29.875, "off")])
def test_smoothquant_auto_or_off_by_the_held_back_score(auto_score, chosen):
    config = QuantConfig(smoothquant={"mode": "auto"}, dualscale={"mode": "off"})
    best, held, rows = _trials(config, {(0, "auto", "plain"): auto_score, (0, "off", "plain"): 30.0})
    assert best.variant.smoothquant_flag == chosen and best.variant.dualscale.value == "off"
    assert [r["smoothquant"] for r in rows] == ["auto", "off"]


def test_a_dualscale_auto_trial_that_applies_nothing_is_not_scored_again_as_off():
    config = QuantConfig(smoothquant={"mode": "auto"})
    best, held, rows = _trials(config, {(0, "auto", "plain"): 31.0, (0, "off", "plain"): 30.0},
                               dual_applies=False)
    assert held.scored == [(0, "auto", "plain"), (0, "off", "plain")]  # the two `off` variants: repeats
    assert best.variant.smoothquant_flag == "auto" and not _applied(best)


def test_only_the_off_variant_of_a_smoothquant_setting_whose_dualscale_applied_nothing_is_skipped():
    """DualScale applies a site without smoothing but none with it: (auto, off) repeats (auto, auto) and is not
    scored, (off, off) is."""
    config = QuantConfig(smoothquant={"mode": "auto"})
    table = {(0, "auto", "plain"): 30.0, (0, "off", "dual"): 31.0, (0, "off", "plain"): 30.5}
    best, held, rows = _trials(config, table, dual_applies={"off"})
    assert held.scored == [(0, "auto", "plain"), (0, "off", "dual"), (0, "off", "plain")]
    assert [(r["smoothquant"], r["dualscale"]) for r in rows] == [("auto", "auto"), ("off", "auto"), ("off", "off")]


def test_a_cap_after_a_repeated_one_is_still_scored():
    config = QuantConfig(outliers={"mode": "auto", "candidates": (0, 2, 4, 8)}, dualscale={"mode": "off"})
    by_cap = {0: {}, 2: {"lin": np.array([1, 5])}, 4: {"lin": np.array([1, 5])}, 8: {"lin": np.array([1, 5, 9, 11])}}
    best, held, rows = _trials(config, {(0, "off", "plain"): 30.0, (2, "off", "plain"): 30.5,
                                        (4, "off", "plain"): 31.0}, by_cap)
    assert [r["outlier_cap"] for r in rows] == [0, 2, 8]
    assert [r["outlier_channels"] for r in rows] == [0, 2, 4] and best.score == 31.0



def test_the_progress_bar_counts_every_trial_repeats_and_skips_included(monkeypatch):
    """Every variant at the first cap, then the best variant of each smoothing setting at the others: a repeated
    cap's variants and a DualScale-off variant not scored again count; the bar's total is what it counts."""
    steps, bars = [], []

    class _Bar:
        def __init__(self, *args, total=None, **kwargs):
            self.total = total
            bars.append(self)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n=1):
            steps.append(n)

        def refresh(self):
            pass

    monkeypatch.setattr(decide, "bar", _Bar)
    config = QuantConfig(smoothquant={"mode": "auto"}, outliers={"mode": "auto", "candidates": (0, 2, 4)})
    by_cap = {0: {}, 2: {"lin": np.array([1, 5])}, 4: {"lin": np.array([1, 5])}}
    table = {(c, sq, "plain"): 30.0 + c for c in (0, 2) for sq in ("auto", "off")}
    _, held, _ = _trials(config, table, by_cap, dual_applies=False)
    # cap 0: 4 variants (2 scored, the 2 DualScale-off repeats skipped); cap 2: the 2 kept; cap 4 repeats cap 2
    assert len(bars) == 1 and bars[0].total == 4 + 2 * 2
    assert steps == [1] * 6 + [2] and sum(steps) == bars[0].total
    assert held.scored == [(0, "auto", "plain"), (0, "off", "plain"), (2, "auto", "plain"), (2, "off", "plain")]

@pytest.mark.parametrize("dual_gain, kept_auto", [(1.0, "dual"), (0.125, "plain")])
def test_further_caps_score_only_the_best_variant_of_each_smoothing_setting(dual_gain, kept_auto):
    """Four variants at cap 0; at cap 2 only the best of each SmoothQuant setting, its DualScale decided at cap 0
    by the minimum output gain (0.25 dB): with SmoothQuant, DualScale 1 dB over plain is kept, 0.125 dB is not;
    without, plain wins outright. The best over every trial wins."""
    config = QuantConfig(smoothquant={"mode": "auto"}, dualscale={"mode": "auto", "min_output_gain_db": MIN_OUT},
                         outliers={"mode": "auto", "candidates": (0, 2)})
    by_cap = {0: {}, 2: {"lin": np.array([1, 5])}}
    table = {(0, "auto", "dual"): 30.0 + dual_gain, (0, "auto", "plain"): 30.0,
             (0, "off", "dual"): 28.0, (0, "off", "plain"): 29.0,
             (2, "auto", kept_auto): 33.0, (2, "off", "plain"): 32.0}
    best, held, rows = _trials(config, table, by_cap)
    assert held.scored[:4] == [(0, "auto", "dual"), (0, "off", "dual"), (0, "auto", "plain"), (0, "off", "plain")]
    assert held.scored[4:] == [(2, "auto", kept_auto), (2, "off", "plain")]  # not the whole grid
    assert best.score == 33.0 and best.q.key == (2, "auto", kept_auto)


@pytest.mark.parametrize("scores, cap", [({0: 30.0, 2: 31.0, 4: 30.5}, 2), ({0: 30.0, 2: 29.0, 4: 29.5}, 0)])
def test_the_outlier_cap_with_the_best_held_back_score_wins_and_a_repeated_set_is_not_scored(scores, cap):
    config = QuantConfig(outliers={"mode": "auto", "candidates": (0, 2, 4, 8)}, dualscale={"mode": "off"})
    by_cap = {0: {}, 2: {"lin": np.array([1, 5])}, 4: {"lin": np.array([1, 5, 9])}, 8: {"lin": np.array([1, 5, 9])}}
    table = {(len(by_cap[c].get("lin", ())), "off", "plain"): s for c, s in scores.items()}
    best, held, rows = _trials(config, table, by_cap)
    assert [r["outlier_cap"] for r in rows] == [0, 2, 4]  # cap 8 takes cap 4's channels: not scored again
    assert held.scored == [(0, "off", "plain"), (2, "off", "plain"), (3, "off", "plain")]
    assert sum(map(len, best.q.outliers.values())) == len(by_cap[cap].get("lin", ()))


# -- the per-site outlier refinement: kept when it scores as well, or nearly as well with fewer channels ----------
MIN_GAIN = 0.25


@pytest.mark.parametrize("channels, delta, kept", [
    (1, 0.0, True),  # fewer channels, same score
    (1, -MIN_GAIN, True),  # fewer channels, at the minimum gain below
    (1, -MIN_GAIN - 0.125, False),  # fewer channels, further below
    (2, -0.125, False),  # as many channels (other ones), below: not fewer, so no allowance
    (3, 0.0, True),  # more channels, same score
    (3, -0.125, False),  # more channels, anything below
    (3, 0.125, True),
])
def test_the_per_site_search_is_kept_by_its_score_and_channel_count(monkeypatch, channels, delta, kept):
    config = QuantConfig(outliers={"mode": "auto", "candidates": (0, 2), "min_gain_db": MIN_GAIN},
                         dualscale={"mode": "off"})
    start = {"lin": np.array([1, 5])}  # the global cap's 2 channels, scored 30
    chosen = {"lin": np.arange(channels)}
    monkeypatch.setattr(decide, "per_site_outliers",
                        lambda *args: SearchResult(chosen, 30.0 + delta, 30.0, []))
    cand = _Candidates(config, {0: {}, 2: start})
    held = _Held({(channels, "off", "plain"): 30.0 + delta})
    held.feeds, held.reference, held.sessions = [], [], SimpleNamespace(open_graph=None)
    variant = decide.search_space(PLAN, config).settings
    recipe = cand.recipe(variant, start)
    global_best = decide._Scored(30.0, recipe, cand.fitted(recipe), variant)
    rows: list = []
    best, search = decide._outliers_per_site(None, PLAN, cand, held, (0, 2), global_best, rows)
    assert search is not None and rows[-1] == {
        "outlier_cap": "per-site", "outlier_channels": channels, "smoothquant": variant.smoothquant_flag,
        "dualscale": "off", "dual_sites": 0, "heldback_sqnr_db": round(30.0 + delta, 3),
        "analysis_sqnr_db": round(30.0 + delta, 3)}  # the report's row, keyed as the global trials' rows
    assert (best is not global_best) is kept
    assert len(best.q.outliers["lin"]) == (channels if kept else 2)


@pytest.mark.parametrize("channels, whole, even, odd, kept", [
    (3, 30.5, 31.0, 29.5, True),  # more channels: higher everywhere
    (3, 30.5, 32.0, 28.875, False),  # higher on all feeds and the even ones, lower on the odd ones (the text detector)
    (3, 30.0, 31.0, 29.0, True),  # the same as the global cap everywhere
    (1, 30.0 - MIN_GAIN, 31.0 - MIN_GAIN, 29.0 - MIN_GAIN, True),  # fewer channels, within the allowance everywhere
    (1, 30.0, 31.0, 29.0 - MIN_GAIN - 0.125, False),  # fewer channels, one half past the allowance
])
def test_the_per_site_search_is_kept_only_if_it_holds_on_each_half_of_the_held_back_feeds(
        monkeypatch, channels, whole, even, odd, kept):
    """With MIN_SPLIT_FEEDS held-back feeds or more, the per-site outlier channels must also score at least the
    global cap's (less the allowance for fewer channels) on the even and on the odd feeds (the fallback's split)."""
    config = QuantConfig(outliers={"mode": "auto", "candidates": (0, 2), "min_gain_db": MIN_GAIN},
                         dualscale={"mode": "off"})
    start, chosen = {"lin": np.array([1, 5])}, {"lin": np.arange(channels)}
    monkeypatch.setattr(decide, "per_site_outliers", lambda *args: SearchResult(chosen, whole, 30.0, []))
    cand = _Candidates(config, {0: {}, 2: start})
    halves = {2: (31.0, 29.0), channels: (even, odd)}  # by outlier channels: the global cap's 2, the search's
    cand.halves = lambda held, graph, recipe, q: halves[sum(len(v) for v in q.outliers.values())]
    held = _Held({(channels, "off", "plain"): whole})
    held.feeds = [{}] * decide.MIN_SPLIT_FEEDS
    held.reference, held.sessions = [], SimpleNamespace(open_graph=None)
    variant = decide.search_space(PLAN, config).settings
    recipe = cand.recipe(variant, start)
    global_best = decide._Scored(30.0, recipe, cand.fitted(recipe), variant)
    best, _ = decide._outliers_per_site(None, PLAN, cand, held, (0, 2), global_best, [])
    assert (best is not global_best) is kept


# -- the output check for real: a GELU -> MatMul model, the threshold either side of the measured gain -------
@pytest.fixture(scope="module")
def gelu_calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("decide") / "calib.npz"
    np.savez(path, X=calib_inputs("matmul", 8))  # 2 of the 8 feeds held back
    return path


@pytest.fixture(scope="module")
def measured_output_gain(gelu_calib) -> float:
    r = quantize(build_linear_model("matmul"), gelu_calib, QuantConfig(), progress=False, evaluate=False)
    by_ds = {t["dualscale"]: t for t in r.report["heldback_trials"]}
    assert by_ds["auto"]["dual_sites"] == 1 and by_ds["off"]["dual_sites"] == 0
    gain = by_ds["auto"]["heldback_sqnr_db"] - by_ds["off"]["heldback_sqnr_db"]
    assert 1.0 < gain < 2.5  # measured 36.33 - 34.73 = 1.60 dB (fc2 reads the GELU)
    return gain


def _dual_nodes(model) -> list[str]:
    return [n.name for n in model.graph.node if n.name.endswith("/dual_add")]


@pytest.mark.parametrize("margin, applied", [(-0.05, True), (0.05, False)])
def test_dualscale_auto_is_dropped_at_the_model_output_when_it_gains_less_than_the_minimum(
        gelu_calib, measured_output_gain, margin, applied):
    config = QuantConfig(dualscale={"mode": "auto", "min_output_gain_db": measured_output_gain + margin})
    r = quantize(build_linear_model("matmul"), gelu_calib, config, progress=False, evaluate=False)
    assert next(d for d in r.report["dualscale"] if d["site"] == "fc2")["apply"] is applied
    assert r.report["summary"]["dualscale_applied"] == len(_dual_nodes(r.model)) == int(applied)
    # the effect: the written graph computes what DualScale `all` (applied) or `off` (dropped) writes
    other = quantize(build_linear_model("matmul"), gelu_calib,
                     QuantConfig(dualscale={"mode": "all" if applied else "off"}), progress=False, evaluate=False)
    x = {"X": calib_inputs("matmul", 3, seed=7)[:1]}
    (got,), (want,) = run_model(r.model, x), run_model(other.model, x)
    np.testing.assert_array_equal(got, want)


# -- the search space: what is compared at the output, and only when a mode is `auto` -----------------------------
@pytest.mark.parametrize("sq, ds, variants", [
    ("off", "all", [("off", "all")]),  # DualScale `all` is not second-guessed at the output
    ("off", "off", [("off", "off")]),
    ("off", "auto", [("off", "auto"), ("off", "off")]),
    ("auto", "all", [("auto", "all"), ("off", "all")]),
    ("auto", "auto", [("auto", "auto"), ("off", "auto"), ("auto", "off"), ("off", "off")]),
])
def test_the_variants_compared_are_the_auto_modes_and_their_off(sq, ds, variants):
    space = decide.search_space(PLAN, QuantConfig(smoothquant={"mode": sq}, dualscale={"mode": ds}))
    assert [(v.smoothquant.value, v.dualscale.value) for v in space.variants] == variants
    assert space.output_checks is (len(variants) > 1)
    no_dual = decide.search_space(QuantPlan(sites=(SITE,)),
                                  QuantConfig(smoothquant={"mode": sq}, dualscale={"mode": ds}))
    assert len(no_dual.variants) == (2 if sq == "auto" else 1)  # DualScale auto, no candidate: nothing to compare


@pytest.mark.parametrize("scores, chosen", [((30.0, 35.0), 1), ((35.0, 30.0), 0), ((33.0, 33.0), 0)])
def test_with_a_target_the_smoothing_setting_whose_fallback_reaches_more_wins(monkeypatch, scores, chosen):
    """--target-sqnr with SmoothQuant auto: the global choice and the best trial of the other smoothing
    setting each get their fallback; the higher held-back SQNR after it wins (a tie keeps the global
    choice), with its float sites, and both results are trial rows."""
    from segquant_onnx.analysis.sensitivity import Fallback
    from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant

    recipes = [(Recipe({"a": SiteChoice("max"), "b": SiteChoice("max")}), Variant("off", "auto"), 25.0),
               (Recipe({"a": SiteChoice("max", alpha=0.5), "b": SiteChoice("max")}), Variant("auto", "auto"), 24.0)]
    fallbacks = iter([Fallback(("a",), scores[0], 20.0, 0.9, False), Fallback(("b",), scores[1], 21.0, 0.95, False)])
    seen = []

    def fake_analyse(graph, plan, q, held_back, config, sessions, progress):
        seen.append(q)
        return [f"ranking of {len(seen)}"], next(fallbacks)

    monkeypatch.setattr(decide, "analyse", fake_analyse)
    trials = []
    config = QuantConfig(smoothquant={"mode": "auto"}, fallback={"target_sqnr": 40.0})
    recipe, ranking, fallback = decide._with_fallback(
        None, None, SimpleNamespace(fitted=lambda r: r), SimpleNamespace(held_back=[]), config, None, recipes,
        trials, False)
    assert seen == [r for r, _, _ in recipes]  # each recipe's own fitted quantization was analysed
    assert fallback.output_sqnr_db == scores[chosen] and ranking == [f"ranking of {chosen + 1}"]
    assert recipe.sites == recipes[chosen][0].sites and recipe.floating == frozenset(fallback.sites)
    assert recipe.floating == {"ab"[chosen]}
    assert [(t["smoothquant"], t["heldback_sqnr_db"], t["float_sites"]) for t in trials] == [
        ("off", scores[0], 1), ("auto", scores[1], 1)]


def test_without_a_target_only_the_global_choice_is_analysed(monkeypatch):
    from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant

    calls = []
    monkeypatch.setattr(decide, "analyse", lambda *a: calls.append(a) or ([], None))
    recipe = Recipe({"a": SiteChoice("max")})
    got, ranking, fallback = decide._with_fallback(
        None, None, SimpleNamespace(fitted=lambda r: r), SimpleNamespace(held_back=[]),
        QuantConfig(fallback={"sensitivity": True}), None, [(recipe, Variant("off", "auto"), None)], [], False)
    assert len(calls) == 1 and got is recipe and fallback is None


@pytest.mark.parametrize("behind, first_gain, tried", [(2.9, 0.0, True), (3.1, 0.0, False), (3.1, 1.6, True),
                                                       (5.0, 2.4, False)])
def test_the_other_smoothing_fallback_is_skipped_when_too_far_behind(monkeypatch, behind, first_gain, tried):
    """The other smoothing setting's fallback runs only if its trial trails the global choice by less than
    OTHER_SMOOTHING_REACH_DB or twice the first fallback's gain (what its own fallback would have to gain more)."""
    from segquant_onnx.analysis.sensitivity import Fallback
    from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant

    assert decide.OTHER_SMOOTHING_REACH_DB == 3.0
    recipes = [(Recipe({"a": SiteChoice("max", alpha=0.5)}), Variant("auto", "auto"), 30.0),
               (Recipe({"a": SiteChoice("max")}), Variant("off", "auto"), 30.0 - behind)]
    calls = []

    def fake_analyse(graph, plan, q, held_back, config, sessions, progress):
        calls.append(q)
        return ["a"], Fallback((), 28.0 + first_gain, 28.0, 1.0, False)

    monkeypatch.setattr(decide, "analyse", fake_analyse)
    trials = []
    decide._with_fallback(None, None, SimpleNamespace(fitted=lambda r: r), SimpleNamespace(held_back=[]),
                          QuantConfig(fallback={"target_sqnr": 40.0}), None, recipes, trials, False)
    assert calls == [r for r, _, _ in recipes[:1 + tried]]
    assert len(trials) == 1 + tried


def test_recipes_that_quantize_alike_are_scored_once():
    """SmoothQuant auto that smooths no site gives the variant without smoothing the same recipe: one held-back run
    for both. The measurements that decided a recipe do not tell recipes apart; a method, an alpha, a DualScale
    decision, an outlier channel or a float site does."""
    from segquant_onnx.params import DualDecision
    from segquant_onnx.solve.recipe import Recipe, SiteChoice

    cand = decide._Candidates(PLAN, None, None, QuantConfig(), False)
    runs = []
    # a run's output error, one feed: its SQNR is the number of runs so far
    held = SimpleNamespace(feed_errors=lambda graph, plan, q: runs.append(q) or [OutputError(10 ** (len(runs) / 10),
                                                                                              1.0)])

    def recipe(alpha=None, gain=1.0, apply=True, outliers=(), floating=(), method="max", layer_db=30.0):
        return Recipe({"lin": SiteChoice(method, alpha, layer_db)}, (DualDecision("lin", "dual", apply, gain, True, 256),),
                      {"lin": np.array(outliers, np.int64)} if outliers else {}, frozenset(floating))

    base = cand.score(held, None, recipe(), "q0")
    assert cand.score(held, None, recipe(gain=2.0, layer_db=31.0), "q1") == base and runs == ["q0"]
    others = [recipe(alpha=0.5), recipe(apply=False), recipe(outliers=(3,)), recipe(floating=("lin",)),
              recipe(method="percentile")]
    assert [cand.score(held, None, r, f"q{i}") for i, r in enumerate(others, 2)] == pytest.approx([2, 3, 4, 5, 6])
    assert cand.score(held, None, recipe(outliers=(3,)), "again") == pytest.approx(4.0) and len(runs) == 6
    assert cand.halves(held, None, recipe(outliers=(3,)), "again")[0] == pytest.approx(4.0) and len(runs) == 6


def test_the_other_smoothing_setting_is_its_best_scored_trial():
    from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant

    def scored(score, smooth, ds="auto", alpha=None):
        return decide._Scored(score, Recipe({"a": SiteChoice("max", alpha=alpha)}), None, Variant(smooth, ds))

    trials = [scored(31.0, "off"), scored(29.0, "auto", alpha=0.5), scored(30.0, "auto", "off", alpha=0.5),
              scored(30.5, "off", "off")]
    (other,) = decide._other_smoothing(trials[0], trials)
    assert other is trials[2]  # the best "auto" trial, not the first
    assert decide._other_smoothing(trials[2], trials) == [trials[0]]
    assert decide._other_smoothing(trials[0], [trials[0], trials[3]]) == []  # one setting scored only
    # SmoothQuant auto smoothed no site: both settings quantize alike, no second fallback
    assert decide._other_smoothing(trials[0], [trials[0], scored(30.0, "auto")]) == []


@pytest.mark.parametrize("smooth, alpha, kept", [("auto", None, ("off", None)), ("fixed", 0.5, ("fixed", 0.5)),
                                                 ("off", None, ("off", None))])
def test_without_held_back_feeds_only_smoothquant_auto_is_left_off(smooth, alpha, kept):
    """Too few calibration feeds to hold any back: the auto choices cannot be checked at the output, so
    SmoothQuant auto is left off; a fixed alpha needs no check and stays (found by the mutation check)."""
    from segquant_onnx.solve.recipe import Variant

    space = decide.SearchSpace((Variant(smooth, "auto", alpha), Variant(smooth, "off", alpha)), (0,), (), True,
                               False)
    got = decide._with_held_back(space, SimpleNamespace(held_back=[]), QuantConfig().calibration)
    assert [(v.smoothquant.value, v.alpha, v.dualscale.value) for v in got.variants] == [(*kept, "auto")]
    assert got.output_checks is False
    assert decide._with_held_back(space, SimpleNamespace(held_back=[{"X": 0}]), QuantConfig().calibration) is space


@pytest.mark.parametrize("method, outliers, sampled", [
    ("max", {"mode": "off"}, ()),  # nothing chosen per site, no DualScale candidate: no row sample
    ("auto", {"mode": "off"}, ("X",)),  # the calibration method alone is chosen per site
    ("max", {"mode": "fixed", "count": 2}, ("X",)),  # outlier channels alone
])
def test_row_samples_are_gathered_for_what_is_chosen_per_site(method, outliers, sampled):
    config = QuantConfig(smoothquant={"mode": "off"}, calibration={"method": method, "sample_rows": 77},
                         outliers=outliers)
    space = decide.search_space(QuantPlan(sites=(SITE,)), config)
    assert space.sampled == sampled
    kwargs = space.calibration(QuantPlan(sites=(SITE,)), config.calibration)
    assert kwargs["sampled"] == sampled and kwargs["sample_rows"] == 77  # the configured rows, not the default


@pytest.mark.parametrize("k, rows", [(16, 77), (1000, 4000), (3000, 1398)])
def test_gptq_rows_are_sampled_from_every_feed_apart_from_the_choices(k, rows):
    """GPTQ's X^T X reads a sample of its own, over every feed (calibrate's weight_rows): 4 rows per input value
    where that takes at most 16 MiB, never fewer than sample_rows; the per-site choices keep theirs."""
    site = replace(SITE, weight_shape=(k, 8))
    config = QuantConfig(smoothquant={"mode": "off"}, calibration={"sample_rows": 77},
                         outliers={"mode": "fixed", "count": 2}, precision={"weight_rounding": "gptq"})
    space = decide.search_space(QuantPlan(sites=(site,)), config)
    kwargs = space.calibration(QuantPlan(sites=(site,)), config.calibration)
    assert kwargs["sampled"] == ("X",) and kwargs["sample_rows"] == 77
    assert kwargs["weight_rows"] == {"X": rows}
    assert rows * k * 4 <= 16 << 20 or rows == 77


def test_the_candidates_are_fitted_in_the_run_s_format():
    from segquant_onnx.calib.observers import TensorStats
    from segquant_onnx.solve.recipe import Variant

    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    w = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    st = TensorStats.empty()
    st.update(x)
    cal = SimpleNamespace(fit_stats={"X": st}, samples={})
    cand = decide._Candidates(QuantPlan(sites=(SITE,)), cal, lambda name: w, QuantConfig(precision={"format": "fp8"}),
                              False)
    q = cand.fitted(cand.recipe(Variant("off", "off"), {}))
    assert q.format.name == "fp8"
    assert q.params["lin"].act_scale == pytest.approx(float(np.float32(np.abs(x).max() / 448)), rel=1e-7)
    np.testing.assert_array_equal(q.params["lin"].weight_scale, (np.abs(w).max(0) / 448).astype(np.float32))
