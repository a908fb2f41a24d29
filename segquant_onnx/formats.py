"""Number formats of the quantized tensors: what a QuantizeLinear stores and how it rounds (pure numpy).

Both formats are symmetric with zero point 0 (TensorRT's rule), scale = threshold / qmax:

- INT8: round-half-to-even(x / s) saturated to [-128, 127]; qmax 127, a negative-only tensor (DualScale's
  negative branch) uses all of [-128, 0] (128 levels).
- FP8 E4M3FN (opset 19): x / s saturated to [-448, 448], then rounded to the nearest E4M3FN value, ties to
  even (ONNX QuantizeLinear with saturate=1; subnormals down to 2^-9); qmax 448 both ways. The grid is
  relative (3 mantissa bits), so the error of a value is proportional to its size, not to the scale.

`quantize` returns what is stored (np.int8 or ml_dtypes.float8_e4m3fn), `fake_quant` what a Q -> DQ pair
computes (float64), the reference the searches score with.
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
from onnx import TensorProto


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or np.ndim(scale) == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return np.reshape(scale, shape)


@dataclass(frozen=True)
class QuantFormat:
    """One quantized number format: its grid, storage dtype, ONNX type and the opset its Q/DQ needs."""

    name: str
    qmax: float  # largest magnitude on the positive side: scale = amax / qmax
    neg_levels: float  # largest magnitude on the negative side (DualScale's negative branch)
    dtype: type  # numpy storage dtype
    onnx_type: int  # TensorProto data type of the quantized tensor and zero point
    min_opset: int  # the opset whose QuantizeLinear/DequantizeLinear accept this type

    def quantize(self, x: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        """What QuantizeLinear stores for `x` (scale per tensor, or per `axis`)."""
        v = np.asarray(x, np.float32) / _broadcast(np.asarray(scale, np.float32), np.ndim(x), axis)
        if self.dtype is np.int8:
            return np.clip(np.rint(v), -128, 127).astype(np.int8)
        # clip first: a value beyond the largest finite E4M3FN casts to NaN, the format has no inf
        return np.clip(v, -self.qmax, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        return q.astype(np.float32) * _broadcast(np.asarray(scale, np.float32), q.ndim, axis)

    def fake_quant(self, x: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        """dequantize(quantize(x)) in float64: what a Q -> DQ pair computes."""
        q = self.quantize(x, scale, axis)
        return q.astype(np.float64) * _broadcast(np.asarray(scale, np.float32), q.ndim, axis)

    def zero(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """The zero point (0 in the stored type)."""
        return np.zeros(shape, self.dtype)


INT8 = QuantFormat("int8", 127, 128, np.int8, TensorProto.INT8, 13)
FP8_E4M3 = QuantFormat("fp8", 448.0, 448.0, ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 19)
FORMATS = {f.name: f for f in (INT8, FP8_E4M3)}
