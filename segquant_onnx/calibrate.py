"""Calibrate: run the floating-point graph in ONNX Runtime and reduce observed tensors per batch.

The calibrator never edits the caller's graph: it exports a copy with the observed tensors added
as graph outputs.
"""

from __future__ import annotations

import logging

import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from segquant_onnx.calib_data import CalibrationData
from segquant_onnx.errors import UserError
from segquant_onnx.graph_io import export_model
from segquant_onnx.observers import Stats, TensorStats
from segquant_onnx.runtime import make_session

log = logging.getLogger(__name__)


def with_outputs(graph: gs.Graph, names: tuple[str, ...]) -> onnx.ModelProto:
    """The graph as a ModelProto that also outputs `names` (graph inputs are read from the feeds)."""
    model = export_model(graph)
    tensors = graph.tensors()
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in names:
        if name not in present:
            elem = onnx.helper.np_dtype_to_tensor_dtype(tensors[name].dtype)
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model


def calibrate(graph: gs.Graph, observed: tuple[str, ...], data: CalibrationData, *,
              source_dir: str | None, providers, tmp_dir: str | None = None,
              progress: bool = True) -> Stats:
    """Statistics of each tensor in `observed` over every feed of `data`."""
    session = make_session(with_outputs(graph, observed), source_dir, providers, tmp_dir)
    output_names = [o.name for o in session.get_outputs()]
    fetch = [n for n in observed if n in output_names]
    stats: Stats = {name: TensorStats.empty() for name in observed}
    batches = 0
    for feed in tqdm(data, total=data.num_feeds, desc="calibrating", unit="batch", disable=not progress):
        values = dict(zip(fetch, session.run(fetch, feed)))
        for name in observed:
            stats[name].update(values[name] if name in values else feed[name])
        batches += 1
    if batches == 0:
        raise UserError(f"Calibration data {data.description} yielded zero feeds; give at least one.")
    log.info("calibrated %d tensors on %d batches", len(observed), batches)
    return stats
