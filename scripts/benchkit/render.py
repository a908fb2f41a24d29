"""BENCHMARKS.md and bench_results.json from one run: the method notes, the machine and versions, the
tables (tables.py) and the notes on what was skipped, failed or changed while it ran."""

from __future__ import annotations

import datetime
from pathlib import Path

from benchkit import runners
from benchkit.cases import CALIB_SAMPLES, CALIB_SEED, EVAL_SAMPLES, EVAL_SEED, REPO_ROOT, ModelCase
from benchkit.measure import FP8_SESSION
from benchkit.provenance import machine_info, source_fingerprint, versions
from benchkit.results import BenchState
from benchkit.sections import LATENCY_RUNS, LATENCY_WARMUP
from benchkit.tables import (feature_table, image_table, latency_table, methods_table, per_layer_tables, ratio_table,
                             results_table, summary_table)


def shown_path(path: Path) -> Path:
    """Relative to the repository when inside it."""
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def render_markdown(state: BenchState, cases: list[ModelCase], command: str, started: datetime.datetime,
                    total_s: float, modelopt_python: Path | None, loads: tuple[str, str], repeat: int,
                    source_info: tuple[str, str], results_json: Path,
                    digests: tuple[dict, dict] = ({}, {})) -> str:
    timed = ", ".join(m.label for m in runners.OURS_MATRIX if m.timed)
    parts = [
        "# Benchmarks: segquant-onnx vs. ONNX Runtime and NVIDIA ModelOpt (INT8 and FP8 PTQ)",
        "",
        "Written by `scripts/bench.py`; every number below is one that run printed (full numbers: "
        f"`{shown_path(results_json)}`)."
        " Every quantizer calibrates on a model's calibration set and is evaluated on its held-out eval set"
        f" (tiny models: `make_calibration(kind, {CALIB_SAMPLES}, seed={CALIB_SEED})` /"
        f" `(kind, {EVAL_SAMPLES}, seed={EVAL_SEED})`; the bundled example and demo: their shipped npz).",
        "",
        "- **precision**: the format of the quantized linears (W8A8 INT8, or W8A8 FP8 E4M3FN with opset-19 Q/DQ)"
        " and the dtype the graph's unquantized rest is written in.",
        "- **SQNR dB**: output SQNR vs. the FP32 model on the eval set, computed by the benchmark (ONNX Runtime"
        " CPU, default session options, one batch-1 sample at a time, 10 log10(sum ref^2 / sum (ref - q)^2)"
        " over all samples). Same code for every method. A graph holding float8 tensors (any tool's) gets "
        + FP8_SESSION + ".",
        "- **quantized FLOPs %**, **DualScale extra FLOPs %**: segquant-onnx's report (`summary.int8_flop_fraction`,"
        " which is the share quantized in the run's format, INT8 or FP8; `summary.dualscale_extra_flop_pct` with"
        " applied / candidate sites; `outliers.float_flop_pct` where the outlier-channel pass kept channels in"
        " float: `int8_flop_fraction` does not subtract those).",
        f"- **time s (runs) / peak RSS MiB**: fastest wall time of that many run(s) ({timed} and the"
        f" peers: --repeat = {repeat}; the other feature rows and ORT Entropy: 1) and largest `ru_maxrss`"
        " (via `os.wait4`) of the quantizer's own process, interpreter start-up and imports included (each is"
        " started by a minimal `python -S` launcher that forks it and reads its rusage, since on Linux a child"
        " started straight from the benchmark process would inherit the benchmark's own peak RSS)."
        " segquant-onnx runs `segquant_onnx.quantize(model, calib, QuantConfig(...), ...)` in a worker process:"
        f" the timed rows ({timed}) with `evaluate=False` (`--no-eval`: like the peers, no"
        " output-error measurement), the other rows with `eval_data=eval` (their time includes that"
        " measurement, and they fill the **tool's own SQNR** column).",
        "- **size KiB**: output .onnx (plus external data, if any). **Q/DQ nodes**: QuantizeLinear +"
        " DequantizeLinear. **quantized weights**: MatMul/Gemm/Conv nodes reading a constant weight through"
        " a DequantizeLinear / all MatMul/Gemm/Conv nodes with a constant weight, both counted in that"
        " method's output graph (segquant-onnx splits some linears into per-segment linears, so its"
        " count can exceed the FP32 graph's).",
        "- **check-trt violations**: `segquant_onnx.tensorrt.check.check_tensorrt` on the output model (TensorRT's"
        " explicit-quantization rules, checked statically; per-rule counts in the notes).",
        "- **TensorRT-RTX**: `segquant_onnx.tensorrt.build.build_engine` (parse + strongly typed engine"
        " build, no GPU needed); first error line when it fails.",
        "- **tool's own SQNR**: what segquant-onnx's report says on the same eval set (a cross-check).",
        "- Peers: ORT `quantize_static(quant_format=QDQ, per_channel=True, activation_type=QInt8,"
        " weight_type=QInt8, extra_options={ActivationSymmetric, WeightSymmetric: True})` with a"
        " CalibrationDataReader yielding one batch-1 sample at a time, calibrate_method MinMax (Entropy is"
        " run too and shown only where its scales differ from MinMax's), quantizing every op type ORT supports"
        " (its default), plus one extra MinMax run with `op_types_to_quantize=[MatMul, Gemm, Conv]` (the scope"
        " closest to segquant-onnx's); ModelOpt, from its own virtualenv, on a copy of the input model (it rewrites"
        " its input file in place with shape inference): " + "; ".join(
            f"{m.label}: `{runners.modelopt_command(m)}`" for m in runners.MODELOPT_METHODS) + ". Its rows with"
        " an fp32 rest compare W8A8 with W8A8 (so do all our rows but one); `ModelOpt max, fp16 rest` is what"
        " its users get by default (it converts the rest of an FP32 model to FP16), and `default, fp16 rest` what"
        " ours get (`QuantConfig()`: `--high-precision fp16` is the default)."
        " ModelOpt's FP8 runs its INT8 calibration and rescales the scales by 448/127 (`int8_to_fp8`, valid for max"
        " calibration only, hence no FP8 entropy row); it quantizes MatMul/Gemm/Conv and residual Adds, and the"
        " attention products where they match its FP8 fused-MHA pattern (8 < head size <= 256): compare it with"
        " `FP8 default + attention` as well as `FP8 default`.",
        "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (whole run: {total_s:.0f} s)",
        "",
        "Machine: " + "; ".join(machine_info()),
        "",
        f"Load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}. Wall times come from a shared"
        " machine: other processes' load shows up in them.",
        "",
        "Versions:",
        "",
    ]
    parts += [f"- {v}" for v in versions(modelopt_python)]
    parts.append(f"- segquant-onnx source: git {source_info[0]}, source fingerprint `{source_info[1]}` at start,"
                 f" `{source_fingerprint()}` at end")
    parts += ["", "Re-run:", "", "```", command, "```", "", "Models:", ""]
    parts += [f"- `{c.name}`: {c.description} (`{shown_path(c.onnx_path)}`,"
              f" sha256 {digests[0].get(c.name + ':onnx', '?')}; calib {digests[0].get(c.name + ':calib', '?')},"
              f" eval {digests[0].get(c.name + ':eval', '?')})"
              for c in cases]
    parts += ["", "segquant-onnx methods: each row is the row named in the last column plus one thing (INT8: rows"
              " before `default` add one feature to naive INT8, rows after it one to the default; FP8: naive INT8 in"
              " FP8, the FP8 default, then the FP8 default plus attention Q/DQ or plus the features of the best"
              " INT8 recipe); every row but `default, fp16 rest` writes the unquantized rest in fp32"
              " (`high_precision='fp32'`), like the peers' rows it is compared with; `default, fp16 rest` is"
              " `QuantConfig()` as shipped (the rest in fp16), next to ModelOpt's fp16-rest row:", "", methods_table()]
    parts += ["", "## Results", "", results_table(state.rows), "",
              "## Output SQNR change per feature (dB, same run)", "",
              "Each segquant-onnx row minus the row it adds one thing to (the methods table's last column): naive"
              " INT8 for the INT8 rows before `default`, for `default` itself and for `FP8 naive` (the format"
              " alone); `default` for the INT8 rows after it; `FP8 naive` for `FP8 default`; `FP8 default` for"
              " the FP8 rows after it.", "", feature_table(state.rows), "",
              "## Against the peers", "",
              "Per precision (format and rest): the best peer output SQNR (any, and among those TensorRT-RTX builds)"
              " vs. our naive and default rows of that format and our best row that keeps at least 95% of the"
              " linear FLOPs quantized. INT8 with an fp16 rest: ours is `default, fp16 rest` (`QuantConfig()` as"
              " shipped), next to ModelOpt's fp16-rest row.", "", summary_table(state.rows), "",
              "## Cost of segquant-onnx relative to each peer, same run", "",
              "Quantize wall time and peak RSS ratios of our timed rows in the peer's format (INT8 peers: naive"
              " INT8 and default; ModelOpt FP8: FP8 default, FP8 naive is not timed); below 1 means segquant-onnx"
              " used less.", "",
              ratio_table(state.rows), "",
              "## Per-layer SQNR, naive INT8 vs +SegLinear", "",
              "`segquant_onnx.analysis.compare.compare_models(fp, quantized, eval, per_layer=True)` (= `layer_error."
              "per_layer_error` on the canonical float graph, as `quantize --per-layer`): every linear layer's"
              " output SQNR over the eval set, errors accumulating along the graph as at inference; a split"
              " layer is measured on its chunk outputs.", "",
              per_layer_tables(state.per_layer), "",
              "## ONNX Runtime CPU latency", "",
              f"One process, CPUExecutionProvider, 1 intra-op thread, batch-1 feed (first eval sample);"
              f" {LATENCY_WARMUP} warm-up runs per model, then {LATENCY_RUNS} rounds that run each model once"
              " in turn; median and inter-quartile range of the single-run wall times. Ratios < 1: faster."
              " ONNX Runtime's CPU kernels, not TensorRT's: Q/DQ pairs it cannot fuse into integer kernels"
              " run as float ops. ONNX Runtime CPU latency is not a proxy for TensorRT speed here, so it is"
              " reported for INT8 with an fp32 rest and the FP32 reference only: ONNX Runtime's CPU has no FP8"
              " GEMM (an FP8 graph's Q/DQ run as float ops, with its Q/DQ fusions off) and few fp16 kernels, so"
              " FP8 and fp16-rest rows are n/a here; their speed is TensorRT's to measure.", "",
              latency_table(state.latency), "",
              "## Demo DiT images", "",
              "`segquant-onnx demo`'s sampler and metrics (`segquant_onnx.diffusion.demo.sample_all`, `image_metrics."
              "psnr` / `ssim`), on the models of the rows above: rectified-flow Euler through ONNX Runtime from"
              " the same noise as FP32; PSNR/SSIM of each image vs its FP32 image; per-step SQNR: transformer"
              " output on the FP32 trajectory's inputs.", "",
              image_table(state.images), ""]
    parts += ["## Notes", ""]
    parts += [f"- {n.what}: {n.why}" for n in state.notes]
    changed = [k for k, v in digests[0].items() if digests[1].get(k) != v]
    if changed:
        parts.append("- model or data files changed while this benchmark ran (sha256 at start -> end): " + ", ".join(
            f"{k} {digests[0][k]} -> {digests[1].get(k)}" for k in changed))
    sources = list(dict.fromkeys(r.source for r in state.rows if r.source))
    if len(sources) > 1:
        parts.append(f"- segquant-onnx's source changed while this benchmark ran ({len(sources)} versions); "
                     "rows by source fingerprint:")
        for src in sources:
            which = ", ".join(f"{r.model}/{r.method}" for r in state.rows if r.source == src)
            parts.append(f"  - `{src}`: {which}")
    for r in state.rows:
        if r.float_weight_q:
            parts.append(f"- {r.model} / {r.method}: {r.float_weight_q} QuantizeLinear nodes read a float "
                         "initializer: those weights are stored in float and quantized at run time (hence the "
                         "file size).")
    failed = [r for r in state.rows if r.error is not None]
    parts += [f"- {r.model} / {r.method}: {r.error}" for r in failed]
    if state.section_seconds:
        parts.append("- time spent in the extra sections: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in state.section_seconds.items()))
    flagged = [r for r in state.rows if r.trt_rules]
    if flagged:
        parts += ["", "check-trt violations by rule:", ""]
        for r in flagged:
            parts.append(f"- {r.model} / {r.method}: " + ", ".join(f"{k} {v}" for k, v in r.trt_rules.items()))
    trt_failed = [r for r in state.rows if r.trt not in ("built", "-")]
    if trt_failed:
        parts += ["", "TensorRT-RTX failures in full (first error line; the cause TensorRT logged):", ""]
        for r in trt_failed:
            detail = "; ".join(x for x in (r.trt_error, r.trt_cause) if x)
            parts.append(f"- {r.model} / {r.method}: {r.trt}" + (f": {detail}" if detail else ""))
    return "\n".join(parts) + "\n"


def results_json_data(state: BenchState, cases: list[ModelCase], total_s: float) -> dict:
    rows = []
    for r in state.rows:
        d = {k: v for k, v in r.__dict__.items() if k != "report"}
        d["output"] = str(r.output) if r.output else None
        rows.append(d)
    return {"models": [{"name": c.name, "onnx": str(c.onnx_path), "description": c.description} for c in cases],
            "methods": {m.label: m.fields for m in runners.OURS_MATRIX}, "rows": rows, "per_layer": state.per_layer,
            "latency": state.latency, "images": state.images, "notes": [n.__dict__ for n in state.notes],
            "seconds": total_s}
