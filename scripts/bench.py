"""Benchmark segquant-onnx against other INT8 and FP8 post-training quantizers, side by side in one run.

Models: the bundled example DiT (random weights), the bundled *trained* demo DiT (``demo``; and
``demo-dynamo``: its saved checkpoint re-exported with the dynamo exporter, same calib/eval data), and tiny
SD3 / FLUX transformers exported with the TorchScript and the dynamo exporter, and a tiny PixArt-alpha
(dynamo; ``pixart-ts`` on request). (``sd3-ts`` is still accepted by ``--models`` but is not run by
default: it is the same model as ``example``.)

Methods: the FP32 reference; segquant-onnx as a feature matrix (naive INT8, each feature alone on top of
it, the shipped default, and the default plus SmoothQuant / outlier channels / a 40 dB target; then FP8
E4M3: naive, default, default plus attention Q/DQ, and the best recipe; every row is a ``QuantConfig``
with an fp32 rest passed to the library in a measured subprocess); ONNX Runtime ``quantize_static`` QDQ
with MinMax (and Entropy, dropped from the table when its scales are identical to MinMax's) over every
op type it quantizes by default, plus MinMax on MatMul/Gemm/Conv only; NVIDIA ModelOpt ONNX PTQ: INT8 with
max and entropy calibration (fp32 rest), INT8 max with its default fp16 rest, and FP8 max. For every
(model, method) it records the precision (format and rest), output SQNR against FP32 on a held-out eval
set (FP8 graphs in ONNX Runtime sessions without its integer Q/DQ fusions), the quantized / DualScale /
outlier FLOP shares from segquant-onnx's report, quantization wall time and peak RSS, output size, Q/DQ
nodes, quantized weights, check-trt violations and whether TensorRT-RTX builds an engine; then per-layer
SQNR with and without SegLinear, ONNX Runtime CPU latency (INT8 with an fp32 rest and FP32 only: not a
proxy for TensorRT speed) and the demo DiT's image PSNR/SSIM on the models that have them. It prints
Markdown tables and writes them, with the machine, versions and the command, to ``BENCHMARKS.md`` (full
numbers: ``<work-dir>/bench_results.json``).

Usage::

    python scripts/bench.py                       # everything (creates the ModelOpt venv on first use)
    python scripts/bench.py --quick               # bundled example only, segquant-onnx + ONNX Runtime, 1 run each
    python scripts/bench.py --skip-modelopt --models example,demo
    python scripts/bench.py --suite int4          # W4A16 / W4A8 against ModelOpt int4 (BENCHMARKS.md's "INT4 weights")

ModelOpt runs from its own virtualenv (``<work-dir>/venv-modelopt``) because it pins onnx and
onnxruntime-gpu versions; if it cannot be installed or fails on a model, that row says why.

The code is the ``benchkit`` package beside this file:

- ``cases.py``: the models and their calibration / eval data (bundled, or exported here);
- ``runners.py``: the methods (segquant-onnx's feature matrix, ORT, ModelOpt and its venv) and how each runs;
- ``workers.py``: what runs inside the measured subprocesses (``bench.py _<name>-worker ...``);
- ``launch.py``: one quantizer in its own process, with its wall time and peak RSS;
- ``measure.py``: the numbers of a row, and where the benchmark measures independently of the library, and why;
- ``sections.py``: per-layer SQNR, CPU latency, demo images;
- ``provenance.py``: machine, versions, source and data fingerprints;
- ``tables.py``, ``render.py``: the Markdown tables, BENCHMARKS.md and bench_results.json;
- ``results.py``: the rows and notes a run collects; ``driver.py``: the run itself and its flags;
- ``real.py``, ``int4.py``: the ``--suite real`` and ``--suite int4`` runs, each writing its own section.
"""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # benchkit/ lives beside this script
    sys.path.insert(0, _HERE)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from benchkit.workers import run_worker

    worker_rc = run_worker(argv)  # a measured subprocess: import no more than that worker needs
    if worker_rc is not None:
        return worker_rc
    from benchkit.driver import main as run

    return run(argv)


if __name__ == "__main__":
    raise SystemExit(main())
