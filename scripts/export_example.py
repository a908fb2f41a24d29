"""Export tiny diffusers transformers (SD3, FLUX, PixArt) to ONNX, with calibration data.

The models are built from a fixed seed with random weights (nothing is downloaded), small enough that
the ONNX file is a few hundred kB and export plus an ONNX Runtime check take seconds on a laptop CPU,
yet they keep the structure the quantizer looks for: AdaLayerNorm ``Linear -> chunk``, GELU/SiLU
before linears, sinusoidal timestep embedders, joint attention, (FLUX) single blocks whose
``proj_out`` reads ``Concat([attn, mlp])``, and (PixArt) adaLN-single: one ``Linear(inner, 6 inner)``
whose output every block reshapes to [B, 6, inner], adds its own table to and chunks on axis 1.

Every exported graph has static shapes (batch ``batch``, 1 by default) and one output named ``out``.
SD3 and FLUX take ``hidden_states``, ``encoder_hidden_states``, ``pooled_projections``, ``timestep``;
PixArt takes ``hidden_states``, ``encoder_hidden_states``, ``timestep`` and, with its size conditions
(``use_additional_conditions``, on in ``PIXART_TINY_CONFIG``), ``resolution`` and ``aspect_ratio``.
After export the graph is run with ONNX Runtime (CPU) and compared to PyTorch.

Usage::

    python scripts/export_example.py                      # regenerate segquant_onnx/data/example_dit*
    python scripts/export_example.py --out-dir DIR [--model sd3|flux|pixart] [--dynamo] [--calib-samples 16]

Importing this file needs only numpy; torch, diffusers, onnx and onnxruntime are imported inside the
functions that use them.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("export_example")

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED_DIR = REPO_ROOT / "segquant_onnx" / "data"
BUNDLED_NAME = "example_dit"

INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
PIXART_INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "timestep", "resolution", "aspect_ratio")
OUTPUT_NAME = "out"

#: TorchScript exporter opset; the dynamo exporter writes opset 18 (its lowest native opset).
TORCHSCRIPT_OPSET = 17
DYNAMO_OPSET = 18

#: Relative tolerance of the ONNX Runtime check: max|ort - torch| / max|torch|.
VERIFY_RTOL = 1e-4
HALF_VERIFY_RTOL = 5e-2  # torch's CPU float16 kernels and ONNX Runtime's round differently
BF16_VERIFY_RTOL = 5e-2  # torch computes in bfloat16 (8 mantissa bits), the check in float32 (measured 7e-3, 1.2e-2)
NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32}  # bf16: .npz holds float32
TORCH_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}

#: Tiny SD3 (MMDiT): inner dim 4 * 16 = 64; the last block is ``context_pre_only``.
SD3_TINY_CONFIG: dict[str, Any] = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,  # must equal the inner dim (heads * head_dim)
    "pooled_projection_dim": 32,
    "out_channels": 4,
    "pos_embed_max_size": 16,  # >= sample_size / patch_size
}
SD3_TEXT_LEN = 16

#: Tiny FLUX: inner dim 4 * 16 = 64; rope axes must sum to the head dim.
FLUX_TINY_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 16,  # packed latents: 4 latent channels x 2 x 2
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}
FLUX_LATENT_SIZE = 16  # latent height = width before 2x2 packing -> 8 x 8 = 64 image tokens
FLUX_TEXT_LEN = 16

#: Tiny PixArt-alpha: inner dim 3 * 16 = 48. With ``use_additional_conditions`` the resolution (2 values)
#: and aspect-ratio (1 value) embeddings, inner // 3 wide each, are concatenated to the timestep
#: embedding, so the inner dim must be divisible by 3.
PIXART_TINY_CONFIG: dict[str, Any] = {
    "sample_size": 8,  # latent 8 x 8, patch 2 -> 16 image tokens
    "patch_size": 2,
    "in_channels": 4,
    "out_channels": 8,  # learned sigma: 2 x in_channels, as in PixArt-alpha
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "cross_attention_dim": 48,  # the inner dim: captions are projected to it
    "caption_channels": 32,  # T5 width (4096 in the real model)
    "norm_type": "ada_norm_single",
    "use_additional_conditions": True,  # PixArt-alpha 1024: resolution and aspect-ratio embedders
}
PIXART_TEXT_LEN = 16
PIXART_VAE_SCALE = 8  # pixels per latent: the resolution condition is the image size in pixels


def input_shapes(model_kind: str, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Shapes of the graph inputs of the tiny ``model_kind`` ("sd3", "flux", "pixart") at batch ``batch``
    (PixArt: with its size conditions; a model exported without them ignores the last two)."""
    if model_kind == "sd3":
        cfg = SD3_TINY_CONFIG
        size = cfg["sample_size"]
        return {
            "hidden_states": (batch, cfg["in_channels"], size, size),
            "encoder_hidden_states": (batch, SD3_TEXT_LEN, cfg["joint_attention_dim"]),
            "pooled_projections": (batch, cfg["pooled_projection_dim"]),
            "timestep": (batch,),
        }
    if model_kind == "flux":
        cfg = FLUX_TINY_CONFIG
        tokens = (FLUX_LATENT_SIZE // 2) ** 2
        return {
            "hidden_states": (batch, tokens, cfg["in_channels"]),
            "encoder_hidden_states": (batch, FLUX_TEXT_LEN, cfg["joint_attention_dim"]),
            "pooled_projections": (batch, cfg["pooled_projection_dim"]),
            "timestep": (batch,),
        }
    if model_kind == "pixart":
        cfg = PIXART_TINY_CONFIG
        size = cfg["sample_size"]
        return {
            "hidden_states": (batch, cfg["in_channels"], size, size),
            "encoder_hidden_states": (batch, PIXART_TEXT_LEN, cfg["caption_channels"]),
            "timestep": (batch,),
            "resolution": (batch, 2),
            "aspect_ratio": (batch, 1),
        }
    raise ValueError(f"unknown model kind {model_kind!r}; expected 'sd3', 'flux' or 'pixart'")


def make_calibration(model_kind: str, n_samples: int, seed: int, dtype: str = "fp32") -> dict[str, np.ndarray]:
    """Random but realistically distributed inputs, one array per graph input, axis 0 = samples.

    Latents, text embeddings and pooled embeddings are N(0, 1). The timestep follows each model's own
    convention: SD3 and PixArt take the scheduler timestep, uniform in [0, 1000); FLUX takes sigma,
    uniform in [0, 1) (the model multiplies it by 1000 itself). PixArt's size conditions are what its
    pipeline passes for the one latent size the graph has: resolution (height, width) in pixels and
    aspect ratio height / width = 1. Each sample has batch 1, so the arrays have the graph input shapes
    with the batch dimension replaced by ``n_samples``. ``dtype`` "fp16" gives float16 arrays (for a
    half-precision export), drawn from the same float32 values; "bf16" float32 arrays holding bfloat16
    values (for a bfloat16 export: .npz has no bfloat16 type, and segquant-onnx reads float32 data for
    bfloat16 inputs).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng(seed)
    shapes = input_shapes(model_kind, batch=n_samples)
    t_max = 1.0 if model_kind == "flux" else 1000.0
    data = {
        "hidden_states": rng.standard_normal(shapes["hidden_states"], dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(shapes["encoder_hidden_states"], dtype=np.float32),
    }
    if "pooled_projections" in shapes:
        data["pooled_projections"] = rng.standard_normal(shapes["pooled_projections"], dtype=np.float32)
    data["timestep"] = rng.uniform(0.0, t_max, size=shapes["timestep"]).astype(np.float32)
    if model_kind == "pixart":
        pixels = PIXART_TINY_CONFIG["sample_size"] * PIXART_VAE_SCALE
        data["resolution"] = np.full(shapes["resolution"], pixels, np.float32)
        data["aspect_ratio"] = np.ones(shapes["aspect_ratio"], np.float32)
    if dtype == "bf16":  # bfloat16 values, stored as float32 (.npz has no bfloat16; the model's sessions read it)
        import ml_dtypes

        data = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in data.items()}
    return {k: v.astype(NP_DTYPES[dtype]) for k, v in data.items()}


def _build_sd3(seed: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**SD3_TINY_CONFIG).eval()

    class SD3Wrapper(torch.nn.Module):
        """Positional inputs, one tensor output (``.sample``)."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                return_dict=False,
            )[0]

    return SD3Wrapper(model).eval()


def _decompose_rms_norm(model) -> None:
    """Replace every ``torch.nn.RMSNorm`` by diffusers' explicit RMSNorm (same math, same weights).

    The TorchScript exporter has no symbolic for ``aten::rms_norm`` at opset 17; diffusers' RMSNorm
    spells it out as pow/mean/rsqrt/mul, which every opset can express.
    """
    import torch
    from diffusers.models.normalization import RMSNorm

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, torch.nn.RMSNorm):
                continue
            affine = child.weight is not None
            eps = child.eps if child.eps is not None else torch.finfo(torch.float32).eps
            replacement = RMSNorm(child.normalized_shape[-1], eps=eps, elementwise_affine=affine)
            if affine:
                replacement.weight.data.copy_(child.weight.data)
            setattr(parent, child_name, replacement.eval())


def _build_flux(seed: int, decompose_rms_norm: bool = False):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**FLUX_TINY_CONFIG).eval()
    if decompose_rms_norm:
        _decompose_rms_norm(model)

    # Position ids as in FluxPipeline: text ids are zeros, image ids are (0, row, col) per packed token.
    side = FLUX_LATENT_SIZE // 2
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    txt_ids = torch.zeros(FLUX_TEXT_LEN, 3)

    class FluxWrapper(torch.nn.Module):
        """Positional inputs, fixed position ids (constants in the graph), one tensor output."""

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer
            self.register_buffer("img_ids", img_ids, persistent=False)
            self.register_buffer("txt_ids", txt_ids, persistent=False)

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections,
                timestep=timestep,
                img_ids=self.img_ids,
                txt_ids=self.txt_ids,
                return_dict=False,
            )[0]

    return FluxWrapper(model).eval()


def _build_pixart(seed: int, config: dict[str, Any]):
    import torch
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(**config).eval()
    conditions = bool(config["use_additional_conditions"])

    class PixArtWrapper(torch.nn.Module):
        """Positional inputs (the size conditions only when the model uses them), one tensor output."""

        input_names = PIXART_INPUT_NAMES if conditions else PIXART_INPUT_NAMES[:3]

        def __init__(self, transformer: torch.nn.Module) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, hidden_states, encoder_hidden_states, timestep, resolution=None, aspect_ratio=None):
            added = {"resolution": resolution, "aspect_ratio": aspect_ratio} if conditions else None
            return self.transformer(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                added_cond_kwargs=added,
                return_dict=False,
            )[0]

    return PixArtWrapper(model).eval()


def _squeeze_dim_translation():
    """``aten::squeeze.dim`` for the dynamo exporter: Identity where the static size of ``dim`` is not 1.

    torch's ``squeeze(dim)`` is a no-op when that size is not 1, but torch 2.13's dynamo exporter
    (onnxscript's torchlib ``aten_squeeze_dim``) always writes ``Squeeze(axes=[dim])``, which ONNX
    rejects: PixArt's ``proj_out(...).squeeze(1)`` on [B, tokens, C] gives a model that ONNX Runtime
    refuses to load ("Dimension of input 1 must be 1 instead of 16").
    """
    from onnxscript import opset18 as op

    def squeeze_dim(self, dim: int):
        size = self.shape[dim] if self.shape is not None else None
        if isinstance(size, int) and size != 1:
            return op.Identity(self)
        return op.Squeeze(self, op.Constant(value_ints=[dim]))

    return squeeze_dim


def _export_and_verify(
    wrapper, model_kind: str, config: dict[str, Any], out_path, dynamo: bool, seed: int, batch: int,
    translations: dict | None = None, dtype: str = "fp32",
) -> dict[str, Any]:
    """Export ``wrapper`` to ``out_path``, check it with ONNX Runtime, return a summary dict.

    The graph inputs are ``wrapper.input_names`` (default ``INPUT_NAMES``); ``translations`` is the
    dynamo exporter's ``custom_translation_table``.
    """
    import onnx
    import onnxruntime as ort
    import torch

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    names = tuple(getattr(wrapper, "input_names", INPUT_NAMES))
    # Verification inputs come from a seed distinct from the weights' and the calibration sets'.
    feeds = make_calibration(model_kind, n_samples=batch, seed=seed + 1000, dtype=dtype)
    feeds = {name: feeds[name] for name in names}
    args = tuple(torch.from_numpy(feeds[name]) for name in names)
    if dtype != "fp32":  # weights and computation in half precision, as such models are shipped
        torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
        wrapper = wrapper.to(torch_dtype)
        args = tuple(a.to(torch_dtype) for a in args)

    with torch.no_grad():
        reference = wrapper(*args).float().numpy()

    opset = DYNAMO_OPSET if dynamo else TORCHSCRIPT_OPSET
    logger.info("exporting %s (dynamo=%s, opset %d) to %s", model_kind, dynamo, opset, out_path)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        if dynamo:
            torch.onnx.export(
                wrapper,
                args,
                f=str(out_path),
                dynamo=True,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                external_data=False,
                optimize=True,
                custom_translation_table=translations,
            )
        else:
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            torch.onnx.export(
                wrapper,
                args,
                f=str(out_path),
                dynamo=False,
                input_names=list(names),
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                do_constant_folding=True,
            )
    export_seconds = time.perf_counter() - start
    logger.info("export took %.2f s", export_seconds)

    proto = onnx.load(str(out_path), load_external_data=False)
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"{out_path} references external data for {len(external)} initializers")
    onnx.checker.check_model(proto)
    graph_inputs = [i.name for i in proto.graph.input]
    graph_outputs = [o.name for o in proto.graph.output]
    if graph_inputs != list(names) or graph_outputs != [OUTPUT_NAME]:
        raise RuntimeError(f"unexpected graph I/O: inputs {graph_inputs}, outputs {graph_outputs}")

    if dtype == "bf16":  # ONNX Runtime's CPU has no bfloat16 kernels: check the float32 shadow
        from segquant_onnx.ir.runtime import float32_shadow

        session = ort.InferenceSession(float32_shadow(proto).SerializeToString(), providers=["CPUExecutionProvider"])
    else:
        session = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    (result,) = session.run([OUTPUT_NAME], feeds)
    max_abs = float(np.max(np.abs(result.astype(np.float32) - reference)))
    rel = max_abs / max(float(np.max(np.abs(reference))), 1e-12)
    logger.info(
        "ONNX Runtime vs torch: max abs diff %.3e, relative %.3e (output %s)", max_abs, rel, result.shape
    )
    rtol = {"fp32": VERIFY_RTOL, "fp16": HALF_VERIFY_RTOL, "bf16": BF16_VERIFY_RTOL}[dtype]
    if not rel <= rtol:
        raise RuntimeError(f"ONNX output differs from torch: relative error {rel:.3e} > {rtol:.0e}")

    return {
        "model": model_kind,
        "path": str(out_path),
        "dynamo": dynamo,
        "opset": opset,
        "seed": seed,
        "batch": batch,
        "dtype": dtype,
        "config": dict(config),
        "input_shapes": {name: tuple(feeds[name].shape) for name in names},
        "output_shape": tuple(result.shape),
        "export_seconds": export_seconds,
        "max_abs_diff": max_abs,
        "rel_diff": rel,
        "size_bytes": out_path.stat().st_size,
    }


def export_sd3_tiny(out_path, dynamo: bool, seed: int = 0, batch: int = 1, dtype: str = "fp32") -> dict[str, Any]:
    """Build the tiny SD3 transformer from ``seed``, export it to ``out_path`` (in ``dtype``) and verify it."""
    wrapper = _build_sd3(seed)
    return _export_and_verify(wrapper, "sd3", SD3_TINY_CONFIG, out_path, dynamo, seed, batch, dtype=dtype)


def export_flux_tiny(out_path, dynamo: bool, seed: int = 0, batch: int = 1, dtype: str = "fp32") -> dict[str, Any]:
    """Build the tiny FLUX transformer from ``seed``, export it to ``out_path`` (in ``dtype``) and verify it."""
    wrapper = _build_flux(seed, decompose_rms_norm=not dynamo)
    return _export_and_verify(wrapper, "flux", FLUX_TINY_CONFIG, out_path, dynamo, seed, batch, dtype=dtype)


def export_pixart_tiny(
    out_path, dynamo: bool, seed: int = 0, batch: int = 1, use_additional_conditions: bool | None = None
) -> dict[str, Any]:
    """Build the tiny PixArt-alpha transformer from ``seed``, export it to ``out_path`` and verify it.

    ``use_additional_conditions`` overrides the config's (False: PixArt-Sigma style, no size inputs).
    """
    import torch

    config = dict(PIXART_TINY_CONFIG)
    if use_additional_conditions is not None:
        config["use_additional_conditions"] = use_additional_conditions
    wrapper = _build_pixart(seed, config)
    translations = {torch.ops.aten.squeeze.dim: _squeeze_dim_translation()} if dynamo else None
    return _export_and_verify(wrapper, "pixart", config, out_path, dynamo, seed, batch, translations)


EXPORTERS = {"sd3": export_sd3_tiny, "flux": export_flux_tiny, "pixart": export_pixart_tiny}


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    np.savez(path, **arrays)
    logger.info("wrote %s (%d samples)", path, len(next(iter(arrays.values()))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=None,
        help=f"output folder; default: regenerate the bundled {BUNDLED_NAME}.onnx in {BUNDLED_DIR}",
    )
    parser.add_argument("--model", choices=sorted(EXPORTERS), default="sd3")
    parser.add_argument("--dynamo", action="store_true", help="use the dynamo exporter (opset 18)")
    parser.add_argument("--name", default=None, help="file stem; default <model>_tiny[_dynamo]")
    parser.add_argument("--seed", type=int, default=0, help="weights seed; calib/eval use seed+1/seed+2")
    parser.add_argument("--dtype", choices=sorted(NP_DTYPES), default="fp32",
                        help="weights, computation and inputs (sd3 and flux; fp16/bf16 as half models ship)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=8, help="held-out samples; 0 to skip")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    if args.out_dir is None and (args.model != "sd3" or args.dynamo):
        parser.error("--out-dir is required with --model flux/pixart or --dynamo (the bundled example is SD3)")
    out_dir = args.out_dir if args.out_dir is not None else BUNDLED_DIR
    if args.name is not None:
        name = args.name
    elif args.out_dir is None:
        name = BUNDLED_NAME
    else:
        name = f"{args.model}_tiny" + ("_dynamo" if args.dynamo else "")
    out_dir.mkdir(parents=True, exist_ok=True)

    onnx_path = out_dir / f"{name}.onnx"
    if args.dtype != "fp32" and args.model == "pixart":
        parser.error("--dtype fp16/bf16 is for --model sd3 and flux")
    if args.dtype != "fp32" and args.out_dir is None:
        parser.error("--out-dir is required with --dtype fp16/bf16 (the bundled example is fp32)")
    extra = {"dtype": args.dtype} if args.dtype != "fp32" else {}
    EXPORTERS[args.model](onnx_path, dynamo=args.dynamo, seed=args.seed, **extra)
    written = [onnx_path]

    calib_path = out_dir / f"{name}_calib.npz"
    _save_npz(calib_path, make_calibration(args.model, args.calib_samples, seed=args.seed + 1, dtype=args.dtype))
    written.append(calib_path)
    if args.eval_samples > 0:
        eval_path = out_dir / f"{name}_eval.npz"
        _save_npz(eval_path, make_calibration(args.model, args.eval_samples, seed=args.seed + 2, dtype=args.dtype))
        written.append(eval_path)

    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
