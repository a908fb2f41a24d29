"""Read-only index of an ONNX graph for the TensorRT checker: producers, consumers, constants, dtypes.

Values are read only when asked for (scales and zero points), so a model loaded without its external
data is checked in bounded memory: pass the directory its data lives in as `base_dir`.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx.ir.graph_io import external_base

GEMM_OPS = ("MatMul", "Gemm", "Conv", "ConvTranspose")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# Q/DQ commute with these (data movement, or max): TensorRT moves Q/DQ across them to fuse
# (developer guide, "Q/DQ propagation"); the data is input 0.
COMMUTING = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Slice", "Split",
             "Gather", "Expand", "MaxPool", "Concat")
GRAPH_OUTPUT = "<graph output>"


def node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<{node.op_type} #{index}>"


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _constant_node_tensor(node: onnx.NodeProto) -> TensorProto | None:
    for a in node.attribute:
        if a.name == "value":
            return a.t
        if a.name in ("value_float", "value_floats", "value_int", "value_ints"):
            value = helper.get_attribute_value(a)
            dtype = TensorProto.FLOAT if "float" in a.name else TensorProto.INT64
            dims = [len(value)] if isinstance(value, list) else []
            return helper.make_tensor(node.output[0], dtype, dims, value if isinstance(value, list) else [value])
    return None


class GraphIndex:
    def __init__(self, model: onnx.ModelProto, base_dir=None):  # graph_io.BaseDir
        graph = model.graph
        self.base_dir = base_dir
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.nodes = list(graph.node)
        self.names = {id(n): node_name(n, i) for i, n in enumerate(self.nodes)}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.constants: dict[str, TensorProto] = {t.name: t for t in graph.initializer}
        self.dtypes: dict[str, int] = {t.name: t.data_type for t in graph.initializer}
        self.shapes: dict[str, tuple] = {t.name: tuple(t.dims) for t in graph.initializer}
        for vi in list(graph.input) + list(graph.value_info) + list(graph.output):
            tt = vi.type.tensor_type
            if tt.elem_type:
                self.dtypes.setdefault(vi.name, tt.elem_type)
            if tt.HasField("shape"):
                dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)
                self.shapes.setdefault(vi.name, dims)
        for node in self.nodes:
            for out in node.output:
                self.producer[out] = node
            for i in dict.fromkeys(node.input):
                if i:
                    self.consumers.setdefault(i, []).append(node)
            if node.op_type == "Constant" and (t := _constant_node_tensor(node)) is not None:
                self.constants[node.output[0]] = t
                self.dtypes[node.output[0]], self.shapes[node.output[0]] = t.data_type, tuple(t.dims)
        for node in self.nodes:  # a Q's output type is its zero point's (or output_dtype, or UINT8)
            if node.op_type == "QuantizeLinear":
                self.dtypes.setdefault(node.output[0], self.quant_type(node))

    def name(self, node: onnx.NodeProto) -> str:
        return self.names[id(node)]

    def constant(self, name: str) -> TensorProto | None:
        """The constant behind `name` (an initializer or a Constant node, also through Identity)."""
        while name not in self.constants and (p := self.producer.get(name)) is not None and p.op_type == "Identity":
            name = p.input[0]
        return self.constants.get(name)

    def is_static(self, name: str) -> bool:
        """Computed from constants only (TensorRT folds it at build time): no graph input above it."""
        seen, stack = set(), [name]
        while stack:
            t = stack.pop()
            if t in seen or t in self.constants:
                continue
            seen.add(t)
            p = self.producer.get(t)
            if p is None:
                return False  # a graph input
            stack.extend(i for i in p.input if i)
        return True

    def array(self, tensor: TensorProto) -> np.ndarray:
        return numpy_helper.to_array(tensor, external_base(self.base_dir, tensor))

    def is_weight(self, name: str) -> bool:
        """A constant, or a QuantizeLinear of one (float weight -> Q -> DQ, as ModelOpt writes)."""
        p = self.producer.get(name)
        return self.constant(name) is not None or (
            p is not None and p.op_type == "QuantizeLinear" and self.constant(p.input[0]) is not None)

    def shape(self, name: str) -> tuple | None:
        """A tensor's shape where known (a Q/DQ output has its input's)."""
        p = self.producer.get(name)
        if name not in self.shapes and p is not None and p.op_type in QDQ_OPS:
            return self.shape(p.input[0])
        c = self.constant(name)
        return tuple(c.dims) if c is not None else self.shapes.get(name)

    def quant_type(self, node: onnx.NodeProto) -> int | None:
        """The quantized dtype of a Q/DQ: its zero point's, else output_dtype (Q) or input 0's (DQ)."""
        if len(node.input) > 2 and node.input[2]:
            zp = self.constant(node.input[2])
            return zp.data_type if zp is not None else self.dtypes.get(node.input[2])
        if node.op_type == "DequantizeLinear":
            return self.dtypes.get(node.input[0])
        return attrs(node).get("output_dtype") or TensorProto.UINT8

    def source(self, name: str) -> tuple[str, onnx.NodeProto | None]:
        """Walk back from `name` through commuting single-input ops (not Concat) to the real producer."""
        p = self.producer.get(name)
        while p is not None and p.op_type in COMMUTING and p.op_type != "Concat":
            name = p.input[0]
            p = self.producer.get(name)
        return name, p

    def sinks(self, name: str) -> Iterator[tuple[str, onnx.NodeProto | None, int]]:
        """(tensor, consumer, input index) reached from `name` through commuting ops; consumer None
        for a graph output."""
        stack, seen = [name], set()
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            if t in self.outputs:
                yield t, None, -1
            for c in self.consumers.get(t, []):
                if c.op_type in COMMUTING and (c.op_type == "Concat" or c.input[0] == t):
                    stack.extend(c.output)
                else:
                    yield t, c, list(c.input).index(t)

    def weight_source(self, node: onnx.NodeProto) -> onnx.NodeProto | None:
        """For a GEMM op: the DequantizeLinear of a constant its weight (input 1) is read through."""
        if len(node.input) < 2:
            return None
        _, p = self.source(node.input[1])
        return p if p is not None and p.op_type == "DequantizeLinear" and self.is_weight(p.input[0]) else None

    def is_weighted(self, node: onnx.NodeProto) -> bool:
        """MatMul/Gemm/Conv/ConvTranspose whose weight is a constant or a dequantized constant."""
        return node.op_type in GEMM_OPS and len(node.input) > 1 and (
            self.constant(self.source(node.input[1])[0]) is not None or self.weight_source(node) is not None)
