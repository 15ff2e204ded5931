"""Sentence-embedding models: sentence-transformers folders read safely, and the pooling wrapper.

A sentence-transformers folder has ``modules.json`` listing its modules in order: a Transformer
(the Hugging Face encoder, at the root or in a sub-folder such as ``0_Transformer/``), a Pooling,
then optionally Dense and Normalize modules.  With token embeddings ``h_t`` (t = 1..T) and
attention mask ``m_t`` ∈ {0, 1}, the pooling modes are::

    mean                  e = Σ_t m_t h_t / max(Σ_t m_t, 1e-9)
    mean_sqrt_len_tokens  e = Σ_t m_t h_t / sqrt(max(Σ_t m_t, 1e-9))
    max                   e = max_{t: m_t = 1} h_t               (per dimension)
    cls                   e = h_1                                 (first token; edgeq pads on the right)
    weightedmean          e = Σ_t t m_t h_t / max(Σ_t t m_t, 1e-9)

several modes are concatenated in the order the config lists them (the legacy booleans in the
order cls, max, mean, mean_sqrt_len_tokens, weightedmean, as sentence-transformers reads them).
Dense: ``e ← act(W e + b)`` (an ``nn.Linear``, quantized like every other Linear); Normalize:
``e ← e / max(‖e‖₂, 1e-12)``.  The wrapper puts all of this in the exported graph: outputs
``sentence_embedding`` and ``token_embeddings`` (plus ``last_hidden_state``, the same tensor,
which Optimum and sentence-transformers' ONNX backend read).

Only these module types are accepted; no pickle (Dense weights in ``pytorch_model.bin`` need
``allow_pickle``) and no remote code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgeq.config import POOLING_CHOICES
from edgeq.errors import EdgeqError, UsageError

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean")  # sentence-transformers' order
_LEGACY_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
ACTIVATIONS = ("Tanh", "Identity", "ReLU", "Sigmoid", "GELU")  # torch.nn classes a Dense may name
MODULE_TYPES = ("Transformer", "Pooling", "Dense", "Normalize")
OUTPUTS = ("sentence_embedding", "token_embeddings", "last_hidden_state")


@dataclass(frozen=True)
class DenseSpec:
    path: Path
    in_features: int
    out_features: int
    bias: bool
    activation: str  # one of ACTIVATIONS


@dataclass(frozen=True)
class SentenceSpec:
    """What turns token embeddings into the sentence embedding."""

    transformer_dir: Path  # the Hugging Face encoder directory
    pooling: tuple[str, ...]  # modes, concatenated in this order
    steps: tuple[DenseSpec | str, ...] = ()  # after pooling, in order: DenseSpec or "normalize"
    source: str = "sentence-transformers"  # or "--pooling"
    folder: Path | None = None  # the sentence-transformers folder (None for --pooling)

    @property
    def normalize(self) -> bool:
        return "normalize" in self.steps

    def describe(self) -> dict:
        return {"source": self.source, "pooling": list(self.pooling),
                "steps": [s if isinstance(s, str) else f"dense {s.in_features}->{s.out_features} {s.activation}"
                          for s in self.steps]}


def _json(path: Path, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeqError(f"{path} is not valid JSON ({str(e)[:80]}); {fix}") from None
    except OSError as e:
        raise EdgeqError(f"cannot read {path} ({e.strerror}); {fix}") from None


def _inside(root: Path, name: object) -> Path | None:
    if not isinstance(name, str) or "\\" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    return root / name


def _module_kind(entry: dict, path: Path) -> str:
    kind = entry.get("type")
    short = kind.rsplit(".", 1)[-1] if isinstance(kind, str) else None
    if not (isinstance(kind, str) and kind.startswith("sentence_transformers.") and short in MODULE_TYPES):
        raise EdgeqError(f"{path}: unsupported module type {kind!r}; edgeq converts sentence-transformers "
                         f"models made of {', '.join(MODULE_TYPES)} modules only")
    return short


def read_pooling(path: Path) -> tuple[str, ...]:
    """Pooling modes of a ``1_Pooling/config.json`` (new ``pooling_mode`` key or the legacy booleans)."""
    fix = "re-save the model with sentence-transformers"
    cfg = _json(path, fix)
    if not isinstance(cfg, dict):
        raise EdgeqError(f"{path} must hold a JSON object; {fix}")
    if "pooling_mode" in cfg:
        raw = cfg["pooling_mode"]
        modes = (raw,) if isinstance(raw, str) else tuple(raw) if isinstance(raw, list) else None
    else:
        modes = tuple(m for k, m in _LEGACY_KEYS.items() if cfg.get(k) is True) or ("mean",)
    if not modes or not all(isinstance(m, str) for m in modes):
        raise EdgeqError(f"{path}: pooling_mode {cfg.get('pooling_mode')!r} is not a mode name or list; {fix}")
    bad = next((m for m in modes if m not in POOLING_MODES), None)
    if bad is not None:
        raise EdgeqError(f"{path}: pooling mode {bad!r} is not supported; edgeq supports "
                         f"{', '.join(POOLING_MODES)}")
    return modes


def _dense(path: Path) -> DenseSpec:
    fix = "re-save the model with sentence-transformers"
    cfg = _json(path / "config.json", fix)
    if not isinstance(cfg, dict):
        raise EdgeqError(f"{path / 'config.json'} must hold a JSON object; {fix}")
    try:
        n_in, n_out = int(cfg["in_features"]), int(cfg["out_features"])
    except (KeyError, TypeError, ValueError):
        raise EdgeqError(f"{path / 'config.json'} lacks in_features/out_features; {fix}") from None
    act = str(cfg.get("activation_function", "torch.nn.modules.activation.Tanh"))
    if not act.startswith("torch.nn.") or act.rsplit(".", 1)[-1] not in ACTIVATIONS:
        raise EdgeqError(f"{path / 'config.json'}: Dense activation {act!r} is not supported; "
                         f"edgeq supports torch.nn {', '.join(ACTIVATIONS)}")
    for key in ("module_input_name", "module_output_name"):
        if cfg.get(key, "sentence_embedding") not in ("sentence_embedding", None):
            raise EdgeqError(f"{path / 'config.json'}: Dense {key} {cfg[key]!r} is not supported; "
                             "edgeq supports Dense on sentence_embedding only")
    return DenseSpec(path, n_in, n_out, bool(cfg.get("bias", True)), act.rsplit(".", 1)[-1])


def read_sentence_dir(root: Path) -> SentenceSpec:
    """Read ``root/modules.json`` and the configs it names; refuse anything edgeq cannot export."""
    path = root / "modules.json"
    fix = "re-save the model with sentence-transformers"
    entries = _json(path, fix)
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise EdgeqError(f"{path} must hold a non-empty JSON list of modules; {fix}")
    kinds = [_module_kind(e, path) for e in entries]
    dirs = [_inside(root, e.get("path", "")) for e in entries]
    bad = next((e.get("path") for e, d in zip(entries, dirs) if d is None), None)
    if bad is not None:
        raise EdgeqError(f"{path}: module path {bad!r} leaves {root}; module paths must be sub-folder names")
    if kinds[0] != "Transformer" or kinds.count("Transformer") != 1 or kinds[1:2] != ["Pooling"] \
            or kinds.count("Pooling") != 1:
        raise EdgeqError(f"{path}: modules {' → '.join(kinds)} are not supported; edgeq needs Transformer, "
                         "Pooling, then Dense/Normalize modules")
    pool_cfg = dirs[1] / "config.json"
    if not pool_cfg.is_file():
        raise EdgeqError(f"{pool_cfg} is missing; the Pooling module needs its config.json")
    steps: list = []
    for kind, d in zip(kinds[2:], dirs[2:]):
        steps.append("normalize" if kind == "Normalize" else _dense(d))
    return SentenceSpec(dirs[0], read_pooling(pool_cfg), tuple(steps), "sentence-transformers", root)


def pooling_request(pooling: str, normalize: bool) -> SentenceSpec | None:
    """The spec of ``--pooling``/``--normalize`` on a plain encoder (None for ``--pooling none``)."""
    if pooling not in POOLING_CHOICES:
        raise UsageError(f"unknown --pooling {pooling!r}; choose from {', '.join(POOLING_CHOICES)}")
    if pooling == "none":
        if normalize:
            raise UsageError("--normalize needs --pooling (mean, cls or max): it normalises the sentence embedding")
        return None
    return SentenceSpec(Path(), (pooling,), ("normalize",) if normalize else (), "--pooling")


def load_dense(spec: DenseSpec, allow_pickle: bool):
    """The Dense's ``(weight [out, in], bias or None)`` as float32 tensors (safetensors; pickle only if allowed)."""
    import torch

    st, pt = spec.path / "model.safetensors", spec.path / "pytorch_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise EdgeqError(f"{st} is not a readable safetensors file ({str(e)[:80]}); re-save the model") from None
    elif pt.is_file():
        if not allow_pickle:
            raise EdgeqError(f"{pt} is a pickle checkpoint, which can execute code when loaded; convert it to "
                             "safetensors, or pass --allow-pickle if you trust its source")
        state = torch.load(str(pt), map_location="cpu", weights_only=True)
    else:
        raise EdgeqError(f"{spec.path} has no model.safetensors; the Dense module needs its weights")
    w, b = state.get("linear.weight"), state.get("linear.bias")
    if w is None or tuple(w.shape) != (spec.out_features, spec.in_features) or (spec.bias and b is None):
        raise EdgeqError(f"{spec.path}: Dense weights do not match its config ({spec.out_features}x"
                         f"{spec.in_features}, bias {spec.bias}); re-save the model")
    return w.to(torch.float32), (b.to(torch.float32) if spec.bias else None)


def wrap(base, spec: SentenceSpec, allow_pickle: bool):
    """The sentence-embedding ``nn.Module`` around the Hugging Face encoder ``base`` (eval mode).

    Its Linears are named like a task model's (``bert.encoder...``), the Dense ones ``dense.<i>.linear``.
    """
    import torch

    class DenseStep(torch.nn.Module):
        def __init__(self, d: DenseSpec):
            super().__init__()
            w, b = load_dense(d, allow_pickle)
            self.linear = torch.nn.Linear(d.in_features, d.out_features, bias=d.bias)
            with torch.no_grad():
                self.linear.weight.copy_(w)
                if b is not None:
                    self.linear.bias.copy_(b)
            self.activation = getattr(torch.nn, d.activation)()

        def forward(self, x):
            return self.activation(self.linear(x))

    class SentenceEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.prefix = base.base_model_prefix
            self.add_module(self.prefix, base)
            self.config = base.config
            self.dense = torch.nn.ModuleList([DenseStep(s) for s in spec.steps if isinstance(s, DenseSpec)])
            self.spec = spec

        def forward(self, input_ids, attention_mask=None, token_type_ids=None, return_dict=True):
            feed = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                feed["token_type_ids"] = token_type_ids
            h = getattr(self, self.prefix)(**feed, return_dict=True).last_hidden_state
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            e = pool(h, mask, spec.pooling)
            dense = iter(self.dense)
            for step in spec.steps:
                e = torch.nn.functional.normalize(e, p=2.0, dim=1) if step == "normalize" else next(dense)(e)
            return {"sentence_embedding": e, "token_embeddings": h, "last_hidden_state": h}

    if getattr(base, "pooler", None) is not None:
        base.pooler = None  # unused by the sentence embedding: not exported, not quantized
    return SentenceEncoder().eval()


def pool(h, mask, modes: tuple[str, ...]):
    """The pooled sentence embeddings ``[b, d·len(modes)]`` of token embeddings ``h [b, t, d]``."""
    import torch

    m = mask.unsqueeze(-1).to(h.dtype)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(h[:, 0])
        elif mode == "max":
            out.append(h.masked_fill(m == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            n = torch.clamp(m.sum(dim=1), min=1e-9)
            out.append((h * m).sum(dim=1) / (n if mode == "mean" else torch.sqrt(n)))
        else:  # weightedmean: position weights 1..T
            pos = torch.arange(1, h.shape[1] + 1, dtype=h.dtype, device=h.device).view(1, -1, 1)
            wm = m * pos
            out.append((h * wm).sum(dim=1) / torch.clamp(wm.sum(dim=1), min=1e-9))
    return out[0] if len(out) == 1 else torch.cat(out, dim=-1)
