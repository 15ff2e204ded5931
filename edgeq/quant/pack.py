"""MatMulNBits 4-bit (and 8-bit) packing (com.microsoft, ONNX Runtime).

Input ``B`` of MatMulNBits is uint8 ``[N, n_blocks, block_size / 2]``: row n of the ``[N, K]``
code matrix is stored contiguously along K, zero-padded to ``n_blocks * block_size``; two codes
per byte, the even k in the low nibble and the odd k in the high nibble::

    byte[n, b, t] = code[n, b*bs + 2t] | (code[n, b*bs + 2t + 1] << 4)

Padding positions hold the zero point (8), so padded inputs would contribute 0 either way.

Compact storage of b-bit codes (b = 2, 3, 4; ``edgeq.onnx.compact`` unpacks it in the graph):
the b-bit values ``u = code >> (4 − b)`` of the padded ``[N, n_blocks · block_size]`` code matrix,
flattened row-major, as b **bit planes**, each packed 8 values per byte, the first value in the
lowest bit::

    planes[p, t] = Σ_{i<8} ((u[8t + i] >> p) & 1) << i          # uint8 [b, N·K_pad / 8]

exactly b bits per weight for any b (3 bits included).  ONNX Runtime's own 2-bit MatMulNBits
(``pack_codes(..., bits=2)``) instead packs four 2-bit codes per byte, the even k first:
``byte = u[4t] | u[4t+1] << 2 | u[4t+2] << 4 | u[4t+3] << 6`` with zero point 2.

Per-group zero points (MatMulNBits input ``zero_points``, asymmetric grids), uint8
``[N, ⌈n_blocks · bits / 8⌉]``: at 4 bits two per byte along the blocks of a row, the even block in
the low nibble (a padding nibble, when n_blocks is odd, holds 0); at 8 bits one per byte::

    zp_byte[n, t] = z[n, 2t] | (z[n, 2t + 1] << 4)
"""

from __future__ import annotations

import numpy as np

from edgeq.quant.int4 import ZERO_POINT


def pack_int4(codes: np.ndarray, block_size: int) -> np.ndarray:
    """Pack ``codes`` (uint8 ``[N, K]``, values 0..15) into MatMulNBits ``B``."""
    n, k_in = codes.shape
    if block_size % 2:
        raise ValueError("block_size must be even")
    if codes.size and int(codes.max()) > 15:
        raise ValueError("4-bit codes must lie in 0..15")
    n_blocks = -(-k_in // block_size)
    padded = np.full((n, n_blocks * block_size), ZERO_POINT, dtype=np.uint8)
    padded[:, :k_in] = codes
    packed = padded[:, 0::2] | (padded[:, 1::2] << 4)
    return packed.reshape(n, n_blocks, block_size // 2).astype(np.uint8)


def unpack_int4(packed: np.ndarray, k_in: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: uint8 ``[N, n_blocks, bs/2]`` → codes ``[N, K]``."""
    n = packed.shape[0]
    flat = packed.reshape(n, -1)
    codes = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
    codes[:, 0::2] = flat & 0x0F
    codes[:, 1::2] = flat >> 4
    return codes[:, :k_in]


def pack_codes(codes: np.ndarray, block_size: int, bits: int = 4) -> np.ndarray:
    """MatMulNBits ``B`` for ``bits`` 4 (:func:`pack_int4`) or 8: uint8 ``[N, n_blocks, block_size]``,
    one code per byte, K padded with the zero point 128."""
    if bits == 4:
        return pack_int4(codes, block_size)
    if bits != 8:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    n, k_in = codes.shape
    n_blocks = -(-k_in // block_size)
    padded = np.full((n, n_blocks * block_size), 128, dtype=np.uint8)
    padded[:, :k_in] = codes
    return padded.reshape(n, n_blocks, block_size)


def unpack_codes(packed: np.ndarray, k_in: int, bits: int = 4) -> np.ndarray:
    """Inverse of :func:`pack_codes`."""
    if bits == 4:
        return unpack_int4(packed, k_in)
    return packed.reshape(packed.shape[0], -1)[:, :k_in].astype(np.uint8)


def _padded(codes: np.ndarray, block_size: int, fill: int) -> np.ndarray:
    n, k_in = codes.shape
    padded = np.full((n, -(-k_in // block_size) * block_size), fill, dtype=np.uint8)
    padded[:, :k_in] = codes
    return padded


def pack_planes(codes: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """Compact storage of 4-bit ``codes`` ``[N, K]`` that lie on a ``bits``-bit grid (every code a
    multiple of ``2^(4−bits)``): uint8 bit planes ``[bits, N·K_pad / 8]`` (module docstring)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"compact storage holds 2, 3 or 4 bits per weight, got {bits}")
    if block_size % 8:
        raise ValueError(f"block_size {block_size} is not a multiple of 8: bit planes pack 8 weights per byte")
    shift = 4 - bits
    padded = _padded(codes, block_size, ZERO_POINT)
    if np.any(padded & ((1 << shift) - 1)):
        raise ValueError(f"codes are not on the {bits}-bit grid (multiples of {1 << shift})")
    u = (padded >> shift).reshape(-1)
    return np.stack([np.packbits((u >> p) & 1, bitorder="little") for p in range(bits)]).astype(np.uint8)


def unpack_planes(planes: np.ndarray, n: int, k_in: int, block_size: int) -> np.ndarray:
    """Inverse of :func:`pack_planes`: the 4-bit codes ``[N, K]``."""
    bits = planes.shape[0]
    u = np.zeros(planes.shape[1] * 8, dtype=np.uint8)
    for p in range(bits):
        u |= np.unpackbits(planes[p], bitorder="little") << p
    k_pad = -(-k_in // block_size) * block_size
    return (u.reshape(n, k_pad) << (4 - bits))[:, :k_in].astype(np.uint8)


def pack_native2(codes: np.ndarray, block_size: int) -> np.ndarray:
    """ONNX Runtime's ``bits=2`` MatMulNBits ``B`` (uint8 ``[N, n_blocks, block_size / 4]``, zero point
    2) for 4-bit ``codes`` on the 2-bit grid (``u = code >> 2``)."""
    if block_size % 4:
        raise ValueError(f"block_size {block_size} is not a multiple of 4")
    padded = _padded(codes, block_size, ZERO_POINT)
    if np.any(padded & 3):
        raise ValueError("codes are not on the 2-bit grid (multiples of 4)")
    u = padded >> 2
    packed = u[:, 0::4] | (u[:, 1::4] << 2) | (u[:, 2::4] << 4) | (u[:, 3::4] << 6)
    return packed.reshape(codes.shape[0], -1, block_size // 4).astype(np.uint8)


def unpack_native2(packed: np.ndarray, k_in: int) -> np.ndarray:
    """Inverse of :func:`pack_native2`: the 4-bit codes ``[N, K]`` (``u << 2``)."""
    flat = packed.reshape(packed.shape[0], -1)
    u = np.empty((flat.shape[0], flat.shape[1] * 4), dtype=np.uint8)
    for i in range(4):
        u[:, i::4] = (flat >> (2 * i)) & 3
    return (u[:, :k_in] << 2).astype(np.uint8)


def pack_zero_points(zp: np.ndarray, bits: int = 4) -> np.ndarray:
    """MatMulNBits ``zero_points`` for per-group zero points ``zp`` (uint8 ``[N, n_blocks]``, module docstring)."""
    zp = np.asarray(zp, dtype=np.uint8)
    if bits == 8:
        return zp.copy()
    if bits != 4:
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if zp.size and int(zp.max()) > 15:
        raise ValueError("4-bit zero points must lie in 0..15")
    n, nb = zp.shape
    padded = np.zeros((n, nb + nb % 2), dtype=np.uint8)
    padded[:, :nb] = zp
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def unpack_zero_points(packed: np.ndarray, n: int, n_blocks: int, bits: int = 4) -> np.ndarray:
    """Inverse of :func:`pack_zero_points`: uint8 ``[N, n_blocks]`` (a flat ``packed`` is accepted too)."""
    flat = np.asarray(packed, dtype=np.uint8).reshape(n, -1)
    if bits == 8:
        return flat[:, :n_blocks].copy()
    out = np.empty((n, flat.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = flat & 0x0F
    out[:, 1::2] = flat >> 4
    return out[:, :n_blocks]
