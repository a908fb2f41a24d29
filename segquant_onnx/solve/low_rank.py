"""The low-rank split of a weight (SVDQuant): W = L1 @ L2 + R, with L1 @ L2 its rank-r truncated SVD (pure
numpy). The low-rank part stays in float; only the residual R is quantized. R's range is smaller than W's when a
few singular directions carry the weight's outliers, which is what smoothing concentrates in the weight."""

from __future__ import annotations

import numpy as np


def low_rank_split(w_kn: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(L1 [K, r], L2 [r, N], R [K, N]) of W [K, N]: L1 = U_r diag(S_r), L2 = V_r^T, R = W - L1 @ L2 (float64)."""
    w = np.asarray(w_kn, np.float64)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    l1, l2 = u[:, :rank] * s[:rank], vt[:rank]
    return l1, l2, w - l1 @ l2


def low_rank_flops(rank: int, k: int, n: int, site_flops: int) -> int:
    """FLOPs the two low-rank GEMMs add to a site of `site_flops` (2 M K N): 2 M r (K + N)."""
    return int(site_flops * rank * (k + n) / max(k * n, 1))
