"""Solve: plan + statistics -> quantization parameters (pure numpy, no graph, no session)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from segquant_onnx.config import QuantConfig
from segquant_onnx.observers import Stats, TensorStats
from segquant_onnx.plan import LinearSite, QuantPlan
from segquant_onnx.quant_math import (INT8_MAX, INT8_NEG_LEVELS, activation_amax, fake_quant,
                                      scale_from_amax, sqnr_db, weight_scales)


@dataclass(frozen=True)
class SiteParams:
    """Scales of one linear site: activation per tensor, weight per output channel."""

    act_amax: float
    act_scale: float
    weight_scale: np.ndarray
    method: str


@dataclass(frozen=True)
class DualParams:
    """Scales of one dual site: one per polarity of the activation, weight per output channel."""

    pos_scale: float
    neg_scale: float
    weight_scale: np.ndarray

    def __post_init__(self):
        for name in ("pos_scale", "neg_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DualParams.{name} must be finite and > 0, got {value}")
        ws = np.asarray(self.weight_scale)
        if ws.ndim != 1 or not (np.isfinite(ws).all() and (ws > 0).all()):
            raise ValueError("DualParams.weight_scale must be a 1-D vector of finite positive scales")


@dataclass(frozen=True)
class DualDecision:
    """Whether a SiLU/GELU -> linear site runs as two GEMMs, and the layer-output gain that decided it.

    `gain_db` is the layer output SQNR with DualScale minus with one scale; `measured` says whether it
    was measured on a sample of the real activation rows (MatMul/Gemm) or estimated from the
    polarity statistics with a rounding-noise model (Conv).
    """

    site: str
    kind: str
    apply: bool
    gain_db: float
    measured: bool
    flops: int


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


def _as_kn(w: np.ndarray, site: LinearSite) -> np.ndarray:
    """The weight as a [K, N] matrix (Gemm transB=1 stores [N, K])."""
    return w.T if site.op == "Gemm" and site.weight_axis == 0 else w


def measured_dual_gain(rows: np.ndarray, w: np.ndarray, site: LinearSite, single: SiteParams,
                       dual: DualParams) -> float:
    """Layer output SQNR(dual) - SQNR(single) in dB on sampled activation rows [R, K].

    Y = rows @ W; single: fq(rows, s) @ fq(W); dual: (fq(relu(rows), s+) + fq(min(rows, 0), s-)) @ fq(W).
    """
    wq = fake_quant(w, single.weight_scale, site.weight_axis)
    w_kn, wq_kn = _as_kn(w, site), _as_kn(wq, site)
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


def solve(plan: QuantPlan, stats: Stats, weight: Callable[[str], np.ndarray],
          config: QuantConfig) -> dict[str, SiteParams]:
    params = {}
    for site in plan.sites:
        amax = activation_amax(stats[site.activation], config.calib_method, config.percentile)
        params[site.name] = SiteParams(
            act_amax=amax,
            act_scale=float(scale_from_amax(amax)),
            weight_scale=weight_scales(weight(site.weight), site.weight_axis),
            method=config.calib_method,
        )
    return params


def solve_dual(plan: QuantPlan, stats: Stats, samples: dict[str, np.ndarray], params: dict[str, SiteParams],
               weight: Callable[[str], np.ndarray], config: QuantConfig
               ) -> tuple[dict[str, DualParams], list[DualDecision]]:
    """DualScale parameters for every candidate, and the policy's decision for each.

    `all` applies every candidate with a negative part; `auto` those whose layer-output gain reaches
    `config.dualscale_min_gain_db`.
    """
    sites = {s.name: s for s in plan.sites}
    dual, decisions = {}, []
    for cand in plan.dual:
        site, st = sites[cand.site], stats[sites[cand.site].activation]
        p = dual_params(st.pos_amax, st.neg_amax, weight(site.weight), site.weight_axis)
        rows = samples.get(site.activation)
        if site.op in ("MatMul", "Gemm") and rows is not None and len(rows):
            gain, measured = measured_dual_gain(rows, weight(site.weight), site, params[site.name], p), True
        else:
            gain, measured = estimated_dual_gain(st, params[site.name], p), False
        has_negatives = st.neg_amax > 0
        apply = has_negatives and (config.dualscale == "all" or gain >= config.dualscale_min_gain_db)
        decisions.append(DualDecision(site.name, cand.kind, apply, round(gain, 3), measured, site.flops))
        if apply:
            dual[site.name] = p
    return dual, decisions
