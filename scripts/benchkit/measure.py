"""Measure each method's output model: the numbers of one results-table row.

Where the benchmark measures on its own, on purpose (this is the one place that says so):

- **Output SQNR** (:func:`output_sqnr_db`): plain ONNX Runtime CPU sessions with default options (FP8 graphs:
  the two options :func:`make_session` names, decided from the graph, not from the tool that wrote it), the
  eval npz read by ``cases.iter_samples`` one batch-1 sample at a time, 10 log10(sum ref^2 / sum
  (ref - q)^2) pooled over all outputs and samples in float64; the same code for every method. It is
  the number that ranks segquant-onnx against its peers, so it does not come from segquant-onnx: a bug
  in the library's metric (``analysis.evaluate`` / ``compare_models``), in its data reader (``calib.data``,
  which also feeds our own calibration) or in its session setup could otherwise flatter our rows and
  no one else's. The library's own number is still shown beside it ("tool's own SQNR") as a cross-check.
  The real suite also measures each graph "as written" (``as_written``): ONNX Runtime's Q/DQ fusions off, so
  every QuantizeLinear/DequantizeLinear computes in float as the graph states instead of ONNX Runtime's CPU
  integer kernels taking over the GEMMs (the arithmetic a TensorRT engine follows, up to the order of its
  float sums).
- **Graph counts** (:func:`graph_stats`, :func:`model_size`, :func:`identical_scales`): Q/DQ nodes,
  MatMul/Gemm/Conv nodes reading a constant weight through a DequantizeLinear, file size with external
  data, read from each output .onnx with ``onnx`` alone: one count for every method's graph, not the
  library's notion of a linear site (which describes what our planner recognises, not what a peer did).
- **Time and peak RSS** (``launch.run_measured``): each quantizer in its own process under a minimal
  launcher. The peers run outside segquant_onnx: ORT's worker imports nothing of it (that memory would
  count against ORT) and ModelOpt runs from its own virtualenv (it pins other onnx/onnxruntime versions).

Everything else is the library's job, and the benchmark calls it: segquant-onnx itself
(``segquant_onnx.quantize`` with a ``QuantConfig``, in ``workers.ours_worker``) and its report for the
FLOP shares and the tool's own SQNR (:func:`apply_report`); TensorRT's explicit-quantization rules
(``segquant_onnx.tensorrt.check.check_tensorrt``) and NVIDIA's parser and builder
(``segquant_onnx.tensorrt.build.build_engine``, in a subprocess) for every method; per-layer SQNR
(``segquant_onnx.analysis.compare.compare_models``, which maps quantized layers back to the float graph)
and the demo's sampler and image metrics (``segquant_onnx.diffusion``) in ``sections``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
from pathlib import Path

import numpy as np

from benchkit.cases import REPO_ROOT, ModelCase, iter_samples
from benchkit.launch import first_line, last_error_line
from benchkit.results import ResultRow
from benchkit.workers import worker_command

LINEAR_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops that only move or relabel a weight between its DequantizeLinear and the linear op reading it
PASSTHROUGH_OPS = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")


def has_float8(path: Path) -> bool:
    """Whether ``path``'s main graph holds a float8 tensor (an initializer, a Constant or a typed value):
    any tool's FP8 Q/DQ graph, found without asking the tool (measure.py's docstring says why)."""
    import onnx

    float8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
              onnx.TensorProto.FLOAT8E5M2FNUZ}
    graph = onnx.load(str(path), load_external_data=False).graph
    return (any(t.data_type in float8 for t in graph.initializer)
            or any(a.t.data_type in float8 for n in graph.node if n.op_type == "Constant" for a in n.attribute)
            or any(v.type.tensor_type.elem_type in float8 for v in [*graph.input, *graph.output, *graph.value_info]))


def make_session(path: Path, as_written: bool = False):
    """A CPU session with default options but INT4 MatMuls in float32 (SESSION_NOTE); for a graph with float8
    tensors (whichever tool wrote it) ONNX Runtime's Q/DQ fusions off and its basic optimization level
    (:data:`FP8_SESSION`); `as_written`: the Q/DQ fusions off for any graph (AS_WRITTEN)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # every graph, whichever tool wrote it (SESSION_NOTE): an INT4 DequantizeLinear + MatMul computed in float32
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
    float8 = has_float8(path)
    if float8 or as_written:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    if float8:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# What the INT4 section says about every session (make_session)
SESSION_NOTE = ("Every session, the reference's, ours and ModelOpt's alike, sets"
                " `session.qdq_matmulnbits_accuracy_level = 1`, as segquant-onnx's own sessions do: ONNX Runtime's"
                " CPU fuses an INT4 DequantizeLinear + MatMul into MatMulNBits, by default at accuracy level 4,"
                " which also rounds the activations to int8; level 1 computes in float32, what the graph says"
                " (graphs without INT4 weights are unaffected)")
# What the report says about FP8 sessions (make_session): why each option.
FP8_SESSION = ("`session.disable_quant_qdq=1` (ONNX Runtime's CPU fuses Q/DQ + MatMul/Gemm into its QGemm /"
               " MatMulIntegerToFloat kernels, which take 8-bit integers only: an FP8 graph fails their type check)"
               " and the basic optimization level (segquant-onnx measured its extended level changing what an FP8"
               " DualScale graph computes against onnx's reference evaluator); so every FP8 graph, ours and"
               " ModelOpt's, runs as written: FP8 rounding in QuantizeLinear, float arithmetic")


def reference_outputs(case: ModelCase) -> list[list[np.ndarray]]:
    session = make_session(case.onnx_path)
    names = [o.name for o in session.get_outputs()]
    return [session.run(names, feed) for feed in iter_samples(case.eval_path)]


# What the real sections say about the "as written" column (make_session's as_written)
AS_WRITTEN = ("the same SQNR with `session.disable_quant_qdq=1` (every graph, ours and the peers' alike):"
              " ONNX Runtime's CPU no longer fuses Q/DQ pairs into its integer kernels (QLinearConv, QGemm,"
              " MatMulIntegerToFloat and the like), so each QuantizeLinear/DequantizeLinear computes in float as"
              " the graph states: the arithmetic a TensorRT engine follows, up to the order of its float sums."
              " FP8 graphs run so in both columns")


def output_sqnr_db(case: ModelCase, model: Path, reference: list[list[np.ndarray]],
                   as_written: bool = False) -> float:
    """SQNR of all outputs over all eval samples: 10 log10(sum ref^2 / sum (ref - q)^2) (`as_written`: see
    make_session)."""
    session = make_session(model, as_written)
    names = [o.name for o in session.get_outputs()]
    signal = noise = 0.0
    for feed, ref_outputs in zip(iter_samples(case.eval_path), reference):
        for ref, got in zip(ref_outputs, session.run(names, feed)):
            ref64 = ref.astype(np.float64)
            signal += float(np.sum(ref64 ** 2))
            noise += float(np.sum((ref64 - got.astype(np.float64)) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def model_size(path: Path) -> int:
    """Bytes of the .onnx file plus any external-data files it references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.is_file())


def producers_and_constants(graph) -> tuple[dict, set]:
    """(tensor -> the node that writes it, constant tensors) of an ONNX graph: a tensor is constant when it is an
    initializer, a Constant's output, or written by a node whose every input is constant."""
    constant, producer = {t.name for t in graph.initializer}, {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        for out in node.output:
            producer[out] = node
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)
    return producer, constant


def dequantize_source(name: str, producer: dict):
    """The DequantizeLinear that `name` comes out of, through data-movement ops (PASSTHROUGH_OPS); else None."""
    while name in producer:
        node = producer[name]
        if node.op_type == "DequantizeLinear":
            return node
        if node.op_type not in PASSTHROUGH_OPS:
            return None
        name = node.input[0]
    return None


def graph_stats(path: Path) -> tuple[int, int, int, int]:
    """(Q/DQ node count, linear nodes whose constant weight goes through a DQ, linear nodes with a
    constant weight, QuantizeLinear nodes reading a float initializer) for the main graph.

    A tensor is constant when it is an initializer or every input of its producer is constant. A
    MatMul/Gemm/Conv has a quantized weight when one of its constant inputs is produced by a
    DequantizeLinear, possibly behind Transpose/Reshape/Cast-like ops.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    float_inits = {t.name for t in graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    producer, constant = producers_and_constants(graph)
    through_dq = lambda name: dequantize_source(name, producer) is not None  # noqa: E731

    qdq = sum(node.op_type in QDQ_OPS for node in graph.node)
    float_q = sum(node.op_type == "QuantizeLinear" and node.input[0] in float_inits for node in graph.node)
    weighted = quantized = 0
    for node in graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        weights = [i for i in node.input[:2] if i in constant]
        if not weights:
            continue
        weighted += 1
        quantized += any(through_dq(w) for w in weights)
    return qdq, quantized, weighted, float_q


def scale_tensors(path: Path) -> dict[str, np.ndarray]:
    """The scale initializers of every QuantizeLinear/DequantizeLinear, by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    names = {n.input[1] for n in graph.node if n.op_type in QDQ_OPS and len(n.input) > 1}
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}


def identical_scales(a: Path, b: Path) -> tuple[int, int]:
    """(scales equal in both models, scales in ``a``), matched by initializer name."""
    sa, sb = scale_tensors(a), scale_tensors(b)
    same = sum(1 for k, v in sa.items() if k in sb and np.array_equal(v, sb[k]))
    return same, len(sa)


def trt_check(path: Path, timeout_s: float) -> tuple[str, str | None, str | None]:
    """(status, first error line, cause) where status is 'built', 'parse failed', 'build failed'
    or 'n/a (why)'. The cause is the first later line with a TensorRT "Error Code" (the parser's
    first line often only says "Invalid Node"), skipping CUDA-driver complaints of a GPU-less host.
    """
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        return "n/a (tensorrt_rtx_bindings not installed)", None, None
    try:
        proc = subprocess.run(worker_command("trt", str(path)), capture_output=True, text=True,
                              timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return f"n/a (timed out after {timeout_s:.0f} s)", None, None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"n/a (worker exit {proc.returncode}: {last_error_line(proc.stderr)})", None, None
    result = json.loads(lines[-1])
    if result["built"]:
        return "built", None, None
    text = "\n".join(result["errors"]) or "no error message"
    error_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in error_lines[1:] if "Error Code" in ln and "cudaError" not in ln), None)
    return ("build failed" if result["parsed"] else "parse failed"), error_lines[0], cause


def trt_rule_check(path: Path) -> tuple[int, dict]:
    """(violation count, rule -> count) from segquant-onnx's static TensorRT checker."""
    import onnx
    from segquant_onnx.tensorrt.check import check_tensorrt

    violations = check_tensorrt(onnx.load(str(path), load_external_data=False), str(path.parent))
    rules: dict[str, int] = {}
    for v in violations:
        rules[v.rule] = rules.get(v.rule, 0) + 1
    return len(violations), rules


def measure(row: ResultRow, case: ModelCase, model: Path, reference, trt_timeout_s: float) -> None:
    """Fill ``row`` with every number the results table shows for ``model``."""
    row.output = model
    try:
        row.sqnr_db = output_sqnr_db(case, model, reference)
    except Exception as exc:  # a peer's model ONNX Runtime cannot run is a result, not a crash
        row.error = f"ONNX Runtime could not run it: {type(exc).__name__}: {first_line(str(exc))}"
    row.size_bytes = model_size(model)
    row.qdq_nodes, row.weights_quantized, row.weighted_linear, row.float_weight_q = graph_stats(model)
    try:
        row.trt_violations, row.trt_rules = trt_rule_check(model)
    except Exception as exc:
        row.trt_rules = {f"checker failed: {type(exc).__name__}: {first_line(str(exc))}": 1}
    row.trt, row.trt_error, row.trt_cause = trt_check(model, trt_timeout_s)


def apply_report(row: ResultRow, report: dict | None) -> None:
    """Copy the numbers of segquant-onnx's own report that the tables show."""
    if not report:
        return
    summary = report.get("summary", {})
    row.report = report
    row.int8_flop_fraction = summary.get("int8_flop_fraction")
    row.dualscale_extra_flop_pct = summary.get("dualscale_extra_flop_pct")
    row.dualscale_applied = summary.get("dualscale_applied")
    row.dualscale_candidates = summary.get("dualscale_candidates")
    row.outlier_float_flop_pct = (report.get("outliers") or {}).get("float_flop_pct")
    row.fallback_sites = len((report.get("fallback") or {}).get("sites", ()))
