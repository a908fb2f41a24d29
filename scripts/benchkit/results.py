"""What a benchmark run collects: one ResultRow per (model, method), notes, and the extra sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ResultRow:
    """One (model, method) line of the results table."""

    model: str
    method: str
    family: str  # "fp32", "ours", "ort", "modelopt"
    precision: str = "int8"  # the quantized linears' format: "int8", "fp8" ("fp32" for the reference)
    high_precision: str = "fp32"  # the dtype of the unquantized rest
    sqnr_db: float | None = None
    sqnr_as_written_db: float | None = None  # real suite: ONNX Runtime's Q/DQ fusions off (measure.AS_WRITTEN)
    seconds: float | None = None
    runs: int | None = None  # quantizer runs behind `seconds` (fastest of them)
    peak_rss_mib: float | None = None
    size_bytes: int | None = None
    qdq_nodes: int | None = None
    weights_quantized: int | None = None
    weighted_linear: int | None = None
    float_weight_q: int | None = None  # QuantizeLinear nodes whose input is a float initializer
    trt: str = "-"  # "built", "parse failed", "build failed", "n/a (...)"
    trt_error: str | None = None  # first error line, then the cause line TensorRT logged, if any
    trt_cause: str | None = None
    trt_violations: int | None = None  # segquant_onnx.tensorrt.check.check_tensorrt findings
    trt_rules: dict | None = None  # rule -> count
    self_reported_sqnr: float | None = None
    int8_flop_fraction: float | None = None  # ours: report summary
    dualscale_extra_flop_pct: float | None = None
    dualscale_applied: int | None = None
    dualscale_candidates: int | None = None
    outlier_float_flop_pct: float | None = None
    fallback_sites: int | None = None
    error: str | None = None
    source: str | None = None  # segquant-onnx source fingerprint the run used (ours only)
    output: Path | None = None  # the quantized model (or the FP32 model for the reference)
    report: dict | None = field(default=None, repr=False)


@dataclass
class SkipNote:
    what: str
    why: str


@dataclass
class BenchState:
    rows: list[ResultRow] = field(default_factory=list)
    notes: list[SkipNote] = field(default_factory=list)
    per_layer: list[dict] = field(default_factory=list)  # one entry per model
    latency: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    section_seconds: dict = field(default_factory=dict)  # extra section -> seconds spent

    def row(self, model: str, method: str) -> ResultRow | None:
        return next((r for r in self.rows if r.model == model and r.method == method), None)


def ok(row: ResultRow | None) -> bool:
    """The row ran and has an output SQNR."""
    return row is not None and row.error is None and row.sqnr_db is not None
