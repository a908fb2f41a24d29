"""Canonicalize: bring an exported graph into the form the passes match on.

- refuse graphs that are already quantized (Q/DQ, QLinear*, *Integer ops);
- raise the opset to at least 13 (per-channel Q/DQ needs `axis`);
- shape inference, so every tensor has a dtype and, where static, a shape;
- constant folding, so exporter-computed chunk bounds (Shape -> Gather -> Div -> Slice) and
  transposed weights become constants;
- look-through ops that compute nothing (Identity, Dropout in inference) are removed.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from segquant_onnx.errors import UserError
from segquant_onnx.ir.graph_io import gs_quiet, relink_external_data
from segquant_onnx.ir.qdq import BFLOAT16, float_dtype
from segquant_onnx.ir.runtime import quiet_onnxruntime, third_party_verbose

log = logging.getLogger(__name__)

MIN_OPSET = 13
HALF_OPSET = 19
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv", "QLinearMatMul",
    "MatMulInteger", "ConvInteger", "QLinearAdd", "QLinearMul",
}


def refuse_quantized(graph: gs.Graph, source: str) -> None:
    found = sorted({n.op for n in graph.nodes if n.op in QUANTIZED_OPS})
    if found:
        raise UserError(
            f"{source} is already quantized (it contains {', '.join(found)}); "
            "pass the floating-point model exported from your framework."
        )


def _raise_opset(graph: gs.Graph, min_opset: int, source: str) -> gs.Graph:
    if graph.opset >= min_opset:
        return graph
    log.info("converting opset %d -> %d", graph.opset, min_opset)
    try:
        model = version_converter.convert_version(gs.export_onnx(graph), min_opset)
    except Exception as exc:  # noqa: BLE001 - the converter raises many kinds; the user needs one sentence
        raise UserError(f"{source} has opset {graph.opset} and onnx's version converter could not raise it to "
                        f"{min_opset} ({type(exc).__name__}: {exc}); export the model with opset {min_opset} "
                        "or later.") from None
    converted = gs.import_onnx(model)
    relink_external_data(graph, converted)  # the converter keeps external references, not where they live
    return converted


def _remove_identities(graph: gs.Graph) -> None:
    """Bypass Identity and Dropout (inference) so patterns see through them."""
    graph_outputs = set(id(t) for t in graph.outputs)
    for node in graph.nodes:
        if node.op not in ("Identity", "Dropout") or not node.inputs:
            continue
        if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
            continue  # the mask is used: not a no-op
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in graph_outputs:
            continue  # keep the graph's output names
        for consumer in list(dst.outputs):
            for i, t in enumerate(consumer.inputs):
                if t is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()
    graph.cleanup()


_SYMBOLIC_MODULE = "segquant_onnx._ort_symbolic_shape_infer"  # also the name its logger gets


@contextlib.contextmanager
def _third_party_quiet():
    """Shape inference and constant folding with their own warnings only at -v (third_party_verbose):
    ONNX Runtime's go through its default logger (folding opens sessions without options), onnx-graphsurgeon's
    are printed to stdout (where `inspect --json -` writes), the symbolic shape inference's come under our
    logger name (it is loaded as our module) and would pass our WARNING level."""
    quiet_onnxruntime()
    if third_party_verbose():
        yield
        return
    symbolic = logging.getLogger(_SYMBOLIC_MODULE)
    symbolic_level = symbolic.level
    symbolic.setLevel(logging.ERROR)
    try:
        with gs_quiet():
            yield
    finally:
        symbolic.setLevel(symbolic_level)


@functools.cache
def _symbolic_shape_inference():
    """ONNX Runtime's SymbolicShapeInference, loaded from its file: importing it as
    `onnxruntime.tools.symbolic_shape_infer` runs `onnxruntime/tools/__init__.py`, which imports torch
    whenever torch is installed (~220 MB and seconds, for nothing the quantizer uses)."""
    path = Path(importlib.util.find_spec("onnxruntime").origin).parent / "tools" / "symbolic_shape_infer.py"
    spec = importlib.util.spec_from_file_location(_SYMBOLIC_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _symbolic_infer(model: onnx.ModelProto) -> onnx.ModelProto:
    """`SymbolicShapeInference.infer_shapes(model, auto_merge=True)` without its last step: where
    inference is incomplete (custom ops, say) it saves the model, weights included, as
    `sym_shape_infer_temp.onnx` + external data into the current directory, i.e. the user's."""
    inference = _symbolic_shape_inference()(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_rank, verbose
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    return inference.out_mp_


def infer_shapes(graph: gs.Graph) -> gs.Graph:
    """Symbolic shape inference (ONNX Runtime's: it resolves shapes through the exporters' Reshape and
    Slice chains that onnx's own inference leaves unknown), falling back to onnx's."""
    model = gs.export_onnx(graph)
    try:
        model = _symbolic_infer(model)
    except Exception as exc:  # best effort: ONNX Runtime still runs the graph without shapes
        log.info("symbolic shape inference failed (%s); using onnx shape inference", exc)
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc2:
            log.warning("shape inference failed (%s); continuing without it", exc2)
            return graph
    inferred = gs.import_onnx(model)
    # keep lazily loaded external weights: copy the value objects back by name
    originals = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Constant)}
    for name, tensor in inferred.tensors().items():
        if isinstance(tensor, gs.Constant):
            tensor.data_location = None  # see graph_io.load_model
            if name in originals:
                tensor._values = originals[name]._values
    inferred.ir_version = graph.ir_version
    return inferred


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes a stable name (`<op>_<index>`) so sites and reports can refer to them."""
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}_{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def canonicalize(graph: gs.Graph, source: str = "the model", min_opset: int = MIN_OPSET,
                 wanted_opset: int | None = None) -> gs.Graph:
    """The graph the passes match on. `min_opset`: the opset the Q/DQ to be written need (13: per-channel
    INT8; 19: FP8). `wanted_opset`: raised to if onnx's converter can, else left with a warning (19: the
    16-bit rest of `--high-precision`, which then stays float32)."""
    refuse_quantized(graph, source)
    half = (np.dtype(np.float16), BFLOAT16)
    if any(isinstance(t, gs.Constant) and float_dtype(t.dtype) in half for t in graph.tensors().values()):
        min_opset = max(min_opset, HALF_OPSET)  # a 16-bit float Q/DQ scale (the DQ's output type) needs opset 19
    graph = _raise_opset(graph, max(min_opset, MIN_OPSET), source)
    if wanted_opset is not None and graph.opset < wanted_opset:
        try:
            graph = _raise_opset(graph, wanted_opset, source)
        except UserError as exc:
            log.warning("%s", exc)
    # ONNX Runtime (which folds constants) lags behind onnx's newest IR version: use the lowest the
    # opsets allow
    opsets = list(graph.import_domains or []) or [onnx.helper.make_opsetid("", graph.opset)]
    graph.ir_version = onnx.helper.find_min_ir_version_for(opsets, ignore_unknown=True)
    with _third_party_quiet():
        graph = infer_shapes(graph)  # shapes first: folding Shape -> Gather -> Div -> Slice needs them
        # ONNX Runtime (gs folds with it) has no bfloat16 CPU kernels: one bfloat16 op in the constant subgraph
        # fails the whole fold, so bfloat16 graphs fold part by part (the Shape -> Slice chains are int64)
        bf16 = any(t.dtype == onnx.TensorProto.BFLOAT16 for t in graph.tensors().values())
        graph.fold_constants(error_ok=True, partitioning="recursive" if bf16 else None).cleanup()
        _remove_identities(graph)
        graph = infer_shapes(graph)
    graph.toposort()
    _name_nodes(graph)
    log.info("canonicalized: %d nodes", len(graph.nodes))
    return graph
