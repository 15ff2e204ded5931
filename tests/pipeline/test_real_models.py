"""Acceptance on the real shared MiniLM RTE model (fails under CI=1 when ../shared is missing)."""

import json
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edgeq.cli import main
from tests.conftest import shared_path


@pytest.fixture(scope="module")
def rte_converted(tmp_path_factory):
    model_dir = shared_path("models", "minilm-l6-rte")
    dev = shared_path("data", "glue", "RTE", "dev.tsv")
    out = tmp_path_factory.mktemp("rte") / "out.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "256", str(model_dir), str(out), "--data", str(dev)])
    assert res.exit_code == 0, res.output
    return model_dir, dev, out


def test_rte_structure(rte_converted):
    _, _, out = rte_converted
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 38  # 36 encoder + pooler + classifier
    assert ops["Gemm"] == 0
    inits = {t.name for t in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert weight_matmuls == []  # no FP32 Linear weight left
    vals = [t for t in model.graph.initializer if t.name.endswith(".corr_vals")]
    assert len(vals) == 38 and all(numpy_helper.to_array(t).size == 256 for t in vals)


def test_rte_plan_parity_on_dev(rte_converted):
    _, _, out = rte_converted
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["parity"]["examples"] == 277
    plan = [c for c in report["parity"]["checks"] if c["name"].startswith("plan parity")]
    assert plan and all(c["value"] <= 1e-4 for c in plan)
    assert max(report["export_max_abs_diff"].values()) <= 1e-4
    assert report["linears_quantized"] == 38
    assert all(layer["k"] == 256 for layer in report["layers"].values())


def test_rte_validate_command_gates(rte_converted):
    model_dir, dev, out = rte_converted
    ok = CliRunner().invoke(main, ["validate", str(model_dir), str(out), "--data", str(dev), "--min-agreement", "0.5"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(main, ["validate", str(model_dir), str(out), "--data", str(dev), "--limit", "64",
                                    "--min-agreement", "1.0", "--max-abs-diff", "1e-6"])
    assert bad.exit_code == 1
    assert "top-1 agreement" in bad.output
