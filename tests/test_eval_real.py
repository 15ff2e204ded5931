"""Real model: FP32 ONNX (ONNX Runtime) and PyTorch give the same dev predictions on RTE, and the
count the model's own training.json recorded."""

from __future__ import annotations

import json

import pytest

from tests.conftest import shared_path

pytestmark = pytest.mark.real


def test_rte_fp32_onnx_equals_pytorch_and_training_json(tmp_path):
    import onnx

    from edgeq.evaluate import evaluate_path
    from edgeq.glue import get_task, read_examples
    from edgeq.hf_model import load_model
    from edgeq.onnx.export import export_fp32

    model_dir = shared_path("models", "minilm-l6-rte")
    dev = shared_path("data", "glue", "RTE", "dev.tsv")
    task = get_task("RTE")
    ex = read_examples(task, dev)
    assert len(ex.texts) == 277

    pt = evaluate_path(model_dir, task, ex, threads=1)
    path = tmp_path / "rte-fp32.onnx"
    onnx.save(export_fp32(load_model(model_dir)), str(path))
    ox = evaluate_path(path, task, ex, threads=1, tokenizer_dir=model_dir)

    assert ox.correct == pt.correct
    assert ox.predictions == pt.predictions
    recorded = json.loads((model_dir / "training.json").read_text())["dev_accuracy_after_fp16_storage"]
    assert pt.correct == round(recorded * len(ex.texts))
