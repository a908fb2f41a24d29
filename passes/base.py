"""The pass contract, and the check that keeps the run order honest.

    detect:  (graph, plan) -> plan              pure: the plan it was given plus this pass's findings
                                                (sites, segments, dual sites) and the nodes it declined,
                                                each with its reason
    rewrite: (graph, sites, params) -> sites    the only code that mutates the graph: acts on the sites
                                                its parameters select, returns every site as it reads now

A pass that only detects returns `sites` unchanged from rewrite; one that only rewrites returns `plan`
unchanged from detect. Settings (SegLinear patterns, --exclude, DualScale on/off) go to the
constructor; `params` is what solve decided (params.Quantization). `requires` names the conditions
that must hold before a pass runs and `ensures` those that hold once it has run; `run_order` refuses
an order in which a precondition is unmet, naming the pass, before any pass runs.

`stage` says when a pass rewrites. `"plan"`: the rewrite is structural and exact in float (SegLinear),
so detection applies it right after the pass's own detect, to what it found (the plan field named by its
`plan_field`): the later passes
detect on, and calibration observes, the rewritten graph. `"quantize"`: the rewrite runs with the
solved parameters, after calibration.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import onnx_graphsurgeon as gs

from segquant_onnx.ir.qdq import QuantizedInput
from segquant_onnx.params import Quantization
from segquant_onnx.plan import LinearSite, QuantPlan

# conditions, in the order the passes establish them
CANONICAL = "canonical"  # canonicalize ran: constants folded, shapes inferred (the caller's promise)
SEGMENTS_SPLIT = "segments split"
LAID_OUT = "linears laid out"  # W4A8's 2-D MatMuls where asked for (sites may be found before or after)
SITES_FOUND = "sites found"
OUTLIERS_SPLIT = "outliers split"
SMOOTHED = "smoothed"
LOW_RANK_SPLIT = "low-rank branches split off"
DUAL_QUANTIZED = "dual sites quantized"
QUANTIZED = "quantized"
ATTENTION_QUANTIZED = "attention quantized"

PLAN, QUANTIZE = "plan", "quantize"


class PreconditionError(RuntimeError):
    """A pass is ordered before a condition it requires holds."""


@runtime_checkable
class Pass(Protocol):
    name: str
    stage: str  # PLAN or QUANTIZE
    requires: tuple[str, ...]
    ensures: tuple[str, ...]

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan: ...

    def rewrite(self, graph: gs.Graph, sites: list, params: Quantization | None) -> list: ...


@dataclass(frozen=True)
class QuantizedSite(LinearSite):
    """A site after Q/DQ insertion: the tensors it read before (activation, weight) and every input
    that now reads a DequantizeLinear (a DualScale site has one per branch)."""

    quantized: tuple[QuantizedInput, ...] = ()

    @classmethod
    def of(cls, site: LinearSite, quantized: tuple[QuantizedInput, ...]) -> QuantizedSite:
        return cls(**vars(site), quantized=quantized)


def run_order(passes: Iterable[Pass], holds: Iterable[str] = (CANONICAL,)) -> tuple[Pass, ...]:
    """`passes` as given, once each one's `requires` hold (on entry or ensured by a pass before it)."""
    passes, held = tuple(passes), set(holds)
    for p in passes:
        missing = [c for c in p.requires if c not in held]
        if missing:
            raise PreconditionError(f"pass {p.name} requires {', '.join(map(repr, missing))}, which no pass "
                                    "before it ensures: it is out of the run order")
        held.update(p.ensures)
    return passes
