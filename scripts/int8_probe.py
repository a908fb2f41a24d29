"""How far INT8 can go on a model: output SQNR of fake-quantized variants that no deployable static recipe beats.

For the linear sites segquant-onnx finds (the same FindLinearSites as `quantize`: depthwise Convs, for one, are
left alone), on the eval feeds, against the float model (the benchmark's metric: 10 log10(sum ref^2 / sum (ref -
q)^2) over every output and feed):

- ``weights``: each weight rounded to nearest on its per-output-channel INT8 grid, activations float: what the
  weights alone cost;
- ``static``: plus every site's activation on one per-tensor INT8 scale, its abs-max over the calibration feeds
  (naive W8A8; segquant-onnx's recipes move from here);
- ``dynamic``: the activation's scale from its own abs-max in each feed (a runtime reduction: not what TensorRT
  builds from a Q/DQ graph), the bound for any static per-tensor scale that must fit feeds of different ranges;
- ``dynamic-channel``: a scale per activation channel per feed (Conv: axis 1; MatMul/Gemm: the last axis), the
  bound for any per-tensor scheme that could even out channel ranges (SmoothQuant, outlier channels, DualScale).

When ``weights`` is low, weight rounding (GPTQ) or float sites help; when ``static`` is far below ``dynamic``, the
activation ranges differ from feed to feed (e.g. a diffusion model's noise level); when ``dynamic-channel`` is low
too, no per-tensor INT8 activation scheme gets there, and FP8 (whose step grows with the value) may.

    python scripts/int8_probe.py bench_out/real/terrain/model.onnx bench_out/real/terrain/calib.npz \\
        bench_out/real/terrain/eval.npz

Every variant runs in ONNX Runtime CPU with graph optimizations off (Q/DQ computed as written). Calibration and
eval .npz files hold one array per model input, samples on axis 0, each fed as a batch of one.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit.cases import iter_samples  # noqa: E402

from segquant_onnx.config import QuantConfig  # noqa: E402
from segquant_onnx.ir.canonicalize import canonicalize  # noqa: E402
from segquant_onnx.ir.graph_io import export_model, load_model  # noqa: E402
from segquant_onnx.ir.linear import is_conv  # noqa: E402
from segquant_onnx.pipeline import build_plan  # noqa: E402

MODES = ("weights", "static", "dynamic", "dynamic-channel")
QMAX = 127.0


def _session(model) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _graph(path: Path):
    graph = canonicalize(load_model(path).graph, str(path))
    return graph, build_plan(graph, QuantConfig(dualscale={"mode": "off"}, seglinear={"output": False,
                                                                                       "input": False}))


def _round_weights(graph: gs.Graph, plan) -> None:
    """Each site's weight on its per-output-channel INT8 grid (rounded to nearest), in place."""
    tensors = graph.tensors()
    for site in plan.sites:
        w = tensors[site.weight]
        values = np.asarray(w.values, np.float32)
        axes = tuple(a for a in range(values.ndim) if a != site.weight_axis)
        scale = np.abs(values).max(axis=axes, keepdims=True) / QMAX
        scale[scale == 0] = 1.0
        w.values = (np.clip(np.round(values / scale), -QMAX, QMAX) * scale).astype(w.values.dtype)


def _activation_amax(path: Path, plan, calib: Path) -> dict[str, float]:
    """abs-max of every site's activation over the calibration feeds (the float model)."""
    graph, _ = _graph(path)
    tensors = graph.tensors()
    names = sorted({s.activation for s in plan.sites})
    graph.outputs = [tensors[n] for n in names]
    session = _session(export_model(graph))
    amax = dict.fromkeys(names, 0.0)
    for feed in iter_samples(calib):
        for name, value in zip(names, session.run(names, feed)):
            amax[name] = max(amax[name], float(np.abs(value).max()))
    return amax


def _fake_quant_activations(graph: gs.Graph, plan, mode: str, amax: dict[str, float]) -> None:
    """Q/DQ (int8, symmetric) on every site's activation input: a constant scale (`static`) or x / m -> Q/DQ at
    1/127 -> * m with m the feed's own abs-max, per tensor or per channel (`dynamic`, `dynamic-channel`)."""
    tensors = graph.tensors()
    zero = gs.Constant("probe_zero", np.array(0, np.int8))
    unit = gs.Constant("probe_unit", np.array(1.0 / QMAX, np.float32))
    tiny = gs.Constant("probe_tiny", np.array(1e-30, np.float32))
    for i, site in enumerate(plan.sites):
        x = tensors[site.activation]
        node = next(n for n in x.outputs if n.name == site.name)
        out = gs.Variable(f"probe_{i}_xq", np.float32)
        if mode == "static":
            scale = gs.Constant(f"probe_{i}_scale", np.array(max(amax[x.name], 1e-30) / QMAX, np.float32))
            q = gs.Variable(f"probe_{i}_q", np.int8)
            graph.nodes += [gs.Node("QuantizeLinear", inputs=[x, scale, zero], outputs=[q]),
                            gs.Node("DequantizeLinear", inputs=[q, scale, zero], outputs=[out])]
        else:
            rank = len(x.shape) if x.shape is not None else None
            if mode == "dynamic-channel" and rank is None:
                raise SystemExit(f"{site.activation}: unknown rank; dynamic-channel needs shapes")
            keep = (1 if is_conv(site) else rank - 1) if mode == "dynamic-channel" else None
            axes = None if keep is None else [a for a in range(rank) if a != keep]
            a, m, c, xn, dq = (gs.Variable(f"probe_{i}_{s}", np.float32) for s in ("abs", "max", "c", "xn", "dq"))
            q = gs.Variable(f"probe_{i}_q", np.int8)
            attrs, inputs = {"keepdims": 1}, [a]
            if axes is not None and graph.opset >= 18:  # axes became an input in opset 18
                inputs.append(gs.Constant(f"probe_{i}_axes", np.array(axes, np.int64)))
            elif axes is not None:
                attrs["axes"] = axes
            reduce = gs.Node("ReduceMax", inputs=inputs, outputs=[m], attrs=attrs)
            graph.nodes += [gs.Node("Abs", inputs=[x], outputs=[a]), reduce,
                            gs.Node("Max", inputs=[m, tiny], outputs=[c]),
                            gs.Node("Div", inputs=[x, c], outputs=[xn]),
                            gs.Node("QuantizeLinear", inputs=[xn, unit, zero], outputs=[q]),
                            gs.Node("DequantizeLinear", inputs=[q, unit, zero], outputs=[dq]),
                            gs.Node("Mul", inputs=[dq, c], outputs=[out])]
        node.inputs[site.activation_input_index] = out
    graph.cleanup().toposort()


def probe(path: Path, calib: Path, eval_path: Path, modes=MODES) -> dict[str, float]:
    """Output SQNR (dB) of each mode on the eval feeds."""
    reference = _session(onnx.load(str(path)))
    names = [o.name for o in reference.get_outputs()]
    refs = [reference.run(names, feed) for feed in iter_samples(eval_path)]
    _, plan = _graph(path)
    amax = _activation_amax(path, plan, calib) if "static" in modes else {}
    result = {}
    for mode in modes:
        graph, plan = _graph(path)
        _round_weights(graph, plan)
        if mode != "weights":
            _fake_quant_activations(graph, plan, mode, amax)
        session = _session(export_model(graph))
        signal = noise = 0.0
        for feed, ref in zip(iter_samples(eval_path), refs):
            for r, got in zip(ref, session.run(names, feed)):
                r64 = r.astype(np.float64)
                signal += float(np.sum(r64 ** 2))
                noise += float(np.sum((r64 - got.astype(np.float64)) ** 2))
        result[mode] = math.inf if noise == 0 else 10 * math.log10(signal / noise)
        print(f"{path}: {mode:16s} {result[mode]:7.2f} dB ({len(plan.sites)} sites)", flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("calib", type=Path, help="calibration .npz (samples on axis 0)")
    parser.add_argument("eval", type=Path, help="eval .npz (samples on axis 0), disjoint from calib")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    args = parser.parse_args(argv)
    modes = tuple(m for m in args.modes.split(",") if m)
    bad = [m for m in modes if m not in MODES]
    for p in (args.model, args.calib, args.eval):
        if not p.is_file():
            parser.exit(2, f"int8_probe: {p} does not exist; give an existing file.\n")
    if bad:
        parser.exit(2, f"int8_probe: --modes {','.join(bad)} unknown; choose from {', '.join(MODES)}.\n")
    probe(args.model, args.calib, args.eval, modes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
