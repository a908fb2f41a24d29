"""--high-precision: the unquantized rest of a float32 graph in float16 (range-guarded) or bfloat16, Q/DQ
scales following the types around them, inputs and outputs float32, ONNX Runtime and TensorRT-RTX accept it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import build_linear_model, calib_inputs, run_model
from segquant_onnx import QuantConfig, quantize
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.ir.finalize import finalize
from segquant_onnx.ir.rest_precision import KEEP_FP32, RANGE_LIMIT, convert_rest, float32_tensors
from segquant_onnx.ir.runtime import make_session


def _types(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)  # every node type-checks
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.value_info, *inferred.graph.input,
                                                            *inferred.graph.output]}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


def _sqnr(ref, got) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
def test_fp16_rest_computes_the_gemms_in_fp16_with_fp32_io(kind, tmp_path):
    onnx.save(build_linear_model(kind), tmp_path / "m.onnx")
    data = calib_inputs(kind, 8)
    np.savez(tmp_path / "c.npz", X=data)
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "fp16"}),
                 output=tmp_path / "q.onnx", progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    types = _types(q)
    gemms = [n for n in q.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert gemms and {types[n.output[0]] for n in gemms} == {TensorProto.FLOAT16}
    assert {types[n.output[0]] for n in q.graph.node if n.op_type == "DequantizeLinear"} == {TensorProto.FLOAT16}
    assert [types[v.name] for v in [*q.graph.input, *q.graph.output]] == [TensorProto.FLOAT] * 2
    assert r.report["high_precision"]["dtype"] == "fp16" and r.report["high_precision"]["converted_nodes"] > 0
    batch = q.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    feed = {"X": data[:batch]}
    got = make_session(q, None).run(None, feed)[0]
    assert got.dtype == np.float32
    # measured 36.27 / 37.35 / 36.14 dB (matmul / gemm / conv); the float32 rest: 36.28 / 37.16 / 36.16
    assert _sqnr(run_model(build_linear_model(kind), feed)[0], got) > 35.0


def _big_model() -> onnx.ModelProto:
    """X -> MatMul(W1) -> Mul(100) -> a; b = a * a (~1e6, beyond float16) -> Mul(1e-4) -> MatMul(W2) -> Y."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["X", "W1"], ["h"], name="fc1"),
             helper.make_node("Mul", ["h", "k"], ["a"], name="up"),
             helper.make_node("Mul", ["a", "a"], ["b"], name="square"),
             helper.make_node("Mul", ["b", "small"], ["c"], name="down"),
             helper.make_node("MatMul", ["c", "W2"], ["Y"], name="fc2")]
    inits = [numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W2"),
             numpy_helper.from_array(np.array(100.0, np.float32), "k"),
             numpy_helper.from_array(np.array(1e-4, np.float32), "small")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    return model


def test_a_tensor_beyond_fp16_range_stays_fp32(tmp_path):
    onnx.save(_big_model(), tmp_path / "m.onnx")
    x = np.random.default_rng(1).standard_normal((8, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", X=x)
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "fp16"}),
                 output=tmp_path / "q.onnx", progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    types = _types(q)
    by_name = {n.name: n for n in q.graph.node}
    assert types[by_name["square"].output[0]] == TensorProto.FLOAT  # |b| ~ 1e6 > RANGE_LIMIT: kept float32
    assert types[by_name["down"].output[0]] == TensorProto.FLOAT  # it reads b
    assert types[by_name["up"].output[0]] == TensorProto.FLOAT16  # |a| ~ 1e3: converted
    assert r.report["high_precision"]["kept_float32"] == {"beyond float16's range or unobserved": 2}
    feed = {"X": x[:1]}
    got = make_session(q, None).run(None, feed)[0]
    assert np.isfinite(got).all()
    assert _sqnr(run_model(_big_model(), feed)[0], got) > 27.5  # measured 29.32 dB (float32 rest: 28.56)
    # without the guard (every range claimed small) `square` converts, and float16 arithmetic overflows.
    # Shown with onnx's reference evaluator, which computes in the declared types: ONNX Runtime's CPU runs
    # float16 ops it has no kernel for in float32 (its InsertCastTransformer) and would hide the overflow.
    from onnx.reference import ReferenceEvaluator

    graph = canonicalize(gs.import_onnx(_big_model()))
    convert_rest(graph, "fp16", {t: 1.0 for t in float32_tensors(graph)})
    with np.errstate(over="ignore", invalid="ignore"):
        unguarded = ReferenceEvaluator(finalize(graph)).run(None, feed)[0]
        guarded = ReferenceEvaluator(q).run(None, feed)[0]
    assert not np.isfinite(unguarded).all() and np.isfinite(guarded).all() and RANGE_LIMIT < 65504


def test_ops_that_break_in_fp16_stay_fp32(tmp_path):
    """Sin/Cos of a timestep embedding keep float32 (phase of arguments up to 1000)."""
    nodes = [helper.make_node("Mul", ["t", "freq"], ["arg"], name="arg"),
             helper.make_node("Sin", ["arg"], ["s"], name="sin"),
             helper.make_node("MatMul", ["s", "W"], ["Y"], name="fc")]
    inits = [numpy_helper.from_array(np.linspace(0.1, 1, 16).astype(np.float32), "freq"),
             numpy_helper.from_array(np.random.default_rng(2).standard_normal((16, 8)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4, 1])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", t=np.random.default_rng(3).uniform(0, 1000, (32, 1)).astype(np.float32))
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "fp16"},
                                                                      runtime={"allow_unquantized": True}),
                 output=tmp_path / "q.onnx", progress=False)
    types = _types(onnx.load(tmp_path / "q.onnx"))
    sin = next(n for n in onnx.load(tmp_path / "q.onnx").graph.node if n.op_type == "Sin")
    assert types[sin.output[0]] == TensorProto.FLOAT and "Sin" in KEEP_FP32
    assert r.report["high_precision"]["kept_float32"].get("Sin") == 1


def test_bf16_rest_has_no_range_guard_and_type_checks(tmp_path):
    onnx.save(_big_model(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=np.random.default_rng(1).standard_normal((8, 4, 16)).astype(np.float32))
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "bf16"}),
                 output=tmp_path / "q.onnx", progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    types = _types(q)
    by_name = {n.name: n for n in q.graph.node}
    assert types[by_name["square"].output[0]] == TensorProto.BFLOAT16  # bfloat16 has float32's range
    assert r.report["high_precision"]["kept_float32"] == {}


def test_tensorrt_rtx_builds_the_fp16_and_bf16_rest(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine
    from segquant_onnx.tensorrt.check import check_tensorrt

    onnx.save(build_linear_model("matmul"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 8))
    for rest in ("fp16", "bf16"):
        for fmt in ("int8", "fp8"):
            out = tmp_path / f"{rest}_{fmt}.onnx"
            quantize(tmp_path / "m.onnx", tmp_path / "c.npz",
                     QuantConfig(precision={"format": fmt, "high_precision": rest}, dualscale={"mode": "all"}),
                     output=out, progress=False)
            assert check_tensorrt(onnx.load(out)) == []
            result = build_engine(out)
            assert result.parsed and result.built, (rest, fmt, result.errors)


def test_fp16_rest_of_a_diffusers_export_with_segments(tmp_path):
    """The tiny SD3 (TorchScript: SegLinear splits, DualScale candidates, sinusoidal timestep embedding)."""
    from conftest import export_script

    script = export_script(dynamo=False)
    script.export_sd3_tiny(tmp_path / "sd3.onnx", dynamo=False)
    np.savez(tmp_path / "c.npz", **script.make_calibration("sd3", 8, seed=1))
    np.savez(tmp_path / "e.npz", **script.make_calibration("sd3", 4, seed=2))
    r = quantize(tmp_path / "sd3.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "fp16"}),
                 output=tmp_path / "q.onnx", eval_data=tmp_path / "e.npz", progress=False)
    rest = r.report["high_precision"]
    assert rest["kept_float32"] == {"Sin": 1, "Cos": 1} and rest["converted_nodes"] > 200
    assert r.report["summary"]["segment_rewrites"] > 0  # 6 on this export
    # measured 37.95 dB with 16 calibration feeds (float32 rest 38.03); 8 feeds here
    assert r.report["output_error"]["out"]["sqnr_db"] > 36.0
    _types(onnx.load(tmp_path / "q.onnx"))


def test_a_scale_float16_cannot_hold_keeps_its_site_float32(tmp_path):
    """X * 1e-6 -> MatMul: the activation scale (~2e-8) underflows float16, so the MatMul stays float32 and
    the QuantizeLinear reads a float32 Cast of the (float16) product: Q and DQ keep one float32 scale."""
    nodes = [helper.make_node("Mul", ["X", "tiny"], ["x"], name="shrink"),
             helper.make_node("MatMul", ["x", "W"], ["Y"], name="fc")]
    inits = [numpy_helper.from_array(np.array(1e-6, np.float32), "tiny"),
             numpy_helper.from_array(np.random.default_rng(4).standard_normal((16, 8)).astype(np.float32), "W")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, 4, 16])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, 4, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(5).standard_normal((8, 4, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", X=x)
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"high_precision": "fp16"}),
                 output=tmp_path / "q.onnx", progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    types = _types(q)
    fc = next(n for n in q.graph.node if n.name == "fc")
    q_node = next(n for n in q.graph.node if n.op_type == "QuantizeLinear")
    inits_by_name = {t.name: t for t in q.graph.initializer}
    assert types[fc.output[0]] == TensorProto.FLOAT
    assert types[q_node.input[0]] == TensorProto.FLOAT and inits_by_name[q_node.input[1]].data_type == TensorProto.FLOAT
    assert r.report["high_precision"]["kept_float32"] == {"a DequantizeLinear scale float16 cannot hold": 1}
    got = make_session(q, None).run(None, {"X": x[:1]})[0]
    assert _sqnr(run_model(model, {"X": x[:1]})[0], got) > 33.0  # measured 35.38 dB


def test_the_default_rest_is_fp16(tmp_path):
    """QuantConfig() and the CLI's default write the rest in float16 (the fastest correct TensorRT engine)."""
    assert QuantConfig().precision.high_precision.value == "fp16"
    onnx.save(build_linear_model("matmul"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 8))
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", output=tmp_path / "q.onnx", progress=False)
    assert r.report["high_precision"]["dtype"] == "fp16" and r.report["high_precision"]["converted_nodes"] > 0
    assert "skipped" not in r.report["high_precision"]
    types = _types(onnx.load(tmp_path / "q.onnx"))
    assert {types[n.output[0]] for n in r.model.graph.node if n.op_type == "MatMul"} == {TensorProto.FLOAT16}


def test_an_opset_the_converter_cannot_raise_keeps_the_rest_float32(tmp_path, monkeypatch, caplog):
    """The float16 rest needs opset 19 (16-bit Q/DQ scales); a model onnx's version converter cannot raise
    is still quantized, with its rest float32, a warning and the reason in the report."""
    import segquant_onnx.ir.canonicalize as canonicalize_module

    model = build_linear_model("matmul")
    assert model.opset_import[0].version < 19

    def refuse(model, target):
        raise RuntimeError("no adapter")

    monkeypatch.setattr(canonicalize_module.version_converter, "convert_version", refuse)
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 8))
    with caplog.at_level("WARNING"):
        r = quantize(model, tmp_path / "c.npz", progress=False)
    assert "could not raise it to 19" in caplog.text
    hp = r.report["high_precision"]
    assert hp["converted_nodes"] == 0 and "could not be raised to 19" in hp["skipped"]
    assert r.model.opset_import[0].version == model.opset_import[0].version
    assert {t.data_type for t in r.model.graph.initializer if "scale" in t.name} == {TensorProto.FLOAT}
