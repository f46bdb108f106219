"""Integrity of committed data: checksums, missing chunks, plausibility, and ``verify``.

Every array of a store written since the checksums (``gradtrace_format/format.py``) ends each chunk
with zarr v3's ``crc32c`` codec, which zarr and zarrs check on every decode. This module turns
what they raise into a :class:`gradtrace_format.format.DamagedStoreError` that names the array, the
rows (the reader adds the steps) and the chunk file, and adds what a checksum cannot see:

* a chunk file that is missing reads as the fill value (NaN, 0) in plain zarr; here a missing
  chunk of a committed row is an error (:func:`check_present`);
* the per-step arrays are rewritten in place, a row and then the chunk's checksum, so after a
  kill between the two the stored crc covers the chunk with its uncommitted rows at the fill
  value: :func:`decode_scalar_block` accepts exactly that, so every committed byte is covered;
* plausibility checks that read nothing extra: flags against the known bits and the stored
  norms (:func:`check_flags`), the parameter table against the header
  (``format.check_header``, :func:`check_table_arrays`), and the ``||G_t||^2`` a Gram pass
  computes against the stored ``grad_sqnorm`` (:func:`check_norms`);
* :func:`verify_store` decodes every committed chunk of every array and recomputes each dense
  row's squared norm, for ``gradtrace verify``.
"""

from __future__ import annotations

import dataclasses

import math
import os
from pathlib import Path

import numpy as np

from gradtrace_format import format as fmt

_FLOAT_KINDS = "f"


# ---------------------------------------------------------------------------------- keys


def _is_local(arr) -> bool:
    from zarr.storage import LocalStore

    return isinstance(arr.store_path.store, LocalStore)


def _store_key(arr, coords) -> str:
    key = arr.metadata.encode_chunk_key(tuple(int(c) for c in coords))
    p = arr.store_path.path
    return f"{p}/{key}" if p else key


def _sharding(arr):
    """The ``sharding_indexed`` codec of ``arr`` (None for one object per chunk)."""
    from zarr.codecs import ShardingCodec

    codecs = list(arr.metadata.codecs)
    return codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None


def shard_of(arr, coords) -> tuple[tuple[int, ...], int, int] | None:
    """``(shard coords, entry, entries)`` of chunk ``coords`` of a sharded array: the shard file
    holding it, the chunk's place in that shard's index (C order), the index length. None when
    ``arr`` stores one object per chunk."""
    sc = _sharding(arr)
    if sc is None:
        return None
    inner = [int(c) for c in sc.chunk_shape]
    per = [int(s) // i for s, i in zip(arr.metadata.chunk_grid.chunk_shape, inner)]
    outer = tuple(int(c) // k for c, k in zip(coords, per))
    entry = 0
    for c, k in zip(coords, per):
        entry = entry * k + int(c) % k
    return outer, entry, int(np.prod(per))


def _file(arr, key: str) -> str:
    store = arr.store_path.store
    if _is_local(arr):
        return os.path.join(str(store.root), key)
    return f"{getattr(store, 'path', store)}/{key}"


def chunk_file(arr, coords) -> str:
    """The file (local path or URL) of chunk ``coords`` of ``arr``, for messages (a shard file
    with the chunk's place in it, for sharded arrays)."""
    sh = shard_of(arr, coords)
    if sh is None:
        return _file(arr, _store_key(arr, coords))
    where = ".".join(str(int(c)) for c in coords)
    return f"{_file(arr, _store_key(arr, sh[0]))} (chunk {where} in the shard)"


def _get_raw(arr, key: str, start: int | None = None, length: int | None = None,
             suffix: int | None = None) -> bytes | None:
    """Bytes of the object ``key`` (all; ``length`` from ``start``; or the last ``suffix``);
    None when it does not exist."""
    if _is_local(arr):
        try:
            with open(_file(arr, key), "rb") as f:
                if suffix is not None:
                    f.seek(max(0, os.fstat(f.fileno()).st_size - suffix))
                    return f.read()
                if start is not None:
                    return os.pread(f.fileno(), length, start)
                return f.read()
        except FileNotFoundError:
            return None
    from zarr.abc.store import RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    rng = None
    if suffix is not None:
        rng = SuffixByteRequest(suffix)
    elif start is not None:
        rng = RangeByteRequest(start, start + length)
    buf = sync(arr.store_path.store.get(key, prototype=default_buffer_prototype(), byte_range=rng))
    return None if buf is None else buf.to_bytes()


_EMPTY = 2**64 - 1
_MAX_CHUNK = 1 << 40  # no chunk is this large: an index entry claiming more is damaged


def _shard_entry(arr, coords) -> tuple[str, int, int] | None:
    """``(shard key, offset, nbytes)`` of chunk ``coords`` in its shard (both 2**64 - 1 when
    the shard has no such chunk); None when the shard file is missing. Reads the index only."""
    from zarr.codecs import Crc32cCodec

    sc = _sharding(arr)
    outer, entry, n = shard_of(arr, coords)
    key = _store_key(arr, outer)
    index_len = 16 * n + 4 * any(isinstance(c, Crc32cCodec) for c in sc.index_codecs)
    at_start = getattr(sc.index_location, "value", sc.index_location) == "start"
    index = _get_raw(arr, key, 0, index_len) if at_start else _get_raw(arr, key, suffix=index_len)
    if index is None:
        return None
    if len(index) < index_len:
        return key, 0, index_len + 1  # a torn shard: no chunk in it can be read whole
    off, nb = np.frombuffer(index[16 * entry: 16 * entry + 16], dtype="<u8")
    return key, int(off), int(nb)


def _get_bytes(arr, coords) -> bytes | None:
    """Raw stored bytes of one chunk (None when the chunk does not exist). A chunk whose shard
    index points past the end of its file gives the bytes that are there (they fail the crc)."""
    if shard_of(arr, coords) is None:
        return _get_raw(arr, _store_key(arr, coords))
    found = _shard_entry(arr, coords)
    if found is None or (found[1] == _EMPTY and found[2] == _EMPTY):
        return None
    key, off, nb = found
    if nb < 4 or nb > _MAX_CHUNK or off > _MAX_CHUNK * 1024:  # a damaged index entry
        return b""  # fails the crc: reported as damage
    return _get_raw(arr, key, off, nb)


def _exists(arr, coords) -> bool:
    if shard_of(arr, coords) is not None:
        found = _shard_entry(arr, coords)
        return found is not None and not (found[1] == _EMPTY and found[2] == _EMPTY)
    if _is_local(arr):
        return os.path.exists(chunk_file(arr, coords))
    from zarr.core.sync import sync

    return bool(sync(arr.store_path.store.exists(_store_key(arr, coords))))


def has_crc(arr) -> bool:
    """True when every chunk of ``arr`` ends with its crc32c (inside the shards, if sharded)."""
    from zarr.codecs import Crc32cCodec

    sc = _sharding(arr)
    codecs = list(sc.codecs if sc is not None else arr.metadata.codecs)
    return bool(codecs) and isinstance(codecs[-1], Crc32cCodec)


def _name(arr) -> str:
    p = str(arr.path).rstrip("/")
    if p:
        return p.split("/")[-1]
    store = arr.store_path.store  # opened at the array itself (analysis.store.ArrayRef)
    return str(getattr(store, "root", None) or getattr(store, "path", "")).rstrip("/").split("/")[-1]


# ---------------------------------------------------------------------- per-step arrays


def _raw_scalar(arr) -> bool:
    """Uncompressed per-step array with a crc (``[bytes, crc32c]``, native little endian)."""
    from zarr.codecs import BytesCodec

    codecs = list(arr.metadata.codecs)
    return len(codecs) == 2 and isinstance(codecs[0], BytesCodec) and has_crc(arr) and (
        arr.dtype.itemsize == 1 or getattr(codecs[0].endian, "value", codecs[0].endian) == "little")


def decode_scalar_block(raw: bytes | None, arr, b: int, n: int) -> np.ndarray:
    """Decode block ``b`` of a per-step array whose first ``n`` rows are committed.

    Accepts the stored crc32c when it matches the chunk as stored, or the chunk with its
    uncommitted rows (index >= n) set to the fill value: the writer rewrites a row in place and
    then the crc, and a kill between the two leaves the second (see the module docstring).

    Returns:
        The block, shape ``(R,) + row_shape``.

    Raises:
        DamagedStoreError: a missing chunk holding committed rows, a wrong size or a crc that
            matches neither (rows: the block's committed rows).
    """
    import google_crc32c

    R = int(arr.chunks[0])
    row_shape = tuple(int(c) for c in arr.chunks[1:])
    dtype = np.dtype(arr.dtype)
    row_bytes = dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    size = R * row_bytes
    lo = b * R
    n_valid = int(min(max(n - lo, 0), R))
    rows = range(lo, lo + n_valid)
    where = (b,) + (0,) * len(row_shape)
    if raw is None:
        if n_valid == 0:
            return np.full((R,) + row_shape, arr.fill_value, dtype=dtype)
        raise fmt.damaged("the store", _name(arr), "the chunk is missing", rows=rows, files=[chunk_file(arr, where)])
    if len(raw) != size + 4:
        raise fmt.damaged("the store", _name(arr), f"the chunk has {len(raw)} bytes, expected {size + 4}",
                          rows=rows, files=[chunk_file(arr, where)])
    payload, stored = raw[:size], int.from_bytes(raw[size:], "little")
    if google_crc32c.value(payload) != stored:
        # the writer fills rows in order, each row then the crc: a kill between the two leaves
        # a crc over rows < m as written and rows >= m at the fill value, for the row m in
        # flight, which is at or past the committed rows (commits may lag several rows)
        ok = False
        fill_row = np.full((1,) + row_shape, arr.fill_value, dtype=dtype).tobytes()
        for m in range(n_valid, R):
            if google_crc32c.value(payload[: m * row_bytes] + fill_row * (R - m)) == stored:
                ok = True
                break
        if not ok:
            raise fmt.damaged("the store", _name(arr), "checksum mismatch (crc32c)", rows=rows,
                              files=[chunk_file(arr, where)])
    return np.frombuffer(payload, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False).reshape((R,) + row_shape)


def read_scalar(arr, n: int, lo: int = 0, hi: int | None = None) -> np.ndarray:
    """Committed rows ``lo..hi`` (default all ``n``) of a per-step array, every chunk checked.

    Raises:
        DamagedStoreError: see :func:`decode_scalar_block`; for stores written before the
            checksums, a missing chunk of a committed row.
    """
    hi = n if hi is None else min(int(hi), n)
    lo = int(lo)
    if hi <= lo:
        return np.asarray(arr[0:0]) if arr.ndim == 1 else np.zeros((0,) + tuple(arr.shape[1:]), arr.dtype)
    R = int(arr.chunks[0])
    blocks = range(lo // R, (hi - 1) // R + 1)
    if not _raw_scalar(arr):  # older stores: no crc; zarr decodes, missing chunks are errors
        for b in blocks:
            where = (b,) + (0,) * (arr.ndim - 1)
            if not _exists(arr, where):
                rows = range(b * R, min(n, (b + 1) * R))
                raise fmt.damaged("the store", _name(arr), "the chunk is missing", rows=rows,
                                  files=[chunk_file(arr, where)])
        try:
            return np.asarray(arr[lo:hi])
        except Exception as err:  # noqa: BLE001 - any decode failure of committed rows is damage
            raise fmt.damaged("the store", _name(arr), f"cannot decode ({type(err).__name__}: {err})",
                              rows=range(lo, hi)) from None
    parts = []
    for b in blocks:
        block = decode_scalar_block(_get_bytes(arr, (b,) + (0,) * (arr.ndim - 1)), arr, b, n)
        a0, a1 = max(lo, b * R) - b * R, min(hi, (b + 1) * R) - b * R
        parts.append(block[a0:a1])
    return np.concatenate(parts, axis=0)


class CheckedScalarArray:
    """Read-only array view of the committed rows of a (step, tensor) array for ``dask``:
    every read goes through :func:`read_scalar`."""

    def __init__(self, arr, n: int):
        self.arr, self.n = arr, int(n)
        self.shape = (self.n,) + tuple(arr.shape[1:])
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        r = key[0]
        if isinstance(r, slice):
            start, stop, step = r.indices(self.n)
            block = read_scalar(self.arr, self.n, start, stop) if stop > start else read_scalar(self.arr, self.n, 0, 0)
            return block[(slice(None, None, step),) + key[1:]]
        rows = np.atleast_1d(np.asarray(r, dtype=np.int64))
        if len(rows) == 0:
            return read_scalar(self.arr, self.n, 0, 0)[(rows,) + key[1:]]
        lo, hi = int(rows.min()), int(rows.max()) + 1
        block = read_scalar(self.arr, self.n, lo, hi)
        return block[(rows - lo,) + key[1:]] if np.ndim(r) else block[(int(r) - lo,) + key[1:]]

    def get_orthogonal_selection(self, sel):
        rows, cols = sel
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, len(np.atleast_1d(cols))), self.dtype)
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return read_scalar(self.arr, self.n, lo, hi)[rows - lo][:, cols]


# ------------------------------------------------------------------- row-chunked arrays


def _crc_ok(raw: bytes) -> bool:
    import google_crc32c

    # a read-only array view: google_crc32c takes read-only buffers, and bytes slicing would copy
    return len(raw) >= 4 and google_crc32c.value(np.frombuffer(raw, np.uint8)[:-4]) == int.from_bytes(raw[-4:], "little")


def _uses_zarrs(arr) -> bool:
    pipe = getattr(getattr(arr, "_async_array", None), "codec_pipeline", None)
    return type(pipe).__name__.startswith("Zarrs")


def _scan_shards(arr, rows, a: int, b: int, crc: bool) -> list[tuple[int, str, str]]:
    """``(row, file, reason)`` for the chunks of ``rows`` x columns ``[a, b)`` of a sharded
    array that are missing (an empty index entry, or no shard file; without ``crc``) or, with
    ``crc``, whose stored bytes fail their crc32c. Reads each shard's index once and, with
    ``crc``, each stored chunk's bytes."""
    cw = int(arr.chunks[1])
    b = min(b, int(arr.shape[1]))
    by_shard: dict = {}
    for r in np.atleast_1d(np.asarray(rows, dtype=np.int64)):
        for j in range(a // cw, -(-b // cw)):
            outer, entry, n = shard_of(arr, (int(r), j))
            by_shard.setdefault(outer, []).append((int(r), j, entry))
    sc = _sharding(arr)
    from zarr.codecs import Crc32cCodec

    out = []
    local = _is_local(arr)
    for outer, chunks in by_shard.items():
        n = shard_of(arr, chunks[0][:2])[2]
        key = _store_key(arr, outer)
        index_len = 16 * n + 4 * any(isinstance(c, Crc32cCodec) for c in sc.index_codecs)
        at_start = getattr(sc.index_location, "value", sc.index_location) == "start"
        fd = None
        if local:  # one open file per shard: its index, then each chunk's bytes
            try:
                fd = os.open(_file(arr, key), os.O_RDONLY)
            except FileNotFoundError:
                index = None
            else:
                size = os.fstat(fd).st_size
                index = os.pread(fd, index_len, 0 if at_start else max(0, size - index_len))
        else:
            index = _get_raw(arr, key, 0, index_len) if at_start else _get_raw(arr, key, suffix=index_len)
        try:
            if index is None or len(index) < index_len:
                if index is not None or not crc:
                    why = "the chunk is missing" if index is None else "its shard file is torn"
                    out.extend((r, chunk_file(arr, (r, j)), why) for r, j, _ in chunks)
                continue
            table = np.frombuffer(index[: 16 * n], dtype="<u8").reshape(n, 2)
            size = os.fstat(fd).st_size if fd is not None else None
            for r, j, entry in chunks:
                off, nb = int(table[entry, 0]), int(table[entry, 1])
                if off == _EMPTY and nb == _EMPTY:
                    if not crc:
                        out.append((r, chunk_file(arr, (r, j)), "the chunk is missing"))
                    continue
                # an entry no writer makes: a chunk holds at least its crc32c, lies past the
                # index and inside the file (a zeroed or garbled index page)
                if (nb < 4 or (at_start and off < index_len) or nb > _MAX_CHUNK
                        or (size is not None and off + nb > size)):
                    if not crc:  # reported once, by the presence check
                        out.append((r, chunk_file(arr, (r, j)), "its shard index entry is damaged"))
                    continue
                if not crc:
                    continue
                raw = os.pread(fd, nb, off) if fd is not None else (_get_raw(arr, key, off, nb) or b"")
                if not _crc_ok(raw):
                    out.append((r, chunk_file(arr, (r, j)), "checksum mismatch (crc32c)"))
        finally:
            if fd is not None:
                os.close(fd)
    return out


def check_partial_crc(arr, rows, a: int, b: int) -> None:
    """Check the crc32c of chunks that zarrs decodes without checking it: zarrs 0.2 decodes a
    partial chunk (the last chunk of an array whose width is not a multiple of the chunk), and
    every chunk of a shard it does not read whole, without its checksum. One extra read of those
    chunks' stored bytes (for sharded arrays: all of them, about a tenth of the decode's time)."""
    if not has_crc(arr) or not _uses_zarrs(arr):
        return
    if _sharding(arr) is not None:
        bad = _scan_shards(arr, rows, a, b, crc=True)
        if bad:
            _raise_damaged(arr, bad)
        return
    cw, width = int(arr.chunks[1]), int(arr.shape[1])
    b = min(b, width)
    partial = {j for j in {a // cw, (b - 1) // cw} if b > a and (max(a, j * cw) > j * cw or min(b, (j + 1) * cw) < (j + 1) * cw)}
    bad = []
    for j in sorted(partial):
        for r in np.atleast_1d(np.asarray(rows, dtype=np.int64)):
            raw = _get_bytes(arr, (int(r), j))
            if raw is not None and not _crc_ok(raw):
                bad.append((int(r), chunk_file(arr, (int(r), j)), "checksum mismatch (crc32c)"))
    if bad:
        _raise_damaged(arr, bad)


def damaged_chunks(arr, rows, a: int, b: int) -> list[tuple[int, str, str]]:
    """``(row, file, reason)`` for every chunk of ``rows`` x columns ``[a, b)`` that is missing
    or does not decode (each chunk checked alone: the slow path after a failed read)."""
    cw = int(arr.chunks[1])
    crc = has_crc(arr)
    out = []
    for r in np.atleast_1d(np.asarray(rows, dtype=np.int64)):
        for j in range(a // cw, -(-min(b, arr.shape[1]) // cw)):
            raw = _get_bytes(arr, (int(r), j))
            if raw is None:
                out.append((int(r), chunk_file(arr, (r, j)), "the chunk is missing"))
                continue
            if crc and not _crc_ok(raw):
                out.append((int(r), chunk_file(arr, (r, j)), "checksum mismatch (crc32c)"))
                continue
            try:
                arr[int(r), j * cw: (j + 1) * cw]
            except Exception as err:  # noqa: BLE001
                reason = "checksum mismatch (crc32c)" if "checksum" in str(err).lower() else \
                    f"the chunk does not decode ({type(err).__name__}: {err})"
                out.append((int(r), chunk_file(arr, (r, j)), reason))
    return out


def _raise_damaged(arr, found) -> None:
    rows = sorted({r for r, _, _ in found})
    files = [f for _, f, _ in found]
    reasons = sorted({why for _, _, why in found})
    raise fmt.damaged("the store", _name(arr), "; ".join(reasons), rows=rows, files=files)


def decode_failure(err: BaseException) -> bool:
    """True for what a failed read of stored bytes raises: any Exception, and the
    ``PanicException`` (a BaseException) with which zarrs reports a chunk it cannot decode."""
    return isinstance(err, Exception) or type(err).__name__ == "PanicException"


def read_failed(arr, rows, a: int, b: int, err: BaseException) -> BaseException:
    """The error to raise after a read of ``arr[rows, a:b]`` failed with ``err``: a
    DamagedStoreError naming the chunks when some chunk is damaged, else ``err``."""
    found = damaged_chunks(arr, rows, a, b)
    if not found:
        return err
    try:
        _raise_damaged(arr, found)
    except fmt.DamagedStoreError as d:
        return d
    return err  # pragma: no cover


def check_present(arr, rows, a: int, b: int, out: np.ndarray | None = None, absent=None) -> None:
    """Raise DamagedStoreError when a chunk of ``rows`` x columns ``[a, b)`` is missing (it
    would read as the fill value). Local stores: one ``stat`` per chunk (~1 us against ~0.5 ms
    to decode a 1 MiB chunk). Remote stores (``out``: the values read): only the chunks whose
    span came out entirely as the fill value (what a missing chunk gives) are asked about."""
    cw = int(arr.chunks[1])
    rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
    b = min(b, arr.shape[1])
    cols = range(a // cw, -(-b // cw))
    remote = not _is_local(arr) and out is not None
    skip = set() if absent is None else set(np.asarray(absent, dtype=np.int64).tolist())
    if _sharding(arr) is not None:  # one read of each shard's index
        missing = _scan_shards(arr, [r for r in rows if int(r) not in skip], a, b, crc=False)
        if missing:
            _raise_damaged(arr, missing)
        return
    missing = []
    for i, r in enumerate(rows):
        if int(r) in skip:  # cleared on purpose (the final iterate's grad, rows without weights)
            continue
        for j in cols:
            if remote:  # a missing chunk reads as the fill value: ask the store only about such spans
                span = out[i, max(a, j * cw) - a: min(b, (j + 1) * cw) - a]
                fill = np.isnan(span) if np.dtype(arr.dtype).kind in _FLOAT_KINDS else span == arr.fill_value
                if not fill.all():
                    continue
            if not _exists(arr, (r, j)):
                missing.append((int(r), chunk_file(arr, (r, j)), "the chunk is missing"))
    if missing:
        _raise_damaged(arr, missing)


class CheckedRows:
    """Read-only view of a row-chunked (step, x) array for ``dask``: a failed decode becomes a
    DamagedStoreError naming the chunks, and missing chunks of committed rows are errors."""

    def __init__(self, arr, path: str, steps: np.ndarray, absent_rows=()):
        self.arr, self.path, self.steps = arr, str(path), np.asarray(steps)
        self.absent = np.asarray(absent_rows, dtype=np.int64)  # rows cleared on purpose (final iterate's grad)
        self.shape = tuple(arr.shape)
        self.dtype = np.dtype(arr.dtype)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (2 - len(key))
        r, c = key
        rows = np.arange(self.shape[0])[r]
        cols = np.arange(self.shape[1])[c] if not isinstance(c, slice) else None
        a, b = (c.indices(self.shape[1])[:2] if isinstance(c, slice) else
                (int(np.min(cols)) if len(cols) else 0, int(np.max(cols)) + 1 if len(cols) else 0))
        allrows = np.atleast_1d(rows)
        keep = (allrows < len(self.steps)) & ~np.isin(allrows, self.absent)
        committed = allrows[keep]
        try:
            out = np.asarray(self.arr[key])
            if len(committed) and b > a:
                vals = None
                if isinstance(c, slice) and c.indices(self.shape[1])[2] == 1:
                    vals = out.reshape(len(allrows), -1)[keep]
                check_present(self.arr, committed, a, b, vals)
                check_partial_crc(self.arr, committed, a, b)
        except fmt.DamagedStoreError as err:
            raise err.with_steps(self.path, self.steps) from None
        except BaseException as err:  # noqa: BLE001
            if not decode_failure(err):
                raise
            e = read_failed(self.arr, committed, a, b, err)
            if isinstance(e, fmt.DamagedStoreError):
                raise e.with_steps(self.path, self.steps) from None
            raise
        return out


# ------------------------------------------------------------------------ plausibility


def _flag(name: str) -> int:
    return int(getattr(fmt, name, 0))


def absent_rows(flags: np.ndarray, array: str) -> np.ndarray:
    """Rows whose chunks of ``array`` the writer removed on purpose (they read as the fill
    value): ``grad*`` of the final iterate and of skipped rows, ``weight*`` of rows flagged
    ``FLAG_NO_WEIGHT``. Every other committed row must have all its chunks."""
    flags = np.asarray(flags, dtype=np.int64)
    # a skipped row has no gradient; it has weights unless FLAG_NO_WEIGHT says otherwise (the
    # recorder keeps the weights of a step whose gradient changed in place)
    bits = (fmt.FLAG_FINAL | _flag("FLAG_SKIPPED")) if array.startswith("grad") else _flag("FLAG_NO_WEIGHT")
    return np.flatnonzero(flags & bits)


def check_flags(path, flags: np.ndarray, gsq: np.ndarray, wsq: np.ndarray, steps: np.ndarray) -> None:
    """Flags and stored norms must agree (free: the reader has them in memory).

    Only known bits; ``FLAG_FINAL`` on the last row only, with a NaN ``grad_sqnorm``; a row
    without ``FLAG_NONFINITE_GRAD`` has a finite ``grad_sqnorm`` (and one with it, a non-finite
    one); the same for the weights. Raises DamagedStoreError naming the rows' steps.
    """
    flags = np.asarray(flags, dtype=np.int64)
    known = 0
    for bit in fmt.FLAG_NAMES:
        known |= bit
    n = len(flags)
    final = (flags & fmt.FLAG_FINAL) != 0
    no_grad = (flags & (fmt.FLAG_FINAL | _flag("FLAG_SKIPPED"))) != 0
    no_weight = (flags & _flag("FLAG_NO_WEIGHT")) != 0
    gfin = np.isfinite(gsq)
    wfin = np.isfinite(wsq)
    checks = [
        ((flags & ~known) != 0, "'flags' has bits no gradtrace version writes"),
        (final & (np.arange(n) != n - 1), "'flags' marks a row that is not the last as the final iterate"),
        (no_grad & ~np.isnan(gsq), "'flags' says the row has no gradient, but it has a gradient norm"),
        (no_weight & ~np.isnan(wsq), "'flags' says the row has no weights, but it has a weight norm"),
        (~no_grad & (((flags & fmt.FLAG_NONFINITE_GRAD) != 0) == gfin),
         "'flags' disagrees with 'grad_sqnorm' on whether the gradient is finite"),
        (~no_weight & (((flags & fmt.FLAG_NONFINITE_WEIGHT) != 0) == wfin),
         "'flags' disagrees with 'weight_sqnorm' on whether the weights are finite"),
        (gfin & (gsq < 0), "'grad_sqnorm' is negative"),
        (wfin & (wsq < 0), "'weight_sqnorm' is negative"),
    ]
    for bad, why in checks:
        if bad.any():
            rows = np.flatnonzero(bad)
            raise fmt.damaged(path, why.split("'")[1], why, rows=rows, steps=np.asarray(steps)[rows])


def check_table_arrays(path, header: fmt.Header, group) -> None:
    """The stored ``tensor``, ``tensor_offset`` and ``tensor_size`` arrays must equal the
    header's parameter table (readers use the header's)."""
    want = {
        t.name: t.values(header.tensors) for t in fmt.TABLE_SPECS if t.dtype == "int64"
    }
    lay = fmt.layout_of(header)
    if lay is not None:  # a sharded store's shard table (what plain xarray readers use)
        for k, name in enumerate(fmt.SHARD_ARRAYS):
            want[name] = np.array([dataclasses.astuple(sh)[k] for sh in lay.shards], dtype=np.int64)
    for name, expect in want.items():
        try:
            got = np.asarray(group[name][:], dtype=np.int64)
        except KeyError:
            continue  # not required by the format's readers
        except Exception as err:  # noqa: BLE001
            raise fmt.damaged(path, name, f"cannot decode ({type(err).__name__}: {err})") from None
        if got.shape != expect.shape or not np.array_equal(got, expect):
            i = int(np.flatnonzero(got != expect)[0]) if got.shape == expect.shape else 0
            raise fmt.damaged(path, name, f"it disagrees with the header's parameter table (entry {i}: "
                              f"{got[i] if got.size > i else 'missing'} vs {expect[i]})")


def norm_tolerance(tier: fmt.Tier, precision: str = "float64") -> float:
    """Relative tolerance of ``||x||^2`` from the stored values against the writer's exact
    float64 value: float64 summation order (lossless), plus ``2u + u^2`` with
    ``u = 2**-(keepbits+1)`` for the rounded tier; float32 Gram blocks add ~1e-5."""
    tol = 1e-9 if precision == "float64" else 1e-4
    if tier.rounds:
        u = 2.0 ** -(int(tier.keepbits) + 1)
        tol += 2 * u + u * u
    return tol


def check_norms(run, rows: np.ndarray, sq: np.ndarray, group, precision: str = "float64") -> None:
    """The ``||G_t||^2`` a Gram pass computed (its diagonal) against the stored ``grad_sqnorm``
    of the same rows and tensors; dense tiers only (a sketch's norm is an estimate).

    Raises:
        DamagedStoreError: rows whose two values differ by more than :func:`norm_tolerance`
            (a damaged chunk that decoded: a store without checksums, or bytes changed before
            the checksum was computed).
    """
    tier = run.header.tiers["grad"]
    if tier.is_sketch or len(rows) == 0:
        return
    stored = run.per_tensor_scalar(fmt.GRAD_SQNORM, np.asarray(rows), group)
    sq = np.asarray(sq, dtype=np.float64)
    both = np.isfinite(stored) & np.isfinite(sq)
    tol = norm_tolerance(tier, precision)
    bad = (np.isfinite(stored) != np.isfinite(sq)) | (
        both & (np.abs(sq - stored) > tol * np.maximum(np.abs(stored), 1e-300)))
    if bad.any():
        r = np.asarray(rows)[bad]
        raise fmt.damaged(run.path, "grad", "the squared norm of the stored gradient differs from the "
                          f"'grad_sqnorm' the writer computed (relative tolerance {tol:.1e})",
                          rows=r, steps=run.steps[r])


# -------------------------------------------------------------------------------- verify


def verify_store(path, *, storage_options: dict | None = None, progress=None) -> list[str]:
    """Check every committed chunk of every array of the store at ``path``.

    Decodes each chunk (checksums, sizes), reports missing chunks, checks flags against the
    stored norms and the parameter table against the header, and recomputes the squared norm
    of every dense ``grad`` and ``weight`` row against the stored ``grad_sqnorm`` /
    ``weight_sqnorm``.

    Returns:
        One line per problem (``"step S: array 'grad' ...: reason (file F)"``); empty when the
        store is intact.

    Raises:
        DamagedStoreError / NotAStoreError: the metadata itself cannot be read.
    """
    import zarr

    header = fmt.read_header(path, storage_options=storage_options)
    group = zarr.open_group(str(path), mode="r", use_consolidated=False,
                            **({"storage_options": storage_options} if storage_options else {}))
    n = header.n_steps
    problems: list[str] = []
    specs = fmt.store_array_specs(header)
    arrays = {}
    for spec in specs:
        try:
            arrays[spec.name] = group[spec.name]
        except KeyError:
            problems.append(f"array '{spec.name}' is missing")
    try:
        check_table_arrays(path, header, group)
    except fmt.DamagedStoreError as err:
        problems.append(f"array '{err.array}': {err.reason}")

    steps = np.arange(n)  # replaced by the step column when it reads
    scalars = {}
    for spec in specs:
        if spec.row_chunked or spec.name not in arrays:
            continue
        arr = arrays[spec.name]
        if arr.shape[0] < n:
            problems.append(f"array '{spec.name}' has {arr.shape[0]} rows, the header commits {n}")
            continue
        R = int(arr.chunks[0])
        good = []
        for b in range(0, -(-n // R)):
            try:
                good.append(read_scalar(arr, n, b * R, min(n, (b + 1) * R)))
            except fmt.DamagedStoreError as err:
                lab = _rows_label(err.rows, steps if spec.name != "step" else None)
                problems.append(f"{lab}: array '{spec.name}' {err.reason} (file {err.files[0] if err.files else '?'})")
                good.append(None)
        if all(g is not None for g in good):
            scalars[spec.name] = np.concatenate(good) if good else np.zeros(0)
        if spec.name == "step" and "step" in scalars:
            steps = scalars["step"]
    if {"flags", fmt.GRAD_SQNORM, fmt.WEIGHT_SQNORM} <= set(scalars):
        try:
            check_flags(path, scalars["flags"], scalars[fmt.GRAD_SQNORM], scalars[fmt.WEIGHT_SQNORM], steps)
        except fmt.DamagedStoreError as err:
            problems.append(f"{_rows_label(err.rows, steps)}: {err.reason}")

    for spec in specs:
        if not spec.row_chunked or spec.name not in arrays:
            continue
        arr = arrays[spec.name]
        if arr.shape[0] < n:
            problems.append(f"array '{spec.name}' has {arr.shape[0]} rows, the header commits {n}")
            continue
        cw = int(arr.chunks[1])
        dense = spec.name in fmt.DATA_ARRAYS
        stored = scalars.get(f"{spec.name}_sqnorm") if dense else None
        tol = norm_tolerance(header.tiers[spec.name]) if dense else 0.0
        crc = has_crc(arr)
        absent = set(absent_rows(scalars["flags"], spec.name).tolist()) if "flags" in scalars else set()
        for r in range(n):
            row_bad = False
            acc = 0.0
            for j in range(-(-int(arr.shape[1]) // cw)):
                raw = _get_bytes(arr, (r, j))
                if raw is not None and crc and not _crc_ok(raw):
                    problems.append(f"{_rows_label([r], steps)}: array '{spec.name}' chunk {r}/{j} checksum mismatch "
                                    f"(crc32c) (file {chunk_file(arr, (r, j))})")
                    row_bad = True
                    continue
                if raw is None:
                    if r in absent:  # cleared on purpose: the final iterate's grad, rows without weights
                        continue
                    problems.append(f"{_rows_label([r], steps)}: array '{spec.name}' chunk {r}/{j} is missing "
                                    f"(file {chunk_file(arr, (r, j))})")
                    row_bad = True
                    continue
                try:
                    x = np.asarray(arr[r, j * cw: (j + 1) * cw])
                except Exception as err:  # noqa: BLE001
                    why = "checksum mismatch (crc32c)" if "checksum" in str(err).lower() else f"does not decode ({err})"
                    problems.append(f"{_rows_label([r], steps)}: array '{spec.name}' chunk {r}/{j} {why} "
                                    f"(file {chunk_file(arr, (r, j))})")
                    row_bad = True
                    continue
                if dense:
                    acc += float(np.dot(x.astype(np.float64), x.astype(np.float64)))
            if dense and not row_bad and stored is not None and math.isfinite(stored[r]):
                if not (abs(acc - stored[r]) <= tol * max(abs(stored[r]), 1e-300)):
                    problems.append(f"{_rows_label([r], steps)}: array '{spec.name}': the stored values' squared "
                                    f"norm {acc:.9g} differs from the recorded {spec.name}_sqnorm {stored[r]:.9g}")
        if progress:
            progress(spec.name)
    return problems


def _rows_label(rows, steps) -> str:
    rows = list(rows)
    if steps is None or not len(rows):
        return "rows " + fmt._short_list(rows) if len(rows) != 1 else f"row {rows[0]}"
    named = [int(steps[r]) for r in rows if r < len(steps)]
    return ("step " if len(named) == 1 else "steps ") + fmt._short_list(named)
