"""Held-back scoring: the output SQNR of candidate quantized graphs against the float model on the
calibration feeds held back from the statistics (layer error on calibration data misleads: decide at
the model output, on data the scales were not fitted to).

Every analysis session (held-back scoring, sensitivity and fallback, the per-site outlier search) is
opened by `Sessions.open`, so a run that needs no held-back feeds provably opens none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
from tqdm import tqdm

from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.ir.graph_io import export_model
from segquant_onnx.ir.runtime import make_session
from segquant_onnx.ir.weights import WeightStore
from segquant_onnx.params import Quantization
from segquant_onnx.plan import QuantPlan
from segquant_onnx.rewrite import apply_quantization


def bar(items, desc: str, unit: str, progress: bool, total: int | None = None):
    """A progress bar over `items`, cleared when done (on a terminal only)."""
    return tqdm(items, desc=desc, unit=unit, total=total, disable=None if progress else True, leave=False)


@dataclass(frozen=True)
class Sessions:
    """Opens analysis sessions for graphs of one model: its external weights in `store`, the run's providers."""

    store: WeightStore
    providers: tuple[str, ...]

    def open(self, model: onnx.ModelProto) -> ort.InferenceSession:
        return make_session(model, self.store, self.providers, self.store.tmp_dir)

    def open_graph(self, graph: gs.Graph) -> ort.InferenceSession:
        """A session for `graph` (cleaned up and sorted in place first; its large in-memory weights spilled
        to the store, so the exported model stays small and ONNX Runtime reads them from disk)."""
        self.store.spill(graph.cleanup().toposort())
        return self.open(export_model(graph))


class HeldBack:
    """Output SQNR of candidate quantized graphs on held-back calibration feeds (a bar per feed with
    `progress`: each is one run of the whole model)."""

    def __init__(self, fp_model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], sessions: Sessions,
                 progress: bool):
        self.feeds, self.sessions, self.progress = feeds, sessions, progress
        session = sessions.open(fp_model)
        self.reference = [session.run(None, f) for f in bar(feeds, "held-back reference", "feed", progress)]

    def score(self, graph: gs.Graph, plan: QuantPlan, q: Quantization) -> float:
        """The held-back SQNR of `graph` (left as it is) quantized as `q` says."""
        candidate = graph.copy()
        apply_quantization(candidate, plan, q)
        return self.sqnr(candidate)

    def sqnr(self, graph: gs.Graph) -> float:
        session = self.sessions.open_graph(graph)
        err = OutputError()
        for feed, ref in bar(list(zip(self.feeds, self.reference)), "scoring held-back feeds", "feed", self.progress):
            for r, got in zip(ref, session.run(None, feed)):
                err.update(r, got)
        return err.sqnr
