"""Checks of checkpoint files before any library reads them: safetensors headers and shard indexes.

A safetensors file is ``N`` (8 bytes, little-endian) · a JSON header of ``N`` bytes · the data.
The header maps tensor names to ``{dtype, shape, data_offsets: [begin, end]}`` (plus an optional
``__metadata__`` map of strings); a valid file has ``end − begin = prod(shape) · bytes(dtype)`` for
every tensor, the tensors tile the data without holes or overlaps, and the data ends where the
file ends.  :func:`check_safetensors_header` checks exactly that (reading only the first ``8 + N``
bytes, ``N`` ≤ 100 MB) and then lets the safetensors library parse the header as well, so that a
truncated or garbled file is always one :class:`EdgeqError` line, never a library traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgeq.errors import EdgeqError

# bytes per element of the safetensors dtypes transformers can load (sub-byte float types are refused)
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                   "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_ST_MAX_HEADER = 100_000_000  # the safetensors library's own limit


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate key")
    return dict(pairs)


def _header_problem(header: object, buffer: int) -> str | None:
    """Why a parsed safetensors header is not a valid one for a data buffer of ``buffer`` bytes, or None."""
    if not isinstance(header, dict):
        return "not a JSON object"
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        return "__metadata__ is not a map of strings"
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            return f"entry {name[:40]!r} is not {{dtype, shape, data_offsets}}"
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BYTES:
            return f"tensor {name[:40]!r} has unsupported dtype {str(dtype)[:20]!r}"
        ints = lambda xs: isinstance(xs, list) and all(type(x) is int and x >= 0 for x in xs)  # noqa: E731
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[1] < offsets[0]:
            return f"tensor {name[:40]!r} has a malformed shape or data_offsets"
        count = 1
        for d in shape:
            count *= d
        if offsets[1] - offsets[0] != count * _ST_DTYPE_BYTES[dtype]:
            return f"tensor {name[:40]!r}: data_offsets span {offsets[1] - offsets[0]} bytes, its shape needs " \
                   f"{count * _ST_DTYPE_BYTES[dtype]}"
        spans.append(tuple(offsets))
    end = 0
    for b, e in sorted(spans):
        if b != end:
            return "tensor data overlaps or leaves a hole"
        end = e
    if end > buffer:
        return None  # the caller reports the truncation
    if end < buffer:
        return f"{buffer - end} byte(s) after the last tensor"
    return None


def check_safetensors_header(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file with one line (and never read more than its header).

    Everything the safetensors library checks is checked here first (length, JSON, entries, sizes,
    contiguous data), so that a header accepted here is also accepted by the library; the library
    then parses it too, and whatever it still refuses is reported the same way.
    """
    fix = "re-download or re-save it"
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise EdgeqError(f"{path} is truncated (no safetensors header); {fix}")
        n = int.from_bytes(head, "little")
        if n <= 0 or n > _ST_MAX_HEADER or 8 + n > size:
            raise EdgeqError(f"{path} has a corrupt safetensors header (header length {n}, file {size} bytes); {fix}")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
            why = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not valid JSON"
            raise EdgeqError(f"{path} has a corrupt safetensors header ({why}); {fix}") from None
    problem = _header_problem(header, size - 8 - n)
    if problem:
        raise EdgeqError(f"{path} has a corrupt safetensors header ({problem}); {fix}")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise EdgeqError(f"{path} is truncated ({size} bytes, header needs {8 + n + end}); re-download it")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy"):
            pass
    except Exception as e:  # noqa: BLE001 - whatever the library refuses is a corrupt file
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise EdgeqError(f"{path} has a corrupt safetensors header ({why}); {fix}") from None


def check_shards(model_dir: Path) -> None:
    """Every shard named by a ``*.safetensors.index.json`` must be present (a partial download)."""
    for index in sorted(model_dir.glob("*.safetensors.index.json")):
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})  # checked before
        missing = sorted({f for f in dict(weight_map).values() if not (model_dir / f).is_file()})
        if missing:
            raise EdgeqError(f"{index} names {len(missing)} shard(s) that are missing (first: {missing[0]}); "
                             "download every file listed in the index into the model directory")
