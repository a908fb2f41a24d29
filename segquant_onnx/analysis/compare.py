"""Compare a quantized model with its floating-point original on held-out data, one feed at a time.

    compare_models(FP.onnx, QUANT.onnx, EVAL.npz) -> {"outputs": {name: errors}, "layers": [...]}

Per output: SQNR (dB), PSNR (dB), max |error| and cosine similarity, accumulated over every feed.
PSNR is 10 log10(range^2 / MSE) with range = max - min of the reference output over all feeds.
`per_layer` adds the linear layers' output SQNR (layer_error.per_layer_error, on the canonical form of
the float graph, as `quantize --per-layer` measures it). Memory holds one feed and its outputs, never
the data set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm import tqdm

from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.errors import UserError
from segquant_onnx.analysis.evaluate import OutputError
from segquant_onnx.ir.graph_io import export_model, load_model
from segquant_onnx.analysis.layer_error import per_layer_error
from segquant_onnx.ir.runtime import DEFAULT_PROVIDERS, check_providers, make_session, temporary_directory


@dataclass
class TensorError(OutputError):
    """OutputError plus what PSNR needs: the element count and the reference's range."""

    count: int = 0
    ref_min: float = math.inf
    ref_max: float = -math.inf

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        super().update(ref, test)
        self.count += ref.size
        if ref.size:
            self.ref_min = min(self.ref_min, float(ref.min()))
            self.ref_max = max(self.ref_max, float(ref.max()))

    @property
    def psnr(self) -> float:
        mse = self.noise / max(self.count, 1)
        if mse == 0:
            return math.inf
        span = self.ref_max - self.ref_min
        return 10 * math.log10(span**2 / mse) if span > 0 else -math.inf

    def to_dict(self) -> dict:
        return {**super().to_dict(), "psnr_db": round(self.psnr, 3)}


def _proto(path: Path) -> tuple[onnx.ModelProto, str, bool]:
    loaded = load_model(path)  # validates: exists, is ONNX, external data present (one-line errors)
    return onnx.load(str(path), load_external_data=False), str(path.parent), loaded.uses_external_data


def compare_models(fp_path, q_path, data, *, per_layer: bool = False, providers=DEFAULT_PROVIDERS,
                   batch_size: int | None = None, progress: bool = True) -> dict:
    """Output errors of `q_path` against `fp_path` on `data` (a .npz, a directory of them, or feeds)."""
    fp_path, q_path = Path(fp_path), Path(q_path)
    providers = check_providers(tuple(providers))
    fp_graph = load_model(fp_path).graph
    inputs = model_inputs(fp_graph)
    fp, fp_dir, fp_ext = _proto(fp_path)
    q, q_dir, q_ext = _proto(q_path)
    fp_out, q_out = [o.name for o in fp.graph.output], {o.name for o in q.graph.output}
    missing = [n for n in fp_out if n not in q_out]
    if missing:
        raise UserError(f"{q_path} has no output '{missing[0]}' of {fp_path}; compare a model with the "
                        "quantized model made from it.")
    q_inputs = {i.name for i in q.graph.input} - {t.name for t in q.graph.initializer}
    if q_inputs != {s.name for s in inputs}:
        raise UserError(f"{q_path} has inputs {sorted(q_inputs)}, {fp_path} has {sorted(s.name for s in inputs)}; "
                        "compare a model with the quantized model made from it.")
    feeds = open_calibration(data, inputs, batch_size, role="compare")
    if per_layer and feeds.num_feeds is None:
        raise UserError("--per-layer reads the data twice; pass it as a .npz file or a directory of them.")
    errors = {name: TensorError() for name in fp_out}
    layers = {}
    with temporary_directory() as tmp:
        fp_s = make_session(fp, fp_dir, providers, tmp)
        q_s = make_session(q, q_dir, providers, tmp)
        for feed in tqdm(feeds, total=feeds.num_feeds, desc="comparing", unit="feed",
                         disable=None if progress else True, leave=False):
            for name, ref, got in zip(fp_out, fp_s.run(fp_out, feed), q_s.run(fp_out, feed)):
                errors[name].update(ref, got)
        if per_layer:
            if fp_ext and q_ext and fp_dir != q_dir:
                raise UserError(f"--per-layer needs {fp_path} and {q_path} in one directory when both keep "
                                "external data; move them together.")
            canonical = export_model(canonicalize(fp_graph, str(fp_path)))
            layers = per_layer_error(canonical, q, feeds, source_dir=q_dir if q_ext else fp_dir,
                                     providers=providers, tmp_dir=tmp, progress=progress, total=feeds.num_feeds)
    return {"fp": str(fp_path), "quantized": str(q_path), "data": feeds.description,
            "outputs": {name: e.to_dict() for name, e in errors.items()},
            "layers": [{"layer": name, **e.to_dict()} for name, e in layers.items()]}
