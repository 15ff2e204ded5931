"""Parity checks of an ONNX model against PyTorch, on real text.

(a) *plan parity*: ONNX Runtime vs a PyTorch model whose Linear weights are exactly the planned
    Ŵ (same codes, scales and FP32 entries): ``max|Δ| ≤ tol · max|y_ref|`` per output.  This proves
    the graph computes the plan.
    For ``--kernel integer`` files the reference also quantizes each Linear's input the way the
    kernel does (:func:`integer_reference`, :mod:`edgeq.quant.integer`): the file's column factors m
    (outlier mask, ``--smooth-alpha``), same weights, same uint8 activations, exact integer products.
    End to end that comparison is chaotic, not a tolerance:
    ONNX Runtime and PyTorch differ by ~1e-6 in the float ops between Linears (LayerNorm, softmax,
    GELU), an input within that of a rounding boundary lands on the other uint8 code, and the
    flips multiply layer by layer (measured on MiniLM-SST-2, one example: 0 flips in layer 0, 1 in
    layer 1, thousands by layer 4; logits 0.8–1.6% apart).  So the gated check is per Linear
    (:func:`integer_layer_parity`): each Linear's output in ONNX Runtime against the reference
    layer fed ONNX Runtime's own input — identical quantized inputs, exact integer sums, so only
    float rounding of the scale product, bias and correction remain (≤ 1e-6 relative); the
    end-to-end figure is reported without a limit.
(b) *fidelity*: ONNX Runtime vs the original FP32 model: max and mean |Δ|, mean cosine per
    example, and top-1 agreement for classification logits.

Outputs are compared per example: logits/pooler rows, and the non-padding tokens of
``last_hidden_state``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import EdgeqError
from edgeq.model.load import LoadedModel
from edgeq.onnx.export import TOKEN_OUTPUTS
from edgeq.onnx.integer import float_input, kernel_node

# embedding models: the worst sentence's cosine to FP32.  Measured on all-MiniLM-L6-v2, int4 k=256 (the
# default convert), STS-B dev's 3000 sentences: mean 0.959, min 0.847, while STS-B Spearman moves
# 0.8672 → 0.8641; 0.98 would refuse the default conversion (docs/embeddings.md)
DEFAULT_MIN_COSINE = 0.80


def _collect(outputs: list[dict[str, np.ndarray]], batches) -> dict[str, np.ndarray]:
    out: dict[str, list] = {}
    for o, b in zip(outputs, batches):
        mask = b["attention_mask"].astype(bool)
        for name, v in o.items():
            out.setdefault(name, []).append(v[mask] if name in TOKEN_OUTPUTS else v.reshape(v.shape[0], -1))
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


def carry_planned(loaded: LoadedModel, planned) -> None:
    """Give ``loaded.model`` the planned weights, in place: each module named in ``planned`` gets Ŵ (no copy).

    What convert does once the rewrite is checked: from then on it needs the FP32 model only through
    its cached outputs, so its FP32 Linear weights (and Ê's FP32 tables) are released, one as each Ŵ
    is decoded (``planned`` may be lazy: :class:`edgeq.pipeline.core.PlannedWeights`; results/memory.md).
    A tied parameter is replaced everywhere it appears, as in :func:`reference_model`, which gives
    the same model afterwards.
    """
    import torch

    modules = dict(loaded.model.named_modules())
    owners: dict[int, list] = {}
    for module in loaded.model.modules():
        for key, p in module._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((module, key))
    for name in planned:
        new = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(planned[name], np.float32)),
                                 requires_grad=False)
        for module, key in owners.pop(id(modules[name].weight), []):
            module._parameters[key] = new


def integer_reference(model, layers):
    """``model`` (a reference copy) with the Linears of ``layers`` (name → :class:`edgeq.onnx.integer.IntegerLayer`)
    computing :func:`edgeq.quant.integer.integer_linear`: dynamic uint8 x, int8 q, exact FP32 entries."""
    import torch

    from edgeq.quant.integer import integer_linear

    modules = dict(model.named_modules())
    for name, lay in layers.items():
        mod = modules[name]
        q, scales = torch.from_numpy(lay.q.astype(np.float64)), torch.from_numpy(lay.scales)
        exact = torch.from_numpy(lay.exact)
        factors = None if lay.factors is None else torch.from_numpy(lay.factors)

        def forward(x, mod=mod, q=q, scales=scales, exact=exact, factors=factors):
            return integer_linear(x, q, scales, mod.bias, exact, factors)

        mod.forward = forward
    return model


def _layer_values(model, layer: str) -> tuple[str, str]:
    """(input x, output y) value names of an integer-kernel Linear: the float input its kernel quantizes
    (before the ActMask Mul and a group's shared DynamicQuantizeLinear) and the output of the layer's last
    node (bias Add or correction)."""
    own = [n for n in model.graph.node if n.name.startswith(f"/{layer}/")]
    producers = {o: n for n in model.graph.node for o in n.output}
    return float_input(kernel_node({n.name: n for n in own}, layer), producers)[0], own[-1].output[0]


def integer_layer_parity(model, loaded: LoadedModel, layers, batches, threads: int = 0) -> dict[str, float]:
    """Per integer-kernel Linear: max|y_ORT − integer_linear(x_ORT)| / max|…| over ``batches`` (see the
    module docstring); ``model`` is the ONNX ModelProto, ``layers`` its :func:`edgeq.onnx.integer.integer_layers`."""
    import onnx
    import torch

    from edgeq.onnx.session import session_of_model
    from edgeq.quant.integer import integer_linear

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    values = {name: _layer_values(probe, name) for name in layers}
    known = {o.name for o in probe.graph.output}
    for v in sorted({v for pair in values.values() for v in pair} - known):
        probe.graph.output.append(onnx.helper.make_tensor_value_info(v, onnx.TensorProto.FLOAT, None))
    session = session_of_model(probe, threads)
    names = [o.name for o in session.get_outputs()]
    feed_names = {i.name for i in session.get_inputs()}
    modules = dict(loaded.model.named_modules())
    diff = dict.fromkeys(layers, 0.0)
    peak = dict.fromkeys(layers, 0.0)
    with torch.no_grad():
        for b in batches:
            out = dict(zip(names, session.run(None, {k: v for k, v in b.items() if k in feed_names})))
            for name, lay in layers.items():
                x, y = values[name]
                bias = modules[name].bias
                ref = integer_linear(torch.from_numpy(out[x]), torch.from_numpy(lay.q.astype(np.float64)),
                                     torch.from_numpy(lay.scales), None if bias is None else bias.detach().float(),
                                     torch.from_numpy(lay.exact),
                                     None if lay.factors is None else torch.from_numpy(lay.factors)).numpy()
                diff[name] = max(diff[name], float(np.max(np.abs(out[y] - ref))))
                peak[name] = max(peak[name], float(np.max(np.abs(ref))))
    return {name: diff[name] / max(peak[name], 1e-12) for name in layers}


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
    """Figures of ``got`` against the FP32 ``ref`` (first output: logits, sentence_embedding or last_hidden_state).

    Cosines are per row (example, or token of last_hidden_state); a regression head (one logit)
    gets Pearson and Spearman correlation with the FP32 scores instead, its cosine being a sign.
    """
    name = next(iter(ref))
    g, r = got[name], ref[name]
    d = np.abs(g - r)
    cos = np.sum(g * r, axis=1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(r, axis=1), 1e-12)
    out = {
        "output": name,
        "max_abs_diff": float(d.max()),
        "mean_abs_diff": float(d.mean()),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "top1_agreement": None,
        "regression": None,
    }
    if name == "logits" and r.shape[1] == 1:
        from edgeq.evaluation.metrics import pearson, spearman

        out["regression"] = {"pearson": pearson(g[:, 0], r[:, 0]), "spearman": spearman(g[:, 0], r[:, 0])}
    if name == "logits" and r.shape[1] > 1:
        out["top1_agreement"] = float(np.mean(g.argmax(1) == r.argmax(1)))
    return out


def sts_spearman(emb: np.ndarray, gold: np.ndarray) -> float:
    """Spearman ρ of cos(e_2i, e_2i+1) against the gold scores (rows: sentence 1, sentence 2 of each pair)."""
    from edgeq.evaluation.metrics import spearman

    a, b = emb[0::2], emb[1::2]
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return spearman(cos, gold)


def embedding_checks(fid: dict, got: dict, fp32_out: dict, min_cosine: float | None, sts_gold) -> list[Check]:
    """The worst sentence's cosine (gated: ``min_cosine``, default :data:`DEFAULT_MIN_COSINE`) and, on
    STS-B pairs, the Spearman ρ of FP32 and of the file; nothing for models without ``sentence_embedding``."""
    out = fid["output"]
    if out != "sentence_embedding":
        if min_cosine is not None:
            raise EdgeqError("--min-cosine needs an embedding model (a sentence_embedding output); "
                             "use --min-agreement or --max-abs-diff")
        return []
    limit = DEFAULT_MIN_COSINE if min_cosine is None else min_cosine
    checks = [Check(f"vs fp32: {out} min cosine", fid["min_cosine"], limit, True)]
    if sts_gold is not None:
        for which, emb in (("fp32", fp32_out[out]), ("quantized", got[out])):
            checks.append(Check(f"STS-B spearman ({which})", sts_spearman(emb, sts_gold), None, True))
    return checks


def validation_inputs(loaded: LoadedModel, data: Path | None, limit: int | None):
    """(texts, source, STS-B gold or None): an embedding model embeds each sentence of a pair alone."""
    from edgeq.model.texts import validation_texts

    texts, source = validation_texts(data, limit)
    if loaded.sentence is None:
        return texts, source, None
    gold = None
    if data is not None and all(b is not None for _, b in texts):
        from edgeq.evaluation.tasks import TASKS, read_examples

        try:
            ex = read_examples(TASKS["STS-B"], Path(data), limit)
            gold = ex.gold if ex.texts == texts else None
        except EdgeqError:
            gold = None  # not an STS-B file: cosines only
    return [(s, None) for t in texts for s in t if s is not None], f"{source}, each sentence alone", gold
