"""Subcommands for TensorRT readiness: `check-trt`, `build-trt`, `compare` (registered by cli.py).

    segquant-onnx check-trt MODEL.onnx                    static check of TensorRT's Q/DQ rules (exit 1 if any)
    segquant-onnx build-trt MODEL.onnx [--shapes ...]     NVIDIA's parser + builder (TensorRT-RTX, no GPU needed)
    segquant-onnx compare FP.onnx QUANT.onnx --data EVAL  output SQNR/PSNR/max error/cosine per output

`build-trt` uses the full `tensorrt` package instead when it is installed and a GPU is present
(strongly typed build; `--benchmark --baseline FP.onnx` times the engine against an fp16 engine of
the original). That path (segquant_onnx.tensorrt.gpu) cannot run on the development machines, which
have no GPU: it is guarded by imports and has not been run.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx

from segquant_onnx.cli.argtypes import positive_int
from segquant_onnx.errors import UserError

EXIT_OK, EXIT_FOUND = 0, 1

log = logging.getLogger(__name__)


def _model_path(text: str) -> Path:
    from segquant_onnx.ir.graph_io import load_model

    load_model(text)  # one-line errors: missing file, not ONNX, external data missing
    return Path(text)


def _cmd_check(args) -> int:
    from segquant_onnx.tensorrt.check import RULES, check_tensorrt

    if args.rules:
        for rule, (summary, source) in RULES.items():
            print(f"{rule}: {summary}\n    source: {source}")
        return EXIT_OK
    if not args.model:
        raise UserError("check-trt needs MODEL.onnx (or --rules to list the rules).")
    path = _model_path(args.model)
    model = onnx.load(str(path), load_external_data=False)
    found = check_tensorrt(model, str(path.parent))
    for violation in found:
        print(violation)
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    if found:
        print(f"{len(found)} violation(s) of TensorRT's explicit-quantization rules in {path} "
              f"({len({v.rule for v in found})} rules; `check-trt --rules` gives each rule's source)")
        return EXIT_FOUND
    print(f"{path}: no violations of TensorRT's explicit-quantization rules ({qdq} Q/DQ nodes checked)")
    return EXIT_OK


def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """`name:1x4x16x16,other:1x16x32` -> {"name": (1, 4, 16, 16), "other": (1, 16, 32)}."""
    shapes = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, sep, dims = item.rpartition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            shape = ()
        if not sep or not name or not shape:
            raise UserError(f"--shapes item '{item}' is not NAME:DIMS; write e.g. hidden_states:1x4x16x16.")
        shapes[name] = shape
    return shapes


def _first_feed(model: Path, data, batch_size: int | None) -> dict[str, np.ndarray]:
    from segquant_onnx.calib.data import model_inputs, open_calibration
    from segquant_onnx.ir.graph_io import load_model

    return next(iter(open_calibration(data, model_inputs(load_model(model).graph), batch_size)))


def _dynamic_dims_as_one(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    """What trtexec does without shapes: every dynamic dimension 1, said once, naming the inputs and dims."""
    initializers = {t.name for t in graph.initializer}
    shapes, said = {}, []
    for value in graph.input:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        fixed = [d.HasField("dim_value") and d.dim_value >= 0 for d in dims]
        if all(fixed):
            continue
        shapes[value.name] = tuple(d.dim_value if f else 1 for d, f in zip(dims, fixed))
        named = ", ".join(str(d.dim_value) if f else d.dim_param or "?" for d, f in zip(dims, fixed))
        said.append(f"{value.name} ({named}) -> {'x'.join(map(str, shapes[value.name]))}")
    if said:
        log.warning("no --shapes, --calib or calibration shapes recorded in the model: dynamic dimensions set "
                    "to 1, as trtexec does: %s", "; ".join(said))
    return shapes


def _default_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Without --shapes or --calib: the first calibration feed's shapes that `quantize` recorded in the
    model's metadata, else every dynamic dimension 1."""
    from segquant_onnx.ir.finalize import CALIBRATION_SHAPES_KEY

    model = onnx.load(str(path), load_external_data=False)
    recorded = {p.key: p.value for p in model.metadata_props}.get(CALIBRATION_SHAPES_KEY)
    if recorded:
        log.info("shapes from the calibration data recorded in %s: %s", path, recorded)
        return parse_shapes(recorded)
    return _dynamic_dims_as_one(model.graph)


def _cmd_build(args) -> int:
    from segquant_onnx.tensorrt.build import build_engine
    from segquant_onnx.tensorrt.gpu import full_tensorrt

    path = _model_path(args.model)
    feed = _first_feed(path, args.calib, args.batch_size) if args.calib else None
    shapes = (parse_shapes(args.shapes) if args.shapes else
              {k: tuple(v.shape) for k, v in feed.items()} if feed else _default_shapes(path))
    if args.benchmark and not args.baseline:
        raise UserError("--benchmark needs --baseline FP.onnx, the floating-point model to time against.")
    trt = full_tensorrt()
    if trt is not None:
        return _build_gpu(trt, args, path, shapes, feed)
    if args.benchmark:
        raise UserError("--benchmark needs the full TensorRT package and a GPU; without them build-trt only "
                        "parses and builds with TensorRT-RTX on the CPU.")
    try:
        result = build_engine(path, shapes)
    except ImportError:
        raise UserError("build-trt needs TensorRT-RTX (or TensorRT with a GPU); install it with "
                        "pip install 'segquant-onnx[tensorrt]'.") from None
    except ValueError as exc:
        raise UserError(f"{str(exc).rstrip('.')}; give --shapes NAME:DIMS,... or --calib DATA.") from None
    print(f"TensorRT-RTX (CPU build, no GPU used): {path}")
    print(f"parsed: {'yes' if result.parsed else 'no'} ({result.num_layers} network layers)")
    if result.built:
        print(f"built: yes, engine {result.engine_bytes / 1e6:.2f} MB")
        return EXIT_OK
    print("built: no" if result.parsed else "built: no (the parser refused the graph)")
    for error in result.errors:  # verbatim: node index, name and operator
        print("  " + "\n  ".join(error.splitlines()))
    return EXIT_FOUND


def _build_gpu(trt, args, path: Path, shapes, feed) -> int:
    """Full TensorRT on a GPU (untested here: see segquant_onnx.tensorrt.gpu)."""
    from segquant_onnx.tensorrt.gpu import build, time_engine

    print(f"TensorRT {trt.__version__} (GPU, strongly typed): {path}")
    try:
        quant = build(trt, path, shapes)
        base = build(trt, _model_path(args.baseline), shapes, fp16_baseline=True) if args.benchmark else None
    except ValueError as exc:
        raise UserError(f"{str(exc).rstrip('.')}; give --shapes NAME:DIMS,... or --calib DATA.") from None
    for label, b in (("model", quant), ("baseline", base)):
        if b is None:
            continue
        print(f"{label}: " + (f"built in {b.seconds:.1f} s, engine {len(b.engine) / 1e6:.2f} MB" if b.engine else
                              "not built") + (f" ({b.note})" if b.note else ""))
        for error in b.errors:
            print("  " + "\n  ".join(error.splitlines()))
    if quant.engine is None or (base is not None and base.engine is None):
        return EXIT_FOUND
    if base is not None:
        if feed is None:
            raise UserError("--benchmark needs --calib DATA for the inputs to time with.")
        ms_q, ms_b = time_engine(quant.engine, feed, args.runs), time_engine(base.engine, feed, args.runs)
        print(f"median latency: model {ms_q:.3f} ms, fp16 baseline {ms_b:.3f} ms, speed-up {ms_b / ms_q:.2f}x")
    return EXIT_OK


def _cmd_compare(args) -> int:
    from segquant_onnx.analysis.compare import compare_models
    from segquant_onnx.ir.graph_io import model_files
    from segquant_onnx.ir.outputs import Output, check_outputs
    from segquant_onnx.report.render import _table, write_json

    if not args.data:
        raise UserError("compare needs --data EVAL.npz (held-out inputs, one array per model input).")
    if args.json:
        check_outputs([Output("--json", Path(args.json), ".json")],
                      [*model_files(args.fp), *model_files(args.quantized), args.data], args.force)
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip())
    result = compare_models(_model_path(args.fp), _model_path(args.quantized), args.data, per_layer=args.per_layer,
                            providers=providers, batch_size=args.batch_size, progress=not args.quiet)
    rows = [[name, f"{e['sqnr_db']:.2f}", f"{e['psnr_db']:.2f}", f"{e['max_abs_error']:.4g}", f"{e['cosine']:.6f}"]
            for name, e in result["outputs"].items()]
    print(f"{result['quantized']} vs {result['fp']} on {result['data']}:")
    print(_table(["output", "SQNR dB", "PSNR dB", "max |err|", "cosine"], rows, "lrrrr"))
    if result["layers"]:
        rows = [[e["layer"], f"{e['sqnr_db']:.2f}", f"{e['max_abs_error']:.4g}", f"{e['cosine']:.6f}"]
                for e in result["layers"]]
        print(f"\nper linear layer ({len(rows)}; errors accumulate along the graph):")
        print(_table(["layer", "SQNR dB", "max |err|", "cosine"], rows, "lrrr"))
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return EXIT_OK


def add_parser(sub) -> None:
    c = sub.add_parser("check-trt", help="check a Q/DQ model against TensorRT's explicit-quantization rules",
                       description="Static check of TensorRT's Q/DQ rules; prints each violation with the rule "
                                   "and node. Exit 1 if any, 0 if none, 2 for bad input.")
    c.add_argument("model", nargs="?", metavar="MODEL")
    c.add_argument("--rules", action="store_true", help="list the rules and their sources")
    c.set_defaults(func=_cmd_check)

    b = sub.add_parser("build-trt", help="parse and build an engine with NVIDIA's parser (no GPU needed)",
                       description="Parse MODEL and build an engine with TensorRT-RTX on the CPU (or with "
                                   "TensorRT when it and a GPU are present). Exit 1 if it fails to parse or build.")
    b.add_argument("model", metavar="MODEL")
    b.add_argument("--shapes", metavar="LIST", help="shapes of dynamic inputs: name:1x4x16x16,name2:1x16x32 (default: "
                   "--calib's first feed, else the calibration shapes quantize recorded in MODEL, else every "
                   "dynamic dimension 1, with a warning)")
    b.add_argument("--calib", metavar="DATA", help="take dynamic input shapes (and --benchmark inputs) from this data")
    b.add_argument("--batch-size", type=positive_int, help="batch for --calib when the model's batch is dynamic")
    b.add_argument("--benchmark", action="store_true",
                   help="with TensorRT and a GPU: time the engine against an fp16 engine of --baseline")
    b.add_argument("--baseline", metavar="FP.onnx", help="the floating-point model for --benchmark")
    b.add_argument("--runs", type=positive_int, default=50, help="timed runs for --benchmark (default: %(default)s)")
    b.set_defaults(func=_cmd_build)

    m = sub.add_parser("compare", help="output error of a quantized model against the float model",
                       description="SQNR, PSNR, max |error| and cosine per output of QUANT against FP on DATA "
                                   "(streamed one feed at a time).")
    m.add_argument("fp", metavar="FP.onnx")
    m.add_argument("quantized", metavar="QUANT.onnx")
    m.add_argument("--data", metavar="DATA", help=".npz (one array per input, axis 0 = samples) or a directory")
    m.add_argument("--per-layer", action="store_true", help="also each linear layer's output SQNR")
    m.add_argument("--batch-size", type=positive_int, help="batch when the model's batch is dynamic (default: 8)")
    m.add_argument("--providers", default="CPUExecutionProvider", help="ONNX Runtime providers (default: %(default)s)")
    m.add_argument("--json", metavar="PATH", help="also write the numbers as JSON (.json)")
    m.add_argument("--force", action="store_true", help="replace the --json file if it exists")
    m.set_defaults(func=_cmd_compare)
