"""GLUE dev-set evaluation of an ONNX file (ONNX Runtime, CPU) or a PyTorch model directory.

Examples are tokenised once with the model's own tokenizer (truncated to ``max_length``),
sorted by length and cut into batches padded to their longest member, so little compute goes
to padding; results are put back in file order.  The logit column of each class comes from
the model's ``id2label`` (:func:`edgeq.evaluation.tasks.label_ids`).  Prediction = argmax of the logits
(regression: the single output).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError, UsageError
from edgeq.evaluation import metrics
from edgeq.evaluation.embedding import is_sts, onnx_embedder, score_sts, sentences, torch_embedder
from edgeq.evaluation.tasks import Examples, TaskSpec, label_ids
from edgeq.model.texts import BATCH_SIZE, MAX_LENGTH, encode_indexed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


@dataclass
class EvalResult:
    task: str
    model: str
    engine: str  # "onnxruntime" or "pytorch"
    examples: int
    metrics: dict[str, float]
    correct: int | None  # classification only
    predictions: list  # label names (classification) or scores (regression), in file order
    source: str
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{self.task} dev: {self.examples} examples ({self.engine}, {self.model})"]
        for name, value in self.metrics.items():
            extra = ""
            if name == "accuracy" and self.correct is not None:
                se = metrics.binomial_se(value, self.examples)
                extra = f"   ({self.correct}/{self.examples}, ± {100 * se:.2f} s.e.)"
            lines.append(f"  {name:<10} {100 * value:7.2f}{extra}")
        return "\n".join(lines)


# ------------------------------------------------------------------ tokenisation and batching


def encode_sorted(tokenizer, texts: Sequence[tuple[str, str | None]], input_names: Sequence[str],
                  max_length: int = MAX_LENGTH, batch_size: int = BATCH_SIZE) -> list[tuple[np.ndarray, dict]]:
    """[(example indices, feed dict)] with examples grouped by token length, padded per batch."""
    return encode_indexed(tokenizer, texts, input_names, batch_size, max_length, order="tokens")


def run_batches(predict: Callable[[dict], np.ndarray], batches, n: int, quiet: bool = True,
                desc: str = "eval") -> np.ndarray:
    """Logits ``[n, C]`` in file order."""
    from tqdm import tqdm

    out: np.ndarray | None = None
    with tqdm(total=n, desc=desc, unit="ex", disable=True if quiet else None, leave=False) as bar:
        for idx, feed in batches:
            logits = np.asarray(predict(feed), dtype=np.float64).reshape(len(idx), -1)
            if out is None:
                out = np.zeros((n, logits.shape[1]), dtype=np.float64)
            out[idx] = logits
            bar.update(len(idx))
    assert out is not None
    return out


# ------------------------------------------------------------------ scoring


def score(task: TaskSpec, ex: Examples, logits: np.ndarray,
          id2label: dict[int, str] | None) -> tuple[dict, int | None, list]:
    """(metrics, correct count or None, predictions in file order) of ``logits`` on ``ex``."""
    ids = label_ids(task, id2label, logits.shape[1])
    if task.is_regression:
        pred = logits[:, 0]
        fns = {"pearson": metrics.pearson, "spearman": metrics.spearman}
        return {m: fns[m](pred, ex.gold) for m in task.metrics}, None, [float(x) for x in pred]
    col_to_label = {i: name for name, i in ids.items()}
    pred_names = [col_to_label[int(c)] for c in logits.argmax(axis=1)]
    index = {name: i for i, name in enumerate(task.labels)}  # F1's positive class is task label 1
    p = np.array([index[x] for x in pred_names])
    y = np.array([index[x] for x in ex.gold])
    fns = {"accuracy": metrics.accuracy, "f1": metrics.f1_binary, "matthews": metrics.matthews}
    return {m: fns[m](p, y) for m in task.metrics}, int(np.sum(p == y)), pred_names


# ------------------------------------------------------------------ engines


def onnx_predictor(session) -> tuple[Callable[[dict], np.ndarray], tuple[str, ...]]:
    outputs = [o.name for o in session.get_outputs()]
    out = "logits" if "logits" in outputs else outputs[0]
    inputs = tuple(i.name for i in session.get_inputs())
    return (lambda feed: session.run([out], feed)[0]), inputs


def torch_predictor(model) -> Callable[[dict], np.ndarray]:
    import torch

    def predict(feed):
        with torch.no_grad():
            res = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=True)
        if "logits" not in res:
            raise EdgeqError("the model has no classification head (no logits); evaluate a fine-tuned task model")
        return res["logits"].float().numpy()

    return predict


def find_assets(onnx_path: Path, tokenizer_dir: Path | None) -> Path:
    """The directory holding the tokenizer and config.json that belong to ``onnx_path``.

    ``--tokenizer DIR``; else the ONNX file's own directory; else ``model_dir`` recorded in the
    edgeq report next to it (``<stem>.json`` or ``edgeq_report.json``).
    """
    def ok(d: Path) -> bool:
        return d.is_dir() and (d / "config.json").is_file() and any((d / f).is_file() for f in TOKENIZER_FILES)

    tokenizer_dir = _hf_dir(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer_dir is not None:
        if not ok(tokenizer_dir):
            raise UsageError(f"--tokenizer {tokenizer_dir} must be a directory with the tokenizer files "
                             "and config.json (the original model directory)")
        return tokenizer_dir
    if ok(onnx_path.parent):
        return onnx_path.parent
    for report in (onnx_path.with_suffix(".json"), onnx_path.parent / "edgeq_report.json"):
        if not report.is_file():
            continue
        try:
            recorded = json.loads(report.read_text(encoding="utf-8")).get("model_dir")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            recorded = None
        if recorded:
            for cand in (_hf_dir(Path(recorded)), _hf_dir(report.parent / recorded)):
                if ok(cand):
                    return cand
    raise UsageError(f"no tokenizer found for {onnx_path}; "
                     "pass --tokenizer MODEL_DIR (the model it was converted from)")


def _hf_dir(d: Path) -> Path:
    """A sentence-transformers folder's Transformer directory (``0_Transformer/``), else ``d``."""
    from edgeq.model.load import transformer_dir

    try:
        return transformer_dir(d) if (d / "modules.json").is_file() else d
    except EdgeqError:
        return d


def load_tokenizer(model_dir: Path):
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        return transformers.AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise EdgeqError(f"{model_dir} has no usable tokenizer "
                         f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__}); "
                         "save tokenizer.json next to the model") from None


def read_id2label(model_dir: Path) -> dict[int, str] | None:
    from edgeq.model.load import read_config

    cfg = read_config(model_dir)
    raw = cfg.get("id2label")
    return {int(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else None


def evaluate(task: TaskSpec, ex: Examples, predict: Callable[[dict], np.ndarray], batches,
             id2label: dict[int, str] | None, model_name: str, engine: str, quiet: bool = True) -> EvalResult:
    t0 = time.perf_counter()
    logits = run_batches(predict, batches, len(ex.texts), quiet, desc=f"{task.name} {engine}")
    values, correct, preds = score(task, ex, logits, id2label)
    return EvalResult(task.name, model_name, engine, len(ex.texts), values, correct, preds, ex.source,
                      round(time.perf_counter() - t0, 3))


def pooling_for(model: Path, task: TaskSpec) -> str:
    """STS-B on a bare Hugging Face encoder (no modules.json, no head): mean pooling; else none."""
    from edgeq.model.load import read_config

    if not is_sts(task) or (model / "modules.json").is_file():
        return "none"
    archs = read_config(model).get("architectures") or []
    return "none" if any(a.endswith("ForSequenceClassification") for a in archs) else "mean"


def _check_sts(task: TaskSpec, model: Path) -> None:
    if not is_sts(task):
        raise EdgeqError(f"{model} is a sentence-embedding model (no classification head); evaluate it on STS-B "
                         "(cosine similarity) or convert a fine-tuned task model")


def evaluate_embeddings(task: TaskSpec, ex: Examples, predict, tokenizer, input_names, max_length: int,
                        batch_size: int, model_name: str, engine: str, quiet: bool, how: str) -> EvalResult:
    """STS: each sentence embedded alone, cosine of the pair vs the gold score (edgeq.evaluation.embedding)."""
    t0 = time.perf_counter()
    batches = encode_sorted(tokenizer, sentences(ex), input_names, max_length, batch_size)
    result, _ = score_embeddings(task, ex, predict, batches, model_name, engine, quiet, how)
    result.seconds = round(time.perf_counter() - t0, 3)
    return result


def score_embeddings(task: TaskSpec, ex: Examples, predict, batches, model_name: str, engine: str, quiet: bool,
                     how: str) -> tuple[EvalResult, np.ndarray]:
    """(STS result, embeddings [2n, d] in the order of ``sentences(ex)``) on already tokenised sentence ``batches``."""
    t0 = time.perf_counter()
    emb = run_batches(predict, batches, 2 * len(ex.texts), quiet, desc=f"{task.name} {engine}")
    values, preds = score_sts(task, ex, emb)
    return EvalResult(task.name, model_name, engine, len(ex.texts), values, None, preds, ex.source,
                      round(time.perf_counter() - t0, 3), {"embedding": how}), emb


def evaluate_path(model: Path, task: TaskSpec, ex: Examples, threads: int = 1, tokenizer_dir: Path | None = None,
                  max_length: int = MAX_LENGTH, batch_size: int = BATCH_SIZE, quiet: bool = True,
                  allow_pickle: bool = False) -> EvalResult:
    """Evaluate an ``.onnx`` file (ONNX Runtime) or a Hugging Face directory (PyTorch FP32)."""
    if model.is_dir() and (model / "model.onnx").is_file() and not any(model.glob("*.safetensors")):
        model = model / "model.onnx"  # a folder written by edgeq convert (Hugging Face layout)
    if model.is_dir():
        import torch

        from edgeq.model.load import load_model

        if threads:
            torch.set_num_threads(threads)
        loaded = load_model(model, allow_pickle, pooling_for(model, task))
        tok = load_tokenizer(tokenizer_dir) if tokenizer_dir else loaded.tokenizer
        if loaded.sentence is not None:
            _check_sts(task, model)
            how = f"sentence_embedding ({loaded.sentence.source}: {'+'.join(loaded.sentence.pooling)} pooling)"
            return evaluate_embeddings(task, ex, torch_embedder(loaded.model), tok, loaded.input_names, max_length,
                                       batch_size, str(model), "pytorch", quiet, how)
        if loaded.head != "sequence-classification":
            raise EdgeqError(f"{model} is a bare encoder (no classification head); evaluate a fine-tuned task model")
        label_ids(task, loaded.id2label, int(loaded.model.config.num_labels))  # refuse before running anything
        batches = encode_sorted(tok, ex.texts, loaded.input_names, max_length, batch_size)
        return evaluate(task, ex, torch_predictor(loaded.model), batches, loaded.id2label, str(model), "pytorch", quiet)
    if not model.is_file():
        raise UsageError(f"{model} does not exist; pass an .onnx file or a model directory")
    if model.suffix != ".onnx":
        raise UsageError(f"{model} is not an .onnx file; pass an .onnx file or a Hugging Face model directory")
    assets = find_assets(model, tokenizer_dir)
    from edgeq.onnx.session import make_session

    session = make_session(str(model), threads)
    predict, inputs = onnx_predictor(session)
    if "logits" not in {o.name for o in session.get_outputs()} and is_sts(task):
        embed, how = onnx_embedder(session)
        result = evaluate_embeddings(task, ex, embed, load_tokenizer(assets), inputs, max_length, batch_size,
                                     str(model), "onnxruntime", quiet, how)
        result.extra["tokenizer"] = str(assets)
        return result
    id2label = read_id2label(assets)
    outs = {o.name: o for o in session.get_outputs()}
    if "logits" not in outs:
        raise EdgeqError(f"{model} has no logits output (a bare encoder?); evaluate a converted task model")
    width = outs["logits"].shape[-1]
    if isinstance(width, int):
        label_ids(task, id2label, width)  # refuse before running anything
    batches = encode_sorted(load_tokenizer(assets), ex.texts, inputs, max_length, batch_size)
    result = evaluate(task, ex, predict, batches, id2label, str(model), "onnxruntime", quiet)
    result.extra["tokenizer"] = str(assets)
    return result
