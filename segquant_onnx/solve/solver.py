"""Solve: plan + statistics -> quantization parameters (pure numpy, no graph, no session)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from segquant_onnx.config import QuantConfig
from segquant_onnx.calib.observers import Stats, TensorStats
from segquant_onnx.ir.linear import (as_kn, input_channel_amax, input_channel_axis, input_channels,
                                     scale_input_channels, zero_input_channels)
from segquant_onnx.params import DualDecision, DualParams, SiteParams
from segquant_onnx.plan import LinearSite, QuantPlan
from segquant_onnx.solve.quant_math import (INT8_MAX, INT8_NEG_LEVELS, activation_amax, fake_quant,
                                      scale_from_amax, smoothing_vector, sqnr_db, weight_scales)


def dual_params(pos_amax: float, neg_amax: float, weight: np.ndarray, axis: int) -> DualParams:
    """s_pos = max(x) / 127 on [0, 127]; s_neg = |min(x)| / 128 on [-128, 0]; weight per channel.

    `pos_amax` and `neg_amax` are magnitudes (`neg_amax = -min(x)`; its sign is ignored). Dead
    polarities get the smallest positive scale (scale_from_amax's floor).
    """
    return DualParams(
        pos_scale=float(scale_from_amax(pos_amax, INT8_MAX)),
        neg_scale=float(scale_from_amax(abs(neg_amax), INT8_NEG_LEVELS)),
        weight_scale=weight_scales(weight, axis),
    )


def measured_dual_gain(rows: np.ndarray, w: np.ndarray, site: LinearSite, single: SiteParams,
                       dual: DualParams) -> float:
    """Layer output SQNR(dual) - SQNR(single) in dB on sampled activation rows [R, K].

    Y = rows @ W; single: fq(rows, s) @ fq(W); dual: (fq(relu(rows), s+) + fq(min(rows, 0), s-)) @ fq(W).
    """
    wq = fake_quant(w, single.weight_scale, site.weight_axis)
    w_kn, wq_kn = as_kn(w, site), as_kn(wq, site)
    y = rows.astype(np.float64) @ w_kn
    y_single = fake_quant(rows, np.float32(single.act_scale)) @ wq_kn
    y_dual = (fake_quant(np.maximum(rows, 0), np.float32(dual.pos_scale))
              + fake_quant(np.minimum(rows, 0), np.float32(dual.neg_scale))) @ wq_kn
    signal = float((y**2).sum())
    return sqnr_db(signal, float(((y - y_dual) ** 2).sum())) - sqnr_db(signal, float(((y - y_single) ** 2).sum()))


def estimated_dual_gain(stats: TensorStats, single: SiteParams, dual: DualParams) -> float:
    """Input rounding-noise power with one scale over the sum with two (uniform noise s^2/12 each).

    Used where no row sample fits the op (Conv over NCHW); an estimate, and reported as one.
    """
    n, n_neg = max(stats.count, 1), stats.neg_count
    single_noise = n * single.act_scale**2
    dual_noise = (n - n_neg) * dual.pos_scale**2 + n_neg * dual.neg_scale**2
    return float(10 * np.log10(single_noise / max(dual_noise, 1e-30)))


def _act_amax(st: TensorStats, rows: np.ndarray | None, smooth: np.ndarray | None, method: str,
              config: QuantConfig, masked: bool = False) -> float:
    """Clipping threshold of X on its histogram; of X / s or of the bulk of X (whose histograms are not
    observed) the exact maximum from the per-channel maxima. (Fitting a clipping method on the row
    sample instead would score the search on the data it was fitted to.)"""
    if smooth is None and not masked:
        return activation_amax(st, method, config.percentile)
    return float((st.channel_amax / (1 if smooth is None else smooth)).max(initial=0))


def layer_sqnr(rows: np.ndarray, w: np.ndarray, site: LinearSite, p: SiteParams) -> float:
    """SQNR (dB) of Y = rows @ W against fq(rows / s) @ fq(s * W) on sampled rows [R, K]."""
    x_s = rows if p.smooth is None else rows / p.smooth
    w_s = scale_input_channels(w, site, p.smooth)
    y = rows.astype(np.float64) @ as_kn(w, site)
    y_q = fake_quant(x_s, np.float32(p.act_scale)) @ as_kn(fake_quant(w_s, p.weight_scale, site.weight_axis), site)
    return sqnr_db(float((y**2).sum()), float(((y - y_q) ** 2).sum()))


def _site_params(site: LinearSite, st: TensorStats, rows, w, smooth, alpha, method, config,
                 masked: bool = False) -> SiteParams:
    if smooth is not None or masked:
        method = "max"  # see _act_amax
    amax = _act_amax(st, rows, smooth, method, config, masked)
    return SiteParams(amax, float(scale_from_amax(amax)), weight_scales(scale_input_channels(w, site, smooth), site.weight_axis),
                      method, smooth, alpha)


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
        if site.op == "Conv" and st.channel_axis != 1 or site.op != "Conv" and not site.channels_last:
            continue
        order = np.argsort(-amax, kind="stable")[:cap]
        idx = np.sort(order[amax[order] > ratio * max(float(np.median(amax)), 1e-12)])
        cost = site.flops * len(idx) / amax.size
        if len(idx) and cost <= budget:
            chosen[site.name], budget = idx.astype(np.int64), budget - cost
    return chosen


def masked_stats(st: TensorStats, idx: np.ndarray) -> TensorStats:
    """Statistics of X with the channels `idx` zeroed (the INT8 bulk of an outlier split). Exact for
    the maxima; the histogram still holds every channel, so non-max methods use the row sample."""
    keep = np.ones(st.channel_amax.size, bool)
    keep[idx] = False
    ch = lambda v: np.where(keep, v, 0).astype(np.float32)  # noqa: E731
    return replace(st, amax=float(ch(st.channel_amax).max(initial=0)),
                   pos_amax=float(ch(st.channel_pos_amax).max(initial=0)),
                   neg_amax=float(ch(st.channel_neg_amax).max(initial=0)),
                   channel_amax=ch(st.channel_amax), channel_pos_amax=ch(st.channel_pos_amax),
                   channel_neg_amax=ch(st.channel_neg_amax))


def _site_inputs(site, stats, samples, weight, outliers, search_rows):
    """(stats, rows, weight) of the site's INT8 part: the bulk when it has outlier channels."""
    st, w = stats[site.activation], weight(site.weight)
    rows = samples.get(site.activation) if site.channels_last else None  # rows are over the last axis
    if rows is not None:
        rows = rows[:search_rows]
    idx = outliers.get(site.name)
    if idx is not None:
        st, w = masked_stats(st, idx), zero_input_channels(w, site, idx)
        if rows is not None:
            rows = rows.copy()
            rows[:, idx] = 0
    return st, rows, w


def solve(plan: QuantPlan, stats: Stats, weight: Callable[[str], np.ndarray], config: QuantConfig,
          samples: dict[str, np.ndarray] | None = None,
          outliers: dict[str, np.ndarray] | None = None,
          chosen: dict[str, SiteParams] | None = None, progress: bool = False) -> dict[str, SiteParams]:
    """Scales per site. Where a row sample exists, `calib_method=auto` and `smoothquant=auto` pick,
    per site, the method and SmoothQuant alpha (or none) with the best layer output SQNR on it.
    Sites with `outliers` get the scales of their INT8 bulk. With `chosen` (params from an earlier
    solve, e.g. on held-out-scored statistics), each site keeps that method and alpha: no search.
    `progress`: a bar per site (the search runs GEMMs per site and candidate: minutes on big models)."""
    samples, outliers = samples or {}, outliers or {}
    methods = ("max", "percentile", "mse", "entropy") if config.calib_method == "auto" else (config.calib_method,)
    params = {}
    for site in tqdm(plan.sites, desc="solving sites", unit="site", disable=None if progress else True, leave=False):
        st, rows, w = _site_inputs(site, stats, samples, weight, outliers, config.search_rows)
        if chosen is not None:
            c = chosen[site.name]
            smooth = None if c.alpha is None else smoothing_vector(st.channel_amax, input_channel_amax(w, site), c.alpha)
            p = _site_params(site, st, rows, w, smooth, c.alpha, c.method, config, masked=site.name in outliers)
            params[site.name] = replace(p, layer_sqnr_db=c.layer_sqnr_db)
            continue
        smoothable = site.channels_last and st.channel_amax.size == w.shape[input_channel_axis(site)]
        alphas: tuple = (None,)
        if smoothable and config.smoothquant == "auto" and rows is not None:  # auto scores on the sample
            alphas = (None,) + config.smooth_alphas
        elif smoothable and config.smoothquant not in ("off", "auto"):
            alphas = (float(config.smoothquant),)
        best = None
        for alpha in alphas:
            smooth = None if alpha is None else smoothing_vector(st.channel_amax, input_channel_amax(w, site), alpha)
            for method in (methods if rows is not None else methods[:1]):
                p = _site_params(site, st, rows, w, smooth, alpha, "max" if method == "auto" else method, config,
                                 masked=site.name in outliers)
                score = layer_sqnr(rows, w, site, p) if rows is not None else None
                if best is None or (score is not None and score > best[0]):
                    best = (score, p)
        score, p = best
        params[site.name] = SiteParams(**{**p.__dict__, "layer_sqnr_db": None if score is None else round(score, 3)})
    return params


def solve_dual(plan: QuantPlan, stats: Stats, samples: dict[str, np.ndarray], params: dict[str, SiteParams],
               weight: Callable[[str], np.ndarray], config: QuantConfig,
               outliers: dict[str, np.ndarray] | None = None,
               decided: list[DualDecision] | None = None,
               progress: bool = False) -> tuple[dict[str, DualParams], list[DualDecision]]:
    """DualScale parameters for every candidate, and the policy's decision for each.

    `all` applies every candidate with a negative part; `auto` those whose layer-output gain reaches
    `config.dualscale_min_gain_db`. `progress`: a bar per candidate (each gain is measured with GEMMs).
    """
    sites = {s.name: s for s in plan.sites}
    dual, decisions = {}, []
    earlier = {d.site: d for d in decided} if decided is not None else None
    for cand in tqdm(plan.dual, desc="DualScale gains", unit="site", disable=None if progress else True, leave=False):
        site = sites[cand.site]
        if earlier is not None:  # decisions made before (on held-out-scored statistics): keep them
            st, _, w = _site_inputs(site, stats, {}, weight, outliers or {}, 0)
            smooth = params[site.name].smooth
            if earlier[site.name].apply:
                dual[site.name] = dual_params(
                    *((st.pos_amax, st.neg_amax) if smooth is None else
                      (float((st.channel_pos_amax / smooth).max()), float((st.channel_neg_amax / smooth).max()))),
                    scale_input_channels(w, site, smooth), site.weight_axis)
            decisions.append(earlier[site.name])
            continue
        # polarity statistics of the INT8 bulk (outlier channels removed), after smoothing
        st, rows, w = _site_inputs(site, stats, samples, weight, outliers or {}, config.search_rows)
        smooth = params[site.name].smooth
        pos, neg = ((st.pos_amax, st.neg_amax) if smooth is None else
                    (float((st.channel_pos_amax / smooth).max()), float((st.channel_neg_amax / smooth).max())))
        w = scale_input_channels(w, site, smooth)
        p = dual_params(pos, neg, w, site.weight_axis)
        if rows is not None and len(rows):
            rows = rows if smooth is None else rows / smooth
            gain, measured = measured_dual_gain(rows, w, site, params[site.name], p), True
        else:
            gain, measured = estimated_dual_gain(st, params[site.name], p), False
        has_negatives = st.neg_amax > 0
        apply = has_negatives and config.dualscale != "off" and (
            config.dualscale == "all" or gain >= config.dualscale_min_gain_db)
        decisions.append(DualDecision(site.name, cand.kind, apply, round(gain, 3), measured, site.flops))
        if apply:
            dual[site.name] = p
    return dual, decisions
