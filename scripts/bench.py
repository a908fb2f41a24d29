"""Benchmark segquant-onnx against other INT8 post-training quantizers, side by side in one run.

Models: the bundled example DiT (random weights), the bundled *trained* demo DiT (``demo``; and
``demo-dynamo``: its saved checkpoint re-exported with the dynamo exporter, same calib/eval data), and tiny
SD3 / FLUX transformers exported with the TorchScript and the dynamo exporter, and a tiny PixArt-alpha
(dynamo; ``pixart-ts`` on request). (``sd3-ts`` is still accepted by ``--models`` but is not run by
default: it is the same model as ``example``.)

Methods: the FP32 reference; segquant-onnx as a feature matrix (naive INT8, each feature alone on top of
it, the shipped default, and the default plus SmoothQuant / outlier channels / a 40 dB target; every row
is a ``QuantConfig`` passed to the library in a measured subprocess); ONNX Runtime ``quantize_static`` QDQ
with MinMax (and Entropy, dropped from the table when its scales are identical to MinMax's) over every
op type it quantizes by default, plus MinMax on MatMul/Gemm/Conv only; NVIDIA ModelOpt ONNX PTQ with max
and entropy calibration. For every (model, method) this script records:

- output SQNR (dB) against the FP32 model on a held-out eval set, computed here, by the same code for
  every method (ONNX Runtime CPU, one sample at a time, sum(ref^2) / sum((ref - q)^2) over all samples);
- for segquant-onnx, the INT8 FLOP fraction, DualScale's extra GEMM FLOPs and the outlier channels'
  float FLOPs, from its own report;
- quantization wall time and peak RSS of the quantizer process (each quantizer runs in its own
  subprocess, started by a minimal launcher that reads its ``ru_maxrss`` with ``os.wait4``); repeated
  only for the rows whose cost is compared (naive INT8, default, the peers);
- output model size, number of QuantizeLinear/DequantizeLinear nodes, and how many MatMul/Gemm/Conv
  nodes with a constant weight read that weight through a DequantizeLinear;
- violations of TensorRT's explicit-quantization rules (``segquant_onnx.tensorrt.check.check_tensorrt``) and
  whether TensorRT-RTX parses the model and builds an engine (``segquant_onnx.tensorrt.build``).

Then, on the models that have them: per-layer SQNR with and without SegLinear (example, demo,
flux-dynamo, pixart-dynamo); ONNX Runtime CPU latency of FP32 / naive INT8 / default / +DualScale all /
+outliers auto / SmoothQuant auto + target 40 dB in one process (demo, flux-dynamo); image PSNR/SSIM of
sampled digits vs FP32 (demo).

It prints Markdown tables and writes them, with the machine, versions and the command, to
``BENCHMARKS.md`` at the repository root (the full numbers also go to ``<work-dir>/bench_results.json``).

Usage::

    python scripts/bench.py                       # everything (creates the ModelOpt venv on first use)
    python scripts/bench.py --quick               # bundled example only, segquant-onnx + ONNX Runtime, 1 run each
    python scripts/bench.py --skip-modelopt --models example,demo

ModelOpt runs from its own virtualenv (``<work-dir>/venv-modelopt``) because it pins onnx and
onnxruntime-gpu versions; if it cannot be installed or fails on a model, that row says why.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = REPO_ROOT / "segquant_onnx" / "data"
EXPORT_SCRIPT = REPO_ROOT / "scripts" / "export_example.py"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_demo_dit.py"
DEFAULT_MARKDOWN = REPO_ROOT / "BENCHMARKS.md"

CALIB_SAMPLES, CALIB_SEED = 16, 1
EVAL_SAMPLES, EVAL_SEED = 8, 2

ALL_MODELS = ("example", "demo", "demo-dynamo", "sd3-dynamo", "flux-ts", "flux-dynamo", "pixart-dynamo")
# accepted by --models, not run by default: sd3-ts is the bundled example (same weights, same graph, same data)
OPTIONAL_MODELS = ("sd3-ts", "pixart-ts")
LINEAR_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops that only move or relabel a weight between its DequantizeLinear and the linear op reading it
PASSTHROUGH_OPS = ("Transpose", "Reshape", "Identity", "Cast", "Squeeze", "Unsqueeze", "Flatten")

MODELOPT_PACKAGE = "nvidia-modelopt[onnx]"

_NAIVE = {"calib_method": "max", "seg_output": False, "seg_input": False, "dualscale": "off"}


@dataclass(frozen=True)
class OursMethod:
    """One row of segquant-onnx's feature matrix: a label, a file stem, QuantConfig fields."""

    label: str
    slug: str
    fields: dict
    timed: bool = False  # its cost is compared with the peers': repeated --repeat times


# Rows before "default" are naive INT8 plus one feature; rows after it are the default plus one.
OURS_MATRIX = (
    OursMethod("naive INT8", "naive", dict(_NAIVE), timed=True),
    OursMethod("+SegLinear", "seglinear", {**_NAIVE, "seg_output": True, "seg_input": True}),
    OursMethod("+DualScale auto", "dualscale-auto", {**_NAIVE, "dualscale": "auto"}),
    OursMethod("+DualScale all", "dualscale-all", {**_NAIVE, "dualscale": "all"}),
    OursMethod("calib auto", "calib-auto", {**_NAIVE, "calib_method": "auto"}),
    OursMethod("default", "default", {}, timed=True),
    OursMethod("default + calib auto", "default-calib-auto", {"calib_method": "auto"}),
    OursMethod("+SmoothQuant auto", "smoothquant-auto", {"smoothquant": "auto"}),
    OursMethod("+outliers auto", "outliers-auto", {"outlier_channels": "auto"}),
    OursMethod("default + target 40 dB", "target40", {"target_sqnr": 40.0, "max_fallback_pct": 10.0}),
    OursMethod("default + target 40 dB, <=5% float", "target40-5pct", {"target_sqnr": 40.0, "max_fallback_pct": 5.0}),
    OursMethod("+SmoothQuant auto + target 40 dB, <=5% float", "smoothquant-target40-5pct",
               {"smoothquant": "auto", "target_sqnr": 40.0, "max_fallback_pct": 5.0}),
)
# (label suffix, calibrate_method, op types to quantize or None for ORT's default: every op it can)
ORT_VARIANTS = (
    ("MinMax", "MinMax", None),
    ("Entropy", "Entropy", None),
    ("MinMax, MatMul/Gemm/Conv only", "MinMax", LINEAR_OPS),
)
MODELOPT_METHODS = ("max", "entropy")

PER_LAYER_MODELS = ("example", "demo", "flux-dynamo", "pixart-dynamo")  # per-layer SQNR, naive INT8 vs +SegLinear
LATENCY_MODELS = ("demo", "flux-dynamo")
LATENCY_METHODS = ("FP32 reference", "naive INT8", "default", "+DualScale all", "+outliers auto",
                   "+SmoothQuant auto + target 40 dB, <=5% float")
LATENCY_RUNS, LATENCY_WARMUP = 30, 5
IMAGE_METHODS = ("naive INT8", "default", "+SmoothQuant auto")  # demo DiT images vs FP32
IMAGE_SEEDS, IMAGE_STEPS = (0, 1), 20


# --------------------------------------------------------------------------------------------------
# data classes
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelCase:
    """One model to quantize, with its calibration and held-out eval data."""

    name: str
    onnx_path: Path
    calib_path: Path
    eval_path: Path
    description: str


@dataclass
class QuantRun:
    """What running one quantizer produced (before evaluation)."""

    output: Path | None
    seconds: float | None = None
    peak_rss_mib: float | None = None
    error: str | None = None  # first line of the failure; None when it worked
    self_reported_sqnr: float | None = None  # the tool's own number, where it reports one
    log_path: Path | None = None
    report: dict | None = None  # segquant-onnx's JSON report
    runs: int = 1


@dataclass
class ResultRow:
    """One (model, method) line of the results table."""

    model: str
    method: str
    family: str  # "fp32", "ours", "ort", "modelopt"
    sqnr_db: float | None = None
    seconds: float | None = None
    runs: int | None = None  # quantizer runs behind `seconds` (fastest of them)
    peak_rss_mib: float | None = None
    size_bytes: int | None = None
    qdq_nodes: int | None = None
    weights_quantized: int | None = None
    weighted_linear: int | None = None
    float_weight_q: int | None = None  # QuantizeLinear nodes whose input is a float initializer
    trt: str = "-"  # "built", "parse failed", "build failed", "n/a (...)"
    trt_error: str | None = None  # first error line, then the cause line TensorRT logged, if any
    trt_cause: str | None = None
    trt_violations: int | None = None  # segquant_onnx.tensorrt.check.check_tensorrt findings
    trt_rules: dict | None = None  # rule -> count
    self_reported_sqnr: float | None = None
    int8_flop_fraction: float | None = None  # ours: report summary
    dualscale_extra_flop_pct: float | None = None
    dualscale_applied: int | None = None
    dualscale_candidates: int | None = None
    outlier_float_flop_pct: float | None = None
    fallback_sites: int | None = None
    error: str | None = None
    source: str | None = None  # segquant-onnx source fingerprint the run used (ours only)
    output: Path | None = None  # the quantized model (or the FP32 model for the reference)
    report: dict | None = field(default=None, repr=False)


@dataclass
class SkipNote:
    what: str
    why: str


@dataclass
class BenchState:
    rows: list[ResultRow] = field(default_factory=list)
    notes: list[SkipNote] = field(default_factory=list)
    per_layer: list[dict] = field(default_factory=list)  # one entry per model
    latency: list[dict] = field(default_factory=list)
    images: list[dict] = field(default_factory=list)
    section_seconds: dict = field(default_factory=dict)  # extra section -> seconds spent

    def row(self, model: str, method: str) -> ResultRow | None:
        return next((r for r in self.rows if r.model == model and r.method == method), None)


# --------------------------------------------------------------------------------------------------
# subprocess helpers
# --------------------------------------------------------------------------------------------------


def first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()[:300]
    return ""


def last_error_line(log_text: str) -> str:
    """The most telling line of a failed tool's log: the last line naming an error, else the last."""
    lines = [ln.strip() for ln in log_text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if "Error" in line or "error:" in line or "Exception" in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


# A tiny launcher between the benchmark and each quantizer. Linux carries a process's peak RSS
# across fork + exec (exec folds the old address space's high-water mark into the new program's
# ru_maxrss), so a quantizer started straight from this process would report at least this
# process's own peak (hundreds of MiB once torch is imported for the exports). The launcher is
# ``python -S`` with only os/sys loaded (about 10 MiB); it forks the quantizer, waits for it with
# wait4 and writes that child's ru_maxrss (KiB) to a file.
_LAUNCHER = """
import os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        sys.stderr.write(f"cannot run {cmd[0]}: {exc}\\n")
    os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(out, "w") as f:
    f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) & 0xFF)
"""


def run_measured(cmd: list[str], log_path: Path, timeout_s: float):
    """Run ``cmd``; return (returncode or None on timeout, wall seconds, peak RSS MiB or None, log).

    Peak RSS is the quantizer process's ``ru_maxrss`` (with any descendants it waited for), taken
    by :data:`_LAUNCHER`; wall time includes the launcher's start-up (a few ms).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    rss_file = log_path.with_suffix(".maxrss")
    rss_file.unlink(missing_ok=True)
    with open(log_path, "w") as log_file:
        log_file.write("$ " + shlex.join(cmd) + "\n")
        log_file.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, str(rss_file), *cmd],
                                stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and the quantizer share this new session
            proc.wait()
            rc = None
        seconds = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    rss = int(rss_file.read_text()) / 1024.0 if rss_file.is_file() else None
    return rc, seconds, rss, text


def source_fingerprint() -> str:
    """Short hash of segquant-onnx's Python sources (the package and the passes it loads), so that a
    report can tell when the library changed while the benchmark ran."""
    digest = hashlib.sha256()
    for folder in (REPO_ROOT / "segquant_onnx", REPO_ROOT / "passes"):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            digest.update(str(path.relative_to(REPO_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:10]


def file_digest(path: Path) -> str:
    """Short sha256 of a file (models and data can change under a running benchmark too)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:10]
    except OSError:
        return "missing"


def case_digests(cases) -> dict[str, str]:
    return {f"{c.name}:{kind}": file_digest(path) for c in cases
            for kind, path in (("onnx", c.onnx_path), ("calib", c.calib_path), ("eval", c.eval_path))}


def git_description() -> str:
    """'<commit> (clean)' or '<commit> + uncommitted changes', or 'not a git checkout'."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=REPO_ROOT, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "segquant_onnx", "passes"],
                               capture_output=True, text=True, cwd=REPO_ROOT, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"{head} + uncommitted changes" if dirty else f"{head} (clean)"


# --------------------------------------------------------------------------------------------------
# models and data
# --------------------------------------------------------------------------------------------------


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def export_demo_dynamo(path: Path) -> dict:
    """The trained demo DiT (its saved checkpoint) through the dynamo exporter, as train_demo_dit.py does."""
    from diffusers import SD3Transformer2DModel

    train = load_script(TRAIN_SCRIPT)
    transformer = SD3Transformer2DModel.from_pretrained(train.CHECKPOINT_DIR).eval()
    with np.load(DATA_DIR / "demo_dit_conds.npz") as npz:
        conds = dict(npz)
    with contextlib.redirect_stdout(sys.stderr):
        return train.export(transformer, path, dynamo=True, conds=conds)


def prepare_models(names: list[str], work_dir: Path) -> list[ModelCase]:
    """The bundled example as shipped; the tiny SD3/FLUX models exported into ``work_dir/models``."""
    cases = []
    exporter = None
    model_dir = work_dir / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name == "example":
            cases.append(ModelCase(
                name, DATA_DIR / "example_dit.onnx", DATA_DIR / "example_dit_calib.npz",
                DATA_DIR / "example_dit_eval.npz",
                "bundled example_dit.onnx (the tiny SD3 transformer, random weights, TorchScript exporter) "
                "with its calib (16) / eval (8) npz"))
            continue
        if name == "demo":
            cases.append(ModelCase(
                name, DATA_DIR / "demo_dit.onnx", DATA_DIR / "demo_dit_calib.npz", DATA_DIR / "demo_dit_eval.npz",
                "bundled trained demo DiT (SD3Transformer2DModel, 432k parameters, digits, rectified flow; "
                "TorchScript exporter, opset 17) with its trajectory-captured calib (80 feeds) / eval (40 feeds, "
                "another seed) npz"))
            continue
        if name == "demo-dynamo":
            onnx_path = model_dir / "demo-dynamo.onnx"
            log.info("exporting the demo DiT checkpoint (dynamo) -> %s", onnx_path)
            info = export_demo_dynamo(onnx_path)
            cases.append(ModelCase(
                name, onnx_path, DATA_DIR / "demo_dit_calib.npz", DATA_DIR / "demo_dit_eval.npz",
                f"the same trained demo DiT exported by the dynamo exporter (opset 18, ORT vs torch relative "
                f"error {info['rel_diff']:.1e}) with the demo's calib / eval npz"))
            continue
        if exporter is None:
            exporter = load_script(EXPORT_SCRIPT)
        kind, which = name.split("-")
        dynamo = which == "dynamo"
        onnx_path = model_dir / f"{name}.onnx"
        export = getattr(exporter, f"export_{kind}_tiny")
        log.info("exporting %s (dynamo=%s) -> %s", kind, dynamo, onnx_path)
        with contextlib.redirect_stdout(sys.stderr):  # torch.onnx's progress lines are not the report
            info = export(onnx_path, dynamo=dynamo)
        calib_path = model_dir / f"{kind}_calib.npz"
        eval_path = model_dir / f"{kind}_eval.npz"
        np.savez(calib_path, **exporter.make_calibration(kind, CALIB_SAMPLES, seed=CALIB_SEED))
        np.savez(eval_path, **exporter.make_calibration(kind, EVAL_SAMPLES, seed=EVAL_SEED))
        exporter_name = "dynamo" if dynamo else "TorchScript"
        cases.append(ModelCase(
            name, onnx_path, calib_path, eval_path,
            f"tiny {kind.upper()} transformer (random weights), {exporter_name} exporter, opset {info['opset']}, "
            f"calib {CALIB_SAMPLES} / eval {EVAL_SAMPLES} samples"))
    return cases


def iter_samples(npz_path: Path):
    """One feed dict per sample (batch 1): axis 0 of every array indexes the samples."""
    with np.load(npz_path) as data:
        arrays = {k: data[k] for k in data.files}
    count = len(next(iter(arrays.values())))
    for i in range(count):
        yield {k: v[i:i + 1] for k, v in arrays.items()}


# --------------------------------------------------------------------------------------------------
# method runners (each runs its quantizer in a subprocess)
# --------------------------------------------------------------------------------------------------


def run_ours(case: ModelCase, method: OursMethod, out_dir: Path, timeout_s: float) -> QuantRun:
    """segquant-onnx's Python API with ``QuantConfig(**method.fields)``, in this script's worker. The timed
    rows skip its own output-error measurement (as the peers do not measure); the others run it on the
    eval set, as a cross-check of the benchmark's SQNR."""
    out = out_dir / f"ours-{method.slug}.onnx"
    report = out_dir / f"ours-{method.slug}.json"
    report.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ours-worker", str(case.onnx_path),
           str(case.calib_path), "-" if method.timed else str(case.eval_path), str(out), str(report),
           json.dumps(method.fields)]
    run = _finish(cmd, out, out_dir / f"ours-{method.slug}.log", timeout_s)
    if run.error is None and report.is_file():
        run.report = json.loads(report.read_text())
        errors = run.report.get("output_error", {})
        if errors:
            run.self_reported_sqnr = float(next(iter(errors.values()))["sqnr_db"])
    return run


def ours_worker(model: str, calib: str, eval_data: str, out: str, report: str, fields: str) -> int:
    """Runs inside the measured subprocess: segquant-onnx with the given QuantConfig fields."""
    from segquant_onnx import QuantConfig, quantize

    skip = eval_data == "-"
    quantize(model, calib, QuantConfig(**json.loads(fields)), output=out, force=True,
             eval_data=None if skip else eval_data, report_path=report, progress=False, evaluate=not skip)
    return 0


def run_ort(case: ModelCase, method: str, op_types: tuple[str, ...] | None, out_dir: Path,
            timeout_s: float) -> QuantRun:
    """ONNX Runtime ``quantize_static`` (QDQ, per-channel, symmetric INT8), via this script's worker.

    ``op_types`` None quantizes every op type ORT can (its default); otherwise only those.
    """
    stem = f"ort-{method.lower()}" + ("" if op_types is None else "-linear")
    out = out_dir / f"{stem}.onnx"
    cmd = [sys.executable, str(Path(__file__).resolve()), "_ort-worker", str(case.onnx_path),
           str(case.calib_path), str(out), method, ",".join(op_types or ())]
    return _finish(cmd, out, out_dir / f"{stem}.log", timeout_s)


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
    return _finish(cmd, out, out_dir / f"modelopt-{method}.log", timeout_s)


def _finish(cmd: list[str], out: Path, log_path: Path, timeout_s: float) -> QuantRun:
    if out.exists():
        out.unlink()
    rc, seconds, rss, text = run_measured(cmd, log_path, timeout_s)
    run = QuantRun(output=out, seconds=seconds, peak_rss_mib=rss, log_path=log_path)
    if rc is None:
        run.error = f"timed out after {timeout_s:.0f} s"
    elif rc != 0:
        run.error = f"exit {rc}: {last_error_line(text)}"
    elif not out.is_file():
        run.error = "exited 0 but wrote no model"
    return run


def ort_worker(model: str, calib: str, out: str, method: str, op_types: str = "") -> int:
    """Runs inside the measured subprocess: ORT static QDQ quantization."""
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
    )
    return 0


def trt_worker(model: str) -> int:
    """Runs in a subprocess (a crash in TensorRT cannot take the benchmark down); prints JSON."""
    from segquant_onnx.tensorrt.build import build_engine

    result = build_engine(model)
    print(json.dumps({"parsed": result.parsed, "built": result.built, "errors": list(result.errors)}))
    return 0


# --------------------------------------------------------------------------------------------------
# ModelOpt virtualenv
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# measurements on the produced models
# --------------------------------------------------------------------------------------------------


def make_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def reference_outputs(case: ModelCase) -> list[list[np.ndarray]]:
    session = make_session(case.onnx_path)
    names = [o.name for o in session.get_outputs()]
    return [session.run(names, feed) for feed in iter_samples(case.eval_path)]


def output_sqnr_db(case: ModelCase, model: Path, reference: list[list[np.ndarray]]) -> float:
    """SQNR of all outputs over all eval samples: 10 log10(sum ref^2 / sum (ref - q)^2)."""
    session = make_session(model)
    names = [o.name for o in session.get_outputs()]
    signal = noise = 0.0
    for feed, ref_outputs in zip(iter_samples(case.eval_path), reference):
        for ref, got in zip(ref_outputs, session.run(names, feed)):
            ref64 = ref.astype(np.float64)
            signal += float(np.sum(ref64 ** 2))
            noise += float(np.sum((ref64 - got.astype(np.float64)) ** 2))
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(signal / noise)


def model_size(path: Path) -> int:
    """Bytes of the .onnx file plus any external-data files it references."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    files = {path}
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    files.add(path.parent / entry.value)
    return sum(f.stat().st_size for f in files if f.is_file())


def graph_stats(path: Path) -> tuple[int, int, int, int]:
    """(Q/DQ node count, linear nodes whose constant weight goes through a DQ, linear nodes with a
    constant weight, QuantizeLinear nodes reading a float initializer) for the main graph.

    A tensor is constant when it is an initializer or every input of its producer is constant. A
    MatMul/Gemm/Conv has a quantized weight when one of its constant inputs is produced by a
    DequantizeLinear, possibly behind Transpose/Reshape/Cast-like ops.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    constant = {t.name for t in graph.initializer}
    float_inits = {t.name for t in graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    producer = {}
    for node in graph.node:  # ONNX graphs are topologically sorted
        for out in node.output:
            producer[out] = node
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" or (inputs and all(i in constant for i in inputs)):
            constant.update(node.output)

    def through_dq(name: str) -> bool:
        while name in producer:
            node = producer[name]
            if node.op_type == "DequantizeLinear":
                return True
            if node.op_type not in PASSTHROUGH_OPS:
                return False
            name = node.input[0]
        return False

    qdq = sum(node.op_type in QDQ_OPS for node in graph.node)
    float_q = sum(node.op_type == "QuantizeLinear" and node.input[0] in float_inits for node in graph.node)
    weighted = quantized = 0
    for node in graph.node:
        if node.op_type not in LINEAR_OPS:
            continue
        weights = [i for i in node.input[:2] if i in constant]
        if not weights:
            continue
        weighted += 1
        quantized += any(through_dq(w) for w in weights)
    return qdq, quantized, weighted, float_q


def scale_tensors(path: Path) -> dict[str, np.ndarray]:
    """The scale initializers of every QuantizeLinear/DequantizeLinear, by name."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    names = {n.input[1] for n in graph.node if n.op_type in QDQ_OPS and len(n.input) > 1}
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name in names}


def identical_scales(a: Path, b: Path) -> tuple[int, int]:
    """(scales equal in both models, scales in ``a``), matched by initializer name."""
    sa, sb = scale_tensors(a), scale_tensors(b)
    same = sum(1 for k, v in sa.items() if k in sb and np.array_equal(v, sb[k]))
    return same, len(sa)


def trt_check(path: Path, timeout_s: float) -> tuple[str, str | None, str | None]:
    """(status, first error line, cause) where status is 'built', 'parse failed', 'build failed'
    or 'n/a (why)'. The cause is the first later line with a TensorRT "Error Code" (the parser's
    first line often only says "Invalid Node"), skipping CUDA-driver complaints of a GPU-less host.
    """
    if importlib.util.find_spec("tensorrt_rtx_bindings") is None:
        return "n/a (tensorrt_rtx_bindings not installed)", None, None
    cmd = [sys.executable, str(Path(__file__).resolve()), "_trt-worker", str(path)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return f"n/a (timed out after {timeout_s:.0f} s)", None, None
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return f"n/a (worker exit {proc.returncode}: {last_error_line(proc.stderr)})", None, None
    result = json.loads(lines[-1])
    if result["built"]:
        return "built", None, None
    text = "\n".join(result["errors"]) or "no error message"
    error_lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((ln for ln in error_lines[1:] if "Error Code" in ln and "cudaError" not in ln), None)
    return ("build failed" if result["parsed"] else "parse failed"), error_lines[0], cause


def trt_rule_check(path: Path) -> tuple[int, dict]:
    """(violation count, rule -> count) from segquant-onnx's static TensorRT checker."""
    import onnx
    from segquant_onnx.tensorrt.check import check_tensorrt

    violations = check_tensorrt(onnx.load(str(path), load_external_data=False), str(path.parent))
    rules: dict[str, int] = {}
    for v in violations:
        rules[v.rule] = rules.get(v.rule, 0) + 1
    return len(violations), rules


def measure(row: ResultRow, case: ModelCase, model: Path, reference, trt_timeout_s: float) -> None:
    row.output = model
    try:
        row.sqnr_db = output_sqnr_db(case, model, reference)
    except Exception as exc:  # a peer's model ONNX Runtime cannot run is a result, not a crash
        row.error = f"ONNX Runtime could not run it: {type(exc).__name__}: {first_line(str(exc))}"
    row.size_bytes = model_size(model)
    row.qdq_nodes, row.weights_quantized, row.weighted_linear, row.float_weight_q = graph_stats(model)
    try:
        row.trt_violations, row.trt_rules = trt_rule_check(model)
    except Exception as exc:  # noqa: BLE001 - the checker failing on a peer's graph is a result too
        row.trt_rules = {f"checker failed: {type(exc).__name__}: {first_line(str(exc))}": 1}
    row.trt, row.trt_error, row.trt_cause = trt_check(model, trt_timeout_s)


def apply_report(row: ResultRow, report: dict | None) -> None:
    """Copy the numbers of segquant-onnx's own report that the tables show."""
    if not report:
        return
    summary = report.get("summary", {})
    row.report = report
    row.int8_flop_fraction = summary.get("int8_flop_fraction")
    row.dualscale_extra_flop_pct = summary.get("dualscale_extra_flop_pct")
    row.dualscale_applied = summary.get("dualscale_applied")
    row.dualscale_candidates = summary.get("dualscale_candidates")
    row.outlier_float_flop_pct = (report.get("outliers") or {}).get("float_flop_pct")
    row.fallback_sites = len((report.get("fallback") or {}).get("sites", ()))


# --------------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------------


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


def repeated(run_once: Callable[[], QuantRun], times: int) -> QuantRun:
    """Run a quantizer ``times`` times (stopping at a failure): the last run, with the fastest wall
    time and the largest peak RSS of all runs."""
    runs = []
    for _ in range(times):
        runs.append(run_once())
        if runs[-1].error is not None:
            return runs[-1]
    last = runs[-1]
    last.seconds = min(r.seconds for r in runs)
    rss = [r.peak_rss_mib for r in runs if r.peak_rss_mib is not None]
    last.peak_rss_mib = max(rss) if rss else None
    last.runs = len(runs)
    return last


def bench_model(case: ModelCase, plan: list[PlannedMethod], work_dir: Path, args, state: BenchState) -> None:
    log.info("=== %s: %s", case.name, case.description)
    reference = reference_outputs(case)
    fp = ResultRow(case.name, "FP32 reference", "fp32")
    measure(fp, case, case.onnx_path, reference, args.timeout)
    fp.sqnr_db = None  # the reference itself
    state.rows.append(fp)

    out_dir = work_dir / "quantized" / case.name
    out_dir.mkdir(parents=True, exist_ok=True)
    for method in plan:
        family, label = method.family, method.label
        log.info("%s: %s ...", case.name, label)
        source = source_fingerprint() if family == "ours" else None
        run = repeated(lambda: method.runner(case, out_dir), method.repeat)
        if source is not None and source_fingerprint() != source:
            source += " (changed during this row)"
        row = ResultRow(case.name, label, family, seconds=run.seconds, runs=run.runs,
                        peak_rss_mib=run.peak_rss_mib, self_reported_sqnr=run.self_reported_sqnr, source=source)
        if run.error is not None:
            row.error = run.error
            log.warning("%s: %s failed: %s (log: %s)", case.name, label, run.error, run.log_path)
        else:
            measure(row, case, run.output, reference, args.timeout)
            apply_report(row, run.report)
            log.info("%s: %s: SQNR %.2f dB, %.1f s, %.0f MiB, check-trt %s, TRT-RTX %s", case.name, label,
                     row.sqnr_db if row.sqnr_db is not None else float("nan"), row.seconds,
                     row.peak_rss_mib, row.trt_violations, row.trt)
        state.rows.append(row)

    minmax, entropy = out_dir / "ort-minmax.onnx", out_dir / "ort-entropy.onnx"
    done = {r.method for r in state.rows if r.model == case.name and r.error is None}
    if {"ORT MinMax", "ORT Entropy"} <= done:
        same, total = identical_scales(minmax, entropy)
        ent, mm = state.row(case.name, "ORT Entropy"), state.row(case.name, "ORT MinMax")
        if total and same == total:
            state.rows.remove(ent)
            state.notes.append(SkipNote(
                f"{case.name} / ORT Entropy",
                f"run, and left out of the tables: all {total} Q/DQ scales are identical to ORT MinMax's (SQNR "
                f"{fmt(ent.sqnr_db, '.2f')} vs {fmt(mm.sqnr_db, '.2f')} dB). `quantize_static` builds the "
                "EntropyCalibrater with its defaults num_bins = num_quantized_bins = 128 (its extra_options "
                "cannot change them), so the KL search has no threshold below the max to try."))


# --------------------------------------------------------------------------------------------------
# extra sections: per-layer SQNR, CPU latency, demo images
# --------------------------------------------------------------------------------------------------


def readable_names(onnx_path: Path) -> dict[str, str]:
    """Node name -> the PyTorch module it came from (dynamo exports record it in metadata_props
    ``pkg.torch.onnx.name_scopes``); TorchScript node names already read as module paths."""
    import ast

    import onnx

    names = {}
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes:
            try:
                chain = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                continue
            if len(chain) >= 2 and chain[-2]:
                names[node.name] = chain[-2]
    return names


def per_layer_section(case: ModelCase, state: BenchState) -> None:
    """Per-layer SQNR of naive INT8 and +SegLinear (``segquant_onnx.analysis.compare.compare_models(per_layer=True)``,
    i.e. ``layer_error.per_layer_error`` on the canonical float graph, as ``quantize --per-layer`` does)."""
    from segquant_onnx.analysis.compare import compare_models

    naive, seg = state.row(case.name, "naive INT8"), state.row(case.name, "+SegLinear")
    if naive is None or seg is None or naive.error or seg.error:
        state.notes.append(SkipNote(f"{case.name} / per-layer SQNR", "skipped: naive INT8 or +SegLinear failed"))
        return
    log.info("%s: per-layer SQNR, naive INT8 vs +SegLinear ...", case.name)
    layers = {}
    for row in (naive, seg):
        result = compare_models(case.onnx_path, row.output, case.eval_path, per_layer=True, progress=False)
        layers[row.method] = {entry["layer"]: entry["sqnr_db"] for entry in result["layers"]}
    stats = {}
    for method, values in layers.items():
        finite = np.array([v for v in values.values() if math.isfinite(v)])
        stats[method] = {"layers": len(values), "infinite": len(values) - len(finite),
                         "min": float(finite.min()), "median": float(np.median(finite)),
                         "mean": float(finite.mean()),
                         "output_sqnr": (naive if method == "naive INT8" else seg).sqnr_db}
    names = readable_names(case.onnx_path)
    sites = []
    for segment in (seg.report or {}).get("segments", []):
        layer = segment["linear"]
        a, b = layers["naive INT8"].get(layer), layers["+SegLinear"].get(layer)
        sites.append({"layer": layer, "module": names.get(layer), "kind": segment["kind"],
                      "sizes": list(segment["sizes"]), "via": segment["via"], "naive": a, "seglinear": b})
    state.per_layer.append({"model": case.name, "stats": stats, "sites": sites, "layers": layers})


def latency_section(case: ModelCase, state: BenchState) -> None:
    """ONNX Runtime CPU latency of the LATENCY_METHODS rows, in this one process:
    one feed (the first eval sample), every session warmed up, then LATENCY_RUNS rounds that run every
    model once each in turn (so load changes hit all of them alike); the median per model."""
    import onnxruntime as ort

    rows = [state.row(case.name, m) for m in LATENCY_METHODS]
    rows = [r for r in rows if r is not None and r.error is None and r.output is not None]
    if not any(r.method == "naive INT8" for r in rows):
        state.notes.append(SkipNote(f"{case.name} / latency", "skipped: naive INT8 failed"))
        return
    log.info("%s: ONNX Runtime CPU latency of %s ...", case.name, ", ".join(r.method for r in rows))
    feed = next(iter_samples(case.eval_path))
    sessions = {}
    for row in rows:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        sessions[row.method] = ort.InferenceSession(str(row.output), opts, providers=["CPUExecutionProvider"])
    for session in sessions.values():
        for _ in range(LATENCY_WARMUP):
            session.run(None, feed)
    times = {m: [] for m in sessions}
    for _ in range(LATENCY_RUNS):
        for method, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feed)
            times[method].append(time.perf_counter() - start)
    median = {m: float(np.median(t)) * 1e3 for m, t in times.items()}
    spread = {m: (float(np.percentile(t, 25)) * 1e3, float(np.percentile(t, 75)) * 1e3) for m, t in times.items()}
    state.latency.append({"model": case.name, "median_ms": median, "iqr_ms": spread,
                          "dualscale_extra_flop_pct": {r.method: r.dualscale_extra_flop_pct for r in rows},
                          "outlier_float_flop_pct": {r.method: r.outlier_float_flop_pct for r in rows},
                          "int8_flop_pct": {r.method: None if r.int8_flop_fraction is None else
                                            100 * r.int8_flop_fraction for r in rows}})


def image_section(case: ModelCase, state: BenchState) -> None:
    """Demo DiT images: FP32 vs IMAGE_METHODS, sampled from the same noise (``segquant-onnx demo``'s
    functions: rectified-flow Euler through ONNX Runtime, one thread), PSNR/SSIM vs the FP32 images."""
    from segquant_onnx.diffusion.demo import DEMO_CONDS, sample_all, to_unit
    from segquant_onnx.diffusion.sampling import initial_noise, onnx_transformer
    from segquant_onnx.diffusion.image_metrics import psnr, ssim

    rows = [state.row(case.name, m) for m in IMAGE_METHODS]
    rows = [r for r in rows if r is not None and r.error is None]
    if not rows:
        state.notes.append(SkipNote(f"{case.name} / images", "skipped: no quantized model"))
        return
    log.info("%s: sampling images with FP32, %s ...", case.name, ", ".join(r.method for r in rows))
    with np.load(DATA_DIR / DEMO_CONDS) as npz:
        conds = {k: npz[k] for k in ("encoder_hidden_states", "pooled_projections")}
    classes = list(range(len(conds["pooled_projections"])))
    transformers = {"FP32": onnx_transformer(case.onnx_path)}
    transformers.update({r.method: onnx_transformer(r.output) for r in rows})
    shape = transformers["FP32"].inputs["hidden_states"]
    latents = np.concatenate([initial_noise(s, [1, *shape[1:]]) for s in IMAGE_SEEDS for _ in classes])
    cond = {k: np.concatenate([v[c:c + 1] for _ in IMAGE_SEEDS for c in classes]) for k, v in conds.items()}
    results = sample_all(transformers, latents, cond, IMAGE_STEPS)
    fp = to_unit(results["FP32"]["latents"][:, 0])
    methods = {}
    for row in rows:
        q = to_unit(results[row.method]["latents"][:, 0])
        psnrs, ssims = [psnr(a, b) for a, b in zip(fp, q)], [ssim(a, b) for a, b in zip(fp, q)]
        methods[row.method] = {"psnr_db": float(np.mean(psnrs)), "psnr_db_min": float(np.min(psnrs)),
                               "ssim": float(np.mean(ssims)), "ssim_min": float(np.min(ssims)),
                               "mean_step_sqnr_db": float(np.mean(results[row.method]["same_input"])),
                               "output_sqnr_db": row.sqnr_db}
    state.images.append({"model": case.name, "classes": len(classes), "seeds": list(IMAGE_SEEDS),
                         "steps": IMAGE_STEPS, "methods": methods})


def run_section(name: str, fn: Callable, case: ModelCase, state: BenchState) -> None:
    start = time.perf_counter()
    try:
        fn(case, state)
    except Exception as exc:  # noqa: BLE001 - a section failing is reported, the rest still runs
        log.exception("%s: %s failed", case.name, name)
        state.notes.append(SkipNote(f"{case.name} / {name}", f"FAILED: {type(exc).__name__}: {first_line(str(exc))}"))
    state.section_seconds[name] = state.section_seconds.get(name, 0.0) + time.perf_counter() - start


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def fmt(value, spec: str, missing: str = "-") -> str:
    if value is None:
        return missing
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def short(text: str, limit: int = 110) -> str:
    text = text.replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def trt_cell(row: ResultRow) -> str:
    """Status, plus the gist of the cause: "X: Error Code 4: API Usage Error (msg. In f at src)" -> msg."""
    if row.trt_error is None:
        return row.trt
    text = row.trt_cause or row.trt_error
    match = re.search(r"Error Code \d+: [^(]*\((.*?)(?: In \w+ at [^)]*)?\)\s*$", text)
    return f"{row.trt}: {short(match.group(1) if match else text, 160)}"


def flops_cell(r: ResultRow) -> str:
    """INT8 share of the linear FLOPs per segquant-onnx's report (which counts sites kept in float by
    the target fallback, not the outlier channels' float branches: those are given beside it)."""
    if r.int8_flop_fraction is None:
        return "-"
    text = f"{100 * r.int8_flop_fraction:.2f}"
    extras = []
    if r.fallback_sites:
        extras.append(f"{r.fallback_sites} sites float")
    if r.outlier_float_flop_pct:
        extras.append(f"outlier channels {r.outlier_float_flop_pct:.3f}% float")
    return text + (f" ({'; '.join(extras)})" if extras else "")


def dualscale_cell(r: ResultRow) -> str:
    if r.dualscale_extra_flop_pct is None:
        return "-"
    if not r.dualscale_applied:
        return "0"
    return f"{r.dualscale_extra_flop_pct:.1f} ({r.dualscale_applied}/{r.dualscale_candidates} sites)"


def results_table(rows: list[ResultRow]) -> str:
    head = ("| model | method | SQNR dB | INT8 FLOPs % | DualScale extra FLOPs % | time s (runs) | peak RSS MiB "
            "| size KiB | Q/DQ nodes | quantized weights | check-trt violations | TensorRT-RTX | tool's own SQNR |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        weights = "-" if r.weighted_linear is None else f"{r.weights_quantized}/{r.weighted_linear}"
        if r.error is not None and r.size_bytes is None:
            sqnr = f"FAILED: {r.error}"
        elif r.error is not None:
            sqnr = f"n/a ({r.error})"
        elif r.family == "fp32":
            sqnr = "ref"
        else:
            sqnr = fmt(r.sqnr_db, ".2f")
        seconds = "-" if r.seconds is None else f"{r.seconds:.2f} ({r.runs})"
        lines.append(
            f"| {r.model} | {r.method} | {sqnr} | {flops_cell(r)} | {dualscale_cell(r)} | {seconds} "
            f"| {fmt(r.peak_rss_mib, '.0f')} | {fmt(None if r.size_bytes is None else r.size_bytes / 1024, '.0f')} "
            f"| {fmt(r.qdq_nodes, 'd')} | {weights} | {fmt(r.trt_violations, 'd')} | {trt_cell(r)} "
            f"| {fmt(r.self_reported_sqnr, '.2f')} |")
    return "\n".join(lines)


def methods_table() -> str:
    from segquant_onnx import QuantConfig

    default = QuantConfig()
    lines = ["| method | QuantConfig | runs |", "|---|---|---|"]
    for m in OURS_MATRIX:
        fields = ", ".join(f"{k}={v!r}" for k, v in m.fields.items()) if m.fields else ""
        lines.append(f"| {m.label} | `QuantConfig({fields})` | {'--repeat' if m.timed else '1'} |")
    lines.append("")
    lines.append(f"QuantConfig() as shipped: calib_method={default.calib_method!r}, seg_output={default.seg_output}, "
                 f"seg_input={default.seg_input}, dualscale={default.dualscale!r} (min gain "
                 f"{default.dualscale_min_gain_db} dB), smoothquant={default.smoothquant!r}, "
                 f"outlier_channels={default.outlier_channels!r}, target_sqnr={default.target_sqnr}.")
    return "\n".join(lines)


def ok(row: ResultRow | None) -> bool:
    return row is not None and row.error is None and row.sqnr_db is not None


def summary_table(rows: list[ResultRow]) -> str:
    """Per model: the best peer, ours naive / default, our best row keeping >= 95% of the FLOPs in INT8."""
    head = ("| model | best peer | best peer TensorRT-RTX builds | naive INT8 | default | best segquant-onnx row "
            "(>= 95% INT8 FLOPs) | margin over best peer | over best buildable peer |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for model in dict.fromkeys(r.model for r in rows):
        mine = [r for r in rows if r.model == model]
        peers = [r for r in mine if r.family in ("ort", "modelopt") and ok(r)]
        buildable = [r for r in peers if r.trt == "built"]
        # a 5% fallback budget can land on 95% exactly: compare with a rounding margin
        ours = [r for r in mine if r.family == "ours" and ok(r)
                and (r.int8_flop_fraction or 0) * 100 - (r.outlier_float_flop_pct or 0) >= 95.0 - 1e-6]
        best_peer = max(peers, key=lambda r: r.sqnr_db, default=None)
        best_built = max(buildable, key=lambda r: r.sqnr_db, default=None)
        best_ours = max(ours, key=lambda r: r.sqnr_db, default=None)

        def cell(r):
            return "-" if r is None else f"{r.sqnr_db:.2f} ({r.method})"

        def plain(r):
            return "-" if not ok(r) else f"{r.sqnr_db:.2f}"

        def margin(peer):
            return "-" if best_ours is None or peer is None else f"{best_ours.sqnr_db - peer.sqnr_db:+.2f}"

        naive = next((r for r in mine if r.method == "naive INT8"), None)
        default = next((r for r in mine if r.method == "default"), None)
        lines.append(f"| {model} | {cell(best_peer)} | {cell(best_built)} | {plain(naive)} | {plain(default)} "
                     f"| {cell(best_ours)} | {margin(best_peer)} | {margin(best_built)} |")
    return "\n".join(lines)


def ratio_table(rows: list[ResultRow]) -> str:
    """Ours (naive INT8, default) time and peak RSS divided by each peer's, per model (< 1: ours is cheaper)."""
    head = ("| model | peer | naive INT8 time / peer | naive INT8 RSS / peer | default time / peer "
            "| default RSS / peer |")
    lines = [head, "|---|---|---|---|---|---|"]

    def ratio(a, b):
        return fmt(a / b if a and b else None, ".2f")

    for model in dict.fromkeys(r.model for r in rows):
        ours = {m: next((r for r in rows if r.model == model and r.method == m and r.error is None), None)
                for m in ("naive INT8", "default")}
        if not any(ours.values()):
            continue
        for peer in (r for r in rows if r.model == model and r.family in ("ort", "modelopt")):
            if peer.error is not None and peer.size_bytes is None:
                lines.append(f"| {model} | {peer.method} | (peer failed) | | | |")
                continue
            cells = []
            for m in ("naive INT8", "default"):
                o = ours[m]
                cells += [ratio(o and o.seconds, peer.seconds), ratio(o and o.peak_rss_mib, peer.peak_rss_mib)]
            lines.append(f"| {model} | {peer.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_layer_tables(entries: list[dict]) -> str:
    if not entries:
        return f"(not run: none of the models {', '.join(PER_LAYER_MODELS)} was selected)"
    lines = ["| model | method | layers | min dB | median dB | mean dB | output SQNR dB |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        for method, st in e["stats"].items():
            inf = f" (+{st['infinite']} exact)" if st["infinite"] else ""
            lines.append(f"| {e['model']} | {method} | {st['layers']}{inf} | {st['min']:.2f} | {st['median']:.2f} "
                         f"| {st['mean']:.2f} | {fmt(st['output_sqnr'], '.2f')} |")
    lines += ["", "The SegLinear sites (every linear +SegLinear split), layer output SQNR:", "",
              "| model | layer | module | segments | naive INT8 dB | +SegLinear dB | change dB |",
              "|---|---|---|---|---|---|---|"]
    for e in entries:
        for site in e["sites"]:
            a, b = site["naive"], site["seglinear"]
            delta = fmt(b - a if a is not None and b is not None else None, "+.2f")
            module = site["module"] or "-"
            segs = f"{site['kind']} {'+'.join(str(x) for x in site['sizes'])} ({site['via']})"
            lines.append(f"| {e['model']} | `{site['layer']}` | {module} | {segs} | {fmt(a, '.2f')} "
                         f"| {fmt(b, '.2f')} | {delta} |")
    return "\n".join(lines)


def latency_table(entries: list[dict]) -> str:
    if not entries:
        return "(not run: neither demo nor flux-dynamo was selected)"
    lines = ["| model | method | median ms | IQR ms | / naive INT8 | / FP32 | DualScale extra FLOPs % "
             "| outlier float FLOPs % | INT8 FLOPs % |", "|---|---|---|---|---|---|---|---|---|"]
    for e in entries:
        med = e["median_ms"]
        base, fp = med.get("naive INT8"), med.get("FP32 reference")
        for method, ms in med.items():
            lo, hi = e["iqr_ms"][method]
            lines.append(f"| {e['model']} | {method} | {ms:.3f} | {lo:.3f}-{hi:.3f} | {fmt(ms / base if base else None, '.2f')} "
                         f"| {fmt(ms / fp if fp else None, '.2f')} | {fmt(e['dualscale_extra_flop_pct'].get(method), '.1f')} "
                         f"| {fmt(e.get('outlier_float_flop_pct', {}).get(method), '.3f')} "
                         f"| {fmt(e.get('int8_flop_pct', {}).get(method), '.1f')} |")
    return "\n".join(lines)


def image_table(entries: list[dict]) -> str:
    if not entries:
        return "(not run: demo was not selected)"
    lines = []
    for e in entries:
        lines += [f"{e['model']}: {e['classes']} classes x seeds {', '.join(map(str, e['seeds']))}, {e['steps']} Euler "
                  "steps, images vs the FP32 images from the same noise:", "",
                  "| method | PSNR dB mean (min) | SSIM mean (min) | mean per-step transformer SQNR dB "
                  "| output SQNR dB (eval feeds) |", "|---|---|---|---|---|"]
        for method, m in e["methods"].items():
            lines.append(f"| {method} | {m['psnr_db']:.2f} ({m['psnr_db_min']:.2f}) | {m['ssim']:.5f} "
                         f"({m['ssim_min']:.5f}) | {m['mean_step_sqnr_db']:.2f} | {fmt(m['output_sqnr_db'], '.2f')} |")
    return "\n".join(lines)


def machine_info() -> list[str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return [f"{os.cpu_count()} logical CPUs (nproc {len(os.sched_getaffinity(0))})", f"CPU: {cpu}",
            f"RAM: {ram}", f"OS: {platform.platform()}"]


def versions(modelopt_python: Path | None) -> list[str]:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    ort_dist = "onnxruntime-gpu" if dist("onnxruntime-gpu") != "not installed" else "onnxruntime"
    out = [f"Python {platform.python_version()}"]
    out += [f"{n} {dist(n)}" for n in ("segquant-onnx", "numpy", "onnx", ort_dist, "torch", "diffusers",
                                      "tensorrt_rtx_cu12_bindings")]
    main_env = "benchmark env: " + ", ".join(out)
    lines = [main_env]
    if modelopt_python is not None:
        code = ("import importlib.metadata as m\n"
                "for n in ('nvidia-modelopt','onnx','onnxruntime-gpu','onnxruntime','torch','numpy'):\n"
                "    try: print(n, m.version(n))\n"
                "    except m.PackageNotFoundError: pass\n")
        proc = subprocess.run([str(modelopt_python), "-c", code], capture_output=True, text=True)
        lines.append("ModelOpt venv: " + ", ".join(proc.stdout.split("\n")[:-1]))
    return lines


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def feature_table(rows: list[ResultRow]) -> str:
    """Output SQNR change of each segquant-onnx row against its baseline (naive INT8 for the rows before
    `default` and for `default` itself; `default` for the rows after it)."""
    labels = [m.label for m in OURS_MATRIX if m.label != "naive INT8"]
    after_default = {m.label for m in OURS_MATRIX[[x.label for x in OURS_MATRIX].index("default") + 1:]}
    head = "| model | " + " | ".join(
        f"{label} vs {'default' if label in after_default else 'naive'}" for label in labels) + " |"
    lines = [head, "|" + "---|" * (len(labels) + 1)]
    for model in dict.fromkeys(r.model for r in rows):
        by = {r.method: r for r in rows if r.model == model and r.family == "ours"}
        if not by:
            continue
        cells = []
        for label in labels:
            base = by.get("default" if label in after_default else "naive INT8")
            row = by.get(label)
            cells.append(f"{row.sqnr_db - base.sqnr_db:+.2f}" if ok(row) and ok(base) else "-")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(state: BenchState, cases: list[ModelCase], command: str, started: datetime.datetime,
                    total_s: float, modelopt_python: Path | None, loads: tuple[str, str], repeat: int,
                    source_info: tuple[str, str], results_json: Path,
                    digests: tuple[dict, dict] = ({}, {})) -> str:
    parts = [
        "# Benchmarks: segquant-onnx vs. ONNX Runtime and NVIDIA ModelOpt (INT8 PTQ)",
        "",
        "Written by `scripts/bench.py`; every number below is one that run printed (full numbers: "
        f"`{results_json.relative_to(REPO_ROOT) if results_json.is_relative_to(REPO_ROOT) else results_json}`)."
        " Every quantizer calibrates on a model's calibration set and is evaluated on its held-out eval set"
        f" (tiny models: `make_calibration(kind, {CALIB_SAMPLES}, seed={CALIB_SEED})` /"
        f" `(kind, {EVAL_SAMPLES}, seed={EVAL_SEED})`; the bundled example and demo: their shipped npz).",
        "",
        "- **SQNR dB**: output SQNR vs. the FP32 model on the eval set, computed by the benchmark (ONNX Runtime"
        " CPU, default session options, one batch-1 sample at a time, 10 log10(sum ref^2 / sum (ref - q)^2)"
        " over all samples). Same code for every method.",
        "- **INT8 FLOPs %**, **DualScale extra FLOPs %**: segquant-onnx's report (`summary.int8_flop_fraction`,"
        " `summary.dualscale_extra_flop_pct` with applied / candidate sites; `outliers.float_flop_pct` where the"
        " outlier-channel pass kept channels in float: `int8_flop_fraction` does not subtract those).",
        f"- **time s (runs) / peak RSS MiB**: fastest wall time of that many run(s) (naive INT8, default and the"
        f" peers: --repeat = {repeat}; the other feature rows and ORT Entropy: 1) and largest `ru_maxrss`"
        " (via `os.wait4`) of the quantizer's own process, interpreter start-up and imports included (each is"
        " started by a minimal `python -S` launcher that forks it and reads its rusage, since on Linux a child"
        " started straight from the benchmark process would inherit the benchmark's own peak RSS)."
        " segquant-onnx runs `segquant_onnx.quantize(model, calib, QuantConfig(...), ...)` in a worker process:"
        " the timed rows (naive INT8, default) with `evaluate=False` (`--no-eval`: like the peers, no"
        " output-error measurement), the other rows with `eval_data=eval` (their time includes that"
        " measurement, and they fill the **tool's own SQNR** column).",
        "- **size KiB**: output .onnx (plus external data, if any). **Q/DQ nodes**: QuantizeLinear +"
        " DequantizeLinear. **quantized weights**: MatMul/Gemm/Conv nodes reading a constant weight through"
        " a DequantizeLinear / all MatMul/Gemm/Conv nodes with a constant weight, both counted in that"
        " method's output graph (segquant-onnx splits some linears into per-segment linears, so its"
        " count can exceed the FP32 graph's).",
        "- **check-trt violations**: `segquant_onnx.tensorrt.check.check_tensorrt` on the output model (TensorRT's"
        " explicit-quantization rules, checked statically; per-rule counts in the notes).",
        "- **TensorRT-RTX**: `segquant_onnx.tensorrt.build.build_engine` (parse + strongly typed engine"
        " build, no GPU needed); first error line when it fails.",
        "- **tool's own SQNR**: what segquant-onnx's report says on the same eval set (a cross-check).",
        "- Peers: ORT `quantize_static(quant_format=QDQ, per_channel=True, activation_type=QInt8,"
        " weight_type=QInt8, extra_options={ActivationSymmetric, WeightSymmetric: True})` with a"
        " CalibrationDataReader yielding one batch-1 sample at a time, calibrate_method MinMax (Entropy is"
        " run too and shown only where its scales differ from MinMax's), quantizing every op type ORT supports"
        " (its default), plus one extra MinMax run with `op_types_to_quantize=[MatMul, Gemm, Conv]` (the scope"
        " closest to segquant-onnx's); ModelOpt `python -m modelopt.onnx.quantization --quantize_mode int8"
        " --calibration_eps cpu --high_precision_dtype fp32` (fp32 so that the comparison is W8A8 against"
        " W8A8: ModelOpt's default converts the rest of an FP32 model to FP16), from its own virtualenv, on a"
        " copy of the input model (it rewrites its input file in place with shape inference).",
        "",
        f"Date: {started.strftime('%Y-%m-%d %H:%M:%S %Z').strip()} (whole run: {total_s:.0f} s)",
        "",
        "Machine: " + "; ".join(machine_info()),
        "",
        f"Load average (1/5/15 min) at start: {loads[0]}; at end: {loads[1]}. Wall times come from a shared"
        " machine: other processes' load shows up in them.",
        "",
        "Versions:",
        "",
    ]
    parts += [f"- {v}" for v in versions(modelopt_python)]
    parts.append(f"- segquant-onnx source: git {source_info[0]}, source fingerprint `{source_info[1]}` at start,"
                 f" `{source_fingerprint()}` at end")
    parts += ["", "Re-run:", "", "```", command, "```", "", "Models:", ""]
    parts += [f"- `{c.name}`: {c.description} (`{c.onnx_path.relative_to(REPO_ROOT) if c.onnx_path.is_relative_to(REPO_ROOT) else c.onnx_path}`,"
              f" sha256 {digests[0].get(c.name + ':onnx', '?')}; calib {digests[0].get(c.name + ':calib', '?')},"
              f" eval {digests[0].get(c.name + ':eval', '?')})"
              for c in cases]
    parts += ["", "segquant-onnx methods (rows before `default`: naive INT8 plus that one feature; rows after it:"
              " the default plus that one):", "", methods_table()]
    parts += ["", "## Results", "", results_table(state.rows), "",
              "## Output SQNR change per feature (dB, same run)", "",
              "Each segquant-onnx row minus its baseline: naive INT8 for the rows before `default` and for"
              " `default` itself, `default` for the rows after it.", "", feature_table(state.rows), "",
              "## Against the peers", "",
              "Best peer output SQNR (any, and among those TensorRT-RTX builds) vs. our best row that keeps at"
              " least 95% of the linear FLOPs in INT8.", "", summary_table(state.rows), "",
              "## Cost of segquant-onnx relative to each peer, same run", "",
              "Quantize wall time and peak RSS ratios; below 1 means segquant-onnx used less.", "",
              ratio_table(state.rows), "",
              "## Per-layer SQNR, naive INT8 vs +SegLinear", "",
              "`segquant_onnx.analysis.compare.compare_models(fp, quantized, eval, per_layer=True)` (= `layer_error."
              "per_layer_error` on the canonical float graph, as `quantize --per-layer`): every linear layer's"
              " output SQNR over the eval set, errors accumulating along the graph as at inference; a split"
              " layer is measured on its chunk outputs.", "",
              per_layer_tables(state.per_layer), "",
              "## ONNX Runtime CPU latency", "",
              f"One process, CPUExecutionProvider, 1 intra-op thread, batch-1 feed (first eval sample);"
              f" {LATENCY_WARMUP} warm-up runs per model, then {LATENCY_RUNS} rounds that run each model once"
              " in turn; median and inter-quartile range of the single-run wall times. Ratios < 1: faster."
              " ONNX Runtime's CPU kernels, not TensorRT's: Q/DQ pairs it cannot fuse into integer kernels"
              " run as float ops.", "",
              latency_table(state.latency), "",
              "## Demo DiT images", "",
              "`segquant-onnx demo`'s sampler and metrics (`segquant_onnx.diffusion.demo.sample_all`, `image_metrics."
              "psnr` / `ssim`), on the models of the rows above: rectified-flow Euler through ONNX Runtime from"
              " the same noise as FP32; PSNR/SSIM of each image vs its FP32 image; per-step SQNR: transformer"
              " output on the FP32 trajectory's inputs.", "",
              image_table(state.images), ""]
    parts += ["## Notes", ""]
    parts += [f"- {n.what}: {n.why}" for n in state.notes]
    changed = [k for k, v in digests[0].items() if digests[1].get(k) != v]
    if changed:
        parts.append("- model or data files changed while this benchmark ran (sha256 at start -> end): " + ", ".join(
            f"{k} {digests[0][k]} -> {digests[1].get(k)}" for k in changed))
    sources = list(dict.fromkeys(r.source for r in state.rows if r.source))
    if len(sources) > 1:
        parts.append(f"- segquant-onnx's source changed while this benchmark ran ({len(sources)} versions); "
                     "rows by source fingerprint:")
        for src in sources:
            which = ", ".join(f"{r.model}/{r.method}" for r in state.rows if r.source == src)
            parts.append(f"  - `{src}`: {which}")
    for r in state.rows:
        if r.float_weight_q:
            parts.append(f"- {r.model} / {r.method}: {r.float_weight_q} QuantizeLinear nodes read a float "
                         "initializer: those weights are stored in float and quantized at run time (hence the "
                         "file size).")
    failed = [r for r in state.rows if r.error is not None]
    parts += [f"- {r.model} / {r.method}: {r.error}" for r in failed]
    if state.section_seconds:
        parts.append("- time spent in the extra sections: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in state.section_seconds.items()))
    flagged = [r for r in state.rows if r.trt_rules]
    if flagged:
        parts += ["", "check-trt violations by rule:", ""]
        for r in flagged:
            parts.append(f"- {r.model} / {r.method}: " + ", ".join(f"{k} {v}" for k, v in r.trt_rules.items()))
    trt_failed = [r for r in state.rows if r.trt not in ("built", "-")]
    if trt_failed:
        parts += ["", "TensorRT-RTX failures in full (first error line; the cause TensorRT logged):", ""]
        for r in trt_failed:
            detail = "; ".join(x for x in (r.trt_error, r.trt_cause) if x)
            parts.append(f"- {r.model} / {r.method}: {r.trt}" + (f": {detail}" if detail else ""))
    return "\n".join(parts) + "\n"


def results_json_data(state: BenchState, cases: list[ModelCase], total_s: float) -> dict:
    rows = []
    for r in state.rows:
        d = {k: v for k, v in r.__dict__.items() if k != "report"}
        d["output"] = str(r.output) if r.output else None
        rows.append(d)
    return {"models": [{"name": c.name, "onnx": str(c.onnx_path), "description": c.description} for c in cases],
            "methods": {m.label: m.fields for m in OURS_MATRIX}, "rows": rows, "per_layer": state.per_layer,
            "latency": state.latency, "images": state.images, "notes": [n.__dict__ for n in state.notes],
            "seconds": total_s}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench_out",
                        help="exported models, quantized outputs, logs, the ModelOpt venv (default: bench_out/)")
    parser.add_argument("--quick", action="store_true",
                        help="only the bundled example, segquant-onnx and ONNX Runtime, one run each "
                             "(unless --repeat is given)")
    parser.add_argument("--skip-modelopt", action="store_true", help="do not install or run NVIDIA ModelOpt")
    parser.add_argument("--skip-ort-entropy", action="store_true", help="ONNX Runtime with MinMax only")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of {','.join(ALL_MODELS)} (default: all); also accepted: "
                             f"{','.join(OPTIONAL_MODELS)} (the same model as example)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="runs of naive INT8, default and each peer; the table shows the fastest wall time "
                             "(default 3; 1 with --quick). The other rows run once.")
    parser.add_argument("--timeout", type=float, default=1200.0,
                        help="seconds allowed per quantizer run / TensorRT check (default 1200)")
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MARKDOWN,
                        help="where to write the report (default: BENCHMARKS.md at the repo root)")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.quick:
        args.skip_modelopt = True
        models = ["example"]
    elif args.models:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
    else:
        models = list(ALL_MODELS)
    unknown = [m for m in models if m not in ALL_MODELS + OPTIONAL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(ALL_MODELS + OPTIONAL_MODELS)}")
    args.model_list = list(dict.fromkeys(models))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_ort-worker":
        return ort_worker(*argv[1:6])
    if argv and argv[0] == "_ours-worker":
        return ours_worker(*argv[1:7])
    if argv and argv[0] == "_trt-worker":
        return trt_worker(argv[1])

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("export_example", "segquant_onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = datetime.datetime.now().astimezone()
    load_at_start = load_average()
    source_info = (git_description(), source_fingerprint())
    t0 = time.perf_counter()
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    state = BenchState()

    modelopt_python = None
    if args.skip_modelopt:
        state.notes.append(SkipNote("NVIDIA ModelOpt", "not run (--quick or --skip-modelopt)"))
    else:
        modelopt_python = ensure_modelopt_venv(work_dir, state)
    if args.skip_ort_entropy:
        state.notes.append(SkipNote("ORT Entropy", "not run (--skip-ort-entropy)"))

    if "sd3-ts" not in args.model_list:
        state.notes.append(SkipNote(
            "sd3-ts", "not run by default: it is the same model as `example` (export_example.py's tiny SD3 "
            "transformer, seed 0, TorchScript exporter: identical weights and graph, and the same calib/eval "
            "data), so its rows repeated example's to the last digit; `--models sd3-ts` still runs it."))

    cases = prepare_models(args.model_list, work_dir)
    digests_at_start = case_digests(cases)
    plan = method_plan(args, modelopt_python)
    for case in cases:
        bench_model(case, plan, work_dir, args, state)
        if case.name in PER_LAYER_MODELS:
            run_section("per-layer SQNR", per_layer_section, case, state)
        if case.name in LATENCY_MODELS:
            run_section("latency", latency_section, case, state)
        if case.name == "demo":
            run_section("demo images", image_section, case, state)

    total_s = time.perf_counter() - t0
    command = shlex.join(["python", "scripts/bench.py", *argv])
    results_json = work_dir / "bench_results.json"
    markdown = render_markdown(state, cases, command, started, total_s, modelopt_python,
                               (load_at_start, load_average()), args.repeat, source_info, results_json,
                               (digests_at_start, case_digests(cases)))
    print(markdown)  # the whole report, so that the file holds nothing the run did not print
    args.markdown.write_text(markdown)
    results_json.write_text(json.dumps(results_json_data(state, cases, total_s), indent=1, default=str))
    log.info("wrote %s and %s (whole run %.0f s)", args.markdown, results_json, total_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
