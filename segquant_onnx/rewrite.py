"""The quantization rewrites, applied in their order to a canonical (SegLinear-split) graph.

Used for the output graph, for candidate graphs scored on held-back feeds, and for the gated
analysis graphs (sensitivity, fallback, the per-site outlier search), so all of them are built by
the same code.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from segquant_onnx.config import QuantConfig
from segquant_onnx.passes import DualScaleActivations, QuantizeLinearInputs, SmoothActivations, SplitOutlierChannels
from segquant_onnx.params import Quantization
from segquant_onnx.plan import QuantPlan


def apply_quantization(graph: gs.Graph, plan: QuantPlan, q: Quantization, config: QuantConfig,
                       gates: dict[str, gs.Tensor] | None = None) -> None:
    """outlier split -> smoothing -> DualScale -> Q/DQ, on every site of `plan` not left in float."""
    sites = [s for s in plan.sites if s.name not in q.floating]
    sites = SplitOutlierChannels().rewrite(graph, sites, q.outliers)
    sites = SmoothActivations().rewrite(graph, sites, q.params)
    by_name = {s.name: s for s in sites}
    DualScaleActivations().rewrite(graph, [d for d in plan.dual if d.site in q.dual and d.site in by_name],
                                   by_name, q.dual, gates=gates)
    QuantizeLinearInputs(config.exclude).rewrite(graph, [s for s in sites if s.name not in q.dual], q.params,
                                                 gates=gates)
