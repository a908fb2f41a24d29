"""Same input, same bytes: the quantized graphs match the sha256 values in tests/golden_outputs.json.

The cases and their computation live in scripts/golden_outputs.py (`record` rewrites the JSON after a
change that alters outputs on purpose; `check` prints which cases differ). The hashes hold for the machine
they were recorded on: elsewhere (other library versions, other CPU instruction sets) the tests skip and
say what differs (`pytest -rs`).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "golden_outputs.py"
_spec = importlib.util.spec_from_file_location("golden_outputs", _SCRIPT)
golden = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("golden_outputs", golden)  # dataclasses look their module up there
_spec.loader.exec_module(golden)

RECORDED = json.loads(golden.GOLDEN_PATH.read_text())


def test_every_case_is_recorded():
    assert sorted(RECORDED["cases"]) == sorted(golden.case_id(m, c) for m, c in golden.CASES), (
        "the recorded cases are not the script's: run `python scripts/golden_outputs.py record`")


@pytest.fixture(scope="module")
def same_machine():
    for module in ("torch", "diffusers", "onnxscript"):
        pytest.importorskip(module)
    if diff := golden.fingerprint_mismatch(RECORDED["fingerprint"], golden.machine_fingerprint()):
        pytest.skip("golden hashes were recorded on another machine (" + "; ".join(diff) + ")")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("golden")


@pytest.fixture(scope="module")
def prepared(same_machine, workdir, tiny_export):
    """prepared(model name) -> golden.Input; the tiny models are the session's exports (conftest.tiny_export:
    the same exporter and seed as the script's), copied into this module's folder."""
    cache: dict[str, object] = {}

    def _get(name: str):
        if name not in cache:
            exported = None
            if name in golden.EXPORTS:
                assert golden.EXPORT_SEED == 0  # tiny_export's seed: the export functions' default
                exported, _ = tiny_export(*golden.EXPORTS[name])
            cache[name] = golden.prepare_model(name, workdir, exported)
        return cache[name]

    return _get


@pytest.mark.parametrize("model,config", golden.CASES, ids=[golden.case_id(m, c) for m, c in golden.CASES])
def test_quantized_bytes_match_recording(model, config, prepared, workdir):
    recorded = RECORDED["cases"][golden.case_id(model, config)]
    inp = prepared(model)
    assert inp.model_sha256 == recorded["input_sha256"], (
        f"the input model {model} is not byte-identical to the recorded one (the export changed, not the "
        "quantizer): the output hashes cannot be compared")
    outputs, _ = golden.quantize_case(inp, config, workdir)
    assert outputs == recorded["outputs"], (
        f"{model} quantized with {config} is not byte-identical to the recording; if the change is meant, "
        "say why in the commit and run `python scripts/golden_outputs.py record`")
