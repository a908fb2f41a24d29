"""Polygraphy data loader: feed dicts from a segquant-onnx calibration/eval `.npz` (or a directory of them).

    SEGQUANT_DATA=eval.npz SEGQUANT_MODEL=model.onnx \
        polygraphy run OUT.onnx --onnxrt --data-loader-script scripts/polygraphy_data_loader.py

SEGQUANT_DATA: the data (default: the bundled example's eval set). SEGQUANT_MODEL: the model whose
inputs decide how the arrays are cut into feeds (the float or the quantized model: their inputs are the
same; default: the bundled example). SEGQUANT_BATCH: the batch for a model with a dynamic batch
(default 8). The layout is the one `quantize --calib` reads: one array per input, axis 0 = samples.
"""

from __future__ import annotations

import os

from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.examples import EXAMPLE_EVAL, EXAMPLE_MODEL, example_path
from segquant_onnx.ir.graph_io import load_model


def load_data():
    data = os.environ.get("SEGQUANT_DATA") or example_path(EXAMPLE_EVAL)
    model = os.environ.get("SEGQUANT_MODEL") or example_path(EXAMPLE_MODEL)
    batch = os.environ.get("SEGQUANT_BATCH")
    inputs = model_inputs(load_model(model).graph)
    yield from open_calibration(data, inputs, int(batch) if batch else None, role="polygraphy")
