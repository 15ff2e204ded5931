"""Sentence-transformers folders and the pooling wrapper (edgeq.model.sentence, via edgeq.model.load)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeq.errors import EdgeqError, UsageError
from edgeq.model.load import load_model
from edgeq.model.sentence import POOLING_MODES, pool, read_pooling, read_sentence_dir
from tests.helpers import make_st_folder


def _reference_pool(h: np.ndarray, m: np.ndarray, mode: str) -> np.ndarray:
    """The modes of sentence-transformers' Pooling, written out per sentence in numpy."""
    out = []
    for x, mask in zip(h, m.astype(bool)):
        rows = x[mask]
        pos = np.flatnonzero(mask) + 1.0
        out.append({"cls": x[0], "max": rows.max(0), "mean": rows.mean(0),
                    "mean_sqrt_len_tokens": rows.sum(0) / np.sqrt(len(rows)),
                    "weightedmean": (rows * pos[:, None]).sum(0) / pos.sum()}[mode])
    return np.stack(out)


@pytest.mark.parametrize("mode", POOLING_MODES)
def test_pool_matches_the_definition(mode):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 7, 5, generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])
    np.testing.assert_allclose(pool(h, mask, (mode,)).numpy(), _reference_pool(h.numpy(), mask.numpy(), mode),
                               rtol=1e-5, atol=1e-6)


def test_several_modes_concatenate_in_the_listed_order():
    h, mask = torch.randn(2, 4, 3), torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    got = pool(h, mask, ("max", "mean")).numpy()
    want = np.concatenate([_reference_pool(h.numpy(), mask.numpy(), m) for m in ("max", "mean")], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_pooling_config_legacy_and_new_keys(tmp_path):
    p = tmp_path / "config.json"
    p.write_text(json.dumps({"word_embedding_dimension": 8, "pooling_mode_cls_token": False,
                             "pooling_mode_mean_tokens": True}))
    assert read_pooling(p) == ("mean",)
    p.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_max_tokens": True}))
    assert read_pooling(p) == ("cls", "max")
    p.write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": ["weightedmean", "cls"]}))
    assert read_pooling(p) == ("weightedmean", "cls")
    p.write_text(json.dumps({"pooling_mode": "lasttoken"}))
    with pytest.raises(EdgeqError, match="'lasttoken' is not supported"):
        read_pooling(p)
    p.write_text("{not json")
    with pytest.raises(EdgeqError, match="not valid JSON"):
        read_pooling(p)


@pytest.fixture(scope="module")
def st_layouts(tiny_model, tmp_path_factory):
    """The same tiny encoder + mean pooling + Dense(tanh) + Normalize, in both layouts."""
    tiny = tiny_model("BertModel")
    root = tmp_path_factory.mktemp("st")
    return {layout: make_st_folder(root / layout, tiny, layout, dense=24) for layout in ("root", "sub")}


def _embed(loaded, texts):
    from edgeq.model.texts import encode_batches

    (batch,) = encode_batches(loaded, [(t, None) for t in texts])
    with torch.no_grad():
        out = loaded.model(**{k: torch.from_numpy(v) for k, v in batch.items()}, return_dict=True)
    return {k: v.numpy() for k, v in out.items()}


def test_both_layouts_load_the_same_sentence_encoder(st_layouts):
    texts = ["the quick brown fox", "a man is playing guitar on stage"]
    outs = []
    for layout, folder in st_layouts.items():
        loaded = load_model(folder)
        assert loaded.head == "sentence-embedding" and loaded.sentence.pooling == ("mean",)
        assert loaded.output_names == ("sentence_embedding", "token_embeddings", "last_hidden_state")
        names = set(loaded.linear_weights())
        assert "dense.0.linear" in names and not any("pooler" in n for n in names)
        outs.append(_embed(loaded, texts))
    a, b = outs
    np.testing.assert_array_equal(a["sentence_embedding"], b["sentence_embedding"])
    assert a["sentence_embedding"].shape == (2, 24)
    np.testing.assert_allclose(np.linalg.norm(a["sentence_embedding"], axis=1), 1.0, rtol=1e-6)


def test_wrapper_computes_pool_dense_normalize(st_layouts):
    loaded = load_model(st_layouts["root"])
    out = _embed(loaded, ["the quick brown fox", "paris"])
    from edgeq.model.texts import encode_batches

    (batch,) = encode_batches(loaded, [("the quick brown fox", None), ("paris", None)])
    h, m = out["token_embeddings"], batch["attention_mask"]
    e = _reference_pool(h, m, "mean")
    lin = loaded.model.dense[0].linear
    e = np.tanh(e @ lin.weight.detach().numpy().T + lin.bias.detach().numpy())
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    np.testing.assert_allclose(out["sentence_embedding"], e, rtol=1e-5, atol=1e-6)


def test_pooling_option_on_a_bare_encoder(tiny_model):
    loaded = load_model(tiny_model("BertModel"), pooling="cls", normalize=True)
    out = _embed(loaded, ["the quick brown fox", "paris"])
    e = out["token_embeddings"][:, 0]
    np.testing.assert_allclose(out["sentence_embedding"], e / np.linalg.norm(e, axis=1, keepdims=True), rtol=1e-5)
    assert load_model(tiny_model("BertModel")).sentence is None


def test_refusals(tiny_model, tmp_path):
    tiny = tiny_model("BertModel")
    with pytest.raises(UsageError, match="classification/regression head"):
        load_model(tiny_model(), pooling="mean")
    with pytest.raises(UsageError, match="--normalize needs --pooling"):
        load_model(tiny, normalize=True)
    st = make_st_folder(tmp_path / "st", tiny, "sub")
    with pytest.raises(UsageError, match="modules.json sets the pooling"):
        load_model(st, pooling="max")
    modules = json.loads((st / "modules.json").read_text())
    (st / "modules.json").write_text(json.dumps(modules + [{"path": "", "type": "sentence_transformers.models.LSTM"}]))
    with pytest.raises(EdgeqError, match="unsupported module type 'sentence_transformers.models.LSTM'"):
        read_sentence_dir(st)
    (st / "modules.json").write_text(json.dumps(modules)[:40])
    with pytest.raises(EdgeqError, match="modules.json is not valid JSON"):
        load_model(st)
    (st / "modules.json").write_text(json.dumps([dict(modules[0], path="../elsewhere")] + modules[1:]))
    with pytest.raises(EdgeqError, match="leaves"):
        load_model(st)
    (st / "modules.json").unlink()
    with pytest.raises(EdgeqError, match="sentence-transformers folder without modules.json"):
        load_model(st)


def test_dense_pickle_refused_unless_allowed(tiny_model, tmp_path):
    from safetensors.torch import load_file

    st = make_st_folder(tmp_path / "st", tiny_model("BertModel"), dense=8)
    dense = st / "2_Dense"
    torch.save(load_file(str(dense / "model.safetensors")), str(dense / "pytorch_model.bin"))
    (dense / "model.safetensors").unlink()
    with pytest.raises(EdgeqError, match="pickle checkpoint"):
        load_model(st)
    assert load_model(st, allow_pickle=True).model.dense[0].linear.out_features == 8
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**cfg, "activation_function": "mypkg.Swish"}))
    with pytest.raises(EdgeqError, match="activation 'mypkg.Swish' is not supported"):
        load_model(st, allow_pickle=True)
