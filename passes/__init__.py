"""Pattern-matching graph passes, one idea per file, and their run order (installed as `segquant_onnx.passes`).

    detect_all:  canonical graph -> QuantPlan           every pass detects, in order; SegLinear's exact
                                                        split is applied right after its detection
    rewrite_all: graph + plan + Quantization -> graph   every quantize-stage pass rewrites, in order:
                                                        outlier split -> smoothing -> low rank
                                                        -> DualScale -> Q/DQ

The contract every pass follows is in base.py. Only the pipeline stages run the passes (pipeline,
rewrite); the other core modules never import them.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from segquant_onnx.ir.weights import StoredWeights
from segquant_onnx.params import Quantization
from segquant_onnx.passes.add_low_rank_branch import AddLowRankBranch
from segquant_onnx.passes.base import PLAN, QUANTIZE, Pass, PreconditionError, QuantizedSite, run_order
from segquant_onnx.passes.dual_scale_activations import DualScaleActivations
from segquant_onnx.passes.find_linear_sites import FindLinearSites
from segquant_onnx.passes.flatten_linears_to_2d import FlattenLinearsTo2D
from segquant_onnx.passes.quantize_attention import QuantizeAttention
from segquant_onnx.passes.quantize_linear_inputs import QuantizeLinearInputs
from segquant_onnx.passes.smooth_activations import SmoothActivations
from segquant_onnx.passes.split_linear_by_segment import SplitLinearBySegment
from segquant_onnx.passes.split_outlier_channels import SplitOutlierChannels
from segquant_onnx.plan import QuantPlan

__all__ = ["AddLowRankBranch", "DualScaleActivations", "FindLinearSites", "FlattenLinearsTo2D", "Pass",
           "PreconditionError",
           "QuantizeAttention",
           "QuantizeLinearInputs",
           "QuantizedSite", "SmoothActivations", "SplitLinearBySegment", "SplitOutlierChannels", "detect_all",
           "passes", "rewrite_all"]


def passes(*, seg_output: bool = True, seg_input: bool = True, seg_heads: bool = False,
           exclude: tuple[str, ...] = (), dualscale: bool = True, attention: bool = False,
           block_size: int | None = None, flatten: bool = False,
           stored: StoredWeights | None = None) -> tuple[Pass, ...]:
    """The run order, for detection and for rewriting alike (a new pass is one line here). `block_size`: the
    weights get INT4 block scales (Conv sites are declined); `flatten`: W4A8's 2-D MatMul layout; `stored`: the
    run's quantized weights, reused by the rewrites that store weights (ir/weights.py StoredWeights)."""
    return run_order((
        SplitLinearBySegment(seg_output, seg_input, seg_heads),
        FlattenLinearsTo2D(flatten),
        FindLinearSites(exclude, block_size),
        SplitOutlierChannels(),
        SmoothActivations(),
        AddLowRankBranch(),
        DualScaleActivations(dualscale, stored),
        QuantizeLinearInputs(stored),
        QuantizeAttention(attention),
    ))


def detect_all(graph: gs.Graph, *, seg_output: bool = True, seg_input: bool = True, seg_heads: bool = False,
               exclude: tuple[str, ...] = (), dualscale: bool = True, attention: bool = False,
               block_size: int | None = None, flatten: bool = False) -> QuantPlan:
    """The plan of a canonicalized graph: every pass's findings and declines, in run order. Plan-stage
    passes (SegLinear) rewrite what they found right away, so `graph` is mutated: the sites are those
    of the graph that will be quantized."""
    plan = QuantPlan(sites=())
    for p in passes(seg_output=seg_output, seg_input=seg_input, seg_heads=seg_heads, exclude=exclude,
                    dualscale=dualscale, attention=attention, block_size=block_size, flatten=flatten):
        plan = p.detect(graph, plan)
        if p.stage == PLAN:
            p.rewrite(graph, list(getattr(plan, p.plan_field)), None)
    return plan


def rewrite_all(graph: gs.Graph, plan: QuantPlan, q: Quantization,
                stored: StoredWeights | None = None) -> list[QuantizedSite]:
    """Quantize `graph` (the one `plan` was detected on) as `q` says: every site not left in float, by
    the quantize-stage passes in run order. Returns the sites as quantized, each with its Q/DQ inputs.
    `stored`: quantized weights to reuse (the graph is spilled to their store next)."""
    sites = [s for s in plan.sites if s.name not in q.floating]
    for p in passes(stored=stored):
        if p.stage == QUANTIZE:
            sites = p.rewrite(graph, sites, q)
    return sites
