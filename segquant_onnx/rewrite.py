"""The rewrite stage: graph + plan + Quantization -> quantized graph, by the passes in their run order.

    outlier split -> smoothing -> DualScale -> Q/DQ        on every site of the plan not left in float

Used for the output graph, for candidate graphs scored on held-back feeds, and as the first step of
the analysis graphs (analysis/gates.py blends what it reports; outlier_search's level copies), so all
of them are built by the same code.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from segquant_onnx.ir.qdq import QuantizedInput
from segquant_onnx.ir.weights import StoredWeights
from segquant_onnx.params import Quantization
from segquant_onnx.passes import rewrite_all
from segquant_onnx.plan import QuantPlan


def apply_quantization(graph: gs.Graph, plan: QuantPlan, q: Quantization,
                       stored: StoredWeights | None = None) -> dict[str, tuple[QuantizedInput, ...]]:
    """Quantize `graph` in place; returns, per quantized site, the inputs that now read a DequantizeLinear.
    `stored`: the run's quantized weights (WeightStore.stored), reused where a weight was quantized with the same
    scale before; only for a graph the store spills next (the candidates scored, the output)."""
    return {site.name: site.quantized for site in rewrite_all(graph, plan, q, stored)}
