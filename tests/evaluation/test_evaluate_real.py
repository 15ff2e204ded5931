"""Real model: FP32 ONNX (ONNX Runtime) and PyTorch give the same dev predictions on RTE, and the
count the model's own training.json recorded."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.real


def test_rte_fp32_onnx_equals_pytorch_and_training_json(shared_path, tmp_path):
    import onnx

    from edgeq.evaluation.evaluate import evaluate_path
    from edgeq.evaluation.tasks import get_task, read_examples
    from edgeq.model.load import load_model
    from edgeq.onnx.export import export_fp32

    model_dir = shared_path("models", "minilm-l6-rte")
    dev = shared_path("data", "glue", "RTE", "dev.tsv")
    task = get_task("RTE")
    ex = read_examples(task, dev)
    assert len(ex.texts) == 277

    path = tmp_path / "rte-fp32.onnx"
    onnx.save(export_fp32(load_model(model_dir)), str(path))
    # one thread each, side by side on the 2 cores (PyTorch and ONNX Runtime release the GIL)
    with ThreadPoolExecutor(1) as pool:
        pytorch = pool.submit(evaluate_path, model_dir, task, ex, threads=1)
        ox = evaluate_path(path, task, ex, threads=1, tokenizer_dir=model_dir)
        pt = pytorch.result()

    assert ox.correct == pt.correct
    assert ox.predictions == pt.predictions
    recorded = json.loads((model_dir / "training.json").read_text())["dev_accuracy_after_fp16_storage"]
    assert pt.correct == round(recorded * len(ex.texts))


@pytest.mark.parametrize("task,rows", [("CoLA", 1043), ("SST-2", 872), ("MRPC", 408), ("STS-B", 1500),
                                       ("QNLI", 5463), ("RTE", 277), ("WNLI", 71)])
def test_every_glue_dev_file_reads_in_full(shared_path, task, rows):
    """GLUE's official dev sizes: a quote-handling or header mistake loses or merges rows."""
    from edgeq.evaluation.tasks import get_task, read_examples

    spec = get_task(task)
    ex = read_examples(spec, shared_path("data", "glue", spec.name, "dev.tsv"))
    assert len(ex.texts) == rows
    if spec.is_regression:
        assert 0.0 <= ex.gold.min() and ex.gold.max() <= 5.0
    else:
        assert set(ex.gold) == set(spec.labels)
    assert all(t[0] for t in ex.texts)
