"""Calibration data: every validation names the input/file; the layouts stream the right feeds."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from segquant_onnx.calib.data import DEFAULT_DYNAMIC_BATCH, InputSpec, model_inputs, open_calibration
from segquant_onnx.errors import UserError

F32 = np.dtype(np.float32)
X = InputSpec("x", F32, (1, 8, 16))  # static batch 1
T = InputSpec("t", np.dtype(np.int64), (1,))  # e.g. a timestep
DYN = InputSpec("x", F32, ("batch", 8, 16))  # dynamic batch


def rand(*shape, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# -- up-front validation --------------------------------------------------------------------------
def test_valid_file_opens_and_counts_feeds(write_npz):
    path = write_npz(x=rand(5, 8, 16), t=np.arange(5, dtype=np.int64))
    data = open_calibration(path, [X, T])
    assert len(data) == data.num_feeds == 5
    feeds = list(data)
    assert len(feeds) == 5
    assert all(set(f) == {"x", "t"} for f in feeds)
    assert feeds[3]["x"].shape == (1, 8, 16) and feeds[3]["t"].tolist() == [3]


def test_missing_input_is_named(write_npz):
    path = write_npz(x=rand(4, 8, 16))
    with pytest.raises(UserError, match=r"'t'") as exc:
        open_calibration(path, [X, T])
    assert str(path) in str(exc.value)


def test_extra_array_warns_and_is_ignored(write_npz, caplog):
    path = write_npz(x=rand(3, 8, 16), attention_mask=rand(3, 8))
    with caplog.at_level(logging.WARNING, logger="segquant_onnx"):
        data = open_calibration(path, [X])
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "attention_mask" in warnings[0].getMessage()
    assert [set(f) for f in data] == [{"x"}] * 3


def test_wrong_dtype_is_named(write_npz):
    path = write_npz(x=rand(4, 8, 16, dtype=np.float64))
    with pytest.raises(UserError, match=r"'x'.*float64.*float32") as exc:
        open_calibration(path, [X])
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("shape", [(4, 128), (8,), (2, 2, 1, 8, 16)])
def test_wrong_rank_is_named(write_npz, shape):
    path = write_npz(x=rand(*shape))
    with pytest.raises(UserError, match=r"'x'.*rank") as exc:
        open_calibration(path, [X])
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("shape", [(4, 8, 15), (4, 1, 9, 16), (4, 2, 8, 16)])
def test_wrong_static_dim_is_named(write_npz, shape):
    path = write_npz(x=rand(*shape))
    with pytest.raises(UserError, match=r"'x'.*shape") as exc:
        open_calibration(path, [X])
    assert str(path) in str(exc.value)


def test_inputs_disagreeing_on_sample_count(write_npz):
    path = write_npz(x=rand(4, 8, 16), t=np.arange(3, dtype=np.int64))
    with pytest.raises(UserError, match="number of samples") as exc:
        open_calibration(path, [X, T])
    assert "('x': 4 samples, 't': 3 samples)" in str(exc.value)  # batch 1: samples are feeds


def test_dynamic_batch_disagreement_counts_samples_and_batches(write_npz):
    """16 and 24 samples cut into batches of 8 are 2 and 3 batches: the message says which is which."""
    t_dyn = InputSpec("t", np.dtype(np.int64), ("batch",))
    path = write_npz(x=rand(16, 8, 16), t=np.arange(24, dtype=np.int64))
    with pytest.raises(UserError, match="number of samples") as exc:
        open_calibration(path, [DYN, t_dyn])
    assert "('x': 16 samples (2 batches of 8), 't': 24 samples (3 batches of 8))" in str(exc.value)


def test_stacked_disagreement_counts_every_sample_of_each_feed(write_npz):
    t_dyn = InputSpec("t", np.dtype(np.int64), ("batch",))
    path = write_npz(x=rand(3, 4, 8, 16), t=np.arange(8, dtype=np.int64))  # 3 stacked feeds of 4; batch 4
    with pytest.raises(UserError) as exc:
        open_calibration(path, [DYN, t_dyn], batch_size=4)
    assert "('x': 12 samples (3 batches of 4), 't': 8 samples (2 batches of 4))" in str(exc.value)


def test_same_samples_cut_into_different_batches_is_a_batch_mismatch(write_npz):
    t_dyn = InputSpec("t", np.dtype(np.int64), ("batch",))
    path = write_npz(x=rand(4, 4, 8, 16), t=np.arange(16, dtype=np.int64))  # 4 feeds of 4 vs batches of 8
    with pytest.raises(UserError) as exc:
        open_calibration(path, [DYN, t_dyn])
    assert ("disagree on the number of batches ('x': 16 samples (4 batches of 4), 't': 16 samples "
            "(2 batches of 8))") in str(exc.value)


# -- the data's role (calibration, eval, compare) names it and its flag ------------------------------
ROLE_WORDS = [("calibration", "Calibration data", "--calib"), ("eval", "Eval data", "--eval"),
              ("compare", "Compare data", "--data"), ("polygraphy", "Polygraphy data", "SEGQUANT_DATA")]


@pytest.mark.parametrize("role, title, flag", ROLE_WORDS)
def test_messages_name_the_role_and_its_flag(write_npz, role, title, flag):
    path = write_npz("data.npz", x=rand(4, 8, 16))
    with pytest.raises(UserError) as exc:
        open_calibration(path, [X, T], role=role)
    msg = str(exc.value)
    assert msg.startswith(f"{title} file {path} ({flag}) has no array for model input 't'")
    if role != "calibration":
        assert "alibration" not in msg


@pytest.mark.parametrize("make, needle", [
    (lambda w: w(x=rand(4, 8, 16, dtype=np.float64)), "array 'x'"),
    (lambda w: w(x=rand(4, 8)), "array 'x'"),
    (lambda w: w(x=rand(0, 8, 16)), "zero samples"),
    (lambda w: Path("/nonexistent/eval.npz"), "does not exist"),
])
def test_every_file_message_says_eval(write_npz, make, needle):
    with pytest.raises(UserError) as exc:
        open_calibration(make(write_npz), [X], role="eval")
    msg = str(exc.value)
    assert msg.startswith("Eval data") and "(--eval)" in msg and needle in msg and "alibration" not in msg


def test_nan_in_eval_data_says_eval(write_npz):
    x = rand(2, 8, 16)
    x[1, 0, 0] = np.nan
    path = write_npz(x=x)
    with pytest.raises(UserError, match=r"^Eval data input 'x' in .* \(--eval\), feed 1 contains NaN"):
        list(open_calibration(path, [X], role="eval"))


def test_python_feed_messages_say_eval():
    with pytest.raises(UserError, match=r"^Eval data feed 0 has no value for model input 'x'"):
        list(open_calibration([{}], [X], role="eval"))


def test_an_unknown_role_is_a_programming_error(write_npz):
    with pytest.raises(ValueError, match="role"):
        open_calibration(write_npz(x=rand(2, 8, 16)), [X], role="evaluation")


def test_quantize_names_a_bad_eval_file_as_eval_data(tmp_path, write_npz):
    from conftest import build_linear_model, calib_inputs, save

    from segquant_onnx.pipeline import quantize

    model = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    calib = write_npz("calib.npz", X=calib_inputs("matmul", 2))
    bad_eval = write_npz("eval.npz", Y=calib_inputs("matmul", 2))
    with pytest.raises(UserError) as exc:
        quantize(model, calib, eval_data=bad_eval, progress=False)
    msg = str(exc.value)
    assert msg.startswith(f"Eval data file {bad_eval} (--eval) has no array for model input 'X'")
    assert "alibration" not in msg


def test_compare_names_a_bad_data_file_as_compare_data(tmp_path, write_npz):
    from conftest import build_linear_model, calib_inputs, save

    from segquant_onnx.analysis.compare import compare_models

    model = save(build_linear_model("matmul"), tmp_path / "m.onnx")
    bad = write_npz("eval.npz", X=calib_inputs("matmul", 2).astype(np.float64))
    with pytest.raises(UserError) as exc:
        compare_models(model, model, bad, progress=False)
    msg = str(exc.value)
    assert msg.startswith(f"Compare data array 'X' in {bad} (--data) is float64") and "alibration" not in msg


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_at_iteration(write_npz, bad):
    x = rand(4, 8, 16)
    x[2, 3, 5] = bad
    path = write_npz(x=x)
    data = open_calibration(path, [X])  # the data is not read up front
    it = iter(data)
    assert [next(it)["x"].shape for _ in range(2)] == [(1, 8, 16)] * 2  # feeds before the bad one stream
    with pytest.raises(UserError, match=r"'x'.*NaN or Inf") as exc:
        next(it)
    assert str(path) in str(exc.value) and "feed 2" in str(exc.value)


def test_integer_inputs_skip_the_finite_check(write_npz):
    path = write_npz(x=rand(2, 8, 16), t=np.array([-1, 2**40], np.int64))
    assert len(list(open_calibration(path, [X, T]))) == 2


@pytest.mark.parametrize("n, spec, held", [
    (0, X, "holds zero samples; it needs at least one full batch (1 sample)"),
    (DEFAULT_DYNAMIC_BATCH - 1, DYN, "holds 7 samples, fewer than one batch of 8; it needs at least one full "
                                     "batch (8 samples)"),
])
def test_zero_samples(write_npz, n, spec, held):
    """No samples at all, or fewer than one full batch of a dynamic-batch model."""
    path = write_npz(x=rand(n, 8, 16))
    with pytest.raises(UserError) as exc:
        open_calibration(path, [spec])
    assert str(exc.value) == f"Calibration data {path} (--calib) {held}."


@pytest.mark.parametrize("content", [b"not a zip at all", b"", b"PK\x03\x04garbage"])
def test_not_a_zip_file(tmp_path, content):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    with pytest.raises(UserError, match="not a readable .npz") as exc:
        open_calibration(path, [X])
    assert str(path) in str(exc.value)


def test_a_plain_npy_file_is_not_an_npz(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, rand(4, 8, 16))
    with pytest.raises(UserError, match=str(path)):
        open_calibration(path, [X])


def test_missing_path(tmp_path):
    with pytest.raises(UserError, match="does not exist") as exc:
        open_calibration(tmp_path / "nope.npz", [X])
    assert "nope.npz" in str(exc.value)


# -- directories ------------------------------------------------------------------------------------
def test_directory_streams_every_file_in_sorted_order(tmp_path, write_npz):
    # written out of order, with different feed counts; a non-.npz file is ignored
    for name, start, n in [("c.npz", 100, 1), ("a.npz", 0, 3), ("b.npz", 10, 2)]:
        x = np.stack([np.full((8, 16), start + i, np.float32) for i in range(n)])
        write_npz(f"shards/{name}", x=x)
    (tmp_path / "shards" / "notes.txt").write_text("not calibration data")
    data = open_calibration(tmp_path / "shards", [X])
    assert len(data) == 6
    firsts = [float(f["x"][0, 0, 0]) for f in data]
    assert firsts == [0, 1, 2, 10, 11, 100]


def test_directory_validates_every_file(tmp_path, write_npz):
    write_npz("shards/a.npz", x=rand(2, 8, 16))
    bad = write_npz("shards/b.npz", x=rand(2, 8, 16, dtype=np.float16))
    with pytest.raises(UserError, match="float16") as exc:
        open_calibration(tmp_path / "shards", [X])
    assert str(bad) in str(exc.value)


def test_directory_without_npz(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "data.npy").write_bytes(b"")
    with pytest.raises(UserError, match="no .npz") as exc:
        open_calibration(d, [X])
    assert str(d) in str(exc.value)


# -- layouts ----------------------------------------------------------------------------------------
def test_stacked_and_batched_layouts_give_the_same_feeds(write_npz):
    x = rand(5, 8, 16, seed=3)
    batched = list(open_calibration(write_npz("batched.npz", x=x), [X]))
    stacked = list(open_calibration(write_npz("stacked.npz", x=x[:, None]), [X]))  # rank + 1
    assert len(batched) == len(stacked) == 5
    for i, (b, s) in enumerate(zip(batched, stacked)):
        np.testing.assert_array_equal(b["x"], x[i:i + 1])
        np.testing.assert_array_equal(s["x"], x[i:i + 1])
        assert b["x"].flags.c_contiguous and s["x"].flags.c_contiguous


def test_static_batch_cuts_batched_layout(write_npz):
    spec = InputSpec("x", F32, (2, 8, 16))
    x = rand(6, 8, 16)
    feeds = list(open_calibration(write_npz(x=x), [spec]))
    assert len(feeds) == 3
    np.testing.assert_array_equal(feeds[1]["x"], x[2:4])


def test_dynamic_batch_uses_batch_size_and_warns_about_the_remainder(write_npz, caplog):
    x = rand(10, 8, 16)
    with caplog.at_level(logging.WARNING, logger="segquant_onnx"):
        data = open_calibration(write_npz(x=x), [DYN], batch_size=4)
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(msgs) == 1 and "'x'" in msgs[0] and "10 samples" in msgs[0] and "last 2" in msgs[0]
    feeds = list(data)
    assert [f["x"].shape for f in feeds] == [(4, 8, 16), (4, 8, 16)]
    np.testing.assert_array_equal(feeds[1]["x"], x[4:8])


def test_dynamic_batch_defaults_to_eight_without_a_warning_when_it_divides(write_npz, caplog):
    with caplog.at_level(logging.WARNING, logger="segquant_onnx"):
        data = open_calibration(write_npz(x=rand(16, 8, 16)), [DYN])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [f["x"].shape[0] for f in data] == [DEFAULT_DYNAMIC_BATCH] * 2


def test_stacked_layout_with_dynamic_batch_keeps_each_feed(write_npz):
    x = rand(3, 5, 8, 16)  # 3 feeds of batch 5
    feeds = list(open_calibration(write_npz(x=x), [DYN]))
    assert len(feeds) == 3 and feeds[2]["x"].shape == (5, 8, 16)
    np.testing.assert_array_equal(feeds[2]["x"], x[2])


def test_data_can_be_iterated_twice(write_npz):
    data = open_calibration(write_npz(x=rand(3, 8, 16)), [X])
    first, second = list(data), list(data)
    assert len(first) == len(second) == 3
    np.testing.assert_array_equal(first[2]["x"], second[2]["x"])


def test_model_inputs_reads_names_dtypes_and_dynamic_dims():
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16])],
    )
    (spec,) = model_inputs(gs.import_onnx(helper.make_model(graph)))
    assert spec.name == "x" and spec.dtype == F32 and spec.shape == ("batch", 8, 16)
    assert spec.static_batch is None and X.static_batch == 1


# -- Python iterables ------------------------------------------------------------------------------
def test_python_feeds_are_validated_one_by_one():
    good = {"x": rand(1, 8, 16), "t": np.array([1], np.int64), "unused": 3}
    bad = {"x": rand(1, 8, 16, dtype=np.float64), "t": np.array([1], np.int64)}
    data = open_calibration(iter([good, good, bad]), [X, T])
    assert data.num_feeds is None
    with pytest.raises(TypeError):
        len(data)
    it = iter(data)
    first = next(it)
    assert set(first) == {"x", "t"}  # keys that are not model inputs are dropped
    next(it)
    with pytest.raises(UserError, match=r"'x'.*feed 2.*float64"):
        next(it)


@pytest.mark.parametrize("feed, match", [
    ({"t": np.array([1], np.int64)}, r"feed 0.*'x'"),
    ({"x": rand(1, 8, 16)[0], "t": np.array([1], np.int64)}, r"'x'.*feed 0.*shape"),
    ({"x": rand(1, 8, 15), "t": np.array([1], np.int64)}, r"'x'.*feed 0.*shape"),
    ({"x": np.full((1, 8, 16), np.nan, np.float32), "t": np.array([1], np.int64)}, r"'x'.*feed 0.*NaN"),
])
def test_python_feed_errors_name_the_input_and_feed(feed, match):
    with pytest.raises(UserError, match=match):
        list(open_calibration([feed], [X, T]))


def test_python_feeds_accept_dynamic_dims():
    feeds = [{"x": rand(3, 8, 16)}, {"x": rand(5, 8, 16)}]
    assert [f["x"].shape[0] for f in open_calibration(feeds, [DYN])] == [3, 5]


def test_a_dict_of_arrays_is_refused():
    with pytest.raises(UserError, match="iterable of feed dicts"):
        open_calibration({"x": rand(2, 8, 16)}, [X])
