"""Every graph our pipeline writes passes the TensorRT checker; ONNX Runtime's quantize_static output does
not (its INT32 bias DequantizeLinear, shared DQs, Q/DQ on GEMM outputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from conftest import build_linear_model, calib_inputs
from segquant_onnx.examples import EXAMPLE_CALIB, EXAMPLE_MODEL, example_path
from segquant_onnx.config import QuantConfig
from segquant_onnx.tensorrt.check import check_tensorrt

EXAMPLE_CONFIGS = {
    "default": QuantConfig(),
    "dualscale-all": QuantConfig(dualscale={"mode": "all"}),
    "seglinear-off": QuantConfig(seglinear={"output": False, "input": False}),
    "smoothquant-outliers": QuantConfig(smoothquant={"mode": "fixed", "alpha": 0.5}, outliers={"mode": "fixed",
                                                                                               "count": 4}),
}


@pytest.mark.parametrize("name", EXAMPLE_CONFIGS)
def test_pipeline_output_for_the_example_passes(name):
    from segquant_onnx.pipeline import quantize

    result = quantize(example_path(EXAMPLE_MODEL), example_path(EXAMPLE_CALIB), EXAMPLE_CONFIGS[name],
                      progress=False)
    assert any(n.op_type == "DequantizeLinear" for n in result.model.graph.node)
    assert check_tensorrt(result.model) == []
    assert result.report["tensorrt_check"] == []


@pytest.mark.parametrize("kind", ["matmul", "gemm", "conv"])
def test_pipeline_output_for_each_linear_kind_passes(tmp_path, kind):
    from segquant_onnx.pipeline import quantize

    np.savez(tmp_path / "calib.npz", X=calib_inputs(kind, n=4))
    result = quantize(build_linear_model(kind), tmp_path / "calib.npz", QuantConfig(dualscale={"mode": "all"}),
                      progress=False)
    assert sum(n.op_type == "QuantizeLinear" for n in result.model.graph.node) >= 2
    assert check_tensorrt(result.model) == []


def test_onnxruntime_quantize_static_is_flagged_for_its_int32_bias(tmp_path):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    calib = np.load(example_path(EXAMPLE_CALIB))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter([{k: v[i:i + 1] for k, v in calib.items()} for i in range(2)])

        def get_next(self):
            return next(self.feeds, None)

    out, model = tmp_path / "ort.onnx", tmp_path / "example.onnx"
    # quantize_static writes (and removes) a shape-inferred copy beside its input: not in the package's data
    model.write_bytes(example_path(EXAMPLE_MODEL).read_bytes())
    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    found = check_tensorrt(onnx.load(str(out)))
    int32 = [v for v in found if v.rule == "int32-dequantize"]
    assert int32 and all(v.node.endswith("bias_DequantizeLinear") for v in int32)
    assert {"shared-dq", "output-qdq"} <= {v.rule for v in found}
