"""The bundled example: the trained demo DiT (scripts/train_demo_dit.py) and its calibration/eval inputs."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

EXAMPLE_MODEL = "demo_dit.onnx"
EXAMPLE_CALIB = "demo_dit_calib.npz"
EXAMPLE_EVAL = "demo_dit_eval.npz"


def example_path(name: str) -> Path:
    """A file of the bundled data folder (`segquant_onnx/data`)."""
    return Path(str(resources.files("segquant_onnx") / "data" / name))
