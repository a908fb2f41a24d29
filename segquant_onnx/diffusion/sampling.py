"""Rectified-flow sampling through any transformer callable, and calibration capture along the trajectory.

A *transformer* here is a callable `feed -> velocity`: it takes a dict of numpy arrays named like the
model's inputs (`hidden_states`, `encoder_hidden_states`, `pooled_projections`, `timestep`) and returns
the output array. `onnx_transformer(model)` makes one from an FP or quantized ONNX graph (ONNX Runtime),
so the same sampler runs every variant of a model from the same noise.

Rectified flow (SD3's flow matching): `x_t = (1 - t) x_0 + t eps`, the model predicts `v = eps - x_0`.
Euler from t = 1 to 0 on the grid `t_i = 1 - i / N`: `x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)`;
the timestep fed to the model is `1000 t` (diffusers' SD3 convention).

Calibration capture records the transformer's inputs at sampled steps of real sampling loops
(several conditions x seeds x timesteps, the SegQuant paper's protocol) into the calibration layout
of `calib_data`: one array per input, the model input's rank, samples concatenated on axis 0.
`capture_from_module` does the same for any torch module (a diffusers pipeline's transformer) with a
forward pre-hook. Importing this module needs only numpy; onnxruntime and torch are imported inside.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

LATENT_INPUT = "hidden_states"
TIMESTEP_INPUT = "timestep"
TIMESTEP_SCALE = 1000.0

Transformer = Callable[[dict], np.ndarray]


def flow_times(steps: int) -> np.ndarray:
    """The Euler grid `t_i = 1 - i / steps`, i = 0..steps (float64)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return np.linspace(1.0, 0.0, steps + 1)


def initial_noise(seed: int, shape: Sequence[int]) -> np.ndarray:
    """Standard normal float32 noise of `shape` from `numpy.random.default_rng(seed)`."""
    return np.random.default_rng(seed).standard_normal(tuple(shape), dtype=np.float32)


def rectified_flow_sample(run_transformer: Transformer, latents: np.ndarray, cond: Mapping[str, np.ndarray],
                          steps: int, *, on_step: Callable[[int, dict, np.ndarray], None] | None = None,
                          latent_name: str = LATENT_INPUT, timestep_name: str = TIMESTEP_INPUT,
                          timestep_scale: float = TIMESTEP_SCALE) -> np.ndarray:
    """Integrate the rectified-flow ODE from noise `latents` (t = 1) to a sample (t = 0) in `steps` Euler steps.

    `cond` holds the other model inputs (same batch as `latents`). `on_step(i, feed, velocity)` is
    called at every step with the exact feed the transformer saw and its output.
    """
    x = np.array(latents, dtype=np.float32)
    times = flow_times(steps)
    for i in range(steps):
        feed = {**cond, latent_name: x,
                timestep_name: np.full((x.shape[0],), times[i] * timestep_scale, dtype=np.float32)}
        velocity = np.asarray(run_transformer(feed), dtype=np.float32)
        if velocity.shape != x.shape:
            raise ValueError(f"transformer output has shape {velocity.shape}, latents have {x.shape}")
        if on_step is not None:
            on_step(i, feed, velocity)
        x = (x + np.float32(times[i + 1] - times[i]) * velocity).astype(np.float32)
    return x


def capture_calibration(run_transformer: Transformer, conds: Sequence[Mapping[str, np.ndarray]],
                        seeds: Iterable[int], steps: int, *, latent_shape: Sequence[int], every: int = 1,
                        latent_name: str = LATENT_INPUT, timestep_name: str = TIMESTEP_INPUT,
                        timestep_scale: float = TIMESTEP_SCALE) -> dict[str, np.ndarray]:
    """Sample every (condition, seed) pair and record the transformer inputs at every `every`-th step.

    Trajectory k (conditions outer, seeds inner) records the steps i with `(i - k) % every == 0`, so
    the trajectories together cover every timestep of the grid. The noise of seed s is
    `initial_noise(s, latent_shape)`. Returns one array per model input, samples on axis 0 (each
    recorded feed keeps its batch axis), ready for `np.savez` and `calib_data.open_calibration`.
    Samples are ordered by step (high noise first), then by trajectory, so that any strided subset
    (every k-th feed held back for validation, the first n feeds) spans the whole trajectory.
    """
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    records: list[tuple[int, int, dict]] = []
    seeds = list(seeds)
    for k, (cond, seed) in enumerate((c, s) for c in conds for s in seeds):
        def record(i, feed, _velocity, k=k):
            if (i - k) % every == 0:
                records.append((i, k, {name: np.array(value) for name, value in feed.items()}))

        rectified_flow_sample(run_transformer, initial_noise(seed, latent_shape), cond, steps, on_step=record,
                              latent_name=latent_name, timestep_name=timestep_name, timestep_scale=timestep_scale)
    if not records:
        raise ValueError("nothing captured: give at least one condition and one seed")
    feeds = [feed for _, _, feed in sorted(records, key=lambda r: r[:2])]
    return {name: np.concatenate([f[name] for f in feeds], axis=0) for name in feeds[0]}


class OnnxTransformer:
    """An ONNX graph as a transformer callable (ONNX Runtime). A feed whose batch is a multiple of
    the graph's static batch runs in chunks of that batch; the outputs are concatenated."""

    def __init__(self, model, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = 1,
                 output: str | None = None):
        import onnx
        import onnxruntime as ort

        from segquant_onnx.ir.runtime import quiet_onnxruntime

        opts = ort.SessionOptions()
        opts.log_severity_level = quiet_onnxruntime()
        if threads is not None:  # one thread: deterministic, and fastest for small graphs
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
        self.session = ort.InferenceSession(source, opts, providers=list(providers))
        self.inputs = {i.name: i.shape for i in self.session.get_inputs()}
        self.output = output or self.session.get_outputs()[0].name
        batches = {s[0] for s in self.inputs.values() if s and isinstance(s[0], int)}
        self.static_batch = batches.pop() if len(batches) == 1 else None

    def __call__(self, feed: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {name: np.ascontiguousarray(feed[name]) for name in self.inputs}
        total = next(iter(feed.values())).shape[0]
        chunk = self.static_batch or total
        if total % chunk:
            raise ValueError(f"feed batch {total} is not a multiple of the model's static batch {chunk}")
        outs = [self.session.run([self.output], {n: a[j:j + chunk] for n, a in feed.items()})[0]
                for j in range(0, total, chunk)]
        return outs[0] if len(outs) == 1 else np.concatenate(outs, axis=0)


def onnx_transformer(model, providers: Sequence[str] = ("CPUExecutionProvider",), threads: int | None = 1
                     ) -> OnnxTransformer:
    """A transformer callable for `model` (path or onnx.ModelProto)."""
    return OnnxTransformer(model, providers, threads)


def capture_from_module(module, run: Callable[[], object], *, every: int = 1,
                        keep: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Record the tensor inputs of every `every`-th call of `module` (any torch nn.Module) while `run()` runs.

    Typical use: `capture_from_module(pipe.transformer, lambda: pipe(prompt, num_inference_steps=28))`.
    Positional arguments are named after `module.forward`'s parameters; keyword arguments keep their
    names; non-tensor arguments are skipped, and `keep` restricts the names recorded (e.g. the ONNX
    graph's inputs). bfloat16 becomes float32 (numpy has no bfloat16); other dtypes are kept. Returns
    the calibration layout of `capture_calibration`: calls concatenated on axis 0 (0-d tensors stacked).
    """
    import torch

    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    params = [p.name for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    keep = None if keep is None else set(keep)
    records: dict[str, list[np.ndarray]] = {}
    calls = 0

    def hook(_module, args, kwargs):
        nonlocal calls
        calls += 1
        if (calls - 1) % every:
            return
        for name, value in {**dict(zip(params, args)), **kwargs}.items():
            if torch.is_tensor(value) and (keep is None or name in keep):
                value = value.detach().to("cpu")
                if value.dtype == torch.bfloat16:
                    value = value.float()
                records.setdefault(name, []).append(value.numpy().copy())

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    if not records:
        raise ValueError("nothing captured: the module was not called with tensor inputs while run() ran")
    return {name: np.stack(arrays) if arrays[0].ndim == 0 else np.concatenate(arrays, axis=0)
            for name, arrays in records.items()}
