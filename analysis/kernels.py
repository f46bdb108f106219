"""Fused row kernels for the row-wise passes: float32 rows in, float64 sums out, in one sweep.

The row-wise ops (a step against a reference, a pair of steps) combine two float32 rows, or a
row and a float64 reference, into one or two float64 sums. Written with numpy, each needs a
float64 copy of every row (a cast or a subtraction into a buffer) and then BLAS dots over the
copies, as much CPU as decoding the chunk. Compiled with numba, the cast, the difference and
both sums happen in registers, which is what makes a new reference cost little more than
reading the store (``benchmarks/analysis.py``; the README's Performance section has the
figures). The capture's own encodings live in
:mod:`capture.kernels`.

Exactness is the same as the numpy route: every product and sum is formed in float64 from the
float32 values (the cast is exact). Only the order of the additions differs (the compiler
keeps several partial sums in vector lanes, ``fastmath={"reassoc", "contract"}``), which
changes the result in the last bits, as BLAS blocking does; NaN and Inf propagate (no
``nnan``/``ninf`` assumptions).

numba is a dependency of gradtrace; when it cannot be imported (a Dask worker without it) or
``GRADTRACE_NO_NUMBA=1`` is set, the same functions run as numpy, slower and with the same
results to rounding. ``BACKEND`` says which is in use (after the first call). The first call
of each kernel compiles it unless numba's on-disk cache already holds it.
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

    return ref_dist, pair_dots, sign_pairs


_NUMPY = (_ref_dist_np, _pair_dots_np, _sign_pairs_np)
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
