"""ONNX Runtime stays quiet: no third-party warnings on stderr at the default verbosity."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from segquant_onnx.pipeline import inspect_model, quantize


def _unsqueeze_model() -> onnx.ModelProto:
    """X + Unsqueeze(c) -> MatMul(W): constant folding runs Unsqueeze(c) alone as a graph output, which
    ONNX Runtime's UnsqueezeElimination warns it cannot remove (as on BERT exports)."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Unsqueeze", ["c", "axes"], ["c1"], name="unsq"),
             helper.make_node("Add", ["X", "c1"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "W"], ["Y"], name="fc")]
    inits = {"c": np.ones(16, np.float32), "axes": np.array([0], np.int64),
             "W": rng.standard_normal((16, 16)).astype(np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 8, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 8, 16])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _folding_part() -> bytes:
    """What constant folding hands ONNX Runtime for the model above: Unsqueeze(c) as the graph output."""
    graph = helper.make_graph([helper.make_node("Unsqueeze", ["c", "axes"], ["c1"], name="unsq")], "part", [],
                              [helper.make_tensor_value_info("c1", TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(np.ones(16, np.float32), "c"),
                               numpy_helper.from_array(np.array([0], np.int64), "axes")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


@pytest.fixture
def fresh_ort_logger():
    """ONNX Runtime's default logger as a new process has it: warnings on (an earlier test may have
    quietened it). Its C++ logger writes to file descriptor 2, hence capfd in these tests."""
    ort.set_default_logger_severity(2)


def test_quantize_prints_no_onnxruntime_warnings(tmp_path, capfd, caplog, fresh_ort_logger):
    ort.InferenceSession(_folding_part(), providers=["CPUExecutionProvider"])
    if "UnsqueezeElimination" not in capfd.readouterr().err:
        pytest.skip("this ONNX Runtime does not warn on the trigger")
    calib = tmp_path / "calib.npz"
    np.savez(calib, X=np.random.default_rng(1).standard_normal((8, 8, 16)).astype(np.float32))
    caplog.set_level(logging.WARNING, logger="segquant_onnx")  # the CLI's default verbosity
    quantize(_unsqueeze_model(), calib, output=tmp_path / "q.onnx", progress=False)
    err = capfd.readouterr().err
    assert "onnxruntime" not in err and "UnsqueezeElimination" not in err, err


def test_constant_folding_prints_no_graphsurgeon_warnings(tmp_path, capfd, caplog, monkeypatch):
    """A constant input through a custom op ONNX Runtime cannot run: onnx-graphsurgeon's folding warns
    on stdout, where `inspect --json -` writes."""
    monkeypatch.chdir(tmp_path)  # where ONNX Runtime's own infer_shapes would save an incomplete result
    model = _unsqueeze_model()
    model.graph.node[0].CopyFrom(helper.make_node("Foo", ["c"], ["c1"], name="foo", domain="custom"))
    model.opset_import.append(helper.make_opsetid("custom", 1))
    model.graph.value_info.append(helper.make_tensor_value_info("c1", TensorProto.FLOAT, [16]))
    caplog.set_level(logging.WARNING, logger="segquant_onnx")
    assert [s.name for s in inspect_model(model).sites] == ["fc"]
    out, err = capfd.readouterr()
    assert out == "" and err == "", out + err
    assert list(tmp_path.iterdir()) == []  # nothing saved into the working directory


def test_verbose_lets_onnxruntime_warnings_through(capfd, caplog, fresh_ort_logger):
    caplog.set_level(logging.INFO, logger="segquant_onnx")  # -v
    inspect_model(_unsqueeze_model())
    assert "UnsqueezeElimination" in capfd.readouterr().err


def _half_qdq_model(layers: int = 3, width: int = 64) -> onnx.ModelProto:
    """float16 activations through INT8 Q/DQ into MatMuls of INT8 weights dequantized to float16, Tanh between."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "X"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.integers(-127, 128, (width, width), dtype=np.int8), f"w{i}"),
                  numpy_helper.from_array(rng.random(width).astype(np.float16) * 1e-2 + 1e-3, f"ws{i}"),
                  numpy_helper.from_array(np.float16(0.02), f"as{i}"), numpy_helper.from_array(np.int8(0), f"az{i}")]
        nodes += [helper.make_node("QuantizeLinear", [x, f"as{i}", f"az{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"as{i}", f"az{i}"], [f"d{i}"]),
                  helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}"], [f"wd{i}"], axis=1),
                  helper.make_node("MatMul", [f"d{i}", f"wd{i}"], [f"m{i}"]),
                  helper.make_node("Tanh", [f"m{i}"], [f"y{i}"])]
        x = f"y{i}"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT16, [1, 8, width])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT16, [1, 8, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)


def test_large_half_qdq_graphs_dequantize_their_weights_once_with_the_same_outputs(monkeypatch, tmp_path):
    """Over the threshold of weights dequantized to float16, the session folds their DequantizeLinears at
    creation (ONNX Runtime's QDQ transformers off, basic level): the outputs are the bytes of the unfolded run,
    and the graph ONNX Runtime runs has no weight DequantizeLinear left."""
    from segquant_onnx.ir import runtime

    model = _half_qdq_model()
    assert runtime.half_dequantized_bytes(model) == 3 * 64 * 64
    feed = {"X": np.random.default_rng(1).standard_normal((1, 8, 64)).astype(np.float16)}
    small = runtime.session_source(model, None)
    assert not small.half_qdq
    monkeypatch.setattr(runtime, "HALF_WEIGHTS_BASIC_BYTES", 3 * 64 * 64 - 1)
    large = runtime.session_source(model, None)
    assert large.half_qdq
    seen = []
    real_session = ort.InferenceSession
    monkeypatch.setattr(runtime.ort, "InferenceSession", lambda m, opts, **kw: seen.append(opts) or real_session(
        m, opts, **kw))
    np.testing.assert_array_equal(large.open().run(None, feed)[0], small.open().run(None, feed)[0])
    opts = seen[0]
    opts.optimized_model_filepath = str(tmp_path / "as_run.onnx")
    real_session(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    as_run = onnx.load(tmp_path / "as_run.onnx")
    assert [n.op_type for n in as_run.graph.node].count("DequantizeLinear") == 3  # the activations' only
    small_opts = seen[1]
    small_opts.optimized_model_filepath = str(tmp_path / "small_as_run.onnx")
    real_session(model.SerializeToString(), small_opts, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(tmp_path / "small_as_run.onnx").graph.node].count("DequantizeLinear") == 6
