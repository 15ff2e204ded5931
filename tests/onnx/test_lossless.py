"""Smaller files, same numbers: the dense correction stored as D itself, and lossless float16 storage
(edgeq.onnx.lossless) of the values edgeq writes.

Structure (what the file holds, and that ONNX Runtime folds every Cast away at session creation),
numerics (bit-identical outputs to the other form; read-back == the plan) and the refusal of the
float16 form for a value float16 cannot hold.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edgeq.onnx import corrections as corr
from edgeq.onnx.lossless import float_constant, fp16_exact
from edgeq.onnx.readback import read_back
from edgeq.onnx.rewrite import rewrite_linears
from edgeq.quant.int4 import Granularity, quantize_rtn
from edgeq.quant.integer import column_entries
from tests.onnx.test_rewrite_properties import _graph
from tests.onnx.test_storage import _session as session

N, K = 24, 80


def fp16_weight(seed=0) -> np.ndarray:
    """A weight whose every value is a float16 value (as a float16 checkpoint loaded in float32)."""
    return np.random.default_rng(seed).standard_normal((N, K)).astype(np.float16).astype(np.float32)


def written(w: np.ndarray, idx: np.ndarray, correction: str = "dense") -> onnx.ModelProto:
    q = quantize_rtn(w, idx, Granularity("block", 16))
    model = _graph(w, "MatMul", None, [2, 3, K])
    assert rewrite_linears(model, {"lin": q}, {"lin": w}, correction=correction).count == 1
    np.testing.assert_array_equal(read_back(model)["lin"], q.dequantize())  # the file == the plan
    return model


def inits(model) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_fp16_exact_rule():
    assert fp16_exact(np.array([0.0, -0.0, 1.5, 2.0**-24, 65504.0, np.inf], np.float32))
    assert not fp16_exact(np.array([1.0, 1.0 + 2.0**-12], np.float32))
    assert not fp16_exact(np.array([np.nan], np.float32)) and not fp16_exact(np.array([1e6], np.float32))
    name, nodes, tensors = float_constant("v", np.array([0.1], np.float32), "v32")
    assert name == "v" and nodes == [] and tensors[0].data_type == TensorProto.FLOAT


def test_whole_columns_store_d_and_match_the_positions_form_bit_for_bit(monkeypatch):
    w = fp16_weight(1)
    idx = column_entries(np.array([3, 17, 40]), N, K)  # whole columns: D is full
    model = written(w, idx)
    t = inits(model)
    assert list(t["lin.corr_dense"].dims) == [3, N] and t["lin.corr_dense"].data_type == TensorProto.FLOAT16
    assert "lin.corr_pos" not in t and "lin.corr_vals" not in t
    assert not any(n.op_type == "ScatterND" for n in model.graph.node)
    matrix = corr._dense_matrix
    monkeypatch.setattr(corr, "_dense_matrix", lambda q: (*matrix(q)[:3], False))  # force (positions, values)
    positions = written(w, idx)
    assert "lin.corr_pos" in inits(positions) and "lin.corr_dense" not in inits(positions)
    x = np.random.default_rng(2).standard_normal((2, 3, K)).astype(np.float32)
    np.testing.assert_array_equal(session(model).run(None, {"x": x})[0], session(positions).run(None, {"x": x})[0])


def test_scattered_entries_keep_positions():
    w = fp16_weight(3)
    model = written(w, np.array([5, 90, 700, 1000]))  # 4 entries in 4 columns: D would be 4 x 24
    t = inits(model)
    assert "lin.corr_pos" in t and "lin.corr_dense" not in t and t["lin.corr_vals"].data_type == TensorProto.FLOAT16


@pytest.mark.parametrize("correction", ["dense", "rows", "scatter"])
def test_fp16_values_are_cast_at_load_and_folded(tmp_path, correction):
    w = fp16_weight(4)
    idx = np.array([5, 90, 700, 1000, 1001])
    model = written(w, idx, correction)
    assert inits(model)["lin.corr_vals"].data_type == TensorProto.FLOAT16
    assert any(n.op_type == "Cast" and n.input[0] == "lin.corr_vals" for n in model.graph.node)
    session(model, str(tmp_path / "opt.onnx"))
    optimized = onnx.load(str(tmp_path / "opt.onnx"))
    assert [n.name for n in optimized.graph.node if n.op_type == "Cast"] == []  # folded at session creation
    x = np.random.default_rng(5).standard_normal((2, 3, K)).astype(np.float32)
    ref = x.astype(np.float64) @ read_back(model)["lin"].astype(np.float64).T
    np.testing.assert_allclose(session(model).run(None, {"x": x})[0], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("idx", [np.array([5, 90, 700]), column_entries(np.array([2, 9]), N, K)])
def test_a_value_float16_cannot_hold_keeps_float32(idx):
    w = fp16_weight(6)
    w.reshape(-1)[idx[0]] = np.float32(0.1)  # not a float16 value
    model = written(w, idx)
    t = inits(model)
    stored = t.get("lin.corr_vals") or t.get("lin.corr_dense")
    assert stored.data_type == TensorProto.FLOAT
    assert not any(n.op_type == "Cast" and n.input[0] == stored.name for n in model.graph.node)


# --kernel integer --storage compact: 7-bit planes of int8 qᵀ unpacked at load (edgeq.onnx.storage.integer_weight)

def integer_file(storage: str, k: int = 0, bias: bool = True):
    from edgeq.config import ConvertConfig
    from edgeq.pipeline.core import quantize_graph
    from tests.onnx.test_integer import INTEGER
    from tests.onnx.test_rewrite import N2, linear_graph
    from tests.onnx.test_rewrite import K as K1
    from tests.onnx.test_rewrite import N as N1
    from tests.quant.test_int4 import snapped

    w1, _, _ = snapped(N1, K1, K1, seed=1, qmax=63)
    w2, _, _ = snapped(N2, N1, N1, seed=2, qmax=63)
    rng = np.random.default_rng(3)
    ws = {"lin1": w1, "lin2": w2}
    b1, b2 = rng.normal(size=N1).astype(np.float32), rng.normal(size=N2).astype(np.float32)
    qg = quantize_graph(linear_graph(w1, b1, w2, b2), ws, ConvertConfig(k=k, storage=storage, **INTEGER))
    return qg, ws, K1


@pytest.mark.parametrize("k", [0, 5])
def test_integer_compact_is_the_plain_file_in_7_bits(tmp_path, k):
    from edgeq.onnx.integer import OP, integer_layers

    compact, ws, k_in = integer_file("compact", k)
    plain, _, _ = integer_file("plain", k)
    t, tp = inits(compact.model), inits(plain.model)
    assert "lin1.qweight" not in t and t["lin1.q7"].data_type == TensorProto.UINT8
    assert list(t["lin1.q7"].dims) == [-(-tp["lin1.qweight"].dims[0] * tp["lin1.qweight"].dims[1] // 8), 7]
    for name, w in ws.items():  # the file decodes to the plan (snapped: W itself), in both storages
        np.testing.assert_array_equal(read_back(compact.model)[name], w)
        np.testing.assert_array_equal(integer_layers(compact.model)[name].q, integer_layers(plain.model)[name].q)
    x = np.random.default_rng(4).normal(size=(3, 5, k_in)).astype(np.float32)
    opt = str(tmp_path / "opt.onnx")
    got = session(compact.model, opt).run(["y"], {"x": x})[0]
    np.testing.assert_array_equal(got, session(plain.model).run(["y"], {"x": x})[0])  # same int8 B, same numbers
    optimized = onnx.load(opt)
    assert [n.op_type for n in optimized.graph.node if "/unpack/" in n.name] == []  # folded at session creation
    folded = {t.name for t in optimized.graph.initializer}
    b_inputs = [n.input[1] for n in optimized.graph.node if n.op_type == OP]
    assert len(b_inputs) == 2 and all(b in folded for b in b_inputs)  # B is a plain initializer


def test_integer_compact_refusals():
    from edgeq.config import ConvertConfig
    from edgeq.onnx.storage import integer_weight

    with pytest.raises(ValueError, match=r"holds \|q\| <= 63"):
        integer_weight("lin", np.array([[64, 0]], np.int8), "compact")
    with pytest.raises(ValueError, match="--storage compact holds 2, 3 or 4 bits per weight"):
        ConvertConfig(bits=8, storage="compact")  # the MatMulNBits path has no 8-bit compact form
    assert ConvertConfig(bits=8, storage="compact", kernel="integer", block_size="per-channel").storage == "compact"


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (8, 8), (80, 24)])
def test_7bit_groups_roundtrip_in_numpy_and_onnxruntime(shape):
    """Any size (the last group padded): the unpack subgraph and the numpy decoder both give B back."""
    from onnx import helper

    from edgeq.onnx.storage import decode_integer_weight, integer_weight

    b = np.random.default_rng(sum(shape)).integers(-63, 64, size=shape).astype(np.int8)
    b.reshape(-1)[0] = -63
    name, nodes, tensors = integer_weight("lin", b, "compact")
    t = {x.name: x for x in tensors}
    assert list(t["lin.q7"].dims) == [-(-b.size // 8), 7]
    np.testing.assert_array_equal(decode_integer_weight("lin", name, t, lambda n: onnx.numpy_helper.to_array(t[n])), b)
    graph = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(name, TensorProto.INT8, list(shape))],
                              tensors)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    np.testing.assert_array_equal(session(model).run(None, {})[0], b)


def test_8bit_table_scales_are_float16_and_folded(tmp_path):
    """8-bit GatherBlockQuantized tables: scales rounded to float16 before the codes, stored float16 and
    cast at load (folded); ORT's gather == the decoded Ê == the plan; snapped rows come back exactly."""
    from edgeq.onnx.embeddings import quantize_embeddings, read_embeddings
    from tests.onnx.test_corrections import emb_graph
    from tests.quant.test_int4 import snapped

    table, _, _ = snapped(70, 256, 128, seed=8, qmax=127)  # power-of-two scales: float16 values
    table[3] = np.random.default_rng(9).normal(size=256) * 0.1  # an off-grid row with a non-fp16 max/127
    model = emb_graph(table)
    res = quantize_embeddings(model, 32, bits=8)
    t = inits(model)
    assert t["E.emb_scales"].data_type == TensorProto.FLOAT16 and list(t["E.emb_scales"].dims) == [70, 2]
    node = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    assert node.input[2] != "E.emb_scales"  # through the Cast
    ids = np.random.default_rng(10).integers(0, 70, size=(2, 7))
    got = session(model, str(tmp_path / "opt.onnx")).run(None, {"input_ids": ids})[0]
    assert [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node] == ["GatherBlockQuantized"]
    e_hat = read_embeddings(model)["E"]
    np.testing.assert_array_equal(got, e_hat[ids])
    np.testing.assert_array_equal(e_hat, res.tables["E"])
    rows = np.arange(70) != 3
    np.testing.assert_array_equal(e_hat[rows], table[rows])
    assert 0 < np.abs(e_hat[3] - table[3]).max() <= np.abs(table[3]).max() / 254 * 1.001  # half a step
