"""Load an ONNX model into an onnx-graphsurgeon graph (external data stays lazy) and save atomically.

The input file is never modified. Output is written to a temporary directory beside the target and
renamed into place, so a failure never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx.external_data_helper as ext
import onnx.numpy_helper
import onnx_graphsurgeon as gs
from google.protobuf.message import DecodeError
from onnx_graphsurgeon.logger import G_LOGGER

from segquant_onnx.errors import UserError

log = logging.getLogger(__name__)

# Protobuf refuses to serialize a message over 2 GiB; stay clear of it.
EXTERNAL_DATA_THRESHOLD = int(1.8 * 1024**3)


@contextlib.contextmanager
def gs_quiet():
    """onnx-graphsurgeon's warnings (printed to stdout, where `inspect --json -` writes; e.g. that numpy has
    no FLOAT8E4M3FN type, which it handles) only with -v (INFO on the "segquant_onnx" logger)."""
    if logging.getLogger("segquant_onnx").isEnabledFor(logging.INFO):
        yield
        return
    severity, G_LOGGER.severity = G_LOGGER.severity, G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = severity


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    with gs_quiet():
        return gs.import_onnx(model)


@dataclass
class LoadedModel:
    graph: gs.Graph
    path: Path
    uses_external_data: bool
    size_bytes: int
    files: tuple[Path, ...] = ()  # the model file and its external data files: inputs of the run


class _ExternalValues(gs.ir.tensor.LazyValues):
    """LazyValues that know the directory of their external data file (gs's own do not)."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: str):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        return np.array(onnx.numpy_helper.to_array(self.tensor, base_dir=self.base_dir))


def relink_external_data(before: gs.Graph, after: gs.Graph) -> None:
    """`after` (re-imported from `before`'s export) reads its external weights from where `before` did."""
    dirs = {t.name: t._values.base_dir for t in before.tensors().values()
            if isinstance(t, gs.Constant) and isinstance(t._values, _ExternalValues)}
    for tensor in after.tensors().values():
        lazy = isinstance(tensor, gs.Constant) and isinstance(tensor._values, gs.ir.tensor.LazyValues)
        if lazy and tensor.name in dirs:
            tensor._values = _ExternalValues(tensor._values.tensor, dirs[tensor.name])
            tensor.data_location = None


def external_tensors(model: onnx.ModelProto):
    return [t for t in ext._get_all_tensors(model) if ext.uses_external_data(t)]


def load_model(path: str | os.PathLike) -> LoadedModel:
    """Read `path` without touching it; weights stored as external data are read only when needed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Model file {path} does not exist; check the path.")
    if not os.access(path, os.R_OK):
        raise UserError(f"Model file {path} is not readable; check its permissions.")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise UserError(f"{path} is not an ONNX model ({type(exc).__name__}); pass a .onnx file.") from None
    if not model.graph.node:
        raise UserError(f"{path} is not an ONNX model (it has no graph nodes); pass a .onnx file.")

    base_dir = str(path.parent)
    external = external_tensors(model)
    size = model.ByteSize()
    files = [path]
    for tensor in external:
        info = ext.ExternalDataInfo(tensor)
        data_file = path.parent / info.location
        if not data_file.is_file():
            raise UserError(
                f"External data file {data_file} for tensor '{tensor.name}' of {path} is missing; "
                "keep the .data file next to the model."
            )
        size += int(info.length) if info.length else data_file.stat().st_size
        files += [data_file] if data_file not in files else []

    graph = import_graph(model)
    external_names = {t.name for t in external}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            # gs would stamp the input's data_location on re-created tensors; lazy ones keep their own
            tensor.data_location = None
        if isinstance(tensor, gs.Constant) and tensor.name in external_names:
            if isinstance(tensor._values, gs.ir.tensor.LazyValues):
                tensor._values = _ExternalValues(tensor._values.tensor, base_dir)
            else:  # gs loaded it eagerly: give it the real values
                tensor.values = onnx.numpy_helper.to_array(tensor._values.tensor, base_dir=base_dir)
    log.info("loaded %s (%d nodes, %.1f MB)", path, len(graph.nodes), size / 1e6)
    return LoadedModel(graph=graph, path=path, uses_external_data=bool(external), size_bytes=size, files=tuple(files))


@dataclass(frozen=True)
class Source:
    """The model a run reads: its graph, where it lives (None for an in-memory ModelProto; external data
    is read from `source_dir`), its size, how messages name it, and its files (inputs never written)."""

    graph: gs.Graph
    path: Path | None
    source_dir: str | None
    size: int
    description: str
    uses_external_data: bool = False
    files: tuple[Path, ...] = ()


def open_source(model) -> Source:
    """`model` as a path (load_model: validated, weights lazy) or an onnx.ModelProto."""
    if isinstance(model, onnx.ModelProto):
        return Source(import_graph(model), None, None, model.ByteSize(), "the model")
    loaded = load_model(model)
    return Source(loaded.graph, loaded.path, str(loaded.path.parent), loaded.size_bytes, str(loaded.path),
                  loaded.uses_external_data, loaded.files)


def constant_values(tensor: gs.Constant) -> np.ndarray:
    """A constant's values, read without caching them in the graph (large weights stay lazy)."""
    if isinstance(tensor._values, gs.ir.tensor.LazyValues):
        return tensor._values.load()
    return tensor.values


SUB_BYTE = (np.dtype(ml_dtypes.int4),)  # stored two a byte


def packed_constant(name: str, values: np.ndarray) -> gs.Constant:
    """A constant whose values onnx packs as it stores them (INT4: two a byte). onnx-graphsurgeon 0.6 writes
    an in-memory INT4 array one byte per value, which onnx rejects, so the constant holds onnx's own packed
    TensorProto (gs exports lazy values as they are)."""
    return gs.Constant(name, gs.ir.tensor.LazyValues(onnx.numpy_helper.from_array(values, name)))


def export_model(graph: gs.Graph) -> onnx.ModelProto:
    """The graph as a ModelProto with the lowest IR version its opsets allow (ONNX Runtime and
    TensorRT lag behind onnx's newest IR version)."""
    for t in graph.tensors().values():  # sub-byte constants someone read into memory: packed again
        if isinstance(t, gs.Constant) and not isinstance(t._values, gs.ir.tensor.LazyValues) \
                and t.values.dtype in SUB_BYTE:
            t._values = packed_constant(t.name, t.values)._values
    model = gs.export_onnx(graph)
    model.ir_version = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    return model


def tensor_bytes(t: onnx.TensorProto) -> int:
    """Bytes a stored tensor takes: its external data, its raw bytes, or its element count at its type's width
    (INT4 two a byte)."""
    if ext.uses_external_data(t):
        return int(ext.ExternalDataInfo(t).length or 0)
    if t.raw_data:
        return len(t.raw_data)
    n = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (n + 1) // 2
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def weight_bytes(model: onnx.ModelProto, float_weights: tuple[str, ...] = ()) -> int:
    """Bytes of the model's weights: every stored-quantized weight (a constant a DequantizeLinear reads, with
    its scale and zero point) and the float initializers named in `float_weights`."""
    inits = {t.name: t for t in model.graph.initializer}
    names = {n for n in float_weights if n in inits}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            names.update(i for i in node.input if i in inits)
    return sum(tensor_bytes(inits[n]) for n in names)


def model_size(model: onnx.ModelProto) -> int:
    """Bytes the model would take on disk with all its weights (external ones counted too)."""
    external = sum(int(ext.ExternalDataInfo(t).length or 0) for t in external_tensors(model))
    return model.ByteSize() + external


BaseDir = str | Callable[[str], str] | None  # a folder, or a function of the location to the folder it is in


def external_base(base_dir: BaseDir, tensor: onnx.TensorProto) -> str:
    """The folder `tensor`'s external data is read from: `base_dir`, or `base_dir(location)`."""
    if callable(base_dir):
        return base_dir(ext.ExternalDataInfo(tensor).location) if ext.uses_external_data(tensor) else ""
    return base_dir or ""


def point_to_external(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    """Make `tensor` refer to `length` bytes at `offset` of the external file `location` (what
    onnx.external_data_helper.set_external_data writes, without putting the bytes into the message first:
    protobuf keeps a message's bytes until the whole message is freed, even after ClearField)."""
    tensor.ClearField("raw_data")
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    tensor.data_location = onnx.TensorProto.EXTERNAL


def write_external(model: onnx.ModelProto, folder: Path, data_name: str, base_dir: BaseDir,
                   keep_external: bool = False) -> None:
    """Move every tensor of `model` of at least 1 kB, inline or external (read from `base_dir`; left where it
    is with `keep_external`), into `folder/data_name`, one tensor at a time, appended in onnx.save_model's
    order: the file onnx writes for external data, without holding every weight in memory."""
    with open(folder / data_name, "ab") as f:
        for tensor in ext._get_all_tensors(model):
            if ext.uses_external_data(tensor):
                if keep_external:
                    continue
                data = ext._read_external_data_bytes(tensor, external_base(base_dir, tensor))
            elif tensor.HasField("raw_data"):
                data = tensor.raw_data
            else:
                continue
            if len(data) < 1024:
                if ext.uses_external_data(tensor):  # onnx keeps small tensors inline
                    del tensor.external_data[:]
                    tensor.data_location = onnx.TensorProto.DEFAULT
                    tensor.raw_data = data
                continue
            offset = f.tell()
            f.write(data)
            point_to_external(tensor, data_name, offset, len(data))
    if not (folder / data_name).stat().st_size:
        (folder / data_name).unlink()


def save_model(
    model: onnx.ModelProto,
    out_path: str | os.PathLike,
    *,
    source_dir: BaseDir,
    external: bool | None = None,
) -> Path:
    """Write `model` to `out_path` atomically.

    `source_dir` is where tensors still referring to external data live. With `external=None` the weights
    go to `<out>.data` when the model refers to external data or is over ~1.8 GB; with external data they
    are copied one tensor at a time (a multi-GB model is never in memory at once).
    """
    out = Path(out_path)
    refers_outside = bool(external_tensors(model))
    if external is None:
        external = refers_outside or model_size(model) > EXTERNAL_DATA_THRESHOLD
    if refers_outside and not external:
        for tensor in external_tensors(model):
            ext.load_external_data_for_tensor(tensor, external_base(source_dir, tensor))

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))
    try:
        tmp_model = tmp_dir / out.name
        data_name = f"{out.name}.data"
        if external:
            # what onnx's convert_model_to_external_data does, minus its check for `location` in the
            # *current* directory, which has nothing to do with where the file is written
            write_external(model, tmp_dir, data_name, source_dir)
            onnx.save_model(model, str(tmp_model))
            onnx.checker.check_model(str(tmp_model))  # by path: the weights are in the .data file now
            if (tmp_dir / data_name).exists():  # onnx writes none when every tensor is tiny
                os.replace(tmp_dir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    log.info("wrote %s%s", out, " (+ external data)" if external else "")
    return out


def model_files(path) -> tuple[Path, ...]:
    """The files a model is read from: the .onnx and its external data files (for the output checks;
    a path that is not a readable model is just itself, and loading it later says what is wrong)."""
    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable file: load_model gives the one-line error
        return (path,)
    data = dict.fromkeys(path.parent / ext.ExternalDataInfo(t).location for t in external_tensors(model))
    return (path, *data)
