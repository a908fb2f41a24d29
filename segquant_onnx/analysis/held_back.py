"""Held-back scoring: the output SQNR of candidate quantized graphs against the float model on the
calibration feeds held back from the statistics (layer error on calibration data misleads: decide at
the model output, on data the scales were not fitted to).

Every analysis session (held-back scoring, sensitivity and fallback, the per-site outlier search) is
opened by `Sessions.open`, so a run that needs no held-back feeds provably opens none. With `--workers N` (or
`--ray-address`) those sessions are PooledSessions: each batch of runs (a candidate's held-back feeds, one
gate setting's feeds) is cut into runs of consecutive feeds, one per worker, each worker holding its own
session of the model; the outputs come back in feed order and every error is summed here in that order, so
the decisions are those of one process.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from tqdm import tqdm

from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.ir.graph_io import export_model
from segquant_onnx.ir.runtime import float32_shadow, has_bfloat16, make_session, run_all, session_source
from segquant_onnx.ir.weights import WeightStore
from segquant_onnx.params import Quantization
from segquant_onnx.plan import QuantPlan
from segquant_onnx.rewrite import apply_quantization


def bar(items, desc: str, unit: str, progress: bool, total: int | None = None):
    """A progress bar over `items`, cleared when done (on a terminal only)."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=None if progress else True, leave=False)


def _run_outputs(session, names: list[str] | None, feeds: list[dict]) -> list[list[np.ndarray]]:
    """A worker's part of a PooledSession batch."""
    return [session.run(names, feed) for feed in feeds]


@dataclass(frozen=True)
class _Output:
    name: str


class PooledSession:
    """A session of `model` whose runs go to the workers of `pool` (calib.workers), in batches (`run_many`). The
    workers open their own sessions of it at their first task (the store's folder linked while a batch runs, as
    for a session here); this process holds none."""

    def __init__(self, pool, model: onnx.ModelProto, store: WeightStore, fold_dequantize: bool = False):
        shadowed = has_bfloat16(model)
        if shadowed:
            model = float32_shadow(model, store.locate)
        with store.session_folder() as folder:
            self.source = session_source(model, folder, store.tmp_dir, shadowed, fold_dequantize)
        self.pool, self.store, self.key = pool, store, uuid.uuid4().hex
        self._outputs = [_Output(o.name) for o in model.graph.output]

    def get_outputs(self) -> list[_Output]:
        return self._outputs

    def run(self, names, feed: dict) -> list[np.ndarray]:
        return self.run_many(names, [feed])[0]

    def run_many(self, names, feeds: list[dict]) -> list[list[np.ndarray]]:
        from segquant_onnx.calib.workers import run_tasks

        per = -(-len(feeds) // self.pool.workers)
        chunks = [(names, feeds[i:i + per]) for i in range(0, len(feeds), per)]
        with self.store.session_folder():
            parts = run_tasks(self.pool, self.key, self.source, _run_outputs, chunks, "analysis")
        return [out for part in parts for out in part]


@dataclass(frozen=True)
class Sessions:
    """Opens analysis sessions for graphs of one model: its external weights in `store`, the run's providers;
    with `workers` > 1 or a `ray_address`, sessions that spread their runs over workers (PooledSession), the
    workers started at the first one (`close()` stops them)."""

    store: WeightStore
    providers: tuple[str, ...]
    workers: int = 1
    ray_address: str | None = None
    _pool: list = field(default_factory=list, compare=False, repr=False)

    def open(self, model: onnx.ModelProto, fold_dequantize: bool = False) -> ort.InferenceSession | PooledSession:
        """`fold_dequantize`: see runtime.SessionSource (gated analysis graphs)."""
        if self.workers > 1 or self.ray_address is not None:
            if not self._pool:
                from segquant_onnx.calib.workers import open_pool

                self._pool.append(open_pool(self.workers, self.providers, self.ray_address))
            return PooledSession(self._pool[0], model, self.store, fold_dequantize)
        return make_session(model, self.store, self.providers, self.store.tmp_dir, fold_dequantize=fold_dequantize)

    def close(self) -> None:
        while self._pool:
            self._pool.pop().close()

    def open_graph(self, graph: gs.Graph, fold_dequantize: bool = False) -> ort.InferenceSession:
        """A session for `graph` (cleaned up and sorted in place first, its weights' DequantizeLinear shared
        (`share_dequantize`); its large in-memory weights spilled to the store, so the exported model stays small
        and ONNX Runtime reads them from disk)."""
        share_dequantize(graph)
        self.store.spill(graph.cleanup().toposort())
        return self.open(export_model(graph), fold_dequantize)


def share_dequantize(graph: gs.Graph) -> int:
    """Analysis graphs only: every DequantizeLinear of constants (a weight) that repeats another's inputs and
    attributes is dropped and its readers read the other's output; the number dropped. The written model keeps one
    per reader, as TensorRT wants (DualScale's two GEMMs each dequantize the same weight), but ONNX Runtime folds
    each into its own float copy in the large models' sessions (`session.disable_quant_qdq`): measured on the 2 GiB
    float16 DiT with 128 calibration feeds, the DualScale candidate's session peaked at 4.33 GiB RSS against
    3.64 GiB for the plain one, the run's peak."""
    first: dict[tuple, gs.Node] = {}
    outputs = {id(t) for t in graph.outputs}
    dropped = 0
    for node in graph.nodes:
        if node.op != "DequantizeLinear" or not node.inputs or not all(isinstance(t, gs.Constant) for t in node.inputs):
            continue
        out = node.outputs[0]
        key = (tuple(t.name for t in node.inputs), tuple(sorted((k, repr(v)) for k, v in node.attrs.items())))
        kept = first.setdefault(key, node)
        if kept is node or id(out) in outputs:
            continue
        for reader in list(out.outputs):
            for j, t in enumerate(reader.inputs):
                if t is out:
                    reader.inputs[j] = kept.outputs[0]
        node.outputs.clear()
        dropped += 1
    return dropped


class HeldBack:
    """Output error of candidate quantized graphs on each held-back calibration feed (a bar per feed with
    `progress`: each is one run of the whole model)."""

    def __init__(self, fp_model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], sessions: Sessions,
                 progress: bool, reference: list[list[np.ndarray]] | None = None):
        """`reference`: the float model's outputs on `feeds` where the caller has them (calibration computed them:
        Calibration.held_back_outputs); else a session of `fp_model` runs them."""
        self.feeds, self.sessions, self.progress = feeds, sessions, progress
        if reference is None:
            session = sessions.open(fp_model)
            reference = run_all(session, None, feeds, lambda xs: bar(xs, "held-back reference", "feed", progress))
        self.reference = reference

    def feed_errors(self, graph: gs.Graph, plan: QuantPlan, q: Quantization) -> list[OutputError]:
        """The output error on each held-back feed of `graph` (left as it is) quantized as `q` says."""
        candidate = graph.copy()
        apply_quantization(candidate, plan, q, self.sessions.store.stored)  # errors spills it
        return self.errors(candidate)

    def errors(self, graph: gs.Graph) -> list[OutputError]:
        session = self.sessions.open_graph(graph)
        outputs = run_all(session, None, self.feeds,
                          lambda xs: bar(xs, "scoring held-back feeds", "feed", self.progress))
        errors = []
        for ref, got in zip(self.reference, outputs):
            errors.append(OutputError())
            for r, g in zip(ref, got):
                errors[-1].update(r, g)
        return errors


def merged(errors: list[OutputError]) -> OutputError:
    """The error over all of `errors`' feeds."""
    total = OutputError()
    for err in errors:
        total = total.merged(err)
    return total
