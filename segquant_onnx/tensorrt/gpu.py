"""Build and time engines with the full TensorRT package, on a machine with an NVIDIA GPU.

UNTESTED HERE: the development machines have no GPU and the `tensorrt` wheels do not install on them,
so this path has never run; it is written against the TensorRT 10 Python API (and Polygraphy's
TrtRunner for timing) and guarded by imports. `build-trt` uses it only when `full_tensorrt()` finds
TensorRT and a GPU; otherwise it builds with TensorRT-RTX on the CPU (segquant_onnx.tensorrt.build).

- The quantized model is built strongly typed (TensorRT builds exactly the dtypes in the graph).
- The baseline for `--benchmark` is the floating-point model built with the FP16 builder flag in a
  weakly typed network (the usual "fp16 engine"); where a TensorRT has no FP16 flag (weak typing
  removed) it is built strongly typed, i.e. in the graph's own dtypes, and `Build.note` says so.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from segquant_onnx.tensorrt.build import _profile_shapes, add_static_profile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Build:
    engine: bytes | None
    errors: tuple[str, ...]
    seconds: float
    note: str = ""


def full_tensorrt() -> Any | None:
    """The `tensorrt` module when it is installed and can create a Builder (needs a GPU), else None."""
    try:
        import tensorrt as trt

        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:  # ImportError, or no CUDA device/driver
        log.debug("full TensorRT not usable: %s: %s", type(exc).__name__, exc)
        return None
    return trt if builder is not None else None


def build(trt: Any, path: Path, shapes: Mapping[str, tuple[int, ...]] | None, fp16_baseline: bool = False) -> Build:
    """Parse `path` and build a serialized engine (strongly typed, or the fp16 baseline)."""
    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    weak_fp16 = fp16_baseline and hasattr(trt.BuilderFlag, "FP16")
    flags = 0 if weak_fp16 else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = tuple(str(parser.get_error(i)) for i in range(parser.num_errors))
        return Build(None, errors or ("the ONNX parser failed without an error",), time.perf_counter() - started)
    config = builder.create_builder_config()
    if weak_fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    add_static_profile(builder, config, _profile_shapes(network, shapes))
    serialized = builder.build_serialized_network(network, config)
    note = "" if weak_fp16 or not fp16_baseline else "baseline built in the graph's own dtypes (no FP16 flag)"
    if serialized is None:
        return Build(None, ("build_serialized_network returned None (see the TensorRT log)",),
                     time.perf_counter() - started, note)
    return Build(bytes(serialized), (), time.perf_counter() - started, note)


def time_engine(engine: bytes, feed: Mapping[str, np.ndarray], runs: int = 50, warmup: int = 5) -> float:
    """Median latency in milliseconds of one inference (Polygraphy's TrtRunner, inputs already in host memory)."""
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    times = []
    with TrtRunner(EngineFromBytes(engine)) as runner:
        for i in range(warmup + runs):
            runner.infer(dict(feed))
            if i >= warmup:
                times.append(runner.last_inference_time())
    return 1000 * statistics.median(times)
