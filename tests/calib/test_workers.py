"""Calibration over workers: shards merge into exactly the single-pass statistics, `--workers 2` writes the
same bytes as one process, a failing worker is retried once and then reported, GPU provider options."""

from __future__ import annotations

import json
import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import build_linear_model, calib_inputs, save
from segquant_onnx.calib.calibrate import Calibration, Shard, calibrate
from segquant_onnx.calib.data import model_inputs, open_calibration
from segquant_onnx.calib.observers import RowSample, TensorStats
from segquant_onnx.calib.workers import FAULT_ENV
from segquant_onnx.cli import main
from segquant_onnx.errors import UserError
from segquant_onnx.examples import EXAMPLE_CALIB, EXAMPLE_MODEL, example_path
from segquant_onnx.ir.canonicalize import canonicalize
from segquant_onnx.ir.graph_io import open_source
from segquant_onnx.ir.runtime import gpu_count, provider_options


def assert_same_tensor_stats(a: TensorStats, b: TensorStats) -> None:
    for name in ("count", "neg_count", "amax", "pos_amax", "neg_amax", "hist_range", "channel_axis"):
        assert getattr(a, name) == getattr(b, name), name
    for name in ("hist", "channel_amax", "channel_pos_amax", "channel_neg_amax"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert sorted(a.other_channels) == sorted(b.other_channels)
    for size, v in a.other_channels.items():
        np.testing.assert_array_equal(v, b.other_channels[size])


def assert_same_sample(a: RowSample, b: RowSample) -> None:
    np.testing.assert_array_equal(a.rows, b.rows)
    for ka, kb in zip(a.keys, b.keys):
        np.testing.assert_array_equal(ka, kb)
    assert a.seen == b.seen


def _batches(seed: int, n: int) -> list[np.ndarray]:
    """Batches whose abs-max sits just under and over powers of two (where a histogram range is decided) and
    whose channel count changes (a dynamic axis on the channel axis)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.standard_normal((int(rng.integers(1, 4)), int(rng.choice([5, 5, 5, 3])))).astype(np.float32)
        x *= np.float32(2.0 ** rng.integers(-3, 6))
        if i % 3 == 1:
            x.flat[0] = np.float32(2.0 ** rng.integers(-2, 5) * (1 - 2**-22))
        out.append(x)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), cuts=st.lists(st.integers(1, 11), max_size=4))
def test_shards_merged_in_order_equal_one_pass(seed, n, cuts):
    """x: channel count and range vary; y (row-sampled, a fixed last axis like a linear's input)."""
    batches = _batches(seed, n)
    feeds = [{"x": b, "y": np.repeat(b[:, :1], 4, axis=1) * np.arange(4, dtype=np.float32)} for b in batches]
    one = Shard(("x", "y"), ("y",), 7, 3, {}, weight_rows={"y": 5})
    for i, feed in enumerate(feeds):
        one.add(i, feed, {})
    bounds = sorted({c for c in cuts if c < n} | {0, n})
    merged = None
    for lo, hi in zip(bounds, bounds[1:]):
        part = one.empty()
        for i in range(lo, hi):
            part.add(i, feeds[i], {})
        merged = part if merged is None else merged.merge(part)
    assert merged.feeds == one.feeds == n
    for name in ("x", "y"):
        assert_same_tensor_stats(merged.stats[name], one.stats[name])
        assert_same_tensor_stats(merged.held[name], one.held[name])
    assert_same_sample(merged.samples["y"], one.samples["y"])
    assert_same_sample(merged.weight_samples["y"], one.weight_samples["y"])
    # the weights' sample reads every feed, the choices' only the held-back ones (every third)
    assert one.weight_samples["y"].seen == sum(len(b) for b in batches)
    assert one.samples["y"].seen == sum(len(b) for i, b in enumerate(batches) if i % 3 == 2)


def test_histogram_range_does_not_depend_on_the_order_near_a_power_of_two():
    """A batch with abs-max just under 2 after one that set the range to 2: the range is the one the
    larger batch needs, whichever comes first (before, the order decided)."""
    small, large = np.array([1.0], np.float32), np.array([2 * (1 - 2**-22)], np.float32)
    ab, ba = TensorStats.empty(), TensorStats.empty()
    for x in (small, large):
        ab.update(x)
    for x in (large, small):
        ba.update(x)
    assert ab.hist_range == ba.hist_range == 4.0
    np.testing.assert_array_equal(ab.hist, ba.hist)


def test_row_sample_keeps_the_lowest_priorities_in_order():
    s = RowSample(max_rows=5)
    x = np.arange(40, dtype=np.float32).reshape(20, 2)
    s.update(x[:12], 0)
    s.update(x[12:], 1)
    prio = np.concatenate([np.random.default_rng((0, 0)).random(12), np.random.default_rng((0, 1)).random(8)])
    np.testing.assert_array_equal(s.rows, x[np.argsort(prio)[:5]])
    assert s.seen == 20


# a tiny graph calibrated end to end: 14 feeds (not a multiple of any task size), every 4th held back
def _calibrate(tmp_path, **kw) -> Calibration:
    path = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 14))
    src = open_source(path)
    graph = canonicalize(src.graph, src.description, 13)
    data = open_calibration(tmp_path / "c.npz", model_inputs(graph))
    kw.setdefault("providers", ("CPUExecutionProvider",))
    return calibrate(graph, ("X", "g"), data, source_dir=src.source_dir, progress=False, sampled=("g",),
                     sample_rows=10, holdout_every=4, keep_held_back=2, **kw)


def _assert_same_calibration(a: Calibration, b: Calibration) -> None:
    for name in a.stats:
        assert_same_tensor_stats(a.stats[name], b.stats[name])
        assert_same_tensor_stats(a.fit_stats[name], b.fit_stats[name])
    assert sorted(a.samples) == sorted(b.samples) == ["g"]
    np.testing.assert_array_equal(a.samples["g"], b.samples["g"])
    assert len(a.held_back) == len(b.held_back) == 2
    for fa, fb in zip(a.held_back, b.held_back):
        np.testing.assert_array_equal(fa["X"], fb["X"])
    assert a.feed_shapes == b.feed_shapes


def test_two_workers_give_the_single_process_calibration_even_after_a_failed_task(tmp_path, monkeypatch):
    one = _calibrate(tmp_path)
    monkeypatch.setenv(FAULT_ENV, "raise:1:1")  # task 1 raises on its first attempt only: run again
    _assert_same_calibration(_calibrate(tmp_path, workers=2), one)


@pytest.mark.slow  # .ci/run runs it (-m slow): a Ray cluster starts in ~8 s on the shared 2-core machine
def test_ray_local_cluster_gives_the_single_process_calibration(tmp_path):
    """One test: Ray's local start takes ~8 s on the shared 2-core machine (ray.init measured)."""
    pytest.importorskip("ray")
    started = time.perf_counter()
    _assert_same_calibration(_calibrate(tmp_path, workers=2, ray_address="local"), _calibrate(tmp_path))
    assert time.perf_counter() - started < 120
    if gpu_count() == 0:  # a GPU task on a cluster without GPUs would wait forever: refused at once
        with pytest.raises(UserError, match="--ray-address local: the Ray cluster has no GPU"):
            _calibrate(tmp_path, workers=2, ray_address="local",
                       providers=("CUDAExecutionProvider", "CPUExecutionProvider"))


def test_cli_workers_2_writes_the_bytes_of_workers_1_and_a_dead_worker_leaves_no_file(tmp_path, monkeypatch, capsys):
    """The bundled example (default config: DualScale checked on held-back feeds, row samples) and a model
    with every DualScale site on and a fallback target (held-back feeds scored at the output)."""
    monkeypatch.chdir(tmp_path)
    save(build_linear_model("matmul"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 30))
    runs = {"example": ["--example", "--no-eval"],
            "dual": ["m.onnx", "--calib", "c.npz", "--dualscale", "all", "--target-sqnr", "60"]}
    for name, args in runs.items():
        for workers in ("1", "2"):
            assert main(["quantize", *args, "-o", f"{name}_{workers}.onnx", "--workers", workers, "-q",
                         "--report", f"{name}_{workers}.json"]) == 0
        assert (tmp_path / f"{name}_1.onnx").read_bytes() == (tmp_path / f"{name}_2.onnx").read_bytes(), name
    dual = json.loads((tmp_path / "dual_2.json").read_text())
    assert any(d["apply"] for d in dual["dualscale"]) and dual["fallback"] is not None  # both features ran
    capsys.readouterr()
    monkeypatch.setenv(FAULT_ENV, "exit:0:2")  # task 0's process exits on both attempts
    assert main(["quantize", *runs["example"], "-o", "dead.onnx", "--workers", "2", "-q"]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "running it again" not in line]
    assert len(err) == 1, err
    assert re.match(r"segquant-onnx: error: calibration task 0 \(feeds 0-9\) failed twice on its worker \(its "
                    r"process exited with code 3\); rerun with fewer --workers", err[0]), err[0]
    assert not list(tmp_path.glob("dead*")) and not list(tmp_path.glob(".dead*"))


def test_searches_over_workers_give_the_single_process_bytes_and_a_dead_worker_is_one_sentence(tmp_path, monkeypatch,
                                                                                               capsys):
    """--preset best (held-back trials, per-site outlier search, sensitivity, the checked fallback) with the
    analysis runs spread over 2 workers: the bytes of one process, also when an analysis task fails once; an
    analysis task whose worker dies twice stops the run with one sentence and no file."""
    monkeypatch.chdir(tmp_path)
    save(build_linear_model("matmul"), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", X=calib_inputs("matmul", 30))
    args = ["quantize", "m.onnx", "--calib", "c.npz", "--preset", "best", "--target-sqnr", "60", "-q"]
    assert main([*args, "-o", "one.onnx", "--report", "one.json"]) == 0
    monkeypatch.setenv(FAULT_ENV, "raise:0:1:_run_outputs")  # each batch's first analysis task fails once
    assert main([*args, "-o", "two.onnx", "--workers", "2"]) == 0
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    report = json.loads((tmp_path / "one.json").read_text())
    assert report["fallback"] is not None and len(report["heldback_trials"]) > 1  # the searches ran
    capsys.readouterr()
    monkeypatch.setenv(FAULT_ENV, "exit:0:2:_run_outputs")  # the first analysis task's process exits twice
    assert main([*args, "-o", "dead.onnx", "--workers", "2"]) == 1
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "running it again" not in line]
    assert len(err) == 1, err
    assert re.match(r"segquant-onnx: error: analysis task 0 failed twice on its worker \(its process exited with "
                    r"code 3\); rerun with fewer --workers", err[0]), err[0]
    assert not list(tmp_path.glob("dead*")) and not list(tmp_path.glob(".dead*"))


def test_example_calibration_is_split_into_several_tasks():
    """The CLI test above compares real shards: 80 feeds over 2 workers are 10 tasks of 8."""
    assert open_calibration(example_path(EXAMPLE_CALIB), model_inputs(
        open_source(example_path(EXAMPLE_MODEL)).graph)).num_feeds == 80


def test_provider_options_put_one_gpu_per_worker():
    providers = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert provider_options(providers, worker=0, gpus=4) == [{"device_id": "0"}, {"device_id": "0"}, {}]
    assert [provider_options(providers, w, 2)[1]["device_id"] for w in range(5)] == ["0", "1", "0", "1", "0"]
    assert provider_options(("CUDAExecutionProvider",), worker=3, gpus=0) == [{"device_id": "0"}]
    assert provider_options(("CPUExecutionProvider",), worker=3, gpus=2) == [{}]


@pytest.mark.parametrize("visible,count", [("0,1,2", 3), ("", 0), ("-1", 0), ("3", 1)])
def test_gpu_count_follows_cuda_visible_devices(monkeypatch, visible, count):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu_count() == count


def test_config_refuses_bad_worker_counts():
    from segquant_onnx.config import RuntimeConfig

    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(UserError, match="--workers"):
            RuntimeConfig(workers=bad)
    assert RuntimeConfig(workers=3, ray_address="local").workers == 3


class _CountedSession:
    alive = 0

    def __init__(self):
        type(self).alive += 1

    def __del__(self):
        type(self).alive -= 1


_OPENED: list = []  # sessions alive at each opening (the Pipe pickles the sources: a module-level record)


class _CountingSource:
    """A SessionSource stand-in: records how many sessions were alive when it opened one."""

    def open(self, providers, options, threads=0):
        _OPENED.append(_CountedSession.alive)
        return _CountedSession()


def _task_ok(session, value):
    return value


def test_a_worker_drops_its_previous_session_before_it_opens_the_next_models():
    """One model at a time per worker: the session of the previous task's model is gone when the next opens."""
    import threading
    from multiprocessing import Pipe

    from segquant_onnx.calib.workers import _local_worker

    parent, child = Pipe()
    worker = threading.Thread(target=_local_worker, args=(child, ("CPUExecutionProvider",), None, 1))
    worker.start()
    _OPENED.clear()
    try:
        for i, key in enumerate(["a", "a", "b", "c"]):
            parent.send((i, 0, key, _CountingSource(), _task_ok, (i,)))
            assert parent.recv() == ("ok", i)
    finally:
        parent.send(None)
        worker.join(timeout=10)
    assert _OPENED == [0, 0, 0]  # three models, each opened with no other session alive
    assert _CountedSession.alive == 0


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), max_rows=st.integers(1, 9), sizes=st.lists(st.integers(0, 7), max_size=12),
       peek=st.integers(0, 12))
def test_row_sample_is_the_lowest_priority_rows_of_everything_offered(seed, max_rows, sizes, peek):
    """Rows stay in the slots they were written to, the sample's buffer grows as it fills, `rows` puts it in
    order (here also mid-way, after feed `peek`): always the max_rows rows of lowest key of all offered."""
    rng = np.random.default_rng(seed)
    sample, offered = RowSample(max_rows), []
    for i, n in enumerate(sizes):
        x = rng.standard_normal((n, 3)).astype(np.float32)
        sample.update(x, i)
        offered += [(p, i, j, row) for j, (p, row) in enumerate(zip(np.random.default_rng((0, i)).random(n), x))]
        if i == peek:
            sample.rows
    want = sorted(offered, key=lambda t: t[:3])[:max_rows]
    if not want:
        assert sample.rows is None
        return
    np.testing.assert_array_equal(sample.rows, np.stack([t[3] for t in want]))
    np.testing.assert_array_equal(sample.keys[1], [t[1] for t in want])
    np.testing.assert_array_equal(sample.keys[2], [t[2] for t in want])
    assert sample.seen == sum(sizes)
