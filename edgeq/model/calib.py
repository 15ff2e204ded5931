"""Calibration statistics of every Linear input, collected in one streamed forward pass.

For a Linear with input ``x`` (``[B, T, n]`` token states, or ``[B, n]`` for the pooler and the
classifier, which see one vector per example), let ``X ∈ R^{N×n}`` be the stack of its
**non-padding** input rows over the calibration set (padding tokens are dropped with the
attention mask; ``[B, n]`` inputs keep all B rows).  Accumulated in float64, never storing X:

    count      = N
    abs_sum_j  = Σ_t |X_tj|            mean_abs = abs_sum / N        (AWQ's s_x, ALGORITHMS.md §3.1)
    abs_max_j  = max_t |X_tj|                                        (activation outliers, edgeq.quant.integer)
    xtx        = XᵀX  (n × n)          hessian  = (2/N) · XᵀX        (GPTQ/SpQR's H, §1 notation)

Linears fed by the same tensor (BERT's query/key/value) share one :class:`InputStats` object:
the statistics are computed once and every such Linear maps to it.

API (used by the AWQ/SpQR saliency scores, ``edgeq saliency`` and the GPTQ-family quantizers):

* :func:`load_calibration_texts` — N examples (seeded sample) of a GLUE task's **train** split,
  a GLUE TSV, or a plain text file (one example per line).
* :func:`collect_input_stats` — forward hooks on a torch model over tokenized batches
  (dicts of numpy arrays with ``attention_mask``, e.g. from ``edgeq.model.texts.encode_batches``);
  returns ``{linear name: InputStats}``.  Works on any ``nn.Module`` (FP32 or already quantized,
  so a sequential GPTQ can call it once per block on the partly quantized model).
* :func:`calibrate` — the two above for a :class:`edgeq.model.load.LoadedModel`, plus provenance.
* :func:`masked_rows`, :func:`accumulate` — the statistics math, exposed for reuse and tests.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.model.texts import GLUE_DIR_ENV, default_glue_dir, encode_batches, read_glue_texts

if TYPE_CHECKING:
    import torch

DEFAULT_SAMPLES = 128
CALIB_BATCH_SIZE = 16


# --------------------------------------------------------------------------- statistics math


@dataclass
class InputStats:
    """Streamed statistics of one Linear input (shared by every Linear reading that tensor)."""

    n_features: int
    count: int = 0  # non-padding rows N seen so far
    abs_sum: torch.Tensor | None = None  # float64 [n]: Σ_t |x_tj|
    xtx: torch.Tensor | None = None  # float64 [n, n]: XᵀX (None when collected without it)
    abs_max: torch.Tensor | None = None  # float64 [n]: max_t |x_tj|
    layers: list[str] = field(default_factory=list)  # Linears fed by this input

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean |x_j| over the non-padding rows (float64 [n]); zeros before any row was seen."""
        import torch

        if self.abs_sum is None:
            return torch.zeros(self.n_features, dtype=torch.float64)
        return self.abs_sum / max(self.count, 1)

    def hessian(self) -> torch.Tensor:
        """H = (2/N) XᵀX (float64 [n, n]), the GPTQ/SpQR proxy Hessian (no damping)."""
        if self.xtx is None:
            raise ValueError("these statistics were collected without XᵀX (xtx=False)")
        return self.xtx * (2.0 / max(self.count, 1))


def masked_rows(x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``x`` that are real tokens, as ``[N, n]``.

    ``x [B, T, n]`` with ``attention_mask [B, T]`` → the rows where the mask is non-zero;
    ``x [B, n]`` (one vector per example: pooler, classifier) → all B rows.
    """
    if x.dim() == 2:
        return x
    if x.dim() == 3:
        if attention_mask is None:
            return x.reshape(-1, x.shape[-1])
        if tuple(attention_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"Linear input of shape {tuple(x.shape)} does not match "
                f"the attention mask {tuple(attention_mask.shape)}"
            )
        return x[attention_mask.bool()]
    raise ValueError(f"unsupported Linear input rank {x.dim()} (shape {tuple(x.shape)})")


def accumulate(stats: InputStats, rows: torch.Tensor, xtx: bool = True) -> None:
    """Add the rows ``[N, n]`` to ``stats`` (in float64)."""
    import torch

    r = rows.detach().to(torch.float64)
    if r.shape[-1] != stats.n_features:
        raise ValueError(f"expected {stats.n_features} input features, got {r.shape[-1]}")
    a = r.abs().sum(0)
    stats.abs_sum = a if stats.abs_sum is None else stats.abs_sum + a
    if r.shape[0]:
        m = r.abs().amax(0)
        stats.abs_max = m if stats.abs_max is None else torch.maximum(stats.abs_max, m)
    if xtx:
        g = r.T @ r
        stats.xtx = g if stats.xtx is None else stats.xtx + g
    stats.count += int(r.shape[0])


# --------------------------------------------------------------------------- hook collection


def collect_input_stats(
    model: torch.nn.Module,
    batches: Iterable[Mapping[str, np.ndarray]],
    names: Sequence[str] | None = None,
    xtx: bool = True,
    progress: bool = False,
    total: int | None = None,
) -> dict[str, InputStats]:
    """One forward pass over ``batches``; statistics of the input of every Linear in ``names``.

    ``names`` defaults to every ``nn.Linear`` of ``model``.  ``batches`` are model keyword inputs
    as numpy arrays and must hold ``attention_mask``.  A Linear called with the very tensor the
    previous hooked Linear received (q/k/v) reuses that Linear's statistics object; this sharing
    must be the same in every batch.  A progress bar goes to stderr when ``progress``.  The model
    runs in eval mode (dropout off) and its previous train/eval mode is restored afterwards.
    """
    import torch

    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, torch.nn.Linear)] if names is None else list(names)
    missing = [n for n in names if not isinstance(modules.get(n), torch.nn.Linear)]
    if missing:
        raise ValueError(f"no Linear named {missing[0]} in the model")
    stats: dict[str, InputStats] = {}
    state: dict = {"mask": None, "last": None, "last_name": None, "first": True}

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if x is state["last"] and state["last_name"] != name:  # q/k/v: share the previous Linear's stats
                rep = stats[state["last_name"]]
                if state["first"] and name not in stats:
                    stats[name] = rep
                    rep.layers.append(name)
                elif stats.get(name) is not rep:
                    raise RuntimeError(f"input sharing of {name} changed between batches")
                return
            if name in stats and stats[name].layers[0] != name:
                raise RuntimeError(f"input sharing of {name} changed between batches")
            if name not in stats:
                stats[name] = InputStats(n_features=int(x.shape[-1]), layers=[name])
            accumulate(stats[name], masked_rows(x, state["mask"]), xtx)
            state["last"], state["last_name"] = x, name

        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in names]
    bar = None
    was_training = model.training
    model.eval()
    try:
        batches = list(batches) if total is None and progress else batches
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total if total is not None else len(batches), desc="calibration", unit="batch",
                       file=sys.stderr, leave=False)
        with torch.no_grad():
            for b in batches:
                if "attention_mask" not in b:
                    raise ValueError("calibration batches need an attention_mask")
                feed = {k: torch.from_numpy(np.asarray(v)) for k, v in b.items()}
                state["mask"] = feed["attention_mask"]
                model(**feed)
                state["last"] = state["last_name"] = None  # never share across batches
                state["first"] = False
                if bar is not None:
                    bar.update(1)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        if bar is not None:
            bar.close()
    never = [n for n in names if n not in stats]
    if never:
        raise RuntimeError(f"Linear {never[0]} was never called during calibration")
    return stats


# --------------------------------------------------------------------------- calibration text


@dataclass(frozen=True)
class CalibTexts:
    texts: list  # [(text_a, text_b or None)]
    source: str  # resolved file the examples came from
    available: int  # examples in the source before sampling
    seed: int


def _norm(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def resolve_calib_source(spec: str, data_dir: str | Path | None = None) -> Path:
    """A file path as given, or a GLUE task name (case/punctuation-insensitive: rte, sst2) → its train.tsv."""
    p = Path(spec)
    if p.is_file():
        return p
    if p.is_dir():
        if (p / "train.tsv").is_file():
            return p / "train.tsv"
        raise EdgeqError(f"--calib {spec} is a directory without train.tsv; pass a GLUE task directory or a file")
    glue = Path(data_dir) if data_dir else default_glue_dir()
    if glue is None:
        raise EdgeqError(
            f"--calib {spec} is not a file and no GLUE directory is known; "
            f"pass --data-dir DIR (or set {GLUE_DIR_ENV}) or a text/TSV file"
        )
    if not glue.is_dir():
        raise EdgeqError(f"GLUE directory {glue} does not exist; pass --data-dir DIR (or set {GLUE_DIR_ENV})")
    tasks = sorted(d.name for d in glue.iterdir() if d.is_dir())
    match = [t for t in tasks if _norm(t) == _norm(spec)]
    if not match:
        raise EdgeqError(
            f"--calib {spec}: no such file and no GLUE task of that name in {glue} "
            f"(tasks: {', '.join(tasks) or 'none'})"
        )
    train = glue / match[0] / "train.tsv"
    if not train.is_file():
        raise EdgeqError(f"{train} does not exist; the GLUE task {match[0]} needs a train.tsv for calibration")
    return train


def read_calib_file(path: Path) -> list:
    """Examples of a GLUE TSV (its text columns), a 1–2 column TSV, or a text file (one per line)."""
    if path.suffix.lower() == ".tsv":
        try:
            return read_glue_texts(path)
        except EdgeqError:
            pass
        rows = [line.rstrip("\r\n").split("\t") for line in _read_lines(path)]
        rows = [r for r in rows if any(c.strip() for c in r)]
        if rows and all(1 <= len(r) <= 2 for r in rows):
            return [(r[0], r[1] if len(r) == 2 else None) for r in rows]
        raise EdgeqError(f"{path}: not a GLUE TSV and not a one- or two-column TSV of text")
    texts = [(line.strip(), None) for line in _read_lines(path) if line.strip()]
    if not texts:
        raise EdgeqError(f"calibration file {path} has no text")
    return texts


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise EdgeqError(f"calibration file {path} is not UTF-8 text") from None


def sample_texts(texts: Sequence, n: int, seed: int) -> list:
    """``n`` examples drawn without replacement with ``numpy.random.default_rng(seed)`` (all if fewer)."""
    if n >= len(texts):
        return list(texts)
    idx = np.random.default_rng(seed).choice(len(texts), size=n, replace=False)
    return [texts[i] for i in idx]


def load_calibration_texts(spec: str, samples: int = DEFAULT_SAMPLES, seed: int = 0,
                           data_dir: str | Path | None = None) -> CalibTexts:
    if samples < 1:
        raise EdgeqError(f"--calib-samples must be at least 1, got {samples}")
    path = resolve_calib_source(spec, data_dir)
    texts = read_calib_file(path)
    return CalibTexts(sample_texts(texts, samples, seed), str(path), len(texts), seed)


# --------------------------------------------------------------------------- convenience


@dataclass(frozen=True)
class Calibration:
    stats: dict[str, InputStats]  # Linear name → statistics of its input (shared objects for q/k/v)
    source: str
    samples: int  # examples used
    available: int  # examples in the source
    seed: int
    tokens: int  # non-padding tokens seen by the first Linear
    seconds: float

    def info(self) -> dict:
        """Provenance for reports (JSON-ready)."""
        return {"source": self.source, "samples": self.samples, "available": self.available,
                "seed": self.seed, "tokens": self.tokens, "seconds": round(self.seconds, 3)}


def calibrate(loaded, spec: str, samples: int = DEFAULT_SAMPLES, seed: int = 0,
              data_dir: str | Path | None = None, names: Sequence[str] | None = None,
              xtx: bool = True, progress: bool = False, batch_size: int = CALIB_BATCH_SIZE) -> Calibration:
    """Sample calibration text for ``loaded`` (an ``edgeq.model.load.LoadedModel``) and collect statistics.

    Examples are tokenized like validation data (max length 128); they are sorted by character
    length before batching so that little compute is spent on padding (the statistics are sums, so the
    order does not matter).
    """
    t0 = time.perf_counter()
    ct = load_calibration_texts(spec, samples, seed, data_dir)
    batches = encode_batches(loaded, ct.texts, batch_size, order="chars")
    stats = collect_input_stats(loaded.model, batches, names, xtx=xtx, progress=progress, total=len(batches))
    tokens = max(s.count for s in stats.values()) if stats else 0
    return Calibration(stats, ct.source, len(ct.texts), ct.available, seed, tokens, time.perf_counter() - t0)
