"""The report of a quantize run, built from what the run produced (an Outcome) as one JSON-ready dict.

Keys (REPORT_KEYS, in this order): `tool`, `input`, `output`, `config` (the settings as run),
`calibration_data`, `eval_data`, `sites` (one row per linear site: scales, method, alpha, layer SQNR,
or `float`), `declined`, `segments`, `dualscale` (every candidate's gain and whether it runs as two
GEMMs), `heldback_trials` (the global choices scored at the output), `attention` (the quantized attention
products' input scales), `high_precision` (the rest's conversion: nodes converted, kept float32 and why),
`outliers` (`sites`, `per_site_search`, `ranges`, `float_flop_pct`), `sensitivity`,
`fallback`, `summary` (SUMMARY_KEYS), `output_error`, `layer_error`, `tensorrt_check`, `seconds` (the
run's wall time before saving), `stage_seconds` (wall time per stage the run went through: load and plan,
calibrate, decide, fit and rewrite, high precision, finalize and check, evaluate).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segquant_onnx.version import __version__
from segquant_onnx.config import QuantConfig
from segquant_onnx.ir.linear import input_channels
from segquant_onnx.params import Quantization
from segquant_onnx.plan import QuantPlan
from segquant_onnx.report.render import site_rows

if TYPE_CHECKING:
    from segquant_onnx.analysis.decide import Decision
    from segquant_onnx.calib.observers import Stats

REPORT_KEYS = ("tool", "input", "output", "config", "calibration_data", "eval_data", "sites", "declined", "segments",
               "dualscale", "heldback_trials", "attention", "high_precision", "outliers", "sensitivity", "fallback", "summary",
               "output_error", "layer_error", "tensorrt_check", "seconds", "stage_seconds")
SUMMARY_KEYS = ("sites_quantized", "segment_rewrites", "dualscale_candidates", "dualscale_applied",
                "dualscale_extra_flop_pct", "outlier_sites", "outlier_channels", "sites_declined",
                "int8_flop_fraction", "size_before", "size_after", "weight_bytes", "low_rank_sites",
                "low_rank_extra_flop_pct")


@dataclass(frozen=True)
class Outcome:
    """What a quantize run produced, as the report reads it. `decision` and `stats` (the statistics of
    every calibration feed) are None when nothing was calibrated (`dry_rewrite`)."""

    config: QuantConfig
    plan: QuantPlan
    quantization: Quantization
    calibration_data: str
    size_before: int
    size_after: int
    seconds: float
    input: Path | None = None
    output: Any = None
    eval_data: str | None = None
    decision: Decision | None = None
    stats: Stats | None = None
    output_error: dict = field(default_factory=dict)  # output name -> OutputError
    layer_error: dict = field(default_factory=dict)  # layer name -> OutputError
    tensorrt_check: list = field(default_factory=list)  # tensorrt.check violations
    rest: Any = None  # ir.rest_precision.RestReport when the rest was converted (--high-precision)
    stage_seconds: dict = field(default_factory=dict)  # pipeline stage -> wall time (s)
    weight_bytes: tuple[int, int] = (0, 0)  # the linear sites' weights before and after (stored, with scales)


def _outliers(outcome: Outcome) -> dict:
    plan, q = outcome.plan, outcome.quantization
    by_name = {site.name: site for site in plan.sites}
    ranges = {}
    for name, idx in q.outliers.items():
        amax = outcome.stats[by_name[name].activation].channel_amax
        keep = np.ones(amax.size, bool)
        keep[idx] = False
        ranges[name] = {"channel_amax": [round(float(a), 6) for a in amax[idx]],
                        "bulk_amax": round(float(amax[keep].max(initial=0)), 6)}
    search = outcome.decision.per_site_search if outcome.decision else None
    float_flops = sum(by_name[n].flops * len(i) / input_channels(by_name[n]) for n, i in q.outliers.items())
    return {"sites": {name: idx.tolist() for name, idx in q.outliers.items()},
            "per_site_search": search.trials if search else [],
            "ranges": ranges,
            "float_flop_pct": round(100 * float_flops / max(plan.total_flops, 1), 3)}


def _summary(outcome: Outcome, fallback, rows: list[dict]) -> dict:
    plan, q, dry = outcome.plan, outcome.quantization, outcome.config.seglinear.dry_rewrite
    flops = {site.name: site.flops for site in plan.sites}
    return {
        "sites_quantized": 0 if dry else len(plan.sites) - len(fallback.sites if fallback else ()),
        "segment_rewrites": len(plan.segments),
        "dualscale_candidates": len(plan.dual),
        "dualscale_applied": len(q.dual),
        "dualscale_extra_flop_pct": round(100 * sum(flops[n] for n in q.dual) / max(plan.total_flops, 1), 3),
        "outlier_sites": len(q.outliers),
        "outlier_channels": int(sum(len(i) for i in q.outliers.values())),
        "sites_declined": len(plan.declined),
        "int8_flop_fraction": (0.0 if not plan.sites or dry else fallback.int8_flop_fraction if fallback else 1.0),
        "size_before": outcome.size_before,
        "size_after": outcome.size_after,
        "weight_bytes": {"before": outcome.weight_bytes[0], "after": outcome.weight_bytes[1]},
        "low_rank_sites": sum(1 for r in rows if "low_rank" in r),
        "low_rank_extra_flop_pct": round(100 * sum(r.get("low_rank_flops", 0) for r in rows)
                                         / max(plan.total_flops, 1), 3),
    }


def _as_run(config: QuantConfig, decision) -> dict:
    """The settings as run: SmoothQuant and DualScale as the decision ran them (auto without held-back feeds
    leaves SmoothQuant off)."""
    if decision is not None:
        s = decision.settings
        config = config.updated(smoothquant={"mode": s.smoothquant, "alpha": s.alpha}, dualscale={"mode": s.dualscale})
    return config.as_dict()


def build_report(outcome: Outcome) -> dict:
    """The report dict (REPORT_KEYS); strict-JSON writing and Markdown are report.render's."""
    plan, q, decision = outcome.plan, outcome.quantization, outcome.decision
    fallback = decision.fallback if decision else None
    rows = site_rows(plan, q.params, q.floating)
    return {
        "tool": f"segquant-onnx {__version__}",
        "input": str(outcome.input) if outcome.input else None,
        "output": str(outcome.output) if outcome.output is not None else None,
        "config": _as_run(outcome.config, decision),
        "calibration_data": outcome.calibration_data,
        "eval_data": outcome.eval_data,
        "sites": rows,
        "declined": [asdict(d) for d in plan.declined],
        "segments": [asdict(m) for m in plan.segments],
        "dualscale": [{**asdict(d), "apply": d.site in q.dual} for d in q.decisions],
        "heldback_trials": decision.trials if decision else [],
        "attention": {name: list(scales) for name, scales in q.attention.items()},
        "high_precision": outcome.rest.to_dict() if outcome.rest is not None else None,
        "outliers": _outliers(outcome),
        "sensitivity": [asdict(r) for r in decision.sensitivity] if decision else [],
        "fallback": asdict(fallback) if fallback else None,
        "summary": _summary(outcome, fallback, rows),
        "output_error": {name: e.to_dict() for name, e in outcome.output_error.items()},
        "layer_error": [{"layer": name, **e.to_dict()} for name, e in outcome.layer_error.items()],
        "tensorrt_check": [asdict(v) for v in outcome.tensorrt_check],
        "seconds": outcome.seconds,
        "stage_seconds": dict(outcome.stage_seconds),
    }
