"""The methods compared, and how each runs: segquant-onnx's feature matrix through its Python API, ONNX
Runtime ``quantize_static`` and NVIDIA ModelOpt (from its own virtualenv), each in a measured subprocess.
"""

from __future__ import annotations

import json
import logging
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchkit.cases import ModelCase
from benchkit.launch import QuantRun, finish, last_error_line
from benchkit.measure import LINEAR_OPS
from benchkit.results import BenchState, SkipNote
from benchkit.workers import worker_command

log = logging.getLogger("bench")

MODELOPT_PACKAGE = "nvidia-modelopt[onnx]"

_NAIVE = {"calibration": {"method": "max"}, "seglinear": {"output": False, "input": False},
          "dualscale": {"mode": "off"}}


def _with(base: dict, **groups: dict) -> dict:
    """`base` (QuantConfig groups as mappings) with some fields of some groups changed."""
    return {**base, **{g: {**base.get(g, {}), **fields} for g, fields in groups.items()}}


@dataclass(frozen=True)
class OursMethod:
    """One row of segquant-onnx's feature matrix: a label, a file stem, QuantConfig groups as mappings."""

    label: str
    slug: str
    fields: dict
    timed: bool = False  # its cost is compared with the peers': repeated --repeat times


# Rows before "default" are naive INT8 plus one feature; rows after it are the default plus one.
OURS_MATRIX = (
    OursMethod("naive INT8", "naive", _with(_NAIVE), timed=True),
    OursMethod("+SegLinear", "seglinear", _with(_NAIVE, seglinear={"output": True, "input": True})),
    OursMethod("+DualScale auto", "dualscale-auto", _with(_NAIVE, dualscale={"mode": "auto"})),
    OursMethod("+DualScale all", "dualscale-all", _with(_NAIVE, dualscale={"mode": "all"})),
    OursMethod("calib auto", "calib-auto", _with(_NAIVE, calibration={"method": "auto"})),
    OursMethod("default", "default", {}, timed=True),
    OursMethod("default + calib auto", "default-calib-auto", {"calibration": {"method": "auto"}}),
    OursMethod("+SmoothQuant auto", "smoothquant-auto", {"smoothquant": {"mode": "auto"}}),
    OursMethod("+outliers auto", "outliers-auto", {"outliers": {"mode": "auto"}}),
    OursMethod("default + target 40 dB", "target40", {"fallback": {"target_sqnr": 40.0, "max_fallback_pct": 10.0}}),
    OursMethod("default + target 40 dB, <=5% float", "target40-5pct",
               {"fallback": {"target_sqnr": 40.0, "max_fallback_pct": 5.0}}),
    OursMethod("+SmoothQuant auto + target 40 dB, <=5% float", "smoothquant-target40-5pct",
               {"smoothquant": {"mode": "auto"}, "fallback": {"target_sqnr": 40.0, "max_fallback_pct": 5.0}}),
)
# (label suffix, calibrate_method, op types to quantize or None for ORT's default: every op it can)
ORT_VARIANTS = (
    ("MinMax", "MinMax", None),
    ("Entropy", "Entropy", None),
    ("MinMax, MatMul/Gemm/Conv only", "MinMax", LINEAR_OPS),
)
MODELOPT_METHODS = ("max", "entropy")


def run_ours(case: ModelCase, method: OursMethod, out_dir: Path, timeout_s: float) -> QuantRun:
    """segquant-onnx's Python API with ``QuantConfig(**method.fields)``, in this script's worker. The timed
    rows skip its own output-error measurement (as the peers do not measure); the others run it on the
    eval set, as a cross-check of the benchmark's SQNR."""
    out = out_dir / f"ours-{method.slug}.onnx"
    report = out_dir / f"ours-{method.slug}.json"
    report.unlink(missing_ok=True)
    cmd = worker_command("ours", str(case.onnx_path), str(case.calib_path),
                         "-" if method.timed else str(case.eval_path), str(out), str(report),
                         json.dumps(method.fields))
    run = finish(cmd, out, out_dir / f"ours-{method.slug}.log", timeout_s)
    if run.error is None and report.is_file():
        run.report = json.loads(report.read_text())
        errors = run.report.get("output_error", {})
        if errors:
            run.self_reported_sqnr = float(next(iter(errors.values()))["sqnr_db"])
    return run


def run_ort(case: ModelCase, method: str, op_types: tuple[str, ...] | None, out_dir: Path,
            timeout_s: float) -> QuantRun:
    """ONNX Runtime ``quantize_static`` (QDQ, per-channel, symmetric INT8), via this script's worker.

    ``op_types`` None quantizes every op type ORT can (its default); otherwise only those.
    """
    stem = f"ort-{method.lower()}" + ("" if op_types is None else "-linear")
    out = out_dir / f"{stem}.onnx"
    cmd = worker_command("ort", str(case.onnx_path), str(case.calib_path), str(out), method, ",".join(op_types or ()))
    return finish(cmd, out, out_dir / f"{stem}.log", timeout_s)


def run_modelopt(case: ModelCase, method: str, out_dir: Path, timeout_s: float, venv_python: Path) -> QuantRun:
    """NVIDIA ModelOpt ONNX PTQ (INT8), calibrating on CPU, keeping FP32 for non-quantized ops.

    ModelOpt reads the calibration npz as one array per input with all samples stacked on axis 0 and
    splits it into batches of the model's input batch size (``CalibrationDataProvider``): the same
    layout as ours, so the file is passed as is.
    """
    out = out_dir / f"modelopt-{method}.onnx"
    # ModelOpt 0.47's load_onnx_model runs onnx.shape_inference.infer_shapes_path(onnx_path), which rewrites
    # its *input* file in place (with value_info added): give it a copy, never the model the others read
    # (the benchmark's models keep no external data, so the .onnx alone is the model).
    source = out_dir / f"modelopt-{method}-input.onnx"
    shutil.copyfile(case.onnx_path, source)
    cmd = [str(venv_python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(source),
           "--quantize_mode", "int8", "--calibration_method", method,
           "--calibration_data_path", str(case.calib_path), "--calibration_eps", "cpu",
           "--high_precision_dtype", "fp32", "--output_path", str(out)]
    return finish(cmd, out, out_dir / f"modelopt-{method}.log", timeout_s)


def ensure_modelopt_venv(work_dir: Path, state: BenchState) -> Path | None:
    """``<work_dir>/venv-modelopt`` with ModelOpt installed; None (and a note) when that fails."""
    venv = work_dir / "venv-modelopt"
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import modelopt.onnx.quantization"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        log.info("ModelOpt venv ready: %s", venv)
        return python
    log_path = work_dir / "venv-modelopt-install.log"
    log.info("creating ModelOpt venv %s and installing %s (log: %s; this can take minutes)",
             venv, MODELOPT_PACKAGE, log_path)
    start = time.perf_counter()
    with open(log_path, "w") as log_file:
        steps = [[sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", MODELOPT_PACKAGE]]
        for cmd in steps:
            log_file.write("$ " + shlex.join(cmd) + "\n")
            log_file.flush()
            rc = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT).returncode
            if rc != 0:
                why = f"`{shlex.join(cmd)}` exited {rc}: {last_error_line(log_path.read_text(errors='replace'))}"
                state.notes.append(SkipNote("NVIDIA ModelOpt", f"could not be installed: {why}"))
                log.error("ModelOpt install failed: %s", why)
                return None
    probe = subprocess.run(check, capture_output=True, text=True)
    if probe.returncode != 0:
        why = last_error_line(probe.stderr)
        state.notes.append(SkipNote("NVIDIA ModelOpt", f"installed but does not import: {why}"))
        log.error("ModelOpt does not import: %s", why)
        return None
    seconds = time.perf_counter() - start
    log.info("ModelOpt venv installed in %.0f s", seconds)
    state.notes.append(SkipNote("NVIDIA ModelOpt", f"virtualenv {venv} created and `pip install "
                                f"\"{MODELOPT_PACKAGE}\"` run in this run ({seconds:.0f} s, not counted above)"))
    return python


@dataclass
class PlannedMethod:
    family: str
    label: str
    runner: Callable  # (case, out_dir) -> QuantRun
    repeat: int


def method_plan(args, modelopt_python: Path | None) -> list[PlannedMethod]:
    """Every method in table order. Our feature rows run once (their time is not compared); naive INT8,
    default and the peers run ``--repeat`` times (ORT Entropy once: it is dropped when it equals MinMax)."""
    plan = []
    for m in OURS_MATRIX:
        plan.append(PlannedMethod("ours", m.label, lambda case, out, m=m: run_ours(case, m, out, args.timeout),
                                  args.repeat if m.timed else 1))
    for label, m, ops in ORT_VARIANTS:
        if args.skip_ort_entropy and m == "Entropy":
            continue
        plan.append(PlannedMethod("ort", f"ORT {label}",
                                  lambda case, out, m=m, ops=ops: run_ort(case, m, ops, out, args.timeout),
                                  1 if m == "Entropy" else args.repeat))
    if modelopt_python is not None:
        for m in MODELOPT_METHODS:
            plan.append(PlannedMethod(
                "modelopt", f"ModelOpt {m}",
                lambda case, out, m=m: run_modelopt(case, m, out, args.timeout, modelopt_python), args.repeat))
    return plan
