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
from segquant_onnx.ir.naming import Namer
from segquant_onnx.calib.observers import RowSample, Stats, TensorStats
from segquant_onnx.ir.runtime import float32_shadow, has_bfloat16, make_session, session_source
from segquant_onnx.ir.weights import WeightStore
from segquant_onnx.plan import sample_source

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
    batches: int = 0  # batches run, the held-back ones included: one calibration pass costs that many model runs
    # the model's outputs on each held-back feed, as this pass computed them (the searches' float reference: no
    # session and no run of its own); None where calibrate kept no held-back feeds
    held_back_outputs: list[list[np.ndarray]] | None = None
    # row samples over every feed for the weights' own fits (calibrate's `weight_rows`)
    weight_samples: dict[str, np.ndarray] = field(default_factory=dict)


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


def with_abs_max_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of `model` that also outputs ReduceMax(Abs(t)) of each float tensor t in `names` whose type it knows
    (not graph inputs: those are read from the feeds), each pair of nodes right after t's producer, and the output
    of each: a run returns scalars, not the tensors (an abs-max over all axes; -inf for an empty tensor)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    types = {v.name: v.type for v in list(model.graph.value_info) + list(model.graph.output)}
    wanted = {name for name in names if name in types and types[name].tensor_type.elem_type in FLOAT_TYPES}
    namer = Namer.for_proto(model.graph)
    peaks, nodes = {}, []
    for node in g.node:
        nodes.append(node)
        for name in node.output:
            if name not in wanted:
                continue
            absolute, peak = namer(name, "abs"), namer(name, "abs_max")
            nodes += [onnx.helper.make_node("Abs", [name], [absolute], name=absolute),
                      onnx.helper.make_node("ReduceMax", [absolute], [peak], name=peak, keepdims=0)]
            g.output.append(onnx.helper.make_tensor_value_info(peak, types[name].tensor_type.elem_type, []))
            peaks[name] = peak
    del g.node[:]
    g.node.extend(nodes)
    return out, {name: peaks[name] for name in names if name in peaks}  # in the order of `names`


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)


def observe_ranges(model: onnx.ModelProto, names: tuple[str, ...], feeds, *, source_dir: str | None, providers,
                   tmp_dir: str | None = None) -> dict[str, float]:
    """Abs-max of each float tensor in `names` of `model` over `feeds` (what --high-precision fp16 checks
    against float16's range, on the quantized graph: tensors the rewrite made are observed too). Reduced inside the
    graph, in the priority-based order: measured on the real terrain UNet (INT8, 16 feeds, 2956 tensors), fetching
    every tensor took the run from 668 to 1564 MiB peak RSS (one run's tensors: 1213 MiB)."""
    with_peaks, peaks = with_abs_max_outputs(model, names)
    session = make_session(with_peaks, source_dir, providers, tmp_dir, priority_order=True)
    fetch = list(peaks.values())
    ranges: dict[str, float] = {}
    for feed in feeds:
        for name, value in zip(peaks, session.run(fetch, feed)):
            if float(value) != -np.inf:  # an empty tensor: not observed
                ranges[name] = max(ranges.get(name, 0.0), float(value))
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


class Shard:
    """What a run of calibration feeds adds: statistics of the feeds the searches fit to (`stats`), of the
    held-back ones (`held`), and row samples. Shards of consecutive runs merge exactly (observers), so a
    run split over workers and merged in feed order is bit for bit the run done in one pass."""

    def __init__(self, observed: tuple[str, ...], sampled: tuple[str, ...], sample_rows: int, holdout_every: int,
                 channel_axes: dict[str, int], outputs: tuple[str, ...] = (),
                 weight_rows: dict[str, int] | None = None):
        self.observed, self.holdout_every = observed, holdout_every
        self.output_names = outputs  # the model's outputs, kept for the feeds `add` is told to keep them of
        self.outputs: dict[int, list[np.ndarray]] = {}
        self.stats: Stats = {n: TensorStats.empty(channel_axis=channel_axes.get(n, -1)) for n in observed}
        self.held: Stats = {n: TensorStats.empty(channel_axis=channel_axes.get(n, -1)) for n in observed}
        self.samples = {name: RowSample(sample_rows) for name in sampled}
        # rows for the weights' own fits (GPTQ's X^T X, the clip search, --low-rank auto), from every feed
        self.weight_samples = {key: RowSample(rows) for key, rows in (weight_rows or {}).items()}
        # key -> (tensor, Conv window or ())
        self._sources = {key: sample_source(key) for key in (*sampled, *self.weight_samples)}
        self.feeds = 0
        self._spec = (sample_rows, dict(channel_axes), dict(weight_rows or {}))

    def empty(self) -> "Shard":
        """A shard that gathers what this one does, with nothing in it yet (a worker's)."""
        sample_rows, channel_axes, weight_rows = self._spec
        return Shard(self.observed, tuple(self.samples), sample_rows, self.holdout_every, channel_axes,
                     self.output_names, weight_rows)

    def is_held_back(self, index: int) -> bool:
        return self.holdout_every > 0 and index % self.holdout_every == self.holdout_every - 1

    def add(self, index: int, feed: dict[str, np.ndarray], values: dict[str, np.ndarray],
            keep_outputs: bool = False) -> None:
        """Feed number `index` (in the whole data) and the observed tensors it gave (graph inputs: the feed); with
        `keep_outputs`, the model's outputs on it too (`values` holds them)."""
        held_back = self.is_held_back(index)
        if keep_outputs and self.output_names:
            self.outputs[index] = [values[name] for name in self.output_names]
        for name in self.observed:
            value = values[name] if name in values else feed[name]
            (self.held if held_back else self.stats)[name].update(value)
        if held_back or self.holdout_every == 0:
            self._sample(self.samples, index, feed, values)
        self._sample(self.weight_samples, index, feed, values)
        self.feeds += 1

    def _sample(self, samples: dict[str, RowSample], index: int, feed: dict[str, np.ndarray],
                values: dict[str, np.ndarray]) -> None:
        for key, sample in samples.items():
            tensor, window = self._sources[key]
            value = values[tensor] if tensor in values else feed[tensor]
            if window:
                sample.update_patches(value, window, index)
            else:
                sample.update(value, index)

    def merge(self, later: "Shard") -> "Shard":
        """Add the shard of the feeds right after this one's (in place; returns self)."""
        for mine, theirs in ((self.stats, later.stats), (self.held, later.held)):
            for name, st in theirs.items():
                mine[name].merge(st)
        for mine, theirs in ((self.samples, later.samples), (self.weight_samples, later.weight_samples)):
            for name, sample in theirs.items():
                mine[name].merge(sample)
        self.outputs.update(later.outputs)
        self.feeds += later.feeds
        return self


def run_feeds(session, fetch: list[str], shard: Shard, indexed_feeds) -> Shard:
    """Run `(index, feed, keep_outputs)` triples through the calibration session into `shard` (here or in a
    worker)."""
    for index, feed, keep_outputs in indexed_feeds:
        shard.add(index, feed, dict(zip(fetch, session.run(fetch, feed))), keep_outputs)
    return shard


class _HeldFeeds:
    """Up to `keep` held-back feeds kept by reservoir sampling: the kept feeds span the whole data set
    (captured trajectories are often ordered by timestep; the first k would all be early steps)."""

    def __init__(self, keep: int):
        self.keep, self.feeds, self.indices, self.seen, self.rng = keep, [], [], 0, np.random.default_rng(0)

    def offer(self, feed: dict[str, np.ndarray], index: int) -> bool:
        """Whether feed number `index` is kept (for now: a later one may take its place)."""
        kept = True
        if len(self.feeds) < self.keep:
            self.feeds.append(feed)
            self.indices.append(index)
        else:
            slot = int(self.rng.integers(0, self.seen + 1))
            kept = slot < self.keep
            if kept:
                self.feeds[slot], self.indices[slot] = feed, index
        self.seen += 1
        return kept


def calibrate(graph: gs.Graph, observed: tuple[str, ...], data: CalibrationData, *,
              source_dir: str | None, providers, tmp_dir: str | None = None, progress: bool = True,
              sampled: tuple[str, ...] = (), sample_rows: int = 1024,
              holdout_every: int = 0, keep_held_back: int = 0,
              channel_axes: dict[str, int] | None = None, workers: int = 1,
              ray_address: str | None = None, weight_rows: dict[str, int] | None = None) -> Calibration:
    """Statistics of each tensor in `observed`, and a bounded sample of rows (last-axis vectors) of
    each tensor in `sampled` (a subset of `observed`; or a Conv's input patches, plan.sample_key). Per-channel
    maxima run over the last axis, or over `channel_axes[name]` (1 for a tensor only Convs read).

    With `holdout_every=k`, every k-th feed is held back: `fit_stats` come from the other feeds and
    the row sample only from the held-back ones, so searches scored on the sample see data their
    candidate scales were not fitted to (clipping of unseen values shows up); `stats` still cover
    every feed, for the final scales. Up to
    `keep_held_back` held-back feeds are kept for model-output searches (sensitivity, fallback).
    `weight_rows` (sample key -> rows): row samples over every feed, held back or not (`weight_samples`), for what
    fits a weight to its layer's inputs (GPTQ, the clip search, --low-rank auto): it scores nothing on them.

    `workers > 1` (or a `ray_address`) runs the feeds in that many worker processes (calib.workers), with
    the same result."""
    model = with_outputs(graph, observed)
    if isinstance(source_dir, WeightStore):  # the run's store: its folder stays linked while the feeds run
        shadowed = has_bfloat16(model)
        if shadowed:  # read before the input's files are linked: onnx refuses linked files
            model = float32_shadow(model, source_dir.locate)
        with source_dir.session_folder() as folder:
            return _calibrate(model, session_source(model, folder, source_dir.tmp_dir, shadowed), observed, data,
                              providers, progress, sampled, sample_rows, holdout_every, keep_held_back,
                              channel_axes, workers, ray_address, len(graph.outputs), weight_rows)
    return _calibrate(model, session_source(model, source_dir, tmp_dir), observed, data, providers, progress,
                      sampled, sample_rows, holdout_every, keep_held_back, channel_axes, workers, ray_address,
                      len(graph.outputs), weight_rows)


def _calibrate(model, source, observed, data, providers, progress, sampled, sample_rows, holdout_every,
               keep_held_back, channel_axes, workers, ray_address, n_outputs, weight_rows=None) -> Calibration:
    output_names = {o.name for o in model.graph.output}
    fetch = [n for n in observed if n in output_names]
    # the model's own outputs (with_outputs puts them first) on the held-back feeds kept: the searches' reference
    outputs = tuple(o.name for o in model.graph.output[:n_outputs]) if keep_held_back else ()
    fetch += [n for n in outputs if n not in fetch]
    shard = Shard(observed, sampled, sample_rows, holdout_every, channel_axes or {}, outputs, weight_rows)
    held, feed_shapes = _HeldFeeds(keep_held_back), {}

    def indexed():
        # no bar off a terminal (disable=None); on one, the bar is cleared when bad data raises mid-way
        with tqdm(data, total=data.num_feeds, desc="calibrating", unit="batch",
                  disable=None if progress else True, leave=False) as bar:
            for i, feed in enumerate(bar):
                if i == 0:
                    feed_shapes.update({name: tuple(int(d) for d in value.shape) for name, value in feed.items()})
                kept = bool(keep_held_back) and shard.is_held_back(i) and held.offer(feed, i)
                if kept and shard.outputs:  # outputs of a feed this one replaced (merged from workers too) go
                    for stale in set(shard.outputs) - set(held.indices):
                        del shard.outputs[stale]
                yield i, feed, kept

    if workers > 1 or ray_address is not None:
        from segquant_onnx.calib.workers import run_sharded  # multiprocessing / Ray only when asked for

        run_sharded(source, providers, fetch, shard, indexed(), workers=workers, ray_address=ray_address,
                    num_feeds=data.num_feeds)
    else:
        run_feeds(source.open(providers), fetch, shard, indexed())
    if shard.feeds == 0:
        raise UserError(f"Calibration data {data.description} yielded zero feeds; give at least one.")
    log.info("calibrated %d tensors on %d batches", len(observed), shard.feeds)
    rows = {name: s.rows for name, s in shard.samples.items() if s.rows is not None}
    weight_samples = {name: s.rows for name, s in shard.weight_samples.items() if s.rows is not None}
    reference = [shard.outputs[i] for i in held.indices] if outputs else None
    everything = shard.stats if holdout_every == 0 else {
        name: copy.deepcopy(st).merge(shard.held[name]) for name, st in shard.stats.items()}
    return Calibration(everything, rows, held.feeds, shard.stats, feed_shapes, shard.feeds, reference, weight_samples)
