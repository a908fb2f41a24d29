"""The pipeline: load -> canonicalize -> plan -> calibrate -> choose -> fit -> rewrite -> finalize -> evaluate
-> save + report, one call per stage."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.analysis.decide import decide, search_space
from segquant_onnx.analysis.held_back import Sessions
from segquant_onnx.analysis.layer_error import model_error
from segquant_onnx.calib.calibrate import calibrate, observe_ranges, rest_feeds
from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.config import DualScaleMode, QuantConfig
from segquant_onnx.errors import UserError
from segquant_onnx.ir.canonicalize import HALF_OPSET, canonicalize
from segquant_onnx.ir.finalize import finalize
from segquant_onnx.ir.graph_io import (EXTERNAL_DATA_THRESHOLD, constant_values, export_model, gs_quiet, model_size,
                                       open_source, save_model, weight_bytes)
from segquant_onnx.ir.outputs import check_outputs, markdown_path, model_output, report_output
from segquant_onnx.ir.rest_precision import (RestReport, convert_rest, float32_tensors, weights_float_type,
                                             why_rest_stays)
from segquant_onnx.ir.runtime import check_providers, temporary_directory
from segquant_onnx.ir.weights import WeightStore, load_spilled
from segquant_onnx.params import Quantization, SiteParams
from segquant_onnx.passes import detect_all
from segquant_onnx.plan import QuantPlan
from segquant_onnx.report.build import Outcome, build_report
from segquant_onnx.report.render import write_json, write_markdown
from segquant_onnx.rewrite import apply_quantization
from segquant_onnx.solve.fit import fit
from segquant_onnx.tensorrt.check import check_tensorrt

log = logging.getLogger(__name__)


class _Stages:
    """Wall time per pipeline stage: the report's `stage_seconds`, and a log line each (-v)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = round(now - self._last, 3)
        self._last = now
        log.info("%s: %.2f s", stage, self.seconds[stage])


@dataclass
class Result:
    model: onnx.ModelProto
    plan: QuantPlan
    params: dict[str, SiteParams]
    report: dict
    output_path: Path | None


def build_plan(graph: gs.Graph, config: QuantConfig) -> QuantPlan:
    """The passes' plan (passes.detect_all: mutates `graph` by SegLinear's exact split). Weight-only schemes
    (W4A16) have no DualScale candidates: the activations are not quantized."""
    seg, scheme = config.seglinear, config.precision.quant_format
    return detect_all(graph, seg_output=seg.output, seg_input=seg.input, seg_heads=seg.heads,
                      exclude=config.fallback.exclude,
                      dualscale=config.dualscale.mode is not DualScaleMode.OFF and scheme.activations is not None,
                      attention=config.precision.quantize_attention, block_size=scheme.weights.block_size,
                      flatten=scheme.blocked and scheme.activations is not None)


def _site_weight_bytes(graph: gs.Graph, plan: QuantPlan) -> int:
    """Bytes of the float weights of the linear sites (read from their shapes and types, not their values)."""
    tensors = graph.tensors()
    total = 0
    for site in plan.sites:
        dtype = tensors[site.weight].dtype
        size = 2 if isinstance(dtype, int) else np.dtype(dtype).itemsize  # an ONNX type number: bfloat16
        total += size * int(np.prod(site.weight_shape, dtype=np.int64))
    return total


def inspect_model(model, config: QuantConfig = QuantConfig()) -> QuantPlan:
    src = open_source(model)
    with gs_quiet():
        return build_plan(canonicalize(src.graph, src.description, config.precision.quant_format.min_opset), config)


def quantize(model, calib, config: QuantConfig = QuantConfig(), *, output=None, force: bool = False,
             eval_data=None, report_path=None, progress: bool = True, evaluate: bool = True) -> Result:
    """Quantize `model` (path or ModelProto) with calibration data `calib` (see calib_data).

    Writes `output` (atomically) when given. Output error is measured against the floating-point
    graph on `eval_data`, or on the calibration data when it can be read twice; `evaluate=False`
    skips that measurement (no float and quantized evaluation sessions: less time and memory).
    onnx-graphsurgeon's warnings (hundreds on a bfloat16 model) show only with -v.
    """
    with gs_quiet():
        return _quantize(model, calib, config, output, force, eval_data, report_path, progress, evaluate)


def _quantize(model, calib, config: QuantConfig, output, force: bool, eval_data, report_path, progress: bool,
              evaluate: bool) -> Result:
    started, stages = time.perf_counter(), _Stages()
    providers = check_providers(config.runtime.providers)
    src = open_source(model)
    check_outputs([o for o in (output and model_output(output), report_path and report_output(report_path)) if o],
                  [*src.files, *(p for p in (calib, eval_data) if isinstance(p, (str, os.PathLike)))], force)
    if not evaluate and (eval_data is not None or config.runtime.per_layer):
        raise UserError("--no-eval skips the output-error measurement: drop --eval/--per-layer/--plot, or --no-eval.")

    fmt, rest_dtype = config.precision.quant_format, config.precision.high_precision.value
    graph = canonicalize(src.graph, src.description, fmt.min_opset,
                         wanted_opset=HALF_OPSET if rest_dtype != "fp32" else None)
    rest_stays = rest_dtype != "fp32" and why_rest_stays(graph, weights_float_type(graph))
    fp_model = export_model(graph)  # the reference: canonical, before any rewrite
    plan = build_plan(graph, config)
    dry = config.seglinear.dry_rewrite
    if not plan.sites and not dry and not config.runtime.allow_unquantized:
        raise UserError(plan.nothing_to_quantize(src.description))
    inputs = model_inputs(graph)
    weights_before = _site_weight_bytes(graph, plan)
    batch = config.calibration.batch_size
    data = open_calibration(calib, inputs, batch)
    evaluation = None if eval_data is None else open_calibration(eval_data, inputs, batch, role="eval")
    if evaluation is None and data.num_feeds is not None and evaluate:
        evaluation = data
    stages.done("load and plan")

    with temporary_directory() as tmp:
        store = WeightStore(src.source_dir, tmp, src.files[1:] if src.uses_external_data else ())
        store.spill(graph)  # SegLinear's segment weights: on disk, read by the sessions from there
        sessions = Sessions(store, providers, config.runtime.workers, config.runtime.ray_address)
        cal, decision, q, rest = None, None, Quantization({}, {}, {}), None
        if not dry:
            space = search_space(plan, config)
            cal = calibrate(graph, plan.observed_tensors, data, source_dir=store, providers=providers,
                            tmp_dir=tmp, progress=progress, workers=config.runtime.workers,
                            ray_address=config.runtime.ray_address, **space.calibration(plan, config.calibration))
            stages.done("calibrate")
            weights = {t.name: t for t in graph.tensors().values() if isinstance(t, gs.Constant)}
            weight = lambda name: np.asarray(constant_values(weights[name]), np.float32)  # noqa: E731
            weight_scales: dict = {}  # fit's memo: each weight's scales computed once a run (solve.fit)
            try:
                decision = decide(graph, fp_model, plan, cal, weight, config, space, sessions, progress, weight_scales)
            finally:
                sessions.close()  # the searches' workers, if any
            stages.done("decide")
            q = fit(plan, decision.recipe, cal.stats, weight, percentile=config.calibration.percentile,
                    fmt=fmt, progress=progress, samples=cal.weight_samples,
                    rounding=config.precision.weight_rounding.value,
                    low_rank=config.precision.low_rank, clip=config.precision.weight_clip, weight_scales=weight_scales)
            apply_quantization(graph, plan, q, store.stored)
            store.spill(graph)  # the quantized weights (those the scored candidates stored already are reused)
            stages.done("fit and rewrite")
            if rest_stays:
                rest = RestReport(rest_dtype, 0, skipped=rest_stays)
            elif rest_dtype != "fp32":
                ranges = {} if rest_dtype == "bf16" else observe_ranges(
                    export_model(graph), float32_tensors(graph), rest_feeds(data, cal), source_dir=store,
                    providers=providers, tmp_dir=tmp)
                rest = convert_rest(graph, rest_dtype, ranges)
                store.spill(graph)  # the rest's 16-bit weights
                stages.done("high precision")
        quantized = finalize(graph, calibration_shapes=None if cal is None else cal.feed_shapes)
        trt_violations = check_tensorrt(quantized, store.locate)
        stages.done("finalize and check")
        errors, layers = model_error(fp_model, quantized, evaluation, per_layer=config.runtime.per_layer,
                                     source_dir=store, providers=providers, tmp_dir=tmp, progress=progress)
        if evaluation is not None:
            stages.done("evaluate")

        floating = tuple(s.weight for s in plan.sites if s.name in q.floating or dry) + tuple(
            f"{name}/low_rank_{part}_weight" for name, p in q.params.items() if p.low_rank is not None
            for part in ("l1", "l2"))  # the float branches' factors (passes/add_low_rank_branch.py names them)
        report = build_report(Outcome(
            config, plan, q, data.description, src.size, model_size(quantized),
            round(time.perf_counter() - started, 2), input=src.path, output=output,
            eval_data=None if evaluation is None else evaluation.description, decision=decision,
            stats=None if cal is None else cal.stats, output_error=errors, layer_error=layers,
            tensorrt_check=trt_violations, rest=rest, stage_seconds=stages.seconds,
            weight_bytes=(weights_before, weight_bytes(quantized, floating))))
        external = src.uses_external_data or model_size(quantized) > EXTERNAL_DATA_THRESHOLD
        out_path = None if output is None else save_model(quantized, output, source_dir=store.locate,
                                                          external=external)
        if output is None:
            load_spilled(quantized, store)  # the scratch folder goes now: the returned model keeps its weights
    if report_path is not None:
        write_json(report, report_path)
        write_markdown(report, markdown_path(report_path))
    return Result(quantized, plan, q.params, report, out_path)
