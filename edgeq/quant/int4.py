"""Symmetric low-bit (Q4-sym-7; 2/3/8-bit variants) weight quantization with k exact FP32 entries.

For a Linear weight ``W`` of shape ``[N, K]`` (``nn.Linear.weight``: N = out_features,
K = in_features) and a scale group ``G`` (a block of ``block_size`` consecutive inputs of
one row, a whole row, or the whole tensor)::

    s_G  = max_{(i,j) in G, (i,j) not excluded} |W_ij| / 7
    q_ij = clamp(rint(W_ij / s_G), -7, 7)           # half-to-even rounding (np.rint)
    code_ij = q_ij + 8  in [1, 15]                  # MatMulNBits storage, zero point 8
    Ŵ_ij = (code_ij - 8) * s_G                      # what ONNX Runtime computes

The ``k`` salient entries S (flat indices ``i*K + j``) get ``code = 8`` (they contribute
0 to the int4 part) and are carried exactly by the FP32 correction::

    Ŵ = (1 - M) ⊙ s·q + M ⊙ W

"excluded" above is empty by default (the paper's reading: scales see every weight); with
``exclude_salient_from_scale`` the salient entries do not take part in ``s_G`` (SpQR's rule,
ALGORITHMS.md §1.1 rule 4).  A group whose remaining entries are all zero gets ``s_G = 0``.

Grid ``sym8`` (``grid="sym8"``, 4-bit only; ONNX Runtime's own symmetric RTN grid)::

    m_G  = the entry of G with the largest |W_ij| (signed; first in row-major order on ties)
    s_G  = −m_G / 8                                 # exact (power-of-two division); may be negative
    q_ij = clamp(rint(W_ij / s_G), −8, 7),  code_ij = q_ij + 8 in [0, 15]

so the largest entry lands exactly on code 0 (q = −8) and the step is max|W|/8 instead of /7; an
entry of the opposite sign and |W| > 7.5·|s| is clipped to q = 7.  Codes and scales are bit-equal to
``onnxruntime``'s ``quantize_matmul_4bits(..., is_symmetric=True)`` (tested).

8-bit (``bits=8``, Q8-sym-127): the same with ``QMAX = 127`` and zero point 128, codes in
[1, 255] (``q + 128``), salient entries = 128; MatMulNBits ``bits=8`` stores one code per byte.
The 4-bit path is unchanged by this option.  ``reduce_range=True`` (8-bit only, the integer
kernel ``--kernel integer``) narrows the grid to |q| ≤ 63 (``QMAX_REDUCED``, s = max|W|/63; codes
in [65, 191]), ONNX Runtime's ``reduce_range``: uint8 activations × int8 weights accumulate pairs
in int16 on x86 without VNNI (``vpmaddubsw``), and 2·255·63 < 2^15 cannot saturate there.

2 and 3 bits (``bits=2|3``, b bits of storage, run by the 4-bit kernel): the signed-max grid with
``2^b`` levels, then carried exactly by 4-bit codes at a ``2^(4−b)`` times finer scale::

    s_G = −m_G / 2^(b−1),   q_ij = clamp(rint(W_ij / s_G), −2^(b−1), 2^(b−1) − 1)
    code_ij = q_ij · 2^(4−b) + 8,   s4_G = s_G / 2^(4−b)            # (code − 8) · s4 = q · s_G

so the returned codes/scales are ordinary 4-bit MatMulNBits data (``bits=4``) with
``storage_bits=b``: every code is ``u · 2^(4−b)`` for a b-bit ``u = q + 2^(b−1)``, which is what a
compact file stores (``edgeq.quant.pack.pack_planes``).  Both divisions by powers of two are exact.

``fp16_scales=True`` rounds each scale to float16 *before* the codes are computed, so the plan
holds exactly the scales a file storing float16 scales will use (and the codes that go with them).

The grid math (scales, the ``mse`` scale search, the asymmetric ``asym`` grids with per-group zero
points, the 2/3-bit carrying) lives in :mod:`edgeq.quant.grid`; :func:`quantize_rtn` and GPTQ both
call its ``fit``/``quantize_values`` and this module's :func:`assemble`.  With a zero point ``z_G`` per
group (``QuantizedLinear.zero_points``), ``Ŵ_ij = (code_ij − z_G) · s_G`` and salient codes are ``z_G``.

Every granularity is represented exactly by MatMulNBits, whose scales are per (row, block of
``export_block`` inputs): a per-row or per-tensor scale is repeated in every block of the row.
Pure numpy; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeq.quant.grid import (
    BITS,
    BLOCK_SIZES,
    COMPACT_BITS,
    GRIDS,
    QMAX_REDUCED,
    Granularity,
    GridSpec,
    fit,
    quantize_values,
)

__all__ = ["BITS", "BLOCK_SIZES", "COMPACT_BITS", "GRIDS", "QMAX_REDUCED", "Granularity", "GridSpec", "QuantizedLinear",
           "assemble", "quantize_rtn", "qmax", "zero_point"]

QMAX = 7
ZERO_POINT = 8


def qmax(bits: int) -> int:
    """Largest |q| of symmetric ``bits``-bit codes: 7 (int4) or 127 (int8)."""
    return 2 ** (bits - 1) - 1


def zero_point(bits: int) -> int:
    """MatMulNBits' default zero point ``2^(bits-1)``: 8 (int4) or 128 (int8)."""
    return 2 ** (bits - 1)


@dataclass(frozen=True)
class QuantizedLinear:
    """The int4 codes, scales and exact FP32 entries of one Linear weight ``[N, K]``."""

    codes: np.ndarray  # uint8 [N, K], values 1..15 (0..15 with grid sym8; 1..255 at 8 bits), salient = zero point
    scales: np.ndarray  # float32 [N, n_blocks], MatMulNBits layout (blocks along K)
    block_size: int  # MatMulNBits block_size
    salient_index: np.ndarray  # int64 [k], sorted flat indices i*K + j
    salient_values: np.ndarray  # float32 [k], W at those indices (exact)
    bits: int = 4  # MatMulNBits bits of these codes: 4 or 8
    storage_bits: int | None = None  # b when the codes lie on a b-bit grid (2, 3), else None (= bits)
    fp16_scales: bool = False  # scales are float16 values (exactly representable)
    zero_points: np.ndarray | None = None  # uint8 [N, n_blocks] per-group zero points (asym grids), else 2^(bits−1)
    act_cols: np.ndarray | None = None  # int64 sorted input columns kept exact in activation too (integer kernel):
                                        # every entry of them is salient, and x there is zeroed before the int8 path
    smooth: np.ndarray | None = None  # float32 [K] r = 1/s (SmoothQuant, integer kernel): codes/scales are of W / r,
                                      # x is multiplied by r before the int8 path; salient values stay W's own

    @property
    def stored_bits(self) -> int:
        """Bits per weight a compact file needs for these codes."""
        return self.storage_bits or self.bits

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def k(self) -> int:
        return int(self.salient_index.size)

    def zero_point_full(self) -> np.ndarray | int:
        """The zero point of every entry ``[N, K]`` (per group), or the scalar default."""
        if self.zero_points is None:
            return zero_point(self.bits)
        return np.repeat(self.zero_points, self.block_size, axis=1)[:, : self.codes.shape[1]]

    def dequantize_int4(self) -> np.ndarray:
        """The quantized part alone, ``(code - zero point) * scale`` (salient entries contribute 0), times r_j
        when smoothed (``edgeq.quant.integer``: Ŵ in the original coordinates)."""
        n, k_in = self.codes.shape
        scale = np.repeat(self.scales, self.block_size, axis=1)[:, :k_in]
        zp = self.zero_point_full()
        zp = zp.astype(np.float32) if isinstance(zp, np.ndarray) else np.float32(zp)
        w = ((self.codes.astype(np.float32) - zp) * scale).astype(np.float32)
        return w if self.smooth is None else (w * self.smooth[None, :]).astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """Ŵ: the int4 part with the salient entries replaced by their exact FP32 values."""
        w = self.dequantize_int4()
        w.reshape(-1)[self.salient_index] = self.salient_values
        return w


def salient_mask(shape: tuple[int, int], salient_index) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique flat indices, boolean mask ``[N, K]``); ValueError when an index is out of range."""
    n, k_in = shape
    idx = np.unique(np.asarray(salient_index, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= n * k_in):
        raise ValueError(f"salient index out of range for a {n}x{k_in} weight")
    mask = np.zeros(n * k_in, dtype=bool)
    mask[idx] = True
    return idx, mask.reshape(n, k_in)


def assemble(q: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, mask: np.ndarray, block: int,
             spec: GridSpec, idx: np.ndarray, values: np.ndarray, fp16: bool) -> QuantizedLinear:
    """The MatMulNBits form of grid levels ``q [N, K]`` at ``scales`` / ``zeros`` ``[N, n_blocks]`` (grid units).

    Codes ``q·t + zp`` (symmetric) or ``q·t`` with zero points ``z·t`` (asymmetric), scales ``s/t``,
    t = ``spec.step``; salient entries get their group's zero point.  Shared by every quantizer.
    """
    t = spec.step
    if zeros is None:
        codes = (q * t + spec.zero_point).astype(np.uint8)
        codes[mask] = spec.zero_point
        zp = None
    else:
        zp = (zeros * t).astype(np.uint8)
        codes = (q * t).astype(np.uint8)
        codes[mask] = np.repeat(zp, block, axis=1)[:, : q.shape[1]][mask]
    return QuantizedLinear(codes=codes, scales=(scales / np.float32(t)).astype(np.float32), block_size=block,
                           salient_index=idx, salient_values=np.asarray(values, dtype=np.float32),
                           bits=spec.kernel_bits, storage_bits=spec.storage, fp16_scales=fp16, zero_points=zp)


def quantize_rtn(
    weight: np.ndarray,
    salient_index: np.ndarray,
    granularity: Granularity,
    exclude_salient_from_scale: bool = False,
    bits: int = 4,
    grid: str = "sym7",
    fp16_scales: bool = False,
    act: np.ndarray | None = None,
    reduce_range: bool = False,
) -> QuantizedLinear:
    """Round-to-nearest of ``weight [N, K]`` on the ``bits``/``grid`` grid (``edgeq.quant.grid``) keeping
    ``salient_index`` exact; ``act [K]``: the activation weights of the mse grids' error (None: 1);
    ``reduce_range``: the integer kernel's 8-bit grid |q| ≤ ``QMAX_REDUCED`` (module docstring)."""
    spec = GridSpec.make(bits, grid, reduce_range)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k_in = w.shape
    idx, mask = salient_mask(w.shape, salient_index)
    b = granularity.export_block(k_in)
    scales, zeros = fit(w, mask, granularity, spec, exclude_salient_from_scale, fp16_scales, act)
    s_full = np.repeat(scales, b, axis=1)[:, :k_in]
    z_full = np.repeat(zeros, b, axis=1)[:, :k_in] if zeros is not None else None
    q = quantize_values(w, s_full, z_full, spec)
    return assemble(q, scales, zeros, mask, b, spec, idx, w.reshape(-1)[idx].copy(), fp16_scales)
