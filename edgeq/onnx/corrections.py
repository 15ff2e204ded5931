"""The graph encodings of the exact FP32 correction ``Σ_t x[..., j_t] v_t e_{i_t}`` (``--correction``).

Each encoding is registered once in :data:`CORRECTIONS` with four functions: ``check`` (a reason
when it refuses a layer, else None), ``build`` (its nodes and initializers), ``decode`` (the
(rows, cols, values) of the FP32 entries, read back from the initializers) and the cost model
used by ``auto``.  The CLI's ``--correction`` choices are :data:`CORRECTION_CHOICES`.

The correction has interchangeable graph encodings (``CORRECTIONS``, ``--correction``):

* ``dense`` (default): with C the c distinct columns of S, ``y = y_q + Gather(x, C) @ D`` where
  ``D [c, N]`` holds v_t at (position of j_t in C, i_t) and zeros elsewhere.  The file stores
  whichever form of D is smaller: (positions, v), 8 bytes of positions + v per entry, with D rebuilt
  by ``ScatterND(ConstantOfShape([c, N]), positions, v)``, a constant subgraph ONNX Runtime folds
  once at session creation; or D itself (``corr_dense``, c·N values: the smaller one when D is
  mostly filled, e.g. whole activation-outlier columns).  Same D, same outputs.  3 run-time nodes.  Refused (the
  layer falls back to ``scatter``) when D would hold more than ``DENSE_MAX_FRACTION`` of N·K
  entries — its memory and FLOPs grow with c·N.
* ``rows``: with R the r distinct output rows of S, ``y = y_q + (x @ A) @ P`` where ``A [K, r]``
  holds v_t at (j_t, position of i_t in R) and ``P [r, N]`` is one-hot (P[p, R_p] = 1); both are
  rebuilt at load (ScatterND / OneHot, folded).  3 run-time nodes, no Gather: r·(K + N)
  multiply-adds per token.  Every product is a salient x_j·v_t or an exact zero, as in ``dense``.
* ``scatter``: ``ScatterElements(y_q, Expand(rows, Shape(u)), u = Gather(x, cols) ⊙ v, add)``;
  memory and FLOPs ∝ k, but 5 run-time nodes and an extra pass over y.
* ``auto`` (default): per layer the cheapest accepted encoding by its cost per token in
  multiply-add equivalents: dense ``c·(N + G)``, rows ``r·(K + N)``, scatter ``2·k·G``, where
  G = GATHER_COST is what one element gathered (or scattered) along the last axis costs ONNX
  Runtime's CPU kernels relative to one MatMul multiply-add (measured, docs/performance.md).

Every encoding stores its values (v, or D) as float16 when that is lossless
(:func:`edgeq.onnx.lossless.float_constant`: the exact weights of a float16 checkpoint are float16
values), read through a constant ``Cast`` that ONNX Runtime folds at load.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx.lossless import float_constant, fp16_exact
from edgeq.quant.int4 import QuantizedLinear

DENSE_MAX_FRACTION = 0.5  # dense (rows) refused when c·N (r·(K+N)) > this · N·K: run-time memory
DENSE = "corr_dense"  # initializer suffix of a dense correction stored as D itself
GATHER_COST = 500  # multiply-add equivalents of one element gathered along the last axis (ORT CPU)


@dataclass(frozen=True)
class Correction:
    """One graph encoding of the FP32 correction: ``check`` (reason or None), then ``build``."""

    name: str
    summary: str
    check: Callable[[QuantizedLinear], str | None]
    build: Callable[[str, str, str, str, QuantizedLinear], tuple[list, list]]
    decode: Callable[[str, object, Callable[[str], np.ndarray]], tuple[np.ndarray, np.ndarray, np.ndarray]]
    markers: tuple[str, ...]  # initializer suffixes only this encoding writes: how a file says which one a layer uses


def _tensor(a: np.ndarray, name: str) -> onnx.TensorProto:
    return numpy_helper.from_array(a, name)


def _values(layer: str, values: np.ndarray, suffix: str = "corr_vals") -> tuple[str, list, list]:
    """(name, nodes, initializers) of ``layer``'s correction values: float16 + a folded Cast when lossless."""
    return float_constant(f"{layer}.{suffix}", values, f"/{layer}/correction/{suffix}")


def _split(q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.divmod(q.salient_index, q.shape[1])
    return rows, cols


def _scatter_check(q: QuantizedLinear) -> str | None:
    return None


def _scatter_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    rows, cols = _split(q)
    vals, nodes, inits = _values(layer, q.salient_values)
    nodes += [
        helper.make_node("Gather", [x, f"{layer}.corr_cols"], [f"{p}/x_sel"], name=f"{p}/Gather", axis=-1),
        helper.make_node("Mul", [f"{p}/x_sel", vals], [f"{p}/updates"], name=f"{p}/Mul"),
        helper.make_node("Shape", [f"{p}/updates"], [f"{p}/shape"], name=f"{p}/Shape"),
        helper.make_node("Expand", [f"{layer}.corr_rows", f"{p}/shape"], [f"{p}/rows"], name=f"{p}/Expand"),
        helper.make_node(
            "ScatterElements", [y_q, f"{p}/rows", f"{p}/updates"], [y], name=f"{p}/ScatterElements",
            axis=-1, reduction="add",
        ),
    ]
    inits += [
        _tensor(cols.astype(np.int32), f"{layer}.corr_cols"),
        _tensor(rows.astype(np.int32), f"{layer}.corr_rows"),
    ]
    return nodes, inits


def _vals(layer: str, arr) -> np.ndarray:
    return arr(f"{layer}.corr_vals").astype(np.float32)  # float16 when that was lossless


def _scatter_decode(layer: str, names, arr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return arr(f"{layer}.corr_rows"), arr(f"{layer}.corr_cols"), _vals(layer, arr)


def _scattered_constant(layer: str, pos: str, out: str, name: str, values: np.ndarray) -> tuple[list, list]:
    """``out = ScatterND(zeros(corr_shape), pos, corr_vals)``: a constant subgraph ONNX Runtime folds at load
    (nodes, and the initializer(s) of the values)."""
    p = f"/{layer}/correction"
    vals, nodes, inits = _values(layer, values)
    return nodes + [
        helper.make_node("ConstantOfShape", [f"{layer}.corr_shape"], [f"{p}/zeros"], name=f"{p}/Zeros",
                         value=_tensor(np.zeros(1, np.float32), "zero")),
        helper.make_node("Cast", [pos], [f"{p}/pos64"], name=f"{p}/Cast", to=TensorProto.INT64),
        helper.make_node("ScatterND", [f"{p}/zeros", f"{p}/pos64", vals], [out], name=name),
    ], inits


def _dense_check(q: QuantizedLinear) -> str | None:
    n_out, k_in = q.shape
    c = np.unique(q.salient_index % k_in).size
    if c * n_out > DENSE_MAX_FRACTION * n_out * k_in:
        return (f"{c} distinct input columns: a dense [{c} x {n_out}] block exceeds "
                f"{DENSE_MAX_FRACTION:g} of the weight")
    return None


def _dense_matrix(q: QuantizedLinear) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(distinct columns C, positions [k, 2] = (position of j_t in C, i_t), D [c, N], whether D is stored)."""
    rows, cols = _split(q)
    distinct, pos = np.unique(cols, return_inverse=True)
    d = np.zeros((distinct.size, q.shape[0]), np.float32)
    d[pos, rows] = q.salient_values
    value_bytes = 2 if fp16_exact(q.salient_values) else 4  # float16 when lossless (_values)
    whole = d.size * value_bytes < q.k * (8 + value_bytes)  # D itself vs int32 position pairs + values
    return distinct, np.stack([pos, rows], axis=1), d, whole


def _dense_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    distinct, pos, d, whole = _dense_matrix(q)
    if whole:  # D itself: smaller when mostly filled (whole activation-outlier columns)
        dense, nodes, inits = _values(layer, d, DENSE)
    else:
        nodes, inits = _scattered_constant(layer, f"{layer}.corr_pos", f"{p}/D", f"{p}/Dense", q.salient_values)
        dense = f"{p}/D"
        inits += [_tensor(pos.astype(np.int32), f"{layer}.corr_pos"),
                  _tensor(np.array([distinct.size, q.shape[0]], np.int64), f"{layer}.corr_shape")]
    nodes += [  # run time: y = y_q + x[..., C] @ D
        helper.make_node("Gather", [x, f"{layer}.corr_cols"], [f"{p}/x_sel"], name=f"{p}/Gather", axis=-1),
        helper.make_node("MatMul", [f"{p}/x_sel", dense], [f"{p}/delta"], name=f"{p}/MatMul"),
        helper.make_node("Add", [y_q, f"{p}/delta"], [y], name=f"{p}/Add"),
    ]
    return nodes, inits + [_tensor(distinct.astype(np.int64), f"{layer}.corr_cols")]


def _dense_decode(layer: str, names, arr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = arr(f"{layer}.corr_cols")
    if f"{layer}.{DENSE}" in names:  # D itself: every entry (its zeros add nothing)
        d = arr(f"{layer}.{DENSE}").astype(np.float32)
        return np.tile(np.arange(d.shape[1]), d.shape[0]), np.repeat(cols, d.shape[1]), d.reshape(-1)
    pos = arr(f"{layer}.corr_pos").astype(np.int64)  # (position in the distinct columns, row)
    return pos[:, 1], cols[pos[:, 0]], _vals(layer, arr)


def _rows_check(q: QuantizedLinear) -> str | None:
    n_out, k_in = q.shape
    r = np.unique(q.salient_index // k_in).size
    if r * (k_in + n_out) > DENSE_MAX_FRACTION * n_out * k_in:
        return (f"{r} distinct output rows: [{k_in} x {r}] and [{r} x {n_out}] factors exceed "
                f"{DENSE_MAX_FRACTION:g} of the weight's multiply-adds")
    return None


def _rows_build(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear):
    p = f"/{layer}/correction"
    n_out, k_in = q.shape
    rows, cols = _split(q)
    row_ids, row_pos = np.unique(rows, return_inverse=True)
    nodes, inits = _scattered_constant(layer, f"{layer}.corr_colpos", f"{p}/A", f"{p}/Factor", q.salient_values)
    nodes += [
        helper.make_node("OneHot", [f"{layer}.corr_rowids", f"{layer}.corr_depth", f"{layer}.corr_onehot"], [f"{p}/P"],
                         name=f"{p}/OneHot", axis=-1),
        # run time: y = y_q + (x @ A) @ P
        helper.make_node("MatMul", [x, f"{p}/A"], [f"{p}/u"], name=f"{p}/MatMul"),
        helper.make_node("MatMul", [f"{p}/u", f"{p}/P"], [f"{p}/delta"], name=f"{p}/Spread"),
        helper.make_node("Add", [y_q, f"{p}/delta"], [y], name=f"{p}/Add"),
    ]
    inits += [
        _tensor(np.stack([cols, row_pos], axis=1).astype(np.int32), f"{layer}.corr_colpos"),
        _tensor(np.array([k_in, row_ids.size], np.int64), f"{layer}.corr_shape"),
        _tensor(row_ids.astype(np.int64), f"{layer}.corr_rowids"),
        _tensor(np.array([n_out], np.int64), f"{layer}.corr_depth"),
        _tensor(np.array([0, 1], np.float32), f"{layer}.corr_onehot"),
    ]
    return nodes, inits


def _rows_decode(layer: str, names, arr) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pos = arr(f"{layer}.corr_colpos").astype(np.int64)  # (column, position in the distinct rows)
    return arr(f"{layer}.corr_rowids")[pos[:, 1]], pos[:, 0], _vals(layer, arr)


def _cost(q: QuantizedLinear, encoding: str) -> float:
    """Multiply-add equivalents per token of the run-time correction (the ``auto`` choice)."""
    n_out, k_in = q.shape
    if encoding == "dense":
        return np.unique(q.salient_index % k_in).size * (n_out + GATHER_COST)
    if encoding == "rows":
        return np.unique(q.salient_index // k_in).size * (k_in + n_out)
    return 2 * q.k * GATHER_COST


def choose_correction(q: QuantizedLinear, requested: str) -> tuple[str, str | None]:
    """(encoding to build, refusal reason or None) for ``--correction requested``; scatter never refuses."""
    candidates = tuple(CORRECTIONS) if requested == "auto" else (requested,)
    reasons = {name: CORRECTIONS[name].check(q) for name in candidates}
    accepted = [name for name in candidates if reasons[name] is None]
    if accepted:
        return min(accepted, key=lambda name: _cost(q, name)), None
    return FALLBACK_CORRECTION, "; ".join(f"{n} refused ({r})" for n, r in reasons.items())


CORRECTIONS: dict[str, Correction] = {
    c.name: c
    for c in (
        Correction("dense", "Gather(x, distinct cols) @ D[c, N] + Add; D stored, or folded at load from (pos, v)",
                   _dense_check, _dense_build, _dense_decode, ("corr_pos", DENSE)),
        Correction("rows", "(x @ A[K, r]) @ one-hot P[r, N] + Add; A and P folded at load",
                   _rows_check, _rows_build, _rows_decode, ("corr_colpos",)),
        Correction("scatter", "Gather(x, cols) * v → ScatterElements(add) into the output rows",
                   _scatter_check, _scatter_build, _scatter_decode, ("corr_rows",)),
    )
}
DEFAULT_CORRECTION = "auto"  # per layer: the cheapest accepted of dense, rows and scatter (choose_correction)
FALLBACK_CORRECTION = "scatter"  # never refuses
CORRECTION_CHOICES = ("auto", *CORRECTIONS)


def correction_branch(layer: str, x: str, y_q: str, y: str, q: QuantizedLinear, requested: str,
                      fallbacks: list) -> tuple[str | None, list, list]:
    """(encoding used or None when k = 0, nodes, initializers) of ``q``'s exact entries: ``y = y_q + x·Cᵀ``.

    A refusal of ``requested`` falls back to :data:`FALLBACK_CORRECTION` and is appended to ``fallbacks``
    as ``(layer, reason)`` (reported, never silent).
    """
    if not q.k:
        return None, [], []
    used, reason = choose_correction(q, requested)
    if reason:
        fallbacks.append((layer, f"{reason}; used {FALLBACK_CORRECTION}"))
    nodes, tensors = CORRECTIONS[used].build(layer, x, y_q, y, q)
    return used, nodes, tensors


def decode_correction(layer: str, names, arr) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(rows, cols, values) of ``layer``'s FP32 entries from its initializers, or None when it has none.

    ``names``: the graph's initializer names; ``arr(name)``: that initializer as a numpy array.
    """
    found = [c for c in CORRECTIONS.values() if any(f"{layer}.{m}" in names for m in c.markers)]
    return found[0].decode(layer, names, arr) if found else None


def correction_cost(q: QuantizedLinear, encoding: str) -> float:
    """Multiply-add equivalents per token of ``encoding`` for ``q`` by the ``auto`` cost model (0 when k = 0)."""
    return float(_cost(q, encoding)) if q.k else 0.0
