"""The quantization plan: pure, JSON-serializable data produced by the passes' detection step.

A plan says *what* will be quantized and *which tensors* calibration must observe; it holds no
numbers computed from data and no graph objects, so `inspect --json` can show it as it is.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LinearSite:
    """A weighted op whose activation and weight inputs get Q/DQ.

    `weight_axis` is the axis of the weight's per-channel scales as the op consumes it: its output channels
    for MatMul [K, N] -> 1, Gemm transB=1 -> 0, transB=0 -> 1, Conv -> 0; for ConvTranspose [Cin, Cout, ...]
    -> 0, its input channels (TensorRT scales a deconvolution's weight on axis 0 only). `flops` counts multiply-adds x 2 for the static
    shapes known after shape inference (unknown dims count as 1).
    """

    name: str
    op: str
    activation: str
    weight: str
    weight_shape: tuple[int, ...]
    weight_axis: int
    flops: int
    activation_input_index: int = 0
    weight_input_index: int = 1
    # whether the activation's last axis is the input-channel axis K (not for Conv/ConvTranspose, or Gemm transA=1):
    # per-channel statistics, row samples, smoothing and outlier channels need it
    channels_last: bool = True
    # a group-1 2-D Conv's window (kh, kw, stride h, w, pads top, left, bottom, right, dilation h, w): its input rows
    # for GPTQ are the input patches this window reads (sample_key); () for every other site
    patches: tuple[int, ...] = ()


def sample_key(site: LinearSite) -> str:
    """The name calibration samples the site's input rows under: its activation, or for a Conv with `patches` the
    activation and the window (rows of C x kh x kw patches, calib.observers.RowSample.update_patches)."""
    return f"{site.activation}{PATCHES}{','.join(map(str, site.patches))}" if site.patches else site.activation


PATCHES = "|patches:"  # no ONNX tensor name from an exporter holds it


def sample_source(key: str) -> tuple[str, tuple[int, ...]]:
    """(tensor, window) of a sample_key; the window is () for plain rows."""
    tensor, _, window = key.partition(PATCHES)
    return tensor, tuple(int(v) for v in window.split(",")) if window else ()


@dataclass(frozen=True)
class DeclinedSite:
    """A node that looked like a linear site but is not quantized, with the reason."""

    name: str
    op: str
    reason: str


@dataclass(frozen=True)
class SegmentMatch:
    """A linear whose output is cut (`output`) or whose input is glued (`input`) into segments.

    `sizes` are the segment widths along the last axis (output: of N; input: of K), in order;
    `via` names the ops that expressed the cut: `Split`, `Slice`, `Reshape-Split`/`Reshape-Slice`
    (cut on the n axis of a [..., n, D] Reshape of the output), `Concat`, `Reshape` (heads), `Stack`
    (torch.stack(dim=-2) merged by a Reshape: contiguous) and `Stack-interleaved` (stack(dim=-1):
    segment i holds K channels i, i + n, i + 2n, ...).
    """

    linear: str
    kind: str
    sizes: tuple[int, ...]
    via: str


DUAL_KINDS = ("silu", "swish", "quick_gelu", "gelu_erf", "gelu_tanh", "gelu_op")


@dataclass(frozen=True)
class DualSite:
    """A linear site whose activation input is a SiLU/GELU output.

    `site` is the LinearSite (node) name; `activation` the activation's output tensor (the site
    reads it directly or through look-through ops: same values, maybe another layout); `kind` one
    of DUAL_KINDS.
    """

    site: str
    activation: str
    kind: str

    def __post_init__(self):
        if self.kind not in DUAL_KINDS:
            raise ValueError(f"DualSite {self.site}: kind {self.kind!r} is not one of {DUAL_KINDS}")



@dataclass(frozen=True)
class AttentionSite:
    """An activation x activation MatMul (Q @ K^T, softmax @ V) whose two inputs get per-tensor Q/DQ
    (`--quantize-attention`); `inputs` are its input tensors, in order."""

    name: str
    inputs: tuple[str, str]


@dataclass(frozen=True)
class QuantPlan:
    sites: tuple[LinearSite, ...]
    declined: tuple[DeclinedSite, ...] = ()
    segments: tuple[SegmentMatch, ...] = ()
    dual: tuple[DualSite, ...] = ()
    notes: tuple[str, ...] = field(default=())
    attention: tuple[AttentionSite, ...] = ()
    flattened: tuple[str, ...] = ()  # linears laid out as 2-D MatMuls for W4A8 (passes/flatten_linears_to_2d.py)

    @property
    def observed_tensors(self) -> tuple[str, ...]:
        """Tensors calibration must observe, each once, in plan order."""
        attention = (t for a in self.attention for t in a.inputs)
        return tuple(dict.fromkeys([*(s.activation for s in self.sites), *attention]))

    @property
    def total_flops(self) -> int:
        return sum(s.flops for s in self.sites)

    def nothing_to_quantize(self, model: str) -> str:
        """One sentence for a plan without sites: what was found, and what to do."""
        reasons = Counter(d.reason for d in self.declined if d.op in ("MatMul", "Gemm", "Conv", "ConvTranspose"))
        found = ("no MatMul, Gemm, Conv or ConvTranspose with a constant weight" if not reasons else
                 f"{sum(reasons.values())} linear node(s), none quantizable (most common reason: "
                 f"{reasons.most_common(1)[0][0]})")
        return (f"{model} has nothing to quantize: {found}; `segquant-onnx inspect --explain` lists every node, "
                "and --allow-unquantized writes the model unchanged anyway.")

    def to_dict(self) -> dict:
        return {
            "sites": [asdict(s) for s in self.sites],
            "declined": [asdict(d) for d in self.declined],
            "segments": [asdict(m) for m in self.segments],
            "dual": [asdict(d) for d in self.dual],
            "notes": list(self.notes),
            "attention": [asdict(a) for a in self.attention],
            "flattened": list(self.flattened),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> "QuantPlan":
        sites = tuple(
            LinearSite(**{**s, "weight_shape": tuple(s["weight_shape"]), "patches": tuple(s.get("patches", ()))})
            for s in data["sites"]
        )
        return cls(
            sites=sites,
            declined=tuple(DeclinedSite(**d) for d in data.get("declined", ())),
            segments=tuple(SegmentMatch(**{**m, "sizes": tuple(m["sizes"])}) for m in data.get("segments", ())),
            dual=tuple(DualSite(**d) for d in data.get("dual", ())),
            notes=tuple(data.get("notes", ())),
            attention=tuple(AttentionSite(a["name"], tuple(a["inputs"])) for a in data.get("attention", ())),
            flattened=tuple(data.get("flattened", ())),
        )
