"""GPTQ weight rounding (Frantar et al. 2023): round a weight to minimise the layer's output error, not the
weight's (pure numpy).

With H = X^T X over calibration rows of the layer's input, the output error of a rounded weight is
tr((W - Q)^T H (W - Q)). GPTQ quantizes the input channels (rows of W[K, N]) in order, and after each row it
moves that row's rounding error onto the rows not yet quantized, in proportion to the inverse Hessian:

    U = upper Cholesky factor of H^-1  (H^-1 = U^T U, H damped by `damp` x its mean diagonal)
    for k in 0..K-1:   q_k = fq(w_k);   e = (w_k - q_k) / U[k, k];   w_{k+1:} -= U[k, k+1:]^T e

(in blocks of BLOCK rows: the rows after a block are updated once per block, gptq_round).

The scales stay fixed: those `fit` chose (per output channel, or per block along K), so what is stored is
the scheme's grid and GPTQ only decides which grid point each weight takes ("static groups" in the paper).
H comes from the site's row sample over every calibration feed (Calibration.weight_samples, bounded per site:
analysis.decide.weight_sample_rows), which bounds the statistics GPTQ needs to K x K per site, computed one site at
a time.
"""

from __future__ import annotations

import numpy as np

from segquant_onnx.formats import QuantFormat

DAMP = 0.01  # the paper's: 1% of the mean diagonal keeps H invertible on few rows


def hessian(rows: np.ndarray) -> np.ndarray:
    """H = X^T X (float64) of activation rows [R, K]."""
    x = np.asarray(rows, np.float64)
    return x.T @ x


def gptq_round(w_kn: np.ndarray, scale_kn: np.ndarray, h: np.ndarray, fmt: QuantFormat,
               damp: float = DAMP) -> np.ndarray:
    """The weight [K, N] rounded by GPTQ onto the grid fmt gives with the per-element scales `scale_kn` [K, N]:
    its dequantized values (float64), so that fmt.quantize(result, scale) stores exactly that grid point."""
    w = np.array(w_kn, np.float64)
    k = w.shape[0]
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0  # an input channel that is always zero: its weight does not matter
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    q = np.empty_like(w)
    # the paper's lazy batch updates: the rows of a block of BLOCK are rounded one by one, each error moved onto
    # the block's later rows only; the rows after the block take all of the block's errors in one product. The same
    # updates, summed in another order: measured on the real terrain UNet (--weight-rounding gptq, 256 sites, K up
    # to 11520) gptq_round took 28.2 s of the run, 20.6 s of it updating every later row after each row
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = np.empty((end - start, w.shape[1]))
        for i in range(start, end):
            q[i] = fmt.fake_quant(w[i], scale_kn[i])
            errors[i - start] = (w[i] - q[i]) / u[i, i]
            w[i + 1:end] -= np.outer(u[i, i + 1:end], errors[i - start])
        w[end:] -= u[start:end, end:].T @ errors
    return q


BLOCK = 128  # the paper's


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)  # of each block's abs-max (AWQ's clip search)


def clip_scales(w_kn: np.ndarray, scale_kn: np.ndarray, rows: np.ndarray, fmt: QuantFormat, block: int,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> np.ndarray:
    """Block scales [K / block, N] with each block's clipping ratio chosen to minimise that block's share of the
    layer output error on `rows` [R, K]: ||X_b (W_b - fq(W_b, r s_b))||^2 per block b and output channel (AWQ's
    weight clip search, for a weight [K, N] scaled per output channel and block of `block` rows)."""
    w = np.asarray(w_kn, np.float64)
    x = np.asarray(rows, np.float64)
    best = np.array(scale_kn, np.float64)
    for b in range(best.shape[0]):
        sl = slice(b * block, (b + 1) * block)
        xb, wb = x[:, sl], w[sl]
        errs = []
        for r in ratios:
            s = best[b] * r
            errs.append((((xb @ (wb - fmt.fake_quant(wb, s, 1))) ** 2).sum(axis=0)))
        pick = np.argmin(np.stack(errs), axis=0)  # per output channel: the first ratio on ties (1.0 first)
        best[b] = best[b] * np.asarray(ratios)[pick]
    return best.astype(np.float32)
