"""The unquantized rest of a float32 graph in float16 or bfloat16 (`--high-precision`), where calibrated
ranges and the op allow it.

A strongly typed TensorRT builds exactly the types written in the graph, so an INT8 graph whose rest is
float32 runs that rest in float32, slower than the plain float16 engine a user already has. This pass writes
every node in the 16-bit type except:

- nodes whose float inputs or outputs were observed (or, for constants, are) beyond RANGE_LIMIT in magnitude
  (float16 only: bfloat16 has float32's range). Real diffusion UNets carry skip activations near 1e11 and
  SiLU outputs near 2.5e5; calibration measures every tensor's abs-max (`ranges`), and a tensor never
  observed counts as out of range;
- ops whose 16-bit computation is known to break (KEEP_FP32, each with the reason);
- Casts, Q/DQ and shape arithmetic, which keep their own types.

Graph inputs and outputs keep float32: Casts at the boundaries, one per tensor. Q/DQ follow the types
around them (ONNX: a QuantizeLinear's input and scale share a type; a DequantizeLinear outputs its scale's
type): each Q's scale takes its input's type, each DQ's scale its consumer's.

A scale float16 cannot hold within 2^-8 (relative; below ~7.6e-6, or underflowing) keeps its site
float32: the DequantizeLinear's consumer stays float32, and a QuantizeLinear whose input is float16 gets a
Cast to float32 in front, so Q and DQ always use the same scale.

Why not a library: onnxconverter-common 1.16's `convert_float_to_float16` (the maintained converter), tried
on the tiny SD3/FLUX exports and their INT8 outputs: it relabels the outputs of existing `Cast(to=FLOAT)` as
float16 without changing `to` (ONNX Runtime refuses both TorchScript exports: SD3 at the timestep
projection's Cast, FLUX at a Mul), writes float16 Q/DQ scales at opsets 17/18 where DequantizeLinear takes
float32 only (all four INT8 models refused), has no bfloat16, and knows no ranges (a blocked node's outputs
still go through float16 Casts: a 1e6 tensor came out inf). onnx-graphsurgeon does the graph surgery here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.canonicalize import HALF_OPSET  # a 16-bit float Q/DQ scale needs opset 19
from segquant_onnx.ir.qdq import BFLOAT16, float_dtype

RANGE_LIMIT = 32768.0  # half of float16's largest finite value (65504): headroom over what calibration saw

# op -> why it stays float32
KEEP_FP32 = {
    "ReduceMean": "long reductions accumulate in the output type: LayerNorm/RMSNorm statistics lose precision",
    "ReduceSum": "long reductions accumulate in the output type",
    "ReduceSumSquare": "squares of activations overflow float16 and accumulate over long axes",
    "ReduceL2": "squares of activations overflow float16",
    "ReduceLogSumExp": "exp overflows float16 above 11",
    "Pow": "x^2 in norm decompositions overflows float16 for |x| > 256",
    "Sqrt": "the variance it reads is float32 (ReduceMean), and 1/sqrt of a tiny variance overflows",
    "Reciprocal": "1/x of small normalisation statistics overflows float16",
    "Exp": "exp(x) overflows float16 for x > 11",
    "Sin": "timestep embeddings take sin/cos of arguments up to ~1000: float16 keeps no phase there",
    "Cos": "timestep embeddings take sin/cos of arguments up to ~1000: float16 keeps no phase there",
    "Range": "positions and frequencies from Range lose integers above 2048 in float16",
    "CumSum": "running sums accumulate in the output type",
    "RandomNormal": "sampling in float16 changes the distribution's tails",
    "RandomNormalLike": "sampling in float16 changes the distribution's tails",
    "RandomUniform": "sampling in float16 changes the distribution",
    "RandomUniformLike": "sampling in float16 changes the distribution",
    "Resize": "its scales input must stay float32",
    "Upsample": "its scales input must stay float32",
}
_OWN_TYPES = {"Cast", "CastLike", "QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Size",
              "ConstantOfShape", "NonZero"}
_TO = {np.dtype(np.float16): onnx.TensorProto.FLOAT16, BFLOAT16: onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class RestReport:
    """What the conversion did: nodes written in the 16-bit type, nodes kept float32 by reason, Casts added."""

    dtype: str
    converted: int
    kept: dict = field(default_factory=dict)  # reason -> node count
    casts: int = 0
    skipped: str | None = None  # why nothing was converted (the model is 16-bit already)

    def to_dict(self) -> dict:
        out = {"dtype": self.dtype, "converted_nodes": self.converted, "kept_float32": dict(self.kept),
               "casts_added": self.casts}
        return out if self.skipped is None else {**out, "skipped": self.skipped}


def weights_float_type(graph: gs.Graph) -> np.dtype | None:
    """The float type holding most of the graph's constant elements (its weights): what the model was
    exported in. None for a graph without float constants."""
    sizes: Counter = Counter()
    for t in graph.tensors().values():
        if isinstance(t, gs.Constant) and float_dtype(t.dtype) is not None:
            sizes[float_dtype(t.dtype)] += int(np.prod(t.shape, dtype=np.int64))
    return sizes.most_common(1)[0][0] if sizes else None


def why_rest_stays(graph: gs.Graph, model_type: np.dtype | None) -> str | None:
    """Why --high-precision leaves the rest as it is (None: it converts): it converts a float32 model's rest,
    and a 16-bit Q/DQ scale needs opset 19 (canonicalize raises the opset when onnx's converter can)."""
    if model_type is not None and model_type != np.float32:
        return f"the model is {'bfloat16' if model_type == BFLOAT16 else model_type}: its rest keeps that type"
    if graph.opset < HALF_OPSET:
        return (f"opset {graph.opset} could not be raised to {HALF_OPSET} (16-bit Q/DQ scales): the rest stays "
                "float32")
    return None


def _is_f32(t: gs.Tensor) -> bool:
    return float_dtype(t.dtype) == np.float32


def _fits(t: gs.Tensor, ranges, limit: float | None) -> bool:
    if limit is None:
        return True
    if isinstance(t, gs.Constant):  # also no nonzero value below float16's smallest subnormal (it would be 0)
        values = np.abs(constant_values(t).astype(np.float64))
        nonzero = values[values > 0]
        return values.size == 0 or float(values.max()) <= limit and not (nonzero < 2.0**-24).any()
    r = ranges.get(t.name)
    return r is not None and r <= limit


def _reason(node: gs.Node, ranges, limit) -> str | None:
    """Why a node that computes in float32 stays float32 (None: it converts)."""
    if node.op in KEEP_FP32:
        return node.op
    if any(float_dtype(t.dtype) not in (None, np.dtype(np.float32)) for t in [*node.inputs, *node.outputs]):
        return "mixes float types"
    floats = [t for t in [*node.inputs, *node.outputs] if _is_f32(t)]
    return "beyond float16's range or unobserved" if any(not _fits(t, ranges, limit) for t in floats) else None


def float32_tensors(graph: gs.Graph) -> tuple[str, ...]:
    """The float32 activations whose calibrated range the float16 conversion needs."""
    return tuple(t.name for t in graph.tensors().values() if isinstance(t, gs.Variable) and _is_f32(t))


def convert_rest(graph: gs.Graph, dtype: str, ranges: dict[str, float]) -> RestReport:
    """Write `graph`'s float32 rest in `dtype` ("fp16" or "bf16") in place; `ranges`: tensor -> calibrated
    abs-max. Returns what was done. `graph` must be toposorted, with tensor types known."""
    half = np.dtype(np.float16) if dtype == "fp16" else BFLOAT16
    limit = RANGE_LIMIT if dtype == "fp16" else None
    namer = Namer(graph)
    kept: Counter = Counter()
    in_half: set[int] = set()
    for node in graph.nodes:
        if node.op in _OWN_TYPES or not any(_is_f32(t) for t in [*node.inputs, *node.outputs]):
            continue
        reason = _reason(node, ranges, limit)
        if reason is None and any(t.inputs and t.inputs[0].op == "DequantizeLinear"
                                  and not representable(t.inputs[0].inputs[1], half) for t in node.inputs):
            reason = "a DequantizeLinear scale float16 cannot hold"
        if reason is None:
            in_half.add(id(node))
        else:
            kept[reason] += 1
    casts = _retype(graph, namer, in_half, half)
    _retype_qdq(graph, namer, in_half, half)
    graph.cleanup().toposort()
    return RestReport(dtype, len(in_half), dict(kept), casts)


def _retype(graph: gs.Graph, namer: Namer, in_half: set[int], half: np.dtype) -> int:
    """Convert the nodes in `in_half`: their float32 outputs become `half` (a Cast back for float32 readers
    and graph outputs), their float32 inputs from elsewhere are cast in (constants converted in place when
    only converted nodes read them)."""
    to_half: dict[str, gs.Tensor] = {}
    casts = 0
    outputs = {id(t) for t in graph.outputs}
    for node in graph.nodes:
        if id(node) not in in_half:
            continue
        for i, t in enumerate(node.outputs):
            if not _is_f32(t):
                continue
            readers = list(t.outputs)
            float_readers = [r for r in readers if id(r) not in in_half and r.op != "QuantizeLinear"]
            if id(t) in outputs or float_readers:
                h = gs.Variable(namer(t.name, "half"), half, t.shape)
                node.outputs[i] = h
                for r in readers:
                    if id(r) in in_half:
                        for j, x in enumerate(list(r.inputs)):
                            if x is t:
                                r.inputs[j] = h
                graph.nodes.append(gs.Node("Cast", namer(t.name, "to_float"), {"to": onnx.TensorProto.FLOAT},
                                           inputs=[h], outputs=[t]))
                casts += 1
                t = h
            else:
                t.dtype = half
            to_half[t.name] = t
    for node in list(graph.nodes):
        if id(node) not in in_half:
            continue
        for i, t in enumerate(node.inputs):
            if not _is_f32(t) or t.name in to_half and to_half[t.name] is t:
                continue
            if t.inputs and t.inputs[0].op == "DequantizeLinear":
                continue  # the DQ outputs `half` itself (_retype_qdq)
            if isinstance(t, gs.Constant) and all(id(r) in in_half for r in t.outputs):
                t.values = constant_values(t).astype(half)
                continue
            if isinstance(t, gs.Constant):
                node.inputs[i] = gs.Constant(namer(t.name, "half"), constant_values(t).astype(half))
                continue
            if t.name not in to_half:
                h = gs.Variable(namer(t.name, "half"), half, t.shape)
                graph.nodes.append(gs.Node("Cast", namer(t.name, "to_half"), {"to": _TO[half]}, inputs=[t],
                                           outputs=[h]))
                casts += 1
                to_half[t.name] = h
            node.inputs[i] = to_half[t.name]
    return casts


def representable(scale: gs.Tensor, half: np.dtype) -> bool:
    """Whether `half` holds the scale's values within 2^-8 (relative) and > 0."""
    values = constant_values(scale).astype(np.float64) if isinstance(scale, gs.Constant) else None
    if values is None:
        return False
    rounded = values.astype(half).astype(np.float64)
    return bool(np.all(rounded > 0) and np.all(np.abs(rounded - values) <= values * 2.0**-8))


def _retype_qdq(graph: gs.Graph, namer: Namer, in_half: set[int], half: np.dtype) -> None:
    """Each QuantizeLinear's scale in its input's type; each DequantizeLinear's scale (hence output) in its
    consumer's: a converted consumer reads `half`. A scale shared by a Q and a DQ that differ is split. A Q
    reading `half` whose scale `half` cannot hold reads a float32 Cast of its input instead."""
    for node in list(graph.nodes):
        if node.op == "QuantizeLinear":
            want = float_dtype(node.inputs[0].dtype) or np.dtype(np.float32)
            if want == half and not representable(node.inputs[1], half):
                x = node.inputs[0]
                x32 = gs.Variable(namer(x.name, "to_float_for_q"), np.float32, x.shape)
                graph.nodes.append(gs.Node("Cast", namer(x.name, "cast_for_q"), {"to": onnx.TensorProto.FLOAT},
                                           inputs=[x], outputs=[x32]))
                node.inputs[0], want = x32, np.dtype(np.float32)
        elif node.op == "DequantizeLinear":
            readers = node.outputs[0].outputs
            want = half if readers and all(id(r) in in_half for r in readers) else np.dtype(np.float32)
            node.outputs[0].dtype = want
        else:
            continue
        scale = node.inputs[1]
        if float_dtype(scale.dtype) != want:
            node.inputs[1] = gs.Constant(namer(scale.name, str(want)), constant_values(scale).astype(want))
