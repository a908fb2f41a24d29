"""Quantization settings: one frozen dataclass, validated on creation, passed explicitly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from segquant_onnx.errors import UserError

CALIB_METHODS = ("max", "percentile", "mse", "entropy", "auto")
DUALSCALE_MODES = ("auto", "all", "off")


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize.

    calib_method: activation clipping threshold from calibration statistics: `max` (abs-max),
        `percentile` (the `percentile`-th percentile of |x|), `mse` (threshold minimising expected
        squared quantization error on the histogram).
    exclude: regular expressions; linear sites whose node name matches one stay in float.
    providers: ONNX Runtime execution providers for calibration and evaluation.
    batch_size: calibration batch for models whose batch dimension is dynamic.
    seg_output / seg_input: SegLinear on linears whose output is cut by Split/Slices (AdaLN chunks)
        and whose input is a Concat (FLUX single-block proj_out, timestep embedders).
    seg_heads: SegLinear on heads merged by a Reshape before a linear (per-head input scales; H narrow
        GEMMs, so off by default).
    dry_rewrite: apply the structural rewrites but insert no Q/DQ (to check they are exact).
    dualscale: SiLU/GELU -> linear sites quantized with one scale per polarity as two GEMMs:
        `all` candidates, `off`, or `auto`: where the layer-output SQNR gain measured on a sample of
        calibration rows reaches `dualscale_min_gain_db` (the second GEMM costs compute).
        With held-back feeds, `auto` is then checked at the model output: the DualScale sites must
        raise the held-back output SQNR by `dualscale_min_output_gain_db` over the best variant
        without them, or none is applied.
    sample_rows: rows of each DualScale candidate's input kept (reservoir) for that measurement.
    per_layer: also measure each linear layer's output error against the float graph (report).
    smoothquant: `auto` searches, per MatMul/Gemm site, alpha in `smooth_alphas` or no smoothing by
        the layer output SQNR on the row sample; `off`; or a fixed alpha such as "0.5".
    search_rows: rows of the sample used by those searches (they run GEMMs in numpy).
    holdout_every: when a search runs, every k-th calibration feed is held back from the statistics
        and used to score the search (0: score on the calibration rows themselves).
    sensitivity: rank sites by the model output SQNR with each quantized alone (held-back feeds).
    target_sqnr: keep the most sensitive sites in float until the output SQNR on the held-back feeds
        reaches this many dB, spending at most `max_fallback_pct` percent of the linear FLOPs.
    max_holdout_feeds: held-back feeds kept in memory for those model-output searches.
    outlier_channels: `off`; `N`: up to N input channels per MatMul/Gemm site whose calibration
        abs-max exceeds `outlier_ratio` x the median channel's run in float beside the INT8 GEMM;
        `auto`: N picked from `outlier_candidates` by the output SQNR on held-back feeds. The float
        branches may take at most `outlier_max_flop_pct` percent of the linear FLOPs. After the
        global cap, `auto` chooses each site's count at the model output (outlier_search): a site
        keeps the fewest channels whose held-back output SQNR is within `outlier_min_gain_db` of
        its best count's.
    allow_unquantized: write the model even when no linear site can be quantized (otherwise that is
        an error: an "output" identical to the input is rarely what the user wanted).
    """

    calib_method: str = "max"
    percentile: float = 99.99
    exclude: tuple[str, ...] = ()
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    batch_size: int | None = None
    seg_output: bool = True
    seg_input: bool = True
    seg_heads: bool = False
    dry_rewrite: bool = False
    dualscale: str = "auto"
    dualscale_min_gain_db: float = 1.0
    dualscale_min_output_gain_db: float = 0.1
    sample_rows: int = 1024
    per_layer: bool = False
    smoothquant: str = "off"
    smooth_alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    search_rows: int = 256
    holdout_every: int = 4
    sensitivity: bool = False
    target_sqnr: float | None = None
    max_fallback_pct: float = 10.0
    max_holdout_feeds: int = 8
    outlier_channels: str = "off"
    outlier_ratio: float = 8.0
    outlier_max_flop_pct: float = 2.0
    outlier_candidates: tuple[int, ...] = (0, 2, 4, 8, 16)
    outlier_min_gain_db: float = 0.05
    allow_unquantized: bool = False

    def __post_init__(self):
        if self.calib_method not in CALIB_METHODS:
            raise UserError(f"--calib-method '{self.calib_method}' is unknown; use one of {', '.join(CALIB_METHODS)}.")
        if not 50.0 < self.percentile <= 100.0:
            raise UserError(f"--percentile {self.percentile} is out of range; give a value in (50, 100].")
        if self.dualscale not in DUALSCALE_MODES:
            raise UserError(f"--dualscale '{self.dualscale}' is unknown; use one of {', '.join(DUALSCALE_MODES)}.")
        if self.smoothquant not in ("auto", "off"):
            try:
                alpha = float(self.smoothquant)
            except ValueError:
                alpha = -1.0
            if not 0.0 <= alpha <= 1.0:
                raise UserError(f"--smoothquant '{self.smoothquant}' must be auto, off or an alpha in [0, 1].")
        if self.outlier_channels not in ("off", "auto") and not (
                self.outlier_channels.isdigit() and int(self.outlier_channels) >= 0):
            raise UserError(f"--outlier-channels '{self.outlier_channels}' must be auto, off or a channel count.")
        if not 1.0 < self.outlier_ratio < float("inf"):
            raise UserError(f"--outlier-ratio {self.outlier_ratio} must be greater than 1 (a multiple of the median "
                            "channel's abs-max).")
        if not 0.0 <= self.outlier_min_gain_db < float("inf"):
            raise UserError(f"--outlier-min-gain {self.outlier_min_gain_db} must be at least 0 dB.")
        if not 0.0 <= self.outlier_max_flop_pct <= 100.0:
            raise UserError(f"--outlier-flops {self.outlier_max_flop_pct} must be a percentage in [0, 100].")
        if not 0.0 <= self.dualscale_min_gain_db < float("inf"):
            raise UserError(f"--dualscale-min-gain {self.dualscale_min_gain_db} must be a gain of at least 0 dB.")
        if self.target_sqnr is not None and not 0.0 < self.target_sqnr < float("inf"):
            raise UserError(f"--target-sqnr {self.target_sqnr} must be a positive number of dB (e.g. 40).")
        if not 0.0 <= self.max_fallback_pct <= 100.0:
            raise UserError(f"--max-fallback {self.max_fallback_pct} must be a percentage in [0, 100].")
        if self.holdout_every < 2 and (self.sensitivity or self.target_sqnr is not None
                                       or self.outlier_channels == "auto"):
            raise UserError("holdout_every must be at least 2 for sensitivity or --target-sqnr.")
        if self.sample_rows < 1:
            raise UserError(f"sample_rows {self.sample_rows} must be at least 1.")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"--exclude '{pattern}' is not a valid regular expression ({exc}).") from None
