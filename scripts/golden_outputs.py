"""Golden outputs: sha256 of the quantized graphs written for a fixed set of models and configs.

A restructuring proves it changes nothing by writing byte-identical models (CONVENTIONS.md, habit 15):

    python scripts/golden_outputs.py record     # write tests/golden_outputs.json
    python scripts/golden_outputs.py check      # recompute; one line per case, `same` or `DIFFERENT`; exit 1 if any differ

Models: the bundled example (the trained demo DiT) and the bundled random-weight `example_dit`, each with
its own calibration file, and the tiny SD3, FLUX and PixArt transformers exported here by
scripts/export_example.py (TorchScript exporter; SD3 also with the dynamo exporter), each with the
smallest calibration set the pass tests use (4 samples, seed 1). The dynamo export's per-node stack
traces (absolute paths, line numbers) are removed before hashing and quantizing (`strip_stack_traces`). Configs: the default `QuantConfig()` and
SmoothQuant auto + outlier channels auto + target 40 dB. Each case records the sha256 of its input model
(an export that is not byte-stable shows as `input DIFFERENT`, not as a quantizer change) and of every
file `quantize` writes (the .onnx and, if any, its .onnx.data).

Float results of ONNX Runtime's CPU kernels can differ between instruction sets (and so the calibrated
scales), and the exports depend on torch/diffusers: the JSON holds a fingerprint of the machine and the
versions, and `check` (like tests/test_golden_outputs.py) only compares on a machine that matches it.

Everything is written to a temporary folder; only `record` writes into the repository.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
GOLDEN_PATH = REPO_ROOT / "tests" / "golden_outputs.json"

#: name -> the QuantConfig keyword arguments (the default config, and issue 13's search recipe)
CONFIGS: dict[str, dict] = {
    "default": {},
    "sq-auto_outliers-auto_target-40": {"smoothquant": {"mode": "auto"}, "outliers": {"mode": "auto"},
                                        "fallback": {"target_sqnr": 40.0}},
}

#: bundled models: name -> (model file, calibration file) in segquant_onnx/data
BUNDLED = {
    "demo_dit": ("demo_dit.onnx", "demo_dit_calib.npz"),
    "example_dit": ("example_dit.onnx", "example_dit_calib.npz"),
}

#: tiny exports: name -> (model kind, dynamo)
EXPORTS = {
    "sd3_tiny_torchscript": ("sd3", False),
    "flux_tiny_torchscript": ("flux", False),
    "pixart_tiny_torchscript": ("pixart", False),
    "sd3_tiny_dynamo": ("sd3", True),
}
EXPORT_SEED, CALIB_SAMPLES, CALIB_SEED = 0, 4, 1

MODELS = (*BUNDLED, *EXPORTS)
CASES = [(m, c) for m in MODELS for c in CONFIGS]


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def case_id(model: str, config: str) -> str:
    return f"{model}/{config}"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):  # x86 / ARM
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_fingerprint() -> dict[str, str]:
    """What the hashes depend on besides the code: library versions and the CPU's instruction sets."""
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript
    import torch

    return {
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "onnxscript": onnxscript.__version__,
        "cpu_flags_sha256": hashlib.sha256(" ".join(sorted(_cpu_flags().split())).encode()).hexdigest()[:16],
    }


def fingerprint_mismatch(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """One 'key: recorded -> current' line per difference (empty when the machine matches)."""
    return [f"{k}: {recorded.get(k)} -> {current.get(k)}" for k in sorted(set(recorded) | set(current))
            if recorded.get(k) != current.get(k)]


def export_script():
    spec = importlib.util.spec_from_file_location("export_example", REPO_ROOT / "scripts" / "export_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"


def _nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                yield from _nodes(sub)


def strip_stack_traces(path: Path) -> None:
    """Drop the dynamo exporter's per-node `pkg.torch.onnx.stack_trace` metadata, in place.

    It holds absolute source paths and line numbers (`File "/work/main/scripts/export_example.py",
    line 184`, site-packages paths), so the export's bytes would depend on where the repository is
    checked out and on any edit to export_example.py. The quantizer drops node metadata anyway: the
    quantized bytes are the same with or without it.
    """
    import onnx

    model = onnx.load(str(path))
    for node in _nodes(model.graph):
        _drop_key(node)
    for function in model.functions:
        for node in function.node:
            _drop_key(node)
    onnx.save(model, str(path))


def _drop_key(node) -> None:
    kept = [p for p in node.metadata_props if p.key != STACK_TRACE_KEY]
    if len(kept) != len(node.metadata_props):
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


@dataclass(frozen=True)
class Input:
    model: Path
    calib: Path
    model_sha256: str
    seconds: float


def prepare_model(name: str, workdir: Path, exported: Path | None = None) -> Input:
    """The model file and calibration data of `name` (bundled: read in place; tiny: exported into `workdir`,
    or copied there from `exported`, an export of the same kind, exporter and seed made elsewhere)."""
    start = time.perf_counter()
    if name in BUNDLED:
        from segquant_onnx.examples import example_path

        model, calib = (example_path(f) for f in BUNDLED[name])
    else:
        kind, dynamo = EXPORTS[name]
        script = export_script()
        folder = Path(workdir) / name
        folder.mkdir(parents=True, exist_ok=True)
        model, calib = folder / f"{name}.onnx", folder / "calib.npz"
        if exported is not None:
            shutil.copyfile(exported, model)
        else:
            with contextlib.redirect_stdout(sys.stderr):  # the dynamo exporter prints its progress
                getattr(script, f"export_{kind}_tiny")(model, dynamo=dynamo, seed=EXPORT_SEED)
        if dynamo:
            strip_stack_traces(model)
        np.savez(calib, **script.make_calibration(kind, CALIB_SAMPLES, seed=CALIB_SEED))
    return Input(model, calib, sha256_file(model), time.perf_counter() - start)


def quantize_case(inp: Input, config: str, workdir: Path) -> tuple[dict[str, str], float]:
    """{file name: sha256} of what `quantize` writes for `inp` under `config`, and the seconds it took."""
    from segquant_onnx import QuantConfig, quantize

    out_dir = Path(tempfile.mkdtemp(prefix=f"{config}.", dir=workdir))
    out = out_dir / "quantized.onnx"
    start = time.perf_counter()
    quantize(inp.model, inp.calib, QuantConfig(**CONFIGS[config]), output=out, evaluate=False, progress=False)
    seconds = time.perf_counter() - start
    return {p.name: sha256_file(p) for p in sorted(out_dir.iterdir())}, seconds


def compute(workdir: Path, log=print) -> dict:
    """Every case's input and output hashes, with the fingerprint, as the JSON `record` writes (no
    timings in it: recording twice on one machine gives the same file)."""
    cases = {}
    for model in MODELS:
        inp = prepare_model(model, workdir)
        log(f"{model + ' (input)':50s} {inp.seconds:6.2f} s")
        for config in CONFIGS:
            outputs, seconds = quantize_case(inp, config, workdir)
            cases[case_id(model, config)] = {"input_sha256": inp.model_sha256, "outputs": outputs}
            log(f"{case_id(model, config):50s} {seconds:6.2f} s")
    return {"fingerprint": machine_fingerprint(), "cases": cases}


def compare_case(recorded: dict | None, got: dict) -> str:
    """`same`, or `DIFFERENT (...)` naming what differs (the input model, or the output files)."""
    if recorded is None:
        return "DIFFERENT (not recorded)"
    if recorded["input_sha256"] != got["input_sha256"]:
        return "DIFFERENT (input model: the export is not byte-identical)"
    if recorded["outputs"] != got["outputs"]:
        names = sorted(n for n in set(recorded["outputs"]) | set(got["outputs"])
                       if recorded["outputs"].get(n) != got["outputs"].get(n))
        return f"DIFFERENT (output: {', '.join(names)})"
    return "same"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("record", "check"))
    parser.add_argument("--golden", type=Path, default=GOLDEN_PATH, help=f"default {GOLDEN_PATH}")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)

    if args.action == "check":
        recorded = json.loads(args.golden.read_text())
        if diff := fingerprint_mismatch(recorded["fingerprint"], machine_fingerprint()):
            print("warning: this machine differs from the recorded one, hashes may differ for that reason: "
                  + "; ".join(diff), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="segquant-golden-") as tmp:
        result = compute(Path(tmp), log=lambda line: print(line, file=sys.stderr))
    if args.action == "record":
        args.golden.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(args.golden)
        return 0
    verdicts = {cid: compare_case(recorded["cases"].get(cid), got) for cid, got in result["cases"].items()}
    for cid in sorted(set(recorded["cases"]) - set(verdicts)):
        verdicts[cid] = "DIFFERENT (recorded, not computed)"
    for cid, verdict in verdicts.items():
        print(f"{cid:50s} {verdict}")
    return 0 if all(v == "same" for v in verdicts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
