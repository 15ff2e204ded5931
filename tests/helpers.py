"""Plain helpers of the test suite (no pytest): tiny random HF models and the repository paths.

Tests get tiny models through the ``tiny_model`` fixture of ``tests/conftest.py`` (built once per
session); ``make_tiny_model`` stays importable here for scripts such as ``tools/bad_input_report.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EDGEQ_SHARED", REPO.parent / "shared"))

WORDS = sorted({
    w.strip(".,;'!?").lower()
    for w in (
        "the quick brown fox jumps over the lazy dog a man is playing guitar on stage someone "
        "performing music i loved this film acting was superb and story moved me service slow food "
        "arrived cold quantization reduces size of neural networks company reported record profits "
        "quarter fell sharply she bought three apples at market purchased paris capital france city "
        "it rained all day so match cancelled edgeq exports sentence one which little longer than first "
        "second segment another unremarkable forgettable sequel that adds nothing new"
    ).split()
})

# (architecture class, model_type)
TINY_ARCHS = [
    ("BertForSequenceClassification", "bert"),
    ("BertModel", "bert"),
    ("DistilBertForSequenceClassification", "distilbert"),
    ("DistilBertModel", "distilbert"),
    ("RobertaForSequenceClassification", "roberta"),
    ("RobertaModel", "roberta"),
    ("XLMRobertaForSequenceClassification", "xlm-roberta"),
    ("XLMRobertaModel", "xlm-roberta"),
    ("MPNetForSequenceClassification", "mpnet"),
    ("MPNetModel", "mpnet"),
    ("ElectraForSequenceClassification", "electra"),
    ("ElectraModel", "electra"),
]
# model_type → whether its inputs include token_type_ids
HAS_TOKEN_TYPES = {"bert": True, "distilbert": False, "roberta": False, "xlm-roberta": False, "mpnet": False,
                   "electra": True}


def _tokenizer(path: Path, model_type: str):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [c for c in "abcdefghijklmnopqrstuvwxyz0123456789"] + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(special + WORDS + letters))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece()
    names = (
        ["input_ids", "token_type_ids", "attention_mask"] if HAS_TOKEN_TYPES[model_type]
        else ["input_ids", "attention_mask"]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]", model_input_names=names,
    )
    fast.save_pretrained(path)
    return len(vocab)


def model_type_of(arch: str) -> str:
    """The ``model_type`` of an architecture class name (``bert``, ``distilbert``, ``roberta``, ...)."""
    prefixes = (("DistilBert", "distilbert"), ("XLMRoberta", "xlm-roberta"), ("Roberta", "roberta"),
                ("MPNet", "mpnet"), ("Electra", "electra"), ("Bert", "bert"))
    return next(t for prefix, t in prefixes if arch.startswith(prefix))


def make_tiny_model(path: Path, arch: str = "BertForSequenceClassification", model_type: str | None = None,
                    dtype: str = "float32", num_labels: int = 2, hidden: int = 48, seed: int = 0) -> Path:
    """Save a tiny random model of ``arch`` (safetensors, ``dtype`` on disk) with a tokenizer."""
    import torch
    import transformers

    model_type = model_type or model_type_of(arch)
    path.mkdir(parents=True, exist_ok=True)
    vocab_size = _tokenizer(path, model_type)
    common = dict(vocab_size=vocab_size, pad_token_id=0, max_position_embeddings=160, num_labels=num_labels)
    if model_type == "distilbert":
        cfg = transformers.DistilBertConfig(dim=hidden, n_layers=2, n_heads=4, hidden_dim=2 * hidden, **common)
    elif model_type == "mpnet":  # relative position bias: an nn.Embedding [buckets, heads] that is no Linear
        cfg = transformers.MPNetConfig(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=2 * hidden, relative_attention_num_buckets=32, **common)
    elif model_type == "electra":  # embedding_size < hidden: the embeddings_project Linear is exercised too
        cfg = transformers.ElectraConfig(embedding_size=hidden // 2, hidden_size=hidden, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=2 * hidden, type_vocab_size=2,
                                         **common)
    else:
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig,
               "xlm-roberta": transformers.XLMRobertaConfig}[model_type]
        cfg = cls(hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=2 * hidden, type_vocab_size=2 if model_type == "bert" else 1, **common)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(cfg).eval()
    with torch.no_grad():  # random biases and norms too: fresh HF inits are zeros/ones, unlike trained models
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.05 * torch.randn_like(p))
            elif name.endswith("relative_attention_bias.weight"):  # MPNet: a bias large enough to matter
                p.normal_(0.0, 1.0)
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    return path


def make_st_folder(path: Path, tiny: Path, layout: str = "root", pooling=("mean",), normalize: bool = True,
                   dense: int | None = None, activation: str = "torch.nn.modules.activation.Tanh",
                   seed: int = 0) -> Path:
    """A sentence-transformers folder around the tiny encoder ``tiny`` (a BertModel directory).

    ``layout`` "root": the encoder files at the root of ``path``; "sub": in ``path/0_Transformer``.
    ``pooling``: the modes (written as ``pooling_mode``); ``dense``: a Dense module to this width
    (random weights, safetensors); ``normalize``: a Normalize module last.
    """
    import json
    import shutil

    import torch
    from safetensors.torch import save_file

    tdir = path if layout == "root" else path / "0_Transformer"
    shutil.copytree(tiny, tdir, dirs_exist_ok=True)
    hidden = json.loads((tdir / "config.json").read_text())["hidden_size"]
    st = "sentence_transformers.models."
    modules = [{"idx": 0, "name": "0", "path": "" if layout == "root" else "0_Transformer", "type": st + "Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"}]
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"embedding_dimension": hidden, "pooling_mode": list(pooling), "include_prompt": True}))
    if dense:
        width = hidden * len(pooling)
        d = path / "2_Dense"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"in_features": width, "out_features": dense, "bias": True,
                                                   "activation_function": activation}))
        g = torch.Generator().manual_seed(seed)
        save_file({"linear.weight": torch.randn(dense, width, generator=g) / width ** 0.5,
                   "linear.bias": torch.randn(dense, generator=g) * 0.1}, str(d / "model.safetensors"))
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": st + "Dense"})
    if normalize:
        n = len(modules)
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": st + "Normalize"})
    (path / "modules.json").write_text(json.dumps(modules, indent=2))
    return path
