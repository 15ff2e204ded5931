"""edgeq.model.checkpoint: truncated or garbled safetensors files, fuzzed (hypothesis).

Property: whatever the bytes, :func:`check_safetensors_header` either raises one :class:`EdgeqError`
line naming the file and the fix, or accepts a file that the safetensors library then loads
completely.  Never another exception, never a read past the header.  The CLI end of the same cases
(exit 1, one line, nothing written) is in ``tests/cli/test_bad_input.py``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeq.errors import EdgeqError
from edgeq.model.checkpoint import check_safetensors_header, check_shards

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> bytes:
    from safetensors.numpy import save_file

    p = tmp_path_factory.mktemp("st") / "model.safetensors"
    rng = np.random.default_rng(0)
    save_file({"a.weight": rng.standard_normal((4, 8)).astype(np.float32),
               "a.bias": rng.standard_normal(4).astype(np.float16),
               "b.ids": np.arange(3, dtype=np.int64)}, str(p), metadata={"format": "pt"})
    return p.read_bytes()


def _judge(path: Path, data: bytes) -> str:
    """'refused' (one-line EdgeqError naming the file) or 'loaded' (and then the library loads every tensor)."""
    path.write_bytes(data)
    try:
        check_safetensors_header(path)
    except EdgeqError as e:
        msg = str(e)
        assert "\n" not in msg and str(path) in msg and ("re-download" in msg or "re-save" in msg), msg
        return "refused"
    from safetensors.numpy import load_file

    tensors = load_file(str(path))  # accepted: must load without any error
    assert all(isinstance(v, np.ndarray) for v in tensors.values())
    return "loaded"


def test_the_untouched_file_is_accepted(good, tmp_path):
    assert _judge(tmp_path / "m.safetensors", good) == "loaded"


@FUZZ
@given(cut=st.integers(min_value=0))
def test_any_truncation_is_refused(good, tmp_path, cut):
    cut %= len(good)  # every proper prefix, the empty file included
    assert _judge(tmp_path / "m.safetensors", good[:cut]) == "refused"


@FUZZ
@given(length=st.binary(min_size=8, max_size=8))
def test_random_header_length(good, tmp_path, length):
    data = length + good[8:]
    outcome = _judge(tmp_path / "m.safetensors", data)
    assert outcome == "refused" or length == good[:8]


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=6))
def test_random_bytes_in_the_json_header(good, tmp_path, edits):
    n = struct.unpack("<Q", good[:8])[0]
    data = bytearray(good)
    for pos, byte in edits:
        data[8 + pos % n] = byte
    _judge(tmp_path / "m.safetensors", bytes(data))  # refused, or loads completely (e.g. a renamed tensor)


def _with_header(good: bytes, edit) -> bytes:
    n = struct.unpack("<Q", good[:8])[0]
    header = edit(json.loads(good[8:8 + n]))
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + good[8 + n:]


def _first(h):
    return next(k for k in h if k != "__metadata__")


@FUZZ
@given(field=st.sampled_from(["dtype", "shape", "data_offsets"]),
       value=st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                          lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                          max_leaves=8))
def test_random_values_in_a_tensor_entry(good, tmp_path, field, value):
    def edit(h):
        h[_first(h)][field] = value
        return h
    _judge(tmp_path / "m.safetensors", _with_header(good, edit))


@pytest.mark.parametrize("edit,why", [
    (lambda h: [1, 2], "not a JSON object"),
    (lambda h: b"[" * 5000 + b"]" * 5000, "not valid JSON"),  # nesting deeper than the JSON parser's recursion
    (lambda h: b'{"a": 1, "a": 2}', "not valid JSON"),  # duplicate keys: two readers could disagree
    (lambda h: b"\xff\xfe{}", "not UTF-8"),
    (lambda h: {**h, "__metadata__": {"format": 1}}, "__metadata__ is not a map of strings"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "dtype": "F4"}}, "unsupported dtype 'F4'"),
    (lambda h: {**h, _first(h): {**h[_first(h)], "shape": [999]}}, "its shape needs"),
    (lambda h: {k: v for k, v in h.items() if k != _first(h)}, "hole"),
])
def test_named_header_problems(good, tmp_path, edit, why):
    p = tmp_path / "m.safetensors"
    p.write_bytes(_with_header(good, edit))
    with pytest.raises(EdgeqError, match=f"corrupt safetensors header .*{why}"):
        check_safetensors_header(p)


def test_a_huge_header_length_is_refused_without_reading(tmp_path):
    p = tmp_path / "m.safetensors"
    p.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    with pytest.raises(EdgeqError, match="header length 9223372036854775808, file 10 bytes"):
        check_safetensors_header(p)


def test_a_missing_shard_is_named(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(EdgeqError, match=r"names 1 shard\(s\) that are missing \(first: model-00002-of-00002"):
        check_shards(tmp_path)
