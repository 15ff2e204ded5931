"""Every supported architecture on a tiny random model: loading, FP32 export parity, Linear discovery, and
which embedding tables ``--quantize-embeddings`` takes.

The end-to-end convert/validate of each architecture is ``tests/pipeline/test_convert.py``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from edgeq.config import ConvertConfig
from edgeq.errors import EdgeqError
from edgeq.model.load import DEFAULT_INPUT_NAMES, SUPPORTED_MODEL_TYPES, load_model
from edgeq.onnx.embeddings import module_names, quantize_embeddings
from edgeq.onnx.rewrite import match_linears
from edgeq.pipeline.convert import EXPORT_TOLERANCE, export_checked, reference_outputs
from edgeq.pipeline.core import Timer
from tests.helpers import HAS_TOKEN_TYPES, TINY_ARCHS

# the nn.Embedding tables of each model_type that are not word/position tables, left FP32 by
# --quantize-embeddings (fewer than MIN_ROWS rows), and the Linears whose names prove the discovery
# reached the architecture's own modules
SMALL_TABLES = {"bert": "token_type_embeddings", "roberta": "token_type_embeddings",
                "xlm-roberta": "token_type_embeddings", "electra": "token_type_embeddings",
                "mpnet": "relative_attention_bias", "distilbert": None}
OWN_LINEARS = {"mpnet": ("attn.q", "attn.k", "attn.v", "attn.o"), "electra": ("embeddings_project",),
               "distilbert": ("attention.q_lin", "attention.out_lin"),
               "bert": ("attention.self.query",), "roberta": ("attention.self.query",),
               "xlm-roberta": ("attention.self.query",)}


def test_every_model_type_has_a_tiny_model_and_default_inputs():
    assert {t for _, t in TINY_ARCHS} == set(SUPPORTED_MODEL_TYPES) == set(DEFAULT_INPUT_NAMES)
    for model_type, names in DEFAULT_INPUT_NAMES.items():
        assert names[0] == "input_ids" and names[-1] == "attention_mask"
        assert ("token_type_ids" in names) == HAS_TOKEN_TYPES[model_type]


@pytest.mark.parametrize("arch,model_type", TINY_ARCHS)
def test_export_parity_linear_discovery_and_embedding_tables(tiny_model, arch, model_type):
    loaded = load_model(tiny_model(arch, model_type, hidden=64))  # hidden 64: tables fit blocks of 32
    assert loaded.model_type == model_type
    assert loaded.input_names == DEFAULT_INPUT_NAMES[model_type]
    assert loaded.head == ("sequence-classification" if arch.endswith("ForSequenceClassification") else "encoder")

    # FP32 export: ONNX Runtime vs PyTorch on the built-in text (several lengths, padding), the convert gate
    config = ConvertConfig()
    ref = reference_outputs(loaded, None, None)
    model, diff = export_checked(loaded, config, ref, 1, Timer())
    assert set(diff) == set(loaded.output_names)
    for name, d in diff.items():
        assert d <= EXPORT_TOLERANCE * max(1.0, float(np.max(np.abs(ref.outputs[name]))))
    assert [i.name for i in model.graph.input] == list(loaded.input_names)

    # Linear discovery by weight content: every nn.Linear found, nothing else
    weights = loaded.linear_weights()
    matches, refused = match_linears(model, weights)
    assert set(matches) == set(weights)
    assert [r for r in refused if "activation" not in r[1]] == []
    for own in OWN_LINEARS[model_type]:
        assert any(n.endswith(own) for n in matches), own
    embeddings = {n for n, m in loaded.model.named_modules() if isinstance(m, torch.nn.Embedding)}
    assert not embeddings & set(weights)  # MPNet's relative_attention_bias is an Embedding, never a Linear

    # --quantize-embeddings: word and position tables become 4-bit, the small ones stay FP32 with a reason
    names = module_names(model, loaded.model)
    res = quantize_embeddings(model, 32, names)
    assert sorted(n.rsplit(".", 1)[-1] for n in res.rewritten.values()) == ["position_embeddings", "word_embeddings"]
    small = SMALL_TABLES[model_type]
    reasons = [r for _, r in res.refused]
    assert reasons == [] if small is None else (len(reasons) == 1 and small in reasons[0]
                                                and "quantizing it saves nothing" in reasons[0])
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["GatherBlockQuantized"] == 2


@pytest.mark.parametrize("arch", ["MPNetForMaskedLM", "ElectraForPreTraining"])
def test_a_pretraining_head_config_over_encoder_weights_loads_as_the_encoder(tmp_path, tiny_model, arch):
    """all-mpnet-base-v2 says MPNetForMaskedLM but its checkpoint is the bare MPNetModel."""
    import json

    import transformers

    src = tiny_model(arch.replace("ForMaskedLM", "Model").replace("ForPreTraining", "Model"), copy_to=tmp_path / "m")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "architectures": [arch]}))
    loaded = load_model(src)
    assert loaded.head == "encoder"
    assert type(loaded.model).__name__ == arch.replace("ForMaskedLM", "Model").replace("ForPreTraining", "Model")

    # the same config over a checkpoint that holds the head: refused, not dropped silently
    full = tmp_path / "full"
    model = getattr(transformers, arch)(transformers.AutoConfig.from_pretrained(src))
    model.save_pretrained(full, safe_serialization=True)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (full / f.name).write_bytes(f.read_bytes())
    with pytest.raises(EdgeqError, match=rf"unsupported head {arch} .*holds its weights"):
        load_model(full)
