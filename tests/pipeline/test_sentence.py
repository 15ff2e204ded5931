"""Embedding models end to end: convert, validate, the sentence-transformers folder (tiny random models)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.model.texts import encode_texts
from edgeq.pipeline.parity import DEFAULT_MIN_COSINE
from tests.helpers import WORDS, make_st_folder


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


def _session(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _checks(report: dict) -> dict[str, dict]:
    return {c["name"]: c for c in report["parity"]["checks"]}


def _sts_tsv(tmp_path, n: int = 12):
    """An STS-B-shaped dev.tsv built from the tiny tokenizer's words, with made-up scores."""
    rng = np.random.default_rng(0)
    d = tmp_path / "glue" / "STS-B"
    d.mkdir(parents=True)
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(n):
        a, b = (" ".join(rng.choice(WORDS, 6)) for _ in range(2))
        rows.append(f"{i}\tmain\tx\t2012\t{i}\tx\tx\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
    (d / "dev.tsv").write_text("\n".join(rows) + "\n")
    return d / "dev.tsv"


@pytest.fixture(scope="module")
def st_dense(tiny_model, tmp_path_factory):
    """A tiny sentence-transformers folder (0_Transformer layout, mean pooling, Dense, Normalize)."""
    return make_st_folder(tmp_path_factory.mktemp("st") / "st", tiny_model("BertModel"), "sub", dense=24)


@pytest.fixture(scope="module")
def st_folder_out(st_dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("st-out") / "deploy"
    res = _run("convert", "-q", "--k", "4", str(st_dense), str(out))
    assert res.exit_code == 0, res.output
    return out


def test_sentence_model_converts_with_pooling_dense_normalize_in_the_graph(st_dense, st_folder_out):
    report = json.loads((st_folder_out / "edgeq_report.json").read_text())
    assert report["head"] == "sentence-embedding" and report["sentence"]["pooling"] == ["mean"]
    assert report["linears_quantized"] == report["linears_total"] and "dense.0.linear" in report["layers"]
    checks = _checks(report)
    assert checks["vs fp32: sentence_embedding min cosine"]["limit"] == DEFAULT_MIN_COSINE
    assert checks["vs fp32: sentence_embedding min cosine"]["value"] <= \
        checks["vs fp32: sentence_embedding mean cosine"]["value"]
    sess = _session(st_folder_out / "model.onnx")
    assert [o.name for o in sess.get_outputs()] == ["sentence_embedding", "token_embeddings", "last_hidden_state"]
    ops = {n.op_type for n in __import__("onnx").load(str(st_folder_out / "model.onnx")).graph.node}
    assert "ReduceSum" in ops and "Tanh" in ops  # pooling and the Dense activation are in the graph
    from transformers import AutoTokenizer

    (feed,) = encode_texts(AutoTokenizer.from_pretrained(st_folder_out), [("the quick brown fox", None),
                                                                          ("paris is the capital", None)])
    emb, tok, lhs = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
    assert emb.shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(tok, lhs)
    res = _run("validate", str(st_dense), str(st_folder_out))
    assert res.exit_code == 0, res.output
    assert "sentence_embedding min cosine" in res.output


def test_pooling_option_and_the_cosine_gate(tiny_model, tmp_path):
    tiny = tiny_model("BertModel")
    out = tmp_path / "mean.onnx"
    res = _run("convert", "-q", "--k", "4", "--pooling", "max", "--normalize", str(tiny), str(out))
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_suffix(".json").read_text())["config"]["pooling"] == "max"
    res = _run("validate", str(tiny), str(out), "--min-cosine", "0.5")  # the file's pooling, from its metadata
    assert res.exit_code == 0, res.output
    assert "sentence_embedding min cosine" in res.output
    gated = tmp_path / "gated.onnx"
    res = _run("convert", "-q", "--k", "0", "--bits", "2", "--pooling", "mean", "--min-cosine", "1",
               str(tiny), str(gated))
    assert res.exit_code == 1 and "min cosine" in res.output
    assert not gated.exists() and not gated.with_suffix(".json").exists()
    cls = tmp_path / "cls.onnx"
    res = _run("convert", "-q", "--k", "4", "--min-cosine", "0.9", str(tiny_model()), str(cls))
    assert res.exit_code == 1 and "--min-cosine needs an embedding model" in res.output and not cls.exists()


def test_sts_b_spearman_in_validation(st_dense, tmp_path):
    dev = _sts_tsv(tmp_path)
    out = tmp_path / "st.onnx"
    res = _run("convert", "-q", "--k", "4", "--data", str(dev), str(st_dense), str(out))
    assert res.exit_code == 0, res.output
    report = json.loads(out.with_suffix(".json").read_text())
    checks = _checks(report)
    assert report["parity"]["examples"] == 24  # 12 pairs, each sentence alone
    assert {"STS-B spearman (fp32)", "STS-B spearman (quantized)"} <= set(checks)
    assert all(-1 <= checks[f"STS-B spearman ({w})"]["value"] <= 1 for w in ("fp32", "quantized"))


def test_regression_head_gets_correlations_not_cosine(tiny_model, tmp_path):
    out = tmp_path / "reg.onnx"
    res = _run("convert", "-q", "--k", "4", str(tiny_model(num_labels=1)), str(out))
    assert res.exit_code == 0, res.output
    names = set(_checks(json.loads(out.with_suffix(".json").read_text())))
    assert {"vs fp32: logits pearson", "vs fp32: logits spearman", "vs fp32: logits max|d|"} <= names
    assert "vs fp32: logits mean cosine" not in names


@pytest.mark.deploy
def test_sentence_transformers_loads_the_folder(st_folder_out, sentence_transformers, optimum_ort):
    """SentenceTransformer(dir, backend="onnx").encode == the file's sentence_embedding (1e-5)."""
    texts = ["the quick brown fox jumps over the lazy dog", "a man is playing guitar", "paris"]
    model = sentence_transformers.SentenceTransformer(str(st_folder_out), backend="onnx", device="cpu")
    got = model.encode(texts, convert_to_numpy=True)
    sess = _session(st_folder_out / "model.onnx")
    (feed,) = encode_texts(model.tokenizer, [(t, None) for t in texts], max_length=model.max_seq_length)
    want = sess.run(["sentence_embedding"], {i.name: feed[i.name] for i in sess.get_inputs()})[0]
    assert np.max(np.abs(got - want)) <= 1e-5
    feat = optimum_ort.ORTModelForFeatureExtraction.from_pretrained(st_folder_out)
    lhs = sess.run(["last_hidden_state"], {i.name: feed[i.name] for i in sess.get_inputs()})[0]
    np.testing.assert_array_equal(np.asarray(feat(**feed).last_hidden_state), lhs)


def _st_and_ort(sentence_transformers, out, texts):
    """(SentenceTransformer(out, backend="onnx").encode(texts), ONNX Runtime's sentence_embedding of the same
    tokenisation) for a folder edgeq wrote."""
    model = sentence_transformers.SentenceTransformer(str(out), backend="onnx", device="cpu")
    got = model.encode(texts, convert_to_numpy=True)
    sess = _session(out / "model.onnx")
    (feed,) = encode_texts(model.tokenizer, [(t, None) for t in texts], max_length=model.max_seq_length)
    return got, sess.run(["sentence_embedding"], {i.name: feed[i.name] for i in sess.get_inputs()})[0]


@pytest.mark.deploy
@pytest.mark.parametrize("pooling", [("cls", "max"), ("weightedmean",), ("mean_sqrt_len_tokens",)])
def test_sentence_transformers_agrees_for_every_pooling_mode(tiny_model, sentence_transformers, tmp_path, pooling):
    src = make_st_folder(tmp_path / "st", tiny_model("BertModel"), "root", pooling=pooling, normalize=False)
    out = tmp_path / "deploy"
    res = _run("convert", "-q", "--k", "4", str(src), str(out))
    assert res.exit_code == 0, res.output
    texts = ["the quick brown fox", "a man is playing guitar on stage today"]
    got, want = _st_and_ort(sentence_transformers, out, texts)
    assert got.shape == want.shape == (2, 48 * len(pooling)) and np.max(np.abs(got - want)) <= 1e-5


@pytest.mark.deploy
def test_pooling_option_folder_loads_in_sentence_transformers(tiny_model, sentence_transformers, tmp_path):
    out = tmp_path / "deploy"
    res = _run("convert", "-q", "--k", "4", "--pooling", "cls", "--normalize", str(tiny_model("BertModel")), str(out))
    assert res.exit_code == 0, res.output
    got, want = _st_and_ort(sentence_transformers, out, ["the quick brown fox", "paris is the capital of france"])
    assert np.max(np.abs(got - want)) <= 1e-5
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
