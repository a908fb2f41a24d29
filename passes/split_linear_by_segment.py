"""SegLinear: split a linear by the semantic segments its output or input is cut into.

    output: Split(MatMul(X, W) [+ b], sizes)        -> MatMul(X, W[:, seg_i]) [+ b[seg_i]]   for each i
            Slice_i(Gemm(X, W, C), a_i, b_i), ...   -> Gemm(X, W[seg_i], C[seg_i])           for each i
    input:  MatMul(Concat([A, B], -1), W) [+ b]     -> Add(MatMul(A, W[:ka]), MatMul(B, W[ka:])) [+ b]
            Gemm(Concat([A, B], -1), W, C)          -> Add(Gemm(A, W_a, C), Gemm(B, W_b))

Each segment then becomes a linear site of its own, so quantization gives every input segment its own
activation scale (and, with SmoothQuant, every output segment its own smoothing and scale). The
rewrite is exact in float (up to summation order), so it runs before calibration: calibration then
observes exactly the tensors the final sites quantize.

heads (opt-in, `head_segments`): MatMul(Reshape(X[..., H, D] -> [..., H*D]), W)
            -> sum_h MatMul(Gather(X, h, axis=-2), W[h*D:(h+1)*D])
            One scale per attention head for the output projection's input; H GEMMs with K = D, so
            off by default (TensorRT runs one K = H*D INT8 GEMM faster than H narrow ones).

Preconditions: canonicalized graph (constant chunk bounds, shapes inferred); the weight is a 2-D
constant; the cut is on the last axis. Output cuts need the linear's output (after an optional
bias Add) to feed only the Split or the Slices, and the Slices to partition it. A float->float Cast
between Concat and linear is looked through. Segment sizes may be unequal.
Runs first in the rewrite order, before DualScale and Q/DQ insertion.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.graph_io import constant_values
from segquant_onnx.naming import Namer
from segquant_onnx.plan import DeclinedSite, SegmentMatch

_INT64_MAX = np.iinfo(np.int64).max


def _is_linear(node: gs.Node) -> bool:
    return (node.op in ("MatMul", "Gemm") and len(node.inputs) >= 2 and isinstance(node.inputs[1], gs.Constant)
            and not isinstance(node.inputs[0], gs.Constant) and len(node.inputs[1].shape) == 2)


def _n_out(node: gs.Node) -> int:
    w = node.inputs[1].shape
    return w[0] if node.op == "Gemm" and node.attrs.get("transB", 0) else w[1]


def _last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _bias_add(node: gs.Node) -> gs.Node | None:
    """The `Add(y, b)` right after a MatMul when b is a constant vector over the output channels."""
    y = node.outputs[0]
    if node.op != "MatMul" or len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if isinstance(other, gs.Constant) and other.shape is not None and tuple(other.shape) in ((_n_out(node),), (1,)):
        return add
    return None


def _const_ints(t) -> list[int] | None:
    return [int(v) for v in np.ravel(t.values)] if isinstance(t, gs.Constant) else None


def _split_sizes(split: gs.Node, n: int) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1].name:
        return _const_ints(split.inputs[1])
    if "split" in split.attrs:
        return list(split.attrs["split"])
    k = split.attrs.get("num_outputs", len(split.outputs))
    step = -(-n // k)
    return [min(step, n - i * step) for i in range(k)]


def _slice_bounds(sl: gs.Node, n: int, rank: int | None) -> tuple[int, int] | str:
    starts, ends = _const_ints(sl.inputs[1]), _const_ints(sl.inputs[2])
    axes = _const_ints(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3].name else None
    steps = _const_ints(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4].name else [1]
    if starts is None or ends is None or (len(sl.inputs) > 3 and axes is None):
        return "Slice bounds are not constant"
    if len(starts) != 1 or steps != [1]:
        return "Slice cuts more than one axis or has a step"
    if axes is None or not _last_axis(axes[0], rank):
        return "Slice is not on the last axis"
    clamp = lambda v: max(0, min(n, v + n if v < 0 else v))
    return clamp(starts[0]), clamp(ends[0])


class SplitLinearBySegment:
    name = "split_linear_by_segment"

    def __init__(self, output_segments: bool = True, input_segments: bool = True, head_segments: bool = False):
        self.output_segments, self.input_segments = output_segments, input_segments
        self.head_segments = head_segments

    # -- match + check --------------------------------------------------------------------------
    def check_output(self, node: gs.Node) -> tuple[SegmentMatch, list[gs.Node], gs.Node | None] | str | None:
        """(match, cutting nodes in segment order, bias Add) or a reason, or None if no cut follows."""
        add = _bias_add(node)
        y = (add or node).outputs[0]
        cuts = [c for c in y.outputs if c.op in ("Split", "Slice")]
        if not cuts:
            return None
        if len(cuts) != len(y.outputs):
            others = sorted({c.op for c in y.outputs if c not in cuts})
            return f"output also feeds {', '.join(others)}"
        if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name \
                and not isinstance(node.inputs[2], gs.Constant):
            return "Gemm bias is not a constant"
        n, rank = _n_out(node), len(y.shape) if y.shape is not None else None
        if cuts[0].op == "Split":
            split = cuts[0]
            if len(cuts) > 1:
                return "output feeds several Splits"
            if not _last_axis(int(split.attrs.get("axis", 0)), rank):
                return "Split is not on the last axis"
            sizes = _split_sizes(split, n)
            if sizes is None or sum(sizes) != n:
                return "Split sizes are not constant or do not cover the output"
            return SegmentMatch(node.name, "output", tuple(sizes), "Split"), [split], add
        if len(cuts) < 2 or any(c.op != "Slice" for c in cuts):
            return "output is cut by a single Slice or by mixed ops"
        bounds = []
        for sl in cuts:
            b = _slice_bounds(sl, n, rank)
            if isinstance(b, str):
                return b
            bounds.append((b, sl))
        bounds.sort(key=lambda item: item[0])
        edges = [b for b, _ in bounds]
        if edges[0][0] != 0 or edges[-1][1] != n or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
            return f"Slices {edges} do not partition the {n} output channels"
        sizes = tuple(e - s for s, e in edges)
        return SegmentMatch(node.name, "output", sizes, "Slice"), [sl for _, sl in bounds], add

    def check_input(self, node: gs.Node) -> tuple[SegmentMatch, list[gs.Tensor]] | str | None:
        x = node.inputs[0]
        producer = x.inputs[0] if x.inputs else None
        if producer is not None and producer.op == "Cast" and producer.attrs.get("to") == 1 \
                and producer.inputs[0].dtype == np.float32:
            x, producer = producer.inputs[0], (producer.inputs[0].inputs[0] if producer.inputs[0].inputs else None)
        if producer is None or producer.op != "Concat":
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1 reads its input transposed"
        rank = len(x.shape) if x.shape is not None else None
        if not _last_axis(int(producer.attrs["axis"]), rank):
            return "Concat is not on the last axis"
        parts = list(producer.inputs)
        sizes = [p.shape[-1] if p.shape else None for p in parts]
        if any(not isinstance(s, int) for s in sizes):
            return "Concat input widths are unknown"
        k = node.inputs[1].shape[1 if node.op == "Gemm" and node.attrs.get("transB", 0) else 0]
        if sum(sizes) != k or len(parts) < 2:
            return "Concat widths do not match the weight"
        return SegmentMatch(node.name, "input", tuple(sizes), "Concat"), parts

    def check_heads(self, node: gs.Node) -> tuple[SegmentMatch, gs.Tensor] | str | None:
        """Heads merged before the linear: Reshape([..., H, D] -> [..., H*D]), possibly followed by
        Slices over other axes (SD3's joint attention splits image and text tokens) -> linear."""
        x = node.inputs[0]
        if x.shape is None or not x.shape:
            return None
        t = x
        for _ in range(4):  # look back through float Casts and Slices that keep the last axis
            producer = t.inputs[0] if t.inputs else None
            if producer is None:
                return None
            if producer.op == "Cast" and producer.attrs.get("to") == 1:
                t = producer.inputs[0]
                continue
            if producer.op == "Slice":
                axes = _const_ints(producer.inputs[3]) if len(producer.inputs) > 3 and producer.inputs[3].name else None
                rank = len(t.shape) if t.shape is not None else None
                if axes is None or rank is None or any(_last_axis(a, rank) for a in axes):
                    return None
                t = producer.inputs[0]
                continue
            break
        if producer.op != "Reshape":
            return None
        src = producer.inputs[0]
        if src.shape is None or len(src.shape) < 3 or t.shape is None or len(src.shape) != len(t.shape) + 1:
            return None
        h, d = src.shape[-2], src.shape[-1]
        if not (isinstance(h, int) and isinstance(d, int)) or h < 2 or t.shape[-1] != h * d or x.shape[-1] != h * d:
            return None
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            return "Gemm with transA=1 reads its input transposed"
        return SegmentMatch(node.name, "input", (d,) * h, "Reshape"), x

    def detect(self, graph: gs.Graph):
        """Matches with the nodes/tensors the rewrite needs, and declined near-matches."""
        matches, declined = [], []
        for node in graph.nodes:
            if not _is_linear(node):
                continue
            for enabled, check in ((self.output_segments, self.check_output), (self.input_segments, self.check_input),
                                   (self.head_segments, self.check_heads)):
                result = check(node) if enabled else None
                if isinstance(result, str):
                    declined.append(DeclinedSite(node.name, node.op, f"SegLinear: {result}"))
                elif result is not None:
                    matches.append((node, result))
                    break
        return matches, declined

    # -- rewrite --------------------------------------------------------------------------------
    def rewrite(self, graph: gs.Graph, matches) -> list[SegmentMatch]:
        namer = Namer(graph)
        done = []
        for node, found in matches:
            match = found[0]
            if match.kind == "output":
                self._rewrite_output(graph, namer, node, *found)
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
    def _weight_slice(node: gs.Node, w: np.ndarray, lo: int, hi: int, output: bool) -> np.ndarray:
        trans_b = node.op == "Gemm" and node.attrs.get("transB", 0)
        cut_rows = trans_b if output else not trans_b  # W is [K, N], or [N, K] when transB=1
        return np.ascontiguousarray(w[lo:hi] if cut_rows else w[:, lo:hi])

    def _rewrite_output(self, graph, namer, node, match, cuts, add):
        w = constant_values(node.inputs[1])
        x = node.inputs[0]
        targets = cuts[0].outputs if match.via == "Split" else [c.outputs[0] for c in cuts]
        lo = 0
        for i, (size, target) in enumerate(zip(match.sizes, targets)):
            hi, layer = lo + size, namer(node.name, f"seg{i}")
            w_i = gs.Constant(namer(layer, "weight"), self._weight_slice(node, w, lo, hi, output=True))
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
            lo = hi
        for cut in cuts:
            cut.outputs.clear()

    def _rewrite_input(self, graph, namer, node, match, parts):
        w = constant_values(node.inputs[1])
        y = node.outputs[0]
        partial = []
        lo = 0
        for i, (size, part) in enumerate(zip(match.sizes, parts)):
            hi, layer = lo + size, namer(node.name, f"seg{i}")
            w_i = gs.Constant(namer(layer, "weight"), self._weight_slice(node, w, lo, hi, output=False))
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
