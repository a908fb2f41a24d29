"""The model-output decision policy: the global choices, checked at the model output on held-back feeds.

Layer error on calibration data can rank configurations in nearly inverse order of their effect at the
model output, so every choice that `auto` leaves open is scored on held-back calibration feeds:

1. global trials: each outlier-channel cap (`--outlier-channels auto`) x each search variant
   (SmoothQuant's per-site choices vs no smoothing with `--smoothquant auto`; DualScale's per-site
   choices vs none with `--dualscale auto`); the best held-back output SQNR wins, except that DualScale
   must beat the best variant without it by `dualscale_min_output_gain_db` (its second GEMMs cost);
2. per-site outliers (`auto`): each site's channel count chosen at the output (outlier_search), kept if
   the real quantized graph scores at least as well;
3. sensitivity and fallback (`--sensitivity`, `--target-sqnr`): the sites the target keeps in float.

The per-site choices inside each trial are solve.choose's; candidates are fitted on the fit statistics
(solve.fit), so the held-back feeds are data their scales never saw. The result is a Recipe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.analysis.held_back import HeldBack, Sessions, bar, merged
from segquant_onnx.analysis.outlier_search import SearchResult, per_site_outliers
from segquant_onnx.analysis.sensitivity import MIN_SPLIT_FEEDS, Fallback, SiteSensitivity, analyse
from segquant_onnx.calib.calibrate import Calibration
from segquant_onnx.config import (CalibrationConfig, DualScaleMode, OutlierMode, QuantConfig, SmoothQuantMode,
                                  WeightRounding)
from segquant_onnx.errors import UserError
from segquant_onnx.params import Quantization
from segquant_onnx.ir.linear import CONV_OPS, input_channels
from segquant_onnx.plan import QuantPlan, sample_key
from segquant_onnx.solve.choose import choose, choose_outliers
from segquant_onnx.solve.fit import fit
from segquant_onnx.solve.recipe import Recipe, Variant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchSpace:
    """What a run decides, and so what calibration must gather for it.

    `variants`: the global modes compared at the output, the settings as given first; `caps`: the
    global outlier-channel caps; `sampled`: activations whose row samples the per-site choices score
    on; `output_checks`: whether the choices are checked on held-back feeds; `held_back_required`:
    whether the run cannot do without those feeds (sensitivity, fallback, per-site outliers); `hessian_rows`:
    activations sampled for GPTQ's X^T X, the weight clip search and --low-rank auto, on every feed, apart from
    the choices' samples (those fits score nothing on held-back feeds; a group-1 2-D Conv's are its input patches,
    plan.sample_key), weight_sample_rows rows each."""

    variants: tuple[Variant, ...]
    caps: tuple[int, ...]
    sampled: tuple[str, ...]
    output_checks: bool
    held_back_required: bool
    hessian_rows: tuple[str, ...] = ()

    @property
    def settings(self) -> Variant:
        return self.variants[0]

    def calibration(self, plan: QuantPlan, config: CalibrationConfig) -> dict:
        """calibrate()'s keyword arguments for what this space needs."""
        inputs = {sample_key(s): input_channels(s) * math.prod(s.patches[:2] or (1,)) for s in plan.sites}
        return dict(sampled=self.sampled, sample_rows=config.sample_rows,
                    holdout_every=config.holdout_every if (self.sampled or self.output_checks) else 0,
                    keep_held_back=config.max_holdout_feeds if self.output_checks else 0,
                    channel_axes=channel_axes(plan),
                    weight_rows={key: weight_sample_rows(inputs[key], config.sample_rows) for key in self.hessian_rows})


# the rows sampled for a weight's own fit (GPTQ's H = X^T X over them): at least WEIGHT_ROWS_PER_INPUT per input
# value K where that takes at most WEIGHT_SAMPLE_BYTES, and never fewer than the per-site choices' sample_rows. With
# fewer rows than K, H is singular and GPTQ fits the sample's own directions. Measured (W4A16, GPTQ, eval SQNR, the
# demo default otherwise): the real ViT (K 384 and 1536) 20.00 dB on 1024 rows, 21.66 on 4096
WEIGHT_ROWS_PER_INPUT = 4
WEIGHT_SAMPLE_BYTES = 16 << 20


def weight_sample_rows(k: int, sample_rows: int) -> int:
    return max(sample_rows, min(WEIGHT_ROWS_PER_INPUT * k, WEIGHT_SAMPLE_BYTES // (4 * k)))


def channel_axes(plan: QuantPlan) -> dict[str, int]:
    """Axis 1 for tensors only Conv/ConvTranspose sites read (their input channels), the default last axis otherwise."""
    readers: dict[str, set[str]] = {}
    for site in plan.sites:
        readers.setdefault(site.activation, set()).add(site.op)
    return {name: 1 for name, ops in readers.items() if ops <= set(CONV_OPS)}


def search_space(plan: QuantPlan, config: QuantConfig) -> SearchSpace:
    sq, ds, outliers = config.smoothquant, config.dualscale, config.outliers
    variants = [Variant(sq.mode, ds.mode, sq.alpha)]
    if sq.mode is SmoothQuantMode.AUTO:
        variants += [replace(v, smoothquant=SmoothQuantMode.OFF) for v in variants]
    if ds.mode is DualScaleMode.AUTO and plan.dual:
        variants += [replace(v, dualscale=DualScaleMode.OFF) for v in variants]
    per_site = (sq.mode is not SmoothQuantMode.OFF or config.calibration.method == "auto"
                or outliers.mode is not OutlierMode.OFF)
    sites = {s.name: s for s in plan.sites}
    sampled = tuple(dict.fromkeys(
        [s.activation for s in plan.sites if s.channels_last and per_site]
        + [sites[d.site].activation for d in plan.dual if sites[d.site].channels_last]))
    required = config.fallback.ranks or outliers.mode is OutlierMode.AUTO
    checks = required or len(variants) > 1
    gptq = (config.precision.weight_rounding is not WeightRounding.RTN or config.precision.weight_clip
            or config.precision.low_rank == "auto")
    hessian_rows = tuple(sample_key(s) for s in plan.sites if s.channels_last or s.patches) if gptq else ()
    return SearchSpace(tuple(variants), outliers.caps, sampled, checks, required, hessian_rows)


@dataclass(frozen=True)
class Decision:
    """The recipe, the settings it was decided under (SmoothQuant `auto` is left off without held-back
    feeds), and what the report shows of the way there."""

    recipe: Recipe
    settings: Variant
    trials: list = field(default_factory=list)  # global trials: held-back output SQNR of each
    per_site_search: SearchResult | None = None
    sensitivity: list[SiteSensitivity] = field(default_factory=list)
    fallback: Fallback | None = None


@dataclass(frozen=True)
class _Scored:
    score: float  # held-back output SQNR (dB)
    recipe: Recipe
    q: Quantization  # the recipe fitted on the fit statistics: what was scored
    variant: Variant


@dataclass(frozen=True)
class _Candidates:
    """Recipes for outlier assignments and variants, and their parameters on the fit statistics."""

    plan: QuantPlan
    cal: Calibration
    weight: Callable[[str], np.ndarray]
    config: QuantConfig
    progress: bool
    # per-site choices already scored (solve.choose): the searches ask for the same site, smoothing and outliers
    # again and again (measured: 11 recipes for --preset best on the demo DiT, 2368 layer scores)
    cache: dict = field(default_factory=dict)
    weight_scales: dict = field(default_factory=dict)  # solve.fit's memo, shared with the run's final fit
    # held-back output errors (one per feed) by what a recipe quantizes (_quantizes): SmoothQuant auto that smooths
    # no site gives the variant without smoothing the same recipe (measured on the real text detector: 3 of its 7
    # trial runs)
    scores: dict = field(default_factory=dict)

    def outliers(self, cap: int, max_flop_pct: float | None = None) -> dict[str, np.ndarray]:
        budget = self.config.outliers.max_flop_pct if max_flop_pct is None else max_flop_pct
        return choose_outliers(self.plan, self.cal.fit_stats, cap, self.config.outliers.ratio, budget)

    def recipe(self, variant: Variant, outliers: dict[str, np.ndarray]) -> Recipe:
        return choose(self.plan, self.cal.fit_stats, self.cal.samples, self.weight, self.config, variant, outliers,
                      progress=self.progress, cache=self.cache)

    def score(self, held: HeldBack, graph, recipe: Recipe, q: Quantization) -> float:
        """The held-back SQNR of `recipe` (fitted as `q`), run once per distinct quantization."""
        return merged(self._feed_errors(held, graph, recipe, q)).sqnr

    def halves(self, held: HeldBack, graph, recipe: Recipe, q: Quantization) -> tuple[float, float]:
        """The held-back SQNR of `recipe` on the even and on the odd held-back feeds (the fallback's split)."""
        errors = self._feed_errors(held, graph, recipe, q)
        return merged(errors[0::2]).sqnr, merged(errors[1::2]).sqnr

    def _feed_errors(self, held: HeldBack, graph, recipe: Recipe, q: Quantization) -> list:
        key = _quantizes(recipe)
        if key not in self.scores:
            self.scores[key] = held.feed_errors(graph, self.plan, q)
        return self.scores[key]

    def fitted(self, recipe: Recipe) -> Quantization:
        return fit(self.plan, recipe, self.cal.fit_stats, self.weight, percentile=self.config.calibration.percentile,
                   fmt=self.config.precision.quant_format, weight_scales=self.weight_scales)


def _quantizes(recipe: Recipe) -> tuple:
    """What decides a recipe's quantized graph: each site's method and alpha, the DualScale sites, the outlier
    channels and the float sites (not the measurements that decided them)."""
    return (tuple(sorted((name, c.method, c.alpha) for name, c in recipe.sites.items())),
            tuple((d.site, d.apply) for d in recipe.dual),
            tuple(sorted((name, tuple(int(i) for i in idx)) for name, idx in recipe.outliers.items())),
            tuple(sorted(recipe.floating)))


def _with_held_back(space: SearchSpace, cal: Calibration, config: CalibrationConfig) -> SearchSpace:
    if not space.output_checks or cal.held_back:
        return space
    if space.held_back_required:
        raise UserError(f"Sensitivity, --target-sqnr and the auto choices hold back every "
                        f"{config.holdout_every}th calibration feed; give at least {config.holdout_every} "
                        "feeds in the calibration data.")
    settings = space.settings
    if settings.smoothquant is SmoothQuantMode.AUTO:  # a fixed alpha needs no check: it stays
        settings = replace(settings, smoothquant=SmoothQuantMode.OFF, alpha=None)
    log.warning("fewer than %d calibration feeds: no held-back feeds to check the auto choices at the "
                "output: SmoothQuant auto is left off, DualScale decided per layer", config.holdout_every)
    return replace(space, variants=(settings,), output_checks=False)


def decide(graph: gs.Graph, fp_model: onnx.ModelProto, plan: QuantPlan, cal: Calibration,
           weight: Callable[[str], np.ndarray], config: QuantConfig, space: SearchSpace, sessions: Sessions,
           progress: bool = True, weight_scales: dict | None = None) -> Decision:
    """The recipe for `graph` (canonical, not yet quantized; left as it is): the per-site choices
    (solve.choose) of the best global trial, refined per site and with the fallback's float sites.
    Opens analysis sessions only where held-back feeds are scored. `weight_scales`: solve.fit's memo of the run's
    weight scales (filled here, reused by the final fit)."""
    space = _with_held_back(space, cal, config.calibration)
    cand = _Candidates(plan, cal, weight, config, progress,
                       weight_scales={} if weight_scales is None else weight_scales)
    trials, search, others = [], None, []
    if not space.output_checks or (len(space.caps) == 1 and len(space.variants) == 1):
        recipe, variant = cand.recipe(space.settings, cand.outliers(space.caps[0])), space.settings
    else:
        held = HeldBack(fp_model, cal.held_back, sessions, progress, cal.held_back_outputs)
        scored = []
        with _timed("global trials"):
            best = _global_trials(graph, plan, cand, held, space, trials, scored)
        if config.outliers.mode is OutlierMode.AUTO:
            with _timed("per-site outlier channels"):
                best, search = _outliers_per_site(graph, plan, cand, held, space.caps, best, trials)
        recipe, variant = best.recipe, best.variant
        if config.fallback.target_sqnr is not None:
            others = [(t.recipe, t.variant, t.score) for t in _other_smoothing(best, scored)]
    ranking, fallback = [], None
    if config.fallback.ranks:
        with _timed("sensitivity and fallback"):
            recipe, ranking, fallback = _with_fallback(graph, plan, cand, cal, config, sessions,
                                                       [(recipe, variant, best.score if others else None),
                                                        *others], trials, progress)
    return Decision(recipe, space.settings, trials, search, ranking, fallback)


@contextmanager
def _timed(stage: str):
    """Logs the wall time of a stage of the decision (-v)."""
    started = time.perf_counter()
    yield
    log.info("%s: %.2f s", stage, time.perf_counter() - started)


def _other_smoothing(best: _Scored, scored: list[_Scored]) -> list[_Scored]:
    """The best trial of the other SmoothQuant setting than `best`'s, if one was scored and it smooths other sites
    or by other alphas (SmoothQuant auto may smooth none: then both settings quantize alike): the fallback may
    reach more from it (the float sites it frees differ; measured on the demo DiT and tiny FLUX, either wins)."""
    other = [t for t in scored if t.variant.smoothquant_flag != best.variant.smoothquant_flag]
    if not other:
        return []
    top = max(other, key=lambda t: t.score)
    return [top] if _alphas(top.recipe) != _alphas(best.recipe) else []


def _alphas(recipe: Recipe) -> dict[str, float]:
    return {name: c.alpha for name, c in recipe.sites.items() if c.alpha is not None}


# the other smoothing setting's fallback is run only if its best trial trails the global choice on the held-back feeds
# by less than this, or by less than twice what the global choice's fallback gained: its fallback would have to gain
# that much more to win. Measured (--preset best, held-back dB): the real MiniLM's other setting trailed by 1.2 dB and
# won after both fallbacks (24.65 against 23.22); the real ViT's trailed by 4.0 dB and lost (36.92 against 37.88),
# its fallback 20 s of a 42 s run
OTHER_SMOOTHING_REACH_DB = 3.0


def _with_fallback(graph, plan, cand: _Candidates, cal: Calibration, config: QuantConfig, sessions, recipes: list,
                   trials: list, progress: bool):
    """Sensitivity and the fallback (analysis.sensitivity) of each (recipe, variant, held-back score) (the global
    choice first); the one whose fallback reaches the highest held-back output SQNR, with the fallback's sites in
    float. With more than one, each fallback's result is a row of `trials`; a later one is skipped when its score
    trails the first's by more than OTHER_SMOOTHING_REACH_DB and twice the first's fallback gain. Each ranks the
    sites on its own quantization: the real MiniLM's second fallback reached 23.91 dB instead of 24.65 on the
    held-back feeds (24.21 against 25.01 dB on eval) when it read the first's ranking."""
    best, first_score, first_gain = None, None, None  # the first fallback's trial score and its gain
    for recipe, variant, score in recipes:
        if first_gain is not None and first_score - score > max(OTHER_SMOOTHING_REACH_DB, 2.0 * first_gain):
            log.info("fallback: SmoothQuant %s (%.2f dB held back) not tried: %.2f dB behind, the first "
                     "fallback gained %.2f dB", variant.smoothquant_flag, score, first_score - score, first_gain)
            continue
        ranking, fallback = analyse(graph, plan, cand.fitted(recipe), cal.held_back, config.fallback, sessions,
                                    progress)
        if fallback is not None:
            log.info("fallback from SmoothQuant %s: %.2f -> %.2f dB on the held-back feeds, %d sites in float",
                     variant.smoothquant_flag, fallback.start_sqnr_db, fallback.output_sqnr_db, len(fallback.sites))
            if first_gain is None:
                first_score, first_gain = score, fallback.output_sqnr_db - fallback.start_sqnr_db
        if len(recipes) > 1:
            trials.append({"outlier_cap": "after fallback", "outlier_channels": _channels(recipe.outliers),
                           "smoothquant": variant.smoothquant_flag, "dualscale": variant.dualscale.value,
                           "dual_sites": len(recipe.dual_sites), "float_sites": len(fallback.sites),
                           "heldback_sqnr_db": fallback.output_sqnr_db})
        if best is None or (fallback and fallback.output_sqnr_db > best[2].output_sqnr_db):
            best = (recipe, ranking, fallback)
    recipe, ranking, fallback = best
    return (recipe.in_float(fallback.sites) if fallback else recipe), ranking, fallback


def _channels(outliers) -> int:
    return sum(map(len, outliers.values()))


def _global_trials(graph, plan, cand: _Candidates, held: HeldBack, space: SearchSpace, trials: list,
                   scored: list | None = None) -> _Scored:
    """The global trials scored on the held-back feeds (rows appended to `trials`, each _Scored to `scored`);
    the best. Every variant at the first cap; then each further cap only with the best variant of each
    SmoothQuant setting at that cap (DualScale decided there, as below), not the whole grid: measured on the
    real ViT (--preset best), the grid's 20 trials took 73 s of a 309 s run, and the cap it chose was the one
    this finds (8 channels, SmoothQuant and DualScale auto); the other smoothing setting keeps its own sweep
    because the fallback starts from its best trial too (_other_smoothing)."""
    scored, seen = [] if scored is None else scored, set()
    first, further = space.caps[0], space.caps[1:]
    with bar(None, "checking choices", "trial", cand.progress, total=len(space.variants)) as b:
        # a trial skipped as a repeat counts as done
        _trials_at(cand, held, graph, plan, first, space.variants, seen, trials, scored, b)
        if further:
            by_flag: dict[str, list[_Scored]] = {}
            for t in scored:
                by_flag.setdefault(t.variant.smoothquant_flag, []).append(t)
            kept = tuple(_pick(ts, cand.config.dualscale.min_output_gain_db).variant for ts in by_flag.values())
            b.total = len(space.variants) + len(further) * len(kept)
            b.refresh()
            for cap in further:
                _trials_at(cand, held, graph, plan, cap, kept, seen, trials, scored, b)
    return _pick(scored, cand.config.dualscale.min_output_gain_db)


def _trials_at(cand: _Candidates, held: HeldBack, graph, plan, cap: int, variants, seen: set, trials: list,
               scored: list, b) -> None:
    """Score each of `variants` with the outlier channels of `cap` (none if they repeat a cap already seen)."""
    outliers = cand.outliers(cap)
    key = tuple(sorted((k, tuple(v)) for k, v in outliers.items()))
    if key in seen:
        b.update(len(variants))
        return  # the same channels as a smaller cap
    seen.add(key)
    applied_none = {}  # smoothquant setting -> its DualScale-auto variant applied no DualScale site
    for variant in variants:
        if variant.dualscale is DualScaleMode.OFF and applied_none.get(variant.smoothquant_flag):
            b.update()
            continue  # the same quantization as that variant: nothing to score twice
        recipe = cand.recipe(variant, outliers)
        q = cand.fitted(recipe)
        applied_none[variant.smoothquant_flag] = not q.dual
        score = cand.score(held, graph, recipe, q)
        trials.append({"outlier_cap": cap, "outlier_channels": _channels(outliers),
                       "smoothquant": variant.smoothquant_flag, "dualscale": variant.dualscale.value,
                       "dual_sites": len(q.dual), "heldback_sqnr_db": round(score, 3)})
        scored.append(_Scored(score, recipe, q, variant))
        b.update()


def _pick(scored: list[_Scored], min_gain_db: float) -> _Scored:
    """The highest held-back SQNR, except that DualScale must beat the best trial without it by `min_gain_db`
    (its extra GEMMs do not pay at the output otherwise)."""
    best = max(scored, key=lambda t: t.score)
    single = [t for t in scored if not t.q.dual]
    if best.q.dual and single:
        plain = max(single, key=lambda t: t.score)
        if best.score - plain.score < min_gain_db:
            best = plain
    return best


def _outliers_per_site(graph, plan, cand: _Candidates, held: HeldBack, caps, best: _Scored, trials: list):
    """Refine the best global-cap trial: each site's outlier count chosen at the model output
    (outlier_search), kept if the real quantized graph scores at least as well on the held-back feeds."""
    config = cand.config
    by_cap = {cap: cand.outliers(cap, max_flop_pct=100.0) for cap in caps}
    solve_for = lambda outliers: cand.fitted(cand.recipe(best.variant, outliers))
    search = per_site_outliers(graph, plan, config.outliers, held.feeds, held.reference, by_cap, solve_for,
                               best.q.outliers, held.sessions.open_graph, cand.progress, cand.cal.batches)
    if search is None:
        return best, None
    recipe = cand.recipe(best.variant, search.outliers)
    refined = cand.fitted(recipe)
    refined_score = cand.score(held, graph, recipe, refined)
    trials.append({"outlier_cap": "per-site", "outlier_channels": _channels(search.outliers),
                   "smoothquant": best.variant.smoothquant_flag, "dualscale": best.variant.dualscale.value,
                   "dual_sites": len(refined.dual), "heldback_sqnr_db": round(refined_score, 3),
                   "analysis_sqnr_db": round(search.heldback_sqnr_db, 3)})
    log.info("per-site outlier channels: %.2f dB on the held-back feeds (analysis graph %.2f dB), global cap %.2f dB",
             refined_score, search.heldback_sqnr_db, best.score)
    # as within a site: fewer float channels win when they cost less than outlier_min_gain_db
    allowance = config.outliers.min_gain_db if _channels(search.outliers) < _channels(best.q.outliers) else 0.0
    scores = [(refined_score, best.score)]
    if len(held.feeds) >= MIN_SPLIT_FEEDS:
        # on each half of the held-back feeds too: the search chose on all of them, and a choice that wins on one
        # half only is fitted to its feeds. Measured on the real text detector (INT8, --preset best): 2 outlier
        # channels took the held-back SQNR from 15.79 to 16.18 dB, 16.58 -> 17.26 on the even feeds and 13.52 ->
        # 13.34 on the odd ones, and the eval SQNR from 14.11 to 13.91
        scores += list(zip(cand.halves(held, graph, recipe, refined), cand.halves(held, graph, best.recipe, best.q)))
    if all(mine >= theirs - allowance for mine, theirs in scores):
        return _Scored(refined_score, recipe, refined, best.variant), search
    log.info("per-site outlier channels not kept: %s dB on all held-back feeds, then the even and the odd ones, "
             "against %s for the global cap", " / ".join(f"{m:.2f}" for m, _ in scores),
             " / ".join(f"{t:.2f}" for _, t in scores))
    return best, search
