"""Acceptance on the real shared MiniLM RTE model (fails under CI=1 when ../shared is missing).

The conversion (k=256, validated on the full RTE dev set) is the session fixture ``rte_k256`` of
tests/conftest.py, shared with tests/pipeline/test_deploy.py.
"""

from collections import Counter

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edgeq.cli import main

pytestmark = pytest.mark.real


def test_rte_structure(rte_k256):
    model = onnx.load(str(rte_k256.onnx))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["MatMulNBits"] == 38  # 36 encoder + pooler + classifier
    assert ops["Gemm"] == 0
    inits = {t.name for t in model.graph.initializer}
    weight_matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert weight_matmuls == []  # no FP32 Linear weight left
    vals = [t for t in model.graph.initializer if t.name.endswith(".corr_vals")]
    assert len(vals) == 38 and all(numpy_helper.to_array(t).size == 256 for t in vals)


def test_rte_plan_parity_on_dev(rte_k256):
    report = rte_k256.report
    assert report["parity"]["examples"] == 277
    assert report["parity"]["ok"]
    plan = [c for c in report["parity"]["checks"] if c["name"].startswith("plan parity")]
    assert plan and all(c["value"] <= 1e-4 for c in plan)
    # what `edgeq validate --min-agreement 0.5` on the full dev set gated (convert runs the same checks)
    agreement = [c for c in report["parity"]["checks"] if c["name"] == "vs fp32: top-1 agreement"]
    assert len(agreement) == 1 and agreement[0]["value"] >= 0.5
    assert max(report["export_max_abs_diff"].values()) <= 1e-4
    assert report["linears_quantized"] == 38
    assert all(layer["k"] == 256 for layer in report["layers"].values())


def test_rte_validate_command_gates(rte_k256):
    """`edgeq validate` re-derives the weights from the file and gates: passes at a lenient threshold,
    exits 1 at a strict one.  On the first 64 (16) dev examples: the full-dev numbers are the convert
    report's (above), computed by the same checks."""
    model_dir, dev, out = rte_k256.model_dir, rte_k256.data, rte_k256.onnx
    ok = CliRunner().invoke(main, ["validate", str(model_dir), str(out), "--data", str(dev), "--limit", "64",
                                   "--min-agreement", "0.5"])
    assert ok.exit_code == 0, ok.output
    assert "64 examples" in ok.output
    bad = CliRunner().invoke(main, ["validate", str(model_dir), str(out), "--data", str(dev), "--limit", "16",
                                    "--min-agreement", "1.0", "--max-abs-diff", "1e-6"])
    assert bad.exit_code == 1
    assert "top-1 agreement" in bad.output
