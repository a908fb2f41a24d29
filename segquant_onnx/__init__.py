"""segquant-onnx: SegQuant-style post-training quantization of exported ONNX diffusion models."""

from segquant_onnx.config import (
    CalibrationConfig, DualScaleConfig, FallbackConfig, OutlierConfig, QuantConfig, RuntimeConfig, SegLinearConfig,
    SmoothQuantConfig,
)
from segquant_onnx.errors import UserError
from segquant_onnx.version import __version__


def quantize(model, calib, config: QuantConfig = QuantConfig(), **kwargs):
    """Quantize `model` (path or onnx.ModelProto) with calibration data; see `pipeline.quantize`."""
    from segquant_onnx.pipeline import quantize as _quantize

    return _quantize(model, calib, config, **kwargs)


__all__ = ["QuantConfig", "CalibrationConfig", "SegLinearConfig", "DualScaleConfig", "SmoothQuantConfig",
           "OutlierConfig", "FallbackConfig", "RuntimeConfig", "UserError", "quantize", "__version__"]
