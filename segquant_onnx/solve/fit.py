"""Fit: recipe + statistics -> quantization parameters (pure numpy, no graph, no session, no decision).

Every site is fitted as its recipe says, on the statistics given: choose calls this on the fit
statistics to score its candidates, the pipeline on every calibration feed for the final scales.

- SmoothQuant: s = smoothing_vector(channel abs-max of X, of W's input channels, alpha); the activation
  is X / s and the weight s * W.
- the activation's clipping threshold: the recipe's method on X's histogram; for X / s or for the INT8
  bulk of an outlier split (whose histograms are not observed) the exact maximum from the per-channel
  maxima, so method `max`.
- DualScale: s+ = amax(X > 0) / 127 and s- = |amax(X < 0)| / 128 of the (smoothed) bulk (FP8: both / 448).

Scales are for the format given (formats.py: INT8 by default, FP8 E4M3FN), or for a Scheme's two: the
activation's in its activation format, the weight's in its weight format (INT4: per block along K).
Weight-only schemes (W4A16) write no activation Q/DQ; their sites still get an activation threshold (INT8's,
for the report), which nothing inserts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
from tqdm import tqdm

from segquant_onnx.calib.observers import Stats, TensorStats
from segquant_onnx.ir.linear import (as_kn, from_kn, input_channel_amax, input_channels, scale_input_channels,
                                     weight_is_nk, zero_input_channels)
from segquant_onnx.params import DualParams, Quantization, SiteParams
from segquant_onnx.plan import LinearSite, QuantPlan, sample_key
from segquant_onnx.formats import INT8, QuantFormat, Scheme, scheme_of, site_block
from segquant_onnx.solve.gptq import clip_scales, gptq_round, hessian
from segquant_onnx.solve.low_rank import low_rank_split
from segquant_onnx.solve.quant_math import activation_amax, scale_from_amax, smoothing_vector, weight_scales
from segquant_onnx.solve.recipe import Recipe

Weights = Callable[[str], np.ndarray]  # initializer name -> values


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


def bulk_stats(site: LinearSite, stats: Stats, outliers) -> TensorStats:
    """The statistics of the site's INT8 part (bulk's, without reading the weight)."""
    idx = outliers.get(site.name)
    return stats[site.activation] if idx is None else masked_stats(stats[site.activation], idx)


def bulk(site: LinearSite, stats: Stats, weight: Weights, outliers) -> tuple[TensorStats, np.ndarray]:
    """(statistics, weight) of the site's INT8 part: the bulk when it has outlier channels."""
    st, w = stats[site.activation], weight(site.weight)
    idx = outliers.get(site.name)
    if idx is not None:
        st, w = masked_stats(st, idx), zero_input_channels(w, site, idx)
    return st, w


def smoothing(st: TensorStats, w: np.ndarray, site: LinearSite, alpha: float | None) -> np.ndarray | None:
    """SmoothQuant's s for `alpha` (None: no smoothing)."""
    return None if alpha is None else smoothing_vector(st.channel_amax, input_channel_amax(w, site), alpha)


def activation_format(fmt: QuantFormat | Scheme) -> QuantFormat:
    """The format activation thresholds are read for (INT8's for a weight-only scheme: reported, not inserted)."""
    return scheme_of(fmt).activations or INT8


def site_weight_scales(w: np.ndarray, axis: int, fmt: QuantFormat | Scheme = INT8) -> np.ndarray:
    """The weight's scales in the scheme's weight format: per output channel, or per block along K."""
    wf = scheme_of(fmt).weights
    block = None if wf.block_size is None else site_block(w.shape[1 - axis], wf.block_size)
    return weight_scales(w, axis, wf.qmax, block)


def site_params(site: LinearSite, st: TensorStats, w: np.ndarray | None, method: str, smooth: np.ndarray | None,
                alpha: float | None, percentile: float, masked: bool = False,
                fmt: QuantFormat | Scheme = INT8, weight_scale: np.ndarray | None = None) -> SiteParams:
    """Scales of X / s (`smooth`; None: X) and of s * W, with the activation clipped by `method`; `weight_scale`:
    s * W's, known already (then `w` is not read)."""
    act = activation_format(fmt)
    if smooth is None and not masked:
        amax = activation_amax(st, method, percentile, act)
    else:
        method = "max"  # see the module docstring
        amax = float((st.channel_amax / (1 if smooth is None else smooth)).max(initial=0))
    if weight_scale is None:
        weight_scale = site_weight_scales(scale_input_channels(w, site, smooth), site.weight_axis, fmt)
    return SiteParams(amax, float(scale_from_amax(amax, act.qmax)), weight_scale, method, smooth, alpha)


def dual_params(pos_amax: float, neg_amax: float, weight: np.ndarray | None, axis: int,
                fmt: QuantFormat | Scheme = INT8, weight_scale: np.ndarray | None = None) -> DualParams:
    """s_pos = max(x) / 127 on [0, 127]; s_neg = |min(x)| / 128 on [-128, 0]; weight per channel (FP8: / 448),
    or `weight_scale` as given (then `weight` is not read).

    `pos_amax` and `neg_amax` are magnitudes (`neg_amax = -min(x)`; its sign is ignored). Dead
    polarities get the smallest positive scale (scale_from_amax's floor).
    """
    act = activation_format(fmt)
    return DualParams(
        pos_scale=float(scale_from_amax(pos_amax, act.qmax)),
        neg_scale=float(scale_from_amax(abs(neg_amax), act.neg_levels)),
        weight_scale=site_weight_scales(weight, axis, fmt) if weight_scale is None else weight_scale,
    )


def site_dual_params(site: LinearSite, st: TensorStats, w: np.ndarray | None, smooth: np.ndarray | None,
                     fmt: QuantFormat | Scheme = INT8, weight_scale: np.ndarray | None = None) -> DualParams:
    """DualScale parameters of the (bulk) site from its polarity statistics, after smoothing (`weight_scale`: the
    weight's, known already: `w` is not read)."""
    pos, neg = ((st.pos_amax, st.neg_amax) if smooth is None else
                (float((st.channel_pos_amax / smooth).max()), float((st.channel_neg_amax / smooth).max())))
    w_s = None if weight_scale is not None else scale_input_channels(w, site, smooth)
    return dual_params(pos, neg, w_s, site.weight_axis, fmt, weight_scale)


def gptq_weight(site: LinearSite, w: np.ndarray, p: SiteParams, rows: np.ndarray,
                fmt: QuantFormat | Scheme) -> np.ndarray:
    """The site's (bulk) weight rounded by GPTQ with its fitted scales, on the Hessian of its sampled rows: s * W
    in the site's layout, on the grid (solve/gptq.py)."""
    wf = scheme_of(fmt).weights
    w_s = scale_input_channels(w, site, p.smooth)
    x = rows if p.smooth is None else rows / p.smooth
    per_element = wf.dequantize(np.ones(w_s.shape, np.float32), p.weight_scale, site.weight_axis)
    rounded = gptq_round(as_kn(w_s, site), as_kn(per_element, site), hessian(x), wf)
    return from_kn(rounded, site).astype(np.float32)


def clipped_scales(site: LinearSite, w: np.ndarray, p: SiteParams, rows: np.ndarray,
                   fmt: QuantFormat | Scheme) -> np.ndarray:
    """The site's weight scales after the clip search (solve/gptq.py clip_scales), in the site's layout."""
    wf = scheme_of(fmt).weights
    w_kn = as_kn(scale_input_channels(w, site, p.smooth), site)
    x = rows if p.smooth is None else rows / p.smooth
    scale = np.asarray(p.weight_scale)
    s_kn = (scale.T if weight_is_nk(site) else scale) if scale.ndim == 2 else scale[None, :]
    block = w_kn.shape[0] // s_kn.shape[0]
    clipped = clip_scales(w_kn, s_kn, x, wf, block)
    return (clipped.T if weight_is_nk(site) else clipped) if scale.ndim == 2 else clipped[0]


def gptq_pays(site: LinearSite, w: np.ndarray, p: SiteParams, rows: np.ndarray, fmt: QuantFormat | Scheme) -> bool:
    """Whether GPTQ fitted on half of the rows (even) gives a lower layer output error than rounding to nearest
    on the other half (odd): ||X (s W - Q)||^2 with X = rows / s (`--weight-rounding auto`)."""
    if len(rows) < 2:
        return False
    x = (rows if p.smooth is None else rows / p.smooth)[1::2].astype(np.float64)
    w_kn = as_kn(scale_input_channels(w, site, p.smooth), site).astype(np.float64)
    rtn = as_kn(scheme_of(fmt).weights.fake_quant(scale_input_channels(w, site, p.smooth), p.weight_scale,
                                                   site.weight_axis), site)
    gptq = as_kn(gptq_weight(site, w, p, rows[0::2], fmt), site).astype(np.float64)
    err = lambda q: float(((x @ (w_kn - q)) ** 2).sum())  # noqa: E731
    return err(gptq) < err(rtn) * (1 - 1e-6)  # a tie (GPTQ is rounding to nearest) is no win


AUTO_RANKS = (16, 32, 64)  # what --low-rank auto tries per site
AUTO_RANK_MAX_COST = 0.10  # at most this fraction of the site's FLOPs: 2 M r (K + N) <= 0.1 x 2 M K N
AUTO_RANK_MIN_GAIN_DB = 1.0  # a branch must lower the layer's weight error by this much


def auto_rank(site: LinearSite, w: np.ndarray, smooth: np.ndarray | None, rows: np.ndarray,
              fmt: QuantFormat | Scheme) -> int:
    """`--low-rank auto` for one site: of AUTO_RANKS, those costing at most AUTO_RANK_MAX_COST of the site's
    FLOPs, the one with the lowest layer output error from the weight ||X (s W - L1 L2 - fq(R))||^2 on the
    sampled rows (no fitting to them: the split is the SVD), if it gains at least AUTO_RANK_MIN_GAIN_DB over no
    branch; else 0."""
    k, n = site_kn(site)
    ranks = [r for r in AUTO_RANKS if r * (k + n) <= AUTO_RANK_MAX_COST * k * n]
    if not ranks:
        return 0
    x = (rows if smooth is None else rows / smooth).astype(np.float64)
    w_s = scale_input_channels(w, site, smooth)
    wf = scheme_of(fmt).weights

    def error(rank: int) -> float:
        if rank:
            _, residual = split_low_rank(site, w, smooth, rank)
            r_s = scale_input_channels(residual, site, smooth)
            approx = w_s - r_s + wf.fake_quant(r_s, site_weight_scales(r_s, site.weight_axis, fmt), site.weight_axis)
        else:
            approx = wf.fake_quant(w_s, site_weight_scales(w_s, site.weight_axis, fmt), site.weight_axis)
        return float(((x @ (as_kn(w_s, site) - as_kn(approx, site))) ** 2).sum())

    base = error(0)
    best = min(ranks, key=error)
    gain = 10 * np.log10(base / max(error(best), 1e-300)) if base > 0 else 0.0
    return best if gain >= AUTO_RANK_MIN_GAIN_DB else 0


def site_kn(site: LinearSite) -> tuple[int, int]:
    """(K, N) of a MatMul/Gemm site."""
    k, n = site.weight_shape
    return (n, k) if weight_is_nk(site) else (k, n)


def split_low_rank(site: LinearSite, w: np.ndarray, smooth: np.ndarray | None,
                   rank: int) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray]:
    """((L1, L2), W') with s * W = L1 @ L2 + s * W': the low-rank factors of the smoothed weight, and the residual
    in the unsmoothed domain (what site_params and gptq_weight take, both smoothing it again)."""
    l1, l2, r_kn = low_rank_split(as_kn(scale_input_channels(w, site, smooth), site), rank)
    residual = from_kn(r_kn, site)
    unsmoothed = residual if smooth is None else scale_input_channels(residual, site, 1.0 / smooth.astype(np.float64))
    return (l1.astype(np.float32), l2.astype(np.float32)), unsmoothed.astype(np.float32)


def site_rows(site: LinearSite, samples: dict[str, np.ndarray], outliers) -> np.ndarray | None:
    """The site's sampled input rows [R, K] (a Conv's: its input patches), its outlier channels zeroed (None: not
    sampled)."""
    if site.patches:  # a Conv's input patches: C x kh x kw values per row, channel-major
        rows, per_channel = samples.get(sample_key(site)), site.patches[0] * site.patches[1]
    else:
        rows, per_channel = (samples.get(site.activation) if site.channels_last else None), 1
    if rows is None or rows.shape[-1] != input_channels(site) * per_channel:
        return None
    idx = outliers.get(site.name)
    if idx is not None:
        rows = rows.copy()
        rows[:, (np.asarray(idx)[:, None] * per_channel + np.arange(per_channel)).ravel()] = 0
    return rows


def fit(plan: QuantPlan, recipe: Recipe, stats: Stats, weight: Weights, *, percentile: float,
        fmt: QuantFormat | Scheme = INT8, progress: bool = False, samples: dict[str, np.ndarray] | None = None,
        rounding: str = "rtn", low_rank: int | str = 0, clip: bool = False,
        weight_scales: dict | None = None) -> Quantization:
    """The parameters of every site as `recipe` says, from `stats`: scales (of the bulk where the site
    has outlier channels), smoothing vectors, and DualScale scales where the recipe applies it.
    Sites kept in float get scales too (reported as float, never inserted). With `rounding` gptq, the
    weights of the sites with sampled rows (`samples`) are GPTQ-rounded (the others to nearest); with `auto`,
    those where GPTQ pays on held-out rows (gptq_pays). With
    `low_rank` r > 0, every MatMul/Gemm site with r < min(K, N) keeps a rank-r branch of s * W in float and is
    fitted on the residual; `auto`: the rank auto_rank picks per site. With `clip`, the weight scales of sites
    with sampled rows are clipped per block and
    output channel where that lowers the layer output error on the rows (AWQ's clip search; before GPTQ).
    `weight_scales`: a memo of the weight scales of sites whose weight enters only through them (no smoothing, no
    low-rank branch, no GPTQ or clip search), by site, outlier channels and format, for the fits of one run's
    weights (each candidate's and the output's): those weights are then read and converted to float32 once a run,
    not once a fit (a 2 GiB float16 model: 2.2 GB read and 4.4 GB written per fit). `progress`: a bar per site."""
    params = {}
    # the weight enters the parameters only through its scales, which depend on nothing the fits differ in
    plain = rounding == "rtn" and not clip and not low_rank
    for site in tqdm(plan.sites, desc="fitting scales", unit="site", disable=None if progress else True, leave=False):
        choice = recipe.sites[site.name]
        idx = recipe.outliers.get(site.name)
        memo = None
        if plain and choice.alpha is None and weight_scales is not None:
            memo = ("weight scales", site.name, site.weight, None if idx is None else idx.tobytes(), fmt)
            if memo in weight_scales:
                p = site_params(site, bulk_stats(site, stats, recipe.outliers), None, choice.method, None, None,
                                percentile, masked=idx is not None, fmt=fmt, weight_scale=weight_scales[memo])
                params[site.name] = replace(p, layer_sqnr_db=choice.layer_sqnr_db, rounded=None, low_rank=None)
                continue
        st, w = bulk(site, stats, weight, recipe.outliers)
        smooth = smoothing(st, w, site, choice.alpha)
        factors = None
        rank = low_rank
        if rank == "auto" and site.channels_last and site.name not in recipe.floating:
            rows = site_rows(site, samples or {}, recipe.outliers)
            rank = 0 if rows is None else auto_rank(site, w, smooth, rows, fmt)
        if rank and rank != "auto" and site.channels_last and site.name not in recipe.floating \
                and rank < min(site_kn(site)):
            factors, w = split_low_rank(site, w, smooth, rank)
        p = site_params(site, st, w, choice.method, smooth, choice.alpha, percentile,
                        masked=site.name in recipe.outliers, fmt=fmt)
        rows = site_rows(site, samples or {}, recipe.outliers) if rounding != "rtn" or clip else None
        if clip and rows is not None and site.name not in recipe.floating:
            p = replace(p, weight_scale=clipped_scales(site, w, p, rows, fmt))
        rounded = None
        if rows is not None and rounding != "rtn" and site.name not in recipe.floating and (
                rounding == "gptq" or gptq_pays(site, w, p, rows, fmt)):
            rounded = gptq_weight(site, w, p, rows, fmt)
        params[site.name] = replace(p, layer_sqnr_db=choice.layer_sqnr_db, rounded=rounded, low_rank=factors)
        if memo is not None:
            weight_scales[memo] = p.weight_scale
    sites, dual = {s.name: s for s in plan.sites}, {}
    for name in recipe.dual_sites:  # both branches read the site's weight, with its scales
        st = bulk_stats(sites[name], stats, recipe.outliers)
        dual[name] = replace(site_dual_params(sites[name], st, None, params[name].smooth, fmt,
                                              weight_scale=params[name].weight_scale), rounded=params[name].rounded)
    act = activation_format(fmt)
    attention = {a.name: tuple(float(scale_from_amax(stats[t].amax, act.qmax)) for t in a.inputs)
                 for a in plan.attention}  # abs-max: the softmax output is bounded, Q/K/V are searched by no one
    return Quantization(params, dual, dict(recipe.outliers), list(recipe.dual), recipe.floating, fmt, attention)
