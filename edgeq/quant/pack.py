"""MatMulNBits 4-bit (and 8-bit) packing (com.microsoft, ONNX Runtime).

Input ``B`` of MatMulNBits is uint8 ``[N, n_blocks, block_size / 2]``: row n of the ``[N, K]``
code matrix is stored contiguously along K, zero-padded to ``n_blocks * block_size``; two codes
per byte, the even k in the low nibble and the odd k in the high nibble::

    byte[n, b, t] = code[n, b*bs + 2t] | (code[n, b*bs + 2t + 1] << 4)

Padding positions hold the zero point (8), so padded inputs would contribute 0 either way.
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
