"""Weights on disk, not in memory: a run's scratch store for the weights it makes.

A multi-GB model must not be held in memory more than once. The input's weights stay lazy (graph_io), but a
run makes weights of its own: SegLinear's segment slices, the quantized INT8/FP8 weights of the output and of
every candidate graph a search scores. Held as numpy arrays they would also be copied into each exported
ModelProto, into the bytes given to ONNX Runtime, and into ONNX Runtime itself. `WeightStore.spill` writes
every such array of at least SPILL_BYTES to a file in the run's scratch folder and leaves a lazy reference in
the graph, so exported models stay small and ONNX Runtime reads (memory-maps) the weights from disk.

ONNX Runtime resolves external data in one folder and refuses paths that leave it (symbolic links included),
so once the run spills a weight, sessions are created in the scratch folder with the input's external data
files hard-linked beside the spilled ones (`WeightStore.session_folder`). Models whose tensors are all smaller
than SPILL_BYTES (the tiny test models) never spill and run exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx.external_data_helper as ext
import onnx_graphsurgeon as gs

from segquant_onnx.ir.graph_io import _ExternalValues, point_to_external

log = logging.getLogger(__name__)

SPILL_BYTES = 1 << 20  # an array this large or larger goes to disk (tests lower it to exercise the path)
SPILL_PREFIX = "segquant_spill_"  # the spill files' names: never one of the input's (mirrored beside them)


class StoredWeights:
    """The quantized weights a run stored, by what they were made from, so that a weight is quantized and written
    to disk once a run: the held-back search scores candidate graphs that quantize mostly the same weights with
    the same scales (weight scales depend on the weight alone unless smoothing or outliers change it), and the
    output graph quantizes them once more. Measured on a 2 GiB float16 DiT: 3 x 1.1 GB quantized and written.

    A key is the source weight's place on disk (an input or spilled weight: in-memory ones, e.g. smoothed weights,
    have none and are not kept), its type and shape, the stored scale's bytes, type and shape, the axis and the
    format: everything QuantizeLinear's output depends on. An entry is reused only once its graph was spilled (its
    bytes are in a store file, which lives as long as the store): the new constant gets its own reference to
    those bytes. Give it only to rewrites of graphs that are spilled next (it holds their constants till then)."""

    def __init__(self):
        self._made: dict[tuple, gs.Constant] = {}
        self.hits = 0

    @staticmethod
    def key(source: gs.Constant, scale: np.ndarray, axis: int | None, fmt) -> tuple | None:
        """What a stored weight made from `source` with `scale` depends on; None where `source` is not on disk."""
        values = source._values
        if not isinstance(values, _ExternalValues):
            return None
        info = onnx.external_data_helper.ExternalDataInfo(values.tensor)
        scale = np.ascontiguousarray(scale)
        return (values.base_dir, info.location, info.offset, info.length, values.tensor.data_type,
                tuple(values.tensor.dims), scale.tobytes(), scale.dtype.str, scale.shape, axis, fmt)

    def find(self, key: tuple | None) -> _ExternalValues | None:
        """Values for a new constant that reads the stored bytes of `key`, if they are on disk."""
        made = None if key is None else self._made.get(key)
        if made is None or not isinstance(made._values, _ExternalValues):
            return None
        self.hits += 1
        proto = onnx.TensorProto()
        proto.CopyFrom(made._values.tensor)  # its own message: onnx-graphsurgeon renames it when exporting
        return _ExternalValues(proto, made._values.base_dir)

    def keep(self, key: tuple | None, constant: gs.Constant) -> None:
        if key is not None and key not in self._made and constant.values.nbytes >= SPILL_BYTES:
            self._made[key] = constant


class WeightStore:
    """Where a run's external weights are: the input's own folder and, once the run spilled weights, the scratch
    folder `tmp_dir` with the spilled weights (`segquant_spill_<n>.data`, one file per spill); `stored`: the
    quantized weights among them, for rewrites to reuse (StoredWeights)."""

    def __init__(self, source_dir: str | None, tmp_dir: str, external_files: tuple[Path, ...] = ()):
        self.source_dir, self.tmp_dir = source_dir, tmp_dir
        self._external = [Path(f) for f in external_files]
        self._copied, self._spills = False, 0
        self.stored = StoredWeights()

    def locate(self, location: str) -> str:
        """The folder the external data file `location` is in (graph_io.BaseDir)."""
        return self.tmp_dir if location.startswith(SPILL_PREFIX) else self.source_dir or ""

    @contextlib.contextmanager
    def session_folder(self):
        """The one folder ONNX Runtime reads every external weight from while a session is created: the input's
        folder until the run spills, then tmp_dir with the input's data files hard-linked in for that time
        only: ONNX Runtime maps the weights when the session is created, and onnx refuses to read a file with
        more than one link (graph_io reads the input's weights one at a time between sessions). Where no link
        can be made (another file system) the files are copied once, for the rest of the run."""
        if not self._spills:
            yield self.source_dir
            return
        links = []
        try:
            for path in [] if self._copied else self._external:
                target = Path(self.tmp_dir) / path.relative_to(self.source_dir)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(path, target)
                    links.append(target)
                except OSError:  # a copy costs disk and time, not memory
                    log.info("copying %s into the scratch folder (no hard link possible)", path)
                    shutil.copyfile(path, target)
                    self._copied = True
            yield self.tmp_dir
        finally:
            for link in links:
                link.unlink()

    def spill(self, graph: gs.Graph) -> int:
        """Write every in-memory constant of `graph` of at least SPILL_BYTES to a new data file in tmp_dir and
        leave a lazy reference in its place; the number of bytes written."""
        big = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)
               and not isinstance(t._values, gs.ir.tensor.LazyValues) and t.values.nbytes >= SPILL_BYTES]
        if not big:
            return 0
        name = f"{SPILL_PREFIX}{self._spills}.data"
        self._spills += 1
        written = 0
        with open(Path(self.tmp_dir) / name, "wb") as f:
            for tensor in big:
                values = np.ascontiguousarray(tensor.values)
                # the message gets the reference only: bytes put into a protobuf message stay allocated until
                # the message is freed, ClearField or not (1 GB per spill of a 2 GB model, measured)
                proto = onnx.TensorProto(name=tensor.name, dims=values.shape,
                                         data_type=onnx.helper.np_dtype_to_tensor_dtype(values.dtype))
                point_to_external(proto, name, written, values.nbytes)
                f.write(values.reshape(-1).view(np.uint8).data)  # bytes view: buffers refuse bfloat16
                written += values.nbytes
                tensor._values = _ExternalValues(proto, self.tmp_dir)
                tensor.data_location = None
        log.info("spilled %d weights (%.1f MB) to %s", len(big), written / 1e6, name)
        return written



def load_spilled(model: onnx.ModelProto, store: WeightStore) -> None:
    """Load the tensors of `model` that refer to the store's spill files back into it (before the scratch
    folder is removed); references to the input's own external data stay."""
    for tensor in ext._get_all_tensors(model):
        if ext.uses_external_data(tensor) and ext.ExternalDataInfo(tensor).location.startswith(SPILL_PREFIX):
            ext.load_external_data_for_tensor(tensor, store.tmp_dir)
