"""float16 models in: quantized as given (INT8 and FP8), Q/DQ scales and DequantizeLinear outputs in float16,
inputs and outputs keep their type, every feature composes, ONNX Runtime runs it, TensorRT-RTX builds it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from conftest import build_linear_model, calib_inputs, export_script
from segquant_onnx import QuantConfig, quantize
from segquant_onnx.ir.runtime import make_session

SEARCH = {"smoothquant": {"mode": "auto"}, "outliers": {"mode": "auto"},
          "fallback": {"target_sqnr": 40.0, "sensitivity": True}}


def to_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float32 initializer, input and output in float16 (as a half export has them)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16),
                                                                    t.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    return m


@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("fp16")
    out = {}
    for kind in ("matmul", "gemm", "conv"):
        onnx.save(to_fp16(build_linear_model(kind)), d / f"{kind}.onnx")
        data = calib_inputs(kind, 8).astype(np.float16)
        np.savez(d / f"{kind}.npz", X=data)
        out[kind] = (d / f"{kind}.onnx", d / f"{kind}.npz", data)
    return out


def _sqnr(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref**2).sum() / ((ref - got) ** 2).sum()))


# measured output SQNR vs the float16 model (tiny random-weight layers): int8 36.7/36.9/37.2 dB
# (matmul/gemm/conv; 37.8/38.0/37.2 with the searches), fp8 26.1/26.3/27.2 dB
FLOORS = {"int8": 34.0, "fp8": 24.0}


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
@pytest.mark.parametrize("extra", [{}, {"dualscale": {"mode": "all"}}, SEARCH], ids=["default", "dual-all", "search"])
def test_fp16_models_quantize_with_fp16_scales_and_keep_their_io_types(fp16_models, tmp_path, kind, fmt, extra):
    path, calib, data = fp16_models[kind]
    out = tmp_path / "q.onnx"
    r = quantize(path, calib, QuantConfig(precision={"format": fmt}, **extra), output=out, progress=False)
    q = onnx.load(out)
    scales = [t for t in q.graph.initializer if t.name.endswith("_scale")]
    assert scales and {t.data_type for t in scales} == {TensorProto.FLOAT16}
    # the default --high-precision (fp16) converts a float32 model's rest; this one's is float16 already
    assert r.report["high_precision"] == {"dtype": "fp16", "converted_nodes": 0, "kept_float32": {}, "casts_added": 0,
                                          "skipped": "the model is float16: its rest keeps that type"}
    assert {o.version for o in q.opset_import if o.domain in ("", "ai.onnx")} == {19}
    assert [i.type.tensor_type.elem_type for i in [*q.graph.input, *q.graph.output]] == [TensorProto.FLOAT16] * 2
    inferred = onnx.shape_inference.infer_shapes(q, strict_mode=True)  # type-checks every node
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    dq_out = [n.output[0] for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert dq_out and {types[n] for n in dq_out} == {TensorProto.FLOAT16}
    batch = q.graph.input[0].type.tensor_type.shape.dim[0].dim_value
    feed = {"X": data[:batch]}
    ref = make_session(onnx.load(path), None).run(None, feed)[0]
    got = make_session(q, None).run(None, feed)[0]
    assert got.dtype == np.float16
    assert _sqnr(ref, got) > FLOORS[fmt], _sqnr(ref, got)


def test_tensorrt_rtx_builds_fp16_quantized_models(fp16_models, tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine
    from segquant_onnx.tensorrt.check import check_tensorrt

    for kind, fmt in (("matmul", "int8"), ("conv", "int8"), ("gemm", "fp8"), ("conv", "fp8")):
        path, calib, _ = fp16_models[kind]
        out = tmp_path / f"{kind}_{fmt}.onnx"
        quantize(path, calib, QuantConfig(precision={"format": fmt}, dualscale={"mode": "all"}), output=out,
                 progress=False)
        assert check_tensorrt(onnx.load(out)) == []
        result = build_engine(out)
        assert result.parsed and result.built, (kind, fmt, result.errors)


@pytest.fixture(scope="module", params=[("sd3", False, "fp16"), ("flux", True, "fp16"), ("sd3", False, "bf16"),
                                        ("flux", False, "bf16")],
                ids=["sd3-torchscript-fp16", "flux-dynamo-fp16", "sd3-torchscript-bf16", "flux-torchscript-bf16"])
def half_export(request, tmp_path_factory):
    """A tiny diffusers transformer exported in float16 or bfloat16 (weights, computation, inputs), with its
    data (float32 arrays of bfloat16 values for bfloat16). The TorchScript bfloat16 ones need the partitioned
    constant folding and the look-through of bfloat16 Casts (and FLUX the unoptimized float32 shadow)."""
    kind, dynamo, dtype = request.param
    script = export_script(dynamo)
    d = tmp_path_factory.mktemp(f"{kind}_{dtype}")
    getattr(script, f"export_{kind}_tiny")(d / "model.onnx", dynamo=dynamo, dtype=dtype)
    np.savez(d / "calib.npz", **script.make_calibration(kind, 8, seed=1, dtype=dtype))
    np.savez(d / "eval.npz", **script.make_calibration(kind, 4, seed=2, dtype=dtype))
    return kind, d, dtype


# measured output SQNR on the eval feeds vs the half export: float16 sd3 int8 37.95 / fp8 27.17 dB, flux
# 37.15 / 26.45 dB; bfloat16 sd3 38.00 / 27.03, flux 37.19 / 26.20 dB (with 16 calibration feeds; these
# tests calibrate on 8)
@pytest.mark.parametrize("fmt, floor", [("int8", 35.0), ("fp8", 24.0)])
def test_half_diffusion_exports_quantize_end_to_end(half_export, fmt, floor, tmp_path):
    kind, d, dtype = half_export
    r = quantize(d / "model.onnx", d / "calib.npz", QuantConfig(precision={"format": fmt}), output=tmp_path / "q.onnx",
                 eval_data=d / "eval.npz", progress=False)
    fp32_plan_sites = {"sd3": 50, "flux": 75}[kind]  # what the float32 exports of the same models give
    assert r.report["summary"]["sites_quantized"] == fp32_plan_sites
    assert r.report["summary"]["segment_rewrites"] > 0 and len(r.report["dualscale"]) > 0
    assert all("attention" in x["reason"] for x in r.report["declined"])
    assert r.report["output_error"]["out"]["sqnr_db"] > floor
    assert len(r.report["dualscale"]) == {"sd3": 24, "flux": 34}[kind]  # as for the float32 exports
    q = onnx.load(tmp_path / "q.onnx")
    want = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}[dtype]
    assert {t.data_type for t in q.graph.initializer if t.name.endswith("_scale")} == {want}
    onnx.shape_inference.infer_shapes(q, strict_mode=True)  # every node type-checks



def to_bf16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with every float32 initializer, input and output in bfloat16."""
    import ml_dtypes

    m = onnx.ModelProto.FromString(model.SerializeToString())
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT:
            values = numpy_helper.to_array(t).astype(ml_dtypes.bfloat16)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, t.name))
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return m


# measured output SQNR vs the bfloat16 model (run as its float32 shadow): int8 36.5/36.9/37.5 dB
# (matmul/gemm/conv; 37.5/37.7/37.5 with the searches), fp8 25.9/26.5/26.9 dB
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
@pytest.mark.parametrize("extra", [{}, {"dualscale": {"mode": "all"}}, SEARCH], ids=["default", "dual-all", "search"])
def test_bf16_models_quantize_with_bf16_scales(tmp_path, kind, fmt, extra):
    onnx.save(to_bf16(build_linear_model(kind)), tmp_path / "m.onnx")
    data = calib_inputs(kind, 8)  # float32 data for bfloat16 inputs (.npz has no bfloat16)
    np.savez(tmp_path / "c.npz", X=data)
    r = quantize(tmp_path / "m.onnx", tmp_path / "c.npz", QuantConfig(precision={"format": fmt}, **extra),
                 output=tmp_path / "q.onnx", progress=False)
    assert r.report["high_precision"]["skipped"] == "the model is bfloat16: its rest keeps that type"
    q = onnx.load(tmp_path / "q.onnx")
    assert {t.data_type for t in q.graph.initializer if t.name.endswith("_scale")} == {TensorProto.BFLOAT16}
    assert [i.type.tensor_type.elem_type for i in [*q.graph.input, *q.graph.output]] == [TensorProto.BFLOAT16] * 2
    inferred = onnx.shape_inference.infer_shapes(q, strict_mode=True)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert {types[n.output[0]] for n in q.graph.node if n.op_type == "DequantizeLinear"} == {TensorProto.BFLOAT16}
    assert r.report["output_error"]["Y"]["sqnr_db"] > FLOORS[fmt] - 0.5


def test_the_float32_shadow_of_a_bf16_model_computes_its_values():
    """ONNX Runtime's CPU has no bfloat16 MatMul: sessions run the float32 shadow, whose stored values are
    the bfloat16 ones exactly."""
    from segquant_onnx.ir.runtime import float32_shadow, has_bfloat16

    bf16 = to_bf16(build_linear_model("matmul"))
    shadow = float32_shadow(bf16)
    assert has_bfloat16(bf16) and not has_bfloat16(shadow)
    w16 = numpy_helper.to_array(next(t for t in bf16.graph.initializer if t.name == "W1")).astype(np.float32)
    w32 = numpy_helper.to_array(next(t for t in shadow.graph.initializer if t.name == "W1"))
    assert w32.dtype == np.float32 and np.array_equal(w16, w32)
    x = calib_inputs("matmul", 1)
    got = make_session(bf16, None).run(None, {"X": x})[0]
    want = make_session(float32_shadow(to_bf16(build_linear_model("matmul"))), None).run(None, {"X": x})[0]
    np.testing.assert_array_equal(got, want)


def test_tensorrt_rtx_builds_bf16_quantized_models(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine
    from segquant_onnx.tensorrt.check import check_tensorrt

    for kind, fmt in (("matmul", "int8"), ("conv", "fp8")):
        onnx.save(to_bf16(build_linear_model(kind)), tmp_path / f"{kind}.onnx")
        np.savez(tmp_path / f"{kind}.npz", X=calib_inputs(kind, 8))
        out = tmp_path / f"{kind}_{fmt}.onnx"
        quantize(tmp_path / f"{kind}.onnx", tmp_path / f"{kind}.npz",
                 QuantConfig(precision={"format": fmt}, dualscale={"mode": "all"}), output=out, progress=False)
        assert check_tensorrt(onnx.load(out)) == []
        result = build_engine(out)
        assert result.parsed and result.built, (kind, fmt, result.errors)
