"""Graph encodings of issue 5: correction encodings, bias folding, 8-bit MatMulNBits, 4-bit embeddings.

Each encoding three ways: structure (op counts), numerics (ONNX Runtime vs a numpy reference on
weights snapped to the quantization grid, so any mismatch beyond summation noise is a format bug)
and refusals (the reason is reported and the fallback is still exact).
"""

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeq.config import ConvertConfig
from edgeq.onnx import corrections as corr
from edgeq.onnx.corrections import CORRECTIONS
from edgeq.onnx.embeddings import (
    module_names,
    pack_table,
    quantize_embeddings,
    quantize_table,
    read_embeddings,
)
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import exact_arithmetic_copy, rewrite_linears
from edgeq.quant.int4 import Granularity, quantize_rtn
from edgeq.quant.pack import pack_codes, unpack_codes
from edgeq.quant.plan import build_plan
from tests.quant.test_int4 import snapped

K, N = 96, 40


def mlp(ws: dict, biases: dict, share_bias=False):
    """x[B,T,K] → MatMul(W1ᵀ)+b1 → Relu → MatMul(W2ᵀ)+b2 → y (each MatMul followed by a bias Add)."""
    nodes, inits, h = [], [], "x"
    for i, (name, w) in enumerate(ws.items()):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(w.T), f"{name}.w"))
        nodes.append(helper.make_node("MatMul", [h, f"{name}.w"], [f"{name}.mm"], name=f"/{name}/MatMul"))
        bias = "b_shared" if share_bias else f"{name}.b"
        nodes.append(helper.make_node("Add", [f"{name}.mm", bias], [f"{name}.out"], name=f"/{name}/Add"))
        if not share_bias or i == 0:
            inits.append(numpy_helper.from_array(biases[name], bias))
        h = f"{name}.out"
        if i < len(ws) - 1:
            nodes.append(helper.make_node("Relu", [h], [f"{name}.relu"]))
            h = f"{name}.relu"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "T", K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "T", None])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def ref(x, ws_hat, biases):
    h = x
    for i, (name, w) in enumerate(ws_hat.items()):
        h = h @ w.T + biases[name]
        if i < len(ws_hat) - 1:
            h = np.maximum(h, 0)
    return h


def run(model, x, level=None):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(["y"], {"x": x})[0]


@pytest.fixture
def layers():
    w1, _, _ = snapped(N, K, 32, seed=11)
    w2, _, _ = snapped(N, N, 32, seed=12)  # K = 40: padding
    rng = np.random.default_rng(13)
    ws = {"l1": w1, "l2": w2}
    return ws, {n: rng.normal(size=N).astype(np.float32) for n in ws}


def concentrated(ws, k, cols=2):
    """Salient entries confined to ``cols`` input columns of each weight (dense is never refused)."""
    out = {}
    rng = np.random.default_rng(0)
    for name, w in ws.items():
        c = rng.choice([j for j in range(w.shape[1]) if j % 32], size=cols, replace=False)  # keep the ±max
        rows = rng.choice(w.shape[0], size=(k + cols - 1) // cols, replace=False)
        idx = np.unique((rows[:, None] * w.shape[1] + c[None, :]).reshape(-1))[:k]
        w = w.copy()
        w.reshape(-1)[idx] = rng.normal(size=idx.size).astype(np.float32) * 3  # off-grid: exact only in FP32
        out[name] = (w, idx)
    return out


def plan_from(sel, bits=4, grid="sym7"):
    from edgeq.quant.plan import LayerPlan, QuantPlan

    layers = {}
    for name, (w, idx) in sel.items():
        q = quantize_rtn(w, idx, Granularity("block", 32), exclude_salient_from_scale=True, bits=bits, grid=grid)
        layers[name] = LayerPlan(name, q, 0.0, 0.0, 0, 0)
    return QuantPlan(layers, ())


# run-time + load-time nodes of each encoding, per Linear (the bias is folded into MatMulNBits)
ENCODING_OPS = {
    "dense": {"Gather": 1, "MatMul": 1, "Add": 1, "ScatterND": 1, "OneHot": 0, "ScatterElements": 0},
    "rows": {"Gather": 0, "MatMul": 2, "Add": 1, "ScatterND": 1, "OneHot": 1, "ScatterElements": 0},
    "scatter": {"Gather": 1, "MatMul": 0, "Add": 0, "ScatterND": 0, "OneHot": 0, "ScatterElements": 1},
}


@pytest.mark.parametrize("correction", corr.CORRECTION_CHOICES)
@pytest.mark.parametrize("k", [0, 1, 12])
def test_correction_structure_and_numerics(layers, correction, k):
    ws, biases = layers
    sel = concentrated(ws, k, cols=4) if k else {n: (w, np.empty(0, np.int64)) for n, w in ws.items()}
    plan = plan_from(sel)
    wsel = {n: w for n, (w, _) in sel.items()}
    model = mlp(wsel, biases)
    result = rewrite_linears(model, plan.quants, wsel, correction=correction)
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert result.count == 2 == ops["MatMulNBits"] and not result.fallbacks
    used = [v["correction"] for v in result.layers.values()]
    if not k:
        assert used == [None, None] and set(ops) == {"MatMulNBits", "Relu", "Identity"}
    else:
        assert all(u == correction for u in used) if correction != "auto" else set(used) <= {"dense", "rows"}
        for op in ENCODING_OPS["dense"]:
            assert ops[op] == sum(ENCODING_OPS[u][op] for u in used), op
    assert all(len(n.input) == 6 for n in model.graph.node if n.op_type == "MatMulNBits")  # bias input
    decoded = read_back(model)
    for name in ws:
        np.testing.assert_array_equal(decoded[name], plan.layers[name].quant.dequantize())
        np.testing.assert_array_equal(decoded[name], wsel[name])  # snapped + exact FP32 entries: Ŵ = W
    x = np.random.default_rng(1).normal(size=(2, 5, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), ref(x, wsel, biases), rtol=2e-5, atol=2e-5)


def test_dense_refused_when_columns_spread_falls_back_to_scatter(layers):
    ws, biases = layers
    plan = build_plan(ws, ConvertConfig(k=200, method="random"))  # 200 random entries touch most columns
    model = mlp(ws, biases)
    result = rewrite_linears(model, plan.quants, ws, correction="dense")
    assert len(result.fallbacks) == 2 and all("distinct input columns" in why for _, why in result.fallbacks)
    assert {v["correction"] for v in result.layers.values()} == {"scatter"}
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ScatterElements"] == 2 and ops["ScatterND"] == 0
    decoded = read_back(model)
    for name in ws:
        np.testing.assert_array_equal(decoded[name], plan.layers[name].quant.dequantize())
    x = np.random.default_rng(2).normal(size=(2, 3, K)).astype(np.float32)
    ws_hat = {n: plan.layers[n].quant.dequantize() for n in ws}
    np.testing.assert_allclose(run(model, x), ref(x, ws_hat, biases), rtol=2e-5, atol=2e-5)


def test_dense_check_reason_names_the_block():
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    q_spread = quantize_rtn(w, np.arange(0, 48), Granularity("block", 32))  # 48 of 64 columns (row 0)
    q_one = quantize_rtn(w, np.arange(0, 8 * 64, 64), Granularity("block", 32))  # column 0 only
    assert corr.DENSE_MAX_FRACTION < 48 / 64
    assert "48 distinct input columns" in CORRECTIONS["dense"].check(q_spread)
    assert CORRECTIONS["dense"].check(q_one) is None
    assert CORRECTIONS["scatter"].check(q_spread) is None


def test_bias_not_folded_when_shared(layers):
    ws, biases = layers
    biases = {n: biases["l1"] for n in ws}
    plan = build_plan(ws, ConvertConfig(k=3))
    model = mlp(ws, biases, share_bias=True)
    rewrite_linears(model, plan.quants, ws)
    assert sum(n.op_type == "Add" and "b_shared" in n.input for n in model.graph.node) == 2
    x = np.random.default_rng(3).normal(size=(1, 4, K)).astype(np.float32)
    ws_hat = {n: plan.layers[n].quant.dequantize() for n in ws}
    np.testing.assert_allclose(run(model, x), ref(x, ws_hat, biases), rtol=2e-5, atol=2e-5)


def test_grid_sym8_codes_run_in_onnxruntime(layers):
    """The -8 level (code 0) and negative scales of --grid sym8 decode and run exactly as planned."""
    ws, biases = layers
    sel = concentrated(ws, 12, cols=4)
    plan = plan_from(sel, grid="sym8")
    assert min(int(lp.quant.codes.min()) for lp in plan.layers.values()) == 0
    assert any((lp.quant.scales < 0).any() for lp in plan.layers.values())
    wsel = {n: w for n, (w, _) in sel.items()}
    model = mlp(wsel, biases)
    rewrite_linears(model, plan.quants, wsel)
    ws_hat = {n: plan.layers[n].quant.dequantize() for n in ws}
    decoded = read_back(model)
    for name in ws:
        np.testing.assert_array_equal(decoded[name], ws_hat[name])
    x = np.random.default_rng(4).normal(size=(2, 5, K)).astype(np.float32)
    np.testing.assert_allclose(run(model, x), ref(x, ws_hat, biases), rtol=2e-5, atol=2e-5)


def test_auto_picks_the_cheaper_encoding_and_scatter_when_both_are_refused():
    w = np.random.default_rng(0).normal(size=(N, K)).astype(np.float32)
    one_row = quantize_rtn(w, 3 * K + np.arange(12), Granularity("block", 32))  # r = 1, c = 12
    one_col = quantize_rtn(w, np.arange(12) * K + 5, Granularity("block", 32))  # r = 12, c = 1
    assert corr.choose_correction(one_row, "auto") == ("rows", None)
    assert corr.choose_correction(one_col, "auto") == ("dense", None)
    assert corr.choose_correction(one_row, "dense") == ("dense", None)  # an explicit choice is kept
    spread = quantize_rtn(w, np.arange(0, N * K, 7), Granularity("block", 32))  # every row and column
    assert corr.choose_correction(spread, "auto") == ("scatter", None)  # dense and rows refused: too large
    used, why = corr.choose_correction(spread, "rows")
    assert used == "scatter" and why.startswith("rows refused") and "distinct output rows" in why


def test_unknown_correction_is_refused(layers):
    ws, biases = layers
    with pytest.raises(ValueError, match="unknown correction"):
        rewrite_linears(mlp(ws, biases), build_plan(ws, ConvertConfig(k=1)).quants, ws, correction="sparse")
    with pytest.raises(ValueError, match="--correction"):
        ConvertConfig(correction="sparse")


def test_cli_choices_come_from_the_registries():
    """Every choice list of the CLI is the registry itself, and every default is ConvertConfig's."""
    from edgeq.cli.convert import convert
    from edgeq.cli.options import BLOCK_CHOICES
    from edgeq.quant.int4 import BLOCK_SIZES, GRIDS
    from edgeq.quant.registry import QUANTIZERS
    from edgeq.saliency import SALIENCY_METHODS

    params = {p.name: p for p in convert.params}
    assert tuple(params["correction"].type.choices) == corr.CORRECTION_CHOICES == ("auto", *CORRECTIONS)
    assert tuple(params["grid"].type.choices) == tuple(GRIDS)
    assert set(params["method"].type.choices) == set(SALIENCY_METHODS)
    assert tuple(params["quantizer"].type.choices) == tuple(QUANTIZERS)
    assert (
        list(params["block_size"].type.choices)
        == BLOCK_CHOICES
        == [*map(str, BLOCK_SIZES), "per-channel", "per-tensor"]
    )
    defaults = ConvertConfig()
    for name in ("correction", "grid", "method", "quantizer", "block_size", "k", "rank", "seed"):
        assert str(params[name].default) == str(getattr(defaults, name)), name


# ------------------------------------------------------------------ 8-bit MatMulNBits


def snapped8(n, k, block, seed=0):
    return snapped(n, k, block, seed, qmax=127, exponents=(4, 10))[0]


def test_q8_codes_and_q4_unchanged():
    w = np.random.default_rng(4).normal(size=(6, 80)).astype(np.float32)
    idx = np.array([3, 100, 479])
    q8 = quantize_rtn(w, idx, Granularity("block", 32), bits=8)
    assert q8.bits == 8 and q8.codes.min() >= 1 and q8.codes.max() <= 255
    assert (q8.codes.reshape(-1)[idx] == 128).all()
    np.testing.assert_array_equal(q8.dequantize().reshape(-1)[idx], w.reshape(-1)[idx])
    assert (
        np.abs(q8.dequantize() - w).max()
        < np.abs(quantize_rtn(w, idx, Granularity("block", 32)).dequantize() - w).max()
    )
    q4 = quantize_rtn(w, idx, Granularity("block", 32))
    q4b = quantize_rtn(w, idx, Granularity("block", 32), bits=4)
    assert q4.bits == 4 and np.array_equal(q4.codes, q4b.codes) and np.array_equal(q4.scales, q4b.scales)
    packed = pack_codes(q8.codes, 32, 8)
    assert packed.shape == (6, 3, 32) and packed.reshape(6, -1)[:, 80:].tolist() == [[128] * 16] * 6
    np.testing.assert_array_equal(unpack_codes(packed, 80, 8), q8.codes)
    with pytest.raises(ValueError, match="bits"):
        quantize_rtn(w, idx, Granularity("block", 32), bits=5)


def test_q8_snapped_weights_are_exact_and_match_ort_packing():
    w = snapped8(12, 64, 32, seed=5)
    q = quantize_rtn(w, np.empty(0, np.int64), Granularity("block", 32), bits=8)
    np.testing.assert_array_equal(q.dequantize(), w)
    quantizer = pytest.importorskip("onnxruntime.capi._pybind_state")
    fn = getattr(quantizer, "quantize_matmul_8bits", None)
    if fn is None:
        pytest.skip("this onnxruntime has no quantize_matmul_8bits")
    k_in, n = 64, 12
    packed = np.zeros((n, 2, 32), np.uint8)
    scales = np.zeros((n * 2,), np.float32)
    zp = np.zeros((n * 2,), np.uint8)
    fn(packed, np.ascontiguousarray(w.T), scales, zp, 32, n, k_in, True)  # symmetric
    # ORT's symmetric 8-bit grid is scale = amax/128, codes clamped to [0, 255] (so +amax loses one
    # step); ours is ±127 (amax/127): the codes differ, the layout must not.  Read ORT's bytes with
    # our unpacker: they must decode to W within one step (ORT does not round to nearest here; a
    # wrong byte order would be off by up to 255 steps).
    codes = unpack_codes(packed, k_in, 8).astype(np.float32)
    step = np.repeat(scales.reshape(n, 2), 32, axis=1)
    assert np.abs(((codes - 128.0) * step - w) / step).max() <= 1.001
    assert np.abs(((codes[:, ::-1] - 128.0) * step - w) / step).max() > 2
    np.testing.assert_array_equal(pack_codes(unpack_codes(packed, k_in, 8), 32, 8), packed)


@pytest.mark.parametrize("level", [0, 4])
def test_q8_numerics_in_ort(layers, level):
    ws = {"l1": snapped8(N, K, 32, seed=6), "l2": snapped8(N, N, 32, seed=7)}
    biases = layers[1]
    sel = concentrated(ws, 5)
    plan = plan_from(sel, bits=8)
    wsel = {n: w for n, (w, _) in sel.items()}
    model = mlp(wsel, biases)
    rewrite_linears(model, plan.quants, wsel, accuracy_level=level)
    assert {
        (a.i) for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits"
    } == {8}
    decoded = read_back(model)
    for name in ws:
        np.testing.assert_array_equal(decoded[name], wsel[name])
    x = np.random.default_rng(8).normal(size=(2, 5, K)).astype(np.float32)
    want = ref(x, wsel, biases)
    got = run(model, x)
    if level == 0:
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
        assert exact_arithmetic_copy(model) is None
    else:  # int8 activations: close, not exact; the accuracy_level-0 copy is exact
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
        np.testing.assert_allclose(run(exact_arithmetic_copy(model), x), want, rtol=2e-5, atol=2e-5)


def test_bits8_regex_selects_layers():
    cfg = ConvertConfig(bits8=("output",))
    assert cfg.layer_bits("bert.encoder.layer.0.output.dense") == 8
    assert cfg.layer_bits("bert.encoder.layer.0.intermediate.dense") == 4
    assert ConvertConfig(bits=8).layer_bits("anything") == 8
    with pytest.raises(ValueError, match="--bits"):
        ConvertConfig(bits=5)
    with pytest.raises(ValueError, match="--bits8 '\\(' is not a valid"):
        ConvertConfig(bits8=("(",))


# ------------------------------------------------------------------ 4-bit embeddings


def emb_graph(table, ids_input="input_ids", tied=False):
    h = table.shape[1]
    nodes = [helper.make_node("Gather", ["E", ids_input], ["e"], name="emb/Gather", axis=0),
             helper.make_node("Identity", ["e"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", h])]
    if tied:  # a second consumer (tied LM head)
        nodes.append(helper.make_node("MatMul", ["e", "E"], ["z"], name="head/MatMul"))
        nodes[-1].input[1] = "Et"
        nodes.insert(0, helper.make_node("Transpose", ["E"], ["Et"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", "S", None]))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(ids_input, TensorProto.INT64, ["B", "S"])],
                          outputs, [numpy_helper.from_array(table, "E")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("h", [32, 96])
def test_embeddings_structure_and_numerics(h):
    rng = np.random.default_rng(h)
    table, _, _ = snapped(50, h, 32, seed=h)
    table[7] = rng.normal(size=h)  # one off-grid row: rounded, not exact
    model = emb_graph(table)
    res = quantize_embeddings(model, 32)
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["Gather"] == 0 and not res.refused
    assert "E" not in {t.name for t in model.graph.initializer}
    ids = rng.integers(0, 50, size=(3, 9))
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": ids}
    )[0]
    e_hat = read_embeddings(model)["E"]
    np.testing.assert_array_equal(got, e_hat[ids])  # ORT's dequantized gather equals numpy's Ê[ids]
    np.testing.assert_array_equal(e_hat, res.tables["E"])
    on_grid = np.ones(50, bool)
    on_grid[7] = False
    np.testing.assert_array_equal(e_hat[on_grid], table[on_grid])  # snapped rows reproduced exactly
    assert 0 < np.abs(e_hat[7] - table[7]).max() <= np.abs(table[7]).max() / 14 + 1e-6  # half a step
    assert pack_table(quantize_table(table)).shape == (50, h // 2)


def test_embeddings_refusals():
    t48 = np.random.default_rng(0).normal(size=(20, 48)).astype(np.float32)
    t64 = np.random.default_rng(0).normal(size=(20, 64)).astype(np.float32)
    for model, why in ((emb_graph(t48), "not a multiple of block size"),
                       (emb_graph(t64, tied=True), "shared with other nodes")):
        res = quantize_embeddings(model, 32)
        assert not res.rewritten and why in res.refused[0][1]
        assert Counter(n.op_type for n in model.graph.node)["GatherBlockQuantized"] == 0
    res = quantize_embeddings(emb_graph(t64, ids_input="position_ids"), 32)
    assert not res.rewritten and not res.refused  # not the word-embedding pattern: left alone
    res = quantize_embeddings(emb_graph(t64), 32, modules={})
    assert "matches no nn.Embedding" in res.refused[0][1]


def test_embedding_module_mapping(tiny_model):
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    loaded = load_model(tiny_model(hidden=64))
    model = export_fp32(loaded)
    names = module_names(model, loaded.model)
    prefix = "bert.embeddings."
    assert sorted(names.values()) == [
        prefix + t for t in ("position_embeddings", "token_type_embeddings", "word_embeddings")
    ]
    res = quantize_embeddings(model, 32, names)
    quantized = sorted([prefix + "word_embeddings", prefix + "position_embeddings"])  # 160 positions ≥ MIN_ROWS
    assert sorted(read_back_tables(model)) == quantized == sorted(res.tables)
    assert len(res.refused) == 1 and "has 2 rows" in res.refused[0][1]  # token types: left FP32, with the reason
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GatherBlockQuantized"] == 2 and ops["Gather"] >= 1


def read_back_tables(model):
    return {k: v for k, v in read_embeddings(model).items()}


# ------------------------------------------------------------------ end to end (tiny model)


def test_convert_and_validate_with_perf_options(tmp_path, tiny_model, tiny_bert):
    """--quantize-embeddings, --accuracy-level 4 and --bits8 together: plan parity holds (checked on the
    accuracy_level-0 copy), the file carries what was asked, and validate decodes it."""
    from click.testing import CliRunner

    from edgeq.cli import main

    model_dir = tiny_model(hidden=64)
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--k", "4", "--quantize-embeddings", "--accuracy-level", "4",
                                    "--bits8", r"intermediate\.dense", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    model = onnx.load(str(out))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GatherBlockQuantized"] == 2  # word and position tables
    import json

    emb = json.loads(out.with_suffix(".json").read_text())["embeddings"]
    assert emb["int4"] == ["bert.embeddings.position_embeddings", "bert.embeddings.word_embeddings"]
    assert [e["reason"] for e in emb["left_fp32"]] == [
        "table m.bert.embeddings.token_type_embeddings.weight has 2 rows (< 64): quantizing it saves nothing"]
    bits = Counter(a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "bits")
    assert bits[8] == 2 and bits[4] > 0  # one intermediate.dense per layer, 2 layers
    res = CliRunner().invoke(main, ["validate", str(model_dir), str(out)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["convert", "-q", "--quantize-embeddings", str(tiny_bert),
                                    str(tmp_path / "x.onnx")])
    assert res.exit_code == 1 and "not a multiple of block size" in res.output and "Traceback" not in res.output
