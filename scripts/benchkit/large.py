"""``bench.py --suite large``: the >2 GB model of scripts/large_model.py, ours against ModelOpt and ONNX Runtime.

One model (a 2.04 GiB fp16 SD3-width transformer, random weights, trajectory-style data; large_model.py says
how it is built), one row per method, each in its own measured process (launch.py: wall time and peak RSS,
here with a memory limit: a peer that needs more than ``--rss-limit-gib`` is stopped and that is its result,
as is a timeout). Output SQNR on the eval feeds is the benchmark's own (measure.py), the static TensorRT rule
check for every output, TensorRT-RTX's parse and build only with ``--trt`` (minutes and gigabytes per 1 GB
engine on this CPU). Time and RSS are divided by ``ours --no-eval``'s (what the peers do: no evaluation) and
the peak RSS by the model's file size. The ``config`` column says how each row ran (one process today), so
rows for other configurations (workers) slot in beside them. The section it prints replaces the "Large
model" heading of BENCHMARKS.md and leaves the rest alone.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import re
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from benchkit.cases import REPO_ROOT, ModelCase, load_script
from benchkit.launch import QuantRun, first_line
from benchkit.measure import (apply_report, graph_stats, model_size, output_sqnr_db, reference_outputs, trt_check,
                              trt_rule_check)
from benchkit.provenance import git_description, load_average, machine_info, versions
from benchkit.results import BenchState, ResultRow, SkipNote
from benchkit.runners import MODELOPT_METHODS, OursMethod, run_modelopt, run_ort, run_ours
from benchkit.tables import fmt

log = logging.getLogger("bench")

LARGE_SCRIPT = REPO_ROOT / "scripts" / "large_model.py"
SECTION_TITLE = "## Large model"
BASELINE = "ours --no-eval"


@dataclass(frozen=True)
class LargeMethod:
    label: str
    config: str  # how it ran: the column other configurations (workers) extend
    cli: str  # the command line it stands for
    run: object  # (case, out_dir, args) -> QuantRun


def _ours(label: str, slug: str, fields: dict, evaluate: bool, cli: str, config: str = "1 process",
          calib_feeds: int | None = None) -> LargeMethod:
    """Our row; with `calib_feeds`, calibrated on that many feeds (prepare_large's larger set) instead."""
    method = OursMethod(label, slug, fields, timed=not evaluate)

    def run(case, out, args):
        if calib_feeds is not None:
            case = dataclasses.replace(case, calib_path=larger_calibration(case, calib_feeds))
        return run_ours(case, method, out, args.timeout, args.rss_limit_gib)

    return LargeMethod(label, config, cli, run)


# the issue's users calibrate on hundreds of feeds: the same model and defaults on this many (the 16-feed set's
# prompts and more of them, 4 noise levels each), for the stage table's ratio of the whole run to calibration
LARGE_CALIB_FEEDS = 128


def larger_calibration(case: ModelCase, feeds: int) -> Path:
    """`feeds` calibration feeds (feeds / 4 prompts x 4 noise levels) beside the case's, made once: large_model.py's
    trajectory_data with the calibration seed, so its first prompts are the 16-feed set's."""
    path = case.calib_path.with_name(f"{case.calib_path.stem}{feeds}.npz")
    if not path.is_file():
        import numpy as np

        script = load_script(LARGE_SCRIPT)
        tmp = path.with_name(path.stem + ".partial.npz")
        np.savez(tmp, **script.trajectory_data(feeds // 4, 4, 1))  # large_model.main: seed 0 + 1 for calibration
        tmp.replace(path)
    return path


MODELOPT = next(m for m in MODELOPT_METHODS if m.slug == "max-fp16")  # its default rest for an fp16 model
METHODS = (
    _ours("ours default", "default", {}, True,
          "segquant-onnx quantize IN --calib CALIB --eval EVAL -o OUT"),
    _ours(BASELINE, "default-no-eval", {}, False, "segquant-onnx quantize IN --calib CALIB -o OUT --no-eval"),
    _ours("ours --preset fast --no-eval", "fast-no-eval", {"dualscale": {"mode": "off"}}, False,
          "segquant-onnx quantize IN --calib CALIB -o OUT --preset fast --no-eval"),
    # the same run with its calibration and held-back scoring over 2 local workers (peak RSS: the largest process)
    _ours("ours --no-eval --workers 2", "default-no-eval-w2", {"runtime": {"workers": 2}}, False,
          "segquant-onnx quantize IN --calib CALIB -o OUT --no-eval --workers 2", "2 local workers"),
    _ours(f"ours --no-eval, {LARGE_CALIB_FEEDS} feeds", f"default-no-eval-{LARGE_CALIB_FEEDS}", {}, False,
          f"segquant-onnx quantize IN --calib CALIB{LARGE_CALIB_FEEDS} -o OUT --no-eval",
          f"1 process, {LARGE_CALIB_FEEDS} calibration feeds", calib_feeds=LARGE_CALIB_FEEDS),
    LargeMethod("ORT MinMax, MatMul/Gemm/Conv", "1 process", "quantize_static(QDQ, per-channel, symmetric INT8, "
                "op_types_to_quantize=MatMul/Gemm/Conv, use_external_data_format=True)",
                lambda case, out, args: run_ort(case, "MinMax", ("MatMul", "Gemm", "Conv"), out, args.timeout,
                                                external=True, rss_limit_gib=args.rss_limit_gib)),
    LargeMethod(MODELOPT.label, "1 process", "python -m modelopt.onnx.quantization --quantize_mode int8 "
                "--calibration_method max --calibration_eps cpu --high_precision_dtype fp16",
                lambda case, out, args: run_modelopt(case, MODELOPT, out, args.timeout, args.modelopt_python,
                                                     rss_limit_gib=args.rss_limit_gib)),
)


def prepare_large(work_dir: Path) -> tuple[ModelCase, dict]:
    """scripts/large_model.py's model and data in ``work_dir/large`` (made once, then reused)."""
    folder = work_dir / "large"
    script = load_script(LARGE_SCRIPT)
    if not (folder / f"{script.NAME}.json").is_file():
        script.main(["--out-dir", str(folder), "--time-feeds", "2"])
    info = json.loads((folder / f"{script.NAME}.json").read_text())
    case = ModelCase("sd3-large", folder / f"{script.NAME}.onnx", folder / f"{script.NAME}_calib.npz",
                     folder / f"{script.NAME}_eval.npz", "scripts/large_model.py")
    return case, info


def ratio(value, base):
    return value / base if value and base else None


def large_table(rows: list[ResultRow], configs: dict, file_bytes: int) -> str:
    head = ("| method | config | output SQNR dB | time s | peak RSS GiB | RSS / model file | time / ours --no-eval "
            "| RSS / ours --no-eval | output size GiB | quantized linears | check-trt violations | TensorRT-RTX |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    base = next((r for r in rows if r.method == BASELINE and r.error is None), None)
    for r in rows:
        ref = r.family == "fp32"
        sqnr = "ref" if ref else (f"FAILED: {r.error}" if r.error and r.size_bytes is None else
                                  f"n/a ({r.error})" if r.error else fmt(r.sqnr_db, ".2f"))
        rss = None if ref or r.peak_rss_mib is None else r.peak_rss_mib / 1024
        linears = "-" if r.weighted_linear is None else f"{r.weights_quantized}/{r.weighted_linear}"
        lines.append(
            f"| {r.method} | {configs.get(r.method, '-')} | {sqnr} | {fmt(None if ref else r.seconds, '.0f')} "
            f"| {fmt(rss, '.2f')} | {fmt(ratio(rss, file_bytes / 2**30), '.2f')} "
            f"| {fmt(ratio(r.seconds, base.seconds) if base and not ref else None, '.2f')} "
            f"| {fmt(ratio(r.peak_rss_mib, base.peak_rss_mib) if base and not ref else None, '.2f')} "
            f"| {fmt(None if r.size_bytes is None else r.size_bytes / 2**30, '.2f')} | {linears} "
            f"| {fmt(r.trt_violations, 'd')} | {r.trt} |")
    return "\n".join(lines)


def stage_table(rows: list[ResultRow], info: dict) -> str:
    """Our rows' stage_seconds side by side (the report's wall time per pipeline stage)."""
    ours = [r for r in rows if r.family == "ours" and r.report and r.report.get("stage_seconds")]
    stages = list(dict.fromkeys(s for r in ours for s in r.report["stage_seconds"]))
    lines = ["| stage | " + " | ".join(r.method for r in ours) + " |", "|---|" + "---:|" * len(ours)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(fmt(r.report["stage_seconds"].get(s), ".1f") for r in ours) + " |")
    # the issue's time goal: the whole run within 1.5x of one calibration pass (the stages' sum over calibrate)
    lines.append("| **stages / calibrate** | " + " | ".join(
        fmt(ratio(sum(r.report["stage_seconds"].values()), r.report["stage_seconds"].get("calibrate")), ".2f")
        for r in ours) + " |")
    return "\n".join(lines)


def run_large_suite(args, argv: list[str], ensure_modelopt_venv) -> int:
    started = datetime.datetime.now().astimezone()
    loads, t0 = [load_average()], time.perf_counter()
    work_dir = args.work_dir.resolve()
    state = BenchState()
    args.modelopt_python = None if args.skip_modelopt else ensure_modelopt_venv(work_dir, state)
    case, info = prepare_large(work_dir)
    file_bytes = model_size(case.onnx_path)
    reference = reference_outputs(case)
    state.rows.append(ResultRow(case.name, "fp16 model (reference)", "fp32", size_bytes=file_bytes))
    out_dir = work_dir / "quantized" / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    configs = {}
    chosen = [m for m in METHODS if not args.methods or any(w.strip() and w.strip() in m.label
                                                            for w in args.methods.split(","))]
    for m in chosen:
        if m.label == MODELOPT.label and args.modelopt_python is None:
            state.notes.append(SkipNote(m.label, "not run (--skip-modelopt or no venv)"))
            continue
        log.info("%s: %s ...", case.name, m.label)
        run: QuantRun = m.run(case, out_dir, args)
        family = "ours" if m.label.startswith("ours") else "modelopt" if "ModelOpt" in m.label else "ort"
        row = ResultRow(case.name, m.label, family, high_precision="fp16", seconds=run.seconds,
                        peak_rss_mib=run.peak_rss_mib, error=run.error, runs=1)
        configs[m.label] = m.config
        if run.error is None:
            row.output = run.output
            try:
                row.sqnr_db = output_sqnr_db(case, run.output, reference)
            except Exception as exc:  # a model ONNX Runtime cannot run is a result
                row.error = f"ONNX Runtime could not run it: {type(exc).__name__}: {first_line(str(exc))}"
            row.size_bytes = model_size(run.output)
            row.qdq_nodes, row.weights_quantized, row.weighted_linear, row.float_weight_q = graph_stats(run.output)
            row.trt_violations, row.trt_rules = trt_rule_check(run.output)
            row.trt = trt_check(run.output, args.timeout)[0] if args.trt else "not run (--trt)"
            apply_report(row, run.report)
        log.info("%s: %s: SQNR %s dB, %s s, %s MiB, %s", case.name, m.label, fmt(row.sqnr_db, ".2f"),
                 fmt(row.seconds, ".0f"), fmt(row.peak_rss_mib, ".0f"), row.error or "ok")
        state.rows.append(row)
        done = len(configs) == len(chosen)  # the section is written after every row: a run cut short keeps its rows
        if not done:
            state.notes.append(SkipNote("this table", f"written after {m.label}; the run went on"))
        section = render(state, case, info, configs, file_bytes, shlex.join(["python", "scripts/bench.py", *argv]),
                         started, time.perf_counter() - t0, [*loads, load_average()], args, chosen)
        if not done:
            state.notes.pop()
        md = args.markdown
        md.write_text(replace_section(md.read_text() if md.is_file() else "", section))
    total_s = time.perf_counter() - t0
    print(section)
    rows = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items() if k != "report"}
            for r in state.rows]
    (work_dir / "bench_results_large.json").write_text(json.dumps(
        {"model": info, "rows": rows, "stage_seconds": {r.method: (r.report or {}).get("stage_seconds")
                                                        for r in state.rows if r.family == "ours"},
         "notes": [n.__dict__ for n in state.notes], "seconds": total_s}, indent=1, default=str))
    return 0


def render(state, case, info, configs, file_bytes, command, started, total_s, loads, args, chosen) -> str:
    cfg = info["config"]
    per_feed = info.get("seconds_per_feed")
    parts = [
        SECTION_TITLE, "",
        "Written by `python scripts/bench.py --suite large` (the rest of this file is left as it was).", "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (whole run: {total_s:.0f} s). Load average at"
        f" start {loads[0]}, at end {loads[1]} (a shared 2-core machine: wall times include others' load).", "",
        "Machine: " + "; ".join(machine_info()), "",
        "Versions: " + "; ".join(versions(args.modelopt_python)) + f"; segquant-onnx git {git_description()}", "",
        "Re-run:", "", "```", "python scripts/large_model.py   # optional: the suite runs it when the model is missing",
        command, "```", "",
        f"Model: `scripts/large_model.py`: diffusers `SD3Transformer2DModel` at SD3-medium's width (hidden"
        f" {cfg['num_attention_heads'] * cfg['attention_head_dim']} = {cfg['num_attention_heads']} heads x"
        f" {cfg['attention_head_dim']}, T5 width {cfg['joint_attention_dim']}) with {cfg['num_layers']} joint blocks,"
        f" {info['parameters']:,} parameters, random weights (diffusers' initialisation, seed 0: measures time"
        f" and memory, not quality), fp16, TorchScript exporter opset 17, {file_bytes / 2**30:.2f} GiB with external"
        f" data. Data: {info['calib_feeds']} calibration / {info['eval_feeds']} eval feeds along SD3's shifted"
        f" sigma schedule (sigmas {info['sigmas']}), latent {info['latent']}x{info['latent']}, {info['text_len']}"
        " text tokens."
        + (f" One ONNX Runtime run of the float model (default session) took {per_feed} s per feed when the data"
           " was made." if per_feed else ""), "",
        "Methods: " + "; ".join(f"{m.label}: `{m.cli}`" for m in chosen) + ". Ours run through the Python API"
        " with the same settings (`QuantConfig`), each method in its own process, one run each.", "",
        f"- **peak RSS**: `ru_maxrss` of the quantizer's process, or of its largest worker process where that is"
        f" larger (with workers); a method is stopped when its process group's"
        f" RSS passes {args.rss_limit_gib:g} GiB or after {args.timeout:.0f} s, and that is its result.",
        "- **output SQNR dB**: against the fp16 model on the eval feeds, ONNX Runtime CPU, the benchmark's own code"
        " for every method (measure.py).",
        "- **quantized linears**: MatMul/Gemm/Conv nodes whose constant weight comes through a DequantizeLinear /"
        " all with a constant weight (measure.graph_stats).", "",
        large_table(state.rows, configs, file_bytes), "",
        "Where our time goes (`stage_seconds` of each report, seconds):", "", stage_table(state.rows, info), ""]
    notes = [f"- {n.what}: {n.why}" for n in state.notes]
    notes += [f"- {r.method}: {r.error}" for r in state.rows if r.error is not None]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    return "\n".join(parts)


def replace_section(markdown: str, section: str) -> str:
    """``markdown`` with its SECTION_TITLE section (up to the next ``## `` heading) replaced, or appended."""
    pattern = re.compile(rf"^{re.escape(SECTION_TITLE)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(markdown):
        return pattern.sub(lambda _: section + "\n", markdown, count=1).rstrip("\n") + "\n"
    return markdown.rstrip("\n") + "\n\n" + section
