"""Acceptance on the real shared MiniLM RTE model (fails under CI=1 when ../shared is missing).

The conversion (k=256) is the session fixture ``rte_k256`` of tests/conftest.py, shared with
tests/pipeline/test_deploy.py; it is checked here on the full RTE dev set by ``edgeq validate``
(the same checks convert runs, with the weights decoded back from the file).
"""

import json
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from edgeq.cli import main

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def rte_validated(rte_k256):
    """``edgeq validate --json --min-agreement 0.5`` of the converted model on all 277 RTE dev examples."""
    return CliRunner().invoke(main, ["validate", str(rte_k256.model_dir), str(rte_k256.onnx),
                                     "--data", str(rte_k256.data), "--min-agreement", "0.5", "--json"])


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


def _plan_parity(parity: dict) -> list[float]:
    return [c["value"] for c in parity["checks"] if c["name"].startswith("plan parity")]


def test_rte_plan_parity_on_dev(rte_k256, rte_validated):
    full = json.loads(rte_validated.stdout)
    assert full["examples"] == 277 and full["source"] == str(rte_k256.data)
    assert _plan_parity(full) and all(v <= 1e-4 for v in _plan_parity(full))
    report = rte_k256.report  # convert's own checks, on the first 32 dev examples (--limit 32)
    assert report["parity"]["examples"] == 32 and report["parity"]["ok"]
    assert _plan_parity(report["parity"]) and all(v <= 1e-4 for v in _plan_parity(report["parity"]))
    assert max(report["export_max_abs_diff"].values()) <= 1e-4
    assert report["linears_quantized"] == 38
    assert all(layer["k"] == 256 for layer in report["layers"].values())


def test_rte_validate_command_gates(rte_k256, rte_validated):
    assert rte_validated.exit_code == 0, rte_validated.output  # --min-agreement 0.5 on the full dev set
    agreement = [c for c in json.loads(rte_validated.stdout)["checks"] if c["name"] == "vs fp32: top-1 agreement"]
    assert len(agreement) == 1 and agreement[0]["value"] >= 0.5 and agreement[0]["ok"]
    bad = CliRunner().invoke(main, ["validate", str(rte_k256.model_dir), str(rte_k256.onnx), "--data",
                                    str(rte_k256.data), "--limit", "16", "--min-agreement", "1.0",
                                    "--max-abs-diff", "1e-6"])
    assert bad.exit_code == 1
    assert "top-1 agreement" in bad.output
