"""`edgeq convert` / `edgeq validate` end to end on tiny random models of each architecture."""

import json
from collections import Counter

import onnx
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from tests.helpers import HAS_TOKEN_TYPES, TINY_ARCHS


def convert(args):
    return CliRunner().invoke(main, ["convert", "-q", *args], catch_exceptions=False)


def ops(path):
    return Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("arch,model_type", TINY_ARCHS)
def test_every_architecture_converts_and_validates(tmp_path, tiny_model, arch, model_type):
    model_dir = tiny_model(arch, model_type)
    out = tmp_path / "out.onnx"
    res = convert(["--k", "16", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["linears_quantized"] == report["linears_total"] == ops(out)["MatMulNBits"]
    assert ops(out)["Gemm"] == 0
    assert all(layer["k"] == 16 for layer in report["layers"].values())
    assert report["parity"]["ok"]
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input][0] == "input_ids"
    assert ("token_type_ids" in [i.name for i in model.graph.input]) == HAS_TOKEN_TYPES[model_type]
    res = CliRunner().invoke(main, ["validate", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    assert "plan parity" in res.output


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, tiny_model, dtype):
    model_dir = tiny_model(dtype=dtype)
    out = tmp_path / "out.onnx"
    res = convert(["--k", "1", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".json").read_text())["parity"]["ok"]


@pytest.mark.parametrize("k", [0, 1])
def test_summary_and_stage_log(tmp_path, tiny_bert, k):
    """The summary names the saliency method only when it picked entries (k > 0); the PyTorch
    reference pass on the validation text is a named stage between load and export."""
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["convert", "--k", str(k), "--method", "magnitude", str(tiny_bert), str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    linears = next(ln for ln in res.stdout.splitlines() if "Linears:" in ln)
    assert (f"k={k} FP32 entries each (magnitude, block 32)" if k else "k=0 FP32 entries each (block 32)") in linears
    assert ("magnitude" in res.stdout) == (k > 0)
    stages = [ln.split("] ", 1)[1] for ln in res.stderr.splitlines() if ln.endswith(" ...")]
    assert stages[:3] == ["load ...", "reference ...", "export ..."], res.stderr
    assert "reference" in json.loads(out.with_suffix(".json").read_text())["timings_s"]


@pytest.mark.parametrize("k", [0, 1, 256, 100_000])
def test_k_values(tmp_path, tiny_bert, k):
    out = tmp_path / "out.onnx"
    res = convert(["--k", str(k), "--block-size", "per-channel", str(tiny_bert), str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    counts = ops(out)
    assert counts["MatMulNBits"] == report["linears_total"]
    # one correction branch per Linear: ScatterND (dense/rows encodings, folded at load), ScatterElements, or a
    # dense D stored whole (when smaller than its positions: edgeq.onnx.corrections)
    stored = sum(t.name.endswith(".corr_dense") for t in onnx.load(str(out)).graph.initializer)
    assert counts["ScatterElements"] + counts["ScatterND"] + stored == (0 if k == 0 else report["linears_total"])
    for layer in report["layers"].values():
        n, k_in = layer["shape"]
        assert layer["k"] == min(k, n * k_in)
        if k >= n * k_in:
            assert layer["recon_error"] == 0.0


def test_exclude_and_regression_head(tmp_path, tiny_model):
    model_dir = tiny_model(num_labels=1)
    out = tmp_path / "out.onnx"
    res = convert(["--k", "4", "--exclude", "classifier", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["linears_excluded"] == ["classifier"]
    assert ops(out)["Gemm"] == 1
    assert report["linears_quantized"] == report["linears_total"] - 1


def test_validate_gate_exits_1_with_a_table(tmp_path, tiny_bert):
    out = tmp_path / "out.onnx"
    assert convert(["--k", "0", "--block-size", "per-tensor", str(tiny_bert), str(out)]).exit_code == 0
    res = CliRunner().invoke(main, ["validate", str(tiny_bert), str(out), "--max-abs-diff", "1e-9"])
    assert res.exit_code == 1
    assert "NO" in res.output and "validation failed" in res.output


def test_failed_threshold_in_convert_writes_nothing(tmp_path, tiny_bert):
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "0", "--max-abs-diff", "1e-9", str(tiny_bert), str(out)])
    assert res.exit_code == 1
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert not list(tmp_path.glob(".edgeq-tmp-*"))


@pytest.mark.parametrize("setup,args,code,message", [
    ("missing", ["--k", "4"], 2, "does not exist"),
    ("no_weights", ["--k", "4"], 1, "no \\*.safetensors"),
    ("pickle", ["--k", "4"], 1, "pickle"),
    ("ok", ["--k", "-1"], 2, "--k must be"),
    ("ok", ["--k", "abc"], 2, "abc"),
    ("ok", ["--block-size", "48"], 2, "48"),
])
def test_bad_input_gives_one_line(tmp_path, tiny_bert, setup, args, code, message):
    model_dir = tmp_path / "m"
    if setup == "ok":
        model_dir = tiny_bert
    elif setup != "missing":
        model_dir.mkdir()
        (model_dir / "config.json").write_text((tiny_bert / "config.json").read_text())
        if setup == "pickle":
            (model_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["convert", *args, str(model_dir), str(out)])
    assert res.exit_code == code, res.output
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in res.output
    import re
    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()


def test_quantize_embeddings_help_says_what_the_code_does():
    from edgeq.onnx.embeddings import MIN_ROWS

    res = CliRunner().invoke(main, ["convert", "--help"])
    text = " ".join(res.output.split())
    assert f"the word table and every other nn.Embedding table with >= {MIN_ROWS} rows" in text
    assert "--force, --overwrite" in text
