"""Rectified-flow sampling, trajectory calibration capture, image metrics and the `demo` command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segquant_onnx.diffusion import sampling as diffusion
from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.examples import example_path
from segquant_onnx.cli import main
from segquant_onnx.errors import UserError
from segquant_onnx.diffusion.sampling import (capture_calibration, capture_from_module, flow_times, initial_noise,
                                     onnx_transformer, rectified_flow_sample)
from segquant_onnx.ir.graph_io import load_model
from segquant_onnx.diffusion.image_metrics import gaussian_window, psnr, ssim

DEMO = example_path("demo_dit.onnx")
SHAPE = (1, 1, 16, 16)


@pytest.fixture(scope="module")
def conds():
    with np.load(example_path("demo_dit_conds.npz")) as npz:
        return [{"encoder_hidden_states": npz["encoder_hidden_states"][c:c + 1],
                 "pooled_projections": npz["pooled_projections"][c:c + 1]} for c in range(len(npz["labels"]))]


@pytest.fixture(scope="module")
def demo_transformer():
    return onnx_transformer(DEMO)


# -- sampler -------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_sampler_follows_a_straight_flow_to_its_endpoint(steps):
    # x_t = (1 - t) c + t eps has velocity eps - c = (x_t - c) / t: Euler stays on the line and lands on c.
    target = np.linspace(-1, 1, 2 * 16, dtype=np.float32).reshape(2, 1, 4, 4)
    seen = []

    def velocity(feed):
        t = feed["timestep"][:, None, None, None] / 1000.0
        return (feed["hidden_states"] - target) / t

    out = rectified_flow_sample(velocity, initial_noise(3, target.shape), {"extra": np.zeros(2)}, steps,
                                on_step=lambda i, f, v: seen.append((i, f["timestep"].copy(), sorted(f))))
    np.testing.assert_allclose(out, target, atol=1e-5)
    assert [i for i, _, _ in seen] == list(range(steps))
    np.testing.assert_allclose([t[0] for _, t, _ in seen], 1000.0 * flow_times(steps)[:-1], rtol=1e-6)
    assert seen[0][2] == ["extra", "hidden_states", "timestep"]


def test_sampler_with_constant_velocity_moves_by_it():
    x = initial_noise(0, (1, 2, 3))
    out = rectified_flow_sample(lambda f: np.full_like(f["hidden_states"], 0.5), x, {}, steps=7)
    np.testing.assert_allclose(out, x - 0.5, atol=1e-6)


def test_sampler_rejects_a_wrong_output_shape():
    with pytest.raises(ValueError, match="output has shape"):
        rectified_flow_sample(lambda f: np.zeros(3), np.zeros((1, 2)), {}, steps=2)


def test_sampling_the_demo_model_is_deterministic(demo_transformer, conds):
    noise = initial_noise(5, SHAPE)
    a = rectified_flow_sample(demo_transformer, noise, conds[4], steps=4)
    b = rectified_flow_sample(onnx_transformer(DEMO), noise, conds[4], steps=4)
    assert a.tobytes() == b.tobytes()
    assert np.array_equal(noise, initial_noise(5, SHAPE))


def test_onnx_transformer_runs_a_batch_through_a_static_batch_1_model(demo_transformer, conds):
    feeds = [{**c, "hidden_states": initial_noise(i, SHAPE), "timestep": np.array([500.0], np.float32)}
             for i, c in enumerate(conds[:3])]
    batched = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    assert demo_transformer.static_batch == 1
    np.testing.assert_array_equal(demo_transformer(batched), np.concatenate([demo_transformer(f) for f in feeds]))


# -- calibration capture -------------------------------------------------------------------------
def test_capture_calibration_layout_is_accepted_for_the_model(demo_transformer, conds, tmp_path):
    arrays = capture_calibration(demo_transformer, conds[:2], seeds=[0], steps=4, latent_shape=SHAPE, every=2)
    # 2 trajectories x 2 recorded steps, staggered: trajectory 0 -> steps 0, 2; trajectory 1 -> steps 1, 3;
    # ordered by step
    assert arrays["hidden_states"].shape == (4, 1, 16, 16)
    assert arrays["encoder_hidden_states"].shape == (4, 8, 32)
    assert arrays["pooled_projections"].shape == (4, 32)
    np.testing.assert_allclose(arrays["timestep"], [1000, 750, 500, 250])
    np.testing.assert_array_equal(arrays["hidden_states"][0], initial_noise(0, SHAPE)[0])
    for i, c in enumerate([0, 1, 0, 1]):
        np.testing.assert_array_equal(arrays["pooled_projections"][i], conds[c]["pooled_projections"][0])
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    data = open_calibration(path, model_inputs(load_model(DEMO).graph))
    assert len(data) == 4
    feed = next(iter(data))
    expected = {**conds[0], "hidden_states": np.zeros(SHAPE), "timestep": np.zeros(1)}
    assert {k: v.shape for k, v in feed.items()} == {k: v.shape for k, v in expected.items()}


def test_bundled_demo_calibration_fits_the_bundled_model():
    inputs = model_inputs(load_model(DEMO).graph)
    for name in ("demo_dit_calib.npz", "demo_dit_eval.npz"):
        data = open_calibration(example_path(name), inputs)
        assert len(data) >= 32, name


def test_capture_from_module_records_positional_and_keyword_tensors():
    torch = pytest.importorskip("torch")

    class Toy(torch.nn.Module):
        def forward(self, hidden_states, timestep, encoder_hidden_states=None, joint_attention_kwargs=None):
            return hidden_states * 2

    toy = Toy()

    def run():
        for i in range(6):
            toy(torch.full((2, 3), float(i)), torch.tensor([i, i], dtype=torch.float32),
                encoder_hidden_states=torch.ones(2, 4, 5, dtype=torch.bfloat16), joint_attention_kwargs={"a": 1})

    arrays = capture_from_module(toy, run, every=2)
    assert sorted(arrays) == ["encoder_hidden_states", "hidden_states", "timestep"]
    assert arrays["hidden_states"].shape == (6, 3)
    np.testing.assert_array_equal(arrays["hidden_states"][::2, 0], [0, 2, 4])
    np.testing.assert_array_equal(arrays["timestep"], [0, 0, 2, 2, 4, 4])
    assert arrays["encoder_hidden_states"].dtype == np.float32 and arrays["encoder_hidden_states"].shape == (6, 4, 5)
    assert sorted(capture_from_module(toy, run, keep=["timestep"])) == ["timestep"]
    assert not toy._forward_pre_hooks  # the hook is removed


def test_capture_from_a_diffusers_transformer_matches_the_onnx_capture(demo_transformer, conds, tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel

    checkpoint = DEMO.parent / "demo_dit"
    if not (checkpoint / "config.json").is_file():
        pytest.skip("the demo checkpoint is not in this checkout")
    module = SD3Transformer2DModel.from_pretrained(checkpoint).eval()

    def torch_velocity(feed):  # how a pipeline calls its transformer: keyword tensors
        with torch.no_grad():
            return module(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=False)[0].numpy()

    def run():
        for c in conds[:2]:
            rectified_flow_sample(torch_velocity, initial_noise(1, SHAPE), c, steps=3)

    hooked = capture_from_module(module, run, every=1)  # in call order: condition, then step
    onnx_side = capture_calibration(demo_transformer, conds[:2], seeds=[1], steps=3, latent_shape=SHAPE)
    by_step = [c * 3 + i for i in range(3) for c in range(2)]  # capture_calibration orders by step
    assert sorted(hooked) == sorted(onnx_side)
    for name in onnx_side:
        np.testing.assert_allclose(hooked[name][by_step], onnx_side[name], atol=1e-4)
    np.savez(tmp_path / "hooked.npz", **hooked)
    assert len(open_calibration(tmp_path / "hooked.npz", model_inputs(load_model(DEMO).graph))) == 6


# -- image metrics -------------------------------------------------------------------------------
def test_psnr_known_values():
    x = np.random.default_rng(0).random((16, 16))
    assert psnr(x, x) == float("inf")
    assert psnr(x, x + 0.1) == pytest.approx(20.0)
    assert psnr(x * 255, x * 255 + 2.55, data_range=255) == pytest.approx(40.0)


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.random((16, 16))
    assert ssim(x, x) == pytest.approx(1.0)
    # constant images: only the luminance term remains, (2ab + C1) / (a^2 + b^2 + C1)
    c1 = 0.01 ** 2
    assert ssim(np.full((9, 9), 0.2), np.full((9, 9), 0.6)) == pytest.approx((2 * 0.12 + c1) / (0.04 + 0.36 + c1))
    noisy = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1)
    noisier = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    assert 1.0 > ssim(x, noisy) > ssim(x, noisier) > 0.0
    assert ssim(x, noisy) == pytest.approx(ssim(noisy, x))
    assert gaussian_window().shape == (7, 7) and gaussian_window().sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ssim(np.zeros((4, 4)), np.zeros((4, 4)))


# -- the demo command ----------------------------------------------------------------------------
def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_demo_command_writes_images_and_prints_psnr(capsys, tmp_path):
    pytest.importorskip("PIL")
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--steps", "2", "--seeds", "0", "-q"])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "PSNR dB" in stdout and "naive INT8" in stdout and "SegQuant" in stdout
    from PIL import Image

    grid = Image.open(out / "demo_grid.png")
    assert grid.size[0] > 10 * 16 * 4 and grid.size[1] > 3 * 16 * 4
    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert set(metrics["methods"]) == {"naive INT8", "SegQuant"}
    for m in metrics["methods"].values():  # measured: PSNR 43.67 / 43.22 dB, SSIM 0.9992 / 0.9991
        assert len(m["step_sqnr_db_same_input"]) == 2 and 0.998 < m["ssim"] <= 1.0 and m["psnr_db"] > 41.5
    if _has_matplotlib():
        assert (out / "demo_step_error.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["demo_grid.png", "demo_metrics.json"] + (["demo_step_error.png"] if _has_matplotlib() else []))


# measured with the README's settings (its "Demo" table): PSNR dB, SSIM, output SQNR dB on the eval feeds,
# mean per-step SQNR dB
DEMO_MEASURED = {"naive INT8": (46.88, 0.9997, 28.06, 31.94), "SegQuant": (46.77, 0.9997, 27.92, 31.90)}


def test_the_demo_keeps_its_measured_quality(demo_metrics):
    """Floors a little under the measured values: 1.5 dB on image PSNR, 1 dB on the SQNRs."""
    for name, (psnr_db, ssim_value, sqnr_db, step_db) in DEMO_MEASURED.items():
        m = demo_metrics["methods"][name]
        assert m["psnr_db"] > psnr_db - 1.5 and m["ssim"] > ssim_value - 0.0005, name
        assert m["eval_output_sqnr_db"] > sqnr_db - 1.0, name
        assert float(np.mean(m["step_sqnr_db_same_input"])) > step_db - 1.0, name


def test_segquant_is_not_below_naive_int8_on_the_demo_by_more_than_it_measures(demo_metrics):
    """On this small trained DiT the default config does not beat naive INT8: DualScale auto picks 41 sites
    per layer but the held-back output check drops them (31.07 against 31.10 dB), and what remains
    (SegLinear) measures 0.14 dB output SQNR and 0.11 dB PSNR below naive. So this bounds the gap at 0.25 dB
    instead of asserting a win; where the features must win, constructed graphs show it
    (tests/test_features_pay.py)."""
    seg, naive = demo_metrics["methods"]["SegQuant"], demo_metrics["methods"]["naive INT8"]
    assert seg["eval_output_sqnr_db"] >= naive["eval_output_sqnr_db"] - 0.25
    assert seg["psnr_db"] >= naive["psnr_db"] - 0.25
    assert float(np.mean(seg["step_sqnr_db_same_input"])) >= float(np.mean(naive["step_sqnr_db_same_input"])) - 0.25


def test_diffusion_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, segquant_onnx.diffusion.sampling, segquant_onnx.diffusion.demo; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert diffusion.TIMESTEP_SCALE == 1000.0


def test_demo_w4a8_compares_naive_rounding_with_the_best_w4a8_recipe():
    """`segquant-onnx demo --precision w4a8`: naive = INT4 weights rounded to nearest, INT8 activations, no
    SegLinear / DualScale; SegQuant = --preset best at W4A8 (GPTQ) with the low-rank branch."""
    from segquant_onnx import QuantConfig
    from segquant_onnx.diffusion.demo import DEMO_PRECISIONS, METHODS, W4A8_METHODS, model_name

    assert DEMO_PRECISIONS == {"int8": METHODS, "w4a8": W4A8_METHODS}
    naive, seg = W4A8_METHODS["naive W4A8"], W4A8_METHODS["SegQuant W4A8"]
    assert naive == QuantConfig(precision={"format": "w4a8", "weight_rounding": "rtn"},
                                seglinear={"output": False, "input": False}, dualscale={"mode": "off"})
    assert seg == QuantConfig.preset("best", precision={"format": "w4a8", "weight_rounding": "gptq", "low_rank": 16})
    assert seg.smoothquant.mode.value == "auto" and seg.fallback.target_sqnr == 40.0
    assert [model_name(n, "w4a8") for n in W4A8_METHODS] == ["demo_dit_naive_w4a8.onnx", "demo_dit_segquant_w4a8.onnx"]
    assert [model_name(n, "int8") for n in METHODS] == ["demo_dit_naive_int8.onnx", "demo_dit_segquant_int8.onnx"]


def test_demo_refuses_a_precision_it_does_not_run(tmp_path):
    from segquant_onnx.diffusion.demo import run_demo

    pytest.importorskip("PIL")
    with pytest.raises(UserError, match="--precision w4a16"):
        run_demo(tmp_path / "d", precision="w4a16")
    assert not (tmp_path / "d").exists()


@pytest.mark.slow
def test_demo_command_at_w4a8(capsys, tmp_path):
    pytest.importorskip("PIL")
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--steps", "2", "--seeds", "0", "--classes", "3", "7", "--precision", "w4a8",
                 "--save-models", "-q"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "naive W4A8" in stdout and "SegQuant W4A8" in stdout
    metrics = json.loads((out / "demo_metrics.json").read_text())
    assert metrics["precision"] == "w4a8" and list(metrics["methods"]) == ["naive W4A8", "SegQuant W4A8"]
    seg = metrics["methods"]["SegQuant W4A8"]
    assert seg["config"]["precision"]["low_rank"] == 16 and seg["config"]["precision"]["weight_rounding"] == "gptq"
    assert seg["eval_output_sqnr_db"] > metrics["methods"]["naive W4A8"]["eval_output_sqnr_db"]
    assert (out / "demo_dit_segquant_w4a8.onnx").is_file() and (out / "demo_dit_naive_w4a8.onnx").is_file()
