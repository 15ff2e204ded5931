"""``edgeq eval``: GLUE dev metrics of an ONNX file (ONNX Runtime) or a PyTorch model directory."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--task", required=True, metavar="TASK",
              help="GLUE task: CoLA, SST-2, MRPC, STS-B, QNLI, RTE or WNLI.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=None,
              help="Directory holding <TASK>/dev.tsv (default: $EDGEQ_GLUE_DIR, else ../shared/data/glue).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use the first N dev examples only.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="Also write the result (metrics, counts, predictions) to this JSON file.")
@click.option("--threads", type=click.IntRange(min=0), default=1, show_default=True,
              help="ONNX Runtime / PyTorch intra-op threads (0: runtime default).")
@click.option("--tokenizer", "tokenizer_dir", type=click.Path(path_type=Path), default=None,
              help="Model directory with the tokenizer and config.json (default: next to the .onnx file, "
                   "or the model_dir recorded in its edgeq report).")
@click.option("--max-length", type=click.IntRange(min=8), default=128, show_default=True,
              help="Truncate each example to this many tokens.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--allow-pickle", is_flag=True, help="Allow loading pickle .bin checkpoints (runs their code!).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def eval_cmd(model, task, data_dir, limit, json_out, threads, tokenizer_dir, max_length, batch_size,
             allow_pickle, quiet):
    """Score MODEL on a GLUE dev set with the task's official metrics.

    MODEL is an .onnx file (run on ONNX Runtime's CPU provider) or a Hugging Face
    model directory (the original FP32 model in PyTorch). Labels are matched through
    the model's config.json id2label.

    \b
    Examples:
      edgeq eval out.onnx --task RTE --tokenizer ../shared/models/minilm-l6-rte
      edgeq eval ../shared/models/minilm-l6-rte --task RTE --json fp32.json
    """
    from edgeq.evaluation.evaluate import evaluate_path
    from edgeq.evaluation.tasks import dev_file, get_task, read_examples

    spec = get_task(task)
    ex = read_examples(spec, dev_file(spec, data_dir), limit)
    result = evaluate_path(model, spec, ex, threads, tokenizer_dir, max_length, batch_size, quiet, allow_pickle)
    result.extra.update({"threads": threads, "max_length": max_length, "batch_size": batch_size})
    click.echo(result.table())
    if json_out is not None:
        json_out.write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
