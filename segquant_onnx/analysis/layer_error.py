"""Per-layer error: how far each linear layer's output in the quantized graph is from the float graph.

A layer is a linear node (MatMul/Gemm/Conv with a constant weight) of the canonical float graph. Its
output is compared where it still exists in the quantized graph; where a rewrite renamed it
(SegLinear splits, bias folded into a segment), the nearest downstream tensors that exist in both
graphs stand for it (e.g. the chunk outputs of a split AdaLN linear). Errors accumulate along the
graph, as they do at inference: this finds where the output error comes from, it does not isolate a
layer. Everything is reduced batch by batch.
"""

from __future__ import annotations

import onnx
from tqdm import tqdm

from segquant_onnx.calib.calibrate import with_tensor_outputs
from segquant_onnx.analysis.evaluate import OutputError, compare_outputs
from segquant_onnx.ir.linear import CONV_OPS
from segquant_onnx.ir.runtime import make_session

_MAX_HOPS = 3


def _layer_tensors(fp: onnx.ModelProto, q: onnx.ModelProto) -> dict[str, list[str]]:
    """Linear node name -> tensors to compare (present in both graphs)."""
    weights = {t.name for t in fp.graph.initializer}
    in_q = {o for n in q.graph.node for o in n.output} | {i.name for i in q.graph.input}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in fp.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    layers = {}
    for node in fp.graph.node:
        if node.op_type not in ("MatMul", "Gemm", *CONV_OPS) or len(node.input) < 2 or node.input[1] not in weights:
            continue
        frontier, found = [node.output[0]], []
        for _ in range(_MAX_HOPS):
            nxt = []
            for t in frontier:
                if t in in_q:
                    found.append(t)
                else:
                    nxt += [o for c in consumers.get(t, []) for o in c.output]
            if not nxt:
                break
            frontier = nxt
        if found:
            layers[node.name] = list(dict.fromkeys(found))
    return layers


def per_layer_error(fp: onnx.ModelProto, q: onnx.ModelProto, feeds, *, source_dir=None, providers,
                    tmp_dir=None, progress: bool = True, total: int | None = None) -> dict[str, OutputError]:
    """OutputError per linear layer of `fp` (ordered as in the graph) over every feed."""
    layers = _layer_tensors(fp, q)
    names = tuple(dict.fromkeys(t for ts in layers.values() for t in ts))
    fp_s = make_session(with_tensor_outputs(fp, names), source_dir, providers, tmp_dir)
    q_s = make_session(with_tensor_outputs(q, names), source_dir, providers, tmp_dir)
    available = {o.name for o in fp_s.get_outputs()} & {o.name for o in q_s.get_outputs()}
    fetch = [n for n in names if n in available]
    errors = {layer: OutputError() for layer in layers}
    with tqdm(feeds, total=total, desc="per-layer error", unit="batch", disable=None if progress else True,
              leave=False) as bar:
        for feed in bar:
            ref = dict(zip(fetch, fp_s.run(fetch, feed)))
            got = dict(zip(fetch, q_s.run(fetch, feed)))
            for layer, tensors in layers.items():
                for t in tensors:
                    if t in ref:
                        errors[layer].update(ref[t], got[t])
    return errors


def model_error(fp: onnx.ModelProto, q: onnx.ModelProto, feeds, *, per_layer: bool, source_dir=None, providers,
                tmp_dir=None, progress: bool = True) -> tuple[dict, dict]:
    """Output error of `q` against `fp` on `feeds` (an evaluation data set: read once per measurement),
    and with `per_layer` each linear layer's; ({}, {}) without feeds."""
    if feeds is None:
        return {}, {}
    where = dict(source_dir=source_dir, providers=providers, tmp_dir=tmp_dir)
    errors = compare_outputs(lambda: make_session(fp, **where), lambda: make_session(q, **where), feeds,
                             progress=progress, total=feeds.num_feeds)
    layers = per_layer_error(fp, q, feeds, **where, progress=progress, total=feeds.num_feeds) if per_layer else {}
    return errors, layers
