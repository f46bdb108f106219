"""Synchronous, crash-safe writer of run stores from numpy rows (no torch here).

The commit protocol (why a kill never tears a step):

1. Arrays are preallocated to ``capacity`` rows (grown by doubling), so writing a row does not
   change array metadata.
2. Row n's data is written first. Nothing a reader trusts changes: row n is not committed, so
   its chunks (``grad``/``weight``/sketch arrays: appended to the open shard file of its row
   block and then entered in the shard's index, or one file per chunk in a store without shard files)
   may be torn by a kill and are simply written again by the next append; the index entries
   of committed rows are never written again. The per-step arrays are
   uncompressed; their chunk files are created whole (temporary file + atomic rename) and
   afterwards only the bytes of row n are written in place, then the chunk's crc32c (its last
   4 bytes), so committed rows' bytes never change. A kill between the two leaves a crc that
   covers the chunk with row n (and the rows after it) still at the fill value: readers accept
   exactly that (``gradtrace_format.integrity.decode_scalar_block``) and resume rewrites it.
3. Only then (at once, or for several rows together: ``append(commit=False)`` + ``commit()``)
   is the root attribute ``gradtrace.n_steps`` advanced: the root ``zarr.json`` is replaced by
   an atomic rename. Readers ignore rows at index >= n_steps, so a kill at any moment loses no
   committed step (it loses the rows written since the last commit, and the Recorder's queued
   steps).
4. On a clean close, arrays are trimmed to ``n_steps`` rows and the metadata is consolidated,
   so plain ``xarray.open_zarr`` sees exactly the committed rows.

Every chunk of every array carries zarr's ``crc32c`` codec (:func:`chunk_encoder` appends it).
Nothing is fsync'ed unless ``durable=True``: a killed process loses nothing the kernel already
has; a power cut may lose committed steps (readers then report them as damaged). With
``durable=True`` each row's chunk files, per-step blocks and directories are fsynced before
the marker, and the marker after its rename. One writer at a time: ``.gradtrace.lock`` inside
the store, ``fcntl.flock``-ed; creation happens in a hidden sibling directory renamed into place.

Why chunks are written here and not through ``zarr.Array.__setitem__``: through zarr a row
costs its encode and put plus zarr's event loop and, for a one-value write of a per-step
array, a read-modify-write of the whole chunk; here a row is encoded and appended directly
and a per-step value is an in-place write of its bytes (``benchmarks/capture_overhead.py``
measures what a row costs; README, "Performance"). The writer encodes whole chunks with
the codecs the array's own metadata declares (:func:`chunk_encoder`); arrays whose codecs it
does not know are written through zarr. ``tests/test_capture_writer.py`` checks that every
byte decodes identically through zarr and xarray.

:class:`StoreWriter` is used by :class:`capture.Recorder` from its writer thread, and by tests
and benchmarks that need stores without torch.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import errno
import functools
import itertools
import json
import math
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import fcntl
import struct
import weakref

import google_crc32c
import numcodecs
import numcodecs.blosc
import numpy as np
import zarr

from gradtrace_format import format as fmt
from capture import kernels
from gradtrace_format.format import (
    FLAG_FINAL,
    FLAG_NONFINITE_GRAD,
    FLAG_NO_WEIGHT,
    FLAG_NONFINITE_WEIGHT,
    Header,
    StoreMismatchError,
    TensorInfo,
    Tier,
)
from capture import sink as _sink

# The writer runs beside training on few cores: blosc must not start its own thread pool
# (zarr sets this too; numcodecs' default would use threads from the main thread).
numcodecs.blosc.use_threads = False

INITIAL_CAPACITY = 64
_CRC = struct.Struct("<I")
_TMP_COUNTER = itertools.count()


def tensor_scalars(tensors: Sequence[TensorInfo], g: np.ndarray | None, w: np.ndarray):
    """Per-tensor ``||g||^2``, ``||w||^2`` and ``<g, w>``, accumulated in float64.

    Args:
        tensors: the parameter table.
        g: float32 gradient of shape (d,), or None (final iterate).
        w: float32 weights of shape (d,).

    Returns:
        Three float64 arrays of shape (n_tensors,); the g ones are NaN when g is None. A
        non-finite entry of g (or w) makes its tensor's sums non-finite, and finite float32
        entries never overflow a float64 sum of squares, so ``isfinite(sum)`` tells whether
        every entry is finite.
    """
    n = len(tensors)
    gg = np.full(n, np.nan)
    ww = np.empty(n)
    gw = np.full(n, np.nan)
    for task in scalar_tasks(tensors, g, w, gg, ww, gw):
        task()
    return gg, ww, gw


#: Tensors up to this size are reduced together, a run of them at a time (one unit of work;
#: the numpy fallback of ``kernels.tensor_sums`` does a run with one ``np.add.reduceat``).
SMALL_TENSOR = 4096
#: Entries per batched run of small tensors (bounds the fallback's float64 temporaries).
SMALL_RUN = 2**16


def _scalar_plan(tensors: Sequence[TensorInfo]) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Units of work ``(starts, ends, indices)``: a large tensor alone, or a run of
    consecutive small tensors, each tensor its segment ``[starts[j], ends[j])`` of the flat
    vectors. Computed once per store; the writer threads share the units."""
    plan: list = []
    run: list[int] = []

    def unit(idx):
        starts = np.array([tensors[i].offset for i in idx], dtype=np.int64)
        ends = np.array([tensors[i].offset + tensors[i].size for i in idx], dtype=np.int64)
        plan.append((starts, ends, np.array(idx, dtype=np.int64)))

    for i, t in enumerate(tensors):
        if t.size == 0:
            continue
        if t.size > SMALL_TENSOR:
            if run:
                unit(run)
                run = []
            unit([i])
            continue
        if run and (t.offset != tensors[run[-1]].offset + tensors[run[-1]].size
                    or t.offset + t.size - tensors[run[0]].offset > SMALL_RUN):
            unit(run)
            run = []
        run.append(i)
    if run:
        unit(run)
    return plan


def split_scalar_tasks(tensors, g: SplitRow, w: np.ndarray | None, gg, ww, gw, plan) -> list[Callable[[], None]]:
    """:func:`scalar_tasks` of a :class:`SplitRow` gradient (``w`` None: ``||G||^2`` alone):
    the same kernel loops over the same entries, so the same float64 sums."""
    for i, t in enumerate(tensors):
        if t.size == 0:
            gg[i] = 0.0
            if w is not None:
                ww[i] = gw[i] = 0.0
    return [functools.partial(_split_sums, g, w, int(starts[0]), int(ends[-1]), starts, ends, idx, gg, ww, gw)
            for starts, ends, idx in plan]


def scalar_tasks(tensors, g, w, gg, ww, gw, plan=None) -> list[Callable[[], None]]:
    """Independent tasks that fill ``gg``, ``ww``, ``gw`` (size-0 tensors: 0, and NaN for g
    when g is None): one fused float64 sweep per unit (``analysis.kernels.tensor_sums``)."""
    for i, t in enumerate(tensors):
        if t.size == 0:
            ww[i] = 0.0
            if g is not None:
                gg[i] = gw[i] = 0.0
    plan = _scalar_plan(tensors) if plan is None else plan
    return [functools.partial(kernels.tensor_sums, g, w, starts, ends, idx, gg, ww, gw)
            for starts, ends, idx in plan]


class SplitRow:
    """A gradient row given as one contiguous 1-D float32 array per tensor of the parameter
    table (the ``.grad`` tensors of a CPU model, read where backward left them), instead of
    the flattened row: the writer reads the pieces in place, so the row is never copied
    whole. ``StoreWriter.append`` takes it where it takes ``grad``; a store it cannot read
    pieces into (a URL, a lag band, the numpy kernels) joins them first (:meth:`flat`)."""

    def __init__(self, parts: Sequence[np.ndarray], tensors: Sequence[TensorInfo]):
        if len(parts) != len(tensors):
            raise ValueError(f"SplitRow: {len(parts)} arrays for a table of {len(tensors)} tensors")
        for x, t in zip(parts, tensors):
            if x.dtype != np.float32 or x.ndim != 1 or x.shape[0] != t.size or not x.flags.c_contiguous:
                raise ValueError(f"SplitRow: tensor {t.name!r} needs a contiguous float32 array of {t.size} "
                                 f"entries, got {x.dtype} of shape {x.shape}")
        self.parts = list(parts)
        self.starts = np.array([t.offset for t in tensors], dtype=np.int64)
        self.ends = self.starts + np.array([t.size for t in tensors], dtype=np.int64)
        self.d = int(self.ends[-1]) if len(tensors) else 0

    def piece(self, a: int, b: int, out: np.ndarray | None = None) -> np.ndarray:
        """Entries ``[a, b)`` as one contiguous array: a view of the tensor that holds them
        all, else a copy into ``out[: b - a]`` (a new array when ``out`` is None)."""
        i = int(np.searchsorted(self.ends, a, side="right"))  # the tensor holding entry a (never size 0)
        if i < len(self.parts) and b <= self.ends[i]:
            s = int(self.starts[i])
            return self.parts[i][a - s : b - s]
        out = np.empty(b - a, dtype=np.float32) if out is None else out[: b - a]
        at = a
        while at < b:
            s, e = int(self.starts[i]), int(self.ends[i])
            m = min(e, b) - at
            out[at - a : at - a + m] = self.parts[i][at - s : at - s + m]
            at += m
            i += 1
        return out

    def flat(self, out: np.ndarray | None = None) -> np.ndarray:
        """The whole row, joined into ``out`` (float32, length d) or a new array."""
        return self.piece(0, self.d, out) if self.d else np.zeros(0, np.float32)


def _split_sums(split: SplitRow, w: np.ndarray | None, lo: int, hi: int, starts, ends, idx, gg, ww, gw) -> None:
    """One unit of :func:`_scalar_plan` (entries ``[lo, hi)``) of a :class:`SplitRow` gradient:
    the kernel's per-tensor loops over the same entries as on the flat row (a large tensor is
    read in place; a run of small ones is joined first). ``w`` None: ``||G||^2`` alone."""
    g = split.piece(lo, hi)
    if w is None:
        kernels.tensor_sums(None, g, starts - lo, ends - lo, idx, np.empty(len(gg)), gg, np.empty(len(gg)))
    else:
        kernels.tensor_sums(g, w[lo:hi], starts - lo, ends - lo, idx, gg, ww, gw)


class _FastSketcher:
    """``format.Sketcher`` through the compiled kernel, with the same float64 sums bit for bit.

    The hash of every entry is one int32 (``kernels.sketch_codes``): 4 bytes read per entry
    instead of the 16 of an int64 bucket and a float64 sign.
    """

    def __init__(self, tensors: Sequence[TensorInfo], plan: fmt.SketchPlan, twin: "_FastSketcher | None" = None):
        self.plan = plan
        if twin is not None and twin.plan.to_json() == plan.to_json():
            # the same hashes (gradient and weights of one sketch tier): shared, and both rows
            # sketched in one sweep (:meth:`both`)
            self.__dict__.update({k: twin.__dict__[k] for k in ("starts", "sizes", "offsets", "codes", "code_starts")})
            self.twin = twin
            self.out = np.empty(plan.dim, dtype=np.float64)
            self.bits = tuple(np.empty_like(b) for b in twin.bits)
            return
        self.twin = None
        self.starts = np.array([t.offset for t in tensors], dtype=np.int64)
        self.sizes = np.array([t.size for t in tensors], dtype=np.int64)
        self.offsets = np.array(plan.offsets, dtype=np.int64)
        codes, code_starts, at = [], [], 0
        for i, t in enumerate(tensors):
            if plan.exact[i]:
                code_starts.append(-1)
                continue
            codes.append(kernels.sketch_codes(*fmt.sketch_hashes(plan, i, t.size)))
            code_starts.append(at)
            at += t.size
        self.codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)
        self.code_starts = np.array(code_starts, dtype=np.int64)
        self.out = np.empty(plan.dim, dtype=np.float64)
        nb = (int(self.sizes.sum()) + 7) // 8
        self.bits = (np.empty(nb, dtype=np.uint8), np.empty(nb, dtype=np.uint8))

    def __call__(self, x: "np.ndarray | SplitRow") -> np.ndarray:
        if isinstance(x, SplitRow):
            return kernels.sketch_parts_into(x.parts, None, self.starts, self.sizes, self.offsets, self.codes,
                                             self.code_starts, self.out)
        return kernels.sketch_into(x, self.starts, self.sizes, self.offsets, self.codes, self.code_starts, self.out)

    def both(self, x: "np.ndarray | SplitRow", y: np.ndarray) -> np.ndarray:
        """The sketches of two rows (columns 0 and 1; float64, bit for bit those of ``self(x)``
        and ``self(y)``) in one sweep over the shared hash codes."""
        out = self.out2()
        if isinstance(x, SplitRow):
            return kernels.sketch_parts_into(x.parts, y, self.starts, self.sizes, self.offsets, self.codes,
                                             self.code_starts, out)
        return kernels.sketch2_into(x, y, self.starts, self.sizes, self.offsets, self.codes, self.code_starts, out)

    def out2(self) -> np.ndarray:
        """The float64 (dim, 2) buffer of two rows' sketches."""
        out = getattr(self, "_out2", None)
        if out is None:
            out = self._out2 = np.empty((self.plan.dim, 2), dtype=np.float64)
        return out

    def signs(self, x: "np.ndarray | SplitRow") -> tuple[np.ndarray, np.ndarray]:
        """``format.pack_signs(x)`` into this sketcher's buffers (sign bits, non-zero bits)."""
        sb, nz = self.bits
        if isinstance(x, SplitRow):
            for part, pos in zip(x.parts, x.starts):
                kernels.pack_signs_at(part, int(pos), sb, nz)
        else:
            kernels.pack_signs_into(x, sb, nz)
        return sb, nz


# --------------------------------------------------------------------------------------
# Direct chunk writes
# --------------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    """fsync a directory (makes the names created or renamed in it durable)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mkdirs(parent: Path, durable: bool) -> None:
    """Create ``parent`` (and missing ancestors); with ``durable``, fsync each new entry's directory."""
    new = []
    p = parent
    while not p.exists():
        new.append(p)
        p = p.parent
    parent.mkdir(parents=True, exist_ok=True)
    if durable:
        for q in reversed(new):
            _fsync_dir(q.parent)


def atomic_put(path: Path, data, durable: bool = False) -> None:
    """Write ``data`` (bytes-like) to ``path`` through a temporary file and an atomic rename.

    A rename over an existing file, not an exchange (``renameat2(RENAME_EXCHANGE)``, ~0.1 ms
    cheaper here): ext4 starts writeback of a file renamed over another one (``auto_da_alloc``),
    so after a power cut the root metadata is the old or the new one, never an empty file.

    With ``durable``, the file is fsynced before the rename and the directory after it, so the
    new content survives a power cut once this returns."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{next(_TMP_COUNTER)}.partial")
    try:
        f = open(tmp, "wb")
    except FileNotFoundError:
        _mkdirs(path.parent, durable)
        f = open(tmp, "wb")
    try:
        with f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


_local = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A float32 buffer of n entries owned by the calling thread, reused from row to row."""
    buf = getattr(_local, "buf", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.buf = np.empty(n, dtype=np.float32)
    return buf[:n]


def _put_direct(path: Path, data, durable: bool = False) -> None:
    """Write a chunk of an uncommitted row in place (a torn file is rewritten before commit).
    With ``durable``, the file and its directory entry are fsynced before this returns."""
    try:
        f = open(path, "wb")
    except FileNotFoundError:
        _mkdirs(path.parent, durable)
        f = open(path, "wb")
    with f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    if durable:
        _fsync_dir(path.parent)


def chunk_encoder(arr: zarr.Array, parts: bool = False) -> Callable[[np.ndarray], bytes] | None:
    """An encoder producing exactly the chunk bytes zarr would store for ``arr``.

    Known pipelines: ``bytes`` (native little endian) optionally followed by one Blosc or Zstd
    compressor, mirroring ``zarr.codecs.BloscCodec`` / ``ZstdCodec`` (both call numcodecs the
    same way). Returns None for anything else (the caller then writes through zarr).
    """
    from zarr.codecs import ShardingCodec

    codecs = list(arr.metadata.codecs)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        if _shard_index_ok(codecs[0]):
            return codecs_encoder(list(codecs[0].codecs), arr.dtype, parts)
        return None
    return codecs_encoder(codecs, arr.dtype, parts)


def _shard_index_ok(sc) -> bool:
    """A shard layout this module writes: index first, plain little-endian uint64 pairs."""
    from zarr.codecs import BytesCodec

    loc = getattr(sc.index_location, "value", sc.index_location)
    idx = list(sc.index_codecs)
    return loc == "start" and len(idx) == 1 and isinstance(idx[0], BytesCodec) and \
        getattr(idx[0].endian, "value", idx[0].endian) == "little"


def codecs_encoder(codecs: list, dtype, parts: bool = False) -> Callable[[np.ndarray], bytes] | None:
    """The encoder of a chunk codec list (``bytes``, at most one compressor, ``crc32c``).

    With ``parts``, the encoder returns the chunk as a list of buffers to write one after the
    other (the payload, then its crc32c), saving the copy that joins them; an uncompressed
    payload is then a view of the chunk itself, valid until the caller reuses the chunk's memory."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ZstdCodec

    if not codecs or not isinstance(codecs[0], BytesCodec):
        return None
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    if np.dtype(dtype).itemsize > 1 and endian != sys.byteorder:
        return None
    rest = codecs[1:]
    crc = bool(rest) and isinstance(rest[-1], Crc32cCodec)
    if crc:
        rest = rest[:-1]
    if len(rest) > 1:
        return None
    if not rest and parts:
        enc = _readonly_bytes
    elif not rest:
        enc = lambda chunk: np.ascontiguousarray(chunk).tobytes()  # noqa: E731
    elif isinstance(rest[0], BloscCodec):
        c = rest[0]
        shuffle = {"noshuffle": 0, "shuffle": 1, "bitshuffle": 2}[getattr(c.shuffle, "value", c.shuffle)]
        config = {"cname": getattr(c.cname, "value", c.cname), "clevel": c.clevel, "shuffle": shuffle,
                  "blocksize": c.blocksize, "typesize": c.typesize}
        blosc = numcodecs.Blosc.from_config(config)
        enc = lambda chunk: blosc.encode(np.ascontiguousarray(chunk).view(np.uint8))  # noqa: E731
    elif isinstance(rest[0], ZstdCodec):
        zstd = numcodecs.Zstd(level=rest[0].level, checksum=rest[0].checksum)
        enc = lambda chunk: zstd.encode(np.ascontiguousarray(chunk).view(np.uint8))  # noqa: E731
    else:
        return None
    if parts:
        if not crc:
            return lambda chunk: [enc(chunk)]

        def enc_parts(chunk):
            payload = enc(chunk)
            return [payload, _CRC.pack(google_crc32c.value(payload))]

        return enc_parts
    if not crc:
        return enc
    return lambda chunk: with_crc32c(enc(chunk))


def lz4_frames(arr: zarr.Array) -> str | None:
    """``"shuffle"`` when ``arr``'s chunks are float32 ``bytes`` (little endian) + Blosc lz4
    with byte shuffle, typesize 4 (+ crc32c), as the rounded tier stores them, ``"plain"``
    for the same without shuffle (the lossless tier), inside shards or not; None otherwise.
    The writer encodes the first with :func:`capture.kernels.shuffle_frame_into`, the second
    with :func:`capture.kernels.plain_frame_into`."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec

    codecs = list(arr.metadata.codecs)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        codecs = list(codecs[0].codecs)
    if codecs and isinstance(codecs[-1], Crc32cCodec):
        codecs = codecs[:-1]
    if np.dtype(arr.dtype) != np.float32 or len(codecs) != 2 or sys.byteorder != "little":
        return None
    b, c = codecs
    if not (isinstance(b, BytesCodec) and getattr(b.endian, "value", b.endian) == "little"
            and isinstance(c, BloscCodec) and getattr(c.cname, "value", c.cname) == "lz4" and c.typesize == 4):
        return None
    return {"shuffle": "shuffle", "noshuffle": "plain"}.get(getattr(c.shuffle, "value", c.shuffle))


def _join_scratch(n: int) -> np.ndarray:
    """A float32 buffer of n entries owned by the calling thread (a chunk joined from pieces)."""
    buf = getattr(_local, "join", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.join = np.empty(n, dtype=np.float32)
    return buf[:n]


def _frame_scratch(n: int) -> np.ndarray:
    """A uint8 buffer of n bytes owned by the calling thread (the frame of one chunk)."""
    buf = getattr(_local, "frame", None)
    if buf is None or buf.shape[0] < n:
        buf = _local.frame = np.empty(n, dtype=np.uint8)
    return buf[:n]


def _readonly_bytes(chunk: np.ndarray) -> np.ndarray:
    """A read-only uint8 view of the chunk's bytes (google_crc32c takes read-only buffers only)."""
    view = np.ascontiguousarray(chunk).view(np.uint8).view()
    view.flags.writeable = False
    return view


def with_crc32c(data) -> bytes:
    """``data`` followed by its crc32c, 4 bytes little endian (zarr v3's ``crc32c`` codec)."""
    data = bytes(data)
    return data + _CRC.pack(google_crc32c.value(data))


def _is_raw(arr: zarr.Array) -> bool:
    """True when chunks are the array's native bytes (no compressor): rows can be patched in place."""
    from zarr.codecs import BytesCodec, Crc32cCodec

    codecs = list(arr.metadata.codecs)
    if codecs and isinstance(codecs[-1], Crc32cCodec):
        codecs = codecs[:-1]  # the checksum is rewritten after each row (see _ArrayWriter.set)
    if len(codecs) != 1 or not isinstance(codecs[0], BytesCodec):
        return False
    endian = getattr(codecs[0].endian, "value", codecs[0].endian)
    return arr.dtype.itemsize == 1 or endian == sys.byteorder


_EMPTY_ENTRY = b"\xff" * 16  # a shard index entry of a chunk that is not there (2**64 - 1 twice)
_ENTRY = struct.Struct("<QQ")


#: First allocation of a shard file's blocks ahead of its appends (then doubled as it fills).
PREALLOC = 4 << 20


def _linux_libc(name: str, *argtypes: str):
    """The C library's function ``name`` with ``argtypes`` (ctypes type names) returning an int,
    errno kept for ``ctypes.get_errno``; None off Linux or where the library lacks it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = [getattr(ctypes, t) for t in argtypes]
    fn.restype = ctypes.c_int
    return fn


# Linux's fallocate(fd, mode, offset, len) (not glibc's posix_fallocate, which writes zeros
# block by block where the file system has no fallocate), and sync_file_range(fd, offset,
# nbytes, flags) (not in Python's os module)
_FALLOCATE = _linux_libc("fallocate64", "c_int", "c_int", "c_int64", "c_int64")
_SYNC_FILE_RANGE = _linux_libc("sync_file_range", "c_int", "c_int64", "c_int64", "c_uint")
_SFR_WAIT_BEFORE, _SFR_WRITE, _SFR_WAIT_AFTER = 1, 2, 4

#: page_cache="drop": bytes of appended chunks whose writeback may be under way (beside the
#: last row's) before the writer waits for the oldest and drops it from the page cache.
WRITE_BEHIND = 64 << 20
#: page_cache="drop": a shard file's appended bytes are handed over in ranges of at least this
#: much (whole pages), so that small rows do not cost a range (and its system calls) each.
MIN_RANGE = 1 << 20
#: page_cache="drop": ranges in flight beyond which the oldest are waited for, whatever their bytes.
MAX_RANGES = 1024
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


#: files holding this process's cgroup memory limit (v2, v1); "max" or absent: no limit
_CGROUP_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def _memory_limit() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit if lower."""
    try:
        mem = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        mem = 16 << 30
    for limit in _CGROUP_LIMITS:
        try:
            with open(limit) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            mem = min(mem, int(text))
    return int(mem)


def _keep_first() -> int:
    """page_cache="auto": bytes of a store's chunks kept in the page cache before it drops
    behind: 1 GiB, or 1/16 of the memory this process may use (:func:`_memory_limit`) where
    that is less."""
    return int(min(1 << 30, _memory_limit() // 16))


PAGE_CACHE_MODES = ("auto", "keep", "drop")


def check_page_cache(page_cache, who: str = "") -> None:
    """Refuse a ``page_cache`` that is not one of :data:`PAGE_CACHE_MODES`, in one line."""
    if page_cache not in PAGE_CACHE_MODES:
        raise ValueError(f"{who}page_cache={page_cache!r}: use 'auto' (the default), 'keep' or 'drop'")


def _errno() -> int:
    import ctypes

    return ctypes.get_errno()


class _Handle:
    """A shard file's second descriptor for the write-behind, shared by its ranges in flight.

    Opened anew rather than ``os.dup``-ed: the kernel reports a write-back error once per open
    file description, so the one it reports to this descriptor is still reported to the
    writer's own at its ``fsync`` (``durable``). Closed when the shard file is closed and no
    range holds it."""

    __slots__ = ("fd", "refs")

    def __init__(self, path: Path):
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self.refs = 1  # the shard file's own

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)
            self.fd = -1


class _WriteBehind:
    """``page_cache="drop"``: keep a store's chunk bytes out of the page cache as they are written.

    After each row, what its chunks appended to each shard file is handed to the kernel's
    writeback (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: starts it, does not wait), in
    ranges of whole pages of at least :data:`MIN_RANGE` bytes (the page a row ends in goes
    with a later range, so it is written back once and never dropped while the next append
    fills it; what is left of a shard file goes when the file is complete). Once more than
    :data:`WRITE_BEHIND` bytes beside the newest row's (or :data:`MAX_RANGES` ranges) are in
    flight, the oldest ranges are waited for and dropped (``posix_fadvise(
    POSIX_FADV_DONTNEED)``: clean pages only, so nothing that is not on the disk leaves
    memory). The page cache then holds the window in flight and less than ``MIN_RANGE`` plus
    a page of each open shard file, not everything written, and the pages it frees are the
    ones the next rows reuse. Each shard file has one extra descriptor (:class:`_Handle`).

    ``keep_first`` (``page_cache="auto"``): the first bytes a writer appends stay in the page
    cache as with ``"keep"`` (a short run is read back from memory); only what comes after
    them is written back and dropped.

    Not durability: commits are as with ``page_cache="keep"`` (``durable`` fsyncs). A write
    error the kernel reports while waiting (EIO, ENOSPC...) is raised as :class:`OSError`
    naming the file, where the page cache would have kept it quiet, and kept in
    :attr:`failed`: the writer then commits no further row (:meth:`StoreWriter.commit`). A
    file system that cannot (EINVAL, ENOSYS, ESPIPE, EOPNOTSUPP) turns this off for the
    writer; a transient ENOMEM or EAGAIN leaves that range in the page cache.
    """

    _UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ESPIPE, errno.EOPNOTSUPP}
    _TRANSIENT = {errno.ENOMEM, errno.EAGAIN, errno.EINTR}

    def __init__(self, keep_first: int = 0):
        self.lag = WRITE_BEHIND
        self.keep_first = int(keep_first)
        self.kept = 0  # bytes let through to the page cache (keep_first)
        self.on = _SYNC_FILE_RANGE is not None
        self.failed: OSError | None = None
        self.pending: collections.deque = collections.deque()  # (handle, lo, hi, path), oldest first
        self.bytes = 0
        self.row_bytes = 0  # of the newest row: never waited for at its own row
        self.dropped = 0  # bytes dropped so far (tests, benchmarks)

    def hand(self, f: "_ShardFile", complete: bool = False) -> None:
        """Start the writeback of what was appended to shard file ``f`` since its last range:
        whole pages, once there are at least MIN_RANGE bytes of them, or everything when the
        file is ``complete`` (no row will append to it again)."""
        lo = f.marked
        hi = f.end if complete else f.end // _PAGE * _PAGE
        if hi - lo < (1 if complete else MIN_RANGE):
            return
        f.marked = hi
        if self.kept < self.keep_first:
            take = min(hi - lo, self.keep_first - self.kept)
            self.kept += take
            lo += take
        if not self.on or hi <= lo or f.fd is None:
            return
        if f.wb is None:
            try:
                f.wb = _Handle(f.path)
            except OSError:
                return  # this file stays in the page cache
        if _SYNC_FILE_RANGE(f.wb.fd, lo, hi - lo, _SFR_WRITE) != 0:
            self._failed(_errno(), f.path)
            return
        f.wb.refs += 1
        self.pending.append((f.wb, lo, hi, f.path))
        self.bytes += hi - lo
        self.row_bytes += hi - lo

    def row_done(self) -> None:
        """After a row's ranges are handed over: wait for and drop the oldest beyond the window."""
        newest, self.row_bytes = self.row_bytes, 0
        while self.pending and (self.bytes - newest > self.lag or len(self.pending) > MAX_RANGES):
            self._drop()

    def _drop(self) -> None:
        handle, lo, hi, path = self.pending.popleft()
        self.bytes -= hi - lo
        try:
            if _SYNC_FILE_RANGE(handle.fd, lo, hi - lo, _SFR_WAIT_BEFORE | _SFR_WRITE | _SFR_WAIT_AFTER) != 0:
                self._failed(_errno(), path)
                return
            try:
                os.posix_fadvise(handle.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                return  # advice only: these pages stay in the page cache
            self.dropped += hi - lo
        finally:
            handle.release()

    def _failed(self, err: int, path: Path) -> None:
        if err in self._TRANSIENT:
            return
        self.close()
        self.on = False
        if err in self._UNSUPPORTED:
            return  # this file system does not: the page cache keeps the store's pages
        self.failed = OSError(
            err, f"writing {path} back to the disk failed: {os.strerror(err)}; no further row is committed, and "
                 "without durable=True rows committed before it may not be on the disk either (check the disk "
                 "and its free space; gradtrace verify tells which steps read whole, then resume)")
        raise self.failed

    def close(self) -> None:
        """Drop what is clean of the ranges still in flight (no wait) and release them."""
        while self.pending:
            handle, lo, hi, _ = self.pending.popleft()
            try:
                os.posix_fadvise(handle.fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                handle.release()
        self.bytes = self.row_bytes = 0


class _ShardFile:
    """One open shard file of a row-chunked array: chunks are appended, then indexed.

    The file starts with the shard index (``rows x chunks`` entries of little-endian uint64
    ``(offset, nbytes)``, 16 bytes each, no checksum), followed by chunk bytes in the order
    they were written. Writing a chunk appends its bytes (an offset taken under a lock, so the
    writer's threads can write one row's chunks at once) and then writes its index entry:
    a reader that follows an entry finds the whole chunk behind it. Rewriting a chunk (a row
    written again after a rewind or a resume) appends anew and leaves the old bytes unused.
    The entries of committed rows never change, so a kill cannot reach committed data.
    """

    def __init__(self, path: Path, n_entries: int, fresh: bool, durable: bool, ahead: bool = True):
        self.path = path
        self.index_bytes = 16 * int(n_entries)
        self.lock = threading.Lock()
        self.created = False
        self.alloc = 0  # bytes of the file allocated (_grow); the file may hold zeros past self.end
        self.ahead = ahead  # allocate blocks ahead (_grow): only where every chunk ends in its crc32c
        self.end = 0
        if fresh:  # the shard's first row is being written: nothing in it is committed
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            except FileNotFoundError:
                _mkdirs(path.parent, durable)
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self.fd = fd
            try:
                self._pwrite(_EMPTY_ENTRY * int(n_entries), 0)
            except BaseException:
                self.close()
                raise
            self.end = self.index_bytes
            self.created = True
        else:
            try:
                self.fd = os.open(path, os.O_RDWR)
            except FileNotFoundError as err:
                raise fmt.StoreError(
                    f"shard file {path} is missing although committed rows are in it: the store is "
                    "damaged; record to a new path (gradtrace verify lists what is left)."
                ) from err
            size = os.fstat(self.fd).st_size
            if size < self.index_bytes:
                os.close(self.fd)
                raise fmt.StoreError(
                    f"shard file {path} has {size} bytes, less than its index ({self.index_bytes}): "
                    "the store is damaged; record to a new path."
                )
            # appends go after the last chunk an index entry points to, over the zeros a
            # killed writer's allocation ahead may have left (close trims what is left of them)
            index = np.frombuffer(os.pread(self.fd, self.index_bytes, 0), dtype="<u8").reshape(-1, 2)
            used = index[index[:, 0] != np.uint64(2**64 - 1)]
            ends = used[:, 0] + used[:, 1]
            self.end = int(min(size, max(self.index_bytes, int(ends.max()) if ends.size else 0)))
            self.alloc = size
        self.marked = self.end  # appends before this were handed to page_cache="drop" (_WriteBehind)
        self.wb: _Handle | None = None  # its descriptor for the write-behind, made at its first range

    def _pwrite(self, data, offset: int) -> None:
        if os.pwrite(self.fd, data, offset) != len(data):
            raise OSError(f"short write to {self.path}")

    def _grow(self, n: int) -> None:
        """Allocate the file's blocks ahead of the appends (doubling, from 8 chunks of ``n``
        bytes, at most PREALLOC at first): a write into allocated blocks costs ext4 less CPU
        than one that allocates as it goes (0.5-0.6 against 0.9 ms per 3.7 MB on the test VM).
        :meth:`close` trims the file to its chunks; a killed writer leaves zeros past them,
        which no index entry points to. Linux's ``fallocate`` only: where the file system
        cannot (or the disk has no room for the blocks ahead), plain appends from then on. Not
        for chunks without a crc32c (stores from before the crc codec): there an index entry
        that a power cut left pointing into allocated zeros would pass the readers' one other
        check, an entry past the end of the file."""
        want = max(self.end, 2 * self.alloc, self.end + min(8 * n, PREALLOC))
        if not self.ahead or _FALLOCATE is None or _FALLOCATE(self.fd, 0, self.alloc, want - self.alloc) != 0:
            self.alloc = 1 << 62  # never again for this file; a full disk fails at the write
            return
        self.alloc = want

    def put(self, entry: int, parts: list) -> None:
        """Append one chunk, given as buffers written one after the other, and index it."""
        n = sum(memoryview(p).nbytes for p in parts)
        with self.lock:
            off, self.end = self.end, self.end + n
            if self.end > self.alloc:
                self._grow(n)
        if os.pwritev(self.fd, parts, off) != n:
            raise OSError(f"short write to {self.path}")
        self._pwrite(_ENTRY.pack(off, n), 16 * entry)

    def clear(self, entry: int) -> None:
        self._pwrite(_EMPTY_ENTRY, 16 * entry)

    def sync(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            try:
                if self.alloc > self.end and self.alloc < 1 << 62:
                    os.ftruncate(fd, self.end)  # the blocks allocated ahead and not used
            finally:
                os.close(fd)
                if self.wb is not None:
                    wb, self.wb = self.wb, None
                    wb.release()  # closed now, or when the last range in flight is dropped


class _ArrayWriter:
    """Writes rows of one (step, ...) array of the store.

    Modes:
        ``shards``: one row per chunk (``grad``, ``weight``, sketch arrays), chunks gathered
            in shard files of several rows (:class:`_ShardFile`, the layout of a local store).
        ``rows``: one row per chunk, one file (or object) per chunk; a row is encoded and
            written chunk by chunk.
        ``patch``: uncompressed per-step arrays; a row's bytes are written in place into its
            chunk file, created whole when its block starts.
        ``block``: compressed per-step arrays (stores from before the format went
            uncompressed): the current block is kept in memory and its chunk rewritten whole,
            by atomic rename.
        ``zarr``: codecs this module does not know: written through zarr.

    With a ``sink`` (a store at a URL, :class:`capture.sink.RemoteSink`), chunks are put as
    whole objects: ``rows`` stages a row's chunks (``StoreWriter.append`` / ``commit`` put
    them, every array's in one batch), and per-step arrays use ``block`` mode with the put
    deferred to the commit (:meth:`pending`), one put per changed block per commit.
    """

    def __init__(self, arr: zarr.Array, root: Path, spec: fmt.ArraySpec, sink=None):
        self.arr = arr
        self.spec = spec
        self.sink = sink  # None: a local directory (file calls); else whole-object puts
        self.dir = root / arr.path if sink is None else None
        self.meta = arr.metadata
        self.encode = chunk_encoder(arr)
        from zarr.codecs import Crc32cCodec

        self.crc = bool(self.meta.codecs) and isinstance(list(self.meta.codecs)[-1], Crc32cCodec)
        self.durable = False  # StoreWriter(durable=True) sets it: fsync chunk files
        self._blockbuf: bytearray | None = None  # patch mode with crc: the ready block's bytes
        self._dirty_rows = (1 << 62, 0)  # patch mode with crc: rows of _blockbuf not yet in the file
        self.chunks = tuple(int(c) for c in self.meta.chunk_grid.chunk_shape)
        self.shard: tuple[int, int] | None = None  # (rows, chunks) of a shard file
        from zarr.codecs import ShardingCodec

        sharding = [c for c in self.meta.codecs if isinstance(c, ShardingCodec)]
        if sharding and self.encode is not None:
            self.encode_parts = chunk_encoder(arr, parts=True)
            inner = tuple(int(c) for c in sharding[0].chunk_shape)
            self.shard = (self.chunks[0] // inner[0], self.chunks[1] // inner[1])
            self.chunks = inner
            self.crc = isinstance(list(sharding[0].codecs)[-1], Crc32cCodec)
        self._shards: dict[tuple[int, int], _ShardFile] = {}
        self._done_shards: list[_ShardFile] = []
        self._shard_lock = threading.Lock()
        self._dir_dirty = False  # a shard file was created since the directory's last fsync
        self.dtype = np.dtype(spec.dtype)
        self.fill = np.array(spec.fill_value, dtype=self.dtype)
        self.width = spec.width
        if self.encode is None:
            self.mode = "zarr"
        elif self.shard is not None:
            self.mode = "shards"
        elif spec.row_chunked:
            self.mode = "rows"
        elif _is_raw(arr) and self.chunks[0] >= 1 and (self.width is None or self.chunks[1] == self.width):
            self.mode = "patch"
        else:
            self.mode = "block"
        if sink is not None and self.mode == "patch":
            self.mode = "block"  # objects are immutable: the block is re-put whole at each commit
        # the rounded and lossless tiers' chunks: Blosc frames written by a compiled kernel
        # (rounding, shuffle and frame in one pass; kernels.shuffle_frame_into and
        # plain_frame_into), not by c-blosc; None: through self.encode
        self.frames = lz4_frames(arr) if spec.row_chunked and self.mode != "zarr" and self.chunks[1] >= 128 \
            else None
        if spec.attrs.get("gradtrace_tier", {}).get("small"):
            self.frames = None  # rounded:K:small: c-blosc's LZ4 search over every plane
        self._frame_cap = kernels.frame_capacity(self.chunks[1]) if self.frames else 0
        self._dirty = False  # remote block mode: the block changed since its last put
        self._hw = -1  # remote: highest row index whose chunks this writer put (a new store)
        if spec.row_chunked:
            cw = self.chunks[1]
            self.n_col_chunks = -(-int(spec.width) // cw)
            self._pad = np.empty(cw, dtype=self.dtype)
        self.row_shape = () if self.width is None else (int(self.width),)
        self.row_bytes = self.dtype.itemsize * (1 if self.width is None else int(self.width))
        self._ready_block = -1
        self._fd: int | None = None  # open chunk file of the ready block (patch mode)
        self.block_index = -1
        self.block: np.ndarray | None = None

    def _key(self, coords) -> Path:
        return self.dir / self.meta.encode_chunk_key(tuple(coords))

    def _rel(self, coords) -> str:
        """The chunk's key relative to the store root (remote)."""
        return f"{self.arr.path}/{self.meta.encode_chunk_key(tuple(coords))}"

    def _block_coords(self, b: int) -> tuple[int, ...]:
        return (b,) if self.width is None else (b, 0)

    # row-chunked arrays ------------------------------------------------------------------
    def write_row(self, n: int, vec: np.ndarray) -> None:
        for task in self.row_tasks(n, vec):
            task()

    def row_tasks(self, n: int, vec: np.ndarray, keepbits: int | None = None) -> list[Callable[[], None]]:
        """Independent tasks (one per chunk) that together write row n.

        With ``keepbits``, each task first rounds its chunk (``format.bitround``, through the
        compiled kernel) into a buffer of its thread: the rounding is spread over the writer
        threads with the encoding instead of a serial pass over the row before them.
        """
        if self.mode == "zarr":

            def through_zarr():
                self.arr[n, :] = vec if keepbits is None else fmt.bitround(vec, keepbits)

            return [through_zarr]
        if self.sink is not None:  # one task: encode the row's chunks and stage them
            self._hw = max(self._hw, n)
            return [functools.partial(self._put_row_remote, n, vec, keepbits)]
        cw = self.chunks[1]
        if isinstance(vec, SplitRow):  # each task takes its chunk from the pieces (see _put_split)
            return [functools.partial(self._put_split, (n, j), vec, keepbits) for j in range(self.n_col_chunks)]
        tasks = []
        for j in range(self.n_col_chunks):
            piece = vec[j * cw : (j + 1) * cw]
            if piece.shape[0] < cw:  # edge chunk: stored full size, padded with the fill value
                self._pad[: piece.shape[0]] = piece
                self._pad[piece.shape[0] :] = self.fill
                piece = self._pad
            tasks.append(functools.partial(self._put_chunk, (n, j), piece, keepbits))
        return tasks

    def _put_split(self, coords, row: "SplitRow", keepbits: int | None) -> None:
        """Chunk ``coords`` of a :class:`SplitRow`: a view of one tensor where the chunk lies in
        it, else its pieces joined into a chunk-sized buffer of this thread (cache-warm for
        the encoder that reads it next); the edge chunk padded with the fill value."""
        cw = self.chunks[1]
        a = coords[1] * cw
        b = min(a + cw, row.d)
        if b - a < cw:
            piece = self._pad
            piece[: b - a] = row.piece(a, b)
            piece[b - a :] = self.fill
        else:
            piece = row.piece(a, b, _join_scratch(cw))
        self._put_chunk(coords, piece, keepbits)

    def _frame_parts(self, piece: np.ndarray, keepbits: int | None) -> list:
        """The chunk of ``bitround(piece, keepbits)`` as [Blosc frame, crc32c] (a view of this
        thread's frame buffer, valid until its next chunk) for a ``frames`` array."""
        buf = _frame_scratch(self._frame_cap)
        if self.frames == "plain":
            n = kernels.plain_frame_into(piece, buf, keepbits=keepbits)
        else:
            n = kernels.shuffle_frame_into(piece, keepbits, buf)
        view = buf[:n].view()
        view.flags.writeable = False  # google_crc32c takes read-only buffers only
        return [view, _CRC.pack(google_crc32c.value(view))] if self.crc else [view]

    def _chunk_bytes(self, piece: np.ndarray, keepbits: int | None) -> bytes:
        if self.frames:
            return b"".join(self._frame_parts(piece, keepbits))  # one copy off the frame buffer
        if keepbits is not None:
            piece = kernels.bitround_into(piece, keepbits, _scratch(piece.shape[0]))
        return self.encode(piece)

    def _put_chunk(self, coords, piece: np.ndarray, keepbits: int | None = None) -> None:
        if self.shard is not None:
            shard, entry = self._shard_of(*coords)
            if self.frames:
                shard.put(entry, self._frame_parts(piece, keepbits))
                return
            if keepbits is not None:
                piece = kernels.bitround_into(piece, keepbits, _scratch(piece.shape[0]))
            shard.put(entry, self.encode_parts(piece))
            return
        if self.sink is not None:  # one chunk object, staged (capture.sharded: each rank puts its own)
            self._hw = max(self._hw, coords[0])
            self.sink.stage({self._rel(coords): self._chunk_bytes(piece, keepbits)})
            return
        _put_direct(self._key(coords), self._chunk_bytes(piece, keepbits), self.durable)

    def _put_row_remote(self, n: int, vec: np.ndarray, keepbits: int | None) -> None:
        """Encode row n's chunks and stage them: ``StoreWriter.append`` puts every array's
        chunks of the row in one concurrent batch (with the per-step blocks when it commits)."""
        cw = self.chunks[1]
        items = {}
        for j in range(self.n_col_chunks):
            piece = vec[j * cw : (j + 1) * cw]
            if piece.shape[0] < cw:
                pad = np.full(cw, self.fill, dtype=self.dtype)
                pad[: piece.shape[0]] = piece
                piece = pad
            items[self._rel((n, j))] = self._chunk_bytes(piece, keepbits)
        self.sink.stage(items)

    def clear_row(self, n: int) -> None:
        """Remove row n's chunks (they then read as the fill value)."""
        if self.mode == "zarr":  # codecs this module does not write (a shard key is not a row's chunk)
            self.arr[n, :] = self.fill
            return
        if self.sink is not None:  # remote stores are new: only rows this writer put have chunks
            if n <= self._hw:
                self.sink.delete([self._rel((n, j)) for j in range(self.n_col_chunks)])
            return
        for j in range(self.n_col_chunks):
            if self.shard is not None:
                shard, entry = self._shard_of(n, j)
                shard.clear(entry)
                continue
            try:
                self._key((n, j)).unlink()
            except FileNotFoundError:
                pass

    def _shard_of(self, n: int, j: int) -> tuple[_ShardFile, int]:
        """The open shard file holding chunk (n, j) and the chunk's entry in its index.

        Row n is being written, so every row after it is uncommitted: the first row of a shard
        starts its file afresh. Called from the row's tasks; the rows of a shard are written by
        one thread at a time (a row's tasks finish before the next row starts)."""
        R, k = self.shard
        key = (n // R, j // k)
        entry = (n % R) * k + j % k
        f = self._shards.get(key)
        if f is None or (n % R == 0 and not f.created):
            with self._shard_lock:
                f = self._shards.get(key)
                if f is None or (n % R == 0 and not f.created):
                    if f is not None:
                        self._shards.pop(key)
                        f.close()
                    f = _ShardFile(self._key(key), R * k, fresh=n % R == 0, durable=self.durable,
                                   ahead=self.crc)
                    self._retire(key[0])
                    self._shards[key] = f
        return f, entry

    def finish_row(self, behind: "_WriteBehind | None" = None) -> None:
        """After a row's tasks: hand the bytes the row appended to ``behind`` (``page_cache=
        "drop"``); with shards of one row, fsync (``durable``) and close that row's shard files
        now, so that a wide model's rows (tens of files each) do not pile up open file
        descriptors while commits are batched; the directory is fsynced at the next sync."""
        if behind is not None and self.shard is not None:
            one_row = self.shard[0] == 1  # closed below: complete
            for f in list(self._shards.values()):
                behind.hand(f, complete=one_row)
            for f in self._done_shards:  # complete: their row blocks are behind the writer
                behind.hand(f, complete=True)
        if self.shard is None or self.shard[0] != 1 or not self._shards:
            return
        with self._shard_lock:
            files, self._shards = list(self._shards.values()), {}
        for f in files:
            if self.durable:
                f.sync()
            self._dir_dirty |= f.created
            f.close()

    def _retire(self, b: int) -> None:
        """Move open shard files of row blocks before ``b`` to the list closed after the next sync."""
        for key in [key for key in self._shards if key[0] < b]:
            self._done_shards.append(self._shards.pop(key))

    # per-step arrays ---------------------------------------------------------------------
    def set(self, n: int, value) -> None:
        """Write row n of a per-step array (rows before n are committed and left alone)."""
        R = self.chunks[0]
        b = n // R
        if self.mode == "patch":
            if b != self._ready_block:
                self.flush_rows()  # the finished block's rows, then its file is closed
                if self.durable and self._fd is not None:  # its rows are committed with the next marker
                    os.fsync(self._fd)
                self.close_file()
                path = self._key(self._block_coords(b))
                self._prepare_block(path)
                self._fd = os.open(path, os.O_WRONLY)  # kept open: ~11 arrays x every step
                self._ready_block = b
            value = np.asarray(value, dtype=self.dtype)
            if value.shape != self.row_shape:
                value = np.broadcast_to(value, self.row_shape)
            data = np.ascontiguousarray(value).tobytes()
            i = n - b * R
            if self.crc:
                # kept in memory until the commit (flush_rows): the file and its crc change
                # together once per commit, not at every row, so a kill between rows leaves
                # a block whose crc matches it for any reader
                self._blockbuf[i * self.row_bytes: i * self.row_bytes + len(data)] = data
                self._dirty_rows = (min(self._dirty_rows[0], i), max(self._dirty_rows[1], i + 1))
                return
            if os.pwrite(self._fd, data, i * self.row_bytes) != len(data):
                raise OSError(f"short write to {self._key(self._block_coords(b))}")
            return
        if b != self.block_index:
            if self._dirty:  # remote: the previous block's rows land before the next block starts
                self.sink.put_many(self.pending())
                self._dirty = False
            self._load_block(b, n)
        self.block[n - b * R] = value
        if self.mode == "zarr":
            hi = min(self.arr.shape[0], (b + 1) * R)
            self.arr[b * R : hi] = self.block[: hi - b * R]
        elif self.sink is not None:
            self._dirty = True  # put whole at the next commit (StoreWriter.commit)
        else:
            atomic_put(self._key(self._block_coords(b)), self.encode(self.block), self.durable)

    def flush_rows(self) -> None:
        """Patch mode with a checksum: write the rows set since the last flush and the block's
        crc32c in one pwrite (from the first such row to the block's end). The commit calls it
        before the marker; a kill inside this one write can leave the crc stale for rows not
        yet committed, which gradtrace's readers accept (the crc of the committed rows + fill,
        :func:`gradtrace_format.integrity.decode_scalar_block`)."""
        lo, hi = self._dirty_rows
        if hi <= lo or self._fd is None:
            return
        buf = self._blockbuf
        view = np.frombuffer(buf, dtype=np.uint8).view()  # no copy of the block for its crc
        view.flags.writeable = False  # google_crc32c takes read-only buffers only
        at = lo * self.row_bytes
        data = bytes(buf[at:]) + _CRC.pack(google_crc32c.value(view))
        if os.pwrite(self._fd, data, at) != len(data):
            raise OSError(f"short write to {self._key(self._block_coords(self._ready_block))}")
        self._dirty_rows = (1 << 62, 0)

    def pending(self) -> dict:
        """Remote block mode: ``{key: encoded block}`` when the block changed since its last put,
        else ``{}`` (the caller puts it, then clears ``_dirty``)."""
        if not self._dirty:
            return {}
        return {self._rel(self._block_coords(self.block_index)): self.encode(self.block)}

    def sync(self) -> None:
        """fsync what a commit covers: the ready block's chunk file (patch mode) or the shard
        files written since the last sync and their directory (shards), for ``durable``."""
        if self._fd is not None:
            os.fsync(self._fd)
        if self.shard is not None:
            created = self._dir_dirty
            for f in [*self._done_shards, *self._shards.values()]:
                f.sync()
                created |= f.created
                f.created = False  # its directory entry is fsynced below
            if created:
                _fsync_dir(self.dir)
            self._dir_dirty = False
            self.after_commit()

    def after_commit(self) -> None:
        """Close shard files of finished row blocks (their rows are committed now)."""
        done, self._done_shards = self._done_shards, []
        for f in done:
            f.close()

    def repair_block(self, n: int) -> None:
        """Resume (patch mode with crc): rows >= n are not committed. Reset them to the fill
        value in the block holding row n and recompute its crc (atomic rewrite), and delete the
        later blocks, so that the reader's rule (crc of the committed rows + fill) holds again."""
        R = self.chunks[0]
        b = n // R
        path = self._key(self._block_coords(b))
        size = R * self.row_bytes
        if path.exists():
            raw = path.read_bytes()
            if len(raw) == size + 4:
                block = np.frombuffer(raw[:size], dtype=self.dtype).reshape((R,) + self.row_shape).copy()
                block[n - b * R:] = self.fill
                atomic_put(path, with_crc32c(block.tobytes()), self.durable)
            else:
                path.unlink()  # a block never holds fewer bytes: a torn creation, uncommitted if n == b*R
        if self.dir.joinpath("c").is_dir():
            for p in self.dir.joinpath("c").iterdir():
                if p.name.isdigit() and int(p.name) > b:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()

    def close_file(self) -> None:
        """Close the ready block's chunk file (patch mode) and any open shard file; the next
        write reopens what it needs."""
        for f in [*self._done_shards, *self._shards.values()]:
            f.close()
        self._done_shards, self._shards = [], {}
        if self._fd is not None:
            fd, self._fd, self._ready_block = self._fd, None, -1
            self._dirty_rows = (1 << 62, 0)  # rows never flushed were never committed
            os.close(fd)

    def _prepare_block(self, path: Path) -> None:
        size = self.chunks[0] * self.row_bytes
        shape = (self.chunks[0],) + self.row_shape
        try:
            have = path.stat().st_size
        except FileNotFoundError:
            block = np.full(shape, self.fill, dtype=self.dtype).tobytes()
            if self.crc:
                self._blockbuf = bytearray(block)
                block = with_crc32c(block)
            atomic_put(path, block, self.durable)
            return
        if have != size + 4 * self.crc:
            raise fmt.StoreError(
                f"chunk {path} has {have} bytes, expected {size + 4 * self.crc} (an uncompressed block of "
                f"{self.chunks[0]} rows). The store is damaged; record to a new path."
            )
        if self.crc:
            self._blockbuf = bytearray(path.read_bytes()[:size])

    def _load_block(self, b: int, n_valid: int) -> None:
        R = self.chunks[0]
        block = np.full((R,) + self.row_shape, self.fill, dtype=self.dtype)
        lo = b * R
        hi = min(n_valid, lo + R)
        if hi > lo:  # resuming inside a block: keep its committed rows
            block[: hi - lo] = self.arr[lo:hi]
        self.block, self.block_index = block, b


class StoreWriter:
    """Writes rows ``(step, grad, weight, scalars)`` into a run store and commits each one.

    Args:
        path: directory of the store (a Zarr v3 group), a ``file://`` URL (the same), or any
            other fsspec URL such as ``s3://bucket/run.zarr``: written as whole objects with the
            same commit order (:mod:`capture.sink`); on a URL only ``mode="create"`` into an
            empty prefix, with no lock and no ``durable`` (a returned PUT is durable).
        tensors: the parameter table (flattening order).
        tiers: ``{"grad": Tier, "weight": Tier}`` (or tier strings like ``"rounded:7"``).
        mode: ``"create"`` refuses an existing path, ``"overwrite"`` replaces it,
            ``"resume"`` appends to it after checking that it matches.
        resume_step: with ``mode="resume"``, drop committed rows whose step is >= this step
            (training restarted from a checkpoint taken at that step).
        param_chunk: chunk width along ``param``.
        expected_steps: rows to preallocate (optional; capacity grows by doubling anyway).
        schedule, settings, parent: stored in the header.
        source_dtype: dtype(s) of the recorded tensors before the float32 cast; checked on
            resume when both the store and the caller know it.
        threads: threads that encode and write a row's chunks and reduce its scalars
            concurrently (numpy, blosc and file writes release the GIL); 1 does all in the
            calling thread.
        durable: fsync every chunk a row writes and the commit marker (and their directories)
            before a step counts as committed, so committed steps survive a power cut, not
            only a kill (cost: README, "Crash safety").
        shard_files: a new store gathers the chunks of ``grad``, ``weight`` and the sketch arrays
            into shard files of several rows (``format.ArraySpec.zarr_layout``): a file is
            created every few steps instead of one per chunk and step. False: one file per
            chunk. A resumed store keeps the layout it was created with.
        storage_options: fsspec options for a URL (``endpoint_url``, ``key``, ``secret``...).
        page_cache: ``"drop"`` hands each row's chunk bytes to the disk's writeback at once and
            drops them from the page cache once written (:class:`_WriteBehind`), so a long run
            holds a bounded window of the store in memory instead of filling the page cache
            (and evicting a data set's pages) with it; ``"keep"`` leaves every chunk written in
            the page cache, as any file write does; ``"auto"`` (default) keeps the first GiB
            (at most 1/16 of the memory the process may use, :func:`_keep_first`) and drops
            behind after it. Local stores with shard files; on a URL it has nothing to do.

    One writer at a time: the writer holds an exclusive ``fcntl.flock`` on the store's lock
    file (:data:`LOCK_NAME`) from creation or resume until :meth:`close` / :meth:`abort` (the
    OS releases it when the process dies); a second writer gets :class:`StoreLockedError`
    naming the holder's pid. A new store is built in a hidden sibling directory and renamed
    into place, so after a kill during creation the path is absent or a complete empty store.
    """

    #: whether :meth:`append` may read a :class:`SplitRow` gradient in place (subclasses that
    #: write rows their own way say False, and get the joined row)
    _split_ok = True

    def __init__(
        self,
        path: "str | os.PathLike",
        tensors: Sequence[TensorInfo],
        tiers: dict | None = None,
        *,
        mode: str = "create",
        resume_step: int | None = None,
        param_chunk: int = fmt.DEFAULT_PARAM_CHUNK,
        expected_steps: int | None = None,
        schedule=None,
        settings: dict | None = None,
        parent: dict | None = None,
        source_dtype: str | None = None,
        threads: int = 1,
        lag_band: int = 0,
        durable: bool = False,
        shard_files: bool = True,
        storage_options: dict | None = None,
        page_cache: str = "auto",
    ):
        check_page_cache(page_cache)
        self.sink = _sink.open_sink(path, storage_options)  # None: a local directory
        self.path = _sink.split_location(path)[0] if self.sink is None else self.sink.url
        # shard files are appended to: local directories only (an object cannot be appended to)
        self.shard_files = bool(shard_files) and self.sink is None
        if self.sink is not None:
            if mode != "create":
                raise ValueError(
                    f"{mode}=True is for local paths only: {self.path} is a URL, where no lock can keep a second "
                    "writer out; record to a new URL, or to a local path and upload it when closed"
                )
            durable = False  # every put is durable once it returns; nothing to fsync
        if int(lag_band) < 0:
            raise ValueError(f"lag_band={lag_band} must be >= 0 (gradient rows back)")
        self.lag_band = int(lag_band)
        self.durable = bool(durable)
        # page_cache="drop": local stores only (a URL's objects never sit in this page cache)
        self._behind = (
            _WriteBehind(keep_first=_keep_first() if page_cache == "auto" else 0)
            if page_cache != "keep" and self.sink is None else None
        )
        self._lock_fd: weakref.finalize | None = None
        if int(threads) < 1:
            raise ValueError(f"threads={threads} must be >= 1")
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(int(threads), thread_name_prefix="gradtrace-chunks")
            if int(threads) > 1 else None
        )
        tiers = tiers or {}
        self.tiers = {a: Tier.parse(tiers.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
        self.tensors = list(tensors)
        if not self.tensors or sum(t.size for t in self.tensors) == 0:
            raise ValueError(
                "the model has no trainable parameters to record: pass a model with at least one "
                "parameter whose requires_grad is True"
            )
        self.d = sum(t.size for t in self.tensors)
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode={mode!r}: use 'create', 'overwrite' or 'resume'")
        if int(param_chunk) < 1:
            raise ValueError(f"param_chunk={param_chunk} must be a positive number of entries")
        if resume_step is not None:
            resume_step = fmt.check_step(resume_step, "resume_step")
        self._sketchers: dict[str, _FastSketcher] = {}
        self._closed = False
        try:
            if self.sink is not None:
                self._create_remote(param_chunk, expected_steps, schedule, settings, parent, source_dtype)
            elif mode == "resume":
                if not self.path.exists():
                    raise FileNotFoundError(
                        f"cannot resume: {self.path} does not exist. Start a new store with mode='create'."
                    )
                self._lock(self.path)
                self._open_existing(resume_step, schedule, settings, source_dtype)
            else:
                if self.path.exists() or self.path.is_symlink():
                    if mode == "create":
                        raise FileExistsError(
                            f"{self.path} already exists. Pass resume=True to append to it, "
                            "overwrite=True to replace it, or choose another path."
                        )
                    _remove_store(self.path)
                self._create(param_chunk, expected_steps, schedule, settings, parent, source_dtype)
        except BaseException:
            self._shutdown_pool()
            self._unlock()
            raise
        for a, tier in self.tiers.items():
            if tier.is_sketch:
                plan = fmt.sketch_plan(self.tensors, tier.sketch_dim, tier.seed)
                self._sketchers[a] = _FastSketcher(self.tensors, plan, twin=self._sketchers.get("grad"))
        self.n_nonfinite = int(self.header.extra.get("n_nonfinite_steps", 0))
        self._last_step = self._read_last_step()
        self._n = self.header.n_steps  # rows written; header.n_steps is the committed count
        self._has_final = self.header.has_final

    # ---------------------------------------------------------------- creation / reopening

    #: a sharded store's column layout (``capture.sharded``); None: the natural one
    layout: "fmt.ShardedLayout | None" = None

    def _array_specs(self, param_chunk: int) -> list[fmt.ArraySpec]:
        return fmt.array_specs(self.tensors, self.tiers, param_chunk, self.lag_band, layout=self.layout)

    def _lock(self, store: Path) -> None:
        """Take the store's writer lock (held until close/abort, released by the OS on death)."""
        fd = _acquire_lock(store, self.path)
        # released by close/abort, or when this writer is garbage collected without either
        self._lock_fd = weakref.finalize(self, _release_lock, fd)
        self._lock_raw = fd

    def _unlock(self, remove: bool = False) -> None:
        fin, self._lock_fd = self._lock_fd, None
        if fin is not None and fin.detach() is not None:
            _release_lock(self._lock_raw, self.path / LOCK_NAME if remove else None)

    def _create(self, param_chunk, expected_steps, schedule, settings, parent, source_dtype):
        """Build the store in a hidden sibling directory, then rename it into place (atomic)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(self.path)
        final_path = self.path
        tmp = self.path.parent / f".{self.path.name}.gradtrace-new-{os.getpid()}-{next(_TMP_COUNTER)}"
        tmp.mkdir()
        try:
            self._lock(tmp)
            self.path = tmp
            self._create_in(param_chunk, expected_steps, schedule, settings, parent, source_dtype)
            if self.durable:
                for p in sorted(tmp.rglob("*"), key=lambda q: -len(q.parts)):
                    if p.is_file():
                        with open(p, "rb") as f:
                            os.fsync(f.fileno())
                    _fsync_dir(p.parent)
            try:
                os.rename(tmp, final_path)  # fails when another writer created it meanwhile
            except OSError as err:
                raise FileExistsError(
                    f"{final_path} was created by another process while this writer was creating it; "
                    "choose another path, or resume that one"
                ) from err
            if self.durable:
                _fsync_dir(final_path.parent)
        except BaseException:
            self.path = final_path
            self._close_files()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.path = final_path
        self._close_files()
        # reopen at the final path: the array writers hold paths inside the temporary directory
        g = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        self.group = g
        specs = self._array_specs(self.header.param_chunk)
        self._setup_writers({spec.name: g[spec.name] for spec in specs})

    def _create_remote(self, param_chunk, expected_steps, schedule, settings, parent, source_dtype):
        """A new store at a URL: every array's metadata first, the root ``zarr.json`` with the
        gradtrace header last (until then no reader takes the prefix for a run)."""
        try:
            exists = self.sink.exists()
        except Exception as err:  # noqa: BLE001 - credentials, endpoint, network: say which URL
            raise OSError(f"cannot reach {self.path}: {type(err).__name__}: {' '.join(str(err).split())}. Check "
                          "the URL and storage_options (endpoint_url, key, secret)") from err
        if exists:
            raise FileExistsError(
                f"{self.path} already holds objects. On a URL the recorder only creates new stores (no resume, "
                "no overwrite): choose another URL, or delete that prefix first"
            )
        try:
            self._create_in(param_chunk, expected_steps, schedule, settings, parent, source_dtype)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"cannot create {self.path}: {' '.join(str(err).split())}. Create the bucket first (S3: `aws s3 "
                f"mb s3://{self.sink.root.split('/')[0]}`) or fix the URL"
            ) from err

    def _create_in(self, param_chunk, expected_steps, schedule, settings, parent, source_dtype):
        cap = max(INITIAL_CAPACITY, int(expected_steps or 0) + 1)
        self.header = Header(
            tensors=self.tensors,
            tiers=self.tiers,
            n_steps=0,
            capacity=cap,
            param_chunk=int(param_chunk),
            schedule=schedule,
            settings=settings or {},
            parent=parent,
            source_dtype=source_dtype,
        )
        self.header.extra["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        if self.lag_band:
            self.header.extra["lag_band"] = self.lag_band
        # our fresh temporary directory, or an empty prefix at a URL
        g = (zarr.open_group(str(self.path), mode="a", zarr_format=3) if self.sink is None
             else self.sink.open_group("a"))
        self.group = g
        n_t = len(self.tensors)
        crc = fmt.codecs_for("scalar")  # the parameter table is checksummed too
        for tspec in fmt.TABLE_SPECS:
            a = g.create_array(tspec.name, shape=(n_t,), dtype=tspec.zarr_dtype, dimension_names=[fmt.TENSOR_DIM],
                               compressors=crc)
            a[:] = tspec.values(self.tensors)
        arrays = {}
        for spec in self._array_specs(self.header.param_chunk):
            arrays[spec.name] = g.create_array(
                spec.name,
                shape=spec.shape(cap),
                **spec.zarr_layout(self.shard_files),
                dtype=spec.dtype,
                fill_value=spec.fill_value,
                dimension_names=list(spec.dims),
                attributes=spec.attrs,
                chunk_key_encoding=spec.chunk_key_encoding,
            )
        self._root_attrs = {k: v for k, v in g.attrs.asdict().items() if k != fmt.ATTR_KEY}
        self._setup_writers(arrays)
        self._write_header()

    def _open_existing(self, resume_step, schedule, settings, source_dtype):
        # use_consolidated=False: a cleanly closed store has consolidated metadata that would
        # go stale as soon as we append; the header writes below drop it from zarr.json.
        g = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        header = fmt.header_of_group(g, self.path)
        if [t.to_json() for t in header.tensors] != [t.to_json() for t in self.tensors]:
            old = {(t.name, t.shape) for t in header.tensors}
            new = {(t.name, t.shape) for t in self.tensors}
            only_old = sorted(old - new)[:4]
            only_new = sorted(new - old)[:4]
            raise StoreMismatchError(
                f"cannot resume {self.path}: its parameter table differs from the model's "
                f"(only in the store: {only_old}; only in the model: {only_new}"
                + ("; same tensors in another order" if not only_old and not only_new else "")
                + "). Resume with the same model, or record to a new path."
            )
        for a in fmt.DATA_ARRAYS:
            # ``small`` picks the writer's encoder, not what is stored: a store resumes with or without it
            if dataclasses.replace(header.tiers[a], small=False) != dataclasses.replace(self.tiers[a], small=False):
                raise StoreMismatchError(
                    f"cannot resume {self.path}: it stores '{a}' with tier {header.tiers[a].to_json()}, "
                    f"but this recorder asks for {self.tiers[a].to_json()}. Use the same tier, or a new path."
                )
        if source_dtype and header.source_dtype and source_dtype != header.source_dtype:
            raise StoreMismatchError(
                f"cannot resume {self.path}: it was recorded from {header.source_dtype} parameters, "
                f"this model's are {source_dtype}. Resume with the same dtype, or record to a new path."
            )
        self.group = g
        arrays = {}
        if int(header.extra.get("lag_band", 0)) != self.lag_band:
            raise StoreMismatchError(
                f"cannot resume {self.path}: it keeps a lag band of {header.extra.get('lag_band', 0)} rows, this "
                f"recorder asks for {self.lag_band}. Resume with lag_band={header.extra.get('lag_band', 0)}."
            )
        for spec in self._array_specs(header.param_chunk):
            try:
                arr = g[spec.name]
            except KeyError as err:
                raise StoreMismatchError(
                    f"cannot resume {self.path}: array '{spec.name}' is missing. The store is damaged "
                    "or was written by an incompatible writer; record to a new path."
                ) from err
            if str(arr.dtype) != spec.dtype:
                raise StoreMismatchError(
                    f"cannot resume {self.path}: array '{spec.name}' has dtype {arr.dtype}, expected "
                    f"{spec.dtype}. The store was written by an incompatible writer; use a new path."
                )
            arrays[spec.name] = arr
        self.header = header
        self._root_attrs = {k: v for k, v in g.attrs.asdict().items() if k != fmt.ATTR_KEY}
        self._setup_writers(arrays)
        n = header.n_steps
        if header.has_final:
            n -= 1  # the final iterate is re-recorded at the next close
        if resume_step is not None and n > 0:
            steps = self.arrays["step"][:n]
            keep = int(np.searchsorted(steps, int(resume_step), side="left"))
            n = min(n, keep)
        header.n_steps = n
        header.has_final = False
        header.closed = False
        if schedule is not None:
            header.schedule = schedule
        if settings:
            header.settings = {**header.settings, **settings}
        if source_dtype and not header.source_dtype:
            header.source_dtype = source_dtype
        header.capacity = min(a.shape[0] for a in self.arrays.values())
        _remove_partials(self.path, self._scalar_names)
        self._write_header()
        for name in self._scalar_names:  # after the header: rows >= n are uncommitted from here on
            aw = self._w[name]
            if aw.mode == "patch" and aw.crc:
                aw.repair_block(n)

    def _setup_writers(self, arrays: dict):
        self.arrays = arrays
        specs = {s.name: s for s in self._array_specs(self.header.param_chunk)}
        # the last lag_band rows' float32 gradients (None: a row without one), newest last;
        # empty after a resume: lags reaching before it read NaN
        self._ring: list = []
        self._ring_free: list = []
        self._w = {name: _ArrayWriter(arr, self.path, specs[name], self.sink) for name, arr in arrays.items()}
        for aw in self._w.values():
            aw.durable = self.durable
        self._scalar_plan = _scalar_plan(self.tensors)
        # load (or compile) the scalar kernel now, at setup: the first row would otherwise pay
        # numba's import, about a second, with training steps queueing behind it
        one = np.zeros(1, np.float32)
        kernels.tensor_sums(one, one, [0], [1], [0], np.zeros(1), np.zeros(1), np.zeros(1))
        self._scalar_names = [n for n, s in specs.items() if not s.row_chunked]

    def _read_last_step(self) -> int | None:
        n = self.header.n_steps
        return None if n == 0 else int(self.arrays["step"][n - 1])

    # ---------------------------------------------------------------- writing

    @property
    def n_steps(self) -> int:
        """Committed rows."""
        return self.header.n_steps

    @property
    def last_step(self) -> int | None:
        """Step of the last committed row (None when the store is empty)."""
        return self._last_step

    def _write_header(self):
        """Write the root metadata (the commit marker) in one atomic put."""
        doc = {
            "attributes": {**self._root_attrs, fmt.ATTR_KEY: self.header.to_json()},
            "zarr_format": 3,
            "node_type": "group",
        }
        data = json.dumps(doc, allow_nan=False).encode()
        if self.sink is not None:
            self.sink.put("zarr.json", data)
        else:
            atomic_put(self.path / "zarr.json", data, self.durable)

    def _ensure_capacity(self, n: int):
        if n < self.header.capacity:
            return
        cap = max(self.header.capacity * 2, n + 1)
        for arr in self.arrays.values():
            arr.resize((cap,) + tuple(arr.shape[1:]))
        self.header.capacity = cap
        self._write_header()

    def append(
        self,
        step: int,
        grad: np.ndarray | None,
        weight: np.ndarray,
        *,
        loss: float = math.nan,
        lr: float = math.nan,
        epoch: int = -1,
        flags: int = 0,
        commit: bool = True,
        scalars: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
        encoded: dict[str, dict[str, np.ndarray]] | None = None,
        lag_dots: np.ndarray | None = None,
    ) -> int:
        """Write one row and, with ``commit``, commit it (and every row written before it).

        Args:
            step: global training step (strictly increasing).
            grad: float32 array of shape (d,), a :class:`SplitRow` (the same entries as one
                array per tensor, read in place), or None for the final iterate.
            weight: float32 array of shape (d,), or None for a step whose weights the weight
                schedule skips (``FLAG_NO_WEIGHT``; they read as NaN). A row needs one of them.
            loss, lr, epoch: per-step values.
            flags: extra flag bits (e.g. ``FLAG_MISSING_GRAD``); non-finite flags are added here.
            commit: advance the commit marker to this row now. False leaves the row written
                but uncommitted (a kill loses it) until the next :meth:`commit`; the Recorder
                batches commits this way while its writer is behind (the marker is a file
                rename, the costliest small write of a row).
            scalars: the per-tensor float64 ``(||G||^2, ||w||^2, <G, w>)`` computed elsewhere
                (on the GPU, ``capture.encode``), each of shape (n_tensors,); NaN where the row
                has no gradient or no weights. None: computed here from ``grad`` and ``weight``.
            encoded: rows already encoded for their tier (on the GPU), instead of ``grad`` /
                ``weight``: ``{"grad": {"grad": row}}`` for a dense tier (float32, already
                rounded for ``rounded``), ``{"grad": {"grad_sketch": s, "grad_signbits": b,
                "grad_nonzero": z}}`` for a sketch tier; likewise for ``"weight"``. Needs
                ``scalars``.
            lag_dots: with a lag band of L rows and an encoded gradient, the float64
                ``<G_r, G_(r-k)>``, k = 1..L, computed where the float32 gradient is (NaN for
                rows without one). Computed here from ``grad`` otherwise.

        Returns:
            The flags stored for the row.
        """
        if self._closed:
            raise RuntimeError(f"the store writer for {self.path} is closed")
        step = fmt.check_step(step, final=grad is None)
        last = self._last_step
        if last is not None and int(step) <= last:
            raise ValueError(
                f"step {step} is not after the last recorded step {last}: steps must increase. "
                "When resuming from a checkpoint, pass resume_step=<checkpoint step>."
            )
        skipped = bool(flags & fmt.FLAG_SKIPPED)
        pre = self._check_encoded(encoded or {}, scalars)
        has_g, has_w = grad is not None or "grad" in pre, weight is not None or "weight" in pre
        if not has_g and not has_w and not skipped:
            raise ValueError(f"step {step}: a row needs a gradient, weights or both (or FLAG_SKIPPED)")
        if weight is not None:
            weight = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
            if weight.shape[0] != self.d:
                raise ValueError(f"weight has {weight.shape[0]} entries, the parameter table {self.d}")
        elif not has_w:
            flags |= FLAG_NO_WEIGHT
        if isinstance(grad, SplitRow):
            if grad.d != self.d or len(grad.parts) != len(self.tensors):
                raise ValueError(f"grad has {grad.d} entries in {len(grad.parts)} pieces, the parameter table "
                                 f"{self.d} in {len(self.tensors)} tensors")
            if not self.reads_split():
                self._joined = grad = grad.flat(getattr(self, "_joined", None))
        elif grad is not None:
            grad = np.ascontiguousarray(grad, dtype=np.float32).reshape(-1)
            if grad.shape[0] != self.d:
                raise ValueError(f"grad has {grad.shape[0]} entries, the parameter table {self.d}")
        elif not has_g and not skipped:
            flags |= FLAG_FINAL
        flags &= ~(FLAG_NONFINITE_GRAD | FLAG_NONFINITE_WEIGHT)  # set below from the data only
        n = self._n
        if self.sink is not None:
            # the previous row's chunk objects, every array in one batch; this row's stay staged
            # until the commit (one batch with the per-step blocks) or the next append
            self.sink.put_staged()
        self._before = (self._last_step, self._has_final, self.n_nonfinite, list(self._ring))
        self._ring_pushed = False
        self._ensure_capacity(n)
        n_t = len(self.tensors)
        gg, ww, gw = np.full(n_t, np.nan), np.full(n_t, np.nan), np.full(n_t, np.nan)
        if scalars is not None:
            gg[:], ww[:], gw[:] = (np.asarray(x, dtype=np.float64) for x in scalars)
            if not has_g:
                gg[:] = gw[:] = np.nan
            if not has_w:
                ww[:] = gw[:] = np.nan
            tasks = []
        elif isinstance(grad, SplitRow):
            tasks = split_scalar_tasks(self.tensors, grad, weight, gg, ww, gw, self._scalar_plan)
        elif weight is not None:
            tasks = scalar_tasks(self.tensors, grad, weight, gg, ww, gw, self._scalar_plan)
        elif grad is not None:  # ||G||^2 alone: the same kernel with the gradient in the weights' place
            tasks = scalar_tasks(self.tensors, None, grad, np.empty(n_t), gg, np.empty(n_t), self._scalar_plan)
        else:
            tasks = []
        W = self._w
        rows = [("grad", grad), ("weight", weight)]
        sk_w = self._sketchers.get("weight")
        if sk_w is not None and sk_w.twin is not None and grad is not None and weight is not None \
                and not pre and self._pool is None:
            # one sketch tier on both: both rows in one sweep (a pool runs them side by side)
            tasks.append(functools.partial(self._write_sketch_rows, n, grad, weight))
            rows = []
        for name, vec in rows:
            if name in pre:
                for arr, row in pre[name].items():
                    tasks.extend(W[arr].row_tasks(n, row))
                continue
            tier = self.tiers[name]
            if tier.is_sketch:
                targets = fmt.sketch_tier_arrays(name)
                if vec is None:
                    for t in targets:
                        W[t].clear_row(n)
                    continue
                tasks.append(functools.partial(self._write_sketch_row, name, n, vec))
            elif vec is None:
                W[name].clear_row(n)  # reads as NaN, even over a torn row of a killed run
            elif tier.rounds:
                tasks.extend(W[name].row_tasks(n, vec, keepbits=int(tier.keepbits)))
            else:
                tasks.extend(W[name].row_tasks(n, vec))
        self._run(tasks)
        for aw in W.values():
            aw.finish_row(self._behind)
        if self._behind is not None:
            self._behind.row_done()
        gg_sum, ww_sum, gw_sum = float(gg.sum()), float(ww.sum()), float(gw.sum())
        if has_g and not math.isfinite(gg_sum):
            flags |= FLAG_NONFINITE_GRAD
        if has_w and not math.isfinite(ww_sum):
            flags |= FLAG_NONFINITE_WEIGHT
        values = {
            "step": int(step),
            "epoch": int(epoch),
            "loss": float(loss),
            "lr": float(lr),
            "flags": int(flags),
            fmt.GRAD_SQNORM: gg_sum,
            fmt.WEIGHT_SQNORM: ww_sum,
            fmt.GRAD_DOT_WEIGHT: gw_sum,
            fmt.per_tensor_array(fmt.GRAD_SQNORM): gg,
            fmt.per_tensor_array(fmt.WEIGHT_SQNORM): ww,
            fmt.per_tensor_array(fmt.GRAD_DOT_WEIGHT): gw,
        }
        if self.lag_band:
            values[fmt.LAG_DOT_ARRAY] = self._lag_dots(grad, lag_dots)
        for name in self._scalar_names:
            W[name].set(n, values[name])
        self._n = n + 1
        if flags & FLAG_NONFINITE_GRAD:
            self.n_nonfinite += 1
        self._has_final = bool(flags & FLAG_FINAL)
        self._last_step = int(step)
        if commit:
            self.commit()  # the commit marker last
        return flags

    def reads_split(self) -> bool:
        """Whether :meth:`append` reads a :class:`SplitRow` gradient in place: a local store
        whose gradient arrays this module encodes, the compiled kernels, no lag band (its ring
        keeps a flat copy anyway)."""
        if self.sink is not None or self.lag_band or not self._split_ok:
            return False
        if kernels.BACKEND != "numba":
            return False
        arrays = fmt.stored_arrays("grad", self.tiers["grad"])
        return all(self._w[a].mode in ("shards", "rows") for a in arrays)

    def _lag_dots(self, grad: np.ndarray | None, given) -> np.ndarray:
        """``<G_r, G_(r-k)>`` for k = 1..L (float64 sums of float64 products of the float32
        entries), then this row's gradient joins the ring (a copy: the caller reuses its buffer)."""
        L = self.lag_band
        if given is not None:
            dots = np.asarray(given, dtype=np.float64).reshape(L).copy()
        else:
            dots = np.full(L, np.nan)
            if grad is not None:
                one = np.zeros(1)
                for k, prev in enumerate(reversed(self._ring), start=1):
                    if prev is not None:
                        out = np.zeros(1)
                        kernels.tensor_sums(grad, prev, [0], [self.d], [0], one, np.zeros(1), out)
                        dots[k - 1] = out[0]
        if grad is not None and given is None:
            buf = self._ring_free.pop() if self._ring_free else np.empty(self.d, dtype=np.float32)
            np.copyto(buf, grad)
        else:
            buf = None
        self._ring.append(buf)
        self._ring_pushed = True
        if len(self._ring) > L:
            old = self._ring.pop(0)
            if old is not None:
                self._ring_free.append(old)
        return dots

    def _check_encoded(self, encoded: dict, scalars) -> dict:
        """Validate pre-encoded rows: the arrays of each one's tier, each of its width."""
        if encoded and scalars is None:
            raise ValueError("append(encoded=...) needs scalars=: the per-tensor sums of the unencoded rows")
        out = {}
        for a, parts in encoded.items():
            if a not in fmt.DATA_ARRAYS:
                raise ValueError(f"encoded: unknown array {a!r}; give 'grad' and/or 'weight'")
            tier = self.tiers[a]
            want = set(fmt.stored_arrays(a, tier))
            if set(parts) != want:
                raise ValueError(f"encoded[{a!r}] has {sorted(parts)}; the {tier.name} tier stores {sorted(want)}")
            rows = {}
            for arr, row in parts.items():
                spec_dtype = self._w[arr].dtype
                row = np.ascontiguousarray(row).reshape(-1)
                if row.dtype != spec_dtype or row.shape[0] != self._w[arr].width:
                    raise ValueError(f"encoded[{a!r}][{arr!r}]: {row.dtype} of {row.shape[0]} entries, the store "
                                     f"holds {spec_dtype} rows of {self._w[arr].width}")
                rows[arr] = row
            out[a] = rows
        return out

    def rewind(self) -> None:
        """Forget the last row written, which must not be committed yet; the next append
        writes its index again (its chunks are overwritten or removed then)."""
        if self._n <= self.header.n_steps:
            raise RuntimeError("rewind: the last row written is already committed")
        self._n -= 1
        if self.sink is not None:
            self.sink.discard_staged()  # the forgotten row's chunk objects (never put)
        self._last_step, self._has_final, self.n_nonfinite, ring = self._before
        last = self._ring[-1] if self._ring_pushed and self._ring else None
        if last is not None and not any(x is last for x in ring):
            self._ring_free.append(last)
        # a buffer that the rewound row pushed out of the ring is in it again: not free
        self._ring_free = [b for b in self._ring_free if not any(b is x for x in ring)]
        self._ring = ring

    def commit(self, *, exclude_last: bool = False) -> None:
        """Advance the commit marker over every row written so far (one atomic rename), or
        with ``exclude_last`` over all but the last one (which stays uncommitted: the Recorder
        does so while it cannot yet check a row it read by reference)."""
        n = self._n - 1 if exclude_last else self._n
        if self.header.n_steps >= n:
            return
        behind = getattr(self, "_behind", None)
        if behind is not None and behind.failed is not None:
            raise behind.failed  # a row written before n may not be on the disk
        for name in self._scalar_names:  # per-step rows and their block crc, before the marker
            self._w[name].flush_rows()
        if self.durable:  # the rows' chunks are on disk before the marker says so
            for aw in self._w.values():
                aw.sync()
        if self.sink is not None:  # staged row chunks and the changed per-step blocks, before the marker
            pending = {}
            for name in self._scalar_names:
                pending.update(self._w[name].pending())
            self.sink.put_staged(pending)
            for name in self._scalar_names:
                self._w[name]._dirty = False
        self.header.n_steps = n
        # the state after row n - 1: the last row's, or the one before it (kept for rewind)
        _, has_final, n_nonfinite, _ = self._before if exclude_last else (None, self._has_final, self.n_nonfinite, None)
        self.header.has_final = has_final
        self.header.extra["n_nonfinite_steps"] = n_nonfinite
        self._write_header()
        for aw in self._w.values():
            aw.after_commit()

    @property
    def n_written(self) -> int:
        """Rows written, committed or not (>= ``n_steps``)."""
        return self._n

    def _write_sketch_rows(self, n: int, grad: "np.ndarray | SplitRow", weight: np.ndarray) -> None:
        sk_g, sk_w = self._sketchers["grad"], self._sketchers["weight"]
        packed = isinstance(grad, SplitRow)
        if packed:  # sketch and sign planes of both rows in one sweep over each tensor
            both = kernels.sketch2_signs_parts_into(grad.parts, weight, sk_w.starts, sk_w.sizes, sk_w.offsets,
                                                    sk_w.codes, sk_w.code_starts, sk_w.out2(), sk_g.bits, sk_w.bits)
        else:
            both = sk_w.both(grad, weight)
        for col, (name, vec) in enumerate((("grad", grad), ("weight", weight))):
            self._write_sketch_row(name, n, vec, both[:, col].astype(np.float32), packed=packed)

    def _write_sketch_row(self, name: str, n: int, vec: np.ndarray, sketch: np.ndarray | None = None,
                          packed: bool = False) -> None:
        sk = self._sketchers[name]
        W = self._w
        W[fmt.sketch_array(name)].write_row(n, sk(vec).astype(np.float32) if sketch is None else sketch)
        sb, nz = sk.bits if packed else sk.signs(vec)
        W[fmt.signbits_array(name)].write_row(n, sb)
        W[fmt.nonzero_array(name)].write_row(n, nz)

    def _run(self, tasks: list[Callable[[], None]]) -> None:
        """Run a row's independent tasks, on the pool when there is one; all finish before return."""
        if self._pool is None or len(tasks) < 4:
            for task in tasks:
                task()
            return
        futures = [self._pool.submit(task) for task in tasks]
        concurrent.futures.wait(futures)
        for f in futures:
            err = f.exception()
            if err is not None:
                raise err

    def update_settings(self, **settings) -> None:
        """Merge ``settings`` into the header's settings (written with the next commit or now)."""
        self.header.settings.update(settings)
        self._write_header()

    def close(self, final_weight: np.ndarray | None = None, final_step: int | None = None, *, epoch: int = -1) -> None:
        """Record the final iterate (if given), trim arrays to the committed rows, consolidate."""
        if self._closed:
            return
        try:
            self._close(final_weight, final_step, epoch)
        except BaseException:
            self.abort()  # release the lock and files: the store stays resumable
            raise

    def _close(self, final_weight, final_step, epoch) -> None:
        if final_weight is not None:
            if final_step is None:
                last = self.last_step
                final_step = 0 if last is None else last + 1
            self.append(final_step, None, final_weight, epoch=epoch, commit=False)
        self.commit()
        n = self.header.n_steps
        self._close_files()
        if self.sink is not None:
            self._trim_remote(n)
        else:
            for arr in self.arrays.values():
                arr.resize((n,) + tuple(arr.shape[1:]))
        self.header.capacity = n
        self.header.closed = True
        self._write_header()
        with warnings.catch_warnings():
            # zarr warns on every consolidation that consolidated metadata is not in the v3
            # spec yet (gradtrace readers do not need it; plain xarray.open_zarr uses it), and
            # that the lock file is not a zarr node
            warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
            warnings.filterwarnings("ignore", message="Object at .* is not recognized")
            zarr.consolidate_metadata(str(self.path) if self.sink is None else self.group.store)
        if self.durable:
            _fsync_path(self.path / "zarr.json")
            _fsync_dir(self.path)
        self._closed = True
        self._shutdown_pool()
        self._unlock(remove=True)

    def _trim_remote(self, n: int) -> None:
        """Remote close: trim the arrays to n rows without zarr's delete request per chunk
        position outside (about 2 s for 64 rows here). A new remote store holds chunk objects
        only for rows its writer put, so the row chunks of rows >= n (rewound ones) are
        deleted here, and per-step blocks past row n never exist."""
        from zarr.core.sync import sync

        for name, arr in self.arrays.items():
            aw = self._w[name]
            if aw.mode == "rows":
                for row in range(n, aw._hw + 1):
                    aw.clear_row(row)
            sync(arr.async_array.resize((n,) + tuple(arr.shape[1:]), delete_outside_chunks=False))

    def abort(self) -> None:
        """Stop without trimming: commit the rows written whole before (best effort: the
        failure may be a full disk), keep them, and leave a store that can be resumed."""
        if self._closed:
            return
        self._closed = True
        self._shutdown_pool()
        try:
            self.commit()
        except Exception:  # noqa: BLE001 - the rows stay uncommitted, the store consistent
            pass
        self._close_files()
        self._unlock(remove=True)

    def _close_files(self) -> None:
        for aw in getattr(self, "_w", {}).values():
            aw.close_file()
        if getattr(self, "_behind", None) is not None:
            self._behind.close()

    def _shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def _remove_partials(path: Path, names: Sequence[str]) -> None:
    """Delete temporary files a killed writer left (root metadata and per-step chunk blocks)."""
    found = list(path.glob("*.partial"))
    for name in names:
        if (path / name).is_dir():
            found.extend((path / name).rglob("*.partial"))
    for tmp in found:
        try:
            tmp.unlink()
        except OSError:
            pass


def _fsync_path(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


#: The writer lock file inside a store (defined in gradtrace_format.format: the query index takes it too).
LOCK_NAME = fmt.LOCK_NAME
_acquire_lock = fmt.acquire_lock
_release_lock = fmt.release_lock


def _remove_stale_temps(path: Path) -> None:
    """Delete hidden creation directories of writers that died while creating ``path``
    (their lock is free); a live creator keeps its lock and its directory."""
    for tmp in path.parent.glob(f".{path.name}.gradtrace-*"):
        lock = tmp / LOCK_NAME
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # killed before it took the lock
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        _release_lock(fd)


def is_gradtrace_store(path: Path) -> bool:
    """True when ``path`` is a directory whose root ``zarr.json`` carries the gradtrace header."""
    try:
        doc = json.loads((Path(path) / "zarr.json").read_bytes())
        return isinstance(doc, dict) and fmt.ATTR_KEY in (doc.get("attributes") or {})
    except (OSError, ValueError):
        return False


def _remove_store(path: Path):
    """Delete an existing gradtrace store (or an empty directory) that no writer holds.

    Anything else (a regular file, a symlink, a foreign directory, another Zarr group) is
    refused: ``overwrite`` replaces gradtrace stores only."""
    if path.is_symlink() or not path.is_dir():
        raise FileExistsError(
            f"refusing to overwrite {path}: it is {'a symlink' if path.is_symlink() else 'a file'}, not a "
            "gradtrace store. Remove it yourself or choose another path."
        )
    if not any(path.iterdir()):
        path.rmdir()
        return
    if not is_gradtrace_store(path):
        raise FileExistsError(
            f"refusing to overwrite {path}: it is not a gradtrace run store (no readable zarr.json with a "
            f"'{fmt.ATTR_KEY}' header). Remove it yourself or choose another path."
        )
    fd = _acquire_lock(path, path)  # refuses a store that a live writer holds
    try:
        trash = path.parent / f".{path.name}.gradtrace-old-{os.getpid()}-{next(_TMP_COUNTER)}"
        os.rename(path, trash)  # the path is free at once; the old store goes after
    finally:
        _release_lock(fd)
    shutil.rmtree(trash, ignore_errors=True)
