"""GLUE tasks: where their text and labels are, their official metrics, and label alignment.

The TSVs are read by :func:`edgeq.model.texts._read_tsv` (quoting disabled, BOM stripped).  Each task
names its labels (``TaskSpec.labels``, in the order the TSV's gold values are listed in
``gold``); the model's own ``id2label`` decides which logit column is which label, so a model
whose labels differ from the task's is refused instead of silently mis-scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError, UsageError
from edgeq.model.texts import GLUE_DIR_ENV, _read_tsv, default_glue_dir


@dataclass(frozen=True)
class TaskSpec:
    name: str  # canonical GLUE name, also the data directory name
    text: tuple[str | int, str | int | None]  # header names (or column indices when no header)
    label: str | int  # gold column
    gold: dict[str, str] | None  # TSV gold value → label name (None: regression)
    metrics: tuple[str, ...]  # the official metrics; the first is the headline
    header: bool = True

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.gold.values())) if self.gold else ()

    @property
    def is_regression(self) -> bool:
        return self.gold is None


_NLI = {"entailment": "entailment", "not_entailment": "not_entailment"}
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("CoLA", (3, None), 1, {"0": "unacceptable", "1": "acceptable"}, ("matthews", "accuracy"),
                 header=False),
        TaskSpec("SST-2", ("sentence", None), "label", {"0": "negative", "1": "positive"}, ("accuracy",)),
        TaskSpec("MRPC", ("#1 String", "#2 String"), "Quality", {"0": "not_equivalent", "1": "equivalent"},
                 ("accuracy", "f1")),
        TaskSpec("STS-B", ("sentence1", "sentence2"), "score", None, ("pearson", "spearman")),
        TaskSpec("QNLI", ("question", "sentence"), "label", _NLI, ("accuracy",)),
        TaskSpec("RTE", ("sentence1", "sentence2"), "label", _NLI, ("accuracy",)),
        TaskSpec("WNLI", ("sentence1", "sentence2"), "label", {"0": "not_entailment", "1": "entailment"},
                 ("accuracy",)),
    )
}
# label names other tools use for the same classes
ALIASES = {
    "pos": "positive", "neg": "negative",
    "paraphrase": "equivalent", "not_paraphrase": "not_equivalent",
    "grammatical": "acceptable", "ungrammatical": "unacceptable",
    "entailed": "entailment", "not_entailed": "not_entailment",
}


def get_task(name: str) -> TaskSpec:
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    for spec in TASKS.values():
        if re.sub(r"[^a-z0-9]", "", spec.name.lower()) == key:
            return spec
    raise UsageError(f"unknown GLUE task {name!r}; choose from {', '.join(TASKS)}")


def dev_file(task: TaskSpec, data_dir: Path | None) -> Path:
    data_dir = data_dir if data_dir is not None else default_glue_dir()
    if data_dir is None:
        raise UsageError("no GLUE data directory; pass --data-dir DIR (holding RTE/dev.tsv, ...) "
                         f"or set {GLUE_DIR_ENV}")
    path = Path(data_dir) / task.name / "dev.tsv"
    if not path.is_file():
        raise UsageError(f"{path} does not exist; pass --data-dir DIR holding {task.name}/dev.tsv")
    return path


@dataclass(frozen=True)
class Examples:
    texts: list[tuple[str, str | None]]
    gold: np.ndarray  # label names (object array) or float scores (regression)
    source: str


def read_examples(task: TaskSpec, path: Path, limit: int | None = None) -> Examples:
    """Text pairs and gold labels of a GLUE TSV (rows too short to hold them are an error)."""
    head, rows = _read_tsv(Path(path), header=task.header)

    def col(c):
        if c is None or isinstance(c, int):
            return c
        if c not in head:
            raise EdgeqError(f"{path}: no column {c!r} (header: {', '.join(head[:6])}); is this {task.name}'s TSV?")
        return head.index(c)

    a, b, g = col(task.text[0]), col(task.text[1]), col(task.label)
    need = max(a, g, b if b is not None else 0)
    texts, gold = [], []
    for line, r in enumerate(rows, start=2 if task.header else 1):
        if not r:
            continue
        if len(r) <= need:
            raise EdgeqError(f"{path}:{line} has {len(r)} columns, {task.name} needs {need + 1}; is the file intact?")
        value = r[g].strip()
        if task.gold is None:
            try:
                gold.append(float(value))
            except ValueError:
                raise EdgeqError(f"{path}:{line}: score {value!r} is not a number") from None
        else:
            if value not in task.gold:
                raise EdgeqError(f"{path}:{line}: label {value!r} is not one of {task.name}'s ({', '.join(task.gold)})")
            gold.append(task.gold[value])
        texts.append((r[a], r[b] if b is not None else None))
        if limit is not None and len(texts) >= limit:
            break
    if not texts:
        raise EdgeqError(f"{path} has no examples")
    dtype = np.float64 if task.gold is None else object
    return Examples(texts, np.array(gold, dtype=dtype), str(path))


def _norm(label: str) -> str:
    s = re.sub(r"[\s\-]+", "_", str(label).strip().lower())
    return ALIASES.get(s, s)


def label_ids(task: TaskSpec, id2label: dict[int, str] | None, num_outputs: int) -> dict[str, int]:
    """Task label name → the model's output index, from the model's ``id2label``; raises on mismatch."""
    if task.is_regression:
        if num_outputs != 1:
            raise EdgeqError(f"{task.name} is a regression task but the model has {num_outputs} outputs; "
                             "evaluate a model fine-tuned on it (num_labels=1)")
        return {}
    if not id2label or len(id2label) != num_outputs:
        raise EdgeqError(f"the model's config.json id2label ({id2label}) does not describe its {num_outputs} outputs; "
                         "fix id2label in config.json")
    model = {_norm(v): int(k) for k, v in id2label.items()}
    task_labels = {_norm(x): x for x in task.labels}
    if set(model) != set(task_labels):
        raise EdgeqError(
            f"the model's labels ({', '.join(str(id2label[i]) for i in sorted(id2label))}) do not match "
            f"{task.name}'s ({', '.join(task.labels)}); evaluate the task the model was trained on, "
            "or name its labels in config.json's id2label"
        )
    return {task_labels[n]: i for n, i in model.items()}
