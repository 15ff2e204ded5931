"""Models above the external-data threshold (2 GB by default) are written as out.onnx + out.onnx.data.

The threshold is lowered with the hidden ``--external-data-threshold`` option so a small, wide
model takes the same path (temporary-file export, external-data save, validation) as a > 2 GB one.
"""

from __future__ import annotations

import json
import shutil

import onnx
from click.testing import CliRunner
from onnx.external_data_helper import uses_external_data

from edgeq.cli import main
from edgeq.onnx.safe_load import external_locations


def test_wide_model_is_written_with_external_data_and_validates(tmp_path, tiny_model):
    model = tiny_model(hidden=128)  # ~0.6 MB of FP32 weights
    out = tmp_path / "out" / "wide.onnx"
    out.parent.mkdir()
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "16", "--external-data-threshold", "100000",
                                    str(model), str(out)])
    assert res.exit_code == 0, res.stderr
    data = out.with_name("wide.onnx.data")
    assert sorted(p.name for p in out.parent.iterdir()) == ["wide.json", "wide.onnx", "wide.onnx.data"]
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["external_data"] is True
    assert report["file_bytes"] == out.stat().st_size + data.stat().st_size
    proto = onnx.load(str(out), load_external_data=False)
    inline = [t for t in proto.graph.initializer if not uses_external_data(t)]
    assert all(len(t.raw_data) < 1024 for t in inline)  # every tensor of 1 KiB or more lives in the data file
    assert set(external_locations(proto)) == {"wide.onnx.data"}  # relative, beside the .onnx

    # the pair is relocatable and validates from its new place
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    for p in (out, data):
        shutil.move(str(p), moved / p.name)
    res = CliRunner().invoke(main, ["validate", str(model), str(moved / "wide.onnx")])
    assert res.exit_code == 0, res.stderr + res.stdout


def test_small_model_stays_one_file(tmp_path, tiny_bert):
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "4", str(tiny_bert), str(out)])
    assert res.exit_code == 0, res.stderr
    assert not out.with_name("o.onnx.data").exists()
    assert external_locations(onnx.load(str(out), load_external_data=False)) == []
