"""Check a Q/DQ ONNX graph with NVIDIA's ONNX parser and builder, on a machine without a GPU.

TensorRT-RTX (PyPI ``tensorrt-rtx-cu12-libs`` + ``tensorrt-rtx-cu12-bindings``, import name
``tensorrt_rtx_bindings``) creates a Builder, parses ONNX and builds a serialized engine without
CUDA hardware. It shares the ONNX parser (onnx-tensorrt) with TensorRT, so a graph it rejects is a
real defect for TensorRT too.

Nothing here imports TensorRT-RTX at module import time: this module can be imported (and
:func:`tensorrt_rtx_available` called) where the package is not installed.

No environment variables or ``LD_LIBRARY_PATH`` changes are needed: ``tensorrt_rtx_bindings``
imports ``tensorrt_rtx_libs``, which loads ``libtensorrt_rtx.so.1`` and
``libtensorrt_onnxparser_rtx.so.1`` from its own folder with ``ctypes`` before the extension
module is loaded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

__all__ = ["BuildResult", "build_engine", "tensorrt_rtx_available"]

_LOG = logging.getLogger(__name__)
_TRT_LOG = logging.getLogger(__name__ + ".trt")

_MODULE = "tensorrt_rtx_bindings"

# One logger object for every Builder/OnnxParser: TensorRT keeps a process-wide logger and warns
# when a later builder brings a different one. Builds are serialized so that the messages captured
# during a build belong to that build.
_BUILD_LOCK = threading.Lock()
_LOGGER: Any = None


@dataclass(frozen=True)
class BuildResult:
    """Outcome of :func:`build_engine`.

    parsed: the ONNX parser accepted the whole graph.
    built: a serialized engine was produced.
    errors: parser errors verbatim (each names the node index, node name and operator), or the
        error messages TensorRT logged while building; empty when ``built``.
    engine_bytes: size of the serialized engine, 0 when not built.
    num_layers: layers in the TensorRT network definition after parsing (before the builder's
        fusions; a partially parsed network reports the layers created before the failure).
    """

    parsed: bool
    built: bool
    errors: tuple[str, ...]
    engine_bytes: int
    num_layers: int


def tensorrt_rtx_available() -> bool:
    """True when ``tensorrt_rtx_bindings`` (and its libraries) can be imported. Never raises."""
    try:
        import tensorrt_rtx_bindings  # noqa: F401
    except Exception as exc:  # ImportError, OSError from ctypes loading the libraries, ...
        _LOG.debug("%s not importable: %s: %s", _MODULE, type(exc).__name__, exc)
        return False
    return True


def _import_trt() -> Any:
    try:
        import tensorrt_rtx_bindings as trt
    except Exception as exc:
        raise ImportError(
            f"{_MODULE} is not importable ({type(exc).__name__}: {exc}); install it with "
            "`pip install tensorrt-rtx-cu12-libs tensorrt-rtx-cu12-bindings`"
        ) from exc
    return trt


def _get_logger(trt: Any) -> Any:
    """The process-wide capturing logger (created on first use)."""
    global _LOGGER
    if _LOGGER is not None:
        return _LOGGER

    sev = trt.ILogger.Severity
    levels = {
        sev.INTERNAL_ERROR: logging.CRITICAL,
        sev.ERROR: logging.ERROR,
        sev.WARNING: logging.WARNING,
        sev.INFO: logging.DEBUG,  # TensorRT's INFO is chatty (memory stats, timing cache)
        sev.VERBOSE: 5,
    }

    class _CapturingLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.captured: list[str] | None = None

        def log(self, severity: Any, msg: str) -> None:
            level = levels.get(severity, logging.INFO)
            if level >= logging.ERROR and self.captured is not None:
                self.captured.append(msg)
            if _TRT_LOG.isEnabledFor(level):
                _TRT_LOG.log(level, "%s", msg)

    _LOGGER = _CapturingLogger()
    return _LOGGER


def _format_parser_error(err: Any) -> str:
    text = str(err)
    if text and " object at 0x" not in text:
        # e.g. "In node 0 with name: q_x and operator: QuantizeLinear (resolveScaleInput):
        #       INVALID_NODE: Assertion failed: ...: Scale coefficients must all be positive"
        return text
    parts = []
    for name in ("node", "node_name", "node_operator", "code", "desc"):
        getter = getattr(err, name, None)
        if callable(getter):
            try:
                parts.append(f"{name}={getter()}")
            except Exception:  # pragma: no cover - depends on the bindings
                pass
    return ", ".join(parts) or repr(err)


def _profile_shapes(network: Any, shapes: Mapping[str, tuple[int, ...]] | None) -> dict[str, tuple[int, ...]]:
    """Validate ``shapes`` against the network inputs; return the shapes of the dynamic inputs.

    Raises ValueError naming the input for a dynamic input without a shape, an unknown name, a
    shape of the wrong rank, a shape that contradicts a static dimension, or a non-positive size.
    """
    shapes = dict(shapes or {})
    inputs = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        inputs[tensor.name] = tensor

    unknown = sorted(set(shapes) - set(inputs))
    if unknown:
        raise ValueError(f"shapes names unknown input(s) {unknown}; the network inputs are {sorted(inputs)}")

    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in inputs.items():
        declared = tuple(int(d) for d in tensor.shape)
        dynamic = any(d < 0 for d in declared)
        if getattr(tensor, "is_shape_tensor", False) and dynamic:
            raise ValueError(f"input {name!r} is a shape tensor; shape-tensor inputs are not supported")
        if name not in shapes:
            if dynamic:
                raise ValueError(
                    f"input {name!r} has dynamic shape {declared} (-1 = dynamic); pass its shape, "
                    f"e.g. shapes={{{name!r}: (...)}}: TensorRT needs an optimization profile"
                )
            continue
        given = tuple(int(d) for d in shapes[name])
        if len(given) != len(declared):
            raise ValueError(f"shape {given} for input {name!r} has rank {len(given)}, the input has rank {len(declared)} {declared}")
        if any(g <= 0 for g in given):
            raise ValueError(f"shape {given} for input {name!r} has a non-positive dimension")
        bad = [i for i, (g, d) in enumerate(zip(given, declared)) if d >= 0 and g != d]
        if bad:
            raise ValueError(f"shape {given} for input {name!r} contradicts its static dims {declared} at axes {bad}")
        if dynamic:
            out[name] = given
    return out


def add_static_profile(builder, config, shapes: dict[str, tuple[int, ...]]) -> None:
    """One optimization profile with min = opt = max = `shapes` (nothing to add when empty).
    Works with TensorRT-RTX's and TensorRT's builders alike."""
    if not shapes:
        return
    profile = builder.create_optimization_profile()
    for name, shape in shapes.items():
        profile.set_shape(name, shape, shape, shape)
    config.add_optimization_profile(profile)


def build_engine(
    onnx_path: str | Path,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> BuildResult:
    """Parse ``onnx_path`` with TensorRT-RTX's ONNX parser and build a serialized engine.

    The file is parsed from its path (``OnnxParser.parse_from_file``), so external data stored
    next to the model is found. Parse and build failures do not raise: they come back in
    ``BuildResult.errors`` (parser errors verbatim, each naming node index, name and operator;
    for a build failure, the error messages TensorRT logged). The engine is not kept, only its size.

    Network typing: the network is created strongly typed (``NetworkDefinitionCreationFlag.
    STRONGLY_TYPED`` when the bindings have it). TensorRT-RTX is always strongly typed (in 1.7 the
    flag is marked deprecated and ignored), as is TensorRT 11; TensorRT 10.12+ accepts it. Strong
    typing builds exactly the dtypes written in the graph, which is what our Q/DQ graphs are for:
    weak typing with precision flags (INT8/FP16 builder flags) is deprecated and would hide dtype
    mistakes in the graph.

    Dynamic inputs (any dim -1 after parsing) need a shape in ``shapes``; one optimization profile
    is made with min = opt = max = that shape. A dynamic input with no shape, an unknown name, or a
    shape that does not fit the input raises ValueError naming the input (a usage error, not a
    graph defect). Shapes given for static inputs are only checked.

    No compute capability is set: TensorRT-RTX picks its default targets. Builds are serialized
    within the process (one shared TensorRT logger captures the build's messages).

    Raises ImportError when TensorRT-RTX is not installed, FileNotFoundError when ``onnx_path`` is
    not a file, ValueError for bad ``shapes`` (see above).
    """
    trt = _import_trt()
    path = Path(onnx_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    path_str = os.path.abspath(path)

    with _BUILD_LOCK:
        logger = _get_logger(trt)
        t0 = time.perf_counter()
        try:
            builder = trt.Builder(logger)
            flags = 0
            strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
            if strongly_typed is not None:
                flags |= 1 << int(strongly_typed)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
        except Exception as exc:
            msg = f"could not create TensorRT-RTX builder/network/parser: {type(exc).__name__}: {exc}"
            _LOG.error("%s", msg)
            return BuildResult(parsed=False, built=False, errors=(msg,), engine_bytes=0, num_layers=0)

        logger.captured = []
        try:
            parsed = bool(parser.parse_from_file(path_str))
        finally:
            parse_log, logger.captured = logger.captured, None
        parser_errors = tuple(_format_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        num_layers = int(network.num_layers)
        t_parse = time.perf_counter() - t0
        if not parsed:
            errors = parser_errors or tuple(parse_log) or ("OnnxParser.parse_from_file returned False without an error",)
            _LOG.info("%s: parse failed in %.3fs with %d error(s)", path, t_parse, len(errors))
            return BuildResult(parsed=False, built=False, errors=errors, engine_bytes=0, num_layers=num_layers)

        profile_shapes = _profile_shapes(network, shapes)  # ValueError propagates

        t1 = time.perf_counter()
        logger.captured = []
        try:
            config = builder.create_builder_config()
            add_static_profile(builder, config, profile_shapes)
            serialized = builder.build_serialized_network(network, config)
        except Exception as exc:
            serialized = None
            logger.captured.append(f"{type(exc).__name__}: {exc}")
        finally:
            build_log, logger.captured = logger.captured, None
        t_build = time.perf_counter() - t1

        if serialized is None:
            errors = tuple(build_log) or ("build_serialized_network returned None without an error",)
            _LOG.info("%s: parsed in %.3fs, build failed in %.3fs: %s", path, t_parse, t_build, errors[0])
            return BuildResult(parsed=True, built=False, errors=errors, engine_bytes=0, num_layers=num_layers)

        engine_bytes = int(serialized.nbytes)
        _LOG.info(
            "%s: parsed (%d layers) in %.3fs, built %d-byte engine in %.3fs",
            path, num_layers, t_parse, engine_bytes, t_build,
        )
        return BuildResult(parsed=True, built=True, errors=(), engine_bytes=engine_bytes, num_layers=num_layers)
