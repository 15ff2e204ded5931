"""Real text for validation: a GLUE TSV (quoting disabled) or built-in sample sentences; tokenising it into batches."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError

GLUE_DIR_ENV = "EDGEQ_GLUE_DIR"

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


def default_glue_dir() -> Path | None:
    """The GLUE data directory: ``$EDGEQ_GLUE_DIR``, else ``../shared/data/glue`` (from the current
    directory) if present."""
    env = os.environ.get(GLUE_DIR_ENV)
    if env:
        return Path(env)
    p = Path("..") / "shared" / "data" / "glue"
    return p if p.is_dir() else None


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
ORDERS = ("given", "chars", "tokens")


def encode_indexed(tokenizer, texts, input_names=None, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                   order: str = "given") -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """Tokenise (sentence or pair) ``texts`` into int64 batches: [(indices into ``texts``, feed dict)].

    The one tokenising and batching path of edgeq (validation, calibration, evaluation).  Examples
    are truncated to ``max_length`` tokens and each batch is padded (by the tokenizer) to its
    longest member.  ``order`` decides which examples share a batch: ``"given"`` keeps the order of
    ``texts``; ``"chars"`` (calibration) and ``"tokens"`` (evaluation) sort by character or token
    length (stable), so little compute goes to padding.  A batch in which any example has a second
    text is encoded as pairs ("" for the missing ones).  ``input_names`` None keeps every tokenizer
    output; ``token_type_ids``, when named but not produced, is zeros.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "tokens" and texts:
        ids = _tokenize(tokenizer, texts, max_length, padding=False)["input_ids"]
        idx = np.argsort([len(x) for x in ids], kind="stable")
    elif order == "chars":
        idx = np.argsort([len(t[0]) + len(t[1] or "") for t in texts], kind="stable")
    else:
        idx = np.arange(len(texts))
    batches = []
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        enc = _tokenize(tokenizer, [texts[i] for i in sel], max_length, padding=True)
        names = input_names or list(enc.keys())
        batch = {n: enc[n].astype(np.int64) for n in names if n in enc}
        if "token_type_ids" in names and "token_type_ids" not in batch:
            batch["token_type_ids"] = np.zeros_like(batch["input_ids"])
        batches.append((sel, batch))
    return batches


def _tokenize(tokenizer, texts, max_length: int, padding: bool):
    a = [t[0] for t in texts]
    b = [t[1] or "" for t in texts] if any(t[1] is not None for t in texts) else None
    return tokenizer(a, b, padding=padding, truncation=True, max_length=max_length,
                     return_tensors="np" if padding else None)


def encode_texts(tokenizer, texts, input_names=None, batch_size: int = BATCH_SIZE, max_length: int = MAX_LENGTH,
                 order: str = "given") -> list[dict[str, np.ndarray]]:
    """The feed dicts of :func:`encode_indexed` (without the example indices)."""
    return [b for _, b in encode_indexed(tokenizer, texts, input_names, batch_size, max_length, order)]


def encode_batches(loaded, texts, batch_size: int = BATCH_SIZE, order: str = "given") -> list[dict[str, np.ndarray]]:
    """:func:`encode_texts` with an ``edgeq.model.load.LoadedModel``'s tokenizer and input names."""
    return encode_texts(loaded.tokenizer, texts, loaded.input_names, batch_size, order=order)
