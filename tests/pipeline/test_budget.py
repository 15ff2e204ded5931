"""``edgeq convert --budget F`` end to end on a tiny random BERT: RTN at 2 bits, a calibrated quantizer, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.helpers import WORDS


def convert(*args):
    return CliRunner().invoke(main, ["convert", "-q", *args])


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=int(rng.integers(3, 14)))) for _ in range(16)) + "\n")
    return path


def _total(report):
    return sum(a * b for a, b in (v["shape"] for v in report["layers"].values()))


def test_two_bits_with_a_budget_and_the_error_method_converts_and_validates(tmp_path, tiny_bert):
    out = tmp_path / "out.onnx"
    res = convert("--bits", "2", "--budget", "0.01", "--method", "error", str(tiny_bert), str(out))
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["parity"]["ok"]  # the file computes exactly the planned weights
    b = rep["budget"]
    assert b["fraction"] == 0.01 and b["weights_total"] == _total(rep)
    assert b["kept_total"] == round(0.01 * _total(rep)) == sum(v["k"] for v in rep["layers"].values())
    assert b["k_per_layer"] == {n: v["k"] for n, v in rep["layers"].items()}
    assert len({v["k"] for v in rep["layers"].values()}) > 1  # not one k for all
    assert rep["config"]["exclude_salient_from_scale"] and rep["config"]["budget"] == 0.01
    assert b["weighting"] == "none" and b["method"] == "error"


def test_a_calibrated_quantizer_takes_the_budgets_k_per_layer(tmp_path, tiny_bert, calib_file):
    out = tmp_path / "g.onnx"
    res = convert("--budget", "0.02", "--method", "magnitude", "--quantizer", "gptq", "--block-size", "16",
                  "--calib", str(calib_file), "--calib-samples", "8", str(tiny_bert), str(out))
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["parity"]["ok"] and rep["quantizer"]["name"] == "gptq"
    b = rep["budget"]
    assert b["weighting"] == "E[x_j^2]"  # the one-pass statistics weigh the allocation
    assert b["k_per_layer"] == {n: v["k"] for n, v in rep["layers"].items()}
    assert sum(b["k_per_layer"].values()) == round(0.02 * _total(rep))


@pytest.mark.parametrize("args,message", [
    (("--k", "16", "--budget", "0.01"), "--budget and --k are mutually exclusive"),
    (("--k", "256", "--budget", "0.01"), "--budget and --k are mutually exclusive"),
    (("--budget", "1.5"), r"--budget must be a fraction in \[0, 1\)"),
])
def test_bad_budget_is_one_line_and_writes_nothing(tmp_path, tiny_bert, args, message):
    import re

    out = tmp_path / "x.onnx"
    res = convert(*args, str(tiny_bert), str(out))
    assert res.exit_code == 2 and re.search(message, res.output), res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert not out.exists() and not out.with_suffix(".json").exists()
