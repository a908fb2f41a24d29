"""SegLinear: split a linear by the semantic segments its output or input is cut into.

    output: Split(MatMul(X, W) [+ b], sizes)        -> MatMul(X, W[:, seg_i]) [+ b[seg_i]]   for each i
            Slice_i(Gemm(X, W, C), a_i, b_i), ...   -> Gemm(X, W[seg_i], C[seg_i])           for each i
            Split(Reshape(Y, [..., n, D]) [(+|*) c], axis=-2), one or more such Reshapes of Y = linear(X)
                                                    -> Y := Concat([linear_i(X) for each i], -1)
    input:  MatMul(Concat([A, B], -1), W) [+ b]     -> Add(MatMul(A, W[:ka]), MatMul(B, W[ka:])) [+ b]
            Gemm(Concat([A, B], -1), W, C)          -> Add(Gemm(A, W_a, C), Gemm(B, W_b))
            MatMul(Reshape(Concat([Unsqueeze(p_i, -2)...], -2) -> [..., n*D]), W)   (torch.stack(dim=-2))
                                                    -> sum_i MatMul(p_i, W[i*D:(i+1)*D])
            MatMul(Reshape(Concat([Unsqueeze(p_i, -1)...], -1) -> [..., D*n]), W)   (torch.stack(dim=-1))
                                                    -> sum_i MatMul(p_i, W[i::n])   (interleaved rows)

Each segment then becomes a linear site of its own, so quantization gives every input segment its own
activation scale (and, with SmoothQuant, every output segment its own smoothing and scale). The
rewrite is exact in float (up to summation order), so it runs before calibration: calibration then
observes exactly the tensors the final sites quantize.

The reshaped output cut is PixArt's adaLN-single: one `linear` (inner -> 6 inner) whose output every
block reshapes to [B, 6, inner], adds its `scale_shift_table` to and chunks on axis 1. The segments
are Concat'ed back into Y, so the per-block Reshapes, Adds and cuts stay as they are.

heads (opt-in, `head_segments`): MatMul(Reshape(X[..., H, D] -> [..., H*D]), W)
            -> sum_h MatMul(Gather(X, h, axis=-2), W[h*D:(h+1)*D])
            One scale per attention head for the output projection's input; H GEMMs with K = D, so
            off by default (TensorRT runs one K = H*D INT8 GEMM faster than H narrow ones).

Preconditions: canonicalized graph (constant chunk bounds, shapes inferred); the weight is a 2-D
constant; the cut is on the last axis (on the segment axis n of [..., n, D] after a Reshape). Output
cuts need the linear's output (after an optional bias Add) to feed only the Split or the Slices, and
the Slices to partition it; reshaped, it must feed only Reshapes with the same n whose copies (through
elementwise ops with a constant) are all cut the same way. A float->float Cast between Concat (or the
stack's Reshape) and linear is looked through. Segment sizes may be unequal.
Runs first, at the plan stage: detect adds the segments (and near-misses with reasons) to the plan,
and its rewrite splits them at once, before the sites are found and calibration observes them.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import constant_values
from segquant_onnx.ir.naming import Namer
from segquant_onnx.passes.base import CANONICAL, PLAN, SEGMENTS_SPLIT
from segquant_onnx.plan import DeclinedSite, QuantPlan, SegmentMatch
from segquant_onnx.passes.segment_patterns import (CUTS, bias_add, const_ints, float_source, is_linear, k_in,
                                                   last_axis, layout_users, merged_heads, n_out, partition,
                                                   splits_last_axis, trans_b, variable_bias)


class SplitLinearBySegment:
    name = "split_linear_by_segment"
    stage = PLAN
    plan_field = "segments"  # what detect found and the plan-stage rewrite acts on
    requires = (CANONICAL,)
    ensures = (SEGMENTS_SPLIT,)

    def __init__(self, output_segments: bool = True, input_segments: bool = True, head_segments: bool = False):
        self.output_segments, self.input_segments = output_segments, input_segments
        self.head_segments = head_segments

    # -- match + check --------------------------------------------------------------------------
    def check_output(self, node: gs.Node) -> tuple[SegmentMatch, list[gs.Node], gs.Node | None] | str | None:
        """(match, cutting nodes in segment order, bias Add) or a reason, or None if no cut follows.
        Reshaped cuts have no cutting nodes to rewire: the segments are concatenated back."""
        add = bias_add(node)
        y = (add or node).outputs[0]
        cuts = [c for c in y.outputs if c.op in CUTS]
        if not cuts:
            return self._check_reshaped_output(node, y, add)
        if len(cuts) != len(y.outputs):
            others = sorted({c.op for c in y.outputs if c not in cuts})
            return f"output also feeds {', '.join(others)}"
        if variable_bias(node):
            return "Gemm bias is not a constant"
        found = partition(cuts, n_out(node), len(y.shape) if y.shape is not None else None)
        if isinstance(found, str):
            return found
        sizes, via, ordered = found
        return SegmentMatch(node.name, "output", sizes, via), ordered, add

    def _check_reshaped_output(self, node: gs.Node, y: gs.Tensor, add: gs.Node | None):
        reshapes = [c for c in y.outputs if c.op == "Reshape" and splits_last_axis(y, c)]
        chains = [(r, layout_users(r.outputs[0])) for r in reshapes]
        if not any(c.op in CUTS for _, users in chains for _, nodes in users for c in nodes):
            return None  # nothing cuts the segment axis (e.g. heads: Reshape -> Transpose)
        others = sorted({c.op for c in y.outputs if c not in reshapes})
        if others:
            return f"output also feeds {', '.join(others)}"
        if len({r.outputs[0].shape[-2] for r in reshapes}) > 1:
            return "Reshapes split the output into different numbers of segments"
        if variable_bias(node):
            return "Gemm bias is not a constant"
        pieces, vias = set(), set()
        for r, users in chains:
            shape = r.outputs[0].shape
            for t, nodes in users:
                if not nodes or any(c.op not in CUTS for c in nodes):
                    what = sorted({c.op for c in nodes if c.op not in CUTS}) or ["the graph output"]
                    return f"reshaped output also feeds {', '.join(what)}"
                found = partition(nodes, shape[-2], len(shape), -2, "the segment axis")
                if isinstance(found, str):
                    return found
                pieces.add(found[0])
                vias.add(found[1])
        if len(pieces) > 1:
            return f"the segment axis is cut differently by different consumers: {sorted(pieces)}"
        d = reshapes[0].outputs[0].shape[-1]
        sizes = tuple(k * d for k in pieces.pop())
        return SegmentMatch(node.name, "output", sizes, "Reshape-" + "+".join(sorted(vias))), [], add

    def check_input(self, node: gs.Node) -> tuple[SegmentMatch, list[gs.Tensor]] | str | None:
        x, producer = float_source(node.inputs[0])
        if producer is None or producer.op != "Concat":
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1 reads its input transposed"
        rank = len(x.shape) if x.shape is not None else None
        if not last_axis(int(producer.attrs["axis"]), rank):
            return "Concat is not on the last axis"
        parts = list(producer.inputs)
        sizes = [p.shape[-1] if p.shape else None for p in parts]
        if any(not isinstance(s, int) for s in sizes):
            return "Concat input widths are unknown"
        if sum(sizes) != k_in(node) or len(parts) < 2:
            return "Concat widths do not match the weight"
        return SegmentMatch(node.name, "input", tuple(sizes), "Concat"), parts

    def check_stack(self, node: gs.Node) -> tuple[SegmentMatch, list[gs.Tensor]] | str | None:
        """torch.stack(parts, dim=-2 or -1) merged by a Reshape into the linear's K axis:
        Reshape(Concat([Unsqueeze(p_i, a)...], a) -> [..., n*D]), a one of the two merged axes."""
        x, producer = float_source(node.inputs[0])
        if producer is None or producer.op != "Reshape":
            return None
        stacked = producer.inputs[0]
        concat = stacked.inputs[0] if stacked.inputs else None
        if concat is None or concat.op != "Concat":
            return None
        unsqueezes = [p.inputs[0] if p.inputs else None for p in concat.inputs]
        if len(unsqueezes) < 2 or any(u is None or u.op != "Unsqueeze" for u in unsqueezes):
            return None  # not a stack
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1 reads its input transposed"
        if stacked.shape is None or x.shape is None or len(stacked.shape) < 2 \
                or not all(isinstance(v, int) for v in stacked.shape[-2:]):
            return "stacked shapes are unknown"
        rank, n = len(stacked.shape), len(unsqueezes)
        axis = int(concat.attrs["axis"]) % rank
        for u in unsqueezes:
            axes = const_ints(u.inputs[1]) if len(u.inputs) > 1 else list(u.attrs.get("axes", []))
            if axes is None or [a % rank for a in axes] != [axis]:
                return "Concat is not on the axis its inputs were stacked on"
        lead, last = stacked.shape[:-2], stacked.shape[-2] * stacked.shape[-1]
        if len(x.shape) != rank - 1 or x.shape[-1] != last \
                or any(a != b for a, b in zip(x.shape[:-1], lead) if isinstance(a, int) and isinstance(b, int)):
            return "Reshape does not merge exactly the last two axes"
        if axis < rank - 2:
            return "stack is not on one of the two axes the Reshape merges"
        d = last // n
        via = "Stack" if axis == rank - 2 else "Stack-interleaved"
        return SegmentMatch(node.name, "input", (d,) * n, via), [u.inputs[0] for u in unsqueezes]

    def detect(self, graph: gs.Graph, plan: QuantPlan) -> QuantPlan:
        matches, declined = self._matches(graph)
        return replace(plan, segments=plan.segments + tuple(found[0] for _, found in matches),
                       declined=plan.declined + tuple(declined))

    def _matches(self, graph: gs.Graph):
        """Matches with the nodes/tensors the rewrite needs, and declined near-matches."""
        matches, declined = [], []
        for node in graph.nodes:
            if not is_linear(node):
                continue
            for enabled, check in ((self.output_segments, self.check_output), (self.input_segments, self.check_input),
                                   (self.input_segments, self.check_stack), (self.head_segments, merged_heads)):
                result = check(node) if enabled else None
                if isinstance(result, str):
                    declined.append(DeclinedSite(node.name, node.op, f"SegLinear: {result}"))
                elif result is not None:
                    matches.append((node, result))
                    break
        return matches, declined

    # -- rewrite --------------------------------------------------------------------------------
    def rewrite(self, graph: gs.Graph, sites: list[SegmentMatch], params=None) -> list[SegmentMatch]:
        """Split every segment match in `sites` (detect's, on this same graph), in their order."""
        matches = {node.name: (node, found) for node, found in self._matches(graph)[0]}
        namer = Namer(graph)
        done = []
        for match in sites:
            node, found = matches.get(match.linear, (None, (None,)))
            if found[0] != match:
                raise RuntimeError(f"{self.name}: {match.linear} no longer matches the plan")
            if match.kind == "output" and match.via.startswith("Reshape-"):  # concatenate back into Y
                add = found[2]
                y = (add or node).outputs[0]
                outs = self._rewrite_output(graph, namer, node, match, [None] * len(match.sizes), add)
                (add or node).outputs.clear()
                graph.nodes.append(gs.Node("Concat", namer(node.name, "seg_concat"), {"axis": -1},
                                           inputs=outs, outputs=[y]))
            elif match.kind == "output":
                cuts = found[1]
                targets = cuts[0].outputs if match.via == "Split" else [c.outputs[0] for c in cuts]
                self._rewrite_output(graph, namer, node, match, list(targets), found[2])
                for cut in cuts:
                    cut.outputs.clear()
            elif match.via == "Reshape":  # one part per head: Gather(Reshape(X, [..., H, D]), h, axis=-2)
                x, heads = found[1], len(match.sizes)
                src = gs.Variable(namer(node.name, "heads"), dtype=x.dtype)
                shape = np.array([0] * (len(x.shape) - 1) + [heads, match.sizes[0]], np.int64)
                graph.nodes.append(gs.Node("Reshape", namer(node.name, "split_heads"),
                                           inputs=[x, gs.Constant(namer(node.name, "heads_shape"), shape)],
                                           outputs=[src]))
                parts = []
                for h in range(len(match.sizes)):
                    part = gs.Variable(namer(node.name, f"head{h}"), dtype=src.dtype)
                    graph.nodes.append(gs.Node("Gather", namer(node.name, f"head{h}_gather"), {"axis": -2},
                                               inputs=[src, gs.Constant(namer(node.name, f"head{h}_index"),
                                                                        np.array(h, np.int64))], outputs=[part]))
                    parts.append(part)
                self._rewrite_input(graph, namer, node, match, parts)
            else:
                self._rewrite_input(graph, namer, node, *found)
            done.append(match)
        graph.cleanup().toposort()
        return done

    @staticmethod
    def _weight_slice(node: gs.Node, w: np.ndarray, cut: slice, output: bool) -> np.ndarray:
        cut_rows = trans_b(node) if output else not trans_b(node)  # W is [K, N], or [N, K] when transB=1
        return np.ascontiguousarray(w[cut] if cut_rows else w[:, cut])

    def _rewrite_output(self, graph, namer, node, match, targets, add) -> list[gs.Variable]:
        """One linear (+ bias Add) per segment, writing targets[i] (a new tensor where it is None)."""
        w = constant_values(node.inputs[1])
        x = node.inputs[0]
        dtype = (add or node).outputs[0].dtype
        lo, written = 0, []
        for i, (size, target) in enumerate(zip(match.sizes, targets)):
            hi, layer = lo + size, namer(node.name, f"seg{i}")
            if target is None:
                target = gs.Variable(namer(layer, "segment"), dtype=dtype)
            w_i = gs.Constant(namer(layer, "weight"), self._weight_slice(node, w, slice(lo, hi), output=True))
            inputs = [x, w_i]
            if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name:
                c = node.inputs[2]
                cv = constant_values(c)
                if cv.ndim >= 1 and cv.shape[-1] == sum(match.sizes):
                    inputs.append(gs.Constant(namer(layer, "bias"), np.ascontiguousarray(cv[..., lo:hi])))
                else:
                    inputs.append(c)  # broadcast scalar/[1] bias applies to every segment
            out = target if add is None else gs.Variable(namer(layer, "output"), dtype=target.dtype)
            graph.nodes.append(gs.Node(node.op, layer, dict(node.attrs), inputs=inputs, outputs=[out]))
            if add is not None:
                b = add.inputs[1] if add.inputs[0] is node.outputs[0] else add.inputs[0]
                bv = constant_values(b)  # a [1] bias broadcasts: every segment gets it whole
                b_i = b if bv.size == 1 else gs.Constant(namer(layer, "bias"), np.ascontiguousarray(bv[lo:hi]))
                graph.nodes.append(gs.Node("Add", namer(layer, "bias_add"), inputs=[out, b_i], outputs=[target]))
            written.append(target)
            lo = hi
        return written

    def _rewrite_input(self, graph, namer, node, match, parts):
        w = constant_values(node.inputs[1])
        y = node.outputs[0]
        partial = []
        lo = 0
        for i, (size, part) in enumerate(zip(match.sizes, parts)):
            hi, layer = lo + size, namer(node.name, f"seg{i}")
            # interleaved stack: merged channel j*n + i is part i's channel j, so part i reads rows i::n
            cut = slice(i, None, len(parts)) if match.via == "Stack-interleaved" else slice(lo, hi)
            w_i = gs.Constant(namer(layer, "weight"), self._weight_slice(node, w, cut, output=False))
            inputs = [part, w_i] + (list(node.inputs[2:]) if i == 0 else [])  # bias once
            out = gs.Variable(namer(layer, "output"), dtype=y.dtype)
            graph.nodes.append(gs.Node(node.op, layer, dict(node.attrs), inputs=inputs, outputs=[out]))
            partial.append(out)
            lo = hi
        node.outputs.clear()
        acc = partial[0]
        for i, p in enumerate(partial[1:], start=1):
            out = y if i == len(partial) - 1 else gs.Variable(namer(node.name, f"sum{i}"), dtype=y.dtype)
            graph.nodes.append(gs.Node("Add", namer(node.name, f"seg_sum{i}"), inputs=[acc, p], outputs=[out]))
            acc = out
