"""Fused row kernels for the row-wise passes: float32 rows in, float64 sums out, in one sweep.

The row-wise ops (a step against a reference, a pair of steps) combine two float32 rows, or a
row and a float64 reference, into one or two float64 sums. Written with numpy, each needs a
float64 copy of every row (a cast or a subtraction into a buffer) and then BLAS dots over the
copies: about 2 ns per entry here, as much CPU as decoding the chunk. Compiled with numba, the
cast, the difference and both sums happen in registers: about 0.3 ns per entry (AVX2), which
is what makes a new reference cost little more than reading the store
(``benchmarks/analysis.py``). ``tensor_sums`` does the same for the capture's per-step,
per-tensor scalars (``||G||^2``, ``||w||^2``, ``<G, w>``): one sweep instead of three einsums
(``capture/writer.py``).

Exactness is the same as the numpy route: every product and sum is formed in float64 from the
float32 values (the cast is exact). Only the order of the additions differs (the compiler
keeps several partial sums in vector lanes, ``fastmath={"reassoc", "contract"}``), which
changes the result in the last bits, as BLAS blocking does; NaN and Inf propagate (no
``nnan``/``ninf`` assumptions).

numba is a dependency of gradtrace; when it cannot be imported (a Dask worker without it) or
``GRADTRACE_NO_NUMBA=1`` is set, the same functions run as numpy, slower and with the same
results to rounding. ``BACKEND`` says which is in use (after the first call). The first call of each kernel compiles it
(about a second) unless numba's on-disk cache already holds it.
"""

from __future__ import annotations

import os
import threading

import numpy as np

_FASTMATH = {"reassoc", "contract"}


def _numba():
    if os.environ.get("GRADTRACE_NO_NUMBA", "") not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency; this is a worker without it
        return None
    return numba


# ---------------------------------------------------------------------------- numpy versions
# Same loops, same arguments: each adds item k's sums over columns [a, b) into out[..., k].


def _ref_dist_np(w2, g2, wi, gi, r, a, b, out):
    for k in range(len(wi)):
        diff = w2[wi[k], a:b].astype(np.float64)
        diff -= r
        out[0, k] += np.dot(diff, diff)
        out[1, k] += np.dot(g2[gi[k], a:b].astype(np.float64), diff)


def _pair_dots_np(x2, ia, ib, a, b, out):
    for k in range(len(ia)):
        out[k] += np.dot(x2[ia[k], a:b].astype(np.float64), x2[ib[k], a:b].astype(np.float64))


def _sign_pairs_np(x2, ia, ib, a, b, out):
    for k in range(len(ia)):
        x, y = x2[ia[k], a:b], x2[ib[k], a:b]
        if np.isnan(x).any() or np.isnan(y).any():
            out[:, k] = np.nan
            continue
        both = (x != 0) & (y != 0)
        out[0, k] += np.count_nonzero(both & ((x < 0) != (y < 0)))
        out[1, k] += np.count_nonzero(both)


def _tensor_sums_np(g, w, starts, ends, idx, gg, ww, gw, has_g):
    if len(starts) > 1 and np.array_equal(ends[:-1], starts[1:]):
        # a run of adjoining small tensors: one float64 copy and np.add.reduceat (einsum calls
        # per tensor cost more than the arithmetic there)
        lo, hi, rel = starts[0], ends[-1], starts - starts[0]
        w64 = w[lo:hi].astype(np.float64)  # float32 products are exact in float64
        ww[idx] = np.add.reduceat(w64 * w64, rel)
        if has_g:
            g64 = g[lo:hi].astype(np.float64)
            gg[idx] = np.add.reduceat(g64 * g64, rel)
            gw[idx] = np.add.reduceat(g64 * w64, rel)
        return
    for j in range(len(starts)):
        # einsum with dtype=float64 casts in small buffers: float64 products and sums, no
        # d-sized temporaries and no BLAS threads
        ws = w[starts[j]:ends[j]]
        ww[idx[j]] = np.einsum("i,i->", ws, ws, dtype=np.float64)
        if has_g:
            gs = g[starts[j]:ends[j]]
            gg[idx[j]] = np.einsum("i,i->", gs, gs, dtype=np.float64)
            gw[idx[j]] = np.einsum("i,i->", gs, ws, dtype=np.float64)


# ---------------------------------------------------------------------------- numba versions


def _bitround_np(x, drop, out):
    bits = x.view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    lsb = (bits >> np.uint32(drop)) & np.uint32(1)
    np.bitwise_and(bits + half + lsb, mask, out=out.view(np.uint32))
    bad = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    if bad.any():
        out[bad] = x[bad]


def _sketch_np(x, starts, sizes, offsets, codes, code_starts, out):
    for t in range(len(starts)):
        seg = x[starts[t]:starts[t] + sizes[t]].astype(np.float64)
        o = offsets[t]
        if code_starts[t] < 0:
            out[o:o + sizes[t]] = seg
            continue
        c = codes[code_starts[t]:code_starts[t] + sizes[t]]
        k = int(out.shape[0] if t + 1 == len(starts) else offsets[t + 1]) - o
        # np.bincount adds in index order, as the compiled loop does: the same float64 sums
        out[o:o + k] += np.bincount(c >> 1, weights=np.where(c & 1, -seg, seg), minlength=k)


def _compile(numba):
    jit = numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)

    @jit
    def ref_dist(w2, g2, wi, gi, r, a, b, out):  # pragma: no cover - compiled
        for k in range(wi.shape[0]):
            w = w2[wi[k], a:b]
            g = g2[gi[k], a:b]
            s1 = 0.0
            s2 = 0.0
            for i in range(w.shape[0]):
                d = np.float64(w[i]) - r[i]
                s1 += d * d
                s2 += np.float64(g[i]) * d
            out[0, k] += s1
            out[1, k] += s2

    @jit
    def pair_dots(x2, ia, ib, a, b, out):  # pragma: no cover - compiled
        for k in range(ia.shape[0]):
            x = x2[ia[k], a:b]
            y = x2[ib[k], a:b]
            s = 0.0
            for i in range(x.shape[0]):
                s += np.float64(x[i]) * np.float64(y[i])
            out[k] += s

    @jit
    def sign_pairs(x2, ia, ib, a, b, out):  # pragma: no cover - compiled
        for k in range(ia.shape[0]):
            x = x2[ia[k], a:b]
            y = x2[ib[k], a:b]
            dis = 0
            both = 0
            nan = 0
            for i in range(x.shape[0]):
                u = x[i]
                v = y[i]
                nz = (u != 0) & (v != 0)
                both += nz
                dis += nz & ((u < 0) != (v < 0))
                nan += (u != u) | (v != v)
            if nan:
                out[0, k] = np.nan
                out[1, k] = np.nan
            else:
                out[0, k] += dis
                out[1, k] += both

    @jit
    def tensor_sums(g, w, starts, ends, idx, gg, ww, gw, has_g):  # pragma: no cover - compiled
        for j in range(starts.shape[0]):
            s_ww = 0.0
            s_gg = 0.0
            s_gw = 0.0
            # slices, then loops from 0: a loop over range(starts[j], ends[j]) indexing the
            # whole array does not vectorize (11x slower)
            ws = w[starts[j]:ends[j]]
            if has_g:
                gs = g[starts[j]:ends[j]]
                for i in range(ws.shape[0]):
                    x = np.float64(ws[i])
                    y = np.float64(gs[i])
                    s_ww += x * x
                    s_gg += y * y
                    s_gw += y * x
                gg[idx[j]] = s_gg
                gw[idx[j]] = s_gw
            else:
                for i in range(ws.shape[0]):
                    x = np.float64(ws[i])
                    s_ww += x * x
            ww[idx[j]] = s_ww

    # exact kernels (no fastmath): their results must equal the numpy versions bit for bit
    exact = numba.njit(nogil=True, cache=True)

    @exact
    def bitround(x, drop, out):  # pragma: no cover - compiled
        bits = x.view(np.uint32)
        o = out.view(np.uint32)
        half = np.uint32((1 << (drop - 1)) - 1)
        mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
        for i in range(bits.shape[0]):
            b = bits[i]
            if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000):  # NaN or Inf: kept
                o[i] = b
            else:
                o[i] = (b + half + ((b >> np.uint32(drop)) & np.uint32(1))) & mask

    @exact
    def sketch(x, starts, sizes, offsets, codes, code_starts, out):  # pragma: no cover - compiled
        for t in range(starts.shape[0]):
            seg = x[starts[t]:starts[t] + sizes[t]]
            o = offsets[t]
            if code_starts[t] < 0:  # copied exactly
                for i in range(seg.shape[0]):
                    out[o + i] = np.float64(seg[i])
                continue
            c = codes[code_starts[t]:code_starts[t] + sizes[t]]
            for i in range(seg.shape[0]):
                v = np.float64(seg[i])
                k = c[i]
                if k & 1:
                    out[o + (k >> 1)] -= v
                else:
                    out[o + (k >> 1)] += v

    return ref_dist, pair_dots, sign_pairs, tensor_sums, bitround, sketch


_NUMPY = (_ref_dist_np, _pair_dots_np, _sign_pairs_np, _tensor_sums_np, _bitround_np, _sketch_np)
_impl: tuple | None = None
_lock = threading.Lock()
BACKEND = ""  # "numba" or "numpy", set at the first call


def _get() -> tuple:
    """The kernels, compiled (or loaded from numba's cache) at the first call, so that
    ``import analysis`` does not pay numba's import."""
    global _impl, BACKEND
    with _lock:  # the threaded scheduler's first tasks arrive together
        if _impl is None:
            nb = _numba()
            if nb is not None:
                _impl, BACKEND = _compile(nb), "numba"
            else:
                _impl, BACKEND = _NUMPY, "numpy"
    return _impl


def _rows(x: np.ndarray, a: int, b: int) -> tuple[np.ndarray, int, int]:
    """A C-contiguous 2-D array and the column range to use in it: the kernels index rows and
    then slice columns, which compiles to unit-stride vector loops only on a C layout (a
    strided view is copied, columns [a, b) only)."""
    if x.flags.c_contiguous:
        return x, a, b
    return np.ascontiguousarray(x[:, a:b]), 0, b - a


def _idx(i) -> np.ndarray:
    return np.ascontiguousarray(i, dtype=np.int64)


def ref_dist(w2: np.ndarray, g2: np.ndarray, wi, gi, r: np.ndarray, a: int, b: int, out: np.ndarray) -> None:
    """Add ``||w2[wi[k]] - r||^2`` and ``<g2[gi[k]], w2[wi[k]] - r>`` over columns ``[a, b)``
    to ``out[0, k]`` and ``out[1, k]`` (float64); ``r`` holds those columns only."""
    if len(wi) == 0:  # a row block without items of this op may have no rows at all
        return
    if not (w2.flags.c_contiguous and g2.flags.c_contiguous):
        w2, g2, a, b = np.ascontiguousarray(w2[:, a:b]), np.ascontiguousarray(g2[:, a:b]), 0, b - a
    r = np.ascontiguousarray(r, dtype=np.float64)
    (_impl or _get())[0](w2, g2, _idx(wi), _idx(gi), r, a, b, out)


def pair_dots(x2: np.ndarray, ia, ib, a: int, b: int, out: np.ndarray) -> None:
    """Add ``<x2[ia[k]], x2[ib[k]]>`` over columns ``[a, b)`` (float64) to ``out[k]``."""
    if len(ia) == 0:
        return
    x2, a, b = _rows(x2, a, b)
    (_impl or _get())[1](x2, _idx(ia), _idx(ib), a, b, out)


def sign_pairs(x2: np.ndarray, ia, ib, a: int, b: int, out: np.ndarray) -> None:
    """Add to ``out[:, k]`` the counts ``(disagree, both_nonzero)`` of rows ``ia[k]``, ``ib[k]``
    over columns ``[a, b)``: entries where both are nonzero and their signs differ, and
    entries where both are nonzero (``-0.0`` counts as zero). A NaN in either row makes
    item k NaN."""
    if len(ia) == 0:
        return
    x2, a, b = _rows(x2, a, b)
    (_impl or _get())[2](x2, _idx(ia), _idx(ib), a, b, out)


def tensor_sums(g: np.ndarray | None, w: np.ndarray, starts, ends, idx, gg: np.ndarray, ww: np.ndarray,
                gw: np.ndarray) -> None:
    """Per segment j (entries ``[starts[j], ends[j])`` of the flat vectors, tensor ``idx[j]``):
    ``ww[idx[j]] = ||w||^2`` and, when ``g`` is given, ``gg[idx[j]] = ||g||^2`` and
    ``gw[idx[j]] = <g, w>``, all float64 sums of float64 products of the float32 entries, in
    one sweep (the capture's per-step scalars)."""
    has_g = g is not None
    (_impl or _get())[3](g if has_g else w, w, _idx(starts), _idx(ends), _idx(idx), gg, ww, gw, has_g)


# ---------------------------------------------------------------------------- capture encodings
# The writer's per-row encodings, each equal bit for bit to its numpy definition in
# ``analysis.format`` (``bitround``, ``Sketcher``, ``pack_signs``): no fastmath, the same
# order of float64 additions.


def bitround_into(x: np.ndarray, keepbits: int, out: np.ndarray) -> np.ndarray:
    """``out[:] = format.bitround(x, keepbits)`` for a contiguous float32 ``x``; returns ``out``."""
    if keepbits >= 23:
        np.copyto(out, x)
        return out
    (_impl or _get())[4](x, 23 - int(keepbits), out)
    return out


def sketch_codes(bucket: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """A tensor's CountSketch hash in one int32 per entry: ``2 * bucket + (sign < 0)``."""
    if bucket.size and int(bucket.max()) >= 2**30:
        raise ValueError("a sketch of more than 2**30 buckets per tensor does not fit the int32 codes")
    return (bucket.astype(np.int32) << 1) | (sign < 0).astype(np.int32)


def sketch_into(x: np.ndarray, starts, sizes, offsets, codes: np.ndarray, code_starts, out: np.ndarray) -> np.ndarray:
    """CountSketch of the flat float32 ``x`` into the float64 ``out`` (length ``plan.dim``).

    Tensor t (entries ``[starts[t], starts[t] + sizes[t])``) adds ``sign(i) * x[i]`` to
    bucket ``offsets[t] + bucket(i)``, in index order (as ``np.bincount`` does, so the sums
    equal ``format.Sketcher``'s bit for bit); ``code_starts[t] < 0`` copies the tensor exactly.
    ``codes`` holds :func:`sketch_codes` of every sketched tensor, tensor t's from
    ``code_starts[t]``.
    """
    out[:] = 0.0
    (_impl or _get())[5](x, _idx(starts), _idx(sizes), _idx(offsets), codes, _idx(code_starts), out)
    return out


def pack_signs_into(x: np.ndarray, signbits: np.ndarray, nonzero: np.ndarray) -> None:
    """``format.pack_signs(x)`` into the uint8 arrays ``signbits`` and ``nonzero`` (length
    ``ceil(len(x) / 8)``, zero padded): sign bits of the non-zero entries, and non-zero bits.
    numpy's ``packbits`` is as fast as a compiled loop here (0.3 ns per entry for both planes)."""
    nz = x != 0
    signbits[:] = np.packbits(np.signbit(x) & nz)
    nonzero[:] = np.packbits(nz)
