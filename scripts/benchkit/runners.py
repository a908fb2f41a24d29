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
from segquant_onnx.config import PRESETS

log = logging.getLogger("bench")

MODELOPT_PACKAGE = "nvidia-modelopt[onnx]"

# Every row but one writes the unquantized rest in fp32, as the peers' comparison rows do (W8A8 against W8A8),
# whatever QuantConfig's default rest is; "default, fp16 rest" is QuantConfig() as shipped (its default rest,
# fp16), next to ModelOpt's fp16-rest row.
_FP32_REST = {"precision": {"high_precision": "fp32"}}
_NAIVE = {**_FP32_REST, "calibration": {"method": "max"}, "seglinear": {"output": False, "input": False},
          "dualscale": {"mode": "off"}}


def _with(base: dict, **groups: dict) -> dict:
    """`base` (QuantConfig groups as mappings) with some fields of some groups changed."""
    return {**base, **{g: {**base.get(g, {}), **fields} for g, fields in groups.items()}}


_FP8 = {"precision": {"format": "fp8", "high_precision": "fp32"}}


@dataclass(frozen=True)
class OursMethod:
    """One row of segquant-onnx's feature matrix: a label, a file stem, QuantConfig groups as mappings, and
    the row it adds one thing to (the feature table's baseline; None for naive INT8 itself)."""

    label: str
    slug: str
    fields: dict
    baseline: str | None = None
    timed: bool = False  # its cost is compared with the peers': repeated --repeat times

    @property
    def precision(self) -> tuple[str, str]:
        """(format of the quantized linears, dtype of the rest), as QuantConfig resolves the fields."""
        from segquant_onnx import QuantConfig

        p = QuantConfig(**self.fields).precision
        return p.format.value, p.high_precision.value


# INT8: rows before "default" are naive INT8 plus one feature, rows after it the default plus one. FP8: naive
# INT8 in FP8, then the FP8 default, and the FP8 default plus attention / plus the best INT8 recipe's features.
OURS_MATRIX = (
    OursMethod("naive INT8", "naive", _with(_NAIVE), timed=True),
    OursMethod("+SegLinear", "seglinear", _with(_NAIVE, seglinear={"output": True, "input": True}), "naive INT8"),
    OursMethod("+DualScale auto", "dualscale-auto", _with(_NAIVE, dualscale={"mode": "auto"}), "naive INT8"),
    OursMethod("+DualScale all", "dualscale-all", _with(_NAIVE, dualscale={"mode": "all"}), "naive INT8"),
    OursMethod("calib auto", "calib-auto", _with(_NAIVE, calibration={"method": "auto"}), "naive INT8"),
    OursMethod("default", "default", _with(_FP32_REST), "naive INT8", timed=True),
    OursMethod("default, fp16 rest", "default-fp16", {}, "default"),
    OursMethod("default + calib auto", "default-calib-auto", _with(_FP32_REST, calibration={"method": "auto"}),
               "default"),
    OursMethod("+SmoothQuant auto", "smoothquant-auto", _with(_FP32_REST, smoothquant={"mode": "auto"}), "default"),
    OursMethod("+outliers auto", "outliers-auto", _with(_FP32_REST, outliers={"mode": "auto"}), "default"),
    OursMethod("default + target 40 dB", "target40",
               _with(_FP32_REST, fallback={"target_sqnr": 40.0, "max_fallback_pct": 10.0}), "default"),
    OursMethod("default + target 40 dB, <=5% float", "target40-5pct",
               _with(_FP32_REST, fallback={"target_sqnr": 40.0, "max_fallback_pct": 5.0}), "default"),
    # --preset best (SmoothQuant auto, outliers auto, target 40 dB within 5%; the fallback with and without
    # smoothing), fp32 rest like its neighbours
    OursMethod("best preset", "best-preset", _with(_FP32_REST, **PRESETS["best"]), "default"),
    OursMethod("FP8 naive", "fp8-naive", _with(_NAIVE, **_FP8), "naive INT8"),
    OursMethod("FP8 default", "fp8-default", _with(_FP8), "FP8 naive", timed=True),
    OursMethod("FP8 default + attention", "fp8-attention",
               _with(_FP8, precision={"quantize_attention": True}), "FP8 default"),
    OursMethod("FP8 best", "fp8-best",
               _with(_FP8, smoothquant={"mode": "auto"}, outliers={"mode": "auto"},
                     fallback={"target_sqnr": 40.0, "max_fallback_pct": 5.0}), "FP8 default"),
)
# per precision: our naive and default rows (the summary's and the cost table's reference rows)
NAIVE_AND_DEFAULT = {"int8": ("naive INT8", "default"), "fp8": ("FP8 naive", "FP8 default")}
# the peers table's naive and default columns per (format, rest) where they are other rows: INT8 with the
# fp16 rest has our shipped default only
NAIVE_AND_DEFAULT_BY_REST = {("int8", "fp16"): ("", "default, fp16 rest")}
# (label suffix, calibrate_method, op types to quantize or None for ORT's default: every op it can)
ORT_VARIANTS = (
    ("MinMax", "MinMax", None),
    ("Entropy", "Entropy", None),
    ("MinMax, MatMul/Gemm/Conv only", "MinMax", LINEAR_OPS),
)


@dataclass(frozen=True)
class ModeloptMethod:
    """One ModelOpt row: ``--quantize_mode``, ``--calibration_method`` and ``--high_precision_dtype``."""

    label: str
    slug: str  # file stem: modelopt-<slug>.onnx
    mode: str  # int8 | fp8
    calibration: str  # max | entropy
    high_precision: str  # fp32 | fp16 (ModelOpt's default)


MODELOPT_METHODS = (
    ModeloptMethod("ModelOpt max", "max", "int8", "max", "fp32"),
    ModeloptMethod("ModelOpt entropy", "entropy", "int8", "entropy", "fp32"),
    # what ModelOpt's users get by default: the unquantized rest converted to fp16 (ours: --high-precision fp16)
    ModeloptMethod("ModelOpt max, fp16 rest", "max-fp16", "int8", "max", "fp16"),
    # max only: ModelOpt's FP8 is its INT8 calibration rescaled by 448/127, which its int8_to_fp8 documents as
    # valid for max calibration only
    ModeloptMethod("ModelOpt FP8 max", "fp8-max", "fp8", "max", "fp32"),
)


def run_ours(case: ModelCase, method: OursMethod, out_dir: Path, timeout_s: float,
             rss_limit_gib: float | None = None) -> QuantRun:
    """segquant-onnx's Python API with ``QuantConfig(**method.fields)``, in this script's worker. The timed
    rows skip its own output-error measurement (as the peers do not measure); the others run it on the
    eval set, as a cross-check of the benchmark's SQNR."""
    out = out_dir / f"ours-{method.slug}.onnx"
    report = out_dir / f"ours-{method.slug}.json"
    report.unlink(missing_ok=True)
    cmd = worker_command("ours", str(case.onnx_path), str(case.calib_path),
                         "-" if method.timed else str(case.eval_path), str(out), str(report),
                         json.dumps(method.fields))
    run = finish(cmd, out, out_dir / f"ours-{method.slug}.log", timeout_s, rss_limit_gib)
    if run.error is None and report.is_file():
        run.report = json.loads(report.read_text())
        errors = run.report.get("output_error", {})
        if errors:
            run.self_reported_sqnr = float(next(iter(errors.values()))["sqnr_db"])
    return run


def run_ort(case: ModelCase, method: str, op_types: tuple[str, ...] | None, out_dir: Path,
            timeout_s: float, external: bool = False, rss_limit_gib: float | None = None) -> QuantRun:
    """ONNX Runtime ``quantize_static`` (QDQ, per-channel, symmetric INT8), via this script's worker.

    ``op_types`` None quantizes every op type ORT can (its default); otherwise only those. ``external``: write
    the output with external data (``use_external_data_format``: needed over 2 GB).
    """
    stem = f"ort-{method.lower()}" + ("" if op_types is None else "-linear")
    out = out_dir / f"{stem}.onnx"
    cmd = worker_command("ort", str(case.onnx_path), str(case.calib_path), str(out), method, ",".join(op_types or ()),
                         *(["external"] if external else []))
    return finish(cmd, out, out_dir / f"{stem}.log", timeout_s, rss_limit_gib)


def run_modelopt(case: ModelCase, method: ModeloptMethod, out_dir: Path, timeout_s: float,
                 venv_python: Path, rss_limit_gib: float | None = None) -> QuantRun:
    """NVIDIA ModelOpt ONNX PTQ (INT8 or FP8), calibrating on CPU, the rest in ``method.high_precision``.

    ModelOpt reads the calibration npz as one array per input with all samples stacked on axis 0 and
    splits it into batches of the model's input batch size (``CalibrationDataProvider``): the same
    layout as ours, so the file is passed as is.
    """
    out = out_dir / f"modelopt-{method.slug}.onnx"
    # ModelOpt 0.47's load_onnx_model runs onnx.shape_inference.infer_shapes_path(onnx_path), which rewrites
    # its *input* file in place (with value_info added): give it a copy, never the model the others read
    # (the large model's external data files are copied beside it: it reads them by their names)
    source = out_dir / f"modelopt-{method.slug}-input.onnx"
    shutil.copyfile(case.onnx_path, source)
    for data in external_files(case.onnx_path):  # its external data files, under their own names beside it
        shutil.copyfile(data, out_dir / data.name)
    cmd = [str(venv_python), "-m", "modelopt.onnx.quantization", "--onnx_path", str(source),
           "--quantize_mode", method.mode, "--calibration_method", method.calibration,
           "--calibration_data_path", str(case.calib_path), "--calibration_eps", "cpu",
           "--high_precision_dtype", method.high_precision, "--output_path", str(out)]
    return finish(cmd, out, out_dir / f"modelopt-{method.slug}.log", timeout_s, rss_limit_gib)


def external_files(path: Path) -> list[Path]:
    """The external data files the model at ``path`` refers to (none for the tiny models)."""
    from segquant_onnx.ir.graph_io import model_files

    return list(model_files(path)[1:])


def modelopt_command(method: ModeloptMethod) -> str:
    """The command line of a ModelOpt row, as the methods notes show it."""
    return (f"python -m modelopt.onnx.quantization --quantize_mode {method.mode} --calibration_method "
            f"{method.calibration} --calibration_eps cpu --high_precision_dtype {method.high_precision}")


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
    precision: str = "int8"  # int8 | fp8: the format of the quantized linears
    high_precision: str = "fp32"  # the dtype of the unquantized rest


PRECISION_ORDER = ("int8", "fp8")  # the results table groups the methods by precision, ours first in each


def method_plan(args, modelopt_python: Path | None) -> list[PlannedMethod]:
    """Every method in table order: per precision, ours, then ORT, then ModelOpt. Our feature rows run once
    (their time is not compared); the timed rows (naive INT8, default, FP8 default) and the peers run
    ``--repeat`` times (ORT Entropy once: it is dropped when it equals MinMax)."""
    plan = []
    for m in OURS_MATRIX:
        plan.append(PlannedMethod("ours", m.label, lambda case, out, m=m: run_ours(case, m, out, args.timeout),
                                  args.repeat if m.timed else 1, *m.precision))
    for label, m, ops in ORT_VARIANTS:
        if args.skip_ort_entropy and m == "Entropy":
            continue
        plan.append(PlannedMethod("ort", f"ORT {label}",
                                  lambda case, out, m=m, ops=ops: run_ort(case, m, ops, out, args.timeout),
                                  1 if m == "Entropy" else args.repeat))
    if modelopt_python is not None:
        for m in MODELOPT_METHODS:
            plan.append(PlannedMethod(
                "modelopt", m.label,
                lambda case, out, m=m: run_modelopt(case, m, out, args.timeout, modelopt_python), args.repeat,
                m.mode, m.high_precision))
    return sorted(plan, key=lambda p: PRECISION_ORDER.index(p.precision))
