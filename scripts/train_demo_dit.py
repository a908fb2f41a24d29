"""Train the demo DiT: a small diffusers SD3 transformer that draws 16x16 digits, then export and calibrate it.

Recipe (everything offline, deterministic for a seed, one CPU thread):

- data: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), scaled to [-1, 1] and
  upsampled to 16x16 (bilinear); the image is the latent (1 channel).
- model: `SD3Transformer2DModel` (MMDiT) with patch 2 (64 image tokens), 3 joint blocks, 4 heads x 16,
  so AdaLayerNormZero chunks, joint attention, GELU MLPs and the timestep/pooled embedders all train.
- conditioning: class c is a fixed random caption-like token sequence (a shared BOS token, 3 class
  tokens, 4 shared padding tokens; 8 x 32) as `encoder_hidden_states`, and a fixed random 32-vector as
  `pooled_projections`. They are saved to `segquant_onnx/data/demo_dit_conds.npz`.
- objective: rectified flow, `x_t = (1 - t) x_0 + t eps`, t ~ U(0, 1), the model predicts
  `eps - x_0` (MSE); timestep input `1000 t`. AdamW, warmup then cosine decay, grad clip 1, EMA 0.999
  (the EMA weights are exported).
- export: TorchScript exporter (opset 17, static batch 1, inputs hidden_states /
  encoder_hidden_states / pooled_projections / timestep, output `out`) to
  `segquant_onnx/data/demo_dit.onnx`; the dynamo exporter (opset 18) to `build/demo_dit/demo_dit_dynamo.onnx`.
  Both are checked against PyTorch with ONNX Runtime.
- calibration: the FP ONNX model's own Euler trajectories (`segquant_onnx.diffusion.capture_calibration`):
  10 classes x 2 seeds x 20 steps, every 5th step (staggered) = 80 samples in `demo_dit_calib.npz`;
  10 classes x 1 other seed = 40 samples in `demo_dit_eval.npz`.

Usage::

    python scripts/train_demo_dit.py                # train, save the checkpoint, export, capture, plot the loss
    python scripts/train_demo_dit.py --skip-train   # re-export and re-capture from the saved checkpoint

Needs the `export` and `demo` extras (torch, diffusers, onnxscript, scikit-learn, matplotlib).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
from segquant_onnx.diffusion import capture_calibration, onnx_transformer  # noqa: E402

logger = logging.getLogger("train_demo_dit")

DATA_DIR = REPO_ROOT / "segquant_onnx" / "data"
CHECKPOINT_DIR = DATA_DIR / "demo_dit"  # config.json + safetensors (~1.7 MB), not package data
BUILD_DIR = REPO_ROOT / "build" / "demo_dit"
DOCS_DIR = REPO_ROOT / "docs"

INPUT_NAMES = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")
OUTPUT_NAME = "out"
TORCHSCRIPT_OPSET, DYNAMO_OPSET = 17, 18
VERIFY_RTOL = 1e-4

IMAGE_SIZE = 16
NUM_CLASSES = 10
TEXT_LEN = 8
DEMO_CONFIG: dict[str, Any] = {
    "sample_size": IMAGE_SIZE,
    "patch_size": 2,
    "in_channels": 1,
    "out_channels": 1,
    "num_layers": 3,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": 32,
    "caption_projection_dim": 64,  # = heads * head_dim
    "pooled_projection_dim": 32,
    "pos_embed_max_size": IMAGE_SIZE // 2,
}
LATENT_SHAPE = (1, DEMO_CONFIG["in_channels"], IMAGE_SIZE, IMAGE_SIZE)

CALIB_SEEDS, EVAL_SEEDS = (1000, 1001), (2000,)
CAPTURE_STEPS, CAPTURE_EVERY = 20, 5


def load_digits_images() -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 [N, 1, 16, 16] in [-1, 1] (bilinear upsampling of the 8x8 originals), labels [N]."""
    import torch
    import torch.nn.functional as F

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("train_demo_dit.py needs scikit-learn for its bundled digits: pip install scikit-learn")
    digits = load_digits()
    images = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (images.clamp(0, 1) * 2 - 1).numpy(), digits.target.astype(np.int64)


def make_conditions(seed: int) -> dict[str, np.ndarray]:
    """Per-class caption-like token sequences [10, 8, 32] and pooled vectors [10, 32] (fixed random)."""
    rng = np.random.default_rng(seed)
    dim, pooled = DEMO_CONFIG["joint_attention_dim"], DEMO_CONFIG["pooled_projection_dim"]
    bos = rng.standard_normal((1, dim))
    pad = rng.standard_normal((TEXT_LEN - 4, dim)) * 0.5
    tokens = np.stack([np.concatenate([bos, rng.standard_normal((3, dim)), pad]) for _ in range(NUM_CLASSES)])
    return {
        "encoder_hidden_states": tokens.astype(np.float32),
        "pooled_projections": rng.standard_normal((NUM_CLASSES, pooled)).astype(np.float32),
        "labels": np.arange(NUM_CLASSES, dtype=np.int64),
    }


class Wrapper:
    """Positional inputs, one tensor output (`.sample`), as the exporters want (built lazily: torch)."""

    def __new__(cls, transformer):
        import torch

        class _Wrapper(torch.nn.Module):
            def __init__(self, transformer):
                super().__init__()
                self.transformer = transformer

            def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
                return self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                        pooled_projections=pooled_projections, timestep=timestep,
                                        return_dict=False)[0]

        return _Wrapper(transformer).eval()


def train(steps: int, batch: int, lr: float, seed: int, conds: dict[str, np.ndarray], log_every: int = 50):
    """Rectified-flow training; returns (EMA model, log rows)."""
    import copy

    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    images, labels = load_digits_images()
    images, labels = torch.from_numpy(images), torch.from_numpy(labels)
    tokens = torch.from_numpy(conds["encoder_hidden_states"])
    pooled = torch.from_numpy(conds["pooled_projections"])

    model = SD3Transformer2DModel(**DEMO_CONFIG).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters; data: %d images", n_params, len(images))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, min(200, steps // 10))

    def lr_factor(s: int) -> float:  # linear warmup, then cosine from 1 down to 0.1
        if s < warmup:
            return (s + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    gen = torch.Generator().manual_seed(seed + 1)

    rows, running, started = [], 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        idx = torch.randint(len(images), (batch,), generator=gen)
        x0, y = images[idx], labels[idx]
        t = torch.rand(batch, generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        v = model(hidden_states=xt, encoder_hidden_states=tokens[y], pooled_projections=pooled[y],
                  timestep=t * 1000.0, return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if step % log_every == 0:
            rows.append({"step": step, "loss": running / log_every, "seconds": time.perf_counter() - started,
                         "lr": sched.get_last_lr()[0]})
            running = 0.0
            if step % (log_every * 10) == 0:
                logger.info("step %d  loss %.4f  %.0f s", step, rows[-1]["loss"], rows[-1]["seconds"])
    return ema, rows, n_params


def export(transformer, path: Path, dynamo: bool, conds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Export the transformer (static batch 1) to `path`, check it against PyTorch with ONNX Runtime."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = Wrapper(transformer)
    rng = np.random.default_rng(7)
    feeds = {"hidden_states": rng.standard_normal(LATENT_SHAPE, dtype=np.float32),
             "encoder_hidden_states": conds["encoder_hidden_states"][3:4],
             "pooled_projections": conds["pooled_projections"][3:4],
             "timestep": np.array([640.0], np.float32)}
    args = tuple(torch.from_numpy(feeds[n]) for n in INPUT_NAMES)
    with torch.no_grad():
        reference = wrapper(*args).numpy()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        if dynamo:  # its onnx_ir passes log every initializer they merge at INFO
            logging.getLogger("onnx_ir").setLevel(logging.WARNING)
            torch.onnx.export(wrapper, args, f=str(path), dynamo=True, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], opset_version=DYNAMO_OPSET, external_data=False,
                              optimize=True)
        else:
            torch.onnx.export(wrapper, args, f=str(path), dynamo=False, input_names=list(INPUT_NAMES),
                              output_names=[OUTPUT_NAME], opset_version=TORCHSCRIPT_OPSET,
                              do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(path)))
    got = onnx_transformer(path)(feeds)
    rel = float(np.abs(got - reference).max() / np.abs(reference).max())
    if not rel <= VERIFY_RTOL:
        raise RuntimeError(f"{path}: ONNX Runtime differs from PyTorch (relative {rel:.2e})")
    logger.info("exported %s (%s, %.0f kB), ORT vs torch relative error %.1e", path,
                "dynamo" if dynamo else "TorchScript", path.stat().st_size / 1e3, rel)
    return {"path": str(path), "dynamo": dynamo, "rel_diff": rel, "size_bytes": path.stat().st_size}


def class_conditions(conds: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed-dict of conditioning inputs (batch 1) per class."""
    return [{"encoder_hidden_states": conds["encoder_hidden_states"][c:c + 1],
             "pooled_projections": conds["pooled_projections"][c:c + 1]} for c in range(NUM_CLASSES)]


def capture(onnx_path: Path, conds: dict[str, np.ndarray], seeds, out: Path) -> None:
    arrays = capture_calibration(onnx_transformer(onnx_path), class_conditions(conds), seeds, CAPTURE_STEPS,
                                 latent_shape=LATENT_SHAPE, every=CAPTURE_EVERY)
    np.savez(out, **arrays)
    logger.info("wrote %s (%d samples, seeds %s)", out, len(arrays["timestep"]), list(seeds))


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow MSE (mean of 50 steps)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})
    plt.close(fig)
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3500, help="training steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--skip-train", action="store_true", help="load the saved checkpoint instead of training")
    parser.add_argument("--checkpoint-dir", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="where the ONNX, conds and calib/eval go")
    parser.add_argument("--dynamo-out", type=Path, default=BUILD_DIR / "demo_dit_dynamo.onnx")
    parser.add_argument("--docs-dir", type=Path, default=DOCS_DIR, help="where the loss plot goes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)

    import torch
    from diffusers import SD3Transformer2DModel

    torch.set_num_threads(args.threads)
    conds_path = args.data_dir / "demo_dit_conds.npz"
    if args.skip_train:
        transformer = SD3Transformer2DModel.from_pretrained(args.checkpoint_dir).eval()
        with np.load(conds_path) as npz:
            conds = dict(npz)
    else:
        conds = make_conditions(args.seed)
        transformer, rows, n_params = train(args.steps, args.batch, args.lr, args.seed, conds)
        seconds = rows[-1]["seconds"] if rows else 0.0
        final = float(np.mean([r["loss"] for r in rows[-10:]])) if rows else float("nan")
        logger.info("trained %d steps in %.0f s; final loss (mean of the last 500 steps) %.4f", args.steps,
                    seconds, final)
        transformer.save_pretrained(args.checkpoint_dir, safe_serialization=True)
        log = {"config": DEMO_CONFIG, "parameters": n_params, "steps": args.steps, "batch": args.batch,
               "lr": args.lr, "seed": args.seed, "threads": args.threads, "seconds": round(seconds, 1),
               "final_loss": final, "torch": torch.__version__, "log": rows}
        (args.checkpoint_dir / "train_log.json").write_text(json.dumps(log, indent=1))
        args.data_dir.mkdir(parents=True, exist_ok=True)
        np.savez(conds_path, **conds)
    log = json.loads((args.checkpoint_dir / "train_log.json").read_text())
    plot_loss(log["log"], args.docs_dir / "demo_dit_loss.png",
              f"demo DiT ({log['parameters'] / 1e3:.0f}k parameters): {log['steps']} steps x {log['batch']} in "
              f"{log['seconds'] / 60:.1f} min on {log['threads']} CPU thread(s)\n"
              f"final loss (mean of the last 500 steps) {log['final_loss']:.4f}")

    onnx_path = args.data_dir / "demo_dit.onnx"
    export(transformer, onnx_path, dynamo=False, conds=conds)
    export(transformer, args.dynamo_out, dynamo=True, conds=conds)
    capture(onnx_path, conds, CALIB_SEEDS, args.data_dir / "demo_dit_calib.npz")
    capture(onnx_path, conds, EVAL_SEEDS, args.data_dir / "demo_dit_eval.npz")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
