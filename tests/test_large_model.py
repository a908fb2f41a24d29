"""The >2 GB path end to end, scaled down: the tiny SD3 export with every weight in external data, quantized with
the size thresholds lowered so the code that a multi-GB model takes runs on a few hundred kB.

What a 2 GB fp16 model (scripts/large_model.py) goes through, and how it is scaled down here:
- weights read lazily from the input's external data (every tensor external: `size_threshold=0`);
- weights the run makes (SegLinear slices, quantized weights, the fp16 rest) spilled to the scratch folder
  (weights.SPILL_BYTES 1 MiB -> 2 kB), the input's data file hard-linked beside them, sessions reading from there;
- protobuf's limit (EXTERNAL_DATA_THRESHOLD 1.8 GB -> 64 kB): graphs over it go to ONNX Runtime as files;
- the output written one tensor at a time into its external data file.
The output must be byte-identical to the run with the real thresholds, load, run in ONNX Runtime, and parse and
build with TensorRT-RTX.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from segquant_onnx import QuantConfig, quantize
from segquant_onnx.ir import finalize, graph_io, runtime, weights
from segquant_onnx import pipeline


def _external_copy(src, folder):
    folder.mkdir()
    path = folder / "sd3.onnx"
    onnx.save_model(onnx.load(str(src)), str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="sd3.onnx.data", size_threshold=0)
    return path


def _scaled_down(monkeypatch) -> list[int]:
    """Lower the thresholds; the bytes each spill wrote."""
    for module in (graph_io, runtime, finalize, pipeline):
        monkeypatch.setattr(module, "EXTERNAL_DATA_THRESHOLD", 64 << 10)
    monkeypatch.setattr(weights, "SPILL_BYTES", 2 << 10)
    spilled, spill = [], weights.WeightStore.spill

    def counting(self, graph):
        spilled.append(spill(self, graph))
        return spilled[-1]

    monkeypatch.setattr(weights.WeightStore, "spill", counting)
    return spilled


def test_large_model_path_scaled_down(tiny_export, tmp_path, monkeypatch):
    src, script = tiny_export("sd3", False)
    model = _external_copy(src, tmp_path / "in")
    calib = tmp_path / "calib.npz"
    np.savez(calib, **script.make_calibration("sd3", 8, seed=1))
    feeds = script.make_calibration("sd3", 2, seed=2)

    (tmp_path / "plain").mkdir()
    plain = quantize(model, calib, QuantConfig(), output=tmp_path / "plain" / "q.onnx", progress=False)
    spilled = _scaled_down(monkeypatch)
    out = tmp_path / "large" / "q.onnx"
    out.parent.mkdir()
    result = quantize(model, calib, QuantConfig(), output=out, progress=False, eval_data=calib)
    assert sum(spilled) > 0 and len([s for s in spilled if s]) >= 3  # segments, quantized weights, fp16 rest

    # the same bytes as the run with the real thresholds: where weights wait during the run changes nothing
    for name in ("q.onnx", "q.onnx.data"):
        assert (out.parent / name).read_bytes() == (plain.output_path.parent / name).read_bytes(), name
    onnx.checker.check_model(str(out))
    proto = onnx.load(str(out), load_external_data=False)
    inline = [t.name for t in proto.graph.initializer if len(t.raw_data) >= 1024]
    assert not inline  # every weight sits in the external data file
    assert sorted(p.name for p in out.parent.iterdir()) == ["q.onnx", "q.onnx.data"]
    assert result.report["output_error"]  # the evaluation ran (float, then quantized session)

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    float_session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    for i in range(2):
        feed = {k: v[i:i + 1] for k, v in feeds.items()}
        (got,), (ref,) = session.run(None, feed), float_session.run(None, feed)
        sqnr = 10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum())
        assert sqnr > 20, sqnr

    pytest.importorskip("tensorrt_rtx_bindings")
    from segquant_onnx.tensorrt.build import build_engine

    built = build_engine(out)
    assert built.parsed and built.built, built.errors
