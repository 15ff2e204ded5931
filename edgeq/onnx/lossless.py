"""Lossless float16 storage of the float32 constants edgeq writes (corrections, scales, masks).

A float32 array ``v`` is stored as float16 exactly when every element round-trips::

    float32(float16(v_i)) == v_i   for every i      (NaN never does; ±0, ±inf and fp16 subnormals do)

— true of weights taken from a float16 checkpoint (the exact entries of the FP32 correction) and of
scales rounded to float16 before quantizing.  The graph then reads ``Cast(v16, to=FLOAT)``: a
constant subgraph ONNX Runtime folds into a float32 initializer when the session is created, so the
run-time graph and every number it computes are those of the float32 file.  Anything else stays
float32: the rule can only shrink a file, never change a value.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def fp16_exact(values: np.ndarray) -> bool:
    """Whether every element of ``values`` (float32) is a float16 value."""
    a = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):
        return bool(np.array_equal(a.astype(np.float16).astype(np.float32), a))


def float_constant(name: str, values: np.ndarray, out: str) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """(value name, nodes, initializers) of a float32 constant: the initializer ``name`` itself (float32), or
    ``name`` stored float16 plus ``out = Cast(name, FLOAT)`` when that is lossless (:func:`fp16_exact`).

    Decode either form with ``numpy_helper.to_array(init).astype(np.float32)``."""
    a = np.ascontiguousarray(values, dtype=np.float32)
    if a.size and fp16_exact(a):
        cast = helper.make_node("Cast", [name], [out], name=f"{out}/Cast", to=TensorProto.FLOAT)
        return out, [cast], [numpy_helper.from_array(a.astype(np.float16), name)]
    return name, [], [numpy_helper.from_array(a, name)]
