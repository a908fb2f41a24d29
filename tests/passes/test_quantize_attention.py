"""QuantizeAttention (`--quantize-attention`): per-tensor Q/DQ on both inputs of Q @ K^T and softmax @ V,
scales from the inputs' calibrated abs-max, off unless asked; ONNX Runtime runs it, TensorRT-RTX builds it."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import attention_model, export_script, run_model
from segquant_onnx import QuantConfig, quantize
from segquant_onnx.ir.runtime import make_session


def _calib(tmp_path, n=8):
    x = np.random.default_rng(5).standard_normal((n, 8, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", X=x)
    return x


def _intermediates(model: onnx.ModelProto, names, x: np.ndarray) -> dict[str, np.ndarray]:
    """The float model's tensors `names` on every feed (each sample its own batch-1 feed)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    outs = [run_model(m, {"X": x[i:i + 1]})[1:] for i in range(len(x))]
    return {n: np.stack([o[j] for o in outs]) for j, n in enumerate(names)}


@pytest.mark.parametrize("fmt, qmax", [("int8", 127.0), ("fp8", 448.0)])
def test_both_inputs_of_both_products_get_abs_max_scales(tmp_path, fmt, qmax):
    x = _calib(tmp_path)
    onnx.save(attention_model(), tmp_path / "m.onnx")
    cfg = QuantConfig(precision={"format": fmt, "quantize_attention": True, "high_precision": "fp32"},
                      dualscale={"mode": "off"})
    r = quantize(tmp_path / "m.onnx", tmp_path / "calib.npz", cfg, output=tmp_path / "q.onnx", progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    nodes = {n.name: n for n in q.graph.node}
    producers = {o: n for n in q.graph.node for o in n.output}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    ref = _intermediates(attention_model(), ["q", "kT", "p", "v"], x)
    for product, originals in (("qk", ("q", "kT")), ("pv", ("p", "v"))):
        for index, original in enumerate(originals):
            dq = producers[nodes[product].input[index]]
            assert dq.op_type == "DequantizeLinear"
            expected = np.float32(np.abs(ref[original]).max() / qmax)
            assert inits[dq.input[1]] == pytest.approx(expected, rel=1e-6), (product, original)
    assert set(r.report["attention"]) == {"qk", "pv"}
    feed = {"X": x[:1]}
    got, want = make_session(q, None).run(None, feed)[0], run_model(attention_model(), feed)[0]
    sqnr = 10 * np.log10((want.astype(np.float64) ** 2).sum() / ((want - got).astype(np.float64) ** 2).sum())
    # measured on feed 0: int8 30.9 dB (35.3 without attention quantized), fp8 20.1 dB (24.7 without)
    assert sqnr > {"int8": 29.0, "fp8": 18.5}[fmt], sqnr


def test_off_by_default_leaves_the_products_in_float(tmp_path):
    _calib(tmp_path)
    onnx.save(attention_model(), tmp_path / "m.onnx")
    r = quantize(tmp_path / "m.onnx", tmp_path / "calib.npz", QuantConfig(), output=tmp_path / "q.onnx",
                 progress=False)
    q = onnx.load(tmp_path / "q.onnx")
    producers = {o: n.op_type for n in q.graph.node for o in n.output}
    qk = next(n for n in q.graph.node if n.name == "qk")
    assert [producers.get(i) for i in qk.input] != ["DequantizeLinear"] * 2
    assert r.report["attention"] == {}


def test_tensorrt_rtx_builds_fp8_attention_of_a_diffusers_export(tmp_path):
    pytest.importorskip("tensorrt_rtx_bindings")
    script = export_script(dynamo=False)
    script.export_sd3_tiny(tmp_path / "sd3.onnx", dynamo=False)
    np.savez(tmp_path / "calib.npz", **script.make_calibration("sd3", 4, seed=1))
    from segquant_onnx.tensorrt.build import build_engine
    from segquant_onnx.tensorrt.check import check_tensorrt

    cfg = QuantConfig(precision={"format": "fp8", "quantize_attention": True})
    r = quantize(tmp_path / "sd3.onnx", tmp_path / "calib.npz", cfg, output=tmp_path / "q.onnx", progress=False,
                 evaluate=False)
    assert len(r.report["attention"]) == 4  # two blocks x (Q @ K^T, softmax @ V)
    assert check_tensorrt(onnx.load(tmp_path / "q.onnx")) == []
    result = build_engine(tmp_path / "q.onnx")
    assert result.parsed and result.built, result.errors
