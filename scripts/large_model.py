"""A real-width SD3-style transformer over 2 GB in fp16 (external data), with trajectory-style calib/eval data.

The model is diffusers' ``SD3Transformer2DModel`` at SD3-medium's width (hidden 1536 = 24 heads x 64, T5 width
4096, pooled CLIP width 2048, 16 latent channels, patch 2) with 13 joint blocks instead of 24, so the fp16
weights are 2.04 GiB: just over protobuf's 2 GiB limit, the case the large-model code paths exist for. The
weights are random (diffusers' own initialisation, seed 0), not pretrained: nothing is downloaded. The
activation statistics of a random model are milder than a trained one's, so this model measures time and
memory, not quantization quality.

The calibration and eval data follow SD3's sampling trajectory without running it: for each "prompt"
(random T5-like ``encoder_hidden_states`` and pooled embedding) a smooth random clean latent x0 is noised to
``x_t = (1 - s) x0 + s n`` at several sigmas of SD3's shifted schedule (shift 3), and the timestep is
``1000 s``, as the FlowMatch scheduler feeds the transformer. Latent and text are kept small (16 x 16 latent
= 64 image tokens, 32 text tokens) so one forward pass takes seconds on a CPU.

Everything goes to the git-ignored ``bench_out/large/`` by default (never commit it)::

    python scripts/large_model.py                 # sd3_large.onnx + .data, sd3_large_calib.npz, sd3_large_eval.npz
    python scripts/large_model.py --time-feeds 2  # also time ONNX Runtime on 2 feeds (the cost of one feed)

Needs torch (CPU) and diffusers (the ``export`` extra); peak memory about 7 GiB during the export.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

log = logging.getLogger("large_model")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO_ROOT / "bench_out" / "large"
NAME = "sd3_large"
INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
OPSET = 17

#: SD3-medium's widths, 13 blocks instead of 24 (fp16: 2.04 GiB).
CONFIG = {
    "sample_size": 16, "patch_size": 2, "in_channels": 16, "num_layers": 13, "attention_head_dim": 64,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 16,
}
LATENT, TEXT_LEN = 16, 32
SHIFT = 3.0  # SD3's FlowMatchEulerDiscreteScheduler shift


def sigmas(steps: int) -> np.ndarray:
    """SD3's shifted sigma schedule (1 -> 1/steps, shifted), `steps` values."""
    s = np.linspace(1.0, 1.0 / steps, steps)
    return SHIFT * s / (1 + (SHIFT - 1) * s)


def trajectory_data(prompts: int, steps: int, seed: int) -> dict[str, np.ndarray]:
    """`prompts` x `steps` feeds (axis 0), float16, as SD3's sampler would feed the transformer (module doc)."""
    rng = np.random.default_rng(seed)
    c, h = CONFIG["in_channels"], LATENT
    feeds = {k: [] for k in INPUT_NAMES}
    for _ in range(prompts):
        text = rng.standard_normal((1, TEXT_LEN, CONFIG["joint_attention_dim"]), np.float32) * 0.5
        pooled = rng.standard_normal((1, CONFIG["pooled_projection_dim"]), np.float32)
        coarse = rng.standard_normal((1, c, h // 4, h // 4), np.float32)
        x0 = np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3) + 0.3 * rng.standard_normal((1, c, h, h), np.float32)
        noise = rng.standard_normal((1, c, h, h), np.float32)
        for s in sigmas(steps):
            feeds["hidden_states"].append((1 - s) * x0 + s * noise)
            feeds["encoder_hidden_states"].append(text)
            feeds["pooled_projections"].append(pooled)
            feeds["timestep"].append(np.array([1000.0 * s], np.float32))
    return {k: np.concatenate(v).astype(np.float16) for k, v in feeds.items()}


def build(seed: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**CONFIG).eval().half()

    class Wrapper(torch.nn.Module):
        def __init__(self, transformer):
            super().__init__()
            self.transformer = transformer

        def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
            return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                    pooled_projections=pooled_projections, timestep=timestep, return_dict=False)[0]

    return Wrapper(model).eval()


def export(out: Path, seed: int) -> dict:
    """Export to `out` (+ `out.data`, one external data file) with the TorchScript exporter, opset 17."""
    import onnx
    import torch

    wrapper = build(seed)
    params = sum(p.numel() for p in wrapper.parameters())
    feed = trajectory_data(1, 1, seed + 1000)
    args = tuple(torch.from_numpy(feed[n]) for n in INPUT_NAMES)
    raw = out.parent / f"{out.stem}_raw"  # the exporter writes one file per tensor over 2 GB: consolidated below
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        torch.onnx.export(wrapper, args, f=str(raw / out.name), dynamo=False, input_names=list(INPUT_NAMES),
                          output_names=["out"], opset_version=OPSET, do_constant_folding=True)
    del wrapper
    model = onnx.load(str(raw / out.name))  # with its weights
    data = out.with_name(out.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    del model
    shutil.rmtree(raw)
    seconds = time.perf_counter() - start
    onnx.checker.check_model(str(out))
    size = out.stat().st_size + data.stat().st_size
    log.info("exported %s: %d parameters, %.3f GiB in %.0f s", out, params, size / 2**30, seconds)
    return {"parameters": params, "size_bytes": size, "export_seconds": round(seconds, 1)}


def time_feeds(onnx_path: Path, calib: Path, count: int) -> list[float]:
    """Seconds ONNX Runtime (CPU, default options) takes per feed on the first `count` calibration feeds."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    with np.load(calib) as npz:
        arrays = {k: npz[k] for k in npz.files}
    seconds = []
    for i in range(count):
        start = time.perf_counter()
        sess.run(None, {k: v[i:i + 1] for k, v in arrays.items()})
        seconds.append(round(time.perf_counter() - start, 2))
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--calib-prompts", type=int, default=4)
    parser.add_argument("--eval-prompts", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4, help="noise levels per prompt")
    parser.add_argument("--time-feeds", type=int, default=0, help="time ONNX Runtime on this many feeds")
    parser.add_argument("--force", action="store_true", help="re-export even when the model exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = args.out_dir / f"{NAME}.onnx"
    info_path = args.out_dir / f"{NAME}.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() and onnx_path.is_file() else {}
    if args.force or not info:
        info = {"config": CONFIG, "latent": LATENT, "text_len": TEXT_LEN, **export(onnx_path, args.seed)}
    calib, evals = args.out_dir / f"{NAME}_calib.npz", args.out_dir / f"{NAME}_eval.npz"
    np.savez(calib, **trajectory_data(args.calib_prompts, args.steps, args.seed + 1))
    np.savez(evals, **trajectory_data(args.eval_prompts, args.steps, args.seed + 2))
    info.update(calib_feeds=args.calib_prompts * args.steps, eval_feeds=args.eval_prompts * args.steps,
                sigmas=[round(float(s), 4) for s in sigmas(args.steps)])
    if args.time_feeds:
        info["seconds_per_feed"] = time_feeds(onnx_path, calib, args.time_feeds)
        log.info("ONNX Runtime seconds per feed: %s", info["seconds_per_feed"])
    info_path.write_text(json.dumps(info, indent=1))
    for path in (onnx_path, calib, evals, info_path):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
