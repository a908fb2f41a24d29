"""The range pass of --high-precision fp16: each float tensor's abs-max over the feeds, reduced inside the graph
right after its producer and run in ONNX Runtime's priority-based order, equal to fetching every tensor."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs
from segquant_onnx.calib.calibrate import observe_ranges, with_abs_max_outputs, with_tensor_outputs
from segquant_onnx.ir.runtime import make_session


def typed(model: onnx.ModelProto) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(model)


def fetched_ranges(model: onnx.ModelProto, names, feeds) -> dict[str, float]:
    """What observe_ranges computed before: every tensor fetched, its abs-max taken in numpy."""
    session = ort.InferenceSession(with_tensor_outputs(model, names).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    fetch = [n for n in names if n in {o.name for o in session.get_outputs()}]
    ranges = {}
    for feed in feeds:
        for name, value in zip(fetch, session.run(fetch, feed)):
            if value.size:
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(value).max()))
        for name in names:
            if name in feed:
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(feed[name]).max(initial=0)))
    return ranges


def test_in_graph_ranges_equal_the_fetched_ones():
    model = typed(build_linear_model("matmul"))
    names = ("X", "h0", "h", "g", "Y") + tuple(v.name for v in model.graph.value_info if v.name.startswith("gelu"))
    feeds = [{"X": x[None] * s} for x, s in zip(calib_inputs("matmul", 5), (1.0, 30.0, 0.01, 7.0, 2.0))]
    got = observe_ranges(model, names, feeds, source_dir=None, providers=("CPUExecutionProvider",))
    want = fetched_ranges(model, names, feeds)
    assert got == want and {"X", "h0", "h", "g", "Y"} <= set(got)


def test_each_reduction_follows_its_producer_and_the_session_runs_in_priority_order():
    model = typed(build_linear_model("matmul"))
    out, peaks = with_abs_max_outputs(model, ("X", "h0", "g", "nowhere"))
    assert list(peaks) == ["h0", "g"]  # X is a graph input (read from the feeds), "nowhere" has no known type
    ops = [(n.op_type, list(n.input)) for n in out.graph.node]
    for name, peak in peaks.items():
        at = next(i for i, n in enumerate(out.graph.node) if name in n.output)
        assert ops[at + 1] == ("Abs", [name]) and out.graph.node[at + 2].output == [peak]
        assert out.graph.node[at + 2].op_type == "ReduceMax"
    assert len(model.graph.node) + 4 == len(out.graph.node)  # the input model is left as it was
    order = lambda **kw: make_session(out, None, **kw).get_session_options().execution_order  # noqa: E731
    assert order(priority_order=True) == ort.ExecutionOrder.PRIORITY_BASED
    assert order() == ort.ExecutionOrder.DEFAULT  # every other session keeps ONNX Runtime's default


def test_an_empty_tensor_is_not_observed():
    """A Slice that keeps nothing: the fetched version skipped it (size 0); in the graph its ReduceMax is -inf."""
    nodes = [helper.make_node("Slice", ["X", "start", "end"], ["empty"]),
             helper.make_node("Relu", ["X"], ["Y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3]),
                               helper.make_tensor_value_info("empty", TensorProto.FLOAT, [0, 3])],
                              [numpy_helper.from_array(np.array([1], np.int64), "start"),
                               numpy_helper.from_array(np.array([1], np.int64), "end")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    feeds = [{"X": np.array([[1.0, -4.0, 2.0], [0.5, 3.0, -1.0]], np.float32)}]
    got = observe_ranges(model, ("Y", "empty"), feeds, source_dir=None, providers=("CPUExecutionProvider",))
    assert got == {"Y": 3.0} == fetched_ranges(model, ("Y", "empty"), feeds)
