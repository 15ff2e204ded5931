"""edgeq.model.texts.encode_indexed: the one tokenising and batching path (and its wrappers)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.model.texts import (
    GLUE_DIR_ENV,
    default_glue_dir,
    encode_batches,
    encode_indexed,
    encode_texts,
)

PAIRS = [("the cat sat on the mat today", "a cat sat"), ("a dog", "the dog ran far away from the house"),
         ("hi", "yes"), ("one two three four five six seven", None), ("short", "tiny")]
SINGLES = [("the quick brown fox jumps", None), ("a", None), ("the dog ran", None), ("yes no", None), ("b", None)]


@pytest.fixture(scope="module")
def tokenizers(tiny_model):
    from transformers import AutoTokenizer

    return {t: AutoTokenizer.from_pretrained(tiny_model("BertModel" if t == "bert" else "RobertaModel"))
            for t in ("bert", "roberta")}


def _one(tok, a, b=None):
    """One example alone, unpadded (as a batch of one: a lone "" second text is not dropped)."""
    enc = tok([a], None if b is None else [b], truncation=True, max_length=128)
    return {k: v[0] for k, v in enc.items()}


@pytest.mark.parametrize("order", ["given", "chars", "tokens"])
@pytest.mark.parametrize("texts", [PAIRS, SINGLES], ids=["pairs", "singles"])
def test_rows_are_the_examples_right_padded(tokenizers, texts, order):
    tok = tokenizers["bert"]
    batches = encode_indexed(tok, texts, ["input_ids", "attention_mask", "token_type_ids"], batch_size=2, order=order)
    idx = np.concatenate([i for i, _ in batches])
    assert sorted(idx.tolist()) == list(range(len(texts)))
    pairs = any(b is not None for _, b in texts)
    for sel, feed in batches:
        assert set(feed) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.dtype == np.int64 and v.shape == feed["input_ids"].shape for v in feed.values())
        for row, i in enumerate(sel):
            a, b = texts[i]
            one = _one(tok, a, (b or "") if pairs and any(texts[j][1] is not None for j in sel) else None)
            n = len(one["input_ids"])
            assert feed["input_ids"][row, :n].tolist() == one["input_ids"]
            assert feed["token_type_ids"][row, :n].tolist() == one["token_type_ids"]
            assert (feed["input_ids"][row, n:] == tok.pad_token_id).all()
            assert feed["attention_mask"][row].tolist() == [1] * n + [0] * (feed["input_ids"].shape[1] - n)
            assert (feed["token_type_ids"][row, n:] == 0).all()


def test_orders(tokenizers):
    tok = tokenizers["bert"]
    given = np.concatenate([i for i, _ in encode_indexed(tok, PAIRS, batch_size=2)])
    assert given.tolist() == list(range(len(PAIRS)))
    chars = np.concatenate([i for i, _ in encode_indexed(tok, PAIRS, batch_size=2, order="chars")])
    assert chars.tolist() == sorted(range(len(PAIRS)), key=lambda i: len(PAIRS[i][0]) + len(PAIRS[i][1] or ""))
    tokens = np.concatenate([i for i, _ in encode_indexed(tok, PAIRS, batch_size=2, order="tokens")])
    lengths = [len(_one(tok, a, b or "")["input_ids"]) for a, b in PAIRS]
    assert tokens.tolist() == sorted(range(len(PAIRS)), key=lambda i: lengths[i])  # stable
    with pytest.raises(ValueError, match="order must be one of"):
        encode_indexed(tok, PAIRS, order="random")
    assert encode_indexed(tok, [], order="tokens") == [] and encode_indexed(tok, [], order="chars") == []


def test_truncation_and_a_batch_of_singles_stays_single(tokenizers):
    tok = tokenizers["bert"]
    (_, feed), = encode_indexed(tok, [("one two three four five six seven", "a b c d e")], max_length=6)
    assert feed["input_ids"].shape == (1, 6)
    # [CLS] a [SEP] in a batch of singles; [CLS] a [SEP] [SEP] when it shares a batch with a pair
    alone = encode_indexed(tok, SINGLES[:2] + PAIRS[:1], batch_size=2)
    assert alone[0][1]["input_ids"][1].tolist()[:3] == _one(tok, "a")["input_ids"]
    mixed = encode_indexed(tok, SINGLES[1:2] + PAIRS[:1], batch_size=2)
    assert mixed[0][1]["input_ids"][0].tolist()[:4] == _one(tok, "a", "")["input_ids"]


def test_input_names_select_and_token_types_default_to_zeros(tokenizers):
    tok = tokenizers["roberta"]  # its tokenizer produces no token_type_ids
    (_, feed), = encode_indexed(tok, PAIRS, ["input_ids", "token_type_ids", "attention_mask"], batch_size=8)
    assert set(feed) == {"input_ids", "token_type_ids", "attention_mask"}
    assert not feed["token_type_ids"].any() and feed["token_type_ids"].shape == feed["input_ids"].shape
    (_, feed), = encode_indexed(tok, PAIRS, ["input_ids"], batch_size=8)
    assert list(feed) == ["input_ids"]
    (_, feed), = encode_indexed(tok, PAIRS, None, batch_size=8)  # None: every tokenizer output
    assert set(feed) == {"input_ids", "attention_mask"}


def test_wrappers_are_the_same_batches(tokenizers):
    from types import SimpleNamespace

    from edgeq.evaluation.evaluate import encode_sorted

    # the two attributes encode_batches reads from a LoadedModel
    Loaded = SimpleNamespace(
        tokenizer=tokenizers["bert"], input_names=["input_ids", "attention_mask", "token_type_ids"]
    )

    def same(a, b):
        return len(a) == len(b) and all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
                                        for x, y in zip(a, b))

    core = encode_indexed(Loaded.tokenizer, PAIRS, Loaded.input_names, 2, order="chars")
    assert same(encode_batches(Loaded, PAIRS, 2, order="chars"), [f for _, f in core])
    assert same(encode_texts(Loaded.tokenizer, PAIRS, Loaded.input_names, 2, order="chars"), [f for _, f in core])
    core = encode_indexed(Loaded.tokenizer, PAIRS, Loaded.input_names, 2, 16, order="tokens")
    sorted_ = encode_sorted(Loaded.tokenizer, PAIRS, Loaded.input_names, 16, 2)
    assert [i.tolist() for i, _ in sorted_] == [i.tolist() for i, _ in core]
    assert same([f for _, f in sorted_], [f for _, f in core])


def test_default_glue_dir(tmp_path, monkeypatch):
    from edgeq.evaluation.tasks import dev_file, get_task
    from edgeq.model.calib import resolve_calib_source

    monkeypatch.setenv(GLUE_DIR_ENV, str(tmp_path))
    assert default_glue_dir() == tmp_path
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("x\n")
    (tmp_path / "RTE" / "train.tsv").write_text("x\n")
    assert dev_file(get_task("rte"), None) == tmp_path / "RTE" / "dev.tsv"  # evaluation and calibration agree
    assert resolve_calib_source("rte") == tmp_path / "RTE" / "train.tsv"
    monkeypatch.delenv(GLUE_DIR_ENV)
    monkeypatch.chdir(tmp_path)  # no ../shared/data/glue from here
    assert default_glue_dir() is None
