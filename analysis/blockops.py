"""The block operations of a pass: each computes its partial result on columns ``[a, b)`` of
one slab (:class:`analysis.slabs.SlabData`).

An op's row fields are positions in the slab's grad rows (``g``, ``ga``, ``gb``) or weight rows
(``w``, ``w2``, ``ref_w``), never store rows (the engine translates, :mod:`analysis.engine`).
Every op has ``key`` (its result's name), ``shape()`` (of one partial result) and
``partial(data, a, b)`` (a float64 array of that shape). The row-wise ops (:data:`ROW_WISE`:
each item combines one row with one partner row or with a reference) also say which rows each
item needs (``pool_keys``) and how to restrict themselves to a row block (``in_block``), for
:mod:`analysis.rowblocks`.

Exactness: products are accumulated in float64 (float32 data cast to float64 in cache-sized
column blocks for the Gram, or inside the fused row kernels of :mod:`analysis.kernels` for pair
dots, sign pairs and distances), except for ``precision="float32"`` Gram matrices (float32 BLAS
per block, float64 across blocks). Sign counts use float32 BLAS on {-1, 0, 1} matrices, which is
exact: every partial count is an integer below 2**24.

Work arrays come from the one buffer pool of :func:`analysis.slabs.buffer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from analysis import kernels
from analysis.slabs import SlabData, as_index, buffer

#: Columns cast to float64 at a time inside a slab (keeps the float64 copy in cache/small).
BLOCK_BYTES = 16 * 2**20
#: Columns per chunk when a reference made of store rows (``coef @ weight[rows]``) is formed,
#: and per step of the direction op :class:`RefDir`.
ROW_CHUNK = 2**16


def _col_blocks(lo: int, hi: int, nrows: int, itemsize: int = 8):
    step = max(256, BLOCK_BYTES // max(1, nrows * itemsize))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def _as64(x: np.ndarray, name: str) -> np.ndarray:
    buf = buffer(name, x.shape, np.float64)
    np.copyto(buf, x)
    return buf


def ref_chunks(a: int, b: int):
    """The fixed column chunks ``[c0, c1)`` of ``[a, b)`` in which a reference made of store rows
    is formed (the same with or without row blocks, so a block's value is the unblocked one)."""
    step = max(1024, ROW_CHUNK)
    for c0 in range(a, b, step):
        yield c0, min(b, c0 + step)


def _reference(data: SlabData, ref: int, ref_w: np.ndarray, coef: np.ndarray, a: int, b: int) -> np.ndarray:
    """The reference over the slab columns ``[a, b)``: explicit reference ``ref``, or (``ref < 0``)
    ``coef @ weight[ref_w]`` formed in float64 in :func:`ref_chunks` (as
    :func:`analysis.rowblocks.ref_vectors` forms it once per slab for row blocks)."""
    if ref >= 0:
        return data.refs[ref][a:b]
    r = buffer("ref_vec", (b - a,), np.float64)
    for c0, c1 in ref_chunks(a, b):
        r[c0 - a: c1 - a] = coef @ _as64(data.weight[ref_w, c0:c1], "ref_rows")
    return r


def _signs(data: SlabData, rows, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(S, N)``: float32 sign matrix in {-1, 0, 1} and nonzero matrix in {0, 1}."""
    if data.space == "bits":
        neg, nz = data.neg[rows, a:b], data.nz[rows, a:b]
        n = buffer("sign_n", neg.shape, np.float32)
        np.copyto(n, nz)
        s = buffer("sign_s", neg.shape, np.float32)
        np.multiply(neg, np.float32(-2.0), out=s, casting="unsafe")
        s += n
        return s, n
    x = data.grad[rows, a:b]
    s = buffer("sign_s", x.shape, np.float32)
    np.sign(x, out=s)
    n = buffer("sign_n", x.shape, np.float32)
    np.abs(s, out=n)
    return s, n


@dataclass(frozen=True)
class Gram:
    key: str
    g: np.ndarray
    precision: str

    def shape(self):
        return (len(self.g), len(self.g))

    def partial(self, data, a, b):
        rows = as_index(self.g)
        out = np.zeros(self.shape())
        for c0, c1 in _col_blocks(a, b, len(self.g), 8 if self.precision == "float64" else 4):
            x = data.grad[rows, c0:c1]
            if self.precision == "float64":
                x = _as64(x, "gram")
                out += x @ x.T  # numpy calls the symmetric rank-k update (syrk) for x @ x.T
            else:  # float32 products of a block, summed in float64 across blocks
                out += x @ x.T
        return out


def _runs(ia: np.ndarray, ib: np.ndarray):
    """Split pairs (ia[k], ib[k]) into runs where both advance by 1: ``(k0, k1, sa, sb)`` with
    slices ``sa``, ``sb`` (views, no copies) covering pairs k0..k1-1."""
    k, n = 0, len(ia)
    while k < n:
        e = k + 1
        while e < n and ia[e] == ia[e - 1] + 1 and ib[e] == ib[e - 1] + 1:
            e += 1
        yield k, e, slice(int(ia[k]), int(ia[e - 1]) + 1), slice(int(ib[k]), int(ib[e - 1]) + 1)
        k = e


@dataclass(frozen=True)
class PairDots:
    key: str
    ga: np.ndarray
    gb: np.ndarray
    # In a row block (see analysis.rowblocks): positions of these pairs in the whole result of
    # n_out pairs (each pair is one sweep over the slab's columns, in a block as unblocked).
    out: np.ndarray | None = None
    n_out: int = 0

    def shape(self):
        return (len(self.ga),)

    def pool_keys(self, ng: int) -> tuple[np.ndarray, np.ndarray]:
        """Each item's two rows as keys of the pass's row pool: grad position p is key p,
        weight position q is key ``ng + q`` (``ng``: the pass's grad rows)."""
        return np.asarray(self.ga, np.int64), np.asarray(self.gb, np.int64)

    def in_block(self, idx: np.ndarray, gpos: np.ndarray, wpos: np.ndarray, ng: int, ref: dict):
        """The op's items ``idx`` in a row block that holds the grad rows ``gpos`` and weight
        rows ``wpos`` (positions in the whole pass), placed at ``idx`` of the whole result."""
        return dataclasses.replace(self, ga=np.searchsorted(gpos, self.ga[idx]), gb=np.searchsorted(gpos, self.gb[idx]),
                                   out=idx, n_out=len(self.ga))

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        kernels.pair_dots(data.grad, self.ga, self.gb, a, b, out)  # fused cast and product
        return out


@dataclass(frozen=True)
class SignGram:
    """``[disagree, both_nonzero]`` counts for every pair of the rows, shape (2, n, n)."""

    key: str
    g: np.ndarray

    def shape(self):
        return (2, len(self.g), len(self.g))

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        rows = as_index(self.g)
        for c0, c1 in _col_blocks(a, b, 2 * len(self.g), 4):
            s, n = _signs(data, rows, c0, c1)
            ss = (s @ s.T).astype(np.float64)  # agree - disagree, exact integers < 2**24
            nn = (n @ n.T).astype(np.float64)  # both nonzero
            out[0] += (nn - ss) / 2.0
            out[1] += nn
        return out


@dataclass(frozen=True)
class SignPairs:
    key: str
    ga: np.ndarray
    gb: np.ndarray
    out: np.ndarray | None = None  # as in PairDots
    n_out: int = 0
    # in a row block: the grad rows of the whole pass, so that the "bits" space's column
    # blocks are the unblocked ones
    col_rows: int = 0

    def shape(self):
        return (2, len(self.ga))

    pool_keys = PairDots.pool_keys

    def in_block(self, idx: np.ndarray, gpos: np.ndarray, wpos: np.ndarray, ng: int, ref: dict):
        """As :meth:`PairDots.in_block`; the block keeps the pass's column blocks (``col_rows``)."""
        return dataclasses.replace(self, ga=np.searchsorted(gpos, self.ga[idx]), gb=np.searchsorted(gpos, self.gb[idx]),
                                   out=idx, n_out=len(self.ga), col_rows=ng)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        if data.space != "bits":  # float rows: one fused counting sweep per pair
            kernels.sign_pairs(data.grad, self.ga, self.gb, a, b, out)
            return out
        runs = list(_runs(self.ga, self.gb))
        for c0, c1 in _col_blocks(a, b, 2 * (self.col_rows or data.n_grad), 4):
            s, n = _signs(data, slice(None), c0, c1)
            for k0, k1, sa, sb in runs:  # float32 sums of +-1/0: exact integers < 2**24
                ss = np.einsum("ij,ij->i", s[sa], s[sb]).astype(np.float64)
                nn = np.einsum("ij,ij->i", n[sa], n[sb]).astype(np.float64)
                out[0, k0:k1] += (nn - ss) / 2.0
                out[1, k0:k1] += nn
        return out


@dataclass(frozen=True)
class RefDist:
    """``[||w_t - r||^2, <G_t, w_t - r>]`` for each requested step, shape (2, n).

    Computed directly from the data (no ``||w||^2 - 2<w,r> + ||r||^2`` cancellation): the
    difference of float32 weights and a float64 reference is formed in float64.
    """

    key: str
    g: np.ndarray
    w: np.ndarray
    ref: int  # index into the slab's explicit references, or -1: rows `ref_w` with `coef`
    ref_w: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))
    out: np.ndarray | None = None  # as in PairDots
    n_out: int = 0

    def shape(self):
        return (2, len(self.w))

    def pool_keys(self, ng: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`PairDots.pool_keys`: the grad row and the weight row of each step."""
        return np.asarray(self.g, np.int64), ng + np.asarray(self.w, np.int64)

    def in_block(self, idx: np.ndarray, gpos: np.ndarray, wpos: np.ndarray, ng: int, ref: dict):
        """As :meth:`PairDots.in_block`; ``ref`` replaces the reference fields (the block reads
        a reference made of store rows, formed once per slab, as an explicit one)."""
        return dataclasses.replace(self, g=np.searchsorted(gpos, self.g[idx]), w=np.searchsorted(wpos, self.w[idx]),
                                   out=idx, n_out=len(self.w), **ref)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        r = _reference(data, self.ref, self.ref_w, self.coef, a, b)
        # one fused sweep per row: difference, square and product in float64 (analysis.kernels)
        kernels.ref_dist(data.weight, data.grad, self.w, self.g, r, a, b, out)
        return out


@dataclass(frozen=True)
class RefDir:
    """``[||w_t - r||^2, <v_t, w_t - r>, ||v_t||^2]`` for each requested step, shape (3, n),
    for a direction ``v_t`` other than the stored gradient (dense "param" space only):

    * ``lam >= 0``: ``v_t = G_t + lam_vec * w_t`` (``lam_vec``: explicit reference ``lam``,
      the weight decay of each column's tensor), "gradient + weight decay";
    * ``lam < 0``: ``v_t = w_t - w_{t'}`` with ``w_{t'}`` the weight row ``w2`` (the next
      step's weights), the update (the caller divides by the learning rate).

    Everything is formed per entry in float64 (no cancellation of stored norms). Row-wise:
    :func:`analysis.rowblocks.row_blocks` may cut its rows into blocks like :class:`RefDist`'s.
    """

    key: str
    w: np.ndarray
    g: np.ndarray
    w2: np.ndarray
    lam: int
    ref: int
    ref_w: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))
    out: np.ndarray | None = None  # as in PairDots
    n_out: int = 0

    def shape(self):
        return (3, len(self.w))

    def partner(self) -> tuple[np.ndarray, bool]:
        """Positions of each item's second row and whether they are weight rows."""
        return (self.g, False) if self.lam >= 0 else (self.w2, True)

    def pool_keys(self, ng: int) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`PairDots.pool_keys`: the weight row and the partner row of each step."""
        other, is_w = self.partner()
        return ng + np.asarray(self.w, np.int64), (ng if is_w else 0) + np.asarray(other, np.int64)

    def in_block(self, idx: np.ndarray, gpos: np.ndarray, wpos: np.ndarray, ng: int, ref: dict):
        """As :meth:`RefDist.in_block`."""
        part = ({"g": np.searchsorted(gpos, self.g[idx])} if self.lam >= 0
                else {"w2": np.searchsorted(wpos, self.w2[idx])})
        return dataclasses.replace(self, w=np.searchsorted(wpos, self.w[idx]), out=idx, n_out=len(self.w),
                                   **part, **ref)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        r = _reference(data, self.ref, self.ref_w, self.coef, a, b)
        # one item (row) at a time in fixed column chunks: an item's sums do not depend on
        # which other rows share the slab (a row block gives the unblocked value)
        for c0, c1 in ref_chunks(a, b):
            rr = r[c0 - a: c1 - a]
            lam = data.refs[self.lam][c0:c1] if self.lam >= 0 else None
            for k in range(len(self.w)):
                x = _as64(data.weight[self.w[k], c0:c1], "dir_x")
                diff = buffer("dir_d", x.shape, np.float64)
                np.subtract(x, rr, out=diff)
                v = buffer("dir_v", x.shape, np.float64)
                if lam is not None:
                    np.multiply(lam, x, out=v)
                    v += data.grad[self.g[k], c0:c1]
                else:
                    np.subtract(x, data.weight[self.w2[k], c0:c1], out=v)
                out[0, k] += np.dot(diff, diff)
                out[1, k] += np.dot(v, diff)
                out[2, k] += np.dot(v, v)
        return out


@dataclass(frozen=True)
class IndexGram:
    """Products of the stacked rows ``X = [G_g; W_w - a]`` (float64): ``X X[cols]^T``, shape
    ``(n, len(cols))`` with ``n = len(g) + len(w)``; ``cols=None`` gives the symmetric ``X X^T``.

    One product yields the three blocks of the query index (``analysis.index``): ``G G^T``,
    ``G V^T`` and ``V V^T`` with ``V = W - a``, ``a`` the explicit reference ``anchor`` (or 0
    when -1). Each float32 value is cast to float64 (exact), and ``w - a`` of a float32 weight
    and the float64 anchor (itself a float32 row) is formed in float64.
    """

    key: str
    g: np.ndarray
    w: np.ndarray
    cols: np.ndarray | None = None
    anchor: int = -1

    def shape(self):
        n = len(self.g) + len(self.w)
        return (n, n if self.cols is None else len(self.cols))

    def partial(self, data, a, b):
        ng, n = len(self.g), len(self.g) + len(self.w)
        out = np.zeros(self.shape())
        gi, wi = as_index(self.g), as_index(self.w)
        for c0, c1 in _col_blocks(a, b, n, 8):
            x = buffer("igram", (n, c1 - c0), np.float64)
            if ng:
                np.copyto(x[:ng], data.grad[gi, c0:c1])
            if n > ng:
                np.copyto(x[ng:], data.weight[wi, c0:c1])
                if self.anchor >= 0:
                    x[ng:] -= data.refs[self.anchor][c0:c1]
            out += x @ x.T if self.cols is None else x @ x[self.cols].T
        return out


@dataclass(frozen=True)
class IndexSigns:
    """``[disagree, both_nonzero]`` counts of the rows ``g`` against the rows ``g[cols]``,
    shape ``(2, n, len(cols))`` (``cols=None``: all, as :class:`SignGram`)."""

    key: str
    g: np.ndarray
    cols: np.ndarray | None = None

    def shape(self):
        n = len(self.g)
        return (2, n, n if self.cols is None else len(self.cols))

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        rows = as_index(self.g)
        for c0, c1 in _col_blocks(a, b, 2 * len(self.g), 4):
            s, n = _signs(data, rows, c0, c1)
            sc, nc = (s, n) if self.cols is None else (s[self.cols], n[self.cols])
            ss = (s @ sc.T).astype(np.float64)  # agree - disagree, exact integers < 2**24
            nn = (n @ nc.T).astype(np.float64)  # both nonzero
            out[0] += (nn - ss) / 2.0
            out[1] += nn
        return out


#: Rows per block of the banded index products (a block is multiplied with itself and the
#: ``band`` rows before it).
BAND_BLOCK = 64


def _band_blocks(m: int, first: int, band: int):
    """Row blocks of rows ``first..m-1`` for banded products: ``(i0, i1, j0, dst, src)`` where
    the block's product ``P = X[i0:i1] @ Y[j0:i1].T`` gives ``out[dst] = P[src]``, ``dst`` and
    ``src`` index pairs for every row i of the block and lag l = 0..band with ``i - l >= 0``."""
    blk = max(BAND_BLOCK, band)
    lags = np.arange(band + 1)[None, :]
    for i0 in range(first, m, blk):
        i1 = min(m, i0 + blk)
        j0 = max(0, i0 - band)
        ii = np.arange(i0, i1)[:, None] + 0 * lags
        jj = ii - lags
        ok = jj >= 0
        dst = ((ii - first)[ok], (lags + 0 * ii)[ok])
        src = ((ii - i0)[ok], (jj - j0)[ok])
        yield i0, i1, j0, dst, src


@dataclass(frozen=True)
class IndexBand:
    """The banded index: ``out[k, i, l] = <X_i, Y_{i-l}>`` for the pairs (X, Y) = (G, G), (G, V),
    (V, G), (V, V) (k = 0..3; ``V = W - a`` as in :class:`IndexGram`), rows i = first..m-1 of
    the positions ``p`` (store rows in order, each with a grad and a weight row), lags
    l = 0..band; shape ``(4, m - first, band + 1)``, 0 where ``i - l < 0``. Without grad
    (weight) rows only k = 3 (k = 0) is computed."""

    key: str
    p: np.ndarray
    first: int
    band: int
    with_grad: bool = True
    with_weight: bool = True
    anchor: int = -1

    def shape(self):
        return (4, len(self.p) - self.first, self.band + 1)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        m, rows = len(self.p), as_index(self.p)
        for c0, c1 in _col_blocks(a, b, 2 * m, 8):
            g = _as64(data.grad[rows, c0:c1], "band_g") if self.with_grad else None
            w = _as64(data.weight[rows, c0:c1], "band_w") if self.with_weight else None
            if w is not None and self.anchor >= 0:
                w -= data.refs[self.anchor][c0:c1]
            for i0, i1, j0, dst, src in _band_blocks(m, self.first, self.band):
                for k, x, y in ((0, g, g), (1, g, w), (2, w, g), (3, w, w)):
                    if x is None or y is None:
                        continue
                    out[k][dst] += (x[i0:i1] @ y[j0:i1].T)[src]
        return out


@dataclass(frozen=True)
class IndexSignBand:
    """Banded ``[disagree, both_nonzero]`` counts: ``out[:, i, l]`` for rows ``g[i]`` and
    ``g[i - l]``, i = first..m-1, l = 0..band; shape ``(2, m - first, band + 1)``."""

    key: str
    g: np.ndarray
    first: int
    band: int

    def shape(self):
        return (2, len(self.g) - self.first, self.band + 1)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        m, rows = len(self.g), as_index(self.g)
        for c0, c1 in _col_blocks(a, b, 2 * m, 4):
            s, n = _signs(data, rows, c0, c1)
            for i0, i1, j0, dst, src in _band_blocks(m, self.first, self.band):
                ss = (s[i0:i1] @ s[j0:i1].T).astype(np.float64)  # exact integers < 2**24
                nn = (n[i0:i1] @ n[j0:i1].T).astype(np.float64)
                out[0][dst] += ((nn - ss) / 2.0)[src]
                out[1][dst] += nn[src]
        return out


#: The ops whose items each combine one row with one partner row or with a reference: a pass
#: made of these alone may be cut into row blocks (:mod:`analysis.rowblocks`).
ROW_WISE = (PairDots, SignPairs, RefDist, RefDir)
