"""Numpy references, written out from the definitions (loops where the library uses cumulative sums), so a
mistake in either shows as a mismatch. No function of segquant_onnx is called here.

- the |x| histogram the observers keep (calib/observers.py): 2048 equal bins over [0, R), R the smallest
  power of two >= amax * (1 + 2^-20) (at least 2^-24), a value in bin floor(|x| * 2048 / R); widening by
  a power of two merges whole bins, so the histogram of several batches is this one of all their values;
- the clipping thresholds read from it (solve/quant_math.py): percentile, mse, entropy, each capped at amax;
- Q -> DQ and SQNR as ONNX Runtime computes them.
"""

from __future__ import annotations

import numpy as np

NUM_BINS = 2048
INT8_MAX = 127


# -- the histogram -------------------------------------------------------------------------------------------
def hist_range(amax: float) -> float:
    target, r = max(amax * (1 + 2.0**-20), 2.0**-24), 2.0**-24
    while r < target:
        r *= 2
    return r


def histogram(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(counts, bin edges, amax) of |x| as the observers bin it."""
    a = np.abs(np.asarray(x, np.float32)).astype(np.float64).ravel()
    amax = float(a.max())
    r = hist_range(amax)
    counts = np.bincount(np.minimum(np.floor(a * (NUM_BINS / r)).astype(np.int64), NUM_BINS - 1), minlength=NUM_BINS)
    return counts, np.array([k * r / NUM_BINS for k in range(NUM_BINS + 1)]), amax


# -- thresholds ------------------------------------------------------------------------------------------------
def percentile_threshold(counts, edges, amax, percentile: float) -> float:
    """The upper edge of the first bin at which the cumulative share of values reaches `percentile`%."""
    total, seen = counts.sum(), 0
    for k, c in enumerate(counts):
        seen += c
        if seen / total >= percentile / 100.0:
            return min(float(edges[k + 1]), amax)
    return amax


def mse_threshold(counts, edges, amax, qmax: int = INT8_MAX) -> float:
    """argmin over upper bin edges T of: each value in a bin up to T adds (T / qmax)^2 / 12 (rounding
    noise), each value in a bin above adds (centre - T)^2 (clipping)."""
    centers = (edges[:-1] + edges[1:]) / 2
    n = counts.astype(np.float64)
    errors = []
    for k, t in enumerate(edges[1:]):
        inside, outside = n[: k + 1], n[k + 1:]
        errors.append(inside.sum() * (t / qmax) ** 2 / 12 + (outside * (centers[k + 1:] - t) ** 2).sum())
    return float(min(edges[1:][int(np.argmin(errors))], amax))


def tensorrt_kl(hist: np.ndarray, i: int, levels: int = INT8_MAX + 1) -> float:
    """KL(P || Q) at threshold bin i, TensorRT's entropy calibration (as in MXNet's and TVM's ports).

    P: hist[:i], the mass above folded into its last bin. Q: the *clipped* histogram hist[:i] (without
    the folded outliers) merged into `levels` groups, each group's mass spread evenly over the bins where
    P is non-zero. Groups as np.array_split cuts i bins (the first i % levels get one more bin).
    """
    hist = hist.astype(np.float64)
    sliced = hist[:i]
    p = sliced.copy()
    p[-1] += hist[i:].sum()
    q = np.zeros(i)
    base, extra = divmod(i, levels)
    start = 0
    for level in range(levels):
        size = base + (1 if level < extra else 0)
        nonzero = sum(1 for b in range(start, start + size) if p[b] > 0)
        for j in range(start, start + size):
            if p[j] > 0:
                q[j] = sliced[start:start + size].sum() / nonzero
        start += size
    if q.sum() == 0:  # every value above the threshold: Q has no mass where P has its last bin
        return float("inf")
    p, q = p / p.sum(), q / q.sum()
    m = p > 0
    if (q[m] == 0).any():
        return float("inf")
    return float((p[m] * np.log(p[m] / q[m])).sum())


def entropy_threshold(counts, edges, amax, stride: int = 16) -> float:
    """The candidate edge (every `stride` bins from 128) with the least KL divergence (the first on ties)."""
    candidates = list(range(INT8_MAX + 1, len(counts) + 1, stride))
    kls = [tensorrt_kl(counts, i) for i in candidates]
    return float(min(edges[candidates[int(np.argmin(kls))]], amax))


def threshold(x: np.ndarray, method: str, percentile: float = 99.99) -> float:
    counts, edges, amax = histogram(x)
    if method == "max":
        return amax
    if method == "percentile":
        return percentile_threshold(counts, edges, amax, percentile)
    if method == "mse":
        return mse_threshold(counts, edges, amax)
    if method == "entropy":
        return entropy_threshold(counts, edges, amax)
    raise ValueError(method)


def int8_scale(threshold_value: float) -> np.float32:
    """threshold / 127 as the float32 a QuantizeLinear scale holds."""
    return np.float32(threshold_value / INT8_MAX)


# -- Q -> DQ, SQNR -----------------------------------------------------------------------------------------------
def fq(x: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
    """Q -> DQ: rint(x / s) saturated to [-128, 127], times s (division in float32 like ONNX Runtime)."""
    s = np.asarray(scale, np.float32)
    if axis is not None and s.ndim:
        s = s.reshape([-1 if i == axis else 1 for i in range(x.ndim)])
    return np.clip(np.rint(x.astype(np.float32) / s), -128, 127).astype(np.float64) * s.astype(np.float64)


def sqnr_db(reference, test) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) over all the arrays given (lists are concatenated)."""
    if isinstance(reference, (list, tuple)):
        reference = np.concatenate([np.ravel(r) for r in reference])
        test = np.concatenate([np.ravel(t) for t in test])
    ref, got = np.asarray(reference, np.float64), np.asarray(test, np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


def layer_sqnr(rows, w_kn, act_scale, smooth=None) -> float:
    """SQNR of rows @ W against fq(rows / s) @ fq(s W), W as [K, N] with per-output-channel weight scales."""
    ws = w_kn if smooth is None else w_kn * smooth[:, None]
    xs = rows if smooth is None else rows / smooth
    w_scale = (np.abs(ws).max(axis=0) / INT8_MAX).astype(np.float32)
    y = rows.astype(np.float64) @ w_kn.astype(np.float64)
    return sqnr_db(y, fq(xs, act_scale) @ fq(ws, w_scale, axis=1))
