"""End to end on tiny diffusers SD3 exports from both exporters (TorchScript and dynamo).

The output SQNR is recomputed here from the saved files (ONNX Runtime on the float export and on the written
model, the eval set held out from calibration; numpy for the ratio). Measured with the default config:
38.03 dB (both exporters). These random-weight exports have no activation statistics that SegLinear or
DualScale pay on (naive INT8 measured 38.07 dB, DualScale auto applies no site): what the features are
worth is tested on constructed graphs (tests/passes) and the trained demo DiT (tests/diffusion). A
misplaced Q/DQ, wrong weight axis or wrong scale measured below 15 dB in experiments.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import references
from segquant_onnx import QuantConfig
from segquant_onnx.pipeline import quantize

pytest.importorskip("torch")
pytest.importorskip("diffusers")

MIN_OUTPUT_SQNR_DB = 36.0  # measured 38.03 (TorchScript and dynamo)


@pytest.fixture(scope="module", params=[False, True], ids=["torchscript", "dynamo"])
def sd3_export(request, tiny_export, tmp_path_factory):
    """(model, calib npz, eval npz, a folder for outputs): the session's export, 16 calibration samples and
    8 held-out ones."""
    model, script = tiny_export("sd3", request.param)
    d = tmp_path_factory.mktemp("e2e")
    calib, held_out = d / "calib.npz", d / "eval.npz"
    np.savez(calib, **script.make_calibration("sd3", 16, seed=1))
    np.savez(held_out, **script.make_calibration("sd3", 8, seed=2))
    return model, calib, held_out, d


@pytest.fixture(scope="module")
def quantized(sd3_export):
    model, calib, held_out, d = sd3_export
    out = d / "sd3_int8.onnx"
    result = quantize(model, calib, QuantConfig(), output=out, eval_data=held_out, progress=False)
    return result, out, held_out, model


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def _outputs(path, held_out) -> list[np.ndarray]:
    """The model's output on every held-out sample (one feed each)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(held_out) as data:
        n = len(data[session.get_inputs()[0].name])
        return [session.run(None, {i.name: data[i.name][k:k + 1] for i in session.get_inputs()})[0]
                for k in range(n)]


def test_checker_and_onnxruntime_accept_result(quantized):
    result, out, held_out, _ = quantized
    onnx.checker.check_model(str(out), full_check=True)
    assert all(np.isfinite(y).all() for y in _outputs(out, held_out))


def test_output_sqnr_recomputed_from_the_saved_files(quantized):
    result, out, held_out, model = quantized
    sqnr = references.sqnr_db(_outputs(model, held_out), _outputs(out, held_out))
    assert sqnr > MIN_OUTPUT_SQNR_DB, f"output SQNR {sqnr:.2f} dB"
    # the report measures the same thing
    assert result.report["output_error"]["out"]["sqnr_db"] == pytest.approx(sqnr, abs=0.01)


def test_every_linear_site_has_qdq_with_right_axis(quantized):
    result, out, *_ = quantized
    model = onnx.load(str(out))
    producers = _producers(model)
    inits = {t.name: t for t in model.graph.initializer}
    linear = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    quantized_nodes = {s.name for s in result.plan.sites}
    assert len(quantized_nodes) >= 20  # 2 blocks x (q,k,v,add_q,k,v,out,ff x2,...) + embedders
    for node in linear:
        if node.name not in quantized_nodes:
            # declined sites must be activation x activation products
            assert all(i in producers for i in node.input[:2]), node.name
            continue
        x_dq, w_dq = producers[node.input[0]], producers[node.input[1]]
        assert x_dq.op_type == "DequantizeLinear" and producers[x_dq.input[0]].op_type == "QuantizeLinear"
        assert w_dq.op_type == "DequantizeLinear"
        weight = inits[w_dq.input[0]]
        assert weight.data_type == onnx.TensorProto.INT8
        axis = next(a.i for a in w_dq.attribute if a.name == "axis")
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        expected = {"MatMul": 1, "Conv": 0, "Gemm": 0 if trans_b else 1}[node.op_type]
        assert axis == expected, node.name
        scale = onnx.numpy_helper.to_array(inits[w_dq.input[1]])
        assert scale.shape == (weight.dims[axis],)
        assert np.isfinite(scale).all() and (scale > 0).all()


def test_tensorrt_rtx_parses_and_builds(quantized):
    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine

    _, out, *_ = quantized
    built = build_engine(out)
    assert built.parsed and built.built, built.errors
