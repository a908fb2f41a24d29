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
    quantize(path, calib, QuantConfig(precision={"format": fmt}, **extra), output=out, progress=False)
    q = onnx.load(out)
    scales = [t for t in q.graph.initializer if t.name.endswith("_scale")]
    assert scales and {t.data_type for t in scales} == {TensorProto.FLOAT16}
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


@pytest.fixture(scope="module", params=[("sd3", False), ("flux", True)], ids=["sd3-torchscript", "flux-dynamo"])
def fp16_export(request, tmp_path_factory):
    """A tiny diffusers transformer exported in float16 (weights, computation, inputs), with its data."""
    kind, dynamo = request.param
    script = export_script(dynamo)
    d = tmp_path_factory.mktemp(f"{kind}_fp16")
    getattr(script, f"export_{kind}_tiny")(d / "model.onnx", dynamo=dynamo, dtype="fp16")
    np.savez(d / "calib.npz", **script.make_calibration(kind, 8, seed=1, dtype="fp16"))
    np.savez(d / "eval.npz", **script.make_calibration(kind, 4, seed=2, dtype="fp16"))
    return kind, d


# measured output SQNR on the eval feeds vs the float16 export: sd3 int8 37.95 / fp8 27.17 dB,
# flux int8 37.15 / fp8 26.45 dB (8 calibration feeds: within 0.5 dB of these)
@pytest.mark.parametrize("fmt, floor", [("int8", 35.0), ("fp8", 24.5)])
def test_fp16_diffusion_exports_quantize_end_to_end(fp16_export, fmt, floor, tmp_path):
    kind, d = fp16_export
    r = quantize(d / "model.onnx", d / "calib.npz", QuantConfig(precision={"format": fmt}), output=tmp_path / "q.onnx",
                 eval_data=d / "eval.npz", progress=False)
    fp32_plan_sites = {"sd3": 50, "flux": 75}[kind]  # what the float32 exports of the same models give
    assert r.report["summary"]["sites_quantized"] == fp32_plan_sites
    assert r.report["summary"]["segment_rewrites"] > 0 and len(r.report["dualscale"]) > 0
    assert all("attention" in x["reason"] for x in r.report["declined"])
    assert r.report["output_error"]["out"]["sqnr_db"] > floor
    q = onnx.load(tmp_path / "q.onnx")
    assert {t.data_type for t in q.graph.initializer if t.name.endswith("_scale")} == {TensorProto.FLOAT16}


def test_a_bfloat16_model_is_refused_in_one_sentence_naming_the_type(tmp_path):
    import ml_dtypes

    m = to_fp16(build_linear_model("matmul"))
    for i, t in enumerate(m.graph.initializer):
        if t.data_type == TensorProto.FLOAT16:
            values = numpy_helper.to_array(t).astype(np.float32).astype(ml_dtypes.bfloat16)
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(values, t.name))
    for v in [*m.graph.input, *m.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    onnx.save(m, tmp_path / "bf16.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 4))
    from segquant_onnx import UserError

    with pytest.raises(UserError, match="bfloat16/bfloat16: only float32 and float16 linears.*float16 or float32"):
        quantize(tmp_path / "bf16.onnx", tmp_path / "c.npz", QuantConfig(), progress=False)
