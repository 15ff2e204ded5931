"""Real text for validation: a GLUE TSV (quoting disabled) or built-in sample sentences."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

# column(s) holding the text of each GLUE task's TSV (header names; CoLA has no header)
GLUE_TEXT_COLUMNS = {
    "RTE": ("sentence1", "sentence2"),
    "MRPC": ("#1 String", "#2 String"),
    "SST-2": ("sentence", None),
    "STS-B": ("sentence1", "sentence2"),
    "QNLI": ("question", "sentence"),
    "WNLI": ("sentence1", "sentence2"),
    "MNLI": ("sentence1", "sentence2"),
    "QQP": ("question1", "question2"),
}

SAMPLE_TEXT: list[tuple[str, str | None]] = [
    ("The quick brown fox jumps over the lazy dog.", None),
    ("I loved this film; the acting was superb and the story moved me.", None),
    ("The service was slow and the food arrived cold.", None),
    ("Quantization reduces the size of neural networks.", None),
    ("A man is playing a guitar on stage.", "Someone is performing music."),
    ("The company reported record profits this quarter.", "Profits fell sharply this quarter."),
    ("She bought three apples at the market.", "She purchased apples."),
    ("Paris is the capital of France.", "France's capital city is Paris."),
    ("It rained all day, so the match was cancelled.", None),
    ("An unremarkable, forgettable sequel that adds nothing new.", None),
    ("The committee approved the budget after a long debate.", "The budget was rejected."),
    ("Two dogs are running through a field of snow.", "Animals are playing outside."),
    ("Battery life is excellent and the screen is bright.", None),
    ("He didn't think the plan would work, but it did.", None),
    ("The museum opens at nine and closes at five.", "The museum is open for eight hours."),
    ("Scientists discovered a new species of frog in the rainforest.", "A new frog was found."),
]


def _read_tsv(path: Path, header: bool = True) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    except FileNotFoundError:
        raise EdgeqError(f"{path} does not exist; pass a GLUE TSV file") from None
    except UnicodeDecodeError:
        raise EdgeqError(f"{path} is not UTF-8 text; pass a GLUE TSV file") from None
    if not rows:
        raise EdgeqError(f"{path} is empty")
    return (rows[0], rows[1:]) if header else ([], rows)


def read_glue_texts(path: str | Path) -> list[tuple[str, str | None]]:
    """Text (single sentences or pairs) of a GLUE ``train.tsv``/``dev.tsv``."""
    path = Path(path)
    task = path.parent.name
    if task.upper() == "COLA":
        _, rows = _read_tsv(path, header=False)
        return [(r[3], None) for r in rows if len(r) >= 4]
    head, rows = _read_tsv(path)
    cols = GLUE_TEXT_COLUMNS.get(task) or next(
        (c for c in GLUE_TEXT_COLUMNS.values() if c[0] in head and (c[1] is None or c[1] in head)), None
    )
    if cols is None or cols[0] not in head or (cols[1] and cols[1] not in head):
        raise EdgeqError(
            f"{path}: cannot find the text columns (header: {', '.join(head[:6])}); "
            "pass a GLUE TSV (RTE, MRPC, SST-2, STS-B, QNLI, WNLI, CoLA)"
        )
    a = head.index(cols[0])
    b = head.index(cols[1]) if cols[1] else None
    out = []
    for r in rows:
        if len(r) <= max(a, b or 0):
            continue
        out.append((r[a], r[b] if b is not None else None))
    if not out:
        raise EdgeqError(f"{path} has no data rows")
    return out


def validation_texts(path: str | Path | None, limit: int | None = None) -> tuple[list, str]:
    """(texts, source description): the GLUE file when given, else the built-in sample."""
    texts = read_glue_texts(path) if path else list(SAMPLE_TEXT)
    source = str(path) if path else "built-in sample text"
    if limit is not None:
        texts = texts[:limit]
    return texts, source


BATCH_SIZE = 32
MAX_LENGTH = 128


def encode_texts(tokenizer, texts, input_names=None, batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
    """Tokenise (sentence or pair) ``texts`` into int64 batches; ``input_names`` None keeps every tokenizer output."""
    batches = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        a = [t[0] for t in chunk]
        b = [t[1] or "" for t in chunk] if any(t[1] is not None for t in chunk) else None
        enc = tokenizer(a, b, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="np")
        names = input_names or list(enc.keys())
        batch = {n: enc[n].astype(np.int64) for n in names if n in enc}
        if "token_type_ids" in names and "token_type_ids" not in batch:
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        batches.append(batch)
    return batches


def encode_batches(loaded, texts, batch_size: int = BATCH_SIZE) -> list[dict[str, np.ndarray]]:
    return encode_texts(loaded.tokenizer, texts, loaded.input_names, batch_size)
