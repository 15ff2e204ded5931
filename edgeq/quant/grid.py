"""The low-bit grids (``--grid``): scale groups, scales, zero points and codes, shared by every quantizer.

A scale group ``G`` is a block of ``block_size`` consecutive inputs of one row, a whole row, or the
whole tensor (:class:`Granularity`).  ``E ⊂ G`` are the entries that take part in the fit: all of
them, minus the salient ones when ``exclude_salient_from_scale``.  With b = ``bits``:

* ``sym7`` (b = 4 or 8; Q4-sym-7 / Q8-sym-127):  ``s = max_E |W| / (2^(b−1) − 1)``,
  ``q = clamp(rint(W/s), −(2^(b−1) − 1), 2^(b−1) − 1)``.
* **signed max** (``sym8`` at 4 bits, ONNX Runtime's grid; every symmetric grid at b = 2, 3):
  ``m`` = the entry of E of largest |W| (signed, first in row-major order on ties),
  ``s = −m / 2^(b−1)``, ``q = clamp(rint(W/s), −2^(b−1), 2^(b−1) − 1)`` (m lands on −2^(b−1)).
* ``mse``: the signed-max grid with the scale shrunk, ``s(α) = −α·m / 2^(b−1)``, α ∈ :data:`ALPHAS`
  (1.00, 0.99, …, 0.50), per group the α minimising the (activation-weighted) squared error::

      err_G(α) = Σ_{(i,j) ∈ G \\ S} a_j · (W_ij − q_ij(α) · s(α))²,    a_j = E[x_j²] (1 without data)

  (HQQ / NNCF scale estimation / AWQ's clip search, on the weight side).  S = the salient entries
  (kept exact, so never part of the error); ties keep the larger α, so α = 1 is the signed-max grid.
* ``asym`` (HQQ/ORT-style min–max with an integer zero point), over ``E ∪ {0}``::

      lo = min(0, min_E W),  hi = max(0, max_E W),  s = (hi − lo) / (2^b − 1)
      z  = clamp(rint(−lo / s), 0, 2^b − 1),   q = clamp(rint(W/s) + z, 0, 2^b − 1),   Ŵ = (q − z)·s

  and ``asym-mse`` searches α on ``(α·lo, α·hi)`` with the same error.
  Including 0 keeps z on the grid, so a salient entry (code = z) contributes exactly 0.

``fp16`` rounds every (candidate) scale to float16 *before* codes, zero points or errors are
computed.  A group whose fitting entries are all zero gets s = 0 and q = 0 (q = z = 0 asym).

**Carrying b = 2, 3 at 4 bits** (MatMulNBits ``bits=4``): with ``t = 2^(4−b)`` the kernel codes are
``q·t + 8`` (symmetric) or ``q·t`` with zero point ``z·t`` (asymmetric) and the kernel scale is
``s / t``; both divisions are exact, so ``(code − zp)·s/t = (q − z)·s``.  8 bits: zero point 128.

Pure numpy; vectorised over groups (one pass per α candidate); no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK_SIZES = (16, 32, 64, 128, 256)  # MatMulNBits CPU fast path (MLAS)
BITS = (2, 3, 4, 8)
COMPACT_BITS = (2, 3)  # stored in b bits, computed by the 4-bit kernel (codes u·2^(4−b))
GRIDS = ("sym7", "sym8", "mse", "asym", "asym-mse")
QMAX_REDUCED = 63  # 8-bit weights of the integer kernel (reduce_range): no int16 saturation on AVX2 (edgeq.quant.int4)
ALPHAS = tuple(1.0 - i / 100 for i in range(51))  # shrink factors of the mse searches, 1.00 first


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
class GridSpec:
    """A validated (bits, grid) pair and the integer levels it implies (module docstring)."""

    bits: int  # 2, 3, 4 or 8 (b)
    name: str  # one of GRIDS
    reduced: bool = False  # 8-bit sym7 narrowed to |q| <= QMAX_REDUCED (the integer kernel's reduce_range)

    @staticmethod
    def make(bits: int, name: str = "sym7", reduced: bool = False) -> GridSpec:
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if name not in GRIDS:
            raise ValueError(f"grid must be one of {GRIDS}, got {name!r}")
        if bits == 8 and name != "sym7":
            raise ValueError(f"grid {name!r} is for 2-4 bits; 8-bit codes use sym7")
        if reduced and bits != 8:
            raise ValueError(f"reduce_range is an 8-bit grid (|q| <= {QMAX_REDUCED}), not {bits} bits")
        return GridSpec(bits, name, bool(reduced))

    @property
    def sym_max(self) -> int:
        """Largest |q| of the sym7 grid: 2^(b−1) − 1, or QMAX_REDUCED when reduced."""
        return QMAX_REDUCED if self.reduced else 2 ** (self.bits - 1) - 1

    @property
    def kernel_bits(self) -> int:
        return 8 if self.bits == 8 else 4

    @property
    def storage(self) -> int | None:
        return self.bits if self.bits in COMPACT_BITS else None

    @property
    def step(self) -> int:
        """4-bit kernel levels per grid level: 2^(4−b) for b = 2, 3, else 1."""
        return 2 ** (4 - self.bits) if self.bits in COMPACT_BITS else 1

    @property
    def asym(self) -> bool:
        return self.name in ("asym", "asym-mse")

    @property
    def search(self) -> bool:
        return self.name in ("mse", "asym-mse")

    @property
    def signed_max(self) -> bool:
        return not self.asym and (self.name != "sym7" or self.bits in COMPACT_BITS)

    @property
    def levels(self) -> tuple[int, int]:
        """(q_lo, q_hi) of the integer grid."""
        if self.asym:
            return 0, 2**self.bits - 1
        h = 2 ** (self.bits - 1)
        return (-h, h - 1) if self.signed_max else (-self.sym_max, self.sym_max)

    @property
    def zero_point(self) -> int:
        """The kernel's symmetric zero point 2^(kernel bits − 1) (8 or 128)."""
        return 2 ** (self.kernel_bits - 1)


def group_view(a: np.ndarray, gran: Granularity, fill=0) -> np.ndarray:
    """``a [N, K]`` as ``[R, G, L]`` scale groups (block: ``[N, n_blocks, block]`` padded with ``fill``)."""
    n, k_in = a.shape
    if gran.kind == "tensor":
        return a.reshape(1, 1, -1)
    if gran.kind == "channel":
        return a[:, None, :]
    b = gran.export_block(k_in)
    nb = -(-k_in // b)
    padded = np.full((n, nb * b), fill, dtype=a.dtype)
    padded[:, :k_in] = a
    return padded.reshape(n, nb, b)


def expand(v: np.ndarray, gran: Granularity, n: int, k_in: int) -> np.ndarray:
    """Per-group values ``[R, G]`` → the MatMulNBits layout ``[N, n_blocks]``."""
    nb = -(-k_in // gran.export_block(k_in))
    if gran.kind == "tensor":
        return np.full((n, nb), v.reshape(-1)[0], dtype=v.dtype)
    if gran.kind == "channel":
        return np.repeat(v.reshape(n, 1), nb, axis=1)
    return v


def _signed_max(g: np.ndarray) -> np.ndarray:
    """The signed entry of largest |g| per group (first on ties): ``[R, G]``."""
    if g.shape[-1] == 0:
        return np.zeros(g.shape[:2], dtype=np.float32)
    return np.take_along_axis(g, np.argmax(np.abs(g), axis=2)[..., None], axis=2)[..., 0]


def _params(base, spec: GridSpec, alpha: float, fp16: bool):
    """(scale, zero point or None) per group for shrink factor ``alpha`` of the base statistics."""
    a = np.float32(alpha)
    if spec.asym:
        lo, hi = base
        lo, hi = (lo * a).astype(np.float32), (hi * a).astype(np.float32)
        s = ((hi - lo) / np.float32(2**spec.bits - 1)).astype(np.float32)
    elif spec.signed_max:
        s = ((base * a) / np.float32(-(2 ** (spec.bits - 1)))).astype(np.float32)
    else:
        s = (np.abs(base) * a / np.float32(spec.sym_max)).astype(np.float32)
    if fp16:
        s = s.astype(np.float16).astype(np.float32)
    if not spec.asym:
        return s, None
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(s != 0, np.rint(-lo / s), 0.0)
    return s, np.clip(z, 0, 2**spec.bits - 1).astype(np.float32)


def quantize_values(w, s, z, spec: GridSpec):
    """Integer levels ``q`` (float array) of ``w`` at scales ``s`` (and zero points ``z``), broadcast alike."""
    lo, hi = spec.levels
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(s != 0, np.rint(w / s), 0.0)
    return np.clip(t + z if z is not None else t, lo, hi)


def fit(w: np.ndarray, mask: np.ndarray, gran: Granularity, spec: GridSpec, exclude_salient: bool = False,
        fp16: bool = False, act: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales ``[N, n_blocks]`` (grid units, float32) and zero points (same shape, or None) of ``w [N, K]``.

    ``mask``: the salient entries; ``act [K]``: the activation weights ``a_j`` of the mse error.
    """
    w = np.asarray(w, dtype=np.float32)
    n, k_in = w.shape
    src = group_view(np.where(mask, np.float32(0), w) if exclude_salient else w, gran)
    if spec.asym:
        base = (np.minimum(src.min(axis=2, initial=0.0), 0).astype(np.float32),
                np.maximum(src.max(axis=2, initial=0.0), 0).astype(np.float32))
    else:
        base = _signed_max(src)
    s, z = _params(base, spec, 1.0, fp16)
    if spec.search:
        s, z = _search(w, mask, gran, spec, base, fp16, act, s, z)
    return expand(s, gran, n, k_in), (expand(z, gran, n, k_in) if z is not None else None)


def _search(w, mask, gran, spec, base, fp16, act, s, z):
    """The α of :data:`ALPHAS` minimising each group's error (ties: the larger α)."""
    wg = group_view(w, gran)
    keep = ~group_view(mask, gran, fill=True)
    a = np.ones(w.shape[1]) if act is None else np.asarray(act, dtype=np.float64)
    weight = group_view(np.broadcast_to(a, w.shape), gran) * keep

    def err(s, z):
        q = quantize_values(wg, s[..., None], None if z is None else z[..., None], spec)
        deq = (q - (z[..., None] if z is not None else 0)) * s[..., None]
        return np.sum(weight * (wg - deq.astype(np.float32)).astype(np.float64) ** 2, axis=2)

    best = err(s, z)
    for alpha in ALPHAS[1:]:
        sa, za = _params(base, spec, alpha, fp16)
        e = err(sa, za)
        better = e < best
        best = np.where(better, e, best)
        s = np.where(better, sa, s)
        if z is not None:
            z = np.where(better, za, z)
    return s, z
