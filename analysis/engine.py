"""One pass over parameter slabs that accumulates every requested product at once.

A :class:`Pass` collects requests (Gram matrix of a step selection, dot products of step
pairs, sign counts, distances and dot products against reference points), then reads the
store once, slab by slab along the parameter axis, and sums the per-slab partial results with
a tree reduction. Each slab is one dask task: it reads the rows it needs for its columns
(aligned to the storage chunks), computes every partial result, and returns a few small
arrays. Memory is bounded by a few slabs (``SLAB_BYTES`` each), never by T x d.

When all the rows of even one chunk-wide slab exceed ``SLAB_BYTES`` (many steps), a pass whose
requests are all row-wise (pair dots, sign pairs, distances to a reference: each combines a
row with one partner row or the reference) keeps its slabs one chunk wide and cuts the rows
into blocks, one task each (every chunk is decoded once, the partner rows past a block's end
twice); the blocks of a slab are put together before the reduction over slabs, so every
result is exactly the unblocked one. Gram-type requests need all rows together: their slabs
become a fraction of a chunk instead (each chunk decoded more than once).

Exactness: products are accumulated in float64 (float32 data cast to float64 in cache-sized
column blocks for the Gram, or inside the fused row kernels of :mod:`analysis.kernels` for
pair dots, sign pairs and distances; no float32 rounding anywhere), except for
``precision="float32"`` Gram matrices (float32 BLAS per block, float64 across blocks: faster, about 1e-7 relative error).
Sign counts use float32 BLAS on {-1, 0, 1} matrices, which is exact: every partial count is an
integer below 2**24.

The graph runs on the threaded scheduler by default and unchanged on a ``dask.distributed``
client (tasks carry :class:`analysis.store.ArrayRef` handles, which each worker opens itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import sys
import threading
from dataclasses import dataclass, field

import numpy as np

from analysis import format as fmt
from analysis import kernels
from analysis.slabs import SlabData, SpaceSpec, as_index
from analysis.store import ParamGroup, Run

#: Target bytes of raw data read per slab task (several slabs are in flight at once).
SLAB_BYTES = 128 * 2**20
#: Columns cast to float64 at a time inside a slab (keeps the float64 copy in cache/small).
BLOCK_BYTES = 16 * 2**20
#: A pass that reads more than this shows a progress bar when ``progress=None`` and stderr is a TTY.
AUTO_PROGRESS_BYTES = 4 * 2**30
#: Columns per chunk when a reference made of store rows (``coef @ weight[rows]``) is formed.
ROW_CHUNK = 2**16
MAX_SLAB_COLS = 2**22
#: A slab one storage chunk wide may hold up to this many bytes (rows x chunk x arrays): a
#: narrower slab would decode every chunk more than once (2x the decode work at half a chunk).
CHUNK_SLAB_BYTES = 2**30
MIN_SLAB_COLS = 1024

SPACES = ("param", "sketch", "bits")

_tls = threading.local()


def _buffer(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """A reusable per-thread scratch array (avoids page-faulting fresh memory every slab)."""
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = {}
    need = int(np.prod(shape))
    buf = pool.get((name, np.dtype(dtype).str))
    if buf is None or buf.size < need:
        buf = pool[(name, np.dtype(dtype).str)] = np.empty(need, dtype=dtype)
    return buf[:need].reshape(shape)


def _col_blocks(lo: int, hi: int, nrows: int, itemsize: int = 8):
    step = max(256, BLOCK_BYTES // max(1, nrows * itemsize))
    for a in range(lo, hi, step):
        yield a, min(hi, a + step)


def _as64(x: np.ndarray, name: str) -> np.ndarray:
    buf = _buffer(name, x.shape, np.float64)
    np.copyto(buf, x)
    return buf


def _signs(data: "SlabData", rows, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    """``(S, N)``: float32 sign matrix in {-1, 0, 1} and nonzero matrix in {0, 1}."""
    if data.space == "bits":
        neg, nz = data.neg[rows, a:b], data.nz[rows, a:b]
        n = _buffer("sign_n", neg.shape, np.float32)
        np.copyto(n, nz)
        s = _buffer("sign_s", neg.shape, np.float32)
        np.multiply(neg, np.float32(-2.0), out=s, casting="unsafe")
        s += n
        return s, n
    x = data.grad[rows, a:b]
    s = _buffer("sign_s", x.shape, np.float32)
    np.sign(x, out=s)
    n = _buffer("sign_n", x.shape, np.float32)
    np.abs(s, out=n)
    return s, n


# ----------------------------------------------------------------------------------- ops
# Each op computes its partial result on columns [a, b) of a slab. Positions index the
# slab's grad rows (``g``) or weight rows (``w``).


@dataclass(frozen=True)
class _Gram:
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
class _PairDots:
    key: str
    ga: np.ndarray
    gb: np.ndarray
    # In a row block (see _row_blocks): positions of these pairs in the whole result of
    # n_out pairs (each pair is one sweep over the slab's columns, in a block as unblocked).
    out: np.ndarray | None = None
    n_out: int = 0

    def shape(self):
        return (len(self.ga),)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        kernels.pair_dots(data.grad, self.ga, self.gb, a, b, out)  # fused cast and product
        return out


@dataclass(frozen=True)
class _SignGram:
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
class _SignPairs:
    key: str
    ga: np.ndarray
    gb: np.ndarray
    out: np.ndarray | None = None  # as in _PairDots
    n_out: int = 0
    # in a row block: the grad rows of the whole pass, so that the "bits" space's column
    # blocks are the unblocked ones
    col_rows: int = 0

    def shape(self):
        return (2, len(self.ga))

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
class _RefDist:
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
    out: np.ndarray | None = None  # as in _PairDots
    n_out: int = 0

    def shape(self):
        return (2, len(self.w))

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        if self.ref >= 0:
            r = data.refs[self.ref][a:b]
        else:  # formed in the same column chunks as _ref_vectors does for a row block
            r = _buffer("ref_vec", (b - a,), np.float64)
            step = max(1024, ROW_CHUNK)
            for c0 in range(a, b, step):
                c1 = min(b, c0 + step)
                r[c0 - a: c1 - a] = self.coef @ _as64(data.weight[self.ref_w, c0:c1], "ref_rows")
        # one fused sweep per row: difference, square and product in float64 (analysis.kernels)
        kernels.ref_dist(data.weight, data.grad, self.w, self.g, r, a, b, out)
        return out


@dataclass(frozen=True)
class _RefDir:
    """``[||w_t - r||^2, <v_t, w_t - r>, ||v_t||^2]`` for each requested step, shape (3, n),
    for a direction ``v_t`` other than the stored gradient (dense "param" space only):

    * ``lam >= 0``: ``v_t = G_t + lam_vec * w_t`` (``lam_vec``: explicit reference ``lam``,
      the weight decay of each column's tensor), "gradient + weight decay";
    * ``lam < 0``: ``v_t = w_t - w_{t'}`` with ``w_{t'}`` the weight row ``w2`` (the next
      step's weights), the update (the caller divides by the learning rate).

    Everything is formed per entry in float64 (no cancellation of stored norms). Row-wise:
    :func:`_row_blocks` may cut its rows into blocks like :class:`_RefDist`'s.
    """

    key: str
    w: np.ndarray
    g: np.ndarray
    w2: np.ndarray
    lam: int
    ref: int
    ref_w: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))
    out: np.ndarray | None = None  # as in _PairDots
    n_out: int = 0

    def shape(self):
        return (3, len(self.w))

    def partner(self) -> tuple[np.ndarray, bool]:
        """Positions of each item's second row and whether they are weight rows."""
        return (self.g, False) if self.lam >= 0 else (self.w2, True)

    def partial(self, data, a, b):
        out = np.zeros(self.shape())
        if self.ref >= 0:
            r = data.refs[self.ref][a:b]
        else:  # the same column chunks as _RefDist and _ref_vectors (a row block's reference)
            r = np.empty(b - a)
            step = max(1024, ROW_CHUNK)
            for c0 in range(a, b, step):
                c1 = min(b, c0 + step)
                r[c0 - a: c1 - a] = self.coef @ _as64(data.weight[self.ref_w, c0:c1], "ref_rows")
        # one item (row) at a time in fixed column chunks: an item's sums do not depend on
        # which other rows share the slab (a row block gives the unblocked value)
        step = max(1024, ROW_CHUNK)
        for c0 in range(a, b, step):
            c1 = min(b, c0 + step)
            rr = r[c0 - a: c1 - a]
            lam = data.refs[self.lam][c0:c1] if self.lam >= 0 else None
            for k in range(len(self.w)):
                x = _as64(data.weight[self.w[k], c0:c1], "dir_x")
                diff = _buffer("dir_d", x.shape, np.float64)
                np.subtract(x, rr, out=diff)
                v = _buffer("dir_v", x.shape, np.float64)
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
class _IndexGram:
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
            x = _buffer("igram", (n, c1 - c0), np.float64)
            if ng:
                np.copyto(x[:ng], data.grad[gi, c0:c1])
            if n > ng:
                np.copyto(x[ng:], data.weight[wi, c0:c1])
                if self.anchor >= 0:
                    x[ng:] -= data.refs[self.anchor][c0:c1]
            out += x @ x.T if self.cols is None else x @ x[self.cols].T
        return out


@dataclass(frozen=True)
class _IndexSigns:
    """``[disagree, both_nonzero]`` counts of the rows ``g`` against the rows ``g[cols]``,
    shape ``(2, n, len(cols))`` (``cols=None``: all, as :class:`_SignGram`)."""

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
class _IndexBand:
    """The banded index: ``out[k, i, l] = <X_i, Y_{i-l}>`` for the pairs (X, Y) = (G, G), (G, V),
    (V, G), (V, V) (k = 0..3; ``V = W - a`` as in :class:`_IndexGram`), rows i = first..m-1 of
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
class _IndexSignBand:
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


def _slab_task(spec: SpaceSpec, pieces, refs) -> dict:
    """Read one slab and return every op's partial result (dict key -> float64 array)."""
    data = SlabData(spec, pieces, refs)
    out = {}
    for op in spec.ops:
        if spec.n_seg:
            res = np.zeros((spec.n_seg,) + op.shape())
            col = 0
            for seg, lo, hi in pieces:
                res[seg] += op.partial(data, col, col + hi - lo)
                col += hi - lo
        else:
            width = sum(hi - lo for _, lo, hi in pieces)
            res = op.partial(data, 0, width)
        # a row block's op returns its items only, with their places in the whole result
        out[op.key] = res if getattr(op, "out", None) is None else (op.out, op.n_out, res)
    return out


def _gather(*blocks: dict) -> dict:
    """The row blocks of one slab put together: each item's partial result comes from exactly
    one block, so the whole result equals an unblocked slab task's, bit for bit."""
    out: dict = {}
    for blk in blocks:
        for k, (idx, n, res) in blk.items():
            if k not in out:
                out[k] = np.zeros(res.shape[:-1] + (n,))
            out[k][..., idx] = res
    return out


def _combine(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:  # keys of different column spaces come from different slabs
        for k, v in p.items():
            if k in out:
                out[k] += v
            else:
                out[k] = v.copy()
    return out


_ROW_WISE = (_PairDots, _SignPairs, _RefDist, _RefDir)


def _row_blocks(spec: SpaceSpec, max_rows: int, n_refs: int) -> tuple[list[SpaceSpec], SpaceSpec | None]:
    """Cut a pass of row-wise ops into row blocks of about ``max_rows`` rows (grad + weight).

    Every item (a pair of rows, or a step against the reference) goes to the block of its
    first store row, in order; a block holds the union of the rows its items need (partner
    rows past the block's end are read by two blocks). Each block's ops keep their items in
    the original order, with their positions in the whole result (``out``), so ``_gather``
    rebuilds it. A reference made of store rows (``coef @ weight[ref_rows]``) is formed once
    per slab by ``_ref_vectors`` (the second value: its spec, or None) and reaches the
    blocks as explicit reference ``n_refs + j`` (j counts such ops), not re-read by each block.
    """
    ng = len(spec.grad_rows)
    grows, wrows = np.asarray(spec.grad_rows), np.asarray(spec.weight_rows)
    # every item: op, index, anchor (first store row), two pool keys (grad p -> p, weight q -> ng + q)
    op_id, item, anchor, k1, k2 = [], [], [], [], []
    fixed: dict[int, int] = {}  # op -> its explicit reference index
    for i, op in enumerate(spec.ops):
        if isinstance(op, _RefDist):
            a, b = np.asarray(op.g, np.int64), ng + np.asarray(op.w, np.int64)
            rows = np.minimum(grows[op.g], wrows[op.w])
            if op.ref < 0:
                fixed[i] = n_refs + len(fixed)
        elif isinstance(op, _RefDir):
            other, is_w = op.partner()
            a = ng + np.asarray(op.w, np.int64)
            b = (ng if is_w else 0) + np.asarray(other, np.int64)
            rows = np.minimum(wrows[op.w], (wrows if is_w else grows)[other])
            if op.ref < 0:
                fixed[i] = n_refs + len(fixed)
        else:
            a, b = np.asarray(op.ga, np.int64), np.asarray(op.gb, np.int64)
            rows = np.minimum(grows[op.ga], grows[op.gb])
        n = len(a)
        op_id.append(np.full(n, i, np.int64))
        item.append(np.arange(n, dtype=np.int64))
        anchor.append(np.asarray(rows, np.int64))
        k1.append(a)
        k2.append(b)
    op_id, item, anchor, k1, k2 = (np.concatenate(x) for x in (op_id, item, anchor, k1, k2))
    budget = max(1, max_rows)

    # greedy over the anchors in order: a block takes anchors while the union of rows fits
    order = np.argsort(anchor, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(anchor[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    block_of = np.empty(len(order), np.int64)
    held: set = set()
    blk = 0
    for s0, s1 in zip(starts.tolist(), ends.tolist()):
        sel = order[s0:s1]
        need = set(k1[sel].tolist()) | set(k2[sel].tolist())
        new = need - held
        if held and len(held) + len(new) > budget:
            blk += 1
            held = need
        else:
            held |= new
        block_of[sel] = blk
    n_blocks = blk + 1

    # items of each (block, op), in their original order
    srt = np.lexsort((item, op_id, block_of))
    cut = np.flatnonzero(np.r_[True, (np.diff(block_of[srt]) != 0) | (np.diff(op_id[srt]) != 0)])
    groups: list[dict[int, np.ndarray]] = [{} for _ in range(n_blocks)]
    for c0, c1 in zip(cut.tolist(), np.r_[cut[1:], len(srt)].tolist()):
        if c1 > c0:
            groups[int(block_of[srt[c0]])][int(op_id[srt[c0]])] = item[srt[c0:c1]]
    for i, op in enumerate(spec.ops):  # an op without items still gives its (empty) result
        if not any(i in g for g in groups):
            groups[0][i] = np.zeros(0, np.int64)

    out = []
    for g in groups:
        keys = [np.zeros(0, np.int64)]
        for i, idx in g.items():
            op = spec.ops[i]
            if isinstance(op, _RefDist):
                keys += [np.asarray(op.g, np.int64)[idx], ng + np.asarray(op.w, np.int64)[idx]]
            elif isinstance(op, _RefDir):
                other, is_w = op.partner()
                keys += [ng + np.asarray(op.w, np.int64)[idx], (ng if is_w else 0) + np.asarray(other, np.int64)[idx]]
            else:
                keys += [np.asarray(op.ga, np.int64)[idx], np.asarray(op.gb, np.int64)[idx]]
        keys = np.unique(np.concatenate(keys))
        gpos, wpos = keys[keys < ng], keys[keys >= ng] - ng
        ops = []
        for i in sorted(g):
            op, idx = spec.ops[i], g[i]
            if isinstance(op, _RefDist):
                ref = {"ref": fixed[i], "ref_w": np.zeros(0, np.int64), "coef": np.zeros(0)} if i in fixed else {}
                ops.append(dataclasses.replace(
                    op, g=np.searchsorted(gpos, op.g[idx]), w=np.searchsorted(wpos, op.w[idx]),
                    out=idx, n_out=len(op.w), **ref))
            elif isinstance(op, _RefDir):
                ref = {"ref": fixed[i], "ref_w": np.zeros(0, np.int64), "coef": np.zeros(0)} if i in fixed else {}
                part = ({"g": np.searchsorted(gpos, op.g[idx])} if op.lam >= 0
                        else {"w2": np.searchsorted(wpos, op.w2[idx])})
                ops.append(dataclasses.replace(op, w=np.searchsorted(wpos, op.w[idx]), out=idx, n_out=len(op.w),
                                               **part, **ref))
            else:
                ops.append(dataclasses.replace(
                    op, ga=np.searchsorted(gpos, op.ga[idx]), gb=np.searchsorted(gpos, op.gb[idx]),
                    out=idx, n_out=len(op.ga), **({"col_rows": ng} if isinstance(op, _SignPairs) else {})))
        out.append(dataclasses.replace(spec, grad_rows=grows[gpos], weight_rows=wrows[wpos], ops=tuple(ops)))
    ref_spec = None
    if fixed:  # the reference rows alone, for _ref_vectors
        ref_ops = [spec.ops[i] for i in fixed]
        wpos = np.unique(np.concatenate([np.asarray(op.ref_w, np.int64) for op in ref_ops]))
        ref_ops = tuple(dataclasses.replace(op, ref_w=np.searchsorted(wpos, op.ref_w)) for op in ref_ops)
        ref_spec = dataclasses.replace(spec, grad=None, grad_nz=None, grad_rows=np.zeros(0, np.int64),
                                       weight_rows=wrows[wpos], ops=ref_ops)
    return out, ref_spec


def _ref_vectors(spec: SpaceSpec, pieces, refs) -> tuple:
    """``refs`` plus, for each op of ``spec`` (``_RefDist`` with reference rows), its reference
    ``coef @ weight[ref_w]`` over the slab's columns, in float64: exactly what the op forms
    itself when unblocked (same column chunks, one product over all the rows), except that
    more reference rows than SLAB_BYTES holds are read and summed in row blocks."""
    width = sum(hi - lo for _, lo, hi in pieces)
    spans, col = [], 0
    for _, lo, hi in (pieces if spec.n_seg else ((0, 0, width),)):  # as _slab_task calls partial
        spans.append((col, col + hi - lo))
        col += hi - lo
    step = max(1024, ROW_CHUNK)
    per_block = max(1, int(SLAB_BYTES // max(1, 4 * width)))
    out = [np.zeros(width) for _ in spec.ops]
    wrows = np.asarray(spec.weight_rows)
    for r0 in range(0, len(wrows), per_block):
        sub = np.arange(r0, min(len(wrows), r0 + per_block))
        data = SlabData(dataclasses.replace(spec, weight_rows=wrows[sub]), pieces, ())
        for op, r in zip(spec.ops, out):
            mine = (op.ref_w >= sub[0]) & (op.ref_w <= sub[-1])
            if not mine.any():
                continue
            rows, coef = op.ref_w[mine] - sub[0], op.coef[mine]
            for a, b in spans:
                for c0 in range(a, b, step):
                    c1 = min(b, c0 + step)
                    r[c0:c1] += coef @ _as64(data.weight[rows, c0:c1], "ref_rows")
    return tuple(refs) + tuple(out)


# ----------------------------------------------------------------------------------- pass


@dataclass
class _Request:
    kind: str
    key: str
    space: str
    grad_rows: tuple = ()
    weight_rows: tuple = ()
    extra: dict = field(default_factory=dict)


class Pass:
    """Collects requests, then runs them all in one pass over the store.

    Args:
        run: the opened store.
        group: the parameter group (whole tensors) the products are restricted to.
        per_tensor: return one result per tensor of the group (leading axis) instead of one
            over the whole group.

    Example:
        >>> p = Pass(run, run.params())                      # doctest: +SKIP
        >>> k = p.gram(run.rows_of([0, 1, 2]))              # doctest: +SKIP
        >>> p.compute()[k]                                   # 3 x 3 float64 Gram  # doctest: +SKIP
    """

    def __init__(self, run: Run, group: ParamGroup, *, per_tensor: bool = False):
        self.run = run
        self.group = group
        self.per_tensor = per_tensor
        self.requests: list[_Request] = []
        self.refs: list[tuple[str, np.ndarray]] = []  # (space, vector over that space)
        #: a slab one storage chunk wide may hold this many bytes (see CHUNK_SLAB_BYTES); the
        #: query index raises it a little so that T = 512 stacked [G; W] rows (1026 x 1 MiB
        #: chunks, 0.2% over 1 GiB) still decode each chunk once
        self.chunk_slab_bytes = CHUNK_SLAB_BYTES

    # -- request builders (rows are store row indices) -----------------------------------
    def _space(self, array: str = "grad") -> str:
        return "param" if self.run.dense(array) else "sketch"

    def _add(self, kind, space, grad_rows=(), weight_rows=(), **extra) -> str:
        key = f"{kind}{len(self.requests)}"
        self.requests.append(_Request(kind, key, space, tuple(map(int, grad_rows)), tuple(map(int, weight_rows)), extra))
        return key

    def gram(self, rows, precision: str = "float64") -> str:
        """Gram matrix ``G_S G_S^T`` (float64, n x n) of the gradients at store rows ``rows``."""
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision={precision!r}: use 'float64' (exact) or 'float32' (fast)")
        return self._add("gram", self._space(), rows, precision=precision)

    def pair_dots(self, rows_a, rows_b) -> str:
        """``<G_a, G_b>`` for each pair of store rows (float64, length P)."""
        return self._add("pairs", self._space(), list(rows_a) + list(rows_b), a=np.asarray(rows_a), b=np.asarray(rows_b))

    def sign_gram(self, rows) -> str:
        """``[disagree, both_nonzero]`` coordinate counts for every pair of rows, (2, n, n)."""
        return self._add("signgram", "param" if self.run.dense("grad") else "bits", rows)

    def sign_pairs(self, rows_a, rows_b) -> str:
        """``[disagree, both_nonzero]`` counts for each pair of store rows, (2, P)."""
        space = "param" if self.run.dense("grad") else "bits"
        return self._add("signpairs", space, list(rows_a) + list(rows_b), a=np.asarray(rows_a), b=np.asarray(rows_b))

    def ref_dist(self, rows, space: str, ref_vector=None, ref_rows=None, coef=None) -> str:
        """``[||w_t - r||^2, <G_t, w_t - r>]`` for store rows ``rows`` (2, n).

        The reference is ``ref_vector`` (float64 over the ``space``'s columns: length d for
        "param", the sketch dimension for "sketch") or ``coef @ weight[ref_rows]``.
        """
        extra = {}
        wrows = list(rows)
        if ref_vector is not None:
            extra["ref"] = sum(1 for s, _ in self.refs if s == space)  # position within the space's refs
            self.refs.append((space, ref_vector))
        else:
            extra.update(ref=-1, ref_rows=np.asarray(ref_rows), coef=np.asarray(coef, dtype=np.float64))
            wrows += list(ref_rows)
        return self._add("refdist", space, rows, wrows, w=np.asarray(rows), **extra)

    def ref_dir(self, rows, *, ref_vector=None, ref_rows=None, coef=None, lam=None, next_rows=None) -> str:
        """``[||w_t - r||^2, <v_t, w_t - r>, ||v_t||^2]`` for store rows ``rows`` (3, n), dense
        tiers only, with ``v_t = G_t + lam * w_t`` (``lam``: float64 vector of length d) or,
        with ``next_rows``, ``v_t = w_t - w_next`` (the weights at ``next_rows``, row for row).
        The reference is ``ref_vector`` (float64, length d) or ``coef @ weight[ref_rows]``."""
        if (lam is None) == (next_rows is None):
            raise ValueError("ref_dir: give exactly one of lam= (gradient + weight decay) and next_rows= (update)")
        n_param_refs = sum(1 for sp, _ in self.refs if sp == "param")
        extra: dict = {"w": np.asarray(rows, dtype=np.int64)}
        wrows = list(rows)
        if ref_vector is not None:
            self.refs.append(("param", np.asarray(ref_vector, dtype=np.float64)))
            extra["ref"] = n_param_refs
            n_param_refs += 1
        else:
            extra.update(ref=-1, ref_rows=np.asarray(ref_rows), coef=np.asarray(coef, dtype=np.float64))
            wrows += list(ref_rows)
        grows = ()
        if lam is not None:
            self.refs.append(("param", np.asarray(lam, dtype=np.float64)))
            extra.update(lam=n_param_refs, g=np.asarray(rows, dtype=np.int64), w2=np.zeros(0, np.int64))
            grows = rows
        else:
            extra.update(lam=-1, g=np.zeros(0, np.int64), w2=np.asarray(next_rows, dtype=np.int64))
            wrows += list(next_rows)
        return self._add("refdir", "param", grows, wrows, **extra)

    def _anchor(self, space: str, anchor) -> int:
        """Register an anchor vector; its position among the space's explicit references."""
        if anchor is None:
            return -1
        pos = sum(1 for s, _ in self.refs if s == space)
        self.refs.append((space, np.asarray(anchor, np.float64)))
        return pos

    def index_gram(self, space: str, grad_rows=(), weight_rows=(), cols=None, anchor=None) -> str:
        """Query-index products ``X X[cols]^T`` of the stacked rows ``X = [G_grad_rows;
        W_weight_rows - anchor]`` in ``space`` ("param" or "sketch"), float64 ``(n, n)`` or
        ``(n, len(cols))``; ``anchor``: a float64 vector over the space (None: 0)."""
        return self._add("igram", space, grad_rows, weight_rows,
                         cols=None if cols is None else np.asarray(cols, np.int64),
                         anchor=self._anchor(space, anchor) if len(weight_rows) else -1)

    def index_signs(self, rows, cols=None) -> str:
        """Query-index sign counts ``[disagree, both_nonzero]`` of ``rows`` against ``rows[cols]``."""
        space = "param" if self.run.dense("grad") else "bits"
        return self._add("isigns", space, rows, cols=None if cols is None else np.asarray(cols, np.int64))

    def index_band(self, space: str, rows, first: int, band: int, grad: bool = True, weight: bool = True,
                   anchor=None) -> str:
        """Banded index products of consecutive store ``rows`` (see :class:`_IndexBand`)."""
        return self._add("iband", space, rows if grad else (), rows if weight else (), rows=np.asarray(rows),
                         first=int(first), band=int(band), grad=bool(grad), weight=bool(weight),
                         anchor=self._anchor(space, anchor) if weight else -1)

    def index_sign_band(self, rows, first: int, band: int) -> str:
        """Banded sign counts of consecutive store ``rows`` (see :class:`_IndexSignBand`)."""
        space = "param" if self.run.dense("grad") else "bits"
        return self._add("isband", space, rows, first=int(first), band=int(band))

    # -- building and running -------------------------------------------------------------
    def _columns(self, space: str) -> list[tuple[int, int, int]]:
        """``(segment, lo, hi)`` column pieces of the group in the space, in order."""
        run, group = self.run, self.group
        out = []
        if space == "sketch":
            plan = run.sketch_plan("grad" if not run.dense("grad") else "weight")
            for seg, i in enumerate(group.indices):
                out.append((seg, plan.offsets[i], plan.offsets[i] + plan.sizes[i]))
        else:
            for seg, i in enumerate(group.indices):  # several pieces per tensor in a sharded store
                out.extend((seg, lo, hi) for lo, hi in run.tensor_columns(i))
            out.sort(key=lambda p: p[1])  # column order (a no-op unless the store is sharded)
        if not self.per_tensor:  # merge adjacent pieces: fewer, larger reads
            merged = []
            for s, lo, hi in out:
                if merged and merged[-1][2] == lo:
                    merged[-1] = (0, merged[-1][1], hi)
                else:
                    merged.append((0, lo, hi))
            out = merged
        return [p for p in out if p[2] > p[1]]

    def _slabs(self, space: str, n_rows: int, chunk: int, col_bytes: float, whole_chunks: bool = False):
        """Split the space's pieces into slabs: windows aligned to ``chunk`` columns.

        With very many rows even one storage chunk per slab would exceed the memory budget;
        the slab is then a fraction of a chunk (each chunk is decoded more than once: slower,
        but memory stays bounded), unless ``whole_chunks``: a pass of row-wise requests keeps
        slabs one chunk wide and cuts its rows into blocks instead (see :meth:`graph`).
        """
        per_col = max(1.0, n_rows * col_bytes)
        width = int(SLAB_BYTES // per_col)
        if width >= chunk:
            width = min(MAX_SLAB_COLS, (width // chunk) * chunk)
        elif whole_chunks or chunk * per_col <= max(self.chunk_slab_bytes, SLAB_BYTES):
            width = chunk  # one chunk is over the budget: still decode each chunk once
        else:  # a power-of-two fraction of the chunk, so pieces never straddle chunks
            width = int(max(self.chunk_slab_bytes, SLAB_BYTES) // per_col)
            width = chunk // 2 ** math.ceil(math.log2(chunk / max(width, min(chunk, MIN_SLAB_COLS))))
        slabs: dict[int, list] = {}
        for seg, lo, hi in self._columns(space):
            a = lo
            while a < hi:
                win = a // width
                b = min(hi, (win + 1) * width)
                slabs.setdefault(win, []).append((seg, a, b))
                a = b
        return [tuple(v) for _, v in sorted(slabs.items())]

    def _space_spec(self, space: str, reqs: list[_Request]) -> tuple[SpaceSpec, int]:
        run = self.run
        grows = np.unique(np.array([r for q in reqs for r in q.grad_rows], dtype=np.int64))
        wrows = np.unique(np.array([r for q in reqs for r in q.weight_rows], dtype=np.int64))

        def pos(rows, pool):
            return np.searchsorted(pool, np.asarray(rows, dtype=np.int64)).astype(np.int64)

        ops = []
        for q in reqs:
            if q.kind == "gram":
                ops.append(_Gram(q.key, pos(q.grad_rows, grows), q.extra["precision"]))
            elif q.kind == "pairs":
                ops.append(_PairDots(q.key, pos(q.extra["a"], grows), pos(q.extra["b"], grows)))
            elif q.kind == "signgram":
                ops.append(_SignGram(q.key, pos(q.grad_rows, grows)))
            elif q.kind == "signpairs":
                ops.append(_SignPairs(q.key, pos(q.extra["a"], grows), pos(q.extra["b"], grows)))
            elif q.kind == "igram":
                ops.append(_IndexGram(q.key, pos(q.grad_rows, grows), pos(q.weight_rows, wrows), q.extra["cols"],
                                      q.extra["anchor"]))
            elif q.kind == "isigns":
                ops.append(_IndexSigns(q.key, pos(q.grad_rows, grows), q.extra["cols"]))
            elif q.kind == "iband":
                e = q.extra
                pool = grows if e["grad"] else wrows
                if e["grad"] and e["weight"] and not np.array_equal(grows, wrows):
                    raise ValueError("a banded index pass holds one row set for grad and weight")
                ops.append(_IndexBand(q.key, pos(e["rows"], pool), e["first"], e["band"], e["grad"], e["weight"],
                                      e["anchor"]))
            elif q.kind == "isband":
                ops.append(_IndexSignBand(q.key, pos(q.grad_rows, grows), q.extra["first"], q.extra["band"]))
            elif q.kind == "refdist":
                ref_w = pos(q.extra.get("ref_rows", np.zeros(0, np.int64)), wrows)
                ops.append(_RefDist(q.key, pos(q.grad_rows, grows), pos(q.extra["w"], wrows),
                                    int(q.extra["ref"]), ref_w, q.extra.get("coef", np.zeros(0))))
            elif q.kind == "refdir":
                ref_w = pos(q.extra.get("ref_rows", np.zeros(0, np.int64)), wrows)
                ops.append(_RefDir(q.key, pos(q.extra["w"], wrows), pos(q.extra["g"], grows), pos(q.extra["w2"], wrows),
                                   int(q.extra["lam"]), int(q.extra["ref"]), ref_w, q.extra.get("coef", np.zeros(0))))
        if space == "param":
            g, gz, w = run.array_ref("grad") if len(grows) else None, None, run.array_ref("weight") if len(wrows) else None
            chunk = run.chunk_width("grad" if len(grows) else "weight")
        elif space == "sketch":
            g = run.array_ref("grad_sketch") if len(grows) else None
            w = run.array_ref("weight_sketch") if len(wrows) else None
            gz = None
            chunk = run.chunk_width("grad_sketch" if len(grows) else "weight_sketch")
        else:
            g, gz, w = run.array_ref("grad_signbits"), run.array_ref("grad_nonzero"), None
            chunk = 8 * run.chunk_width("grad_signbits")
        spec = SpaceSpec(space, g, gz, w, grows, wrows, tuple(ops), len(self.group.indices) if self.per_tensor else 0)
        return spec, chunk

    def _partial_bytes(self) -> int:
        """Bytes of one slab's partial results (the Gram matrices dominate for large T)."""
        n = 0
        for q in self.requests:
            rows = len(set(q.grad_rows))
            stacked = rows + len(set(q.weight_rows))
            cols = q.extra.get("cols")
            ncols = stacked if cols is None else len(cols)
            n += {"gram": rows * rows, "signgram": 2 * rows * rows, "igram": stacked * ncols,
                  "isigns": 2 * rows * (rows if cols is None else len(cols)),
                  "iband": 4 * max(rows, stacked - rows) * (q.extra.get("band", 0) + 1),
                  "isband": 2 * rows * (q.extra.get("band", 0) + 1),
                  "refdir": 3 * len(q.extra.get("w", ()))}.get(q.kind, 2 * len(q.grad_rows))
        return 8 * n * (len(self.group.indices) if self.per_tensor else 1)

    def graph(self):
        """The dask Delayed object whose value is ``{key: float64 array}``, and bytes read."""
        import dask
        from dask.base import tokenize

        parts, nbytes = [], 0
        for space in SPACES:
            reqs = [q for q in self.requests if q.space == space]
            if not reqs:
                continue
            spec, chunk = self._space_spec(space, reqs)
            n_rows = len(spec.grad_rows) + len(spec.weight_rows)
            col_bytes = 2.0 if space == "bits" else 4.0
            # Row-wise requests (pairs of rows, rows against a reference) need no two rows
            # together beyond their own pairs: when all the rows of one chunk-wide slab exceed
            # SLAB_BYTES, the slabs stay one chunk wide and the rows are cut into blocks, one
            # task each, instead of cutting the chunk (which decodes every chunk 2, 4, ... times).
            refs = [v for s, v in self.refs if s == space]
            ref_spec = None
            row_wise = all(isinstance(op, _ROW_WISE) for op in spec.ops)
            slabs = self._slabs(space, n_rows, chunk, col_bytes, whole_chunks=row_wise)
            specs, blocked = [spec], False
            if row_wise:
                widest = max((sum(hi - lo for _, lo, hi in pieces) for pieces in slabs), default=0)
                max_rows = int(SLAB_BYTES // max(1.0, widest * col_bytes))
                if widest and n_rows > max_rows:
                    specs, ref_spec = _row_blocks(spec, max(1, max_rows), len(refs))
                    blocked = True
            # The spec travels inside every slab task (a few KB of row indices), not as one
            # shared key: a shared dependency made the distributed scheduler pile slab tasks
            # onto the worker that held it (3 of 4 on one of 2 workers).
            tasks = [functools.partial(_slab_task, s) for s in specs]
            # blocks: keys from tokens computed once per block and once per slab (hashing the
            # slab's reference slices again for each of its blocks would cost more than a read)
            block_tokens = [tokenize(s) for s in specs] if blocked else []
            ref_token = tokenize(ref_spec) if ref_spec is not None else None
            for pieces in slabs:
                slab_refs = tuple(
                    np.concatenate([np.asarray(r[lo:hi], dtype=np.float64) for _, lo, hi in pieces]) for r in refs
                )
                width = sum(hi - lo for _, lo, hi in pieces)
                for s in specs:
                    nbytes += width * (len(s.grad_rows) * (0.25 if space == "bits" else 4) + 4 * len(s.weight_rows))
                if not blocked:
                    parts.append(dask.delayed(tasks[0], pure=True)(pieces, slab_refs))
                    continue
                slab_token = tokenize(pieces, slab_refs)
                block_refs = slab_refs
                if ref_spec is not None:  # formed once per slab, for all its blocks
                    block_refs = dask.delayed(_ref_vectors, pure=True)(
                        ref_spec, pieces, slab_refs, dask_key_name=f"_ref_vectors-{tokenize(ref_token, slab_token)}")
                    nbytes += width * 4 * len(ref_spec.weight_rows)
                blocks = [dask.delayed(task, pure=True)(pieces, block_refs,
                                                        dask_key_name=f"_slab_task-{tokenize(bt, slab_token)}")
                          for task, bt in zip(tasks, block_tokens)]
                # one slab's blocks are put together first: the reduction over slabs is the
                # unblocked one, and each item's partial result is its unblocked value
                parts.append(dask.delayed(_gather, pure=True)(*blocks))
        if not parts:
            raise ValueError("nothing to compute: the pass has no requests")
        # tree reduction: up to 8 partial results per node, fewer when partials are big (T x T)
        fan = int(max(2, min(8, SLAB_BYTES // max(1, self._partial_bytes()))))
        while len(parts) > 1:
            parts = [dask.delayed(_combine, pure=True)(*parts[i: i + fan]) for i in range(0, len(parts), fan)]
        return parts[0], int(nbytes)

    def compute(self, *, progress: bool | None = None, scheduler=None) -> dict[str, np.ndarray]:
        """Run the pass and return ``{key: float64 array}``.

        Args:
            progress: show a progress bar (dask's ``ProgressBar`` on local schedulers,
                ``distributed.progress`` on a client). ``None``: only for passes reading more
                than 4 GiB, when stderr is a terminal.
            scheduler: any dask ``scheduler=`` value; ``None`` uses the active
                ``dask.distributed`` client if there is one, else the threaded scheduler.
        """
        obj, nbytes = self.graph()
        if progress is None:
            progress = nbytes > AUTO_PROGRESS_BYTES and sys.stderr.isatty()
        try:
            return compute(obj, progress=progress, scheduler=scheduler)
        except fmt.DamagedStoreError as err:  # a slab hit a damaged chunk: name its steps
            raise err.with_steps(self.run.path, self.run.steps) from None


def _client():
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(obj, *, progress: bool = False, scheduler=None):
    """Compute a dask object on the chosen scheduler (see :meth:`Pass.compute`)."""
    import dask

    from analysis.slabs import release_buffers

    client = _client() if scheduler is None else None
    if client is not None:
        fut = client.compute(obj)
        if progress:
            from distributed import progress as dprogress

            dprogress(fut)
        try:
            return fut.result()
        finally:  # the workers' slab buffers (analysis.slabs) live until the pass ends
            client.run(release_buffers)
    local_threads = scheduler in (None, "threads", "threading")
    try:
        with _blas_single_thread(local_threads), _progress_bar(progress):
            return dask.compute(obj, scheduler=scheduler)[0]
    finally:
        release_buffers()


@contextlib.contextmanager
def _progress_bar(on: bool):
    if not on:
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        yield


@contextlib.contextmanager
def _blas_single_thread(on: bool):
    """One BLAS thread per dask thread under the threaded scheduler (no oversubscription)."""
    if not on or (os.cpu_count() or 1) < 2:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield

