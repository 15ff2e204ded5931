"""GLUE reading, label alignment and `edgeq eval` on a tiny random model (ONNX and PyTorch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import EdgeqError, UsageError
from edgeq.evaluation.tasks import get_task, label_ids, read_examples
from tests.helpers import WORDS

RTE_LABELS = {"0": "entailment", "1": "not_entailment"}


def write_rte(data_dir: Path, n: int = 24, seed: int = 0) -> Path:
    """A tiny RTE-format dev.tsv (header, index, two sentences, label) from the tiny vocabulary."""
    rng = np.random.default_rng(seed)
    lines = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        a = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 12))))
        b = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 6))))
        lines.append(f"{i}\t\"{a}\t{b}\t{'entailment' if rng.random() < 0.5 else 'not_entailment'}")
    (data_dir / "RTE").mkdir(parents=True, exist_ok=True)
    path = data_dir / "RTE" / "dev.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def set_labels(model_dir: Path, id2label: dict[str, str]) -> None:
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["id2label"] = id2label
    cfg["label2id"] = {v: int(k) for k, v in id2label.items()}
    cfg_path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_rte(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    model = tiny_model(seed=3, copy_to=root / "model")  # its labels are edited
    set_labels(model, RTE_LABELS)
    write_rte(root / "glue")
    return root, model


def _run(args):
    res = CliRunner().invoke(main, args)
    return res


def test_read_examples_keeps_quotes_and_maps_labels(tiny_rte):
    root, _ = tiny_rte
    ex = read_examples(get_task("rte"), root / "glue" / "RTE" / "dev.tsv")
    assert len(ex.texts) == 24
    assert all(t[0].startswith('"') for t in ex.texts)  # quoting disabled: the stray quote stays text
    assert set(ex.gold) <= {"entailment", "not_entailment"}
    assert len(read_examples(get_task("RTE"), root / "glue" / "RTE" / "dev.tsv", limit=5).texts) == 5


def test_task_names_and_unknown_task():
    assert get_task("sst2").name == "SST-2" and get_task("sts-b").name == "STS-B"
    with pytest.raises(UsageError, match="unknown GLUE task"):
        get_task("mnli-mm")


def test_label_ids_follow_config_order():
    rte = get_task("RTE")
    assert label_ids(rte, {0: "entailment", 1: "not_entailment"}, 2) == {"entailment": 0, "not_entailment": 1}
    assert label_ids(rte, {0: "not_entailment", 1: "ENTAILMENT"}, 2) == {"entailment": 1, "not_entailment": 0}
    assert label_ids(get_task("SST-2"), {0: "neg", 1: "pos"}, 2) == {"negative": 0, "positive": 1}


@pytest.mark.parametrize("id2label", [{0: "negative", 1: "positive"}, {0: "LABEL_0", 1: "LABEL_1"},
                                      {0: "entailment", 1: "not_entailment", 2: "neutral"}])
def test_label_mismatch_is_a_clear_error(id2label):
    with pytest.raises(EdgeqError, match="do not match RTE|does not describe"):
        label_ids(get_task("RTE"), id2label, 2)


def test_regression_task_needs_one_output():
    assert label_ids(get_task("STS-B"), None, 1) == {}
    with pytest.raises(EdgeqError, match="regression"):
        label_ids(get_task("STS-B"), {0: "a", 1: "b"}, 2)


def _expected_accuracy(model_dir: Path, tsv: Path) -> float:
    """Independent of edgeq.evaluation.evaluate: one example at a time, no batching, labels from config.json."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    id2label = model.config.id2label
    rows = [line.split("\t") for line in tsv.read_text().splitlines()[1:]]
    hits = 0
    with torch.no_grad():
        for _, a, b, gold in rows:
            logits = model(**tok(a, b, return_tensors="pt", truncation=True, max_length=128)).logits
            hits += id2label[int(logits.argmax())] == gold
    return hits / len(rows)


def test_eval_pytorch_and_onnx_agree_with_independent_loop(tiny_rte, tmp_path):
    import onnx

    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    root, model = tiny_rte
    data = root / "glue"
    expected = _expected_accuracy(model, data / "RTE" / "dev.tsv")

    out_pt = tmp_path / "pt.json"
    res = _run(["eval", str(model), "--task", "rte", "--data-dir", str(data), "--json", str(out_pt), "-q"])
    assert res.exit_code == 0, res.output
    pt = json.loads(out_pt.read_text())
    assert pt["engine"] == "pytorch" and pt["examples"] == 24
    assert pt["metrics"]["accuracy"] == pytest.approx(expected)
    assert pt["correct"] == round(expected * 24)
    assert "accuracy" in res.output

    onnx_path = tmp_path / "fp32.onnx"
    onnx.save(export_fp32(load_model(model)), str(onnx_path))
    out_ox = tmp_path / "ox.json"
    res = _run(["eval", str(onnx_path), "--task", "RTE", "--data-dir", str(data), "--tokenizer", str(model),
                "--json", str(out_ox), "--threads", "1", "--batch-size", "5", "-q"])
    assert res.exit_code == 0, res.output
    ox = json.loads(out_ox.read_text())
    assert ox["engine"] == "onnxruntime"
    assert ox["correct"] == pt["correct"] and ox["predictions"] == pt["predictions"]

    # without --tokenizer: found through model_dir in the report beside the ONNX file
    (tmp_path / "fp32.json").write_text(json.dumps({"model_dir": str(model)}))
    res = _run(["eval", str(onnx_path), "--task", "RTE", "--data-dir", str(data), "-q"])
    assert res.exit_code == 0, res.output
    (tmp_path / "fp32.json").unlink()
    res = _run(["eval", str(onnx_path), "--task", "RTE", "--data-dir", str(data), "-q"])
    assert res.exit_code == 2 and "--tokenizer" in res.output


def test_label_order_comes_from_config(tiny_rte, tmp_path):
    """Swapping id2label flips every binary prediction, so accuracy becomes 1 − accuracy."""
    import shutil

    root, model = tiny_rte
    swapped = tmp_path / "swapped"
    shutil.copytree(model, swapped)
    set_labels(swapped, {"0": "not_entailment", "1": "entailment"})
    accs = []
    for m in (model, swapped):
        out = tmp_path / f"{m.name}.json"
        res = _run(["eval", str(m), "--task", "RTE", "--data-dir", str(root / "glue"), "--json", str(out), "-q"])
        assert res.exit_code == 0, res.output
        accs.append(json.loads(out.read_text())["correct"])
    assert accs[0] + accs[1] == 24


def test_eval_cli_errors(tiny_rte, tmp_path):
    import shutil

    root, model = tiny_rte
    wrong = tmp_path / "sst2-labels"
    shutil.copytree(model, wrong)
    set_labels(wrong, {"0": "negative", "1": "positive"})
    res = _run(["eval", str(wrong), "--task", "RTE", "--data-dir", str(root / "glue"), "-q"])
    assert res.exit_code == 1
    assert "do not match RTE" in res.output and "Traceback" not in res.output
    res = _run(["eval", str(model), "--task", "MRPC", "--data-dir", str(root / "glue"), "-q"])
    assert res.exit_code == 2 and "MRPC/dev.tsv" in res.output
    res = _run(["eval", str(tmp_path / "nope.onnx"), "--task", "RTE", "--data-dir", str(root / "glue")])
    assert res.exit_code == 2 and "does not exist" in res.output
