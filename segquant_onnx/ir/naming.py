"""One helper for every generated tensor and node name, so names are unique and readable.

Names follow `<layer>/<part>` (e.g. `blocks.0/attn/to_q/input_q`), which Netron and Polygraphy
show as a path.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


class Namer:
    """Hands out names that do not clash with any node or tensor already in the graph."""

    def __init__(self, graph: gs.Graph):
        self._taken = {n.name for n in graph.nodes} | set(graph.tensors().keys())

    @classmethod
    def for_proto(cls, graph: onnx.GraphProto) -> Namer:
        """The same for a graph held as protobuf (session-only rewrites that never go through graphsurgeon)."""
        namer = cls.__new__(cls)
        namer._taken = ({n.name for n in graph.node} | {t for n in graph.node for t in [*n.input, *n.output]}
                        | {t.name for t in graph.initializer} | {v.name for v in [*graph.input, *graph.output]})
        return namer

    def __call__(self, layer: str, part: str) -> str:
        base = f"{layer.rstrip('/')}/{part}"
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name
