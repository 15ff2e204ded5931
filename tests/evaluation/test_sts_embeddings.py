"""`edgeq eval --task STS-B` on embedding models: cosine of the two sentences' embeddings vs gold."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.evaluation.embedding import cosine_scores, mean_pool
from edgeq.evaluation.metrics import pearson, spearman
from tests.helpers import WORDS, make_st_folder


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    rng = np.random.default_rng(3)
    d = tmp_path_factory.mktemp("glue")
    (d / "STS-B").mkdir()
    rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"]
    for i in range(20):
        a, b = (" ".join(rng.choice(WORDS, int(rng.integers(3, 9)))) for _ in range(2))
        rows.append(f"{i}\tmain\tx\t2012\t{i}\tx\tx\t{a}\t{b}\t{rng.uniform(0, 5):.3f}")
    (d / "STS-B" / "dev.tsv").write_text("\n".join(rows) + "\n")
    return d


def _eval(model, glue, tmp_path, *extra):
    out = tmp_path / f"r{len(list(tmp_path.iterdir()))}.json"
    res = CliRunner().invoke(main, ["eval", str(model), "--task", "STS-B", "--data-dir", str(glue), "-q",
                                    "--json", str(out), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(out.read_text())


def test_cosine_and_mean_pool_definitions():
    emb = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [0.0, -1.0]])
    np.testing.assert_allclose(cosine_scores(emb), [1 / np.sqrt(2), -1.0])
    h = np.arange(12, dtype=np.float64).reshape(1, 4, 3)
    np.testing.assert_allclose(mean_pool(h, np.array([[1, 1, 0, 0]])), [[1.5, 2.5, 3.5]])


def test_sts_on_a_sentence_transformers_folder_pytorch_and_onnx(tiny_model, glue, tmp_path):
    st = make_st_folder(tmp_path / "st", tiny_model("BertModel"), "sub")
    fp32 = _eval(st, glue, tmp_path)
    assert fp32["engine"] == "pytorch" and "sentence-transformers" in fp32["extra"]["embedding"]
    # the same metric by hand from the wrapper's embeddings
    from edgeq.evaluation.tasks import TASKS, read_examples
    from edgeq.model.load import load_model
    from edgeq.pipeline.parity import run_torch

    loaded = load_model(st)
    ex = read_examples(TASKS["STS-B"], glue / "STS-B" / "dev.tsv")
    from edgeq.model.texts import encode_batches

    batches = encode_batches(loaded, [(s, None) for p in ex.texts for s in p])
    cos = cosine_scores(run_torch(loaded.model, loaded, batches)["sentence_embedding"])
    assert fp32["metrics"]["spearman"] == pytest.approx(spearman(cos, ex.gold), abs=1e-9)
    assert fp32["metrics"]["pearson"] == pytest.approx(pearson(cos, ex.gold), abs=1e-6)
    out = tmp_path / "all-fp32"  # k beyond every Linear's size: the file computes the FP32 model
    assert CliRunner().invoke(main, ["convert", "-q", "--k", "100000", str(st), str(out)]).exit_code == 0
    onnx = _eval(out, glue, tmp_path)
    assert onnx["engine"] == "onnxruntime" and onnx["extra"]["embedding"] == "sentence_embedding"
    assert onnx["metrics"]["spearman"] == pytest.approx(fp32["metrics"]["spearman"], abs=1e-6)


def test_sts_on_a_bare_encoder_uses_mean_pooling(tiny_model, glue, tmp_path):
    bare = tiny_model("BertModel")
    fp32 = _eval(bare, glue, tmp_path)
    assert "--pooling: mean pooling" in fp32["extra"]["embedding"]
    out = tmp_path / "bare.onnx"
    assert CliRunner().invoke(main, ["convert", "-q", "--k", "100000", str(bare), str(out)]).exit_code == 0
    onnx = _eval(out, glue, tmp_path)
    assert onnx["extra"]["embedding"] == "mean of last_hidden_state"
    assert onnx["metrics"]["pearson"] == pytest.approx(fp32["metrics"]["pearson"], abs=1e-6)


def test_embedding_model_on_a_classification_task_is_refused(tiny_model, tmp_path):
    st = make_st_folder(tmp_path / "st", tiny_model("BertModel"), "root")
    d = tmp_path / "glue" / "SST-2"
    d.mkdir(parents=True)
    (d / "dev.tsv").write_text("sentence\tlabel\nthe quick brown fox\t1\n")
    res = CliRunner().invoke(main, ["eval", str(st), "--task", "SST-2", "--data-dir", str(tmp_path / "glue")])
    assert res.exit_code == 1 and "evaluate it on STS-B" in res.output
