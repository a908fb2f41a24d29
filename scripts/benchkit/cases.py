"""The models the benchmark quantizes, each with its calibration and held-out eval data.

`example` and `demo` are the bundled files as shipped; `demo-dynamo` is the saved demo checkpoint
re-exported with the dynamo exporter (scripts/train_demo_dit.py's export, same calib/eval data); the
tiny SD3 / FLUX / PixArt transformers are exported by scripts/export_example.py into
`<work-dir>/models` with fresh calib/eval sets from its `make_calibration`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("bench")

REPO_ROOT = Path(__file__).resolve().parents[2]
DATA_DIR = REPO_ROOT / "segquant_onnx" / "data"
EXPORT_SCRIPT = REPO_ROOT / "scripts" / "export_example.py"
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train_demo_dit.py"

CALIB_SAMPLES, CALIB_SEED = 16, 1
EVAL_SAMPLES, EVAL_SEED = 8, 2

ALL_MODELS = ("example", "demo", "demo-dynamo", "sd3-dynamo", "flux-ts", "flux-dynamo", "pixart-dynamo")
# accepted by --models, not run by default: sd3-ts is the bundled example (same weights, same graph, same data)
OPTIONAL_MODELS = ("sd3-ts", "pixart-ts")


@dataclass
class ModelCase:
    """One model to quantize, with its calibration and held-out eval data."""

    name: str
    onnx_path: Path
    calib_path: Path
    eval_path: Path
    description: str


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
    """One feed dict per sample (batch 1): axis 0 of every array indexes the samples.

    The benchmark's own reader, not segquant_onnx's: measure.py says why."""
    with np.load(npz_path) as data:
        arrays = {k: data[k] for k in data.files}
    count = len(next(iter(arrays.values())))
    for i in range(count):
        yield {k: v[i:i + 1] for k, v in arrays.items()}
