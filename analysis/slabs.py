"""Reading one slab: the rows a pass needs, for the columns of one slab, each chunk decoded once.

A slab is a tuple of pieces ``(segment, lo, hi)``: column ranges of one window of the
parameter axis (or sketch axis, or bit axis), aligned to the storage chunks by the engine
(:mod:`analysis.engine`).

This module also holds the analysis's one buffer pool (:func:`buffer`): per-thread arrays
reused from one slab task to the next, for the decoded rows and for the block operations'
work arrays (:mod:`analysis.blockops`), dropped together when a pass ends
(:func:`release_buffers`).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

import numpy as np

from gradtrace_format import integrity
from analysis.store import ArrayRef

#: Buffers up to this many bytes (decoded slabs, work arrays) are kept per thread and reused by
#: the thread's next slab task, until the pass ends (``release_buffers``): a fresh array costs a
#: page fault per 4 KiB page on first touch (the kernel zeroes it). Larger ones are fresh arrays.
REUSE_BYTES = 2**30

_tls = threading.local()
_pools: "weakref.WeakSet[_Pool]" = weakref.WeakSet()  # every live thread's pool
_pools_lock = threading.Lock()


class _Pool(dict):
    """One thread's buffers by (key, dtype); weak-referenceable and hashed by identity, so a
    finished thread's pool leaves ``_pools`` with it."""

    __hash__ = object.__hash__

    def __eq__(self, other):
        return self is other


def buffer(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised array of ``shape``: this thread's buffer ``key`` when it is small
    enough to keep (``REUSE_BYTES``), else a fresh one. Valid until the thread's next request
    for the same key, so only inside one slab task (whose results never hold views of it).

    Decodes use the keys ``grad0``, ``weight1``, ``neg0``... (array and cover); the block
    operations use their own names (``gram``, ``sign_s``, ``ref_vec``...)."""
    dtype = np.dtype(dtype)
    need = int(np.prod(shape))
    if need * dtype.itemsize > REUSE_BYTES:
        return np.empty(shape, dtype)
    pool = getattr(_tls, "pool", None)
    if pool is None:
        pool = _tls.pool = _Pool()
        with _pools_lock:
            _pools.add(pool)
    buf = pool.get((key, dtype.str))
    if buf is None or buf.size < need:
        pool.pop((key, dtype.str), None)  # free the old one before allocating the larger
        buf = pool[(key, dtype.str)] = np.empty(need, dtype)
    return buf[:need].reshape(shape)


def release_buffers() -> int:
    """Drop every thread's buffers (the engine calls this when a pass ends, here and on
    distributed workers). Returns the bytes released. A task still running keeps its own
    buffers alive through its arrays; the next read allocates afresh."""
    with _pools_lock:
        pools = list(_pools)
    n = 0
    for pool in pools:
        for buf in list(pool.values()):
            n += buf.nbytes
        pool.clear()
    return n


def as_index(pos: np.ndarray):
    """``slice`` when ``pos`` is a contiguous run (no copy when indexing), else the array."""
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) == 0:
        return slice(0, 0)
    if pos[-1] - pos[0] == len(pos) - 1 and (len(pos) == 1 or (np.diff(pos) == 1).all()):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


@dataclass(frozen=True)
class SpaceSpec:
    """What every slab task of one column space needs (one graph key, shared by tasks)."""

    space: str
    grad: ArrayRef | None  # "param": grad; "sketch": grad_sketch; "bits": grad_signbits
    grad_nz: ArrayRef | None  # "bits": grad_nonzero
    weight: ArrayRef | None
    grad_rows: np.ndarray
    weight_rows: np.ndarray
    ops: tuple
    n_seg: int  # 0: one result over the whole group; else one per segment (tensor)


class SlabData:
    """The rows of one slab, read once: ``grad`` / ``weight`` float32 (rows x columns) or,
    in the ``bits`` space, ``neg`` / ``nz`` uint8 bit matrices, plus slab slices of explicit
    reference vectors."""

    def __init__(self, spec: SpaceSpec, pieces, refs):
        self.space = spec.space
        self.refs = refs
        self.n_grad = len(spec.grad_rows)
        self.n_weight = len(spec.weight_rows)
        self.grad = self.weight = self.neg = self.nz = None
        if spec.space == "bits":
            if self.n_grad:
                self.neg = read_bits(spec.grad.open(), spec.grad_rows, pieces, buf="neg",
                                     absent=spec.grad.absent_rows())
                self.nz = read_bits(spec.grad_nz.open(), spec.grad_rows, pieces, buf="nz",
                                    absent=spec.grad_nz.absent_rows())
        else:  # valid for this slab task only (the next slab of the thread reuses the buffers)
            if self.n_grad:
                self.grad = read(spec.grad.open(), spec.grad_rows, pieces, buf="grad", absent=spec.grad.absent_rows())
            if self.n_weight:
                self.weight = read(spec.weight.open(), spec.weight_rows, pieces, buf="weight",
                                   absent=spec.weight.absent_rows())


def covers(pieces, chunk: int) -> list[tuple[int, int]]:
    """Chunk-aligned intervals covering the pieces, merged (each chunk decoded once). The
    pieces may come in any column order (a sharded store's tensor is several pieces)."""
    out: list[list[int]] = []
    for a, b in sorted(((lo // chunk) * chunk, -(-hi // chunk) * chunk) for _, lo, hi in pieces):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def read_rows(arr, rows: np.ndarray, a: int, b: int, buf: str | None = None, absent=None) -> np.ndarray:
    """``arr[rows, a:b]``; decoded into this thread's reusable buffer ``buf`` when given."""
    b = min(b, arr.shape[1])
    sel = as_index(rows)
    try:
        if buf is None:
            out = arr[sel, a:b] if isinstance(sel, slice) else arr.oindex[sel, a:b]
        else:
            from zarr.core.buffer.cpu import NDBuffer

            n = sel.stop - sel.start if isinstance(sel, slice) else len(sel)
            out = buffer(buf, (n, b - a), arr.dtype)
            if out.size:
                nd = NDBuffer.from_numpy_array(out)
                if isinstance(sel, slice):
                    arr.get_basic_selection((sel, slice(a, b)), out=nd)
                else:
                    arr.get_orthogonal_selection((sel, slice(a, b)), out=nd)
    except BaseException as err:  # noqa: BLE001 - a checksum or decode failure: name the chunks
        if not integrity.decode_failure(err):
            raise
        raise integrity.read_failed(arr, rows, a, b, err) from None
    if b > a:  # a missing chunk would read as the fill value: an error, never a number
        integrity.check_present(arr, rows, a, b, out, absent)
        integrity.check_partial_crc(arr, rows, a, b)
    return out


def read(arr, rows: np.ndarray, pieces, buf: str | None = None, absent=None) -> np.ndarray:
    """Rows x (concatenated piece columns) of a 2-D zarr array. With ``buf``, the result may be
    (a view of) this thread's buffer ``buf``: use it before the thread's next such read."""
    covers_ = covers(pieces, int(arr.chunks[1]))
    blocks = [(a, read_rows(arr, rows, a, b, buf=None if buf is None else f"{buf}{i}", absent=absent))
              for i, (a, b) in enumerate(covers_)]
    if len(pieces) == 1 and len(blocks) == 1:
        (_, lo, hi), (a, blk) = pieces[0], blocks[0]
        return blk[:, lo - a: hi - a]
    parts = []
    for _, lo, hi in pieces:
        for a, blk in blocks:
            if a <= lo and hi <= a + blk.shape[1]:
                parts.append(blk[:, lo - a: hi - a])
                break
    return np.concatenate(parts, axis=1)


def read_bits(arr, rows: np.ndarray, pieces, buf: str | None = None, absent=None) -> np.ndarray:
    """Rows x (concatenated piece columns) of packed bits, unpacked to uint8 0/1."""
    byte_pieces = [(s, lo // 8, -(-hi // 8)) for s, lo, hi in pieces]
    covers_ = covers(byte_pieces, int(arr.chunks[1]))
    blocks = [(a, read_rows(arr, rows, a, b, buf=None if buf is None else f"{buf}{i}", absent=absent))
              for i, (a, b) in enumerate(covers_)]
    parts = []
    for _, lo, hi in pieces:
        for a, blk in blocks:
            if a * 8 <= lo and hi <= (a + blk.shape[1]) * 8:
                b0 = lo // 8 - a
                bits = np.unpackbits(blk[:, b0: -(-hi // 8) - a], axis=1)
                parts.append(bits[:, lo - (a + b0) * 8: hi - (a + b0) * 8])
                break
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
