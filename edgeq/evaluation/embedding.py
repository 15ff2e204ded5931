"""STS-B for sentence-embedding models: the cosine of the two sentences' embeddings vs the gold score.

Each sentence is embedded alone (not as a pair); for pair i with embeddings a_i, b_i::

    s_i = a_i·b_i / max(‖a_i‖ ‖b_i‖, 1e-12)
    Spearman ρ(s, gold), Pearson r(s, gold)      (MTEB's STS metrics; the table prints them ×100)

The embedding is the model's ``sentence_embedding`` (a sentence-transformers folder or an edgeq
file converted from one, or with ``--pooling``); an ONNX file without it is scored on the mean of
``last_hidden_state`` over the attention mask, a bare PyTorch encoder with mean pooling.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from edgeq.evaluation import metrics
from edgeq.evaluation.tasks import Examples, TaskSpec


def is_sts(task: TaskSpec) -> bool:
    """A task scored on the similarity of a sentence pair (a regression task with two texts)."""
    return task.is_regression and task.text[1] is not None


def sentences(ex: Examples) -> list[tuple[str, None]]:
    """The sentences to embed, in order a_0, b_0, a_1, b_1, …"""
    return [(s, None) for a, b in ex.texts for s in (a, b or "")]


def cosine_scores(emb: np.ndarray) -> np.ndarray:
    a, b = emb[0::2], emb[1::2]
    return np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)


def score_sts(task: TaskSpec, ex: Examples, emb: np.ndarray) -> tuple[dict, list]:
    """(metrics, predicted similarities in file order) of the sentence embeddings ``emb`` [2n, d]."""
    s = cosine_scores(emb)
    fns = {"pearson": metrics.pearson, "spearman": metrics.spearman}
    return {m: fns[m](s, ex.gold) for m in task.metrics}, [float(x) for x in s]


def onnx_embedder(session) -> tuple[Callable[[dict], np.ndarray], str]:
    """(predict: feed → embeddings, which output it uses)."""
    outputs = [o.name for o in session.get_outputs()]
    if "sentence_embedding" in outputs:
        return (lambda feed: session.run(["sentence_embedding"], feed)[0]), "sentence_embedding"
    return (lambda feed: mean_pool(session.run(["last_hidden_state"], feed)[0], feed["attention_mask"])), \
        "mean of last_hidden_state"


def mean_pool(h: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(h.dtype)
    return (h * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)


def torch_embedder(model) -> Callable[[dict], np.ndarray]:
    import torch

    def predict(feed):
        with torch.no_grad():
            res = model(**{k: torch.from_numpy(v) for k, v in feed.items()}, return_dict=True)
        return res["sentence_embedding"].float().numpy()

    return predict
