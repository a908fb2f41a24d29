"""Number formats of the quantized tensors: what a QuantizeLinear stores and how it rounds (pure numpy).

Every format is symmetric with zero point 0 (TensorRT's rule), scale = threshold / qmax:

- INT8: round-half-to-even(x / s) saturated to [-128, 127]; qmax 127, a negative-only tensor (DualScale's
  negative branch) uses all of [-128, 0] (128 levels).
- FP8 E4M3FN (opset 19): x / s saturated to [-448, 448], then rounded to the nearest E4M3FN value, ties to
  even (ONNX QuantizeLinear with saturate=1; subnormals down to 2^-9); qmax 448 both ways. The grid is
  relative (3 mantissa bits), so the error of a value is proportional to its size, not to the scale.
- INT4 (opset 21, weights only): round-half-to-even(x / s) saturated to [-8, 7]; qmax 7. Scales per output
  channel and per block of input channels (ONNX blocked quantization: the scale has the weight's rank,
  K / block along the input axis; `site_block` picks each weight's block, whole blocks only). Stored packed,
  two values a byte (onnx.numpy_helper packs ml_dtypes.int4 arrays).

A Scheme is what a precision quantizes: a weight format and an activation format (None: weight-only, W4A16,
the activations stay in the graph's float type).

`quantize` returns what is stored (np.int8 or ml_dtypes.float8_e4m3fn), `fake_quant` what a Q -> DQ pair
computes (float64), the reference the searches score with.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
from onnx import TensorProto


def _broadcast(scale: np.ndarray, shape: tuple[int, ...], axis: int | None, block: int | None) -> np.ndarray:
    """`scale` shaped to multiply a tensor of `shape`: per tensor, per `axis`, or blocked (a scale of the
    tensor's rank, each value repeated along the one axis where the shapes differ: m / n times for whole
    blocks, else `block` times with a short last block, as ONNX reads it)."""
    if np.ndim(scale) == len(shape) and np.ndim(scale) > 0:
        for d, (n, m) in enumerate(zip(np.shape(scale), shape)):
            if n != m:
                rep = m // n if m % n == 0 else block
                if rep is None:
                    raise ValueError(f"a blocked scale of shape {np.shape(scale)} needs a block size")
                return np.take(np.repeat(scale, rep, axis=d), np.arange(m), axis=d)
        return scale
    if axis is None or np.ndim(scale) == 0:
        return scale
    bshape = [1] * len(shape)
    bshape[axis] = -1
    return np.reshape(scale, bshape)


@dataclass(frozen=True)
class QuantFormat:
    """One quantized number format: its grid, storage dtype, ONNX type and the opset its Q/DQ needs."""

    name: str
    qmax: float  # largest magnitude on the positive side: scale = amax / qmax
    neg_levels: float  # largest magnitude on the negative side (DualScale's negative branch)
    dtype: type  # numpy storage dtype
    onnx_type: int  # TensorProto data type of the quantized tensor and zero point
    min_opset: int  # the opset whose QuantizeLinear/DequantizeLinear accept this type
    integer: bool = True  # a uniform integer grid (INT8, INT4), else FP8's relative one
    block_size: int | None = None  # weights: scales per block of this many input channels (INT4)

    def quantize(self, x: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        """What QuantizeLinear stores for `x` (scale per tensor, per `axis`, or blocked: see _broadcast)."""
        v = np.asarray(x, np.float32) / _broadcast(np.asarray(scale, np.float32), np.shape(x), axis, self.block_size)
        if self.integer:
            return np.clip(np.rint(v), -self.neg_levels, self.qmax).astype(self.dtype)
        # clip first: a value beyond the largest finite E4M3FN casts to NaN, the format has no inf
        return np.clip(v, -self.qmax, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        return q.astype(np.float32) * _broadcast(np.asarray(scale, np.float32), q.shape, axis, self.block_size)

    def fake_quant(self, x: np.ndarray, scale, axis: int | None = None) -> np.ndarray:
        """dequantize(quantize(x)) in float64: what a Q -> DQ pair computes."""
        q = self.quantize(x, scale, axis)
        return q.astype(np.float64) * _broadcast(np.asarray(scale, np.float32), q.shape, axis, self.block_size)

    def zero(self, shape: tuple[int, ...] = ()) -> np.ndarray:
        """The zero point (0 in the stored type)."""
        return np.zeros(shape, self.dtype)


INT8 = QuantFormat("int8", 127, 128, np.int8, TensorProto.INT8, 13)
FP8_E4M3 = QuantFormat("fp8", 448.0, 448.0, ml_dtypes.float8_e4m3fn, TensorProto.FLOAT8E4M3FN, 19, integer=False)
INT4 = QuantFormat("int4", 7, 8, ml_dtypes.int4, TensorProto.INT4, 21, block_size=128)
FORMATS = {f.name: f for f in (INT8, FP8_E4M3)}


@dataclass(frozen=True)
class Scheme:
    """What one precision quantizes: `weights` in one format, `activations` in another (None: weight-only)."""

    name: str
    weights: QuantFormat
    activations: QuantFormat | None

    @property
    def min_opset(self) -> int:
        return max(f.min_opset for f in (self.weights, self.activations) if f is not None)

    @property
    def blocked(self) -> bool:
        return self.weights.block_size is not None


def scheme_of(fmt: QuantFormat | Scheme) -> Scheme:
    """A Scheme as given, or the W8A8 scheme of one format (weights and activations in it)."""
    return fmt if isinstance(fmt, Scheme) else Scheme(fmt.name, fmt, fmt)


MIN_BLOCK = 16  # the smallest INT4 block TensorRT's kernels take


def site_block(k: int, block_size: int) -> int | None:
    """The block a weight with `k` input channels is quantized in: the largest power of two up to `block_size`
    that divides k, at least MIN_BLOCK; None when there is none. TensorRT infers the block from the shapes as
    k / blocks, so the blocks must be whole: with a short last block (ONNX allows one) it would read other
    blocks than ONNX Runtime does."""
    b = block_size
    while b >= MIN_BLOCK and k % b:
        b //= 2
    return b if b >= MIN_BLOCK else None


def int4_scheme(activations: QuantFormat | None, block_size: int = 128) -> Scheme:
    """W4A16 (activations None) or W4A8: INT4 weights in blocks of `block_size` input channels."""
    return Scheme("w4a16" if activations is None else "w4a8", replace(INT4, block_size=block_size), activations)
