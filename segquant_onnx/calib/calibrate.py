"""Calibrate: run the floating-point graph in ONNX Runtime and reduce observed tensors per batch.

The calibrator never edits the caller's graph: it exports a copy with the observed tensors added
as graph outputs.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from tqdm import tqdm

from segquant_onnx.calib.data import CalibrationData
from segquant_onnx.errors import UserError
from segquant_onnx.ir.graph_io import export_model
from segquant_onnx.calib.observers import RowSample, Stats, TensorStats
from segquant_onnx.ir.runtime import make_session

log = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What calibration gathered (see `calibrate`): statistics over every feed (for the final scales),
    row samples and feeds held back, and `fit_stats` over the other feeds, the statistics that
    searches fit candidate scales to before scoring them on the held-back data. `feed_shapes`: the input
    shapes of the first feed, which the quantized model records for TensorRT's optimization profile."""

    stats: Stats
    samples: dict[str, np.ndarray]
    held_back: list[dict[str, np.ndarray]]
    fit_stats: Stats
    feed_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def with_tensor_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """A copy of `model` that also outputs `names` (graph inputs are read from the feeds; a name with
    no known type is left out)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.output)}
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in names:
        if name not in present and name in types:
            out.graph.output.append(onnx.helper.make_value_info(name, types[name]))
    return out


def with_outputs(graph: gs.Graph, names: tuple[str, ...]) -> onnx.ModelProto:
    """The graph as a ModelProto that also outputs `names` (graph inputs are read from the feeds)."""
    model = export_model(graph)
    tensors = graph.tensors()
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in names:
        if name not in present:
            dtype = tensors[name].dtype  # a numpy type, or the ONNX type number of one numpy lacks (bfloat16)
            elem = dtype if isinstance(dtype, int) else onnx.helper.np_dtype_to_tensor_dtype(dtype)
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, elem, None))
    return model


def observe_ranges(model: onnx.ModelProto, names: tuple[str, ...], feeds, *, source_dir: str | None, providers,
                   tmp_dir: str | None = None) -> dict[str, float]:
    """Abs-max of each float tensor in `names` of `model` over `feeds` (what --high-precision fp16 checks
    against float16's range, on the quantized graph: tensors the rewrite made are observed too)."""
    session = make_session(with_tensor_outputs(model, names), source_dir, providers, tmp_dir)
    available = {o.name for o in session.get_outputs()}
    fetch = [n for n in names if n in available]
    ranges: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(fetch, session.run(fetch, feed)):
            if value.size and np.issubdtype(value.dtype, np.floating):
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(value).max()))
        for name in names:
            if name in feed:
                ranges[name] = max(ranges.get(name, 0.0), float(np.abs(feed[name]).max(initial=0)))
    return ranges


RANGE_FEEDS = 16  # calibration feeds the range pass reads (the first ones)


def rest_feeds(data: CalibrationData, cal: Calibration) -> list[dict[str, np.ndarray]]:
    """The feeds observe_ranges reads: the first RANGE_FEEDS calibration feeds where the data can be read
    again, else the held-back feeds calibration kept (a one-pass iterable of feeds)."""
    if data.num_feeds is None:
        return list(cal.held_back)
    return list(itertools.islice(iter(data), RANGE_FEEDS))


def calibrate(graph: gs.Graph, observed: tuple[str, ...], data: CalibrationData, *,
              source_dir: str | None, providers, tmp_dir: str | None = None, progress: bool = True,
              sampled: tuple[str, ...] = (), sample_rows: int = 1024,
              holdout_every: int = 0, keep_held_back: int = 0,
              channel_axes: dict[str, int] | None = None) -> Calibration:
    """Statistics of each tensor in `observed`, and a bounded sample of rows (last-axis vectors) of
    each tensor in `sampled` (a subset of `observed`). Per-channel maxima run over the last axis, or
    over `channel_axes[name]` (1 for a tensor only Convs read).

    With `holdout_every=k`, every k-th feed is held back: `fit_stats` come from the other feeds and
    the row sample only from the held-back ones, so searches scored on the sample see data their
    candidate scales were not fitted to (clipping of unseen values shows up); `stats` still cover
    every feed, for the final scales. Up to
    `keep_held_back` held-back feeds are kept for model-output searches (sensitivity, fallback)."""
    session = make_session(with_outputs(graph, observed), source_dir, providers, tmp_dir)
    output_names = [o.name for o in session.get_outputs()]
    fetch = [n for n in observed if n in output_names]
    axes = channel_axes or {}
    stats: Stats = {name: TensorStats.empty(channel_axis=axes.get(name, -1)) for name in observed}
    held_stats: Stats = {name: TensorStats.empty(channel_axis=axes.get(name, -1)) for name in observed}
    samples = {name: RowSample(sample_rows) for name in sampled}
    held: list[dict[str, np.ndarray]] = []
    held_seen, rng = 0, np.random.default_rng(0)
    batches, feed_shapes = 0, {}
    # no bar off a terminal (disable=None); on one, the bar is cleared when bad data raises mid-way
    with tqdm(data, total=data.num_feeds, desc="calibrating", unit="batch", disable=None if progress else True,
              leave=False) as bar:
        for i, feed in enumerate(bar):
            if i == 0:
                feed_shapes = {name: tuple(int(d) for d in value.shape) for name, value in feed.items()}
            held_back = holdout_every > 0 and i % holdout_every == holdout_every - 1
            if held_back and keep_held_back:
                # reservoir sampling: the kept feeds span the whole data set (captured trajectories are
                # often ordered by timestep; the first k would all be early steps)
                if len(held) < keep_held_back:
                    held.append(feed)
                else:
                    slot = int(rng.integers(0, held_seen + 1))
                    if slot < keep_held_back:
                        held[slot] = feed
                held_seen += 1
            values = dict(zip(fetch, session.run(fetch, feed)))
            for name in observed:
                value = values[name] if name in values else feed[name]
                (held_stats if held_back else stats)[name].update(value)
                if name in samples and (held_back or holdout_every == 0):
                    samples[name].update(value)
            batches += 1
    if batches == 0:
        raise UserError(f"Calibration data {data.description} yielded zero feeds; give at least one.")
    log.info("calibrated %d tensors on %d batches", len(observed), batches)
    rows = {name: s.rows for name, s in samples.items() if s.rows is not None}
    if holdout_every == 0:
        return Calibration(stats, rows, held, stats, feed_shapes)
    everything = {name: copy.deepcopy(st).merge(held_stats[name]) for name, st in stats.items()}
    return Calibration(everything, rows, held, stats, feed_shapes)
