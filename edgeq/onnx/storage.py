"""How a MatMulNBits' weight (``B``) and ``scales`` are stored in the file (``--storage``, ``--kernel``).

* ``plain``: ``B`` = ``pack_codes(codes, block, bits)`` and float32 ``scales`` as initializers (the
  layout ONNX Runtime documents; 4 or 8 bits).
* ``compact``: b bits per weight (b = 2, 3, 4) and float16 scales.  The file holds the bit planes
  ``P [b, N·K_pad/8]`` of ``u = code >> (4 − b)`` (``edgeq.quant.pack.pack_planes``) and
  ``s16 = fp16(s · 2^(4−b))``; standard ops rebuild the 4-bit inputs::

      bit[p, 8t+i] = ⌊P[p, t] / 2^i⌋ mod 2                         # Cast, Unsqueeze, Div, Mod
      code[j]      = Σ_p bit[p, j] · 2^(p + 4 − b)                   # Reshape, Mul, ReduceSum
      B[n, blk, t] = code[2t'] + 16 · code[2t' + 1]  (uint8)         # Reshape, Mul, ReduceSum, Cast
      scales       = float32(s16) · 2^−(4−b)                          # Cast, Mul

  Every input of that subgraph is a constant, so ONNX Runtime folds it into a plain initializer
  when the session is created (tested: the optimized graph keeps only MatMulNBits) and runs the
  4-bit kernel; the numbers are bit-identical to storing the 4-bit codes, since 2^(4−b) is exact.
  Only opset-13 integer ops are used (BitShift/Bitwise* would need opset 18).
* ``native``: ONNX Runtime's own ``bits=2`` kernel, ``B = pack_native2(codes)`` (four 2-bit codes a
  byte, zero point 2) and float32 scales ``s · 4`` — for comparison; slow on x86 CPUs.

Asymmetric grids (``--grid asym``) add MatMulNBits' ``zero_points`` input, stored plain in every
storage (``{layer}.zero_points``, ``edgeq.quant.pack.pack_zero_points``: uint8, two 4-bit zero points a
byte, i.e. 0.5 byte per group next to the 2-byte float16 scale); at 2/3 bits they are ``z · 2^(4−b)``
like the codes.  The native kernel is written without them (refused by the config).

:func:`decode_weight` reads the quantized part of Ŵ back from any of the three.

``--kernel integer`` (DynamicQuantizeMatMul's int8 ``B = qᵀ [K, N]``, |q| ≤ 63): ``plain`` stores B;
``compact`` stores ``u = q + 64`` ∈ [1, 127] (7 bits) over B flattened, in groups of 8 values in 7
bytes ``P [G, 7]`` (``q7``): bytes t < 7 hold u_t in their low 7 bits and bit t of u_7 on top, so::

    u_t = P_t mod 128 (t < 7),   u_7 = Σ_t ⌊P_t / 128⌋ · 2^t,   B = int8(u) − 64

(Div, Mod, MatMulInteger for the 7-term sum, Concat, [Reshape, Slice: padding], Cast, Sub, Reshape, in
uint8/int8: one element operation and one byte per weight per node, where bit planes in int32 take
8 and 4 — ONNX Runtime keeps the folding's intermediates until it finishes, and glibc keeps that
heap), a constant subgraph ONNX Runtime folds at session creation: 7/8 of the bytes, the same int8
B (:func:`integer_weight`, :func:`decode_integer_weight`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgeq.onnx.graph import attr
from edgeq.quant.int4 import QuantizedLinear, zero_point
from edgeq.quant.pack import (
    pack_codes,
    pack_native2,
    pack_planes,
    pack_zero_points,
    unpack_codes,
    unpack_native2,
    unpack_planes,
    unpack_zero_points,
)

STORAGES = ("plain", "compact")
KERNELS = ("int4", "native", "integer")  # native: ORT's own 2-bit MatMulNBits (--bits 2 only); integer:
# DynamicQuantizeMatMul, uint8 dynamic activations x int8 weights (--bits 8 only, edgeq.onnx.integer)
PLANES, SCALES16 = "qplanes", "scales16"  # initializer suffixes of a compact layer
INTEGER_BITS, INTEGER_PACKED = 7, "q7"  # --kernel integer --storage compact: 7 bits a weight (|q| <= 63)

_tensor = numpy_helper.from_array


def check_storage(q: QuantizedLinear, storage: str, kernel: str) -> str | None:
    """Why ``q`` cannot be stored this way, or None."""
    if kernel == "native":
        if q.zero_points is not None:
            return "ONNX Runtime's native 2-bit layout is written here without zero points (asymmetric grid)"
        if q.stored_bits != 2:
            return f"ONNX Runtime's native MatMulNBits kernel is used here for 2 bits only, not {q.stored_bits}"
        return None
    if storage == "compact":
        if q.bits != 4:
            return f"compact storage holds 2-4 bits per weight; this layer has {q.bits}-bit codes"
        if not q.fp16_scales:
            return "compact storage needs a plan with float16 scales (fp16_scales)"
        if q.block_size % 8:
            return f"block size {q.block_size} is not a multiple of 8 (bit planes pack 8 weights a byte)"
    elif q.stored_bits != q.bits:
        return f"{q.stored_bits}-bit codes need compact storage or the native kernel"
    return None


def weight_inputs(layer: str, q: QuantizedLinear, storage: str, kernel: str = "int4"):
    """(B name, scales name, MatMulNBits ``bits``, nodes, initializers) of ``layer``."""
    if storage == "compact" and q.bits == 8:  # --bits8 layers: compact holds 2-4 bits, they stay plain
        storage = "plain"
    reason = check_storage(q, storage, kernel)
    if reason:
        raise ValueError(f"{layer}: {reason}")
    if kernel == "native":
        scales = (q.scales * np.float32(4)).astype(np.float32)
        inits = [_tensor(pack_native2(q.codes, q.block_size), f"{layer}.qweight"), _tensor(scales, f"{layer}.scales")]
        return f"{layer}.qweight", f"{layer}.scales", 2, [], inits
    if storage == "plain":
        inits = [_tensor(pack_codes(q.codes, q.block_size, q.bits), f"{layer}.qweight"),
                 _tensor(q.scales.astype(np.float32), f"{layer}.scales")]
        return f"{layer}.qweight", f"{layer}.scales", q.bits, [], inits
    return _compact(layer, q)


def _compact(layer: str, q: QuantizedLinear):
    b = q.stored_bits
    n, k_in = q.shape
    n_blocks = q.scales.shape[1]
    step = np.float32(2 ** (4 - b))
    s16 = (q.scales * step).astype(np.float16)
    if not np.array_equal(s16.astype(np.float32) / step, q.scales):
        raise ValueError(f"{layer}: scales are not float16 values; plan with fp16_scales")
    p, c = f"/{layer}/unpack", f"{layer}.unpack_"
    const = {
        f"{c}last": np.array([-1], np.int64), f"{c}pow2": (2 ** np.arange(8)).astype(np.int32),
        f"{c}two": np.array(2, np.int32), f"{c}planes_shape": np.array([b, -1], np.int64),
        f"{c}plane_weight": (2 ** (np.arange(b) + 4 - b)).astype(np.int32).reshape(b, 1),
        f"{c}axis0": np.array([0], np.int64), f"{c}pairs_shape": np.array([-1, 2], np.int64),
        f"{c}nibble_weight": np.array([1, 16], np.int32), f"{c}axis1": np.array([1], np.int64),
        f"{c}B_shape": np.array([n, n_blocks, q.block_size // 2], np.int64),
        f"{c}scale_step": np.array(1 / step, np.float32),
    }
    nodes = [
        helper.make_node("Cast", [f"{layer}.{PLANES}"], [f"{p}/planes32"], name=f"{p}/CastPlanes",
                         to=TensorProto.INT32),
        helper.make_node("Unsqueeze", [f"{p}/planes32", f"{c}last"], [f"{p}/planes3d"], name=f"{p}/Unsqueeze"),
        helper.make_node("Div", [f"{p}/planes3d", f"{c}pow2"], [f"{p}/shifted"], name=f"{p}/Shift"),
        helper.make_node("Mod", [f"{p}/shifted", f"{c}two"], [f"{p}/bits"], name=f"{p}/Bit"),
        helper.make_node("Reshape", [f"{p}/bits", f"{c}planes_shape"], [f"{p}/bit_planes"], name=f"{p}/Planes"),
        helper.make_node("Mul", [f"{p}/bit_planes", f"{c}plane_weight"], [f"{p}/weighted"], name=f"{p}/PlaneWeight"),
        helper.make_node("ReduceSum", [f"{p}/weighted", f"{c}axis0"], [f"{p}/codes"], name=f"{p}/Codes", keepdims=0),
        helper.make_node("Reshape", [f"{p}/codes", f"{c}pairs_shape"], [f"{p}/pairs"], name=f"{p}/Pairs"),
        helper.make_node("Mul", [f"{p}/pairs", f"{c}nibble_weight"], [f"{p}/nibbles"], name=f"{p}/Nibbles"),
        helper.make_node("ReduceSum", [f"{p}/nibbles", f"{c}axis1"], [f"{p}/bytes32"], name=f"{p}/Bytes", keepdims=0),
        helper.make_node("Cast", [f"{p}/bytes32"], [f"{p}/bytes"], name=f"{p}/CastBytes", to=TensorProto.UINT8),
        helper.make_node("Reshape", [f"{p}/bytes", f"{c}B_shape"], [f"{p}/B"], name=f"{p}/B"),
        helper.make_node("Cast", [f"{layer}.{SCALES16}"], [f"{p}/scales32"], name=f"{p}/CastScales",
                         to=TensorProto.FLOAT),
        helper.make_node("Mul", [f"{p}/scales32", f"{c}scale_step"], [f"{p}/scales"], name=f"{p}/Scales"),
    ]
    inits = [_tensor(pack_planes(q.codes, q.block_size, b), f"{layer}.{PLANES}"), _tensor(s16, f"{layer}.{SCALES16}")]
    inits += [_tensor(v, k) for k, v in const.items()]
    return f"{p}/B", f"{p}/scales", 4, nodes, inits


def integer_weight(layer: str, b: np.ndarray, storage: str) -> tuple[str, list, list]:
    """(B name, nodes, initializers) of ``layer``'s DynamicQuantizeMatMul int8 ``B [K, N]`` stored ``storage``."""
    if storage == "plain":
        return f"{layer}.qweight", [], [_tensor(np.ascontiguousarray(b, dtype=np.int8), f"{layer}.qweight")]
    offset = 1 << (INTEGER_BITS - 1)
    u = b.astype(np.int16).reshape(-1) + offset
    if storage != "compact" or u.min(initial=0) < 0 or u.max(initial=0) > 127:
        raise ValueError(f"{layer}: {storage} storage of the integer kernel's weights holds |q| <= {offset - 1}")
    g = np.zeros((-(-u.size // 8), 8), np.uint8)
    g.reshape(-1)[: u.size] = u
    packed = g[:, :7] | (((g[:, 7:] >> np.arange(7, dtype=np.uint8)) & 1) << 7)  # 8th value's bits on top
    p, c = f"/{layer}/unpack", f"{layer}.unpack_"
    const = {  # uint8/int8 arithmetic: the folding's intermediates are 1 byte a weight
        f"{c}128": np.array(128, np.uint8), f"{c}pow2": (2 ** np.arange(7)).astype(np.uint8).reshape(7, 1),
        f"{c}offset": np.array(offset, np.int8), f"{c}B_shape": np.array(b.shape, np.int64),
    }
    if b.size % 8:
        const.update({f"{c}start": np.array([0], np.int64), f"{c}size": np.array([b.size], np.int64),
                      f"{c}flat": np.array([-1], np.int64)})
    nodes = [
        helper.make_node("Div", [f"{layer}.{INTEGER_PACKED}", f"{c}128"], [f"{p}/top"], name=f"{p}/Top"),
        helper.make_node("Mod", [f"{layer}.{INTEGER_PACKED}", f"{c}128"], [f"{p}/low"], name=f"{p}/Low"),
        helper.make_node("MatMulInteger", [f"{p}/top", f"{c}pow2"], [f"{p}/eighth32"], name=f"{p}/Eighth"),
        helper.make_node("Cast", [f"{p}/eighth32"], [f"{p}/eighth"], name=f"{p}/CastEighth", to=TensorProto.UINT8),
        helper.make_node("Concat", [f"{p}/low", f"{p}/eighth"], [f"{p}/u"], name=f"{p}/Groups", axis=1),
    ]
    if b.size % 8:  # the last group is padded
        nodes += [helper.make_node("Reshape", [f"{p}/u", f"{c}flat"], [f"{p}/padded"], name=f"{p}/Flat"),
                  helper.make_node("Slice", [f"{p}/padded", f"{c}start", f"{c}size"], [f"{p}/unpadded"],
                                   name=f"{p}/Unpad")]
    nodes += [
        helper.make_node("Cast", [nodes[-1].output[0]], [f"{p}/u8"], name=f"{p}/CastInt8", to=TensorProto.INT8),
        helper.make_node("Sub", [f"{p}/u8", f"{c}offset"], [f"{p}/q8"], name=f"{p}/Offset"),
        helper.make_node("Reshape", [f"{p}/q8", f"{c}B_shape"], [f"{p}/B"], name=f"{p}/B"),
    ]
    inits = [_tensor(packed, f"{layer}.{INTEGER_PACKED}")] + [_tensor(v, k) for k, v in const.items()]
    return f"{p}/B", nodes, inits


def decode_integer_weight(layer: str, b_name: str, names, arr: Callable[[str], np.ndarray]) -> np.ndarray:
    """DynamicQuantizeMatMul's int8 ``B [K, N]`` of ``layer`` (input ``b_name``), from either storage."""
    if f"{layer}.{INTEGER_PACKED}" not in names:
        return arr(b_name)
    packed = arr(f"{layer}.{INTEGER_PACKED}").astype(np.int32)
    shape = tuple(int(d) for d in arr(f"{layer}.unpack_B_shape"))
    eighth = ((packed >> 7) << np.arange(7)).sum(axis=1, keepdims=True)
    u = np.concatenate([packed & 127, eighth], axis=1).reshape(-1)[: int(np.prod(shape))]
    return (u - (1 << (INTEGER_BITS - 1))).astype(np.int8).reshape(shape)


def zero_point_input(layer: str, q: QuantizedLinear) -> tuple[str, onnx.TensorProto] | None:
    """(name, initializer) of ``layer``'s MatMulNBits ``zero_points`` input, or None (symmetric codes)."""
    if q.zero_points is None:
        return None
    return f"{layer}.zero_points", _tensor(pack_zero_points(q.zero_points, q.bits), f"{layer}.zero_points")


def decode_weight(layer: str, node: onnx.NodeProto, names, arr: Callable[[str], np.ndarray]) -> np.ndarray:
    """The quantized part ``(code − zero point) · scale`` ``[N, K]`` of ``layer``'s MatMulNBits ``node``.

    ``names``: the graph's initializer names; ``arr(name)``: that initializer as a numpy array.
    """
    k_in, n, bs, bits = attr(node, "K", 0), attr(node, "N", 0), attr(node, "block_size", 0), attr(node, "bits", 4)
    if f"{layer}.{PLANES}" in names:  # compact: the same arithmetic as the unpack subgraph, in numpy
        planes = arr(f"{layer}.{PLANES}")
        codes = unpack_planes(planes, n, k_in, bs)
        scales = arr(f"{layer}.{SCALES16}").astype(np.float32) / np.float32(2 ** (4 - planes.shape[0]))
    elif bits == 2:
        codes, scales = unpack_native2(arr(node.input[1]), k_in), arr(node.input[2]) / np.float32(4)
        bits = 4
    else:
        codes, scales = unpack_codes(arr(node.input[1]), k_in, bits), arr(node.input[2])
    scales = scales.reshape(n, -1)
    zp = np.float32(zero_point(bits))
    if len(node.input) > 3 and node.input[3]:  # per-group zero points (asymmetric grids)
        z = unpack_zero_points(arr(node.input[3]), n, scales.shape[1], bits)
        zp = np.repeat(z, bs, axis=1)[:, :k_in].astype(np.float32)
    scales = np.repeat(scales, bs, axis=1)[:, :k_in]
    return ((codes.astype(np.float32) - zp) * scales).astype(np.float32)
