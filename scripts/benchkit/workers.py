"""What runs inside the measured subprocesses: ``python scripts/bench.py _<name>-worker ARGS...``.

A worker imports only what its own job needs, so the time and peak RSS measured for a method are that
method's alone (measure.py's docstring says what the benchmark keeps independent of segquant_onnx).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from benchkit.cases import REPO_ROOT, iter_samples

BENCH_SCRIPT = REPO_ROOT / "scripts" / "bench.py"


def worker_command(name: str, *args: str) -> list[str]:
    """The command that runs worker ``name`` in a fresh interpreter."""
    return [sys.executable, str(BENCH_SCRIPT), f"_{name}-worker", *args]


def ours_worker(model: str, calib: str, eval_data: str, out: str, report: str, fields: str) -> int:
    """segquant-onnx with the given QuantConfig fields; ``eval_data`` "-" skips its output-error measurement."""
    from segquant_onnx import QuantConfig, quantize

    skip = eval_data == "-"
    quantize(model, calib, QuantConfig(**json.loads(fields)), output=out, force=True,
             eval_data=None if skip else eval_data, report_path=report, progress=False, evaluate=not skip)
    return 0


def ort_worker(model: str, calib: str, out: str, method: str, op_types: str = "", external: str = "") -> int:
    """ORT static QDQ quantization (per-channel, symmetric INT8), one batch-1 calibration sample at a time;
    ``external`` "external": the output with external data (over 2 GB)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    class NpzReader(CalibrationDataReader):
        def __init__(self, path: str) -> None:
            self._samples = iter_samples(Path(path))

        def get_next(self):
            return next(self._samples, None)

    quantize_static(
        model, out, NpzReader(calib),
        quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        op_types_to_quantize=op_types.split(",") if op_types else None,
        use_external_data_format=external == "external",
    )
    return 0


def trt_worker(model: str) -> int:
    """TensorRT-RTX parse + build (a crash in TensorRT cannot take the benchmark down); prints JSON."""
    from segquant_onnx.tensorrt.build import build_engine

    result = build_engine(model)
    print(json.dumps({"parsed": result.parsed, "built": result.built, "errors": list(result.errors)}))
    return 0


# argv[0] -> (worker, how many arguments it takes at most)
WORKERS = {"_ours-worker": (ours_worker, 6), "_ort-worker": (ort_worker, 6), "_trt-worker": (trt_worker, 1)}


def run_worker(argv: list[str]) -> int | None:
    """Run the worker ``argv[0]`` names; None when ``argv`` is not a worker call."""
    if not argv or argv[0] not in WORKERS:
        return None
    worker, count = WORKERS[argv[0]]
    return worker(*argv[1:1 + count])
