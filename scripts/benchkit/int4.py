"""``bench.py --suite int4``: INT4 weights (issue 15) side by side on every default benchmark model.

Per model (cases.py's models, their calib / eval data): the FP32 reference and our INT8 default for context;
ours at W4A16 and at W4A8, four rows each: round to nearest (RTN), GPTQ, GPTQ plus the low-rank branch, and
``--preset best`` (SmoothQuant auto, outliers auto, a 40 dB target within 5% of the FLOPs, GPTQ); NVIDIA
ModelOpt ``--quantize_mode int4`` with ``--calibration_method awq_clip`` and ``rtn_dq``. Every row goes
through the tiny suite's measurement (``bench_model``: output SQNR on the eval feeds, file size, check-trt,
TensorRT-RTX parse and build); on top of that this module counts, in each output graph alike, the share of
linear FLOPs whose weight is INT4 (:func:`int4_flop_share`) and shows ours' ``summary.weight_bytes`` and
low-rank FLOPs. The low-rank rank is 32, or 16 where the model's linears are narrow (:func:`low_rank_for`).
The section it prints replaces the "INT4 weights" heading of BENCHMARKS.md and leaves the rest alone.
"""

from __future__ import annotations

import datetime
import json
import logging
import shlex
import statistics
import time
from pathlib import Path

import numpy as np

from benchkit.cases import ModelCase, iter_samples, prepare_models
from benchkit.measure import LINEAR_OPS, SESSION_NOTE, dequantize_source, producers_and_constants
from benchkit.provenance import git_description, load_average, machine_info, versions
from benchkit.real import flop_share, linear_node_flops, notes_block
from benchkit.results import BenchState, ResultRow
from benchkit.runners import ModeloptMethod, OursMethod, PlannedMethod, _with, run_modelopt, run_ours
from benchkit.tables import fmt, short, trt_cell
from segquant_onnx.config import PRESETS, QuantConfig

log = logging.getLogger("bench")

SECTION_TITLE = "## INT4 weights"
FORMATS = (("w4a16", "W4A16"), ("w4a8", "W4A8"))
# the paper's rank is 32-64 on 3072-wide layers (about 2% more FLOPs); on a model whose median linear has
# min(K, N) under NARROW a rank-32 branch would be half of a 64-wide weight (+100% FLOPs): 16 there
RANK, NARROW_RANK, NARROW = 32, 16, 256

_FP32_REST = {"precision": {"high_precision": "fp32"}}


def _best_weights(precision: dict) -> dict:
    """The precision fields `--preset best` resolves to at INT4 (GPTQ, the weight clip search)."""
    resolved = QuantConfig.preset("best", precision=precision).precision
    return {**precision, "weight_rounding": resolved.weight_rounding.value, "weight_clip": resolved.weight_clip}


def int4_methods(rank: int) -> tuple[OursMethod, ...]:
    """Our rows in table order: INT8 default (context), then per format RTN, GPTQ, GPTQ + low-rank ``rank``
    and the best preset (``QuantConfig.preset("best", ...)``: at INT4 GPTQ and the weight clip search too).
    The unquantized rest is fp32 in every row, as in ModelOpt's rows."""
    rows = [OursMethod("INT8 default", "int8-default", _with(_FP32_REST), timed=True)]
    for fmt_value, name in FORMATS:
        p = {"format": fmt_value, "high_precision": "fp32"}
        rows += [
            OursMethod(f"{name} RTN", f"{fmt_value}-rtn", {"precision": {**p, "weight_rounding": "rtn"}}, timed=True),
            OursMethod(f"{name} GPTQ", f"{fmt_value}-gptq", {"precision": {**p, "weight_rounding": "gptq"}},
                       f"{name} RTN", timed=True),
            OursMethod(f"{name} GPTQ + low-rank {rank}", f"{fmt_value}-gptq-lr{rank}",
                       {"precision": {**p, "weight_rounding": "gptq", "low_rank": rank}}, f"{name} GPTQ", timed=True),
            OursMethod(f"{name} best preset", f"{fmt_value}-best", _with(PRESETS["best"], precision=_best_weights(p)),
                       f"{name} RTN", timed=True),
        ]
    return tuple(rows)


# ModelOpt's INT4 is weight-only (its default block size, 128); the rest fp32 like ours
INT4_MODELOPT = (
    ModeloptMethod("ModelOpt int4 awq_clip", "int4-awq-clip", "int4", "awq_clip", "fp32"),
    ModeloptMethod("ModelOpt int4 rtn_dq", "int4-rtn-dq", "int4", "rtn_dq", "fp32"),
)

OURS_CLI = {
    "INT8 default": "--high-precision fp32",
    "RTN": "--precision w4aX --weight-rounding rtn --high-precision fp32",
    "GPTQ": "--precision w4aX --weight-rounding gptq --high-precision fp32",
    "GPTQ + low-rank R": "--precision w4aX --weight-rounding gptq --low-rank R --high-precision fp32",
    "best preset": "--precision w4aX --preset best --high-precision fp32",
}


def weight_shapes(path: Path) -> list[tuple[int, int]]:
    """(K, N) of every MatMul / Gemm whose second input is a 2-D initializer (Gemm ``transB`` honoured)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {t.name: list(t.dims) for t in graph.initializer}
    shapes = []
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm") or len(node.input) < 2 or len(inits.get(node.input[1], ())) != 2:
            continue
        k, n = inits[node.input[1]]
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        shapes.append((n, k) if trans_b else (k, n))
    return shapes


def low_rank_for(path: Path) -> tuple[int, int]:
    """(rank, median min(K, N) of the model's linear weights): RANK, or NARROW_RANK when that median is under
    NARROW. (segquant-onnx itself skips any site with rank >= min(K, N).)"""
    sizes = [min(k, n) for k, n in weight_shapes(path)]
    median = int(statistics.median(sizes)) if sizes else 0
    return (NARROW_RANK if median < NARROW else RANK), median


def int4_plan(args, rank: int, modelopt_python: Path | None) -> list[PlannedMethod]:
    plan = [PlannedMethod("ours", m.label, lambda case, out, m=m: run_ours(case, m, out, args.timeout), args.repeat,
                          *m.precision) for m in int4_methods(rank)]
    if modelopt_python is not None:
        for m in INT4_MODELOPT:
            plan.append(PlannedMethod(
                "modelopt", m.label, lambda case, out, m=m: run_modelopt(case, m, out, args.timeout, modelopt_python),
                args.repeat, "w4a16", m.high_precision))
    return plan


# ---------------------------------------------------------------------------------------------------------
# INT4 FLOP share, counted in each output graph alike

def int4_linears(graph) -> list[tuple]:
    """[(node, activation, weight, weight shape or None, int4 weight, attrs)] for every MatMul/Gemm/Conv with
    a constant weight; int4: the weight comes out of a DequantizeLinear (through data-movement ops) whose
    input is an INT4 / UINT4 constant."""
    import onnx

    inits = {t.name: t for t in graph.initializer}
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    producer, constant = producers_and_constants(graph)

    def int4_source(name: str) -> bool:
        dq = dequantize_source(name, producer)
        q = None if dq is None else inits.get(dq.input[0])
        return q is not None and q.data_type in four_bit

    found = []
    for node in graph.node:
        if node.op_type not in LINEAR_OPS or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in constant and node.op_type in ("MatMul", "Gemm") and x in constant:
            x, w = w, x
        if w not in constant or x in constant:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        shape = list(inits[w].dims) if w in inits else None
        found.append((node, x, w, shape, int4_source(w), attrs))
    return found


def int4_flop_share(path: Path, feed: dict[str, np.ndarray]) -> tuple[float | None, int, int]:
    """(share of linear FLOPs whose weight is INT4, INT4 linear nodes, linear nodes with a constant weight),
    shapes from one ONNX Runtime run on ``feed`` (unoptimized, every needed tensor added as an output). The
    low-rank branch's float GEMMs and DualScale's second GEMM count as linear nodes of their own."""
    import onnx

    model = onnx.load(str(path))
    nodes = linear_node_flops(model, int4_linears(model.graph), feed)
    return flop_share(nodes), sum(q for _, q in nodes), len(nodes)


# ---------------------------------------------------------------------------------------------------------
# the table

def _kib(n) -> str:
    return "-" if n is None else f"{n / 1024:.0f}"


def int4_table(rows: list[ResultRow], shares: dict) -> str:
    head = ("| model | method | output SQNR dB | file KiB | ours' weight KiB before -> after | INT4 weight FLOPs % "
            "(INT4 / linear nodes) | low-rank extra FLOPs % (sites) | time s | peak RSS MiB | check-trt violations "
            "| TensorRT-RTX |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if r.error is not None and r.size_bytes is None:
            sqnr = f"FAILED: {short(r.error, 160)}"
        elif r.error is not None:
            sqnr = f"n/a ({short(r.error, 160)})"
        else:
            sqnr = "ref" if r.family == "fp32" else fmt(r.sqnr_db, ".2f")
        summary = (r.report or {}).get("summary", {})
        wb = summary.get("weight_bytes")
        weights = f"{_kib(wb['before'])} -> {_kib(wb['after'])}" if wb else "-"
        share = shares.get((r.model, r.method))
        if share is None:
            share_cell = "-"
        elif isinstance(share, str):
            share_cell = f"n/a ({short(share, 60)})"
        else:
            share_cell = f"{fmt(None if share[0] is None else 100 * share[0], '.2f')} ({share[1]}/{share[2]})"
        lr = summary.get("low_rank_extra_flop_pct")
        lr_cell = "-" if lr is None else (f"{lr:.1f} ({summary.get('low_rank_sites')})" if lr else "0")
        timed = r.family != "fp32" and r.seconds is not None
        lines.append(
            f"| {r.model} | {r.method} | {sqnr} | {_kib(r.size_bytes)} | {weights} | {share_cell} | {lr_cell} "
            f"| {fmt(r.seconds if timed else None, '.1f')} | {fmt(r.peak_rss_mib if timed else None, '.0f')} "
            f"| {fmt(r.trt_violations, 'd')} | {trt_cell(r)} |")
    return "\n".join(lines)


def render_section(state: BenchState, cases: list[ModelCase], ranks: dict, shares: dict, command: str,
                   started: datetime.datetime, total_s: float, modelopt_python: Path | None,
                   loads: tuple[str, str]) -> str:
    parts = [
        SECTION_TITLE, "",
        "Written by `python scripts/bench.py --suite int4` (the rest of this file comes from the other suites and is"
        " left as it was): INT4 weights (issue 15) on the tiny suite's models and data, ours at W4A16 and W4A8 next"
        " to NVIDIA ModelOpt's `--quantize_mode int4`, with our INT8 default for context.", "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (whole run: {total_s:.0f} s). Load average at"
        f" start {loads[0]}, at end {loads[1]} (a 2-core machine shared with other jobs: wall times include"
        " their load).", "",
        "Machine: " + "; ".join(machine_info()), "",
        "Versions: " + "; ".join(versions(modelopt_python)) + f"; segquant-onnx git {git_description()}", "",
        "Re-run:", "", "```", command, "```", "",
        "Low-rank rank per model (32, or 16 where the median min(K, N) of the model's linear weights is under"
        f" {NARROW}; segquant-onnx skips a site whose min(K, N) is not above the rank): "
        + "; ".join(f"`{c.name}` {ranks[c.name][0]} (median min(K, N) {ranks[c.name][1]})" for c in cases) + ".", "",
        "Methods (ours run as `QuantConfig` in the benchmark's worker, `evaluate=False` like the peers; the CLI"
        " equivalent of each, after `segquant-onnx quantize IN --calib CALIB -o OUT --no-eval`): "
        + "; ".join(f"{k}: `{v}`" for k, v in OURS_CLI.items())
        + " (W4A16 rows `--precision w4a16`, W4A8 rows `w4a8`; block size 128, the default); "
        + "; ".join(f"{m.label}: `python -m modelopt.onnx.quantization --quantize_mode int4 --calibration_method "
                    f"{m.calibration} --calibration_eps cpu --high_precision_dtype {m.high_precision}`"
                    for m in INT4_MODELOPT) + " (its default block size, 128).", "",
        "- **output SQNR dB**: 10 log10(sum ref^2 / sum (ref - q)^2) over every eval feed, ONNX Runtime CPU, the"
        " benchmark's own code for every row (measure.py). " + SESSION_NOTE + ".",
        "- **file KiB**: the quantized .onnx on disk (with external data, if any); **ours' weight KiB**:"
        " `summary.weight_bytes` of segquant-onnx's report (the linear sites' weights as stored, scales included).",
        "- **INT4 weight FLOPs %**: counted by the benchmark in each output graph alike: FLOPs of MatMul/Gemm/Conv"
        " nodes whose constant weight comes out of a DequantizeLinear of an INT4 tensor, over those of all linear"
        " nodes with a constant weight (shapes from one ONNX Runtime run on the first eval feed); a low-rank"
        " branch's two float GEMMs are linear nodes of their own. W4A8 rows also quantize those activations to"
        " INT8; W4A16 and ModelOpt's int4 rows keep activations in float. **low-rank extra FLOPs %**: ours'"
        " `summary.low_rank_extra_flop_pct` (sites with a branch).",
        "- **time s / peak RSS MiB**: wall time and `ru_maxrss` of the quantizer's own process.",
        "- **check-trt**: segquant-onnx's static TensorRT explicit-quantization rule check;"
        " **TensorRT-RTX**: NVIDIA's parser and a strongly typed engine build (no GPU needed).", "",
        int4_table(state.rows, shares), ""]
    return "\n".join(parts + notes_block(state))


# ---------------------------------------------------------------------------------------------------------
# the run

def run_int4_suite(args, argv: list[str], bench_model, ensure_modelopt_venv) -> int:
    from benchkit.real import replace_section, start_suite

    started, load_at_start, t0, work_dir, state, modelopt_python = start_suite(args, ensure_modelopt_venv)
    cases = prepare_models(args.model_list, work_dir)
    shares: dict = {}
    ranks: dict = {}
    for case in cases:
        ranks[case.name] = low_rank_for(case.onnx_path)
        log.info("%s: low-rank rank %d (median min(K, N) %d)", case.name, *ranks[case.name])
        bench_model(case, int4_plan(args, ranks[case.name][0], modelopt_python), work_dir, args, state)
        feed = next(iter_samples(case.eval_path))
        for r in state.rows:
            if r.model != case.name or r.output is None or not Path(r.output).is_file():
                continue
            try:
                shares[(r.model, r.method)] = int4_flop_share(Path(r.output), feed)
            except Exception as exc:  # a graph the count cannot run is a note in its cell, not a crash
                shares[(r.model, r.method)] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            log.info("%s / %s: INT4 weight FLOP share %s", r.model, r.method, shares[(r.model, r.method)])
    total_s = time.perf_counter() - t0
    command = shlex.join(["python", "scripts/bench.py", *argv])
    section = render_section(state, cases, ranks, shares, command, started, total_s, modelopt_python,
                             (load_at_start, load_average()))
    print(section)
    md = args.markdown
    md.write_text(replace_section(md.read_text() if md.is_file() else "", section, SECTION_TITLE))
    results = work_dir / "bench_results_int4.json"
    rows = [{k: (str(v) if isinstance(v, Path) else v) for k, v in r.__dict__.items() if k != "report"}
            | {"weight_bytes": ((r.report or {}).get("summary") or {}).get("weight_bytes"),
               "low_rank_sites": ((r.report or {}).get("summary") or {}).get("low_rank_sites"),
               "low_rank_extra_flop_pct": ((r.report or {}).get("summary") or {}).get("low_rank_extra_flop_pct")}
            for r in state.rows]
    results.write_text(json.dumps({"ranks": ranks, "rows": rows, "int4_weight_flop_share": {
        f"{m} / {k}": v for (m, k), v in shares.items()}, "notes": [n.__dict__ for n in state.notes],
        "seconds": total_s}, indent=1, default=str))
    log.info("wrote the %r section of %s and %s (whole run %.0f s)", SECTION_TITLE, md, results, total_s)
    return 0 if cases else 1
