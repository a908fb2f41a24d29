"""Choose: fit statistics + row sample -> a Recipe (pure numpy, no graph, no session).

Per site, where a row sample of its activation exists (rows held back from the fit statistics), the
calibration method (`calib_method=auto`) and SmoothQuant alpha or none (`smoothquant=auto`) with the
best layer output SQNR on the sample; per DualScale candidate, whether its measured gain pays; per
site, which input channels are outliers. Candidates are scored with the parameters `fit` gives them on
the fit statistics, so what is scored is what would be inserted. The global choices (which variant,
which outlier cap) are checked at the model output by analysis.decide.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from segquant_onnx.calib.observers import Stats, TensorStats
from segquant_onnx.config import CalibMethod, DualScaleMode, QuantConfig, SmoothQuantMode
from segquant_onnx.formats import INT8, QuantFormat, Scheme, scheme_of
from segquant_onnx.ir.linear import as_kn, input_channel_axis, input_channels, is_conv, scale_input_channels
from segquant_onnx.params import DualDecision, DualParams, SiteParams
from segquant_onnx.plan import LinearSite, QuantPlan
from segquant_onnx.solve.fit import Weights, bulk, site_dual_params, site_params, smoothing
from segquant_onnx.solve.quant_math import fake_quant, sqnr_db
from segquant_onnx.solve.recipe import Recipe, SiteChoice, Variant, site_methods


def fq_activation(x: np.ndarray, scale: float, fmt: QuantFormat | Scheme) -> np.ndarray:
    """What the activation Q/DQ computes (weight-only schemes: none, the float rows)."""
    act = scheme_of(fmt).activations
    return x.astype(np.float64) if act is None else fake_quant(x, np.float32(scale), fmt=act)


def fq_weight_kn(w: np.ndarray, site: LinearSite, p: SiteParams, fmt: QuantFormat | Scheme = INT8) -> np.ndarray:
    """fq(s * W) as [K, N]: the weight a candidate quantizes, as its GEMM reads it."""
    w_s = scale_input_channels(w, site, p.smooth)
    return as_kn(fake_quant(w_s, p.weight_scale, site.weight_axis, scheme_of(fmt).weights), site)


def layer_sqnr(rows: np.ndarray, w: np.ndarray, site: LinearSite, p: SiteParams,
               fmt: QuantFormat | Scheme = INT8, y: np.ndarray | None = None,
               wq_kn: np.ndarray | None = None) -> float:
    """SQNR (dB) of Y = rows @ W against fq(rows / s) @ fq(s * W) on sampled rows [R, K]. `y` and `wq_kn`
    (fq_weight_kn) may be given when a search already has them: they do not depend on the activation scale."""
    x_s = rows if p.smooth is None else rows / p.smooth
    y = rows.astype(np.float64) @ as_kn(w, site) if y is None else y
    wq_kn = fq_weight_kn(w, site, p, fmt) if wq_kn is None else wq_kn
    y_q = fq_activation(x_s, p.act_scale, fmt) @ wq_kn
    return sqnr_db(float((y**2).sum()), float(((y - y_q) ** 2).sum()))


def measured_dual_gain(rows: np.ndarray, w: np.ndarray, site: LinearSite, single: SiteParams,
                       dual: DualParams, fmt: QuantFormat | Scheme = INT8) -> float:
    """Layer output SQNR(dual) - SQNR(single) in dB on sampled activation rows [R, K].

    Y = rows @ W; single: fq(rows, s) @ fq(W); dual: (fq(relu(rows), s+) + fq(min(rows, 0), s-)) @ fq(W).
    """
    wq = fake_quant(w, single.weight_scale, site.weight_axis, scheme_of(fmt).weights)
    w_kn, wq_kn = as_kn(w, site), as_kn(wq, site)
    y = rows.astype(np.float64) @ w_kn
    y_single = fq_activation(rows, single.act_scale, fmt) @ wq_kn
    y_dual = (fq_activation(np.maximum(rows, 0), dual.pos_scale, fmt)
              + fq_activation(np.minimum(rows, 0), dual.neg_scale, fmt)) @ wq_kn
    signal = float((y**2).sum())
    return sqnr_db(signal, float(((y - y_dual) ** 2).sum())) - sqnr_db(signal, float(((y - y_single) ** 2).sum()))


def estimated_dual_gain(stats: TensorStats, single: SiteParams, dual: DualParams) -> float:
    """Input rounding-noise power with one scale over the sum with two (uniform noise s^2/12 each).

    Used where no row sample fits the op (Conv over NCHW); an estimate, and reported as one. For FP8 the
    grid is relative, so this overstates the gain on small values; still, both scales shrink the same way.
    """
    n, n_neg = max(stats.count, 1), stats.neg_count
    single_noise = n * single.act_scale**2
    dual_noise = (n - n_neg) * dual.pos_scale**2 + n_neg * dual.neg_scale**2
    return float(10 * np.log10(single_noise / max(dual_noise, 1e-30)))


def choose_outliers(plan: QuantPlan, stats: Stats, cap: int, ratio: float,
                    max_flop_pct: float) -> dict[str, np.ndarray]:
    """Outlier input channels per MatMul/Gemm site: at most `cap` channels whose calibration abs-max
    exceeds `ratio` x the median channel's, largest first; sites are served in plan order until the
    float branches would exceed `max_flop_pct` percent of the linear FLOPs."""
    chosen, budget = {}, max_flop_pct / 100.0 * plan.total_flops
    for site in plan.sites:
        st = stats[site.activation]
        amax = st.channel_amax
        if cap <= 0 or amax.size != input_channels(site):
            continue
        if is_conv(site) and st.channel_axis != 1 or not is_conv(site) and not site.channels_last:
            continue
        order = np.argsort(-amax, kind="stable")[:cap]
        idx = np.sort(order[amax[order] > ratio * max(float(np.median(amax)), 1e-12)])
        cost = site.flops * len(idx) / amax.size
        if len(idx) and cost <= budget:
            chosen[site.name], budget = idx.astype(np.int64), budget - cost
    return chosen


def _rows(site: LinearSite, samples: dict[str, np.ndarray], outliers, search_rows: int) -> np.ndarray | None:
    """The site's row sample (rows are over the last axis), its outlier channels zeroed."""
    rows = samples.get(site.activation) if site.channels_last else None
    if rows is None:
        return None
    rows, idx = rows[:search_rows], outliers.get(site.name)
    if idx is not None:
        rows = rows.copy()
        rows[:, idx] = 0
    return rows


def _choose_site(site, st, rows, w, config: QuantConfig, variant: Variant,
                 masked: bool) -> tuple[SiteChoice, SiteParams]:
    """The (alpha, method) with the best layer SQNR on `rows` (the first candidate without rows), and
    its parameters on the fit statistics."""
    given, fmt = config.calibration.method, config.precision.quant_format
    methods = site_methods(fmt) if given is CalibMethod.AUTO else (given.value,)
    smoothable = site.channels_last and st.channel_amax.size == w.shape[input_channel_axis(site)]
    alphas: tuple = (None,)
    if smoothable and variant.smoothquant is SmoothQuantMode.AUTO and rows is not None:  # scored on the sample
        alphas = (None,) + config.smoothquant.alphas
    elif smoothable and variant.smoothquant is SmoothQuantMode.FIXED:
        alphas = (variant.alpha,)
    best = None
    y = None if rows is None else rows.astype(np.float64) @ as_kn(w, site)  # the float reference, once
    for alpha in alphas:
        smooth = smoothing(st, w, site, alpha)
        wq_kn = None  # the quantized weight depends on alpha, not on the method
        for method in (methods if rows is not None else methods[:1]):
            p = site_params(site, st, w, method, smooth, alpha, config.calibration.percentile, masked, fmt)
            if rows is not None and wq_kn is None:
                wq_kn = fq_weight_kn(w, site, p, fmt)
            score = layer_sqnr(rows, w, site, p, fmt, y, wq_kn) if rows is not None else None
            if best is None or (score is not None and score > best[0]):
                best = (score, p)
    score, p = best
    return SiteChoice(p.method, p.alpha, None if score is None else round(score, 3)), p


def _dual_gain(site: LinearSite, st, rows, w, single: SiteParams, config: QuantConfig) -> tuple[float, bool, bool]:
    """(gain in dB, whether measured on the row sample, whether the bulk has a negative part) of DualScale on the
    (smoothed) bulk: measured on the row sample, estimated from the polarity statistics without one."""
    fmt = config.precision.quant_format
    # the weight's scales are the single-scale site's (the same weight and smoothing): not computed again
    dual = site_dual_params(site, st, None, single.smooth, fmt, weight_scale=single.weight_scale)
    w = scale_input_channels(w, site, single.smooth)
    if rows is not None and len(rows):
        rows = rows if single.smooth is None else rows / single.smooth
        return measured_dual_gain(rows, w, site, single, dual, fmt), True, st.neg_amax > 0
    return estimated_dual_gain(st, single, dual), False, st.neg_amax > 0


def _dual_decision(site: LinearSite, kind: str, gain: tuple[float, bool, bool], config: QuantConfig,
                   variant: Variant) -> DualDecision:
    """DualScale on the bulk: `all` wherever there is a negative part, `auto` where the gain reaches the minimum."""
    gain_db, measured, negative = gain
    apply = negative and variant.dualscale is not DualScaleMode.OFF and (
        variant.dualscale is DualScaleMode.ALL or gain_db >= config.dualscale.min_gain_db)
    return DualDecision(site.name, kind, apply, round(gain_db, 3), measured, site.flops)


def _key(site: LinearSite, outliers, variant: Variant, *extra) -> tuple:
    """What a site's choice depends on besides the run's fixed inputs (statistics, samples, weights, config)."""
    idx = outliers.get(site.name)
    return (site.name, None if idx is None else idx.tobytes(), variant.smoothquant, variant.alpha, *extra)


def choose(plan: QuantPlan, stats: Stats, samples: dict[str, np.ndarray], weight: Weights, config: QuantConfig,
           variant: Variant, outliers: dict[str, np.ndarray] | None = None, progress: bool = False,
           cache: dict | None = None) -> Recipe:
    """The recipe for `variant` with `outliers` (choose_outliers) on the fit statistics `stats` and the
    row `samples`. Sites with outlier channels are chosen on their INT8 bulk. Every DualScale candidate
    gets a decision and its gain, also where `variant.dualscale` is `off` (the report shows them).
    `progress`: a bar per site and per candidate (the searches run GEMMs: minutes on big models)."""
    outliers = outliers or {}
    cache = {} if cache is None else cache  # the same inputs give the same choice: computed once a run
    sites, single = {}, {}
    for site in tqdm(plan.sites, desc="solving sites", unit="site", disable=None if progress else True, leave=False):
        key = _key(site, outliers, variant)
        if key not in cache:
            st, w = bulk(site, stats, weight, outliers)
            rows = _rows(site, samples, outliers, config.calibration.search_rows)
            cache[key] = _choose_site(site, st, rows, w, config, variant, site.name in outliers)
        sites[site.name], single[site.name] = cache[key]
    by_name, dual = {s.name: s for s in plan.sites}, []
    for cand in tqdm(plan.dual, desc="DualScale gains", unit="site", disable=None if progress else True, leave=False):
        site = by_name[cand.site]
        # the gain does not depend on the DualScale mode (only whether it applies does): the variants that differ
        # in it alone (`--dualscale auto` scores auto and off) measure it once
        key = _key(site, outliers, variant, "dual gain")
        if key not in cache:
            st, w = bulk(site, stats, weight, outliers)
            rows = _rows(site, samples, outliers, config.calibration.search_rows)
            cache[key] = _dual_gain(site, st, rows, w, single[site.name], config)
        dual.append(_dual_decision(site, cand.kind, cache[key], config, variant))
    return Recipe(sites, tuple(dual), outliers)
