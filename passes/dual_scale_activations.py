"""DualScale: quantize a SiLU/GELU output feeding a linear with one scale per polarity.

    Y = Op(A, W, bias)                    A = act(X), maybe through Reshape/Transpose/Cast/(Un)Squeeze
 -> Y = Add(Op(DQ(Q(Relu(A), s_pos)), DQ(Wq, s_w), bias),
            Op(DQ(Q(Min(A, 0), s_neg)), DQ(Wq, s_w)))            Op: MatMul, Gemm or Conv

act is SiLU `X * Sigmoid(X)` (either order), Swish `X * Sigmoid(beta * X)` (QuickGELU: beta = 1.702),
the `Gelu` op (opset 20), or GELU decomposed as torch's exporters write it:
`0.5 * X * (1 + Erf(X / sqrt 2))` and `0.5 * X * (1 + Tanh(sqrt(2/pi) * (X + 0.044715 * X^3)))`, in any
association order, with Pow or Mul for the cube. Their outputs reach far above zero but never below
-0.28, so `s_pos = amax(A > 0) / 127` and `s_neg = amax(A < 0) / 128` (the negative branch uses the
whole [-128, 0] half) both spend the INT8 grid where the values are.

Both branches are ordinary INT8 GEMMs for TensorRT: each reads the same INT8 weight initializer
through its own DequantizeLinear; the bias (Gemm C, Conv B) is added once, in the first branch; the
Add keeps Y's name, so every consumer of Y is untouched. Other consumers of A keep reading A.

Detect (on/off by the constructor) looks at the sites FindLinearSites found; rewrite acts on the
sites solve gave DualParams (`Quantization.dual`) and reports every input it quantized
(QuantizedSite.quantized: both activations, both weights; analysis/gates.py blends the branches'
weight once, at gate 0 relu(A) @ W + min(A, 0) @ W = A @ W). Preconditions: the graph is
canonicalized and its sites found; outlier split and smoothing have run (they act on the bulk A).
Runs before QuantizeLinearInputs, which then skips the dual sites (they already carry Q/DQ; the
negative branch's op is new and already quantized).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from segquant_onnx.formats import Scheme, scheme_of
from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.ir.qdq import QuantizedInput, float_dtype, quantize_activation_input, site_node, stored_weight_input
from segquant_onnx.ir.weights import StoredWeights
from segquant_onnx.params import DualParams, Quantization
from segquant_onnx.passes.base import DUAL_QUANTIZED, QUANTIZE, SITES_FOUND, SMOOTHED, QuantizedSite
from segquant_onnx.plan import DeclinedSite, DualSite, LinearSite, QuantPlan

QUICK_GELU_BETA = 1.702
# ops that move or relabel values without changing them (Cast only between float types)
LOOK_THROUGH = ("Reshape", "Transpose", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Dropout", "Cast")
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
_RTOL = 1e-4  # exporters write sqrt(2/pi) etc. rounded to float32 (or fewer digits)
_MAX_DEPTH = 8  # Mul trees deeper than this are not activations


# -- pattern helpers: each returns what it matched, or None ---------------------------------------
def _producer(t: gs.Tensor, *ops: str) -> gs.Node | None:
    if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op in ops \
            and t.inputs[0].domain in (None, "", "ai.onnx"):
        return t.inputs[0]
    return None


def _scalar(t: gs.Tensor) -> float | None:
    if isinstance(t, gs.Constant) and int(np.prod(t.shape, dtype=np.int64)) == 1:
        return float(np.asarray(constant_values(t)).ravel()[0])
    return None


def _close(a: float | None, b: float) -> bool:
    return a is not None and math.isclose(a, b, rel_tol=_RTOL)


def _scaled(t: gs.Tensor) -> tuple[float, gs.Tensor]:
    """(c, u) for t = Mul(c, u), Mul(u, c) or Div(u, 1/c) with a scalar constant c; else (1, t)."""
    node = _producer(t, "Mul", "Div")
    if node is not None and len(node.inputs) == 2:
        a, b = node.inputs
        if node.op == "Div":
            d = _scalar(b)
            if d:
                return 1.0 / d, a
            return 1.0, t
        for c, u in ((a, b), (b, a)):
            if (value := _scalar(c)) is not None:
                return value, u
    return 1.0, t


def _factors(t: gs.Tensor, stop: tuple[gs.Tensor, ...] = (), depth: int = _MAX_DEPTH):
    """t as constant * product(terms), through Mul, Div by a constant and Pow by 2..4.

    Tensors in `stop` are terms even when they are products themselves (an activation's input X
    may be a Mul). Returns (constant, [terms]).
    """
    if any(t is s for s in stop) or depth == 0:
        return 1.0, [t]
    c = _scalar(t)
    if c is not None:
        return c, []
    node = _producer(t, "Mul", "Div", "Pow")
    if node is None or len(node.inputs) != 2:
        return 1.0, [t]
    a, b = node.inputs
    if node.op == "Mul":
        ca, ta = _factors(a, stop, depth - 1)
        cb, tb = _factors(b, stop, depth - 1)
        return ca * cb, ta + tb
    e = _scalar(b)
    if node.op == "Div" and e:
        ca, ta = _factors(a, stop, depth - 1)
        return ca / e, ta
    if node.op == "Pow" and e in (2.0, 3.0, 4.0):
        ca, ta = _factors(a, stop, depth - 1)
        return ca ** e, ta * int(e)
    return 1.0, [t]


def _same_terms(terms: list[gs.Tensor], expected: list[gs.Tensor]) -> bool:
    return sorted(map(id, terms)) == sorted(map(id, expected))


def match_swish(t: gs.Tensor) -> tuple[str, gs.Tensor] | None:
    """X * Sigmoid(beta * X), either order: ("silu" | "quick_gelu" | "swish", X)."""
    mul = _producer(t, "Mul")
    if mul is None or len(mul.inputs) != 2:
        return None
    for x, s in (mul.inputs, mul.inputs[::-1]):
        sig = _producer(s, "Sigmoid")
        if sig is None:
            continue
        beta, inner = _scaled(sig.inputs[0])
        if inner is not x or not beta > 0:
            continue
        if _close(beta, 1.0):
            return "silu", x
        return ("quick_gelu" if _close(beta, QUICK_GELU_BETA) else "swish"), x
    return None


def _cube_argument(s: gs.Tensor) -> gs.Tensor | None:
    """X for s = X + 0.044715 * X^3 (Pow or Mul for the cube, any order), else None."""
    add = _producer(s, "Add")
    if add is None or len(add.inputs) != 2:
        return None
    for x, other in (add.inputs, add.inputs[::-1]):
        if not isinstance(x, gs.Variable):
            continue
        c, terms = _factors(other, stop=(x,))
        if _close(c, 0.044715) and _same_terms(terms, [x, x, x]):
            return x
    return None


def match_gelu_decomposed(t: gs.Tensor) -> tuple[str, gs.Tensor] | None:
    """0.5 * X * (1 + Erf(X / sqrt 2)) or 0.5 * X * (1 + Tanh(sqrt(2/pi) (X + 0.044715 X^3)))."""
    if _producer(t, "Mul", "Div") is None:
        return None
    _, terms = _factors(t)
    for a in terms:
        add = _producer(a, "Add")
        if add is None or len(add.inputs) != 2:
            continue
        one, inner = add.inputs if _scalar(add.inputs[0]) is not None else add.inputs[::-1]
        if not _close(_scalar(one), 1.0):
            continue
        fn = _producer(inner, "Erf", "Tanh")
        if fn is None:
            continue
        k, arg = _scaled(fn.inputs[0])
        if fn.op == "Erf":
            kind, x = "gelu_erf", arg if _close(k, 1 / math.sqrt(2)) else None
        else:
            kind, x = "gelu_tanh", _cube_argument(arg) if _close(k, math.sqrt(2 / math.pi)) else None
        if x is None:
            continue
        c, outer = _factors(t, stop=(x, a))
        if _close(c, 0.5) and _same_terms(outer, [x, a]):
            return kind, x
    return None


def match_gelu_op(t: gs.Tensor) -> tuple[str, gs.Tensor] | None:
    node = _producer(t, "Gelu")
    return ("gelu_op", node.inputs[0]) if node is not None else None


MATCHERS = (match_swish, match_gelu_decomposed, match_gelu_op)


def _look_through(t: gs.Tensor) -> gs.Tensor:
    """Walk back through ops that only move values (Cast only from float to float)."""
    while (node := _producer(t, *LOOK_THROUGH)) is not None and node.inputs:
        if node.op == "Cast" and (int(node.attrs.get("to", -1)) not in _FLOAT_TYPES
                                  or node.inputs[0].dtype not in (np.float32, np.float16, np.float64)
                                  and float_dtype(node.inputs[0].dtype) is None):
            break
        t = node.inputs[0]
    return t


def match_activation(t: gs.Tensor) -> tuple[str, gs.Tensor] | None:
    """(kind, X) when t is a SiLU/GELU output, else None. A Relu is not: it has no negative part."""
    for matcher in MATCHERS:
        found = matcher(t)
        if found is not None:
            return found
    return None


class DualScaleActivations:
    name = "dual_scale_activations"
    stage = QUANTIZE
    requires = (SITES_FOUND, SMOOTHED)
    ensures = (DUAL_QUANTIZED,)

    def __init__(self, enabled: bool = True, stored: StoredWeights | None = None):
        self.enabled, self.stored = enabled, stored  # stored: the run's quantized weights to reuse (rewrite only)

    # -- match + check -------------------------------------------------------------------------
    def check(self, node: gs.Node, site: LinearSite) -> DualSite | str | None:
        """A DualSite, a reason string when the activation matches but is declined, or None."""
        a = node.inputs[site.activation_input_index]
        if a.name != site.activation:
            raise RuntimeError(f"{self.name}: site {site.name} does not match its graph node")
        act = _look_through(a)
        found = match_activation(act)
        if found is None:
            return None
        kind, x = found
        if float_dtype(x.dtype) is None or float_dtype(act.dtype) != float_dtype(x.dtype):
            return f"{kind} computes in {np.dtype(x.dtype).name if x.dtype else 'unknown dtype'}, " \
                   "only float32, float16 and bfloat16 activations are dual-scaled"
        return DualSite(site.name, act.name, kind)

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        if not self.enabled:
            return plan
        nodes = {n.name: n for n in graph.nodes}
        found, declined = [], []
        for site in plan.sites:
            result = self.check(nodes[site.name], site)
            if isinstance(result, DualSite):
                found.append(result)
            elif isinstance(result, str):
                declined.append(DeclinedSite(site.name, site.op, result))
        return replace(plan, dual=plan.dual + tuple(found), declined=plan.declined + tuple(declined))

    # -- rewrite --------------------------------------------------------------------------------
    def rewrite(self, graph: gs.Graph, sites: list[LinearSite], params: Quantization) -> list[LinearSite]:
        """Two GEMMs with one scale per polarity at every site in `params.dual`."""
        nodes = {n.name: n for n in graph.nodes}
        namer = Namer(graph)
        updated = []
        for site in sites:
            if site.name not in params.dual:
                updated.append(site)
                continue
            node, _, _ = site_node(nodes, site, self.name)
            updated.append(QuantizedSite.of(site, self._split(graph, namer, node, site, params.dual[site.name],
                                                              scheme_of(params.format), self.stored)))
        graph.cleanup().toposort()
        return updated

    @staticmethod
    def _split(graph: gs.Graph, namer: Namer, node: gs.Node, site: LinearSite,
               p: DualParams, scheme: Scheme, stored: StoredWeights | None = None) -> tuple[QuantizedInput, ...]:
        ia, iw, axis = site.activation_input_index, site.weight_input_index, site.weight_axis
        pos, neg = f"{site.name}/pos", f"{site.name}/neg"
        a, w, y = node.inputs[ia], node.inputs[iw], node.outputs[0]

        relu_out = gs.Variable(namer(pos, "relu_output"), a.dtype, a.shape)
        min_out = gs.Variable(namer(neg, "min_output"), a.dtype, a.shape)
        zero = gs.Constant(namer(neg, "zero"), np.array(0, float_dtype(a.dtype) or np.float32))
        graph.nodes.append(gs.Node("Relu", namer(pos, "relu"), inputs=[a], outputs=[relu_out]))
        graph.nodes.append(gs.Node("Min", namer(neg, "min"), inputs=[a, zero], outputs=[min_out]))

        # the negative branch: the same op without its bias
        neg_inputs = list(node.inputs[: max(ia, iw) + 1])
        neg_inputs[ia] = min_out
        neg_out = gs.Variable(namer(neg, "output"), y.dtype, y.shape)
        neg_node = gs.Node(node.op, namer(neg, node.op), dict(node.attrs), inputs=neg_inputs, outputs=[neg_out])
        graph.nodes.append(neg_node)
        node.inputs[ia] = relu_out

        pos_a = quantize_activation_input(graph, namer, pos, node, ia, p.pos_scale, fmt=scheme.activations)
        neg_a = quantize_activation_input(graph, namer, neg, neg_node, ia, p.neg_scale, fmt=scheme.activations)
        pos_w = stored_weight_input(graph, namer, pos, node, iw, p.weight_scale, axis, scheme.weights, p.rounded,
                                    stored=stored)
        # one DequantizeLinear per consumer, both reading the same quantized initializer and scales
        neg_dq = gs.Variable(namer(neg, "weight_dequantized"), pos_w.dequantized.dtype, pos_w.dequantized.shape)
        pos_dq = pos_w.dequantized.inputs[0]
        graph.nodes.append(gs.Node("DequantizeLinear", namer(neg, "weight_dq"), dict(pos_dq.attrs),
                                   inputs=list(pos_dq.inputs), outputs=[neg_dq]))
        neg_node.inputs[iw] = neg_dq
        neg_w = QuantizedInput(neg, "weight", neg_node, iw, w, neg_dq)

        pos_out = gs.Variable(namer(pos, "output"), y.dtype, y.shape)
        node.outputs[0] = pos_out
        graph.nodes.append(gs.Node("Add", namer(site.name, "dual_add"), inputs=[pos_out, neg_out], outputs=[y]))
        return pos_a, neg_a, pos_w, neg_w
