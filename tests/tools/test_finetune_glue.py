"""tools/finetune_glue.py smoke test: 2 steps on a tiny encoder; the result loads and evaluates."""

from __future__ import annotations

import importlib.util
import json

from click.testing import CliRunner

from edgeq.cli import main
from tests.evaluation.test_evaluate import write_rte
from tests.helpers import REPO


def test_finetune_two_steps_then_eval(tmp_path, tiny_model):
    spec = importlib.util.spec_from_file_location("finetune_glue", REPO / "tools" / "finetune_glue.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    base = tiny_model("BertModel", seed=2)
    glue = tmp_path / "glue"
    write_rte(glue, n=12, seed=3)
    (glue / "RTE" / "dev.tsv").rename(glue / "RTE" / "train.tsv")
    write_rte(glue, n=10, seed=4)
    out = tmp_path / "rte-model"
    rc = tool.main(["--task", "RTE", "--base", str(base), "--data-dir", str(glue), "--out", str(out),
                    "--epochs", "1", "--batch-size", "4", "--max-steps", "2", "--train-limit", "8"])
    assert rc == 0
    record = json.loads((out / "training.json").read_text())
    assert record["steps"] == 2 and record["train_examples"] == 8 and record["stored_dtype"] == "float16"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert cfg["architectures"] == ["BertForSequenceClassification"]
    res = CliRunner().invoke(main, ["eval", str(out), "--task", "RTE", "--data-dir", str(glue), "-q"])
    assert res.exit_code == 0, res.output
    assert record["log"][0]["dev_accuracy"] is not None and "(" in res.output
    # the head was trained: the classifier differs from a fresh one with the same seed
    import torch
    import transformers

    trained = transformers.AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.float32)
    torch.manual_seed(0)
    fresh = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, dtype=torch.float32)
    assert not torch.allclose(trained.classifier.weight, fresh.classifier.weight.half().float())
