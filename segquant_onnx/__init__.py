"""segquant-onnx: SegQuant-style post-training quantization of exported ONNX diffusion models."""

__version__ = "0.1.0"

from segquant_onnx.config import QuantConfig  # noqa: E402
from segquant_onnx.errors import UserError  # noqa: E402


def quantize(model, calib, config: QuantConfig = QuantConfig(), **kwargs):
    """Quantize `model` (path or onnx.ModelProto) with calibration data; see `pipeline.quantize`."""
    from segquant_onnx.pipeline import quantize as _quantize

    return _quantize(model, calib, config, **kwargs)


__all__ = ["QuantConfig", "UserError", "quantize", "__version__"]
