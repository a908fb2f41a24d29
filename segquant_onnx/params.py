"""Quantization parameters: what solve produces and the rewrite passes consume (pure data, no graph).

Between solve and the passes so that neither imports the other: the passes read these types,
solve fills them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from segquant_onnx.formats import INT8, QuantFormat, Scheme


@dataclass(frozen=True)
class SiteParams:
    """Scales of one linear site: activation per tensor, weight per output channel.

    With SmoothQuant, `smooth` is the per-input-channel vector s (the activation is divided by it and
    the weight multiplied), `act_amax` is of X / s and `weight_scale` of s * W. `layer_sqnr_db` is the
    layer output SQNR of the chosen configuration on the row sample (None without a sample). `rounded`: the
    weight (s * W, the site's layout) already on its grid when it is not rounded to nearest (GPTQ), else None.
    With a low-rank branch, `low_rank` holds its factors and the weight quantized (scales, `rounded`) is the
    residual R = s * W - L1 @ L2.
    """

    act_amax: float
    act_scale: float
    weight_scale: np.ndarray
    method: str
    smooth: np.ndarray | None = None
    alpha: float | None = None
    layer_sqnr_db: float | None = None
    rounded: np.ndarray | None = None
    low_rank: tuple[np.ndarray, np.ndarray] | None = None  # (L1 [K, r], L2 [r, N]): s * W = L1 @ L2 + R


@dataclass(frozen=True)
class DualParams:
    """Scales of one dual site: one per polarity of the activation, weight per output channel."""

    pos_scale: float
    neg_scale: float
    weight_scale: np.ndarray
    rounded: np.ndarray | None = None  # as SiteParams.rounded (both branches read the same weight)

    def __post_init__(self):
        for name in ("pos_scale", "neg_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"DualParams.{name} must be finite and > 0, got {value}")
        ws = np.asarray(self.weight_scale)
        if ws.ndim not in (1, 2) or not (np.isfinite(ws).all() and (ws > 0).all()):
            raise ValueError("DualParams.weight_scale must be finite positive scales, per channel (1-D) or per "
                             "block (2-D)")


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


@dataclass
class Quantization:
    """Everything solve decided: scales, DualScale sites, outlier channels, sites left in float, and the
    number formats the scales are for (a QuantFormat: weights and activations in it; or a Scheme: what the
    passes store weights in and write activation Q/DQ in, none for weight-only)."""

    params: dict[str, SiteParams]
    dual: dict
    outliers: dict[str, np.ndarray]
    decisions: list = field(default_factory=list)  # DualScale decisions, for the report
    floating: frozenset = frozenset()
    format: QuantFormat | Scheme = INT8
    attention: dict = field(default_factory=dict)  # attention product -> (scale of input a, of input b)
