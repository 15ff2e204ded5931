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

Every granularity is represented exactly by MatMulNBits, whose scales are per (row, block of
``export_block`` inputs): a per-row or per-tensor scale is repeated in every block of the row.
Pure numpy; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QMAX = 7
QMAX_REDUCED = 63  # 8-bit weights of the integer kernel: no int16 saturation on AVX2 (module docstring)
ZERO_POINT = 8
BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits CPU fast path (MLAS)
BITS = (2, 3, 4, 8)
COMPACT_BITS = (2, 3)  # stored in b bits, computed by the 4-bit kernel (codes u·2^(4−b))
GRIDS = ("sym7", "sym8")  # 4-bit grids: Q4-sym-7 (default, the paper's) and ONNX Runtime's signed /8


def qmax(bits: int) -> int:
    """Largest |q| of symmetric ``bits``-bit codes: 7 (int4) or 127 (int8)."""
    return 2 ** (bits - 1) - 1


def zero_point(bits: int) -> int:
    """MatMulNBits' default zero point ``2^(bits-1)``: 8 (int4) or 128 (int8)."""
    return 2 ** (bits - 1)


@dataclass(frozen=True)
class Granularity:
    """Scale granularity: ``block`` (block_size inputs of one row), ``channel`` or ``tensor``."""

    kind: str
    block_size: int | None = None

    @staticmethod
    def parse(text: str | int) -> Granularity:
        s = str(text).strip().lower()
        if s in ("per-channel", "channel", "per-row"):
            return Granularity("channel")
        if s in ("per-tensor", "tensor"):
            return Granularity("tensor")
        if s.isdigit() and int(s) in BLOCK_SIZES:
            return Granularity("block", int(s))
        raise ValueError(
            f"invalid block size {text!r}: use one of {', '.join(map(str, BLOCK_SIZES))}, "
            "per-channel or per-tensor"
        )

    def __str__(self) -> str:
        return str(self.block_size) if self.kind == "block" else f"per-{self.kind}"

    def export_block(self, k_in: int) -> int:
        """The MatMulNBits ``block_size`` that carries this granularity for K = ``k_in``."""
        if self.kind == "block":
            return int(self.block_size)
        # one scale repeated per block: the largest fast-path block that divides K (fewest
        # repeated scales, no padding); 32 when none does
        for b in reversed(BLOCK_SIZES):
            if k_in % b == 0:
                return b
        return 32


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
    act_cols: np.ndarray | None = None  # int64 sorted input columns kept exact in activation too (integer kernel):
                                        # every entry of them is salient, and x there is zeroed before the int8 path

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

    def dequantize_int4(self) -> np.ndarray:
        """The quantized part alone, ``(code - zero point) * scale`` (salient entries contribute 0)."""
        n, k_in = self.codes.shape
        scale = np.repeat(self.scales, self.block_size, axis=1)[:, :k_in]
        return ((self.codes.astype(np.float32) - zero_point(self.bits)) * scale).astype(np.float32)

    def dequantize(self) -> np.ndarray:
        """Ŵ: the int4 part with the salient entries replaced by their exact FP32 values."""
        w = self.dequantize_int4()
        w.reshape(-1)[self.salient_index] = self.salient_values
        return w


def _group_signed_max(a: np.ndarray, gran: Granularity) -> np.ndarray:
    """The signed entry of largest |a| per scale group (first on ties), in the ``[N, n_blocks]`` layout."""
    n, k_in = a.shape
    b = gran.export_block(k_in)
    n_blocks = -(-k_in // b)
    if gran.kind == "tensor":
        flat = a.reshape(-1)
        return np.full((n, n_blocks), flat[np.argmax(np.abs(flat))] if flat.size else 0.0, dtype=np.float32)
    if gran.kind == "channel":
        picked = a[np.arange(n), np.argmax(np.abs(a), axis=1)]
        return np.repeat(picked[:, None], n_blocks, axis=1).astype(np.float32)
    padded = np.zeros((n, n_blocks * b), dtype=np.float32)
    padded[:, :k_in] = a
    groups = padded.reshape(n, n_blocks, b)
    return np.take_along_axis(groups, np.argmax(np.abs(groups), axis=2)[..., None], axis=2)[..., 0]


def _group_amax(a: np.ndarray, gran: Granularity) -> np.ndarray:
    """max|a| per scale group, broadcast back to ``[N, n_blocks]`` of the export layout."""
    return np.abs(_group_signed_max(a, gran))


def quantize_rtn(
    weight: np.ndarray,
    salient_index: np.ndarray,
    granularity: Granularity,
    exclude_salient_from_scale: bool = False,
    bits: int = 4,
    grid: str = "sym7",
    fp16_scales: bool = False,
    reduce_range: bool = False,
) -> QuantizedLinear:
    """Round-to-nearest Q4-sym-7 (Q8-sym-127 with ``bits=8``; ``grid="sym8"``: ORT's signed /8 grid;
    ``bits=2|3``: the signed-max b-bit grid carried by 4-bit codes) of ``weight [N, K]`` keeping
    ``salient_index`` exact."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    if grid not in GRIDS or (grid == "sym8" and bits != 4):
        raise ValueError(f"grid must be one of {GRIDS} (sym8 only at 4 bits), got {grid!r} at {bits} bits")
    storage = bits if bits in COMPACT_BITS else None
    if storage:  # the b-bit signed-max grid, then the same codes at 4 bits (module docstring)
        bits, grid = 4, "sym8"
    if reduce_range and bits != 8:
        raise ValueError(f"reduce_range is an 8-bit grid (|q| <= {QMAX_REDUCED}), not {bits} bits")
    qm, zp = (QMAX_REDUCED if reduce_range else qmax(bits)), zero_point(bits)
    w = np.ascontiguousarray(weight, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {w.shape}")
    n, k_in = w.shape
    idx = np.unique(np.asarray(salient_index, dtype=np.int64))
    if idx.size and (idx[0] < 0 or idx[-1] >= w.size):
        raise ValueError(f"salient index out of range for a {n}x{k_in} weight")
    mask = np.zeros(w.size, dtype=bool)
    mask[idx] = True
    mask = mask.reshape(n, k_in)

    absw = np.abs(w)
    if exclude_salient_from_scale:
        absw = np.where(mask, np.float32(0), absw)
    b = granularity.export_block(k_in)
    step = 2 ** (4 - storage) if storage else 1  # 4-bit levels per b-bit level
    if grid == "sym8":
        signed = np.where(mask, np.float32(0), w) if exclude_salient_from_scale else w
        levels = 2 ** (storage - 1) if storage else 8
        scales = (_group_signed_max(signed, granularity) / np.float32(-levels)).astype(np.float32)
        q_lo, q_hi = -levels, levels - 1
    else:
        scales = (_group_amax(absw, granularity) / np.float32(qm)).astype(np.float32)
        q_lo, q_hi = -qm, qm
    if fp16_scales:
        scales = scales.astype(np.float16).astype(np.float32)

    s_full = np.repeat(scales, b, axis=1)[:, :k_in]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s_full != 0, np.rint(w / s_full), 0.0)
    q = np.clip(q, q_lo, q_hi)
    codes = (q * step + zp).astype(np.uint8)
    scales = (scales / np.float32(step)).astype(np.float32)
    codes[mask] = zp
    return QuantizedLinear(
        codes=codes,
        scales=scales,
        block_size=b,
        salient_index=idx,
        salient_values=w.reshape(-1)[idx].copy(),
        bits=bits,
        storage_bits=storage,
        fp16_scales=fp16_scales,
    )
