"""Canonicalize: refuse quantized graphs, fold exporter arithmetic into constants, look through no-ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs, run_model
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.errors import UserError
from segquant_onnx.passes import FindLinearSites
from segquant_onnx.plan import QuantPlan


def find_sites(graph: gs.Graph):
    """(sites, declined) of FindLinearSites on `graph`."""
    plan = FindLinearSites().detect(graph, QuantPlan(sites=()))
    return list(plan.sites), list(plan.declined)


def make_model(nodes, inputs, outputs, inits, opset=17, value_info=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()],
                              value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset >= 13 else 6
    onnx.checker.check_model(model)
    return model


def fvi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def same_outputs(before: onnx.ModelProto, after: gs.Graph, feeds) -> None:
    for a, b in zip(run_model(before, feeds), run_model(gs.export_onnx(after), feeds)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)


W = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
FEEDS = {"X": calib_inputs("matmul", 1)}


@pytest.mark.parametrize("op", ["QuantizeLinear", "DequantizeLinear"])
def test_graph_with_qdq_is_refused_naming_the_op(op):
    q_inits = {"s": np.array(0.1, np.float32), "zp": np.array(0, np.int8)}
    if op == "QuantizeLinear":
        nodes = [helper.make_node("QuantizeLinear", ["X", "s", "zp"], ["Xq"]),
                 helper.make_node("DequantizeLinear", ["Xq", "s", "zp"], ["Xd"]),
                 helper.make_node("MatMul", ["Xd", "W"], ["Y"])]
        inits = {**q_inits, "W": W}
    else:  # weight-only: INT8 weight -> DequantizeLinear, no QuantizeLinear anywhere
        nodes = [helper.make_node("DequantizeLinear", ["Wq", "s", "zp"], ["Wd"]),
                 helper.make_node("MatMul", ["X", "Wd"], ["Y"])]
        inits = {**q_inits, "Wq": np.ones((16, 32), np.int8)}
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], inits)
    with pytest.raises(UserError, match=f"already quantized.*{op}") as exc:
        canonicalize(gs.import_onnx(model), "model.onnx")
    assert "model.onnx" in str(exc.value)


def test_graph_with_matmul_integer_is_refused():
    nodes = [helper.make_node("MatMulInteger", ["X", "W"], ["Y"])]
    inputs = [helper.make_tensor_value_info("X", TensorProto.INT8, [1, 16])]
    outputs = [helper.make_tensor_value_info("Y", TensorProto.INT32, [1, 32])]
    model = make_model(nodes, inputs, outputs, {"W": np.ones((16, 32), np.int8)})
    with pytest.raises(UserError, match="MatMulInteger"):
        canonicalize(gs.import_onnx(model))


def test_transposed_constant_weight_is_folded_for_the_pass():
    """PyTorch exports nn.Linear as MatMul(X, Transpose(W[out, in]))."""
    w_t = np.ascontiguousarray(W.T)  # [32, 16] as stored by torch
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"Wt": w_t})
    graph = canonicalize(gs.import_onnx(model))
    assert [n.op for n in graph.nodes] == ["MatMul"]
    weight = graph.nodes[0].inputs[1]
    assert isinstance(weight, gs.Constant)
    np.testing.assert_array_equal(weight.values, W)
    sites, declined = find_sites(graph)
    assert [(s.name, s.weight_shape, s.weight_axis) for s in sites] == [("fc", (16, 32), 1)]
    assert not declined
    same_outputs(model, graph, FEEDS)


def _chunk_model(shape_of: str, value_info: bool) -> onnx.ModelProto:
    """h = X @ W[16, 64]; Y = h[..., : shape(t)[-1] / 2] with the bound computed in the graph."""
    w = np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["X", "W"], ["h"], name="fc"),
        helper.make_node("Shape", [shape_of], ["shape"]),
        helper.make_node("Gather", ["shape", "last"], ["dim"], axis=0),
        helper.make_node("Div", ["dim", "two"], ["half"]),
        helper.make_node("Slice", ["h", "zero", "half", "axes"], ["Y"], name="chunk"),
    ]
    inits = {"W": w, "last": np.array([2], np.int64), "two": np.array([2], np.int64),
             "zero": np.array([0], np.int64), "axes": np.array([2], np.int64)}
    x_dim = 64 if shape_of == "X" else 16
    if shape_of == "X":  # a second input only to take its shape
        nodes[1] = helper.make_node("Shape", ["S"], ["shape"])
    inputs = [fvi("X", [1, 8, 16])] + ([fvi("S", [1, 8, x_dim])] if shape_of == "X" else [])
    vi = [fvi("h", [1, 8, 64])] if value_info else []
    return make_model(nodes, inputs, [fvi("Y", [1, 8, 32])], inits, value_info=vi)


@pytest.mark.parametrize("shape_of, value_info", [
    ("X", False),  # Shape of a graph input
    ("h", True),  # Shape of an intermediate tensor the exporter annotated
    ("h", False),  # Shape of an intermediate tensor without value_info: needs shape inference first
])
def test_shape_gather_div_slice_chain_becomes_constants(shape_of, value_info):
    model = _chunk_model(shape_of, value_info)
    graph = canonicalize(gs.import_onnx(model))
    ops = [n.op for n in graph.nodes]
    assert not {"Shape", "Gather", "Div"} & set(ops), ops
    (chunk,) = [n for n in graph.nodes if n.op == "Slice"]
    bounds = chunk.inputs[1:]
    assert all(isinstance(t, gs.Constant) for t in bounds)
    np.testing.assert_array_equal(bounds[1].values, [32])
    out = graph.outputs[0]
    assert out.shape is not None and list(out.shape) == [1, 8, 32]


def test_identity_on_a_weight_is_folded():
    nodes = [helper.make_node("Identity", ["W0"], ["W"]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"W0": W})
    graph = canonicalize(gs.import_onnx(model))
    assert [n.op for n in graph.nodes] == ["MatMul"]
    (site,), _ = find_sites(graph)
    weight = graph.nodes[0].inputs[1]
    assert isinstance(weight, gs.Constant) and site.weight == weight.name
    np.testing.assert_array_equal(weight.values, W)


@pytest.mark.parametrize("op", ["Identity", "Dropout"])
def test_identity_and_dropout_on_an_activation_are_looked_through(op):
    nodes = [helper.make_node(op, ["X"], ["Xi"], name="noop"),
             helper.make_node("MatMul", ["Xi", "W"], ["h"], name="fc"),
             helper.make_node("Relu", ["h"], ["Y"])]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"W": W})
    graph = canonicalize(gs.import_onnx(model))
    assert [n.op for n in graph.nodes] == ["MatMul", "Relu"]
    assert graph.nodes[0].inputs[0] is graph.inputs[0]
    (site,), _ = find_sites(graph)
    assert site.activation == "X"
    same_outputs(model, graph, FEEDS)


def test_identity_feeding_a_graph_output_keeps_the_output_name():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"], name="fc"),
             helper.make_node("Identity", ["h"], ["Y"])]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"W": W})
    graph = canonicalize(gs.import_onnx(model))
    assert [t.name for t in graph.outputs] == ["Y"]
    same_outputs(model, graph, FEEDS)


def test_opset_11_is_raised_to_13_and_still_computes_the_same():
    model = build_linear_model("matmul", opset=11)
    graph = canonicalize(gs.import_onnx(model))
    assert graph.opset >= 13
    exported = gs.export_onnx(graph)
    onnx.checker.check_model(exported)
    assert {o.version for o in exported.opset_import if o.domain in ("", "ai.onnx")} == {graph.opset}
    same_outputs(model, graph, FEEDS)
    assert len(find_sites(graph)[0]) == 2


def test_unnamed_nodes_get_stable_unique_names():
    nodes = [helper.make_node("MatMul", ["X", "W"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"], name="Relu_1"),
             helper.make_node("Relu", ["r"], ["Y"])]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"W": W})
    names = [n.name for n in canonicalize(gs.import_onnx(model)).nodes]
    again = [n.name for n in canonicalize(gs.import_onnx(model)).nodes]
    assert all(names) and len(set(names)) == len(names) and names == again


def test_canonical_linear_model_is_unchanged_in_value():
    model = build_linear_model("matmul")
    graph = canonicalize(gs.import_onnx(model))
    same_outputs(model, graph, FEEDS)
    assert all(t.dtype is not None for t in graph.tensors().values())


def test_transposed_weight_is_folded_in_a_model_with_the_newest_ir_version():
    nodes = [helper.make_node("Transpose", ["Wt"], ["W"], perm=[1, 0]),
             helper.make_node("MatMul", ["X", "W"], ["Y"], name="fc")]
    model = make_model(nodes, [fvi("X", [1, 8, 16])], [fvi("Y", [1, 8, 32])], {"Wt": np.ascontiguousarray(W.T)})
    model.ir_version = 14  # what onnx 1.23 helper.make_model writes by default; ORT 1.31 reads up to 13
    graph = canonicalize(gs.import_onnx(model))
    sites, declined = find_sites(graph)
    assert [s.name for s in sites] == ["fc"] and not declined
