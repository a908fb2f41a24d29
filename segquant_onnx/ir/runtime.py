"""ONNX Runtime sessions for graphs held in memory (calibration and evaluation only)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper
import onnx.numpy_helper
import onnxruntime as ort

from segquant_onnx.errors import UserError
from segquant_onnx.ir.fp8_emulation import emulate_fp8_activations
from segquant_onnx.ir.graph_io import EXTERNAL_DATA_THRESHOLD, external_base, save_model, write_external
from segquant_onnx.ir.weights import SPILL_PREFIX, WeightStore

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)
# 16-bit float weights above this many bytes run at ONNX Runtime's basic optimization level (make_session)
HALF_WEIGHTS_BASIC_BYTES = 256 << 20


def third_party_verbose() -> bool:
    """Whether the user asked for details (-v: INFO on the "segquant_onnx" logger): only then may ONNX
    Runtime and the tools around it (constant folding, shape inference) print their own warnings, which
    come by the dozen on some exports (UnsqueezeElimination on BERT) and say nothing actionable."""
    return logging.getLogger("segquant_onnx").isEnabledFor(logging.INFO)


def quiet_onnxruntime() -> int:
    """Set ONNX Runtime's default logger to warnings with -v, errors otherwise, and return that severity.

    Sessions we do not create (onnx-graphsurgeon's constant folding) log through the default logger, as
    do some optimizer messages of our own sessions; there is no getter, so it is set, not restored."""
    severity = 2 if third_party_verbose() else 3
    ort.set_default_logger_severity(severity)
    return severity


# providers that run on one GPU, picked by their `device_id` option
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")


def check_providers(providers: tuple[str, ...]) -> tuple[str, ...]:
    available = ort.get_available_providers()
    for p in providers:
        if p not in available:
            hint = " (GPU providers need onnxruntime-gpu: pip install onnxruntime-gpu)" if p in GPU_PROVIDERS else ""
            raise UserError(f"--providers: ONNX Runtime has no '{p}' here{hint}; available: {', '.join(available)}.")
    return tuple(providers)


def gpu_count() -> int:
    """GPUs this process may use: CUDA_VISIBLE_DEVICES when set, else the devices `nvidia-smi -L` lists
    (0 when neither says: then every worker asks for device 0)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def provider_options(providers: tuple[str, ...], worker: int = 0, gpus: int = 0) -> list[dict[str, str]]:
    """ONNX Runtime's per-provider options: worker `worker` runs on GPU `worker % gpus` (one GPU per worker
    while there are enough; device 0 when the count is unknown), other providers take no options."""
    device = worker % gpus if gpus > 0 else 0
    return [{"device_id": str(device)} if p in GPU_PROVIDERS else {} for p in providers]


def _float_typed(t: onnx.TensorProto, base_dir) -> onnx.TensorProto:
    values = onnx.numpy_helper.to_array(t, base_dir=external_base(base_dir, t)).astype(np.float32)
    return onnx.numpy_helper.from_array(values, t.name)


def float32_shadow(model: onnx.ModelProto, base_dir=None) -> onnx.ModelProto:  # graph_io.BaseDir
    """`model` with every bfloat16 tensor, value type, Cast target and Constant made float32: what ONNX
    Runtime's CPU (which has no bfloat16 MatMul, Conv or most other kernels) runs in place of a bfloat16
    graph. Exact for the stored values and the Q/DQ rounding; arithmetic between ops is float32 instead of
    bfloat16, so errors measured on it are a little optimistic for a bfloat16 engine. Main graph only."""
    bf16 = onnx.TensorProto.BFLOAT16
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for i, t in enumerate(g.initializer):
        if t.data_type == bf16:
            g.initializer[i].CopyFrom(_float_typed(t, base_dir))
    for v in [*g.input, *g.output, *g.value_info]:
        if v.type.tensor_type.elem_type == bf16:
            v.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    for node in g.node:
        for a in node.attribute:
            if a.name == "to" and a.i == bf16:
                a.i = onnx.TensorProto.FLOAT
            elif a.type == onnx.AttributeProto.TENSOR and a.t.data_type == bf16:
                a.t.CopyFrom(_float_typed(a.t, base_dir))
    return m


def has_bfloat16(model: onnx.ModelProto) -> bool:
    bf16 = onnx.TensorProto.BFLOAT16
    g = model.graph
    return (any(t.data_type == bf16 for t in g.initializer)
            or any(v.type.tensor_type.elem_type == bf16 for v in [*g.input, *g.output, *g.value_info])
            or any(a.name == "to" and a.i == bf16 for n in g.node for a in n.attribute))


def has_fp8_qdq(model: onnx.ModelProto) -> bool:
    """Whether any QuantizeLinear/DequantizeLinear of `model` works in a float8 type (by its zero point)."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2 and inits.get(n.input[2]) in fp8
               for n in model.graph.node)


def _stored_bytes(t: onnx.TensorProto) -> int:
    """An initializer's bytes, inline or external (16-bit values stored as int32_data count 2 bytes each)."""
    if t.data_location == onnx.TensorProto.EXTERNAL:
        return int(onnx.external_data_helper.ExternalDataInfo(t).length or 0)
    return len(t.raw_data) or 2 * len(t.int32_data)


def half_weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of float16/bfloat16 initializers of `model`'s main graph, inline or external."""
    return sum(_stored_bytes(t) for t in model.graph.initializer
               if t.data_type in (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16))


def half_dequantized_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the constant (quantized) inputs of `model`'s DequantizeLinears to float16/bfloat16 (by their
    scale's type): the weights a 16-bit Q/DQ graph dequantizes."""
    inits = {t.name: t for t in model.graph.initializer}
    half = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return sum(_stored_bytes(inits[n.input[0]]) for n in model.graph.node
               if n.op_type == "DequantizeLinear" and len(n.input) > 1 and n.input[0] in inits
               and n.input[1] in inits and inits[n.input[1]].data_type in half)


@dataclass(frozen=True)
class SessionSource:
    """A model as ONNX Runtime loads it, with the options `make_session` picks for it; picklable, so a
    worker process opens the same session: the serialized model (`model`), or a file written once
    (`path`, a model over protobuf's limit), its external-data tensors in `source_dir`."""

    model: bytes | None
    path: str | None
    source_dir: str | None
    shadow: bool  # a bfloat16 graph's float32 shadow: run as written
    fp8: bool  # FP8 Q/DQ: unfused, basic optimizations
    half_basic: bool = False  # over HALF_WEIGHTS_BASIC_BYTES of float16/bfloat16 weights: basic level
    # over HALF_WEIGHTS_BASIC_BYTES of weights dequantized to float16/bfloat16: folded once, basic level
    half_qdq: bool = False
    # an analysis graph whose weights' DequantizeLinear read nothing but constants and feed no quantized kernel
    # (analysis.gates): dequantized once, at session creation
    fold_dequantize: bool = False
    # run nodes in ONNX Runtime's priority-based order, which follows the node list, not its default order (which runs
    # side branches late): a graph that reduces every tensor right after its producer (calib.observe_ranges) keeps
    # every tensor alive until the end in the default order (measured, ORT 1.31: 100 chained 64 MiB ops, each with a
    # ReduceMax beside it, peak 6.5 GB against 269 MB)
    priority_order: bool = False

    def open(self, providers=DEFAULT_PROVIDERS, options: list[dict[str, str]] | None = None,
             threads: int = 0) -> ort.InferenceSession:
        """A session on `providers` with their `options` (provider_options); `threads`: intra-op threads
        (0: ONNX Runtime's default, one per core)."""
        opts = ort.SessionOptions()
        opts.log_severity_level = quiet_onnxruntime()
        opts.intra_op_num_threads = threads
        # ORT's CPU optimizer fuses an INT4 DequantizeLinear + MatMul into MatMulNBits, by default at accuracy level
        # 4: it rounds the float activation to int8 as well (measured, ORT 1.31: a W4A16 fp32 MatMul off by 0.7% of
        # its output). Level 1 computes in float32, what the graph says
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        # memory: no arena (it keeps the largest intermediate buffers of every run for the session's lifetime) and
        # no memory pattern (a plan allocated up front for the whole graph); the results are the same (measured on
        # a 2 GiB float16 DiT: 5.4 -> 4.7 GiB peak RSS for one session and three runs)
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        if self.half_basic and not self.shadow:
            # ORT's CPU has no float16 GEMM: it inserts Casts to float32, and from the extended level on folds
            # those of constant weights into float32 copies, twice the weights' size (4.7 -> 3.4 GiB peak on that
            # DiT, 19 s -> 0.4 s to create the session; each run casts the weights it needs instead)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.shadow:
            # the shadow's Casts from (former) bfloat16 to float32 cast float32 to itself; ORT's basic-level
            # cast elimination then drops ones whose output we fetch and refuses its own graph (measured on a
            # TorchScript bfloat16 FLUX export): run the shadow as written
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if self.half_qdq and not self.shadow:
            # ORT's CPU has no 16-bit QDQ kernels: it runs each weight's DequantizeLinear on every run, then casts
            # to float32 (a 2 GiB float16 DiT: 13 s per feed quantized against 3 s float). Without its QDQ
            # transformers, constant folding dequantizes the constant weights once, at session creation, and
            # each run computes what it did before (measured, ORT 1.31, 12 float16 INT8 MatMuls of 1536 x 1536:
            # the same bytes out at the basic level, 4x faster at 96 tokens; at the extended level the folded
            # graph's outputs differ, so: basic). Large models only: a small graph's runs cost little, and the
            # basic level leaves ORT's fused float16 LayerNorm out (the demo DiT's SQNR moves by 0.1 dB)
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        if self.priority_order:
            opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        if self.fold_dequantize and not (self.fp8 or (self.half_qdq and not self.shadow)):  # set below then
            # ORT keeps every DequantizeLinear out of constant folding (its QDQ transformers want them), so a gated
            # graph (analysis.gates: W + g * (DQ(Wq) - W)) dequantized and subtracted every weight on every run;
            # without those transformers both fold once. Measured, ORT 1.31, the real ViT's gated graph: 0.17 ->
            # 0.14 s per feed, the same bytes out at every gate setting tried (none, one, all)
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
        if self.fp8:
            # ORT's CPU optimizer fuses Q/DQ + Gemm/MatMul/Conv into its QGemm/QLinear* kernels, which accept
            # 8-bit integers only: with FP8 the fused graph fails its type check. And its extended-level
            # rewrites change what an FP8 graph computes (measured, ORT 1.31: a DualScale site off by 0.27 of a
            # unit output against onnx's reference evaluator, 16.8 instead of 25.5 dB; basic level and below
            # match it exactly). So FP8 graphs run unfused at the basic level: what the graph says.
            opts.add_session_config_entry("session.disable_quant_qdq", "1")
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options = options or provider_options(tuple(providers))
        try:
            if self.model is not None:  # external tensors stay where they are
                if self.source_dir:
                    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                  self.source_dir)
                session = ort.InferenceSession(self.model, opts, providers=list(providers), provider_options=options)
            else:
                session = ort.InferenceSession(self.path, opts, providers=list(providers), provider_options=options)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidProtobuf,
                ort.capi.onnxruntime_pybind11_state.InvalidArgument) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"ONNX Runtime cannot load the model ({first}); check that it runs in "
                            "onnxruntime as exported.") from None
        # ONNX Runtime falls back to the CPU, with a logged error, when a GPU provider cannot start
        missing = [p for p in providers if p in GPU_PROVIDERS and p not in session.get_providers()]
        if missing:
            raise UserError(f"--providers {missing[0]}: ONNX Runtime could not start it here (no usable GPU, or its "
                            "CUDA/cuDNN/TensorRT libraries are missing); install them or drop it from --providers.")
        return session


def session_source(model: onnx.ModelProto, source_dir: str | None, tmp_dir: str | None = None,
                   shadowed: bool = False, fold_dequantize: bool = False,
                   priority_order: bool = False) -> SessionSource:
    """What `make_session` opens for `model` (its external tensors in the folder `source_dir`; `shadowed`: `model`
    is already the float32 shadow of a bfloat16 model): small models go to ONNX Runtime as bytes; ones over
    protobuf's limit are written to `tmp_dir` (a temporary directory the caller owns) with external data first.
    `fold_dequantize`, `priority_order`: see SessionSource."""
    shadow = shadowed or has_bfloat16(model)
    if shadow and not shadowed:
        model = float32_shadow(model, source_dir)
    fp8 = has_fp8_qdq(model) and not shadow
    if fp8:
        model, emulated = emulate_fp8_activations(model)  # the same values, faster (ir.fp8_emulation)
        if emulated:
            log.debug("FP8 activation Q/DQ computed in float32 in this session: %d", emulated)
    half = half_weight_bytes(model) > HALF_WEIGHTS_BASIC_BYTES
    half_qdq = half_dequantized_bytes(model) > HALF_WEIGHTS_BASIC_BYTES
    if model.ByteSize() <= EXTERNAL_DATA_THRESHOLD:
        return SessionSource(model.SerializeToString(), None, source_dir, shadow, fp8, half, half_qdq, fold_dequantize,
                             priority_order)
    if tmp_dir is None:
        raise ValueError("a model whose inline tensors exceed 1.8 GB needs tmp_dir")
    path = Path(tmp_dir) / f"session_{len(os.listdir(tmp_dir))}.onnx"
    if source_dir is not None and Path(source_dir) == Path(tmp_dir):
        # its external tensors are in tmp_dir already (weights.WeightStore): only the inline ones move out, into
        # a file named as the store's spills are (the caller's model now refers to it, and the store reads it)
        write_external(model, Path(tmp_dir), f"{SPILL_PREFIX}{path.stem}.data", None, keep_external=True)
        onnx.save_model(model, str(path))
    else:
        save_model(model, path, source_dir=source_dir, external=True)
    return SessionSource(None, str(path), source_dir, shadow, fp8, half, half_qdq, fold_dequantize, priority_order)


def make_session(model: onnx.ModelProto, source_dir, providers=DEFAULT_PROVIDERS,
                 tmp_dir: str | None = None, shadowed: bool = False,
                 fold_dequantize: bool = False, priority_order: bool = False) -> ort.InferenceSession:
    """A session for `model`, whose external-data tensors (if any) live in `source_dir` (a folder, or the run's
    weights.WeightStore; see session_source)."""
    if isinstance(source_dir, WeightStore):
        shadowed = has_bfloat16(model)
        if shadowed:  # read before the input's files are linked for the session: onnx refuses linked files
            model = float32_shadow(model, source_dir.locate)
        with source_dir.session_folder() as folder:
            return make_session(model, folder, providers, source_dir.tmp_dir, shadowed, fold_dequantize, priority_order)
    return session_source(model, source_dir, tmp_dir, shadowed, fold_dequantize, priority_order).open(providers)


def run_all(session, names: list[str] | None, feeds: list[dict], wrap=None) -> list[list[np.ndarray]]:
    """`session.run(names, feed)` for every feed, in order: one feed at a time through `wrap(feeds)` (a progress
    bar), or all at once where the session spreads them over workers (analysis.held_back.PooledSession)."""
    if hasattr(session, "run_many"):
        outputs = session.run_many(names, feeds)
        if wrap is not None:
            for _ in wrap(outputs):
                pass
        return outputs
    return [session.run(names, feed) for feed in (feeds if wrap is None else wrap(feeds))]


def temporary_directory() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="segquant-")
