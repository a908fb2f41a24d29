"""The weight store (ir/weights.py), the streamed external-data writer (graph_io.write_external), and the
evaluation sessions that never live together (analysis/evaluate.compare_outputs)."""

from __future__ import annotations

import os
import weakref

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import build_linear_model, calib_inputs, run_model, save
from segquant_onnx.analysis.evaluate import compare_outputs
from segquant_onnx.ir import weights
from segquant_onnx.ir.graph_io import constant_values, export_model, import_graph, load_model, save_model
from segquant_onnx.ir.runtime import make_session


def test_spill_leaves_lazy_references_with_the_same_values(tmp_path, monkeypatch):
    monkeypatch.setattr(weights, "SPILL_BYTES", 1024)
    graph = import_graph(build_linear_model(hidden=64))
    big = gs.Constant("big", np.arange(512, dtype=np.float32).reshape(16, 32))
    small = gs.Constant("small", np.ones(8, np.float32))
    graph.nodes.append(gs.Node("Add", inputs=[big, big], outputs=[gs.Variable("unused", np.float32)]))
    graph.nodes.append(gs.Node("Add", inputs=[small, small], outputs=[gs.Variable("unused2", np.float32)]))
    store = weights.WeightStore(None, str(tmp_path))
    assert store.spill(graph) == 2048
    assert isinstance(big._values, gs.ir.tensor.LazyValues) and not isinstance(small._values, gs.ir.tensor.LazyValues)
    np.testing.assert_array_equal(constant_values(big), np.arange(512, dtype=np.float32).reshape(16, 32))
    assert store.spill(graph) == 0  # nothing in memory left
    model = export_model(graph)
    big_proto = next(t for t in model.graph.initializer if t.name == "big")
    assert big_proto.data_location == onnx.TensorProto.EXTERNAL and not big_proto.raw_data
    assert store.locate(onnx.external_data_helper.ExternalDataInfo(big_proto).location) == str(tmp_path)


def test_sessions_read_spilled_and_input_weights_from_one_folder_and_unlink_after(tmp_path, monkeypatch):
    """An input with external data plus spilled weights: the session is made with the input's data file
    linked beside the spills, and the link is gone afterwards (onnx refuses files with several links)."""
    monkeypatch.setattr(weights, "SPILL_BYTES", 64)
    (tmp_path / "in").mkdir()
    src = save(build_linear_model(), tmp_path / "in" / "m.onnx", external=True)
    loaded = load_model(src)
    graph = loaded.graph
    w = next(t for t in graph.tensors().values() if isinstance(t, gs.Constant) and t.name == "W1")
    doubled = gs.Constant("W1x2", np.asarray(constant_values(w)) * 2)
    for node in graph.nodes:
        for i, t in enumerate(node.inputs):
            if t is w:
                node.inputs[i] = doubled
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    store = weights.WeightStore(str(src.parent), str(scratch), loaded.files[1:])
    assert store.spill(graph) > 0
    x = calib_inputs("matmul", 1)[0:1]
    got = make_session(export_model(graph), store).run(None, {"X": x})[0]
    assert [p.name for p in scratch.iterdir() if not p.name.startswith(weights.SPILL_PREFIX)] == []
    assert os.stat(loaded.files[1]).st_nlink == 1
    reference = build_linear_model()
    for t in reference.graph.initializer:
        if t.name == "W1":
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * 2, "W1"))
    np.testing.assert_allclose(got, run_model(reference, {"X": x})[0], rtol=1e-6)


def test_save_streams_external_data_as_onnx_writes_it(tmp_path):
    """save_model's tensor-by-tensor writer gives the bytes onnx.save_model gives with external data."""
    (tmp_path / "in").mkdir()
    src = save(build_linear_model(hidden=256), tmp_path / "in" / "m.onnx", external=True)
    ours = save_model(onnx.load(str(src), load_external_data=False), tmp_path / "a.onnx", source_dir=str(src.parent))
    theirs = onnx.load(str(src))
    for t in onnx.external_data_helper._get_all_tensors(theirs):
        if t.HasField("raw_data") and len(t.raw_data) >= 1024:
            onnx.external_data_helper.set_external_data(t, location="b.onnx.data")
    onnx.save_model(theirs, str(tmp_path / "b.onnx"))
    assert (tmp_path / "a.onnx.data").read_bytes() == (tmp_path / "b.onnx.data").read_bytes()
    assert ours.read_bytes().replace(b"a.onnx.data", b"b.onnx.data") == (tmp_path / "b.onnx").read_bytes()


def test_float_and_quantized_evaluation_sessions_never_live_together():
    alive, most = weakref.WeakSet(), []

    class Session:
        def __init__(self, scale):
            self.scale = scale
            alive.add(self)
            most.append(len(alive))

        def get_outputs(self):
            return [type("O", (), {"name": "Y"})()]

        def run(self, names, feed):
            return [feed["X"] * self.scale]

    feeds = [{"X": np.full(4, float(i + 1))} for i in range(3)]
    for total in (3, None):  # a data set read twice, and a one-pass iterable (kept)
        most.clear()
        data = feeds if total else iter(feeds)
        errors = compare_outputs(lambda: Session(1.0), lambda: Session(1.1), data, progress=False, total=total)
        assert max(most) == 1
        assert errors["Y"].sqnr == pytest.approx(20.0)  # noise is 10% of the signal in amplitude


def test_bfloat16_model_with_spilled_and_input_weights_runs(tmp_path, monkeypatch):
    """A bfloat16 graph (ONNX Runtime runs its float32 shadow) whose weights come from the input's external data
    and from a spill: the shadow reads them before the input's file is linked for the session."""
    import ml_dtypes
    from onnx import TensorProto, helper

    monkeypatch.setattr(weights, "SPILL_BYTES", 64)
    w = (np.arange(16 * 8, dtype=np.float32).reshape(16, 8) / 64).astype(ml_dtypes.bfloat16)
    w_proto = helper.make_tensor("W", TensorProto.BFLOAT16, w.shape, w.view(np.uint16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["X"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xb", "W"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["Y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "bf16", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 8])], initializer=[w_proto])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (tmp_path / "in").mkdir()
    loaded = load_model(save(model, tmp_path / "in" / "bf16.onnx", external=True))
    g = loaded.graph
    mm = next(n for n in g.nodes if n.op == "MatMul")
    doubled = gs.Constant("W2", (np.asarray(constant_values(mm.inputs[1]), np.float32) * 2).astype(ml_dtypes.bfloat16))
    y2 = gs.Variable("y2b", dtype=ml_dtypes.bfloat16)
    g.nodes.append(gs.Node("MatMul", inputs=[mm.inputs[0], doubled], outputs=[y2]))
    y2f = gs.Variable("Y2", dtype=np.float32, shape=[2, 8])
    g.nodes.append(gs.Node("Cast", attrs={"to": TensorProto.FLOAT}, inputs=[y2], outputs=[y2f]))
    g.outputs.append(y2f)
    (tmp_path / "scratch").mkdir()
    store = weights.WeightStore(str(loaded.path.parent), str(tmp_path / "scratch"), loaded.files[1:])
    assert store.spill(g) > 0
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    y, y2 = make_session(export_model(g), store).run(None, {"X": x})
    np.testing.assert_allclose(y2, 2 * y, rtol=1e-2)
    np.testing.assert_allclose(y, x.astype(ml_dtypes.bfloat16).astype(np.float32) @ w.astype(np.float32), rtol=1e-2)


def test_stored_weights_are_reused_only_for_the_same_weight_and_scale(tmp_path, monkeypatch):
    """StoredWeights (what the held-back candidates and the output share): a weight quantized with a scale before
    and spilled is read back, never another weight's bytes (two sites with same-shaped weights) or the same
    weight's bytes under another scale; every reuse gets its own tensor name when exported."""
    from segquant_onnx.formats import INT8
    from segquant_onnx.ir.naming import Namer
    from segquant_onnx.ir.qdq import stored_weight_input

    monkeypatch.setattr(weights, "SPILL_BYTES", 64)
    rng = np.random.default_rng(0)
    w1, w2 = (gs.Constant(n, rng.standard_normal((16, 8)).astype(np.float32)) for n in ("W1", "W2"))
    x = gs.Variable("X", np.float32, (4, 16))
    nodes = [gs.Node("MatMul", f"mm{i}", inputs=[x, w], outputs=[gs.Variable(f"Y{i}", np.float32, (4, 8))])
             for i, w in enumerate((w1, w2, w1))]  # mm2 reads W1 as mm0 does (tied weights)
    graph = gs.Graph(nodes=nodes, inputs=[x], outputs=[n.outputs[0] for n in nodes], opset=13)
    store = weights.WeightStore(None, str(tmp_path))
    store.spill(graph)  # the sources on disk, as a large model's are
    source = {"W1": np.asarray(constant_values(w1)), "W2": np.asarray(constant_values(w2))}
    s1, s2 = np.full(8, 0.02, np.float32), np.linspace(0.01, 0.03, 8, dtype=np.float32)

    def candidate(*sites):  # a copy of the graph with (node index, scale) quantized, then spilled
        g = graph.copy()
        namer = Namer(g)
        made = [stored_weight_input(g, namer, g.nodes[i].name, g.nodes[i], 1, s, 1, INT8, stored=store.stored)
                for i, s in sites]
        store.spill(g)
        return g, [q.dequantized.inputs[0].inputs[0] for q in made]

    def check(stored_constant, weight, scale):
        np.testing.assert_array_equal(constant_values(stored_constant), INT8.quantize(source[weight], scale, 1))

    _, (a,) = candidate((0, s1))
    check(a, "W1", s1)
    _, (b,) = candidate((1, s1))  # another weight, the same scale and shape
    check(b, "W2", s1)
    _, (c,) = candidate((0, s2))  # the same weight, another scale
    check(c, "W1", s2)
    assert store.stored.hits == 0
    g, (d, e) = candidate((0, s1), (2, s1))  # both read W1 with s1: its stored bytes, twice
    assert store.stored.hits == 2
    check(d, "W1", s1)
    check(e, "W1", s1)
    inits = {t.name: t for t in export_model(g).graph.initializer}
    assert d.name != e.name and {d.name, e.name} <= set(inits)
    assert all(inits[n].data_location == onnx.TensorProto.EXTERNAL for n in (d.name, e.name))
    _, (f,) = candidate((1, s2))  # W2 with s2 never made: quantized, not W1's s2 bytes
    check(f, "W2", s2)
    assert store.stored.hits == 2
