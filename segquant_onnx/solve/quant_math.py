"""Quantization math: pure numpy, no graphs.

Conventions (TensorRT is the consumer): symmetric, zero point 0; scale = threshold / qmax of the format
(INT8: [-128, 127], qmax 127; FP8 E4M3FN: qmax 448, see formats.py); scales float32, finite and strictly
positive.
"""

from __future__ import annotations

import numpy as np

from segquant_onnx.calib.observers import TensorStats
from segquant_onnx.formats import INT8, QuantFormat

INT8_MAX = 127
INT8_NEG_LEVELS = 128  # a negative-only tensor (DualScale's negative branch) uses all of [-128, 0]
# amax below this is a dead tensor/channel; it still needs a positive scale.
AMAX_FLOOR = 1e-8


def scale_from_amax(amax: float | np.ndarray, qmax: int = INT8_MAX) -> np.ndarray:
    """scale = max(amax, AMAX_FLOOR) / qmax, as float32 (finite, > 0)."""
    top = float(np.finfo(np.float32).max)
    amax = np.nan_to_num(np.asarray(amax, np.float64), nan=AMAX_FLOOR, posinf=top)
    return (np.clip(amax, AMAX_FLOOR, top) / qmax).astype(np.float32)


def percentile_amax(stats: TensorStats, percentile: float) -> float:
    """The smallest histogram bin edge below which `percentile`% of |x| values fall."""
    cdf = np.cumsum(stats.hist) / max(stats.hist.sum(), 1)
    k = int(np.searchsorted(cdf, percentile / 100.0))
    edge = stats.bin_edges[min(k + 1, len(stats.hist))]
    return float(min(edge, stats.amax))


def mse_amax(stats: TensorStats, qmax: int = INT8_MAX, fmt: QuantFormat = INT8) -> float:
    """Clipping threshold T minimising the expected squared error of symmetric quantization.

    With bin centres c and counts n: E(T) = N_in(T) * (T/qmax)^2 / 12 + sum_{c > T} n_c (c - T)^2,
    i.e. uniform rounding noise inside the range plus clipping error outside. Evaluated at every
    bin edge with cumulative sums (O(bins)). FP8 (a relative grid): fp8_mse_amax.
    """
    if fmt.dtype is not np.int8:
        return fp8_mse_amax(stats, fmt)
    n = stats.hist.astype(np.float64)
    edges = stats.bin_edges
    centers = (edges[:-1] + edges[1:]) / 2
    # tail sums over bins strictly above edge k (bins k.. end)
    s0 = np.cumsum(n[::-1])[::-1]
    s1 = np.cumsum((n * centers)[::-1])[::-1]
    s2 = np.cumsum((n * centers**2)[::-1])[::-1]
    t = edges[1:]  # candidate thresholds: upper edge of bin k
    tail0 = np.append(s0[1:], 0.0)
    tail1 = np.append(s1[1:], 0.0)
    tail2 = np.append(s2[1:], 0.0)
    inside = n.sum() - tail0
    err = inside * (t / qmax) ** 2 / 12 + tail2 - 2 * t * tail1 + t**2 * tail0
    k = int(np.argmin(err))
    return float(min(t[k], stats.amax)) if stats.amax > 0 else 0.0


def fp8_step(u: np.ndarray) -> np.ndarray:
    """The E4M3FN grid step at magnitude u (in units of the scale): 2^(e - 3) for u in [2^e, 2^(e+1)),
    e >= -6 (normal numbers, 3 mantissa bits); 2^-9 below 2^-6 (subnormals)."""
    e = np.floor(np.log2(np.maximum(u, 2.0**-6)))
    return 2.0 ** (e - 3)


def fp8_mse_amax(stats: TensorStats, fmt: QuantFormat, candidates: int = 256) -> float:
    """mse_amax for FP8 E4M3FN: E(T) = sum_{c <= T} n_c step(c / s)^2 s^2 / 12 + sum_{c > T} n_c (c - T)^2
    with s = T / qmax: rounding noise where the value falls on the grid (uniform within its step), clipping
    error above. `candidates` thresholds spread over the histogram's edges."""
    n = stats.hist.astype(np.float64)
    if stats.amax <= 0 or n.sum() == 0:
        return 0.0
    edges = stats.bin_edges
    centers = (edges[:-1] + edges[1:]) / 2
    ks = np.unique(np.linspace(0, len(n) - 1, min(candidates, len(n))).astype(int))
    best_err, best_t = np.inf, float(stats.amax)
    for k in ks:
        t = float(edges[k + 1])
        s = t / fmt.qmax
        inside = centers <= t
        err = float((n[inside] * (fp8_step(centers[inside] / s) * s) ** 2 / 12).sum()
                    + (n[~inside] * (centers[~inside] - t) ** 2).sum())
        if err < best_err:
            best_err, best_t = err, t
    return float(min(best_t, stats.amax))


def entropy_amax(stats: TensorStats, levels: int = INT8_MAX + 1, stride: int = 16) -> float:
    """Threshold minimising KL(P || Q) between the |x| histogram clipped at T (P, outliers folded into
    its last bin) and P quantized to `levels` bins (Q, each level's mass spread evenly over the
    non-empty bins it covers): TensorRT's entropy calibration. Candidates every `stride` bins.
    """
    hist = stats.hist.astype(np.float64)
    n = len(hist)
    if stats.amax <= 0 or hist.sum() == 0:
        return 0.0
    best_kl, best_i = np.inf, n
    for i in range(levels, n + 1, stride):
        clipped = hist[:i]
        p = clipped.copy()
        p[-1] += hist[i:].sum()  # reference: the clipped-away mass lands in the last bin
        nonzero = p > 0
        q = np.zeros(i)  # candidate: the clipped histogram (without that mass) on `levels` levels,
        # each level's mass spread over the bins where P is non-zero
        for g in np.array_split(np.arange(i), levels):
            nz = nonzero[g]
            if nz.any():
                q[g[nz]] = clipped[g].sum() / nz.sum()
        pn, qn = p / p.sum(), q / max(q.sum(), 1e-300)
        with np.errstate(divide="ignore"):
            kl = float((pn[nonzero] * np.log(pn[nonzero] / qn[nonzero])).sum())  # inf if Q misses P's mass
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(min(stats.bin_edges[best_i], stats.amax))


def activation_amax(stats: TensorStats, method: str, percentile: float = 99.99, fmt: QuantFormat = INT8) -> float:
    if method == "max":
        return stats.amax
    if method == "percentile":
        return percentile_amax(stats, percentile)
    if method == "mse":
        return mse_amax(stats, fmt=fmt)
    if method == "entropy":
        if fmt.dtype is not np.int8:
            raise ValueError("entropy calibration is defined on INT8's uniform levels, not on FP8")
        return entropy_amax(stats)
    raise ValueError(f"unknown calibration method {method!r}")


def smoothing_vector(act_channel_amax: np.ndarray, weight_channel_amax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant (Xiao et al. 2023): s_k = max|X_k|^alpha / max|W_k|^(1 - alpha) per input channel k.

    X / s and s * W give the same product with the activation's outlier channels shrunk and the
    weight's rows grown. Dead channels (either max is 0) get s = 1; s is clipped to [1e-4, 1e4].
    """
    a = np.asarray(act_channel_amax, np.float64)
    w = np.asarray(weight_channel_amax, np.float64)
    alive = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[alive] = a[alive] ** alpha / w[alive] ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4).astype(np.float32)


def weight_scales(w: np.ndarray, axis: int, qmax: int = INT8_MAX, block: int | None = None) -> np.ndarray:
    """Per-output-channel scales: abs-max over every axis but `axis`, / qmax. With `block` (a 2-D weight),
    per output channel and per block of `block` input channels: the weight's shape with ceil(K / block)
    along the input axis (1 - axis), each the abs-max of its block (the last may be short) / qmax."""
    if block is not None:
        return scale_from_amax(block_amax(w, 1 - axis, block), qmax)
    other = tuple(i for i in range(w.ndim) if i != axis)
    return scale_from_amax(np.abs(w).max(axis=other) if other else np.abs(w), qmax)


def block_amax(w: np.ndarray, k_axis: int, block: int) -> np.ndarray:
    """Abs-max of each block of `block` consecutive entries along `k_axis` of a 2-D `w`."""
    a = np.abs(np.moveaxis(np.asarray(w), k_axis, 0))  # [K, N]
    k = a.shape[0]
    blocks = -(-k // block)
    a = np.pad(a, ((0, blocks * block - k), (0, 0)))
    return np.moveaxis(a.reshape(blocks, block, a.shape[1]).max(axis=1), 0, k_axis)


def quantize_int8(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """round-half-to-even(x / scale), saturated to [-128, 127] (ONNX QuantizeLinear semantics)."""
    return INT8.quantize(x, scale, axis)


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    return INT8.dequantize(q, scale, axis)


def fake_quant(x: np.ndarray, scale: np.ndarray, axis: int | None = None, fmt: QuantFormat = INT8) -> np.ndarray:
    """dequantize(quantize(x, scale)) in float64: what a Q->DQ pair computes (INT8 unless `fmt`)."""
    return fmt.fake_quant(x, scale, axis)


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2); +inf for an exact match."""
    if noise_power <= 0:
        return float("inf")
    if signal_power <= 0:
        return float("-inf")
    return float(10 * np.log10(signal_power / noise_power))
