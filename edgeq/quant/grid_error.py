"""The quantization error of a Linear on the plan's own grid as entries are kept exact.

Used by the ``error`` / ``error-act`` saliency methods (:func:`greedy_order`) and by the model-wide
``--budget`` allocation (:func:`order_gains`, then ``edgeq.quant.budget``).

A Linear ``W [N, K]`` is cut into scale groups g (``edgeq.quant.int4``: a block of b inputs of one
row, a row, or the tensor).  A group's scale depends only on its largest remaining entry m_g (the
signed entry of largest |W|, first in row-major order on ties)::

    sym7, 8-bit:      s = |m| / qmax                 qmax = 7 (4-bit) or 127 (8-bit)
    sym8, 2/3-bit:    s = −m / L                     L = 8 (4-bit sym8) or 2^(b−1) (b = 2, 3)
    (fp16 scales:     s ← float16(s))                Q_s(w) = s · clip(rint(w / s), lo, hi)

With column weights a_j ≥ 0 (1: data-free; E[x_j²] over the calibration tokens: the expected squared
output error an error in input j causes, the diagonal of H/2) and R the entries kept exact and
excluded from the scale, a group's error is::

    E_g(R) = Σ_{j ∈ g∖R} a_j (W_j − Q_{s(R)}(W_j))²,     s(R) = the scale of the max over g∖R.

(With the salient entries *inside* the scale, s does not depend on R and keeping j removes just its
own term a_j e_j².)

**Greedy** (:func:`greedy_order`), per group, vectorised over all groups, ``depth`` (default
:data:`GREEDY_DEPTH` = 8) steps: keep exact the entry whose removal most reduces E_g: a non-max entry
j (gain a_j e_j², the scale unchanged) or the scale-defining entry (gain E_g(R) − E_g(R ∪ {m}) with
the scale recomputed from the next largest entry); ties → the lower flat index.  After ``depth``
steps the scale is frozen and the other entries follow by decreasing a_j e_j², which is the greedy
itself as long as no further scale-defining removal would win.  Each group's gains along its
sequence are made non-increasing by a running minimum, and the layer order sorts every entry by
(−gain, place in its group's sequence, flat index): every prefix of the order is, in each group, a
prefix of that group's greedy sequence.  Cost: depth + 1 error evaluations of the whole weight.

**Marginal gains along an order** (:func:`order_gains`): δ(t) = E(t−1) − E(t) as the t-th entry of
any order is kept exact (with or without scale exclusion), group by group; a group is re-evaluated
only when the removed entry defines its scale (cost O(len(order) + changes · b)).

Pure numpy; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from edgeq.quant.int4 import COMPACT_BITS, Granularity, qmax

GREEDY_DEPTH = 8  # greedy removals per scale group before the scale is frozen


@dataclass(frozen=True)
class GridSpec:
    """The grid a plan quantizes a layer on (see ``edgeq.quant.int4.quantize_rtn``)."""

    bits: int = 4
    grid: str = "sym7"
    granularity: Granularity = field(default_factory=lambda: Granularity("block", 32))
    fp16_scales: bool = False

    @property
    def signed(self) -> bool:
        return self.bits in COMPACT_BITS or (self.bits == 4 and self.grid == "sym8")

    @property
    def q_range(self) -> tuple[int, int]:
        if self.signed:
            levels = 2 ** (self.bits - 1) if self.bits in COMPACT_BITS else 8
            return -levels, levels - 1
        return -qmax(self.bits), qmax(self.bits)

    def scale(self, m: np.ndarray) -> np.ndarray:
        """Scales (float32) of groups whose largest remaining entry is ``m`` (signed)."""
        m = np.asarray(m, dtype=np.float32)
        lo, hi = self.q_range
        s = (m / np.float32(lo)) if self.signed else (np.abs(m) / np.float32(hi))
        s = s.astype(np.float32)
        return s.astype(np.float16).astype(np.float32) if self.fp16_scales else s


def _grouped(w: np.ndarray, gran: Granularity, col_weight):
    """(W by group [G, B] float32, flat index [G, B] (−1: padding), column weight [G, B] float64)."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    n, k_in = w.shape
    a = np.ones(k_in) if col_weight is None else np.asarray(col_weight, dtype=np.float64).reshape(-1)
    if a.size != k_in:
        raise ValueError(f"{a.size} column weights for a weight with {k_in} inputs")
    flat = np.arange(w.size, dtype=np.int64).reshape(n, k_in)
    full_a = np.broadcast_to(a[None, :], (n, k_in))
    if gran.kind == "tensor":
        return w.reshape(1, -1), flat.reshape(1, -1), full_a.reshape(1, -1).copy()
    if gran.kind == "channel":
        return w, flat, full_a.copy()
    b = int(gran.block_size)
    nb = -(-k_in // b)
    wp, fp, ap = np.zeros((n, nb * b), np.float32), np.full((n, nb * b), -1, np.int64), np.zeros((n, nb * b))
    wp[:, :k_in], fp[:, :k_in], ap[:, :k_in] = w, flat, full_a
    return wp.reshape(-1, b), fp.reshape(-1, b), ap.reshape(-1, b)


class _Groups:
    """Per-group state: removed entries, the scale-defining entry (``mex``: first non-removed by |W|), errors."""

    def __init__(self, w, spec: GridSpec, col_weight):
        self.spec = spec
        self.wg, self.flat, self.a = _grouped(w, spec.granularity, col_weight)
        g, b = self.wg.shape
        self.valid = self.flat >= 0
        self.sidx = np.argsort(-np.abs(self.wg), axis=1, kind="stable")  # by |W| desc, first on ties
        self.sval = np.take_along_axis(self.wg, self.sidx, axis=1)
        self.rank = np.empty_like(self.sidx)
        np.put_along_axis(self.rank, self.sidx, np.broadcast_to(np.arange(b), (g, b)), axis=1)
        self.removed = ~self.valid  # padding never counts
        self.mex = self.advance(np.zeros(g, np.int64), np.arange(g))
        self.e = self.errors(None, self.mex)
        self.total = self.e.sum(axis=1)

    def advance(self, mex, rows):
        """Move each group's pointer past removed entries (in |W| order)."""
        b = self.wg.shape[1]
        while True:
            m = mex < b
            need = np.zeros(len(rows), bool)
            need[m] = self.removed[rows[m], self.sidx[rows[m], mex[m]]]
            if not need.any():
                return mex
            mex[need] += 1

    def errors(self, rows, mex, removed=None):
        """a_j (W_j − Q_s(W_j))² of the groups ``rows`` (None: all) at the scale set by ``mex`` (0 where removed)."""
        b = self.wg.shape[1]
        every = rows is None  # no gathered copies
        rows = np.arange(len(self.wg)) if every else rows
        m = np.where(mex < b, self.sval[rows, np.minimum(mex, b - 1)], np.float32(0))
        s = self.spec.scale(m)[:, None]
        w = self.wg if every else self.wg[rows]
        lo, hi = self.spec.q_range
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.rint(w / s)
        q[s[:, 0] == 0] = 0.0
        np.clip(q, lo, hi, out=q)
        q *= s
        d = w.astype(np.float64)
        d -= q
        d *= d
        d *= self.a if every else self.a[rows]
        d[(self.removed if every else self.removed[rows]) if removed is None else removed] = 0.0
        return d


def greedy_order(w: np.ndarray, spec: GridSpec, col_weight=None, depth: int = GREEDY_DEPTH):
    """(every flat index of ``w`` in greedy order, its non-increasing gain); see the module docstring."""
    st = _Groups(w, spec, col_weight)
    g, b = st.wg.shape
    rows = np.arange(g)
    steps = min(depth, b)
    picks = np.full((g, steps), -1, np.int64)
    gains = np.full((g, steps), np.inf)
    for d in range(steps):
        alive = st.mex < b
        jmax = st.sidx[rows, np.minimum(st.mex, b - 1)]
        cand = np.where(st.removed, -np.inf, st.e)
        cand[rows, jmax] = -np.inf
        ja = np.argmax(cand, axis=1)
        ga = cand[rows, ja]
        rem2 = st.removed.copy()
        rem2[rows[alive], jmax[alive]] = True
        saved, st.removed = st.removed, rem2
        mex2 = st.advance(st.mex.copy(), rows)
        e2 = st.errors(None, mex2)
        st.removed = saved
        gb = st.total - e2.sum(axis=1)
        take_b = alive & ((gb > ga) | ((gb == ga) & (jmax < ja)))
        take_a = alive & ~take_b
        j = np.where(take_b, jmax, ja)
        picks[alive, d] = j[alive]
        gains[alive, d] = np.where(take_b, gb, ga)[alive]
        ra = rows[take_a]
        st.total[ra] -= st.e[ra, j[ra]]
        st.e[ra, j[ra]] = 0.0
        st.removed[rows[alive], j[alive]] = True
        rb = rows[take_b]
        st.mex[rb], st.e[rb], st.total[rb] = mex2[rb], e2[rb], st.total[rb] - gb[rb]
    # the rest of each group by its own error at the frozen scale
    rest_key = np.where(st.removed, -np.inf, st.e)
    rest = np.argsort(-rest_key, axis=1, kind="stable")
    rest_gain = np.take_along_axis(rest_key, rest, axis=1)
    seq = np.concatenate([picks, rest], axis=1)
    seq_gain = np.concatenate([gains, rest_gain], axis=1)
    ok = np.concatenate([picks >= 0, np.isfinite(rest_gain)], axis=1)
    mono = np.minimum.accumulate(np.where(ok, seq_gain, np.inf), axis=1)
    flat = np.take_along_axis(st.flat, np.where(ok, seq, 0), axis=1)
    # place-major, then group (= flat order across groups): a stable sort by −gain breaks ties by
    # (place in the group's sequence, flat index)
    f, gn = flat.T[ok.T], mono.T[ok.T]
    order = np.argsort(-gn, kind="stable")
    return f[order], gn[order]


def order_gains(w: np.ndarray, order: np.ndarray, spec: GridSpec, exclude_from_scale: bool,
                col_weight=None) -> np.ndarray:
    """δ(t) = E(t−1) − E(t) as ``order[t−1]`` is kept exact, for every entry of ``order`` (float64)."""
    st = _Groups(w, spec, col_weight)
    g, b = st.wg.shape
    pos = np.full(np.asarray(w).size, -1, np.int64)
    pos[st.flat[st.valid]] = np.flatnonzero(st.valid.reshape(-1))
    lin = pos[np.asarray(order, dtype=np.int64)]
    grp, col = lin // b, lin % b
    if not exclude_from_scale:
        return st.e[grp, col].copy()
    by_grp = np.argsort(grp, kind="stable")
    starts = np.searchsorted(grp[by_grp], grp[by_grp], side="left")
    nth = np.empty_like(lin)
    nth[by_grp] = np.arange(lin.size) - starts  # this entry is the nth removal of its group
    by_nth = np.argsort(nth, kind="stable")
    bounds = np.searchsorted(nth[by_nth], np.arange(int(nth.max(initial=-1)) + 2))
    out = np.empty(lin.size)
    for r in range(len(bounds) - 1):
        sel = by_nth[bounds[r]:bounds[r + 1]]
        gg, cc = grp[sel], col[sel]
        change = st.rank[gg, cc] == st.mex[gg]
        keep = sel[~change]
        gk, ck = gg[~change], cc[~change]
        out[keep] = st.e[gk, ck]
        st.total[gk] -= st.e[gk, ck]
        st.e[gk, ck] = 0.0
        st.removed[gg, cc] = True
        gc = gg[change]
        if gc.size:
            st.mex[gc] = st.advance(st.mex[gc].copy(), gc)
            e2 = st.errors(gc, st.mex[gc])
            t2 = e2.sum(axis=1)
            out[sel[change]] = st.total[gc] - t2
            st.e[gc], st.total[gc] = e2, t2
    return out
