"""Parity checks of an ONNX model against PyTorch, on real text.

(a) *plan parity*: ONNX Runtime vs a PyTorch model whose Linear weights are exactly the planned
    Ŵ (same codes, scales and FP32 entries): ``max|Δ| ≤ tol · max|y_ref|`` per output.  This proves
    the graph computes the plan.
(b) *fidelity*: ONNX Runtime vs the original FP32 model: max and mean |Δ|, mean cosine per
    example, and top-1 agreement for classification logits.

Outputs are compared per example: logits/pooler rows, and the non-padding tokens of
``last_hidden_state``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from edgeq.model.load import LoadedModel


def _collect(outputs: list[dict[str, np.ndarray]], batches) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for o, b in zip(outputs, batches):
        mask = b["attention_mask"].astype(bool)
        for name, v in o.items():
            out.setdefault(name, []).append(v[mask] if name == "last_hidden_state" else v.reshape(v.shape[0], -1))
    return {k: np.concatenate(v).astype(np.float64) for k, v in out.items()}


def run_torch(model, loaded: LoadedModel, batches) -> dict[str, np.ndarray]:
    import torch

    outs = []
    with torch.no_grad():
        for b in batches:
            res = model(**{k: torch.from_numpy(v) for k, v in b.items()}, return_dict=True)
            outs.append({n: res[n].float().numpy() for n in loaded.output_names})
    return _collect(outs, batches)


def run_onnx(session, batches) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    feed_names = {i.name for i in session.get_inputs()}
    outs = [dict(zip(names, session.run(None, {k: v for k, v in b.items() if k in feed_names}))) for b in batches]
    return _collect(outs, batches)


def reference_model(loaded: LoadedModel, weights: dict[str, np.ndarray]):
    """A copy of the PyTorch model whose Linears carry exactly ``weights`` (name → Ŵ).

    The copy's weight of each named module is ``weights[name]`` itself (``torch.from_numpy``, no copy;
    through deepcopy's memo, so a tied parameter stays tied): only the other parameters are copied.
    """
    import torch

    modules = dict(loaded.model.named_modules())
    memo = {id(modules[name].weight): torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(w, np.float32)),
                                                         requires_grad=False)
            for name, w in weights.items()}
    model = copy.deepcopy(loaded.model, memo)
    return model.eval()


@dataclass(frozen=True)
class Check:
    name: str  # e.g. "plan parity: logits max|Δ|/max|ref|"
    value: float
    limit: float | None
    higher_is_better: bool = False

    @property
    def ok(self) -> bool:
        if self.limit is None or not np.isfinite(self.value):
            return self.limit is None
        return self.value >= self.limit if self.higher_is_better else self.value <= self.limit


@dataclass
class ParityReport:
    examples: int
    source: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def table(self) -> str:
        lines = [f"{'check':<48} {'value':>12} {'limit':>12}  ok"]
        for c in self.checks:
            lim = "-" if c.limit is None else (f">= {c.limit:.4g}" if c.higher_is_better else f"<= {c.limit:.3g}")
            lines.append(f"{c.name:<48} {c.value:>12.6g} {lim:>12}  {'yes' if c.ok else 'NO'}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "examples": self.examples,
            "source": self.source,
            "ok": self.ok,
            "checks": [{"name": c.name, "value": c.value, "limit": c.limit, "ok": c.ok} for c in self.checks],
        }


def relative_max_diff(got: dict, ref: dict) -> dict[str, float]:
    return {k: float(np.max(np.abs(got[k] - ref[k])) / max(np.max(np.abs(ref[k])), 1e-12)) for k in ref}


def fidelity(got: dict, ref: dict) -> dict[str, float]:
    """Figures of ``got`` against the FP32 ``ref`` (first output: logits or last_hidden_state)."""
    name = next(iter(ref))
    g, r = got[name], ref[name]
    d = np.abs(g - r)
    cos = np.sum(g * r, axis=1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    out = {
        "output": name,
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "mean_cosine": float(cos.mean()),
        "top1_agreement": None,
    }
    if name == "logits" and r.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(g.argmax(1) == r.argmax(1)))
    return out
