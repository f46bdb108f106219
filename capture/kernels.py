"""Compiled encodings of the capture stage: per-tensor scalar sums, bit rounding, CountSketch.

The writer's per-row work, each a fused sweep over the float32 row: ``tensor_sums`` forms the
per-step, per-tensor scalars (``||G||^2``, ``||w||^2``, ``<G, w>``) in one pass instead of
three einsums; ``bitround_into``, ``sketch_into`` and ``pack_signs_into`` are the rounded and
sketch tiers' encodings, each equal bit for bit to its numpy definition in
:mod:`gradtrace_format.format` (``bitround``, ``Sketcher``, ``pack_signs``).

``tensor_sums`` adds in a compiler-chosen order (``fastmath={"reassoc", "contract"}``), so
its float64 sums can differ from the numpy route in the last bits, as BLAS blocking does;
NaN and Inf propagate. The encodings use no fastmath and add in index order.

numba is optional: when it cannot be imported or ``GRADTRACE_NO_NUMBA=1`` is set, the same
functions run as numpy, slower and with the same results (to rounding for ``tensor_sums``,
bit for bit for the encodings). ``BACKEND`` says which is in use (after the first call). The
first call compiles the kernels unless numba's on-disk cache already holds them.
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
    except ImportError:
        return None
    return numba


# ---------------------------------------------------------------------------- numpy versions


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
    def tensor_sums(g, w, starts, ends, idx, gg, ww, gw, has_g):  # pragma: no cover - compiled
        for j in range(starts.shape[0]):
            s_ww = 0.0
            s_gg = 0.0
            s_gw = 0.0
            # slices, then loops from 0: a loop over range(starts[j], ends[j]) indexing the
            # whole array does not vectorize
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

    return tensor_sums, bitround, sketch


_NUMPY = (_tensor_sums_np, _bitround_np, _sketch_np)
_impl: tuple | None = None
_lock = threading.Lock()
BACKEND = ""  # "numba" or "numpy", set at the first call


def _get() -> tuple:
    """The kernels, compiled (or loaded from numba's cache) at the first call, so that
    ``import capture`` does not pay numba's import."""
    global _impl, BACKEND
    with _lock:
        if _impl is None:
            nb = _numba()
            if nb is not None:
                _impl, BACKEND = _compile(nb), "numba"
            else:
                _impl, BACKEND = _NUMPY, "numpy"
    return _impl


def _idx(i) -> np.ndarray:
    return np.ascontiguousarray(i, dtype=np.int64)


def tensor_sums(g: np.ndarray | None, w: np.ndarray, starts, ends, idx, gg: np.ndarray, ww: np.ndarray,
                gw: np.ndarray) -> None:
    """Per segment j (entries ``[starts[j], ends[j])`` of the flat vectors, tensor ``idx[j]``):
    ``ww[idx[j]] = ||w||^2`` and, when ``g`` is given, ``gg[idx[j]] = ||g||^2`` and
    ``gw[idx[j]] = <g, w>``, all float64 sums of float64 products of the float32 entries, in
    one sweep (the capture's per-step scalars)."""
    has_g = g is not None
    (_impl or _get())[0](g if has_g else w, w, _idx(starts), _idx(ends), _idx(idx), gg, ww, gw, has_g)


# ---------------------------------------------------------------------------- capture encodings
# The writer's per-row encodings, each equal bit for bit to its numpy definition in
# ``gradtrace_format.format`` (``bitround``, ``Sketcher``, ``pack_signs``): no fastmath, the same
# order of float64 additions.


def bitround_into(x: np.ndarray, keepbits: int, out: np.ndarray) -> np.ndarray:
    """``out[:] = format.bitround(x, keepbits)`` for a contiguous float32 ``x``; returns ``out``."""
    if keepbits >= 23:
        np.copyto(out, x)
        return out
    (_impl or _get())[1](x, 23 - int(keepbits), out)
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
    (_impl or _get())[2](x, _idx(starts), _idx(sizes), _idx(offsets), codes, _idx(code_starts), out)
    return out


def pack_signs_into(x: np.ndarray, signbits: np.ndarray, nonzero: np.ndarray) -> None:
    """``format.pack_signs(x)`` into the uint8 arrays ``signbits`` and ``nonzero`` (length
    ``ceil(len(x) / 8)``, zero padded): sign bits of the non-zero entries, and non-zero bits.
    ``np.packbits`` is a compiled loop already."""
    nz = x != 0
    signbits[:] = np.packbits(np.signbit(x) & nz)
    nonzero[:] = np.packbits(nz)
