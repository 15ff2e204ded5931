"""``--fuse-qkv`` (edgeq.onnx.fuse_qkv), three ways: structure (op counts), numerics (ORT on the
fused graph vs numpy and vs the unfused graph), refusals (each reason).

The hand-built graphs use grid-snapped weights, so the int4 part reproduces W exactly and any
mismatch beyond float summation is a format bug.
"""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.config import ConvertConfig
from edgeq.onnx.fuse_qkv import FUSED_KEY, fuse_shared_inputs, fused_name
from edgeq.onnx.graph import metadata
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import rewrite_linears
from edgeq.pipeline.core import quantize_graph
from edgeq.quant.plan import build_plan
from tests.quant.test_int4 import snapped

K = 80  # not a multiple of 32: exercises padding
SIZES = {"attn.query": 24, "attn.key": 24, "attn.value": 16}  # unequal N: the Split sizes matter


def qkv_graph(ws, bs):
    """x[B,T,K] → MatMul(Wᵀ) + b for each of ``ws`` (all reading x); every output is a graph output."""
    nodes, inits, outputs = [], [], []
    for name, w in ws.items():
        p = "/" + name.replace(".", "/")
        nodes += [helper.make_node("MatMul", ["x", f"{name}.w"], [f"{p}/mm"], name=f"{p}/MatMul"),
                  helper.make_node("Add", [f"{p}/mm", f"{name}.b"], [f"{name}.y"], name=f"{p}/Add")]
        inits += [numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.w"),
                  numpy_helper.from_array(bs[name], f"{name}.b")]
        outputs.append(helper.make_tensor_value_info(f"{name}.y", TensorProto.FLOAT, ["B", "T", w.shape[0]]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture
def qkv():
    ws = {name: snapped(n, K, 32, seed=i)[0] for i, (name, n) in enumerate(SIZES.items())}
    rng = np.random.default_rng(7)
    bs = {name: rng.normal(size=n).astype(np.float32) for name, n in SIZES.items()}
    return ws, bs


def run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


def ops(model):
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("k", [0, 5, 200])
@pytest.mark.parametrize("correction", ["auto", "dense", "rows", "scatter"])
def test_structure_and_numerics(qkv, k, correction):
    ws, bs = qkv
    config = ConvertConfig(k=k, correction=correction, fuse_qkv=True)
    qg = quantize_graph(qkv_graph(ws, bs), ws, config)  # read-back = plan, checked inside
    onnx.checker.check_model(qg.model)
    name = "attn.query+key+value"
    assert qg.fusion.fused == {name: list(SIZES)} and not qg.fusion.refused
    used = qg.fusion.corrections[name]
    assert (used is None) == (k == 0)
    merged = used in ("dense", "rows", "scatter")  # else "per part: e1, e2, e3": the parts keep their own
    if correction == "scatter" and k:
        assert merged  # the same cost merged or not: merged saves nodes
    encodings = [used] if merged else used.split(": ")[1].split(", ") if used else []
    counts = ops(qg.model)
    assert counts["MatMulNBits"] == 1 and counts["Split"] == 1
    assert counts["MatMul"] == sum({"dense": 1, "rows": 2, "scatter": 0}[e] for e in encodings)
    assert counts["Add"] == len(encodings) - (encodings.count("scatter"))  # biases: MatMulNBits' own input
    left = [n.name for n in qg.model.graph.node if n.name.startswith(tuple(f"/{layer}/" for layer in SIZES))]
    assert all("/correction/" in n for n in left) and bool(left) == (k > 0 and not merged)
    assert not any(t.name.startswith(tuple(f"{layer}." for layer in SIZES)) and ".corr_" not in t.name
                   for t in qg.model.graph.initializer)
    if used == "dense":  # one Gather of the union of the parts' columns
        cols = next(numpy_helper.to_array(t) for t in qg.model.graph.initializer if t.name == f"{name}.corr_cols")
        union = np.unique(np.concatenate([q.salient_index % K for q in qg.plan.quants.values()]))
        np.testing.assert_array_equal(cols, union)
    node = next(n for n in qg.model.graph.node if n.op_type == "MatMulNBits")
    assert node.name == f"/{name}/MatMulNBits" and {a.name: a.i for a in node.attribute}["N"] == sum(SIZES.values())
    assert metadata(qg.model)[FUSED_KEY] == f'{{"{name}": [["attn.query", 24], ["attn.key", 24], ["attn.value", 16]]}}'
    decoded = read_back(qg.model)
    for layer, w in ws.items():  # snapped weights: the plan is W itself, whatever k
        np.testing.assert_array_equal(decoded[layer], w)
    x = np.random.default_rng(4).normal(size=(3, 5, K)).astype(np.float32)
    got = run(qg.model, x)
    for layer, w in ws.items():
        np.testing.assert_allclose(got[f"{layer}.y"], x @ w.T + bs[layer], rtol=1e-5, atol=1e-5)


def test_off_grid_fused_equals_unfused(qkv):
    """Random weights with planted outliers: the fused correction adds the same FP32 entries."""
    rng = np.random.default_rng(5)
    ws = {name: rng.normal(size=(n, K)).astype(np.float32) for name, n in SIZES.items()}
    ws["attn.key"][3, 7] = 40.0
    bs = qkv[1]
    config = ConvertConfig(k=16, method="magnitude")
    plain = quantize_graph(qkv_graph(ws, bs), ws, config)
    fused = quantize_graph(qkv_graph(ws, bs), ws, ConvertConfig(k=16, method="magnitude", fuse_qkv=True))
    assert fused.planned["attn.key"][3, 7] == 40.0
    x = rng.normal(size=(2, 4, K)).astype(np.float32)
    a, b = run(plain.model, x), run(fused.model, x)
    for layer in SIZES:
        np.testing.assert_allclose(b[f"{layer}.y"], a[f"{layer}.y"], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(fused.planned[layer], plain.planned[layer])


@pytest.mark.parametrize("arch", ["BertForSequenceClassification", "DistilBertForSequenceClassification",
                                  "RobertaForSequenceClassification"])
@pytest.mark.parametrize("opts", [dict(k=16), dict(k=16, bits=3), dict(k=8, accuracy_level=4, bits8=(r"output",))])
def test_tiny_models(tiny_model, arch, opts):
    """3 MatMulNBits → 1 and one Split per layer; ORT on the fused graph equals the unfused one."""
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    loaded = load_model(tiny_model(arch, hidden=64))
    fp32, weights = export_fp32(loaded), loaded.linear_weights()
    plain = quantize_graph(fp32, weights, ConvertConfig(**opts))
    fused = quantize_graph(fp32, weights, ConvertConfig(**opts, fuse_qkv=True))
    layers = loaded.model.config.num_hidden_layers if arch[0] != "D" else loaded.model.config.n_layers
    assert len(fused.fusion.fused) == layers and not fused.fusion.refused
    for parts in fused.fusion.fused.values():
        assert [p.rsplit(".", 1)[1] for p in parts] in (["query", "key", "value"], ["q_lin", "k_lin", "v_lin"])
    a, b = ops(plain.model), ops(fused.model)
    assert b["MatMulNBits"] == a["MatMulNBits"] - 2 * layers == len(weights) - 2 * layers
    assert b["Split"] - a["Split"] == layers
    sess = ort.InferenceSession(plain.model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.arange(2 * 9).reshape(2, 9) % 40 + 5
    feed = {i.name: (ids if i.name == "input_ids" else np.ones_like(ids)) for i in sess.get_inputs()}
    ra = sess.run(None, feed)
    rb = ort.InferenceSession(fused.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)
    for u, v in zip(ra, rb):
        np.testing.assert_allclose(v, u, rtol=1e-5, atol=1e-5)


def test_fused_name():
    assert fused_name(["a.b.query", "a.b.key", "a.b.value"]) == "a.b.query+key+value"
    assert fused_name(["l.0.attention.q_lin", "l.0.attention.k_lin"]) == "l.0.attention.q_lin+k_lin"


# ------------------------------------------------------------------ refusals


def rewritten(ws, bs, quants, **kw):
    model = qkv_graph(ws, bs)
    rewrite_linears(model, quants, ws, **kw)
    return model


def refusal(model, quants) -> str:
    before = model.SerializeToString()
    res = fuse_shared_inputs(model, quants, "auto")
    assert not res.fused and len(res.refused) == 1 and res.refused[0][0] == list(SIZES)
    assert model.SerializeToString() == before  # a refused group is left as it was
    return res.refused[0][1]


def test_refusals_from_the_plan(qkv):
    ws, bs = qkv
    base = build_plan(ws, ConvertConfig(k=4)).quants
    other = build_plan(ws, ConvertConfig(k=4, block_size="16")).quants
    quants = {**base, "attn.key": other["attn.key"]}
    assert "different MatMulNBits block_size" in refusal(rewritten(ws, bs, quants), quants)
    eight = build_plan(ws, ConvertConfig(k=4, bits8=("value",))).quants
    assert "different MatMulNBits bits" in refusal(rewritten(ws, bs, eight), eight)
    model = rewritten(ws, bs, base)
    next(a for a in model.graph.node[0].attribute if a.name == "accuracy_level").i = 4
    assert "different MatMulNBits accuracy_level" in refusal(model, base)
    fp16 = build_plan(ws, ConvertConfig(k=4, storage="compact")).quants
    quants = {**base, "attn.query": fp16["attn.query"]}
    assert "scale precision" in refusal(rewritten(ws, bs, quants), quants)


def test_refusal_when_one_part_stays_fp32(qkv):
    ws, bs = qkv
    quants = build_plan(ws, ConvertConfig(k=4)).quants
    kept = {n: q for n, q in quants.items() if n != "attn.value"}  # --exclude value: a FP32 MatMul reads x
    model = qkv_graph(ws, bs)
    rewrite_linears(model, kept, ws)
    res = fuse_shared_inputs(model, kept, "auto")
    assert not res.fused and res.refused == [(["attn.query", "attn.key"], res.refused[0][1])]
    assert "FP32 Linear(s) /attn/value/MatMul" in res.refused[0][1]


def test_refusals_from_the_graph(qkv):
    ws, bs = qkv
    quants = build_plan(ws, ConvertConfig(k=4)).quants

    model = rewritten(ws, bs, quants)  # B of one part computed by a node: another storage kind
    node = next(n for n in model.graph.node if n.name == "/attn.key/MatMulNBits")
    model.graph.node.insert(0, helper.make_node("Identity", [node.input[1]], ["kB"], name="/attn.key/Copy"))
    node.input[1] = "kB"
    assert "different storage kinds (compact, plain)" in refusal(model, quants)

    model = rewritten(ws, bs, quants)  # a second output read outside the part's nodes
    model.graph.node.append(helper.make_node("Identity", ["/attn.value/MatMulNBits_output"], ["probe"]))
    model.graph.output.append(helper.make_tensor_value_info("probe", TensorProto.FLOAT, None))
    assert "attn.value: its rewritten nodes do not end in one output" in refusal(model, quants)

    model = rewritten(ws, bs, quants)  # a part node that reads another value than x
    model.graph.node.append(helper.make_node("Identity", ["attn.query.y"], ["z"], name="/attn.key/Foreign"))
    model.graph.output.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, None))
    assert "attn.key: its rewritten nodes read attn.query.y besides the input" in refusal(model, quants)

    model = rewritten(ws, bs, quants)
    model.graph.node.append(helper.make_node("Identity", ["x"], ["t"], name="/attn.query+key+value/Taken"))
    model.graph.output.append(helper.make_tensor_value_info("t", TensorProto.FLOAT, None))
    assert "the fused name attn.query+key+value is taken" in refusal(model, quants)


def test_refusal_of_a_separate_bias_add():
    """Two Gemms sharing one bias C: the rewrite keeps it as /{layer}/BiasAdd, the fusion refuses."""
    ws = {"attn.query": snapped(8, 32, 32, seed=1)[0], "attn.key": snapped(8, 32, 32, seed=2)[0]}
    nodes = [helper.make_node("Gemm", ["x", f"{n}.w", "c"], [f"{n}.y"], name=f"/{n}/Gemm", transB=1) for n in ws]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 32])],
                          [helper.make_tensor_value_info(f"{n}.y", TensorProto.FLOAT, ["B", 8]) for n in ws],
                          [numpy_helper.from_array(w, f"{n}.w") for n, w in ws.items()]
                          + [numpy_helper.from_array(np.ones(8, np.float32), "c")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    quants = build_plan(ws, ConvertConfig(k=2)).quants
    rewrite_linears(model, quants, ws)
    res = fuse_shared_inputs(model, quants, "auto")
    assert not res.fused and "attn.query: its bias is a separate Add" in res.refused[0][1]


# ------------------------------------------------------------------ end to end (tiny model)


def test_convert_and_validate_fused(tmp_path, tiny_model):
    """``edgeq convert --fuse-qkv``: plan parity passes on the written file, validate decodes it."""
    import json

    from click.testing import CliRunner

    from edgeq.cli import main

    model_dir = tiny_model(hidden=64)
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "16", "--fuse-qkv", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["config"]["fuse_qkv"] is True and len(report["fused_qkv"]["fused"]) == 2
    assert report["fused_qkv"]["refused"] == []
    assert ops(onnx.load(str(out)))["MatMulNBits"] == report["linears_quantized"] - 4
    res = CliRunner().invoke(main, ["validate", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    assert ConvertConfig().fuse_qkv is False  # the default: see docs/performance.md for the measurement


def test_refusals_are_logged_and_kept(qkv, caplog):
    """quantize_graph: a refused group stays unfused, still decodes to the plan, and the reason is logged."""
    ws, bs = qkv
    with caplog.at_level("WARNING", logger="edgeq.pipeline.core"):
        qg = quantize_graph(qkv_graph(ws, bs), ws, ConvertConfig(k=4, exclude=("value",), fuse_qkv=True))
    assert not qg.fusion.fused and qg.fusion.refused[0][0] == ["attn.query", "attn.key"]
    assert ops(qg.model)["MatMulNBits"] == 2 and ops(qg.model)["Split"] == 0
    assert any("not fused" in r.message and "FP32 Linear" in r.message for r in caplog.records)


def test_native_two_bit_kernel_is_fused(qkv):
    ws, bs = qkv
    qg = quantize_graph(qkv_graph(ws, bs), ws, ConvertConfig(k=4, bits=2, kernel="native", fuse_qkv=True))
    node = next(n for n in qg.model.graph.node if n.op_type == "MatMulNBits")
    assert qg.fusion.fused and {a.name: a.i for a in node.attribute}["bits"] == 2
    x = np.random.default_rng(4).normal(size=(2, 3, K)).astype(np.float32)
    got = run(qg.model, x)
    for layer in SIZES:  # the decoded plan (checked bit for bit inside quantize_graph) is what ORT computes
        np.testing.assert_allclose(got[f"{layer}.y"], x @ qg.planned[layer].T + bs[layer], rtol=1e-4, atol=1e-4)
