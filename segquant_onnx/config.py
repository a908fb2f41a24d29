"""Quantization settings: a few frozen groups, one per stage or feature, validated on creation and passed
explicitly. Every default is written here once; the CLI reads its defaults and choices from these classes.

    QuantConfig(calibration=CalibrationConfig(method="mse"), dualscale=DualScaleConfig(mode="off"))
    QuantConfig(calibration={"method": "mse"}, dualscale={"mode": "off"})   # the same: a mapping per group

Modes are enums whose values are the CLI's words (a plain string is accepted and converted). A stage gets
the group it reads (`calibrate` the calibration group, `analyse` the fallback group, ...); the decision
stage (`analysis.decide`, `solve.choose`), where the auto choices of several features meet, gets the whole
config. Adding a setting: a field in its group (with its validation) and its flag in `cli/app.py`.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from enum import Enum

from segquant_onnx.errors import UserError
from segquant_onnx.formats import FORMATS, INT8, Scheme, int4_scheme, scheme_of


class _Mode(str, Enum):
    """A mode: equal to, and written (JSON, --help) as, its CLI word."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value, flag: str):
        try:
            return cls(value)
        except ValueError:
            raise UserError(f"{flag} '{value}' is unknown; use one of {', '.join(m.value for m in cls)}.") from None


class CalibMethod(_Mode):
    """Activation clipping threshold from calibration statistics."""

    MAX = "max"  # abs-max
    PERCENTILE = "percentile"  # the `percentile`-th percentile of |x|
    MSE = "mse"  # minimising the expected squared quantization error on the histogram
    ENTROPY = "entropy"  # minimising the KL divergence of the quantized histogram (TensorRT's)
    AUTO = "auto"  # per site, by layer error on calibration rows held back from the statistics


class DualScaleMode(_Mode):
    AUTO = "auto"  # where the measured gain pays (then checked at the model output)
    ALL = "all"  # every candidate with a negative part
    OFF = "off"


class SmoothQuantMode(_Mode):
    OFF = "off"
    AUTO = "auto"  # per site: an alpha of `alphas` or none, by layer error; then checked at the output
    FIXED = "fixed"  # `alpha` everywhere


class OutlierMode(_Mode):
    OFF = "off"
    AUTO = "auto"  # the cap from `candidates` at the model output, then each site's count
    FIXED = "fixed"  # up to `count` channels per site


class Precision(_Mode):
    """What the linear sites are quantized to (weights and activations)."""

    INT8 = "int8"  # W8A8 INT8
    FP8 = "fp8"  # W8A8 FP8 E4M3FN (opset 19)
    W4A16 = "w4a16"  # INT4 weights in blocks along K, activations in the graph's float type (opset 21)
    W4A8 = "w4a8"  # INT4 weight blocks, INT8 activations (TensorRT-RTX builds it; FP8 activations it refuses)


class WeightRounding(_Mode):
    """How weights are rounded onto their grid (the scales are fitted either way)."""

    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # GPTQ: each input channel's rounding error compensated by the next ones (solve/gptq.py)
    AUTO = "auto"  # per site, GPTQ where it lowers the layer output error on sampled rows it was not fitted on


class HighPrecision(_Mode):
    """The dtype of the graph's unquantized rest."""

    FP32 = "fp32"
    FP16 = "fp16"
    BF16 = "bf16"


class Preset(_Mode):
    """How much search a run spends (PRESETS: what each sets; explicit settings win)."""

    FAST = "fast"  # one calibration pass: no held-back trials
    BALANCED = "balanced"  # the defaults: DualScale checked at the output on a few held-back feeds
    BEST = "best"  # SmoothQuant and outlier searches, a fallback budget of 5% of the linear FLOPs


# preset -> the fields it sets, per group (`balanced` is QuantConfig's defaults). `best`: SmoothQuant and
# outlier channels chosen at the output, then the most sensitive sites in float until 40 dB or 5% of the
# linear FLOPs, the fallback run with and without smoothing (analysis.decide). Measured on the demo DiT
# (eval SQNR, time): 37.35 dB in 9.4 s against 28.09 dB in 1.9 s for balanced; the per-site calibration
# method on top added no more than 0.7 dB there at 3x the time, so it is not in it.
PRESETS: dict[str, dict[str, dict]] = {
    "fast": {"dualscale": {"mode": "off"}},
    "balanced": {},
    "best": {"smoothquant": {"mode": "auto"}, "outliers": {"mode": "auto"},
             "fallback": {"target_sqnr": 40.0, "max_fallback_pct": 5.0}},
}


# `best` at INT4 also clips weight blocks and rounds with GPTQ (measured on the demo DiT, W4A16: GPTQ 18.9 -> 25.2
# dB); at 8 bits weights stay round-to-nearest and unclipped (GPTQ +0.1 dB there, not worth the time). GPTQ
# everywhere, not `auto`: its per-site check on half the rows cost 0.2-0.4 dB there (24.96 vs 25.20 dB)
INT4_PRECISIONS = ("w4a16", "w4a8")

CALIB_METHODS = tuple(m.value for m in CalibMethod)
PRESET_NAMES = tuple(m.value for m in Preset)
PRECISIONS = tuple(m.value for m in Precision)
HIGH_PRECISIONS = tuple(m.value for m in HighPrecision)
WEIGHT_ROUNDINGS = tuple(m.value for m in WeightRounding)
DUALSCALE_MODES = tuple(m.value for m in DualScaleMode)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@dataclass(frozen=True)
class CalibrationConfig:
    """What calibration gathers and how thresholds are read from it.

    method / percentile: activation clipping (see CalibMethod). batch_size: calibration batch for models
    whose batch dimension is dynamic (None: the data's own, capped; see calib.data). sample_rows: rows of
    each searched activation kept (reservoir) to score per-site choices on; search_rows: how many of them
    the searches use (they run GEMMs in numpy). holdout_every: when a search runs, every k-th calibration
    feed is held back from the statistics and scores the choices at the model output (0: no hold-out);
    max_holdout_feeds: how many of those feeds are kept in memory.
    """

    method: CalibMethod = CalibMethod.MAX
    percentile: float = 99.99
    batch_size: int | None = None
    sample_rows: int = 1024
    search_rows: int = 256
    holdout_every: int = 4
    max_holdout_feeds: int = 8

    def __post_init__(self):
        object.__setattr__(self, "method", CalibMethod.parse(self.method, "--calib-method"))
        if not (_finite(self.percentile) and 50.0 < self.percentile <= 100.0):
            raise UserError(f"--percentile {self.percentile} is out of range; give a value in (50, 100].")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size} must be at least 1.")
        if self.sample_rows < 1:
            raise UserError(f"sample_rows {self.sample_rows} must be at least 1.")
        if self.search_rows < 1:
            raise UserError(f"search_rows {self.search_rows} must be at least 1.")
        if self.holdout_every < 0 or self.max_holdout_feeds < 1:
            raise UserError("holdout_every must be at least 0 and max_holdout_feeds at least 1.")


@dataclass(frozen=True)
class SegLinearConfig:
    """SegLinear patterns. output: linears whose output is cut by Split/Slices (AdaLN chunks); input:
    linears whose input is a Concat (FLUX single-block proj_out, timestep embedders); heads: heads merged
    by a Reshape before a linear (per-head input scales; H narrow GEMMs, so off by default).
    dry_rewrite: apply the structural rewrites but insert no Q/DQ (to check they are exact)."""

    output: bool = True
    input: bool = True
    heads: bool = False
    dry_rewrite: bool = False


@dataclass(frozen=True)
class DualScaleConfig:
    """SiLU/GELU -> linear sites quantized with one scale per polarity, as two GEMMs (see DualScaleMode).
    `auto` applies a site where the layer-output SQNR gain on the row sample reaches `min_gain_db`; with
    held-back feeds the DualScale sites must then raise the held-back output SQNR by `min_output_gain_db`
    over the best variant without them, or none is applied."""

    mode: DualScaleMode = DualScaleMode.AUTO
    min_gain_db: float = 1.0
    min_output_gain_db: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "mode", DualScaleMode.parse(self.mode, "--dualscale"))
        if not (_finite(self.min_gain_db) and self.min_gain_db >= 0.0):
            raise UserError(f"--dualscale-min-gain {self.min_gain_db} must be a gain of at least 0 dB.")
        if not (_finite(self.min_output_gain_db) and self.min_output_gain_db >= 0.0):
            raise UserError(f"min_output_gain_db {self.min_output_gain_db} must be at least 0 dB.")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant per MatMul/Gemm site (see SmoothQuantMode); `alpha` for `fixed`, `alphas` what `auto`
    compares (with no smoothing)."""

    mode: SmoothQuantMode = SmoothQuantMode.OFF
    alpha: float | None = None
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)

    def __post_init__(self):
        object.__setattr__(self, "mode", SmoothQuantMode.parse(self.mode, "--smoothquant"))
        if (self.mode is SmoothQuantMode.FIXED) != (self.alpha is not None):
            raise UserError("SmoothQuant's alpha is given with mode 'fixed' and only then (--smoothquant ALPHA).")
        if self.alpha is not None and not (_finite(self.alpha) and 0.0 <= self.alpha <= 1.0):
            raise UserError(f"--smoothquant '{self.alpha}' must be auto, off or an alpha in [0, 1].")
        if not self.alphas or not all(_finite(a) and 0.0 <= a <= 1.0 for a in self.alphas):
            raise UserError(f"SmoothQuant alphas {self.alphas} must be values in [0, 1].")

    @classmethod
    def from_flag(cls, text: str, **others) -> SmoothQuantConfig:
        """`--smoothquant auto|off|ALPHA`."""
        if text in ("auto", "off"):
            return cls(mode=text, **others)
        try:
            alpha = float(text)
        except ValueError:
            alpha = math.nan
        if not 0.0 <= alpha <= 1.0:
            raise UserError(f"--smoothquant '{text}' must be auto, off or an alpha in [0, 1].")
        return cls(mode=SmoothQuantMode.FIXED, alpha=alpha, **others)

    @property
    def flag(self) -> str:
        return f"{self.alpha:g}" if self.mode is SmoothQuantMode.FIXED else self.mode.value


@dataclass(frozen=True)
class OutlierConfig:
    """Outlier input channels run in float beside the INT8 GEMM (see OutlierMode). A channel is an outlier
    where its calibration abs-max exceeds `ratio` x the median channel's; `fixed` keeps up to `count` per
    MatMul/Gemm site, `auto` picks the cap from `candidates` by the output SQNR on held-back feeds and then
    each site's count (a site keeps the fewest channels whose held-back output SQNR is within
    `min_gain_db` of its best count's). The float branches take at most `max_flop_pct` percent of the
    linear FLOPs."""

    mode: OutlierMode = OutlierMode.OFF
    count: int = 0
    ratio: float = 8.0
    max_flop_pct: float = 2.0
    candidates: tuple[int, ...] = (0, 2, 4, 8, 16)
    min_gain_db: float = 0.05

    def __post_init__(self):
        object.__setattr__(self, "mode", OutlierMode.parse(self.mode, "--outlier-channels"))
        if self.mode is not OutlierMode.FIXED and self.count:
            raise UserError("An outlier channel count is given with mode 'fixed' only (--outlier-channels N).")
        if not isinstance(self.count, int) or self.count < 0:
            raise UserError(f"--outlier-channels '{self.count}' must be auto, off or a channel count.")
        if not (_finite(self.ratio) and self.ratio > 1.0):
            raise UserError(f"--outlier-ratio {self.ratio} must be greater than 1 (a multiple of the median "
                            "channel's abs-max).")
        if not (_finite(self.min_gain_db) and self.min_gain_db >= 0.0):
            raise UserError(f"--outlier-min-gain {self.min_gain_db} must be at least 0 dB.")
        if not (_finite(self.max_flop_pct) and 0.0 <= self.max_flop_pct <= 100.0):
            raise UserError(f"--outlier-flops {self.max_flop_pct} must be a percentage in [0, 100].")
        if not self.candidates or any(not isinstance(c, int) or c < 0 for c in self.candidates):
            raise UserError(f"outlier candidates {self.candidates} must be channel counts (0 or more).")

    @classmethod
    def from_flag(cls, text: str, **others) -> OutlierConfig:
        """`--outlier-channels auto|off|N`."""
        if text in ("auto", "off"):
            return cls(mode=text, **others)
        if not text.isdigit():
            raise UserError(f"--outlier-channels '{text}' must be auto, off or a channel count.")
        return cls(mode=OutlierMode.FIXED, count=int(text), **others)

    @property
    def flag(self) -> str:
        return str(self.count) if self.mode is OutlierMode.FIXED else self.mode.value

    @property
    def caps(self) -> tuple[int, ...]:
        """The global per-site caps a run compares."""
        return {OutlierMode.AUTO: self.candidates, OutlierMode.OFF: (0,)}.get(self.mode, (self.count,))


@dataclass(frozen=True)
class FallbackConfig:
    """Which sites stay in float. exclude: regular expressions on node names. sensitivity: rank sites by
    the model output SQNR with each quantized alone (held-back feeds). target_sqnr: keep the most sensitive
    sites in float until the held-back output SQNR reaches this many dB, spending at most
    `max_fallback_pct` percent of the linear FLOPs."""

    exclude: tuple[str, ...] = ()
    sensitivity: bool = False
    target_sqnr: float | None = None
    max_fallback_pct: float = 10.0

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude))
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise UserError(f"--exclude '{pattern}' is not a valid regular expression ({exc}).") from None
        if self.target_sqnr is not None and not (_finite(self.target_sqnr) and self.target_sqnr > 0.0):
            raise UserError(f"--target-sqnr {self.target_sqnr} must be a positive number of dB (e.g. 40).")
        if not (_finite(self.max_fallback_pct) and 0.0 <= self.max_fallback_pct <= 100.0):
            raise UserError(f"--max-fallback {self.max_fallback_pct} must be a percentage in [0, 100].")

    @property
    def ranks(self) -> bool:
        """Whether the run ranks sites at the model output (sensitivity or a target)."""
        return self.sensitivity or self.target_sqnr is not None


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how the run executes and what it reports. providers: ONNX Runtime execution providers
    for calibration and evaluation. per_layer: also measure each linear layer's output error against the
    float graph (report). allow_unquantized: write the model even when no linear site can be quantized
    (otherwise an error: an "output" identical to the input is rarely what the user wanted). workers:
    calibration runs in this many local worker processes, each with its own session (1: in this process);
    ray_address: on a Ray cluster instead ("local" starts one here, "auto" or host:port joins one), one
    worker per `workers`. Either way the output is byte-identical to one process's (calib.workers)."""

    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    per_layer: bool = False
    allow_unquantized: bool = False
    workers: int = 1
    ray_address: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "providers", tuple(self.providers))
        if not self.providers:
            raise UserError("--providers is empty; name at least one ONNX Runtime execution provider.")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"--workers {self.workers} must be a whole number of at least 1.")
        if self.ray_address is not None and (not isinstance(self.ray_address, str) or not self.ray_address.strip()):
            raise UserError("--ray-address is empty; give 'local', 'auto' or the cluster's host:port.")
        if self.ray_address is not None and importlib.util.find_spec("ray") is None:  # found, not imported
            raise UserError('--ray-address needs Ray, which is not installed; pip install "segquant-onnx[ray]".')


@dataclass(frozen=True)
class PrecisionConfig:
    """format: what the linear sites are quantized to (see Precision). high_precision: the dtype the rest
    of the graph is written in (an fp32 model's rest converted where calibrated ranges allow). block_size:
    INT4 weights' input channels per scale. weight_rounding: round to nearest or GPTQ (WeightRounding).
    low_rank: the rank of the float branch each MatMul/Gemm weight keeps (SVDQuant; 0: none; auto: per site,
    solve.fit.auto_rank). weight_clip:
    clip each weight block's scale where that lowers the layer output error on sampled rows (AWQ's clip search).
    quantize_attention: per-tensor Q/DQ on both inputs of the attention products (Q @ K^T, softmax @ V),
    the placement TensorRT's fused MHA kernels take (passes/quantize_attention.py)."""

    format: Precision = Precision.INT8
    high_precision: HighPrecision = HighPrecision.FP16
    quantize_attention: bool = False
    block_size: int = 128
    weight_rounding: WeightRounding = WeightRounding.RTN
    low_rank: int | str = 0  # or "auto"
    weight_clip: bool = False

    def __post_init__(self):
        object.__setattr__(self, "format", Precision.parse(self.format, "--precision"))
        object.__setattr__(self, "weight_rounding", WeightRounding.parse(self.weight_rounding, "--weight-rounding"))
        object.__setattr__(self, "high_precision", HighPrecision.parse(self.high_precision, "--high-precision"))
        # TensorRT's INT4 block sizes are powers of two; 16 is the smallest its kernels take
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 16 \
                or self.block_size & (self.block_size - 1):
            raise UserError(f"--block-size {self.block_size} must be a power of two of at least 16 (e.g. 128).")
        if self.low_rank != "auto" and (isinstance(self.low_rank, bool) or not isinstance(self.low_rank, int)
                                        or self.low_rank < 0):
            raise UserError(f"--low-rank {self.low_rank} must be a rank: 0 (off), a positive integer such as 32, "
                            "or auto.")
        if self.format is Precision.W4A16 and self.quantize_attention:
            raise UserError("--quantize-attention quantizes activations, which --precision w4a16 keeps in float; "
                            "drop one of them (w4a8 quantizes activations).")

    @property
    def quant_format(self) -> Scheme:
        """What the linear sites are quantized to: weight and activation formats."""
        if self.format is Precision.W4A16:
            return int4_scheme(None, self.block_size)
        if self.format is Precision.W4A8:
            return int4_scheme(INT8, self.block_size)
        return scheme_of(FORMATS[self.format.value])


GROUPS = {"precision": PrecisionConfig, "calibration": CalibrationConfig, "seglinear": SegLinearConfig,
          "dualscale": DualScaleConfig, "smoothquant": SmoothQuantConfig, "outliers": OutlierConfig,
          "fallback": FallbackConfig, "runtime": RuntimeConfig}


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: one frozen group per stage or feature (each given as its class or a mapping of its
    fields)."""

    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    seglinear: SegLinearConfig = field(default_factory=SegLinearConfig)
    dualscale: DualScaleConfig = field(default_factory=DualScaleConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)
    outliers: OutlierConfig = field(default_factory=OutlierConfig)
    fallback: FallbackConfig = field(default_factory=FallbackConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)

    def __post_init__(self):
        for name, cls in GROUPS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                unknown = sorted(set(value) - {f.name for f in fields(cls)})
                if unknown:
                    raise UserError(f"QuantConfig.{name} has no setting '{unknown[0]}'; it has "
                                    f"{', '.join(f.name for f in fields(cls))}.")
                object.__setattr__(self, name, cls(**value))
            elif not isinstance(value, cls):
                raise UserError(f"QuantConfig.{name} must be a {cls.__name__} or a mapping of its fields, "
                                f"not {type(value).__name__}.")
        if self.precision.format is Precision.FP8 and self.calibration.method is CalibMethod.ENTROPY:
            raise UserError("--calib-method entropy is defined on INT8's uniform levels; with --precision fp8 use "
                            "max, percentile, mse or auto.")
        searches = self.fallback.ranks or self.outliers.mode is OutlierMode.AUTO
        if searches and self.calibration.holdout_every < 2:
            raise UserError("holdout_every must be at least 2 for sensitivity, --target-sqnr or "
                            "--outlier-channels auto (they score on held-back calibration feeds).")

    def as_dict(self) -> dict:
        """Plain data (modes as their words, tuples as lists): what reports and JSON hold."""
        def plain(v):
            return v.value if isinstance(v, Enum) else [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
        return {g: {k: plain(v) for k, v in asdict(getattr(self, g)).items()} for g in GROUPS}

    @classmethod
    def preset(cls, name: str | Preset, **groups) -> QuantConfig:
        """The preset's settings (PRESETS) with `groups` on top: a field given here wins over the preset's.
        `QuantConfig.preset("best", fallback={"target_sqnr": 45})`."""
        preset = PRESETS[Preset.parse(name, "--preset").value]
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise UserError(f"QuantConfig has no group '{unknown[0]}'; it has {', '.join(GROUPS)}.")
        merged = {g: dict(preset.get(g, {})) for g in GROUPS}
        for g, value in groups.items():
            if isinstance(value, Mapping):
                merged[g].update(value)
            else:  # a group object: every field of it is given
                merged[g] = value
        precision = merged["precision"]
        if name == Preset.BEST and isinstance(precision, dict) and str(precision.get("format")) in INT4_PRECISIONS:
            precision.setdefault("weight_rounding", WeightRounding.GPTQ)
            precision.setdefault("weight_clip", True)
        return cls(**merged)

    def updated(self, **groups) -> QuantConfig:
        """A copy with some fields of some groups changed: `config.updated(dualscale={"mode": "off"})`."""
        unknown = sorted(set(groups) - set(GROUPS))
        if unknown:
            raise UserError(f"QuantConfig has no group '{unknown[0]}'; it has {', '.join(GROUPS)}.")
        return replace(self, **{g: replace(getattr(self, g), **changes) for g, changes in groups.items()})
