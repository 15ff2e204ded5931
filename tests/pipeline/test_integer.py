"""``edgeq convert --kernel integer`` end to end on a tiny model: the file, its report, ``validate``,
and the per-Linear plan parity catching a graph that computes something other than its decode."""

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.config import ConvertConfig
from edgeq.model.load import load_model
from edgeq.model.texts import encode_batches, validation_texts
from edgeq.onnx.integer import MASK, OP, SHARED_OP, integer_layers
from edgeq.onnx.readback import read_back
from edgeq.pipeline.convert import convert, validate_file
from edgeq.pipeline.parity import integer_layer_parity


@pytest.fixture(scope="module")
def converted(tiny_model, tmp_path_factory):
    d = tmp_path_factory.mktemp("integer")
    calib = d / "calib.txt"
    calib.write_text("\n".join(f"sentence number {i} about the weather and {i % 7} cats" for i in range(40)))
    cfg = ConvertConfig(k=8, bits=8, kernel="integer", block_size="per-channel", act_outliers=2, calib=str(calib),
                        quantize_embeddings=True, embedding_bits=8)
    out = d / "out.onnx"
    report = convert(tiny_model(hidden=64), out, cfg)  # H a multiple of the embedding block (32)
    return tiny_model(hidden=64), out, report


def test_convert_writes_a_validated_integer_file(converted):
    model_dir, out, report = converted
    model = onnx.load(str(out))
    counts = Counter(n.op_type for n in model.graph.node)
    n_linear = report["linears_quantized"]
    assert counts[OP] + counts[SHARED_OP] == n_linear == report["linears_total"] and counts["MatMulNBits"] == 0
    # q, k and v of each attention block quantize their one input once: one mask, one DynamicQuantizeLinear
    blocks = {name.rsplit(".", 1)[0] for name in report["layers"] if name.endswith(".attention.self.query")}
    assert counts[SHARED_OP] == 3 * len(blocks) and counts["DynamicQuantizeLinear"] == len(blocks) > 0
    groups = report["shared_input_quantization"]["groups"]
    assert groups == {f"{b}.query+key+value": [f"{b}.{p}" for p in ("query", "key", "value")] for b in blocks}
    masks = [t for t in model.graph.initializer if t.name.endswith(f".{MASK}")]
    assert len(masks) == n_linear - 2 * len(blocks) and all((numpy_helper.to_array(m) == 0).sum() == 2 for m in masks)
    checks = {c["name"]: c for c in report["parity"]["checks"]}
    layer_check = checks["plan parity: every Linear on ORT inputs max|d|/max|ref|"]
    assert layer_check["ok"] and layer_check["limit"] == 1e-4
    assert report["parity"]["ok"] and all(lp["k"] >= 2 * lp["shape"][0] for lp in report["layers"].values())
    gbq = [n for n in model.graph.node if n.op_type == "GatherBlockQuantized"]  # 8-bit tables, read back exactly
    assert gbq and all(a.i == 8 for n in gbq for a in n.attribute if a.name == "bits")
    again = validate_file(model_dir, out)  # decoded from the file alone
    assert again.ok and again.checks[0].value <= 1e-4


def test_layer_parity_catches_a_graph_that_differs_from_its_decode(converted):
    model_dir, out, _ = converted
    model = onnx.load(str(out))
    loaded = load_model(model_dir)
    batches = encode_batches(loaded, validation_texts(None, 4)[0])
    layers = integer_layers(model)
    assert max(integer_layer_parity(model, loaded, layers, batches).values()) <= 1e-4
    name, lay = next((n, lay) for n, lay in layers.items() if lay.factors is not None)
    m = lay.factors.copy()
    m[np.flatnonzero(m)[:8]] = 0.5  # a decode that halves columns the graph passes unchanged
    assert integer_layer_parity(model, loaded, {**layers, name: replace(lay, factors=m)}, batches)[name] > 1e-3
    # the decode reads the whole m: a file whose m changes decodes to another Ŵ (convert's read-back check)
    before = read_back(model)[name]
    mask = next(t for t in model.graph.initializer if t.name.endswith(f".{MASK}") and t.name.startswith(name))
    mask.CopyFrom(numpy_helper.from_array(m, mask.name))
    assert not np.array_equal(read_back(model)[name], before)


def test_convert_smoothed_and_masked_integer_file(tiny_model, tmp_path):
    """--smooth-alpha with --act-outliers: m is 0 on the outlier columns, 1/s_j elsewhere (one Mul per Linear),
    and the per-Linear plan parity and the read-back (Ŵ in W's coordinates) hold."""
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(f"sentence number {i} about the weather and {i % 7} cats" for i in range(40)))
    cfg = ConvertConfig(k=0, bits=8, kernel="integer", block_size="per-channel", act_outliers=2, smooth_alpha=0.5,
                        calib=str(calib))
    out = tmp_path / "out.onnx"
    report = convert(tiny_model(hidden=64), out, cfg)
    model = onnx.load(str(out))
    masks = [t.name for t in model.graph.initializer if t.name.endswith(f".{MASK}")]
    assert masks and len(masks) == sum(n.op_type == "Mul" and n.name.endswith("/ActMask") for n in model.graph.node)
    layers = integer_layers(model)  # every Linear's decoded m: masked, and smoothed
    assert len(layers) == report["linears_quantized"] == report["linears_total"]
    assert all((lay.factors == 0).sum() == 2 and np.unique(lay.factors[lay.factors != 0]).size > 1
               for lay in layers.values())
    blocks = sum(n.endswith(".attention.self.query") for n in report["layers"])  # q/k/v keep one m: still shared
    assert Counter(n.op_type for n in model.graph.node)["DynamicQuantizeLinear"] == blocks > 0
    checks = {c["name"]: c for c in report["parity"]["checks"]}
    assert report["parity"]["ok"] and checks["plan parity: every Linear on ORT inputs max|d|/max|ref|"]["ok"]
    assert validate_file(tiny_model(hidden=64), out).ok
