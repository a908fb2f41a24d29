"""Graph reading for SegLinear's checks: which linear is which, where a tensor is cut or glued.

Pure functions over an onnx-graphsurgeon graph (nothing here mutates it); the pass
`split_linear_by_segment` builds its pattern checks from them. The opt-in heads check
(`merged_heads`) is one of them whole: it only reads back from the linear's input.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from segquant_onnx.ir.linear import is_linear, k_in, n_out, trans_b  # noqa: F401 (the pass reads them from here)
from segquant_onnx.plan import SegmentMatch

CUTS = ("Split", "Slice")
ELEMENTWISE = ("Add", "Sub", "Mul", "Div")  # with a constant: looked through between Reshape and cut


def on_axis(axis: int, rank: int | None, want: int) -> bool:
    """Whether `axis` names axis `want` (negative: -1 is the last) of a tensor of rank `rank`."""
    return axis == want or (rank is not None and axis == rank + want)


def last_axis(axis: int, rank: int | None) -> bool:
    return on_axis(axis, rank, -1)


def bias_add(node: gs.Node) -> gs.Node | None:
    """The `Add(y, b)` right after a MatMul when b is a constant vector over the output channels."""
    y = node.outputs[0]
    if node.op != "MatMul" or len(y.outputs) != 1 or y.outputs[0].op != "Add":
        return None
    add = y.outputs[0]
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if isinstance(other, gs.Constant) and other.shape is not None and tuple(other.shape) in ((n_out(node),), (1,)):
        return add
    return None


def variable_bias(node: gs.Node) -> bool:
    return node.op == "Gemm" and len(node.inputs) > 2 and bool(node.inputs[2].name) \
        and not isinstance(node.inputs[2], gs.Constant)


def float_source(x: gs.Tensor) -> tuple[gs.Tensor, gs.Node | None]:
    """x, or the input of the float32 -> float32 Cast that produces it (a no-op); with its producer."""
    producer = x.inputs[0] if x.inputs else None
    if producer is not None and producer.op == "Cast" and producer.attrs.get("to") == 1 \
            and producer.inputs[0].dtype == np.float32:
        x = producer.inputs[0]
        producer = x.inputs[0] if x.inputs else None
    return x, producer


def const_ints(t) -> list[int] | None:
    return [int(v) for v in np.ravel(t.values)] if isinstance(t, gs.Constant) else None


def split_sizes(split: gs.Node, n: int) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1].name:
        return const_ints(split.inputs[1])
    if "split" in split.attrs:
        return list(split.attrs["split"])
    k = split.attrs.get("num_outputs", len(split.outputs))
    step = -(-n // k)
    return [min(step, n - i * step) for i in range(k)]


def slice_bounds(sl: gs.Node, n: int, rank: int | None, want: int, where: str) -> tuple[int, int] | str:
    starts, ends = const_ints(sl.inputs[1]), const_ints(sl.inputs[2])
    axes = const_ints(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3].name else None
    steps = const_ints(sl.inputs[4]) if len(sl.inputs) > 4 and sl.inputs[4].name else [1]
    if starts is None or ends is None or (len(sl.inputs) > 3 and axes is None):
        return "Slice bounds are not constant"
    if len(starts) != 1 or steps != [1]:
        return "Slice cuts more than one axis or has a step"
    if axes is None or not on_axis(axes[0], rank, want):
        return f"Slice is not on {where}"
    clamp = lambda v: max(0, min(n, v + n if v < 0 else v))
    return clamp(starts[0]), clamp(ends[0])


def partition(cuts: list[gs.Node], n: int, rank: int | None, want: int = -1, where: str = "the last axis"):
    """(sizes, via, cutting nodes in segment order) when `cuts` cut axis `want` (of extent n) into
    consecutive segments: one Split, or Slices that partition it; else the reason."""
    if cuts[0].op == "Split":
        split = cuts[0]
        if len(cuts) > 1:
            return "output feeds several Splits"
        if not on_axis(int(split.attrs.get("axis", 0)), rank, want):
            return f"Split is not on {where}"
        sizes = split_sizes(split, n)
        if sizes is None or sum(sizes) != n:
            return "Split sizes are not constant or do not cover the output"
        return tuple(sizes), "Split", [split]
    if len(cuts) < 2 or any(c.op != "Slice" for c in cuts):
        return "output is cut by a single Slice or by mixed ops"
    bounds = []
    for sl in cuts:
        b = slice_bounds(sl, n, rank, want, where)
        if isinstance(b, str):
            return b
        bounds.append((b, sl))
    bounds.sort(key=lambda item: item[0])
    edges = [b for b, _ in bounds]
    if edges[0][0] != 0 or edges[-1][1] != n or any(a[1] != b[0] for a, b in zip(edges, edges[1:])):
        return f"Slices {edges} do not partition the {n} {'output channels' if want == -1 else 'segments'}"
    return tuple(e - s for s, e in edges), "Slice", [sl for _, sl in bounds]


def splits_last_axis(y: gs.Tensor, reshape: gs.Node) -> bool:
    """Reshape([..., n*D] -> [..., n, D]) with the leading axes kept and n >= 2."""
    r = reshape.outputs[0]
    if y.shape is None or r.shape is None or len(r.shape) != len(y.shape) + 1:
        return False
    n, d = r.shape[-2], r.shape[-1]
    return (isinstance(n, int) and isinstance(d, int) and n >= 2 and y.shape[-1] == n * d
            and all(a == b for a, b in zip(y.shape[:-1], r.shape[:-2]) if isinstance(a, int) and isinstance(b, int)))


def keeps_layout(node: gs.Node, t: gs.Tensor) -> bool:
    """An elementwise op of t with a constant that broadcasts into t's shape (PixArt's `table + t`)."""
    if node.op not in ELEMENTWISE or len(node.inputs) != 2:
        return False
    other = node.inputs[1] if node.inputs[0] is t else node.inputs[0]
    out = node.outputs[0]
    return isinstance(other, gs.Constant) and out.shape is not None and list(out.shape) == list(t.shape)


def layout_users(t: gs.Tensor, depth: int = 0) -> list[tuple[gs.Tensor, list[gs.Node]]]:
    """(tensor, its consumers) for t and every tensor reached from it through `keeps_layout` ops,
    leaving those ops out: the consumers that must cut the segment axis."""
    found, direct = [], []
    for node in t.outputs:
        if depth < 3 and keeps_layout(node, t):
            found += layout_users(node.outputs[0], depth + 1)
        else:
            direct.append(node)
    if direct or not t.outputs:
        found.append((t, direct))
    return found


def merged_heads(node: gs.Node) -> tuple[SegmentMatch, gs.Tensor] | str | None:
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
            axes = const_ints(producer.inputs[3]) if len(producer.inputs) > 3 and producer.inputs[3].name else None
            rank = len(t.shape) if t.shape is not None else None
            if axes is None or rank is None or any(last_axis(a, rank) for a in axes):
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
