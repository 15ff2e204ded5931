"""Calibration statistics, awq/spqr saliency, selection overlap and `edgeq saliency`
(ALGORITHMS.md §3.1, §4.1, §7, §12).

§12 item 1 (rank ≤ r ⇒ svd selection == magnitude) is tested in tests/saliency/test_weight_only.py.
"""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError
from edgeq.model.calib import (
    InputStats,
    accumulate,
    collect_input_stats,
    load_calibration_texts,
    masked_rows,
    resolve_calib_source,
)
from edgeq.saliency import ScoreContext, get_method, topk_flat
from edgeq.saliency.overlap import (
    LayerPair,
    chance_iou,
    descending_order,
    intersection_size,
    iou,
    layer_overlaps,
    summarize,
    topk_from_order,
)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a man is playing guitar on stage",
    "i loved this film",
    "quantization reduces size of neural networks and the story moved me",
    "paris capital france",
    "she bought three apples at market",
    "it rained all day so match cancelled",
    "company reported record profits",
]


def stats_from(x: np.ndarray) -> InputStats:
    s = InputStats(n_features=x.shape[1])
    accumulate(s, torch.from_numpy(x))
    return s


def score(name, w, stats=None, **kw):
    return get_method(name).score(torch.as_tensor(w), ScoreContext(layer="l", stats=stats, **kw))


# ----------------------------------------------------------------------------- statistics math


def test_accumulate_matches_direct_formulas_and_streams():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 7))
    s = InputStats(n_features=7)
    for chunk in np.array_split(x, 4):
        accumulate(s, torch.from_numpy(chunk))
    assert s.count == 50
    np.testing.assert_allclose(s.mean_abs.numpy(), np.abs(x).mean(0), rtol=1e-12)
    np.testing.assert_allclose(s.xtx.numpy(), x.T @ x, rtol=1e-12)
    np.testing.assert_allclose(s.hessian().numpy(), 2 / 50 * x.T @ x, rtol=1e-12)


def test_masked_rows_drops_padding_and_keeps_cls_only_inputs():
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_rows(x, mask).tolist() == [[0, 1], [2, 3], [6, 7]]
    assert masked_rows(x[:, 0], mask).shape == (2, 2)  # [B, n]: pooler / classifier
    with pytest.raises(ValueError, match="does not match"):
        masked_rows(x, mask[:, :2])


def _batches(loaded, texts, pad_to=None, batch_size=4):
    from edgeq.model.texts import encode_batches

    batches = encode_batches(loaded, [(t, None) for t in texts], batch_size)
    if pad_to:  # extra padding tokens on the right, masked out
        pad = loaded.tokenizer.pad_token_id
        for b in batches:
            extra = pad_to - b["input_ids"].shape[1]
            for name in b:
                fill = pad if name == "input_ids" else 0
                b[name] = np.pad(b[name], ((0, 0), (0, extra)), constant_values=fill)
    return batches


def test_statistics_exclude_padding(tiny_bert):
    from edgeq.model.load import load_model

    loaded = load_model(tiny_bert)
    plain = _batches(loaded, SENTENCES)
    padded = _batches(loaded, SENTENCES, pad_to=40)
    single = _batches(loaded, SENTENCES, batch_size=1)  # no padding at all
    loaded.model.train()  # dropout on: the collection must still run in eval mode
    a = collect_input_stats(loaded.model, plain)
    assert loaded.model.training  # and give the mode back
    loaded.model.eval()
    b = collect_input_stats(loaded.model, padded)
    c = collect_input_stats(loaded.model, single)
    tokens = int(sum(bt["attention_mask"].sum() for bt in plain))
    for name in a:
        assert a[name].count == b[name].count == c[name].count
        for other in (b, c):
            np.testing.assert_allclose(other[name].mean_abs.numpy(), a[name].mean_abs.numpy(), rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(other[name].xtx.numpy(), a[name].xtx.numpy(), rtol=1e-4, atol=1e-5)
    assert a["bert.encoder.layer.0.attention.self.query"].count == tokens
    assert a["bert.pooler.dense"].count == a["classifier"].count == len(SENTENCES)  # CLS-only inputs
    # q/k/v read the same tensor: one statistics object
    q, k, v = (a[f"bert.encoder.layer.1.attention.self.{n}"] for n in ("query", "key", "value"))
    assert q is k is v and q.layers[0].endswith("query") and len(q.layers) == 3
    assert a["bert.encoder.layer.1.attention.output.dense"] is not q
    # and padding that is not masked would change them (the test can fail)
    for bt in padded:
        bt["attention_mask"] = np.ones_like(bt["attention_mask"])
    d = collect_input_stats(loaded.model, padded)
    assert d["bert.encoder.layer.0.intermediate.dense"].count > tokens


# ----------------------------------------------------------------------------- calibration text


def test_calibration_text_sources(tmp_path, monkeypatch):
    glue = tmp_path / "glue"
    (glue / "SST-2").mkdir(parents=True)
    rows = "".join(f"sentence number {i}\t{i % 2}\n" for i in range(50))
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\n" + rows)
    a = load_calibration_texts("sst2", 10, seed=3, data_dir=glue)
    assert a.source.endswith("train.tsv") and a.available == 50 and len(a.texts) == 10
    assert len(set(a.texts)) == 10 and a.texts == load_calibration_texts("SST-2", 10, 3, glue).texts
    assert a.texts != load_calibration_texts("sst2", 10, 4, glue).texts
    assert len(load_calibration_texts("sst2", 500, 0, glue).texts) == 50  # fewer available: all
    txt = tmp_path / "calib.txt"
    txt.write_text("one sentence\n\nanother one\n")
    assert load_calibration_texts(str(txt), 128).texts == [("one sentence", None), ("another one", None)]
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("a premise\ta hypothesis\n")
    assert load_calibration_texts(str(pairs)).texts == [("a premise", "a hypothesis")]
    with pytest.raises(EdgeqError, match="no GLUE task of that name"):
        resolve_calib_source("mnli", glue)
    monkeypatch.delenv("EDGEQ_GLUE_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EdgeqError, match="--data-dir"):
        resolve_calib_source("rte")
    monkeypatch.setenv("EDGEQ_GLUE_DIR", str(glue))
    assert resolve_calib_source("sst-2").name == "train.tsv"


# ----------------------------------------------------------------------------- awq / spqr scores


def test_uniform_activations_make_awq_rank_by_magnitude():
    w = np.random.default_rng(1).normal(size=(24, 32)).astype(np.float32)
    s = InputStats(n_features=32, count=10, abs_sum=torch.full((32,), 7.0, dtype=torch.float64))
    for k in (1, 16, 200):
        np.testing.assert_array_equal(topk_flat(score("awq", w, s), k), topk_flat(score("magnitude", w), k))


def test_identity_hessian_makes_spqr_rank_by_magnitude():
    w = np.random.default_rng(2).normal(size=(24, 32)).astype(np.float32)
    s = InputStats(n_features=32, count=5, xtx=torch.eye(32, dtype=torch.float64) * 3.0)
    for pd in (0.0, 0.01, 1.0):
        for k in (1, 16, 200):
            np.testing.assert_array_equal(topk_flat(score("spqr", w, s, percdamp=pd), k),
                                          topk_flat(score("magnitude", w), k))


def test_awq_and_spqr_follow_the_activations():
    rng = np.random.default_rng(3)
    w = (rng.uniform(0.5, 1.5, size=(16, 8)) * rng.choice([-1, 1], size=(16, 8))).astype(np.float32)
    x = rng.normal(size=(400, 8))
    x[:, 5] *= 100.0  # one loud input channel
    s = stats_from(x)
    for m in ("awq", "spqr"):
        top = topk_flat(score(m, w, s), 16).numpy()
        assert set(top % 8) == {5}, m  # the whole loud column, not the largest |W|
    # spqr's H⁻¹ sees correlations that awq's per-channel mean cannot: a duplicated input is less salient
    x2 = rng.normal(size=(400, 3))
    x2 = np.column_stack([x2[:, 0], x2[:, 0] + 1e-3 * x2[:, 1], x2[:, 2]])
    w2 = np.ones((1, 3), dtype=np.float32)
    sp = score("spqr", w2, stats_from(x2), percdamp=0.0).numpy()[0]
    assert sp[2] > 100 * max(sp[0], sp[1])


def test_spqr_handles_dead_inputs():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(100, 6))
    x[:, 2] = 0.0
    w = rng.normal(size=(5, 6)).astype(np.float32)
    w[:, 2] = 50.0  # huge weights on an input that is never active
    for pd in (0.0, 0.01):
        sc = score("spqr", w, stats_from(x), percdamp=pd)
        assert torch.isfinite(sc).all() and (sc[:, 2] == 0).all()
        assert (topk_flat(sc, 5) % 6 != 2).all()


def test_calibration_methods_without_statistics_fail_clearly():
    w = np.ones((4, 4), dtype=np.float32)
    for m in ("awq", "spqr"):
        assert get_method(m).needs_calibration
        with pytest.raises(ValueError, match="--calib"):
            score(m, w)
        with pytest.raises(ValueError, match=f"--method {m} needs calibration data; pass --calib"):
            ConvertConfig(method=m)
        ConvertConfig(method=m, calib="rte")


@pytest.mark.parametrize("method", ["svd", "magnitude", "awq", "spqr"])
def test_planted_outlier_is_selected_by_every_method(method):
    rng = np.random.default_rng(5)
    w = rng.normal(scale=0.05, size=(48, 64)).astype(np.float32)
    w[13, 29] = 20 * np.abs(w).max()
    x = rng.normal(size=(300, 64)) * rng.uniform(0.5, 1.5, size=64)  # uneven but healthy activations
    assert 13 * 64 + 29 in topk_flat(score(method, w, stats_from(x)), 1).tolist()


# ----------------------------------------------------------------------------- overlap math


def test_iou_invariants():
    rng = np.random.default_rng(6)
    a = np.sort(rng.choice(1000, 64, replace=False))
    assert iou(a, a) == 1.0
    assert iou(np.arange(10), np.arange(10, 20)) == 0.0
    for _ in range(20):
        b = np.sort(rng.choice(1000, 64, replace=False))
        c = intersection_size(a, b)
        assert iou(a, b) == pytest.approx(c / (2 * 64 - c))
        p = LayerPair("l", "x", "y", 64, 1000, c)
        assert p.iou == pytest.approx(iou(a, b)) and p.overlap == pytest.approx(c / 64)
        assert p.overlap == pytest.approx(2 * p.iou / (1 + p.iou))


def test_order_prefixes_are_the_registry_topk():
    s = torch.from_numpy(np.random.default_rng(7).integers(0, 5, size=(12, 9)).astype(np.float64))  # many ties
    order = descending_order(s, 50)
    for k in (1, 7, 50):
        np.testing.assert_array_equal(topk_from_order(order, k), topk_flat(s, k).numpy())


def test_summary_macro_micro_and_trivial_layers():
    pairs = [LayerPair("l1", "a", "b", 4, 100, 4), LayerPair("l2", "a", "b", 4, 100, 0),
             LayerPair("tiny", "a", "b", 4, 4, 4)]  # k ≥ size: excluded
    (row,) = summarize(pairs)
    assert row["layers"] == 2 and row["layers_identical"] == 1
    assert row["macro_iou"] == pytest.approx(0.5)
    assert row["micro_iou"] == pytest.approx(4 / (8 + 4))
    assert row["macro_overlap"] == pytest.approx(0.5) and row["micro_overlap"] == pytest.approx(0.5)
    assert row["chance_iou"] == pytest.approx(chance_iou(4, 100))


def test_chance_iou_matches_simulation():
    rng = np.random.default_rng(8)
    cs = [
        intersection_size(rng.choice(200, 20, replace=False), rng.choice(200, 20, replace=False)) for _ in range(3000)
    ]
    assert np.mean(cs) == pytest.approx(20 * 20 / 200, rel=0.05)


def test_layer_overlaps_concentration():
    w = np.zeros((4, 5))
    w[2, :] = 1.0  # one row holds every large entry
    orders = {"magnitude": descending_order(np.abs(w)), "other": descending_order(-np.abs(w))}
    pairs, conc = layer_overlaps("l", w.shape, orders, [5])
    mag = next(c for c in conc if c.method == "magnitude")
    assert (mag.rows_touched, mag.cols_touched) == (1, 5)
    assert pairs[0].intersection == 0


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    model_dir = tiny_bert
    calib = d / "calib.txt"
    calib.write_text("\n".join(SENTENCES) + "\n")
    return model_dir, calib


def test_saliency_command_writes_json_csv_png(tiny, tmp_path):
    model_dir, calib = tiny
    out = tmp_path / "sal"
    res = CliRunner().invoke(main, ["saliency", str(model_dir), "--methods", "svd,awq,spqr,magnitude",
                                    "--k", "1,16,64", "--calib", str(calib), "--out", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "svd vs spqr" in res.output
    rep = json.loads((out / "saliency.json").read_text())
    assert rep["calibration"]["samples"] == len(SENTENCES) and rep["calibration"]["source"] == str(calib)
    assert len(rep["summary"]) == 6 * 3  # 6 pairs × 3 k
    n_layers = len(rep["layers"])
    assert set(rep["per_layer"]) == set(rep["layers"]) == set(rep["concentration"])
    for layer, d in rep["per_layer"].items():
        assert len(d["iou"]) == 6
        for pair, ious in d["iou"].items():
            for k, v, c in zip(rep["k"], ious, d["intersection"][pair]):
                assert 0 <= v <= 1 and v == pytest.approx(c / (2 * min(k, d["size"]) - c), abs=1e-5)
        assert all(len(v["rows_touched"]) == 3 for v in rep["concentration"][layer].values())
    assert len((out / "concentration.csv").read_text().splitlines()) == 1 + 4 * 3 * n_layers
    header = (out / "overlap_summary.csv").read_text().splitlines()[0]
    assert "macro_iou" in header and "micro_iou" in header
    assert len((out / "overlap_layers.csv").read_text().splitlines()) == 1 + 6 * 3 * n_layers
    assert (out / "iou.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saliency_command_needs_calibration_for_awq(tiny, tmp_path):
    model_dir, _ = tiny
    res = CliRunner().invoke(main, ["saliency", str(model_dir), "--methods", "svd,awq", "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--calib" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_convert_awq_without_calibration_fails_cleanly(tiny, tmp_path):
    model_dir, _ = tiny
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--method", "awq", str(model_dir), str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [
        "edgeq: error: --method awq needs calibration data; pass --calib TASK_OR_FILE (e.g. --calib rte)"]
    assert not out.exists()


def test_convert_spqr_with_calibration_records_it(tiny, tmp_path):
    model_dir, calib = tiny
    out = tmp_path / "o.onnx"
    res = CliRunner().invoke(main, ["convert", "-q", "--method", "spqr", "--calib", str(calib), "--calib-samples", "5",
                                    "--seed", "2", "--k", "16", str(model_dir), str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    rep = json.loads(out.with_suffix(".json").read_text())
    assert rep["parity"]["ok"]
    assert rep["calibration"]["source"] == str(calib)
    assert (rep["calibration"]["samples"], rep["calibration"]["seed"]) == (5, 2)
    assert rep["config"]["method"] == "spqr" and rep["config"]["percdamp"] == 0.01


# ----------------------------------------------------------------------------- real model


@pytest.mark.real
def test_real_model_calibration_and_planted_outliers(shared_path):
    from edgeq.model.calib import calibrate
    from edgeq.model.load import load_model

    loaded = load_model(shared_path("models", "minilm-l6-rte"))
    cal = calibrate(loaded, "rte", samples=8, seed=0, data_dir=shared_path("data", "glue"))
    assert cal.samples == 8 and cal.source.endswith("RTE/train.tsv") and len(cal.stats) == 38
    assert len({id(s) for s in cal.stats.values()}) == 38 - 2 * 6  # q/k/v share one input per block
    assert cal.stats["classifier"].count == 8 and cal.stats["bert.pooler.dense"].count == 8
    name = "bert.encoder.layer.3.output.dense"
    st = cal.stats[name]
    assert st.count == cal.tokens and st.n_features == 1536
    assert torch.linalg.eigvalsh(st.hessian()).min() > -1e-8 * st.hessian().diagonal().max()  # PSD
    w = loaded.linear_weights()[name].copy()
    w[100, 700] = 20 * np.abs(w).max()
    for m in ("svd", "magnitude", "awq", "spqr"):
        ctx = ScoreContext(layer=name, stats=st)
        assert 100 * 1536 + 700 in topk_flat(get_method(m).score(torch.from_numpy(w), ctx), 1).tolist(), m
