"""`edgeq convert --quantizer …` end to end on a tiny random BERT (fast), and the registry/CLI surface."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.quant.registry import QUANTIZERS
from tests.helpers import WORDS


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny matrices: one intra-op thread avoids oversubscription stalls on the shared 2-core machine."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("q")
    model = tiny_bert
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 14)))) for _ in range(24)]
    calib = d / "calib.txt"
    calib.write_text("\n".join(lines) + "\n")
    return model, calib


def convert(args):
    return CliRunner().invoke(main, ["convert", "-q", *args], catch_exceptions=False)


def _codes(path):
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith((".qweight", ".scales"))}


@pytest.mark.parametrize("quantizer,block", [("gptq", "16"), ("sarqc-gbs", "per-channel"), ("sarqc-gs", "16"),
                                             ("lsi", "per-channel")])
def test_each_calibrated_quantizer_converts_validates_and_reports(tmp_path, tiny, quantizer, block):
    model, calib = tiny
    out = tmp_path / "out.onnx"
    res = convert(["--k", "16", "--block-size", block, "--quantizer", quantizer, "--calib", str(calib),
                   "--calib-samples", "12", "--lsi-epochs", "1", str(model), str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["parity"]["ok"]  # the MatMulNBits graph computes exactly the planned weights
    q = rep["quantizer"]
    assert q["name"] == quantizer and q["hyperparameters"]
    assert q["calibration"]["source"] == str(calib) and q["calibration"]["samples"] == 12
    assert q["calibration"]["held_out_examples"] == 3 and q["calibration"]["fit_tokens"] > 0
    assert q["timings_s"]["total"] > 0 and "quantize" in rep["timings_s"]
    assert set(q["layers"]) == set(rep["layers"]) and all(v["k"] == 16 for v in rep["layers"].values())
    if quantizer.startswith("sarqc"):
        lam = [v["lambda"] for v in q["layers"].values()]
        assert all(x in (0.0, 0.01, 0.03, 0.1, 0.3, 1.0) for x in lam)
        assert all(len(v["lambda_held_out_rel_error"]) == 6 for v in q["layers"].values())
    if quantizer == "lsi":
        assert all(v["held_out_mse_best"] <= v["held_out_mse_init"] for v in q["layers"].values())


def test_registry_is_the_cli_choice_list():
    from edgeq.cli.options import quantizer_options

    assert list(QUANTIZERS) == ["rtn", "gptq", "sarqc-gbs", "sarqc-gs", "lsi"]
    import click

    cmd = quantizer_options(click.command()(lambda **kw: None))
    opt = next(p for p in cmd.params if p.name == "quantizer")
    assert list(opt.type.choices) == list(QUANTIZERS) and opt.default == "rtn"


def test_rtn_default_unchanged_and_explicit_rtn_identical(tmp_path, tiny):
    model, _ = tiny
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert convert(["--k", "16", str(model), str(a)]).exit_code == 0
    assert convert(["--k", "16", "--quantizer", "rtn", str(model), str(b)]).exit_code == 0
    ca, cb = _codes(a), _codes(b)
    assert ca.keys() == cb.keys() and all(np.array_equal(ca[n], cb[n]) for n in ca)
    assert json.loads(a.with_suffix(".json").read_text())["quantizer"]["name"] == "rtn"


def test_fixed_lambda_and_bad_options(tmp_path, tiny):
    model, calib = tiny
    out = tmp_path / "o.onnx"
    res = convert(["--quantizer", "sarqc-gbs", "--sarqc-lambda", "0.1", "--sarqc-saliency", "uniform",
                   "--calib", str(calib), "--calib-samples", "8", str(model), str(out)])
    assert res.exit_code == 0, res.output
    q = json.loads(out.with_suffix(".json").read_text())["quantizer"]
    assert q["hyperparameters"]["sarqc_lambda"] == "0.1"
    assert {v["lambda"] for v in q["layers"].values()} == {0.1}
    r = CliRunner().invoke(main, ["convert", "--quantizer", "gptq", str(model), str(tmp_path / "x.onnx")])
    assert r.exit_code == 2 and "needs calibration data" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, ["convert", "--quantizer", "sarqc-gs", "--sarqc-lambda", "lots", "--calib",
                                  str(calib), str(model), str(tmp_path / "y.onnx")])
    assert r.exit_code == 2 and "--sarqc-lambda" in r.output


@pytest.mark.parametrize("quantizer,bits,grid", [("gptq", "2", "sym7"), ("gptq", "3", "mse"), ("gptq", "2", "asym"),
                                                 ("sarqc-gbs", "3", "asym-mse")])
def test_calibrated_quantizers_at_2_and_3_bits_with_every_grid(tmp_path, tiny, quantizer, bits, grid):
    """GPTQ (and SARQC-GBS) plan b-bit codes with float16 scales: compact storage, read-back and parity hold."""
    import onnx
    from onnx import numpy_helper

    model, calib = tiny
    out = tmp_path / "out.onnx"
    res = convert(["--k", "8", "--bits", bits, "--grid", grid, "--quantizer", quantizer, "--sarqc-lambda", "0.1",
                   "--calib", str(calib), "--calib-samples", "12", str(model), str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["parity"]["ok"] and rep["config"]["storage"] == "compact"
    m = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    planes = [v for n, v in inits.items() if n.endswith(".qplanes")]
    assert planes and all(p.shape[0] == int(bits) for p in planes)
    assert all(v.dtype == np.float16 for n, v in inits.items() if n.endswith(".scales16"))
    zps = [n for n in inits if n.endswith(".zero_points")]
    assert bool(zps) == grid.startswith("asym") and len(zps) in (0, len(planes))
    step = 2 ** (4 - int(bits))
    for n in zps:  # b-bit zero points carried at 4 bits: multiples of 2^(4-b)
        z = np.concatenate([inits[n] & 15, inits[n] >> 4], axis=1)
        assert np.all(z % step == 0)
    if zps:  # edgeq validate decodes the zero points from the file alone
        r = CliRunner().invoke(main, ["validate", "-q", str(model), str(out)], catch_exceptions=False)
        assert r.exit_code == 0, r.output


def test_grid_refusals_for_the_other_quantizers(tmp_path, tiny):
    model, calib = tiny
    for args, msg in ((["--quantizer", "lsi", "--grid", "mse"], "--grid mse is not implemented for --quantizer lsi"),
                      (["--quantizer", "sarqc-gs", "--bits", "2"], "int4 codes only"),
                      (["--grid", "asym", "--bits", "2", "--kernel", "native"], "zero points"),
                      (["--grid", "mse", "--bits", "8"], "8-bit codes use sym7")):
        r = CliRunner().invoke(main, ["convert", *args, "--calib", str(calib), str(model), str(tmp_path / "x.onnx")])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "x.onnx").exists()


def test_rtn_mse_grid_uses_calibration_and_composes_with_exclude_and_embeddings(tmp_path, tiny, tiny_model):
    """--grid mse weights the search by E[x²] when --calib is given (other scales than without data)."""
    import onnx
    from onnx import numpy_helper

    _, calib = tiny
    model = tiny_model(hidden=64)  # 4-bit embeddings need a hidden size that is a multiple of 32
    scales = {}
    for name, extra in (("plain", []), ("act", ["--calib", str(calib), "--calib-samples", "12"])):
        out = tmp_path / f"{name}.onnx"
        res = convert(["--k", "8", "--bits", "3", "--grid", "mse", "--exclude", "classifier",
                       "--quantize-embeddings", *extra, str(model), str(out)])
        assert res.exit_code == 0, res.output
        rep = json.loads(out.with_suffix(".json").read_text())
        assert rep["parity"]["ok"] and rep["embeddings"]["int4"]
        assert not any("classifier" in n for n in rep["layers"])
        m = onnx.load(str(out))
        scales[name] = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(".scales16")}
    assert scales["plain"].keys() == scales["act"].keys()
    assert any(not np.array_equal(scales["plain"][n], scales["act"][n]) for n in scales["plain"])
