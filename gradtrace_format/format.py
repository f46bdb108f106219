"""The gradtrace run-store format: the one place that defines the on-disk layout.

Everything that writes a store (``capture``) or reads one (``analysis``) asks this module
for names, dims, chunks, codecs, tiers and the format version. It imports numpy and zarr,
never torch.

A run store is a Zarr v3 group. Format version 1.0 (``docs/format.md`` is this spec in prose):

Root attribute ``gradtrace`` (a JSON dict, see :class:`Header`) holds the format version, the
number of committed rows ``n_steps`` (the commit marker: rows at index >= n_steps are
ignored by readers), whether the store was closed cleanly, the parameter table, the tier of
each array, the schedule and the run's settings.

Arrays (Zarr ``dimension_names`` make them readable by plain ``xarray.open_zarr``):

=========================  =================  =========  ===========================================
name                       dims               dtype      meaning
=========================  =================  =========  ===========================================
``step``                   (step,)            int64      global training step of the row (coord)
``epoch``                  (step,)            int64      epoch of the row, -1 if unknown
``loss``                   (step,)            float64    loss at the step (NaN if not given)
``lr``                     (step,)            float64    learning rate used by the update of step t
``flags``                  (step,)            int32      bit set, see ``FLAG_*``
``grad_sqnorm``            (step,)            float64    ||G_t||^2, float64, from exact gradient
``weight_sqnorm``          (step,)            float64    ||w_t||^2
``grad_dot_weight``        (step,)            float64    <G_t, w_t>
``grad_sqnorm_tensor``     (step, tensor)     float64    the same three per parameter tensor
``weight_sqnorm_tensor``   (step, tensor)     float64
``grad_dot_weight_tensor`` (step, tensor)     float64
``tensor``                 (tensor,)          str        parameter names, named_parameters order
``tensor_offset``          (tensor,)          int64      offset of the tensor in the flat vector
``tensor_size``            (tensor,)          int64      number of entries
``grad``, ``weight``       (step, param)      float32    lossless / rounded tiers, NaN = absent
``{a}_sketch``             (step, sketch)     float32    sketch tier: CountSketch, see below
``{a}_signbits``           (step, param_byte) uint8      sketch tier: np.packbits(x < 0)
``{a}_nonzero``            (step, param_byte) uint8      sketch tier: np.packbits(x != 0)
=========================  =================  =========  ===========================================

The final iterate (weights after the last update) is the row whose step is one past the last
step the recorder saw; its ``grad`` is NaN and its flags contain ``FLAG_FINAL``.

Chunks and codecs (readers need not know them: Zarr records them per array):

* ``grad``, ``weight`` and the sketch-tier arrays: one row per chunk, ``(1, w)`` with w at most
  ``param_chunk`` entries (:func:`param_chunk_width`: ``ceil(d / param_chunk)`` chunks of equal
  width, a multiple of 8; the bit planes ``(1, w)`` bytes, i.e. 8 w parameters), so a step's
  write touches whole chunks only and a reader's slab of columns holds whole chunks.
  ``param_chunk`` defaults to 2**18 entries (1 MiB of float32).
  In a store recorded to a local path the chunks are gathered into **shard files** (Zarr v3's
  ``sharding_indexed`` codec, :meth:`ArraySpec.zarr_layout`, :func:`shard_geometry`): a shard
  holds ``rows`` steps by ``chunks`` chunks, as many whole rows as fit in :data:`SHARD_BYTES`
  of raw data (a power of two up to :data:`SHARD_MAX_ROWS`), or, for longer rows, one row of
  as many chunks as fit. Inside a shard each chunk keeps its own codecs and crc32c. The
  shard's index (``rows x chunks`` pairs of little-endian uint64 ``(offset, nbytes)``,
  ``2**64 - 1`` twice for a chunk not written) is at the **start** of the file and has **no
  checksum**: the writer appends a chunk's bytes to the open shard file and then writes its
  index entry, so the entries of committed rows never change after their commit (a checksum
  over the index would be rewritten at every step, and a kill between the entry and the
  checksum would make the committed rows unreadable). A damaged index entry points at bytes
  that fail the chunk's crc32c. A row written again (after a rewind or a resume) is appended
  anew; the bytes it replaces stay in the file unused. Shard keys are ``c.<row block>.<col
  block>``. Stores written to object storage (where an object cannot be appended to) and
  stores made with ``StoreWriter(shard_files=False)`` have one object per chunk, keyed
  ``c.<row>.<col>``, in one flat directory per array.
  Lossless values: Blosc lz4, clevel 1, no shuffle (``lossless:bitshuffle``: bit-shuffle);
  rounded: Blosc lz4, clevel 1, byte-shuffle; raw (``lossless:raw``): no compressor; bit
  planes: Blosc lz4, clevel 5, no shuffle. Every chunk ends with its crc32c. gradtrace's
  writer makes the lossless and rounded Blosc frames itself (``capture.kernels``): a split
  of one byte value, or with runs of 16+ bytes of one value, is LZ4, any other split stored as it
  is; any Blosc decoder reads them.
* per-step arrays: ``(4096,)`` rows per chunk; per-step-per-tensor arrays: as many rows as
  keep a chunk near 64 KiB (:func:`scalar_chunk_rows`). Stored uncompressed (8 bytes per
  value), so the writer updates steps by writing their rows' bytes in place: a chunk file is
  created whole (atomic rename) when its first row is written, and later writes (the rows
  written since the last commit and the chunk's crc32c, in one write at the commit) touch only
  bytes of uncommitted rows and the crc, never those of a committed row.

Format version 1.0 is final: a reader takes every 1.x store, refuses a newer major version
(upgrade gradtrace) and a store from before 1.0 (integer version: re-record it, or read it
with the gradtrace that wrote it), each in one line (:func:`check_format_version`). A header
without ``source_dtype`` (the recorded dtype before the float32 cast, checked on resume)
reads it as None. zarrs (0.2) does not check the crc32c of a chunk it decodes from a shard it
does not read whole: gradtrace's readers check those checksums themselves
(``gradtrace_format.integrity.check_partial_crc``).

Sharded stores (``capture.Recorder`` on every rank of an FSDP2 / DTensor model, each
parameter split along dim 0 over W ranks): the parameter table (``tensor*`` arrays, the
per-tensor scalars, ``n_params``, the sketch plan) is the natural one, but the columns of
``grad``, ``weight`` and the bit planes are laid out rank-major: rank r owns columns
``[r R, (r+1) R)`` and holds there, in table order, the rows ``start..stop`` of dim 0 of every
tensor it has a shard of, then zeros up to ``(r+1) R`` (pad columns: no tensor's entries; they
read as 0 and ``nonzero`` bit 0). ``R`` is a multiple of the chunk width, itself a multiple of 8,
so no chunk (and no bit-plane byte) is written by two ranks. The header field ``sharded``
(:class:`ShardedLayout`) and the arrays ``shard_tensor``, ``shard_rank``, ``shard_start``,
``shard_stop``, ``shard_column``, ``shard_size`` (dim ``shard``) map every shard: entries
``[column, column + size)`` of a row are rows ``start..stop`` of dim 0 of tensor
``shard_tensor``, i.e. its natural entries ``tensor_offset + start * inner ..`` (inner: the
product of the other dims). :meth:`ShardedLayout.natural` rebuilds the natural-order vector
(``analysis.store.Run.natural`` for a step); with plain xarray::

    ds = xr.open_zarr(store)
    row = ds.grad.sel(step=t).values
    parts = [row[c: c + n] for c, n in zip(ds.shard_column.values, ds.shard_size.values)]
    # shards are stored in (tensor, start) order: concatenating them gives the natural vector

Pad columns count nowhere: analysis maps each tensor to its shards' column ranges
(:meth:`ShardedLayout.tensor_columns`), so entry counts, sign-shift denominators and the
number of parameters never include them. The per-tensor scalars are reduced over ranks in
float64 (one all-reduce per step) and written by rank 0, with the per-step arrays. A sketch
tier's ``{a}_sketch`` hashes every entry by its natural coordinate, so it is the sketch an
unsharded recording stores (the ranks' partial sketches are summed, float64, then cast).

Commit across ranks: a row is committed (rank 0 advances ``n_steps``) only after every rank
has written its chunks of it. The per-step all-reduce of the scalars is issued by each rank
after its chunk writes, so its completion on rank 0 is that guarantee (no extra collective, no
per-rank marker for readers to combine). Resume needs the same world size and layout. The
same layout and protocol hold in object storage (an fsspec URL): one object per chunk, each
put by the rank owning its columns before that rank enters the all-reduce, and rank 0's root
``zarr.json`` put last; such a store is created new (no resume on a URL).

Query index (optional, derived; ``gradtrace index`` / :func:`analysis.index.build_index`):
a sub-group ``index`` of T x T matrices from which every correlation, sign shift and
RSI/EB/gamma against a recorded iterate follows without reading the data again. It indexes
store rows 0..n-1 (the final iterate included: its gradient entries are NaN, its sign counts
-1, as for a gradient holding NaN/Inf). Weights enter as ``V_j = W_j - a``, their difference from a fixed anchor ``a`` (the last
row with weights when the index was first built, not one a weight schedule skipped; stored
in ``index/anchor``): RSI needs only
differences ``w_t - w_s = V_t - V_s``, and products of the small V lose far fewer digits to
cancellation than products of W (``analysis.rsi``). Plain ``xarray.open_zarr(store)`` ignores
the sub-group; ``xarray.open_zarr(store, group="index")`` reads it. Layout ``full`` (dims
``index_row``, ``index_col``: entry [i, j] is rows i and j) or ``band`` (dims ``index_row``,
``index_lag``: entry [i, l] is rows i and i - l, l = 0..L; NaN / -1 where i - l < 0):

======================  ============================  =======  ======================================
name                    dims                          dtype    meaning
======================  ============================  =======  ======================================
``index/step``          (index_row,)                  int64    step of each indexed row
``index/check``         (index_row, index_check)      float64  step, flags, grad_sqnorm,
                                                               weight_sqnorm, grad_dot_weight of the
                                                               row when indexed
``index/anchor``        (index_anchor,)               float64  the anchor a (length d, or the sketch
                                                               dimension for the sketch tier)
``index/gg``            (index_row, index_col|lag)    float64  <G_i, G_j>
``index/gv``            (index_row, index_col|lag)    float64  <G_i, V_j>
``index/vg``            (index_row, index_lag)        float64  band only: <V_i, G_{i-l}>
``index/vv``            (index_row, index_col|lag)    float64  <V_i, V_j>
``index/sign_disagree`` (index_row, index_col|lag)    int64    #{k: G_i[k] G_j[k] < 0}
``index/sign_both``     (index_row, index_col|lag)    int64    #{k: G_i[k] != 0 and G_j[k] != 0}
======================  ============================  =======  ======================================

Products are float64 sums of the stored float32 values (each cast exactly; ``w - a`` formed in
float64), in the space the direct pass uses: the stored values for lossless and rounded
tiers, the sketches for the sketch tier (``grad_sketch``, ``weight_sketch``), the packed bit
planes for the sketch tier's sign counts. The other sign counts follow from these two and the
diagonal (``sign_both[i, i]`` is the number of non-zero entries n_i): entries where one is
zero and the other not, ``n_i + n_j - 2 both``; entries where the signs differ counting zero as
a sign (sign(a) != sign(b) in {-1, 0, 1}), ``disagree + n_i + n_j - 2 both``; entries zero at
either step, ``d - both``. The sign-shift percentages (``analysis.signs``) use
``disagree / both`` (``denominator="both_nonzero"``) or ``disagree / d`` (``denominator="all"``:
a zero at either step counts as no flip, not the zero-as-a-sign count above). Chunks: ``(INDEX_CHUNK, INDEX_CHUNK)`` (full) or
``(INDEX_BAND_CHUNK_ROWS, L+1)`` (band), Blosc lz4 + shuffle, then a CRC32C checksum per chunk
(Zarr's ``crc32c`` codec: a damaged chunk fails to decode instead of giving wrong numbers).
The group attribute ``gradtrace_index`` holds ``version``, ``layout``, ``band``, ``n_rows``
(the rows written; written last, so an interrupted build leaves the old rows valid),
``anchor_step``, the ``spaces`` of the products and the build's timings. A reader uses a row
only while its ``check`` matches the store (a resumed run rewrites its final-iterate row), so
an index never answers for data it was not built from.

Tiers (per array, ``grad`` and ``weight`` independently):

* ``lossless``: float32 exactly as training saw it.
* ``rounded``: IEEE round-to-nearest-even of the float32 mantissa to ``keepbits`` bits,
  stored as float32 (plain readers need no special codec). Relative error per entry
  <= 2**-(keepbits+1); signs and zeros are exact.
* ``sketch``: per tensor, if the tensor has at most ``k_t`` entries it is copied exactly;
  otherwise a CountSketch to ``k_t`` buckets, bucket ``h(i)`` and sign ``s(i)`` drawn from
  ``numpy.random.default_rng([seed, tensor_index])`` (regenerated, never stored). Inner
  products of sketches are unbiased estimates of the true inner products; the standard error
  of a cosine estimate is about ``sqrt((1 + cos^2) / k)`` when the vectors' mass is spread
  like the buckets, and :func:`sketch_cosine_stderr_tensors` bounds it from the stored
  per-tensor norms when it is not. Sign bits and nonzero bits are exact, so sign shifts are
  exact. The budget ``k`` is split over tensors in proportion to ``sqrt(size)`` (water-filling:
  a tensor whose share reaches half its size is copied exactly and its unused share goes to the
  others), because gradient norm concentrates in small layers: on the ~1M-parameter CNN of
  ``benchmarks/tiers.py`` the 1280-entry output layer holds ~20% of ``||G||^2``, and the first
  plan (shares proportional to size) gave it 337 of 262144 buckets and cosine errors of 0.08.
  Stores keep their plan in the ``sketch_plan`` attribute; readers must use that one.
"""

from __future__ import annotations

import dataclasses
import enum
import fcntl
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

#: "MAJOR.MINOR". A reader of major version M reads every M.x store (a minor version only adds
#: optional keys and arrays); stores from before 1.0 (an integer version) are refused.
FORMAT_VERSION = "1.0"
ATTR_KEY = "gradtrace"

#: Flag bits of the ``flags`` array.
FLAG_NONFINITE_GRAD = 1  #: the gradient holds NaN or Inf entries (recorded as they were)
FLAG_MISSING_GRAD = 2  #: at least one trainable parameter had ``.grad is None`` (zeros stored)
FLAG_FINAL = 4  #: the row is the final iterate: weights only, no gradient
FLAG_NONFINITE_WEIGHT = 8  #: the weights hold NaN or Inf entries
FLAG_LR_GROUPS_DIFFER = 16  #: param groups had different lrs; ``lr`` holds group 0's
FLAG_NO_WEIGHT = 32  #: the weight schedule skipped this step: no weights (NaN), gradient only
FLAG_SKIPPED = 64  #: the writer was behind and on_full="skip" dropped the step: no data at all
FLAG_NAMES = {
    FLAG_NONFINITE_GRAD: "nonfinite_grad",
    FLAG_MISSING_GRAD: "missing_grad",
    FLAG_FINAL: "final_iterate",
    FLAG_NONFINITE_WEIGHT: "nonfinite_weight",
    FLAG_LR_GROUPS_DIFFER: "lr_groups_differ",
    FLAG_NO_WEIGHT: "no_weight",
    FLAG_SKIPPED: "skipped",
}

STEP_DIM = "step"
PARAM_DIM = "param"
TENSOR_DIM = "tensor"
SKETCH_DIM = "sketch"
BYTE_DIM = "param_byte"

DATA_ARRAYS = ("grad", "weight")

# Array names: spelled here only; the writer, the readers and the tools ask for them.
GRAD_SQNORM = "grad_sqnorm"  # ||G_t||^2
WEIGHT_SQNORM = "weight_sqnorm"  # ||w_t||^2
GRAD_DOT_WEIGHT = "grad_dot_weight"  # <G_t, w_t>
NORM_ARRAYS = (GRAD_SQNORM, WEIGHT_SQNORM, GRAD_DOT_WEIGHT)


def per_tensor_array(name: str) -> str:
    """``grad_sqnorm`` -> ``grad_sqnorm_tensor``: the (step, tensor) array of a norm scalar."""
    return f"{name}_tensor"


def sketch_array(a: str) -> str:
    """``grad`` -> ``grad_sketch``: the CountSketch of array ``a`` under the sketch tier."""
    return f"{a}_sketch"


def signbits_array(a: str) -> str:
    """``grad`` -> ``grad_signbits``: np.packbits(x < 0) of array ``a`` under the sketch tier."""
    return f"{a}_signbits"


def nonzero_array(a: str) -> str:
    """``grad`` -> ``grad_nonzero``: np.packbits(x != 0) of array ``a`` under the sketch tier."""
    return f"{a}_nonzero"


SKETCH_SUFFIXES = ("_sketch", "_signbits", "_nonzero")  # the names above less their ``a``


def sketch_tier_arrays(a: str) -> tuple[str, str, str]:
    """The three arrays the sketch tier stores for ``a``: sketch, sign bits, non-zero bits."""
    return sketch_array(a), signbits_array(a), nonzero_array(a)


def stored_arrays(a: str, tier: "Tier") -> tuple[str, ...]:
    """Names of the arrays that hold ``a`` (``grad`` or ``weight``) under ``tier``."""
    return sketch_tier_arrays(a) if tier.is_sketch else (a,)


PER_STEP_ARRAYS: dict[str, tuple[str, Any]] = {
    # name: (dtype, fill value)
    "step": ("int64", -1),
    "epoch": ("int64", -1),
    "loss": ("float64", float("nan")),
    "lr": ("float64", float("nan")),
    "flags": ("int32", 0),
    GRAD_SQNORM: ("float64", float("nan")),
    WEIGHT_SQNORM: ("float64", float("nan")),
    GRAD_DOT_WEIGHT: ("float64", float("nan")),
}
PER_STEP_TENSOR_ARRAYS = tuple(per_tensor_array(n) for n in NORM_ARRAYS)

DEFAULT_PARAM_CHUNK = 2**18  # entries per chunk along "param": 1 MiB of float32 (see the docstring)
SCALAR_CHUNK = 4096  # rows per chunk of the per-step arrays
SCALAR_CHUNK_BYTES = 1 << 16  # target chunk size of the per-step-per-tensor arrays
DEFAULT_KEEPBITS = 7
DEFAULT_SKETCH_DIM = 2**14
MIN_SKETCH_PER_TENSOR = 64

TierName = Literal["lossless", "rounded", "sketch"]


class TierKind(str, enum.Enum):
    """The three fidelity tiers. A ``str`` enum: ``TierKind.SKETCH == "sketch"`` and it
    formats and serializes as its value, so headers read and write the same strings."""

    LOSSLESS = "lossless"
    ROUNDED = "rounded"
    SKETCH = "sketch"

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


TIERS: tuple[str, ...] = tuple(k.value for k in TierKind)


class StoreError(Exception):
    """Base class of every store problem gradtrace reports."""


class NotAStoreError(StoreError):
    """The path does not hold a gradtrace run store."""


class FormatVersionError(StoreError):
    """The store's format version is not one this gradtrace reads: a newer major version, or a
    development version from before 1.0."""


class StoreMismatchError(StoreError):
    """An existing store does not match what the caller wants to append."""


class StoreLockedError(StoreError):
    """Another process is writing the store (it holds the store's lock file)."""


class DamagedStoreError(StoreError):
    """Committed data of a store fails a check: a checksum, a missing chunk, an implausible value.

    Attributes:
        array: name of the damaged array (None when the metadata itself is damaged).
        rows: store rows affected (indices into the committed rows; may be empty).
        files: the files (chunk keys) that failed.
        steps: the training steps of ``rows`` once known (filled in by the reader that knows
            the step column), else None.
    """

    def __init__(self, message: str, *, array: str | None = None, rows=(), files=(), reason: str = "",
                 path: str = "", steps=None):
        super().__init__(message)
        self.array = array
        self.rows = tuple(int(r) for r in rows)
        self.files = tuple(str(f) for f in files)
        self.reason = reason
        self.path = path
        self.steps = None if steps is None else tuple(int(s) for s in steps)

    def __reduce__(self):  # keeps the attributes across processes (dask.distributed workers)
        return (_damaged, (str(self), self.array, self.rows, self.files, self.reason, self.path, self.steps))

    def with_steps(self, path: str, steps: "np.ndarray | None" = None) -> "DamagedStoreError":
        """The same error with the store's path and, given its step column, step numbers."""
        if self.steps is not None or steps is None:
            return damaged(path or self.path, self.array, self.reason, rows=self.rows, files=self.files,
                           steps=self.steps)
        rows = [r for r in self.rows if 0 <= r < len(steps)]
        named = [int(steps[r]) for r in rows]
        return damaged(path or self.path, self.array, self.reason, rows=rows, files=self.files, steps=named)


def _damaged(msg, array, rows, files, reason, path, steps):
    return DamagedStoreError(msg, array=array, rows=rows, files=files, reason=reason, path=path, steps=steps)


def _short_list(vals, most: int = 6) -> str:
    vals = list(vals)
    s = ", ".join(str(v) for v in vals[:most])
    return s + (f", ... ({len(vals)} in all)" if len(vals) > most else "")


def damaged(path, array, reason, *, rows=(), files=(), steps=None) -> DamagedStoreError:
    """A :class:`DamagedStoreError` with the one-line message every reader uses."""
    where = ""
    if steps is not None and len(steps):
        where = f" at step{'s' if len(steps) > 1 else ''} {_short_list(steps)}"
    elif len(rows):
        where = f" at row{'s' if len(rows) > 1 else ''} {_short_list(rows)}"
    what = f"array '{array}'" if array else "the metadata"
    fl = f" (file {_short_list(files, 2)})" if files else ""
    msg = (f"{path}: {what} is damaged{where}{fl}: {reason}. No number is read from damaged data; "
           f"`gradtrace verify {path}` lists every damaged step.")
    return DamagedStoreError(msg, array=array, rows=rows, files=files, reason=reason, path=str(path), steps=steps)


#: Largest step number a store holds (the ``step`` column is int64).
MAX_STEP = 2**63 - 1


def check_step(step, what: str = "step", final: bool = False) -> int:
    """``step`` as an int, or ValueError at once: a recorded step is an int in 0..2**63-2 (not a
    bool, float or tensor: pass ``int(step)``); the final iterate (``final``) may be 2**63-1."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise ValueError(
            f"{what}={step!r} ({type(step).__name__}): a step must be an int (pass int(step), the global "
            "training step counter)"
        )
    s = int(step)
    if s < 0 or s > MAX_STEP - (0 if final else 1):
        raise ValueError(f"{what}={s}: a step must be in 0..2**63-2 (the final iterate takes the step after the last)")
    return s


# --------------------------------------------------------------------------------------
# Parameter table and tiers
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One trainable parameter tensor in the flat vector.

    Attributes:
        name: name from ``model.named_parameters()``.
        shape: the tensor's shape.
        offset: index of its first entry in the flattened vector of length d.
    """

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return int(math.prod(self.shape))

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "offset": self.offset, "size": self.size}

    @classmethod
    def from_json(cls, d: dict) -> "TensorInfo":
        return cls(name=str(d["name"]), shape=tuple(int(s) for s in d["shape"]), offset=int(d["offset"]))


def tensor_table(named_shapes: Sequence[tuple[str, Sequence[int]]]) -> list[TensorInfo]:
    """Build the parameter table from ``(name, shape)`` pairs in flattening order."""
    out, off = [], 0
    for name, shape in named_shapes:
        t = TensorInfo(str(name), tuple(int(s) for s in shape), off)
        out.append(t)
        off += t.size
    return out


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One array of the parameter table: dims ``(tensor,)``, written once when the store is
    created, checksummed (``codecs_for("scalar")``). Readers use the header's table; these
    arrays let plain ``xarray.open_zarr`` label the tensors.

    Attributes:
        name: array name.
        dtype: ``"str"`` (a zarr variable-length string) or ``"int64"``.
        field: the column of one :class:`TensorInfo` (a str or an int).
    """

    name: str
    dtype: str
    field: Any

    def column(self, tensors: Sequence[TensorInfo]) -> list:
        """The column's values, one per tensor, in table order."""
        return [self.field(t) for t in tensors]

    def values(self, tensors: Sequence[TensorInfo], strings: Any = None) -> np.ndarray:
        """The column as an array: int64, or strings (numpy's ``str`` dtype, or ``strings``)."""
        if self.dtype == "int64":
            return np.asarray(self.column(tensors), dtype=np.int64)
        return np.array(self.column(tensors), dtype=strings)

    @property
    def zarr_dtype(self) -> Any:
        """The dtype to create the zarr array with (``str`` or ``"int64"``)."""
        return str if self.dtype == "str" else self.dtype


TENSOR_NAMES = "tensor"
TENSOR_OFFSET = "tensor_offset"
TENSOR_SIZE = "tensor_size"
TENSOR_SHAPE = "tensor_shape"
#: the parameter table's arrays, in the order the writer creates them
TABLE_SPECS: tuple[TableSpec, ...] = (
    TableSpec(TENSOR_NAMES, "str", lambda t: t.name),
    TableSpec(TENSOR_OFFSET, "int64", lambda t: t.offset),
    TableSpec(TENSOR_SIZE, "int64", lambda t: t.size),
    TableSpec(TENSOR_SHAPE, "str", lambda t: json.dumps(list(t.shape))),  # e.g. "[64, 3, 3, 3]"
)


@dataclasses.dataclass(frozen=True)
class Tier:
    """How one array (``grad`` or ``weight``) is stored.

    Attributes:
        name: ``"lossless"``, ``"rounded"`` or ``"sketch"``.
        keepbits: mantissa bits kept by the ``rounded`` tier (1..23).
        sketch_dim: total sketch budget k of the ``sketch`` tier.
        seed: seed of the sketch's hash functions.
        compress: ``lossless`` only: Blosc lz4 (True, the default) or the raw float32 bytes
            (False, ``"lossless:raw"``): no encode/decode CPU at all.
        bitshuffle: ``lossless`` only: bit-shuffle before lz4 (``"lossless:bitshuffle"``).
            Smaller on dense float data (gradients without exact zeros), at 3-4x the encode
            CPU of plain lz4, which already compresses the runs of exact zeros that ReLU
            networks' gradients hold (README, fidelity tiers, has the measured sizes).
        small: ``rounded`` only (``"rounded:7:small"``): the writer lets c-blosc search every
            byte plane for LZ4 matches, the sign-and-exponent plane included: ~20-30% smaller
            chunks of gradients (rounded:7 on a CNN: 1.27 against 1.64 bytes per entry) at
            1.5-2 ns more writer CPU per entry. Without it the writer's own frames store that
            plane as it is (``capture.kernels.shuffle_frame_into``). The same codec either way:
            readers see no difference, and a store resumes with or without the option (its
            header keeps the first run's tier).
    """

    name: str = "lossless"
    keepbits: int = DEFAULT_KEEPBITS
    sketch_dim: int = DEFAULT_SKETCH_DIM
    seed: int = 0
    compress: bool = True
    bitshuffle: bool = False
    small: bool = False

    def __post_init__(self):
        if self.name not in TIERS:
            raise ValueError(f"unknown fidelity tier {self.name!r}: choose one of {', '.join(TIERS)}")
        # the name stays the plain string the header stores; ``kind`` is its parsed form
        object.__setattr__(self, "name", str(TierKind(self.name).value))
        if self.rounds and not 1 <= int(self.keepbits) <= 23:
            raise ValueError(f"keepbits={self.keepbits} is out of range: the rounded tier keeps 1..23 mantissa bits")
        if self.is_sketch and int(self.sketch_dim) < 1:
            raise ValueError(f"sketch_dim={self.sketch_dim} must be a positive number of buckets")
        if not self.compress and not self.is_lossless:
            raise ValueError(f"compress=False is an option of the lossless tier only, not of {self.name!r}")
        if self.bitshuffle and (not self.is_lossless or not self.compress):
            raise ValueError("bitshuffle=True is an option of the compressed lossless tier only")
        if self.small and not self.rounds:
            raise ValueError(f"small=True is an option of the rounded tier only, not of {self.name!r}")

    @property
    def kind(self) -> TierKind:
        """The tier as a :class:`TierKind` (compare with it, not with the ``name`` string)."""
        return TierKind(self.name)

    @property
    def is_lossless(self) -> bool:
        """True for the lossless tier (compressed or raw): the stored float32 values are exact."""
        return self.kind is TierKind.LOSSLESS

    @property
    def rounds(self) -> bool:
        """True for the rounded tier: the stored values are bit-rounded to ``keepbits`` bits."""
        return self.kind is TierKind.ROUNDED

    @property
    def is_sketch(self) -> bool:
        """True for the sketch tier: the array is stored as ``{a}_sketch`` plus two bit planes."""
        return self.kind is TierKind.SKETCH

    @property
    def is_dense(self) -> bool:
        """True where the array is stored as its full ``(step, param)`` float32 vector
        (lossless or rounded), False for the sketch tier."""
        return not self.is_sketch

    @classmethod
    def parse(cls, spec: "str | Tier | dict") -> "Tier":
        """``"lossless"``, ``"lossless:raw"``, ``"rounded"``, ``"rounded:10"``,
        ``"rounded:7:small"``, ``"sketch"``, ``"sketch:4096"``, ``"lossless:bitshuffle"``, a
        dict or a Tier."""
        if isinstance(spec, Tier):
            return spec
        if isinstance(spec, dict):
            return cls(**spec)
        name, _, arg = str(spec).partition(":")
        name = name.strip().lower()
        if name in ("bf16", "bfloat16"):
            return cls("rounded", keepbits=7)
        if name not in TIERS:
            raise ValueError(
                f"unknown fidelity tier {spec!r}: use 'lossless[:raw]', 'rounded[:KEEPBITS]' or 'sketch[:K]'"
            )
        kind = TierKind(name)
        if kind is TierKind.ROUNDED:
            parts = [a.strip().lower() for a in arg.split(":")] if arg else []
            small = "small" in parts
            rest = [a for a in parts if a != "small"]
            if len(rest) > 1 or parts.count("small") > 1:
                raise ValueError(f"tier {spec!r}: the rounded tier takes ':KEEPBITS', ':small' or both")
            try:
                keep = int(rest[0]) if rest else DEFAULT_KEEPBITS
            except ValueError as err:
                raise ValueError(f"tier {spec!r}: use 'rounded:KEEPBITS' (an integer) and/or ':small'") from err
            return cls(name, keepbits=keep, small=small)
        if not arg:
            return cls(name)
        if kind is TierKind.LOSSLESS:
            if arg.strip().lower() in ("raw", "none", "uncompressed"):
                return cls(name, compress=False)
            if arg.strip().lower() in ("lz4", "compressed"):
                return cls(name)
            if arg.strip().lower() in ("bitshuffle", "shuffle"):
                return cls(name, bitshuffle=True)
            raise ValueError(
                f"tier {spec!r}: the lossless tier takes ':raw' (uncompressed), ':bitshuffle' or nothing"
            )
        try:
            val = int(arg)
        except ValueError as err:
            raise ValueError(f"tier {spec!r}: the part after ':' must be an integer") from err
        return cls(name, sketch_dim=val)

    def to_json(self) -> dict:
        d = {"tier": self.name}
        if not self.compress:
            d["compress"] = False
        if self.bitshuffle:
            d["bitshuffle"] = True
        if self.rounds:
            d["keepbits"] = int(self.keepbits)
            d["max_rel_error"] = 2.0 ** -(int(self.keepbits) + 1)
            if self.small:
                d["small"] = True
        if self.is_sketch:
            d["sketch_dim"] = int(self.sketch_dim)
            d["seed"] = int(self.seed)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Tier":
        return cls(
            d["tier"],
            keepbits=int(d.get("keepbits", DEFAULT_KEEPBITS)),
            sketch_dim=int(d.get("sketch_dim", DEFAULT_SKETCH_DIM)),
            seed=int(d.get("seed", 0)),
            compress=bool(d.get("compress", True)),
            bitshuffle=bool(d.get("bitshuffle", False)),
            small=bool(d.get("small", False)),
        )

    @property
    def max_rel_error(self) -> float:
        """Per-entry relative error bound (0 for lossless, NaN for sketch: see sketch_cosine_stderr)."""
        if self.is_lossless:
            return 0.0
        if self.rounds:
            return 2.0 ** -(int(self.keepbits) + 1)
        return float("nan")


# --------------------------------------------------------------------------------------
# Tier encodings (numpy, used by the writer and by tests)
# --------------------------------------------------------------------------------------


def bitround(x: np.ndarray, keepbits: int) -> np.ndarray:
    """Round float32 mantissas to ``keepbits`` bits, to nearest, ties to even.

    Signs and zeros are kept exactly; NaN stays NaN and +-Inf stays +-Inf. The relative error
    of every finite normal entry is at most ``2**-(keepbits+1)``.

    >>> bitround(np.array([1.0 + 2**-10], dtype=np.float32), 7)[0]
    np.float32(1.0)
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if keepbits >= 23:
        return x.copy()
    drop = 23 - int(keepbits)
    bits = x.view(np.uint32)
    half_minus_one = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    lsb = (bits >> np.uint32(drop)) & np.uint32(1)
    out = ((bits + half_minus_one + lsb) & mask).view(np.float32)
    bad = ~np.isfinite(x)
    if bad.any():
        out[bad] = x[bad]
    return out


@dataclasses.dataclass(frozen=True)
class SketchPlan:
    """Where each tensor lives in sketch space.

    Attributes:
        offsets: start of each tensor's buckets in the sketch vector.
        sizes: number of buckets k_t of each tensor.
        exact: True where the tensor is copied exactly (its size <= its budget).
    """

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    exact: tuple[bool, ...]
    seed: int

    @property
    def dim(self) -> int:
        return int(sum(self.sizes))

    def to_json(self) -> dict:
        return {"offsets": list(self.offsets), "sizes": list(self.sizes), "exact": list(self.exact), "seed": self.seed}

    @classmethod
    def from_json(cls, d: dict) -> "SketchPlan":
        return cls(tuple(d["offsets"]), tuple(d["sizes"]), tuple(bool(e) for e in d["exact"]), int(d["seed"]))


def sketch_plan(tensors: Sequence[TensorInfo], sketch_dim: int, seed: int) -> SketchPlan:
    """Split the budget ``sketch_dim`` over tensors in proportion to ``sqrt(size)``.

    Water-filling: each round gives every remaining tensor ``budget * sqrt(size) / sum sqrt``
    buckets (at least :data:`MIN_SKETCH_PER_TENSOR`); a tensor whose share reaches half its
    size is stored exactly (sketching it would save less than it costs in error), its size
    leaves the budget, and the rest is split again. The total is about
    ``sketch_dim`` (more when many tiny tensors are copied exactly).
    """
    sizes_in = [t.size for t in tensors]
    exact = [False] * len(sizes_in)
    budget = float(sketch_dim)
    open_ = [i for i, n in enumerate(sizes_in) if n > 0]
    for i, n in enumerate(sizes_in):
        if n == 0:
            exact[i] = True
    while True:
        weight = sum(math.sqrt(sizes_in[i]) for i in open_)
        newly = [
            i for i in open_
            if sizes_in[i] <= max(MIN_SKETCH_PER_TENSOR, 2.0 * budget * math.sqrt(sizes_in[i]) / max(weight, 1e-300))
        ]
        if not newly:
            break
        for i in newly:
            exact[i] = True
            budget -= sizes_in[i]
        open_ = [i for i in open_ if not exact[i]]
        budget = max(budget, 0.0)
    weight = sum(math.sqrt(sizes_in[i]) for i in open_)
    offsets, sizes, off = [], [], 0
    for i, n in enumerate(sizes_in):
        if exact[i]:
            k = n
        else:
            k = max(MIN_SKETCH_PER_TENSOR, int(round(budget * math.sqrt(n) / weight)))
            k = min(k, n)
        offsets.append(off)
        sizes.append(k)
        off += k
    return SketchPlan(tuple(offsets), tuple(sizes), tuple(exact), int(seed))


def sketch_hashes(plan: SketchPlan, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Bucket and sign of every entry of tensor ``index`` (regenerated from the seed).

    Returns:
        ``(bucket, sign)``: int64 array in ``[0, k_t)`` and float64 array of +-1, both of
        length ``size``.
    """
    rng = np.random.default_rng([int(plan.seed), int(index)])
    bucket = rng.integers(0, plan.sizes[index], size=size, dtype=np.int64)
    sign = rng.integers(0, 2, size=size, dtype=np.int8).astype(np.float64) * 2.0 - 1.0
    return bucket, sign


class Sketcher:
    """Applies a :class:`SketchPlan` to flat vectors (caches the hash functions)."""

    def __init__(self, tensors: Sequence[TensorInfo], plan: SketchPlan):
        self.tensors = list(tensors)
        self.plan = plan
        self._hashes = [
            None if plan.exact[i] else sketch_hashes(plan, i, t.size) for i, t in enumerate(self.tensors)
        ]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Sketch of the flat vector ``x`` (length d) as float64, length ``plan.dim``."""
        out = np.empty(self.plan.dim, dtype=np.float64)
        for i, t in enumerate(self.tensors):
            seg = np.asarray(x[t.offset : t.offset + t.size], dtype=np.float64)
            o, k = self.plan.offsets[i], self.plan.sizes[i]
            if self.plan.exact[i]:
                out[o : o + k] = seg
            else:
                bucket, sign = self._hashes[i]
                out[o : o + k] = np.bincount(bucket, weights=seg * sign, minlength=k)
        return out


def sketch_cosine_stderr(k: int, cos: float | np.ndarray = 0.0):
    """Standard error of a CountSketch cosine estimate with k buckets: sqrt((1 + cos^2) / k).

    Valid when the vectors' squared mass is spread over tensors like the buckets are; use
    :func:`sketch_cosine_stderr_tensors` for a bound from the per-tensor norms.
    """
    return np.sqrt((1.0 + np.square(cos)) / max(int(k), 1))


def sketch_cosine_stderr_tensors(plan: SketchPlan, a_sq, b_sq, a_norm_sq=None, b_norm_sq=None):
    """Bound on the standard error of a sketched cosine from per-tensor squared norms.

    For sketched tensor t with k_t buckets, Var(<Sa_t, Sb_t>) <= 2 ||a_t||^2 ||b_t||^2 / k_t;
    exact tensors add nothing. Divided by ``||a|| ||b||`` this bounds the error of
    ``<Sa, Sb> / (||a|| ||b||)`` with exact norms (the store holds them: ``*_sqnorm``).

    Args:
        plan: the store's sketch plan.
        a_sq, b_sq: per-tensor squared norms, shape (..., n_tensors) (``grad_sqnorm_tensor``).
        a_norm_sq, b_norm_sq: total squared norms (default: the sums of a_sq, b_sq).

    Returns:
        Array of shape (...): the bound on the standard error of the cosine estimate.
    """
    a_sq = np.asarray(a_sq, dtype=np.float64)
    b_sq = np.asarray(b_sq, dtype=np.float64)
    w = np.array([0.0 if e else 2.0 / max(k, 1) for e, k in zip(plan.exact, plan.sizes)])
    var = (a_sq * b_sq * w).sum(-1)
    an = a_sq.sum(-1) if a_norm_sq is None else np.asarray(a_norm_sq, dtype=np.float64)
    bn = b_sq.sum(-1) if b_norm_sq is None else np.asarray(b_norm_sq, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.sqrt(var / (an * bn))


def pack_signs(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact sign information of a flat vector as two packed bit planes.

    Returns:
        ``(signbits, nonzero)``: ``np.packbits(x < 0)`` and ``np.packbits(x != 0)``, uint8
        arrays of length ``ceil(d / 8)`` (big-endian bit order, numpy's default).
    """
    x = np.asarray(x)
    return np.packbits(np.signbit(x) & (x != 0)), np.packbits(x != 0)


def widen_bf16(upper: np.ndarray) -> np.ndarray:
    """float32 values from their upper 16 bits (bfloat16 bit patterns): ``upper << 16``.

    The host side of a rounded tier with ``keepbits <= 7`` shipped in 2 bytes per entry
    (``capture.encode.round_upper16``): such rounding clears the low 16 bits, so the widened
    row equals ``bitround(x, keepbits)`` bit for bit, but for NaN payloads' low 16 bits.

    Args:
        upper: uint16 or int16 array (any shape).

    Returns:
        float32 array of the same shape.
    """
    u = np.ascontiguousarray(upper)
    if u.dtype.itemsize != 2 or u.dtype.kind not in "iu":
        raise ValueError(f"widen_bf16 takes 16-bit integer bit patterns, got dtype {u.dtype}")
    return (u.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


# --------------------------------------------------------------------------------------
# Layout: array names, shapes, chunks, codecs
# --------------------------------------------------------------------------------------


def scalar_chunk_rows(width: int | None, itemsize: int = 8) -> int:
    """Rows per chunk of a per-step array with ``width`` columns (None for 1-D).

    1-D arrays use :data:`SCALAR_CHUNK` rows; 2-D ones the largest power of two that keeps a
    chunk within :data:`SCALAR_CHUNK_BYTES`, between 16 and SCALAR_CHUNK rows. The writer
    rewrites the current chunk whole at every step, so it must stay small.
    """
    if width is None:
        return SCALAR_CHUNK
    rows = SCALAR_CHUNK_BYTES // max(1, int(width) * int(itemsize))
    rows = 1 << max(0, int(rows).bit_length() - 1) if rows >= 1 else 1
    return int(min(SCALAR_CHUNK, max(16, rows)))


def _crc():
    # zarr v3's standard crc32c codec (4 bytes after each chunk; plain zarr and zarrs check it
    # on every read). Needs the google-crc32c package (a zarr dependency).
    from zarr.codecs import Crc32cCodec

    return Crc32cCodec()


def _lossless_codecs():
    from zarr.codecs import BloscCodec

    # lz4-1 without shuffle: blosc stores incompressible blocks as they are and lz4 finds the
    # runs of exact zeros of ReLU gradients, both cheaply; bit-shuffle first costs more than
    # the compression itself (benchmarks/tiers.py, benchmarks/capture_overhead.py measure it)
    return [BloscCodec(cname="lz4", clevel=1, shuffle="noshuffle", typesize=4), _crc()]


def _lossless_bitshuffle_codecs():
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=1, shuffle="bitshuffle", typesize=4), _crc()]


def _rounded_codecs():
    from zarr.codecs import BloscCodec

    # byte-shuffle puts the zeroed low mantissa bytes of a rounded float32 in planes of their
    # own; the capture writes these Blosc frames with its own kernel
    # (capture.kernels.shuffle_frame_into), c-blosc encodes them elsewhere
    return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=4), _crc()]


def _bits_codecs():
    from zarr.codecs import BloscCodec

    return [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1), _crc()]


def _scalar_codecs():
    # Uncompressed on purpose: the writer updates a step's row in place (a pwrite of the row's
    # bytes into its chunk file, then of the chunk's crc32c), which needs a fixed byte layout.
    # 8 bytes per step and array, plus 4 bytes of checksum per chunk.
    return [_crc()]


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """Shape-independent description of one array of the store."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    fill_value: Any
    width: int | None  # size of the second dim (None for 1-D)
    chunk_width: int | None
    codecs: str  # a key of codecs_for: "lossless", "lossless_bitshuffle", "raw", "rounded", "bits", "scalar"
    attrs: dict

    @property
    def row_chunked(self) -> bool:
        """True for (step, x) arrays stored one row per chunk (grad, weight, sketch arrays)."""
        return self.codecs != "scalar"

    @property
    def chunk_key_encoding(self) -> dict:
        """Row-chunked arrays name their chunks ``c.<row>.<col>`` in one flat directory: with
        zarr's default ``c/<row>/<col>`` every row made a directory per array, and creating a
        directory cost as much as writing a 1 MiB chunk here. Per-step arrays keep the default."""
        sep = "." if self.row_chunked else "/"
        return {"name": "default", "separator": sep}

    @property
    def chunk_rows(self) -> int:
        """Rows per chunk along ``step``."""
        if self.row_chunked:
            return 1
        return scalar_chunk_rows(self.width, np.dtype(self.dtype).itemsize)

    def shape(self, rows: int) -> tuple[int, ...]:
        return (int(rows),) if self.width is None else (int(rows), int(self.width))

    @property
    def chunks(self) -> tuple[int, ...]:
        return (self.chunk_rows,) if self.width is None else (self.chunk_rows, int(self.chunk_width))

    @property
    def shard_shape(self) -> tuple[int, int] | None:
        """Shape of a shard file of a row-chunked array (:func:`shard_geometry`); None otherwise."""
        if not self.row_chunked:
            return None
        rows, k = shard_geometry(int(self.width), int(self.chunk_width), np.dtype(self.dtype).itemsize)
        return (rows, k * int(self.chunk_width))

    def zarr_layout(self, shard_files: bool = True) -> dict:
        """Keyword arguments of ``zarr.Group.create_array`` for this array's chunks and codecs.

        ``shard_files`` (row-chunked arrays on a local path): ``(1, w)`` chunks gathered into shard
        files of :attr:`shard_shape` (zarr's ``sharding_indexed`` codec, the chunks' own codecs
        inside, the index at the start of the file without a checksum: see the module
        docstring). Otherwise one object per chunk (object storage, where an object cannot be
        appended to)."""
        if shard_files and self.row_chunked:
            from zarr.codecs import BytesCodec, ShardingCodec

            serializer = ShardingCodec(
                chunk_shape=self.chunks,
                codecs=[BytesCodec(), *codecs_for(self.codecs)],
                index_codecs=[BytesCodec()],
                index_location="start",
            )
            return {"chunks": self.shard_shape, "serializer": serializer, "compressors": None}
        return {"chunks": self.chunks, "compressors": codecs_for(self.codecs)}


#: Target of raw (uncompressed) bytes per shard file of a row-chunked array.
SHARD_BYTES = 1 << 26
#: Most rows per shard file (small rows: sketches, bit planes, small models).
SHARD_MAX_ROWS = 256


def shard_geometry(width: int, chunk_width: int, itemsize: int, shard_bytes: int | None = None) -> tuple[int, int]:
    """``(rows, chunks)`` of a shard file: ``rows`` steps by ``chunks`` chunks of ``chunk_width``.

    A shard holds whole rows while a row's raw bytes fit in ``shard_bytes``: as many rows as
    fit, a power of two between 1 and :data:`SHARD_MAX_ROWS`. Longer rows are split into
    shards of one row and ``shard_bytes / (chunk_width * itemsize)`` chunks. So a writer
    creates a file every few steps (small models) or per ``shard_bytes`` of data (large ones),
    never one per chunk.
    """
    shard_bytes = SHARD_BYTES if shard_bytes is None else int(shard_bytes)
    cw = max(1, int(chunk_width))
    n_chunks = -(-max(1, int(width)) // cw)
    row_raw = n_chunks * cw * int(itemsize)
    if row_raw <= shard_bytes:
        rows = shard_bytes // row_raw
        rows = 1 << (int(rows).bit_length() - 1)
        return int(min(SHARD_MAX_ROWS, rows)), n_chunks
    return 1, int(min(n_chunks, max(1, shard_bytes // (cw * int(itemsize)))))


def param_chunk_width(d: int, param_chunk: int = DEFAULT_PARAM_CHUNK) -> int:
    """Chunk width along ``param`` for d entries and at most ``param_chunk`` per chunk.

    One chunk when d fits in ``param_chunk``; otherwise the d entries are split into
    ``ceil(d / param_chunk)`` chunks of equal width, rounded up to a multiple of 8 entries (so
    a sign-bit byte never straddles two chunks): no chunk is mostly padding (d = 1.07M with
    2**18-wide chunks padded the last chunk to 4x its data).
    Stores made before this rule have ``min(d, param_chunk)``; readers use each array's own
    chunk grid.
    """
    d, pc = max(int(d), 1), max(int(param_chunk), 1)
    if d <= pc or pc < 8:
        return min(d, pc)
    n_chunks = -(-d // pc)
    width = -(-(-(-d // n_chunks)) // 8) * 8
    return int(min(width, pc - pc % 8))


#: Dimension of ``grad_lag_dot``: k = 1..lag_band gradient rows back.
ROW_LAG_DIM = "row_lag"
LAG_DOT_ARRAY = "grad_lag_dot"


def array_specs(
    tensors: Sequence[TensorInfo],
    tiers: dict[str, Tier],
    param_chunk: int = DEFAULT_PARAM_CHUNK,
    lag_band: int = 0,
    layout: "ShardedLayout | None" = None,
) -> list[ArraySpec]:
    """Every step-indexed array of a store with this parameter table and these tiers
    (and ``grad_lag_dot`` when the recorder kept a lag band, ``Header.extra["lag_band"]``).
    With a sharded ``layout`` the data arrays hold ``layout.columns`` columns in chunks of
    ``layout.chunk`` (bit planes: ``layout.chunk / 8`` bytes), so no chunk spans two ranks."""
    d = sum(t.size for t in tensors) if layout is None else layout.columns
    n_t = len(tensors)
    specs = []
    for name, (dtype, fill) in PER_STEP_ARRAYS.items():
        specs.append(ArraySpec(name, (STEP_DIM,), dtype, fill, None, None, "scalar", {}))
    for name in PER_STEP_TENSOR_ARRAYS:
        specs.append(ArraySpec(name, (STEP_DIM, TENSOR_DIM), "float64", float("nan"), n_t, n_t, "scalar", {}))
    if int(lag_band) > 0:
        # <G_r, G_(r-k)> of gradient row r and the k-th gradient row before it, k = 1..L, in
        # float64 from the float32 gradients before any tier's encoding (exact for every tier)
        specs.append(ArraySpec(LAG_DOT_ARRAY, (STEP_DIM, ROW_LAG_DIM), "float64", float("nan"), int(lag_band),
                               int(lag_band), "scalar", {"lag_band": int(lag_band)}))
    pc = param_chunk_width(d, param_chunk) if layout is None else int(layout.chunk)
    for a in DATA_ARRAYS:
        tier = tiers[a]
        tattrs = {"gradtrace_tier": tier.to_json()}
        if tier.is_dense:
            kind = "raw" if not tier.compress else ("lossless_bitshuffle" if tier.bitshuffle else tier.name)
            specs.append(ArraySpec(a, (STEP_DIM, PARAM_DIM), "float32", float("nan"), d, pc, kind, tattrs))
        else:
            plan = sketch_plan(tensors, tier.sketch_dim, tier.seed)
            sk = plan.dim
            # equal chunks (a sketch just past a chunk's width made a second chunk mostly fill)
            skc = param_chunk_width(sk, param_chunk)
            tattrs = {**tattrs, "sketch_plan": plan.to_json()}
            specs.append(
                ArraySpec(sketch_array(a), (STEP_DIM, SKETCH_DIM), "float32", float("nan"), sk, skc, "lossless", tattrs)
            )
            nb = (d + 7) // 8
            # a bit-plane chunk holds pc bytes (8 x pc parameters): one file per row and plane up
            # to 2M parameters, where pc / 8 bytes made five 26 KB files per row at d = 1M
            bc = int(min(nb, max(pc, 8))) if layout is None else int(layout.chunk) // 8
            specs.append(ArraySpec(signbits_array(a), (STEP_DIM, BYTE_DIM), "uint8", 0, nb, bc, "bits", tattrs))
            specs.append(ArraySpec(nonzero_array(a), (STEP_DIM, BYTE_DIM), "uint8", 0, nb, bc, "bits", tattrs))
    return specs



# --------------------------------------------------------------------------------------
# Sharded layout (FSDP2 / DTensor runs; see the module docstring)
# --------------------------------------------------------------------------------------

SHARD_DIM = "shard"
SHARD_ARRAYS = ("shard_tensor", "shard_rank", "shard_start", "shard_stop", "shard_column", "shard_size")


@dataclasses.dataclass(frozen=True)
class ShardInfo:
    """Rows ``start..stop`` of dim 0 of tensor ``tensor`` (table index), held by ``rank``,
    stored in columns ``[column, column + size)``."""

    tensor: int
    rank: int
    start: int
    stop: int
    column: int
    size: int


@dataclasses.dataclass(frozen=True)
class ShardedLayout:
    """Rank-major column layout of a sharded store.

    Attributes:
        world_size: W, the number of ranks that wrote the store.
        rank_width: R, columns per rank (a multiple of ``chunk``); the stored rows have
            ``W R`` columns.
        chunk: chunk width along ``param`` (a multiple of 8; bit planes: ``chunk / 8`` bytes).
        shards: every non-empty shard, ordered by (tensor, start).
    """

    world_size: int
    rank_width: int
    chunk: int
    shards: tuple[ShardInfo, ...]

    @property
    def columns(self) -> int:
        return int(self.world_size * self.rank_width)

    def rank_columns(self, rank: int) -> tuple[int, int]:
        return int(rank * self.rank_width), int((rank + 1) * self.rank_width)

    def tensor_columns(self, index: int) -> list[tuple[int, int]]:
        """Column ranges ``[lo, hi)`` of tensor ``index``, in its natural (row) order."""
        return [(s.column, s.column + s.size) for s in self.shards if s.tensor == index and s.size]

    def natural_columns(self, n_tensors: int) -> np.ndarray:
        """int64 column of every natural-order entry (length d)."""
        parts = [np.arange(lo, hi, dtype=np.int64) for i in range(n_tensors) for lo, hi in self.tensor_columns(i)]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def natural(self, row: np.ndarray, n_tensors: int) -> np.ndarray:
        """The natural-order vector (length d) of a stored row (length ``columns``)."""
        row = np.asarray(row)
        if row.shape[-1] != self.columns:
            raise ValueError(f"a row of this sharded store has {self.columns} columns, got {row.shape[-1]}")
        return row[..., self.natural_columns(n_tensors)]

    def to_json(self) -> dict:
        return {"world_size": self.world_size, "rank_width": self.rank_width, "chunk": self.chunk,
                "shards": [dataclasses.astuple(s) for s in self.shards],
                "shard_fields": [f.name for f in dataclasses.fields(ShardInfo)]}

    @classmethod
    def from_json(cls, d: dict) -> "ShardedLayout":
        return cls(int(d["world_size"]), int(d["rank_width"]), int(d["chunk"]),
                   tuple(ShardInfo(*(int(v) for v in s)) for s in d["shards"]))


def sharded_layout(tensors: Sequence[TensorInfo], held: Sequence[Sequence[tuple[int, int, int]]],
                   param_chunk: int = DEFAULT_PARAM_CHUNK) -> ShardedLayout:
    """The layout of W ranks, rank r holding ``held[r]`` = ``[(tensor, start, stop), ...]``
    (rows of dim 0, in table order).

    Every rank gets the same width R: the largest rank's entry count rounded up to whole chunks
    of width ``param_chunk_width(that count, param_chunk)`` rounded up to a multiple of 8.
    """
    world = len(held)
    inner = [math.prod(t.shape[1:]) if len(t.shape) > 1 else 1 for t in tensors]
    counts = []
    for r, part in enumerate(held):
        prev = -1
        for i, a, b in part:
            if not (0 <= a <= b <= (tensors[i].shape[0] if tensors[i].shape else 1)) or i <= prev:
                raise ValueError(f"rank {r}: shard ({i}, {a}, {b}) is not rows of dim 0 in table order")
            prev = i
        counts.append(sum((b - a) * inner[i] for i, a, b in part))
    big = max(max(counts), 1)
    cw = param_chunk_width(big, param_chunk)
    cw = max(8, -(-cw // 8) * 8)
    R = -(-big // cw) * cw
    shards = []
    for r, part in enumerate(held):
        col = r * R
        for i, a, b in part:
            n = (b - a) * inner[i]
            if n:
                shards.append(ShardInfo(int(i), r, int(a), int(b), col, int(n)))
            col += n
    shards.sort(key=lambda s: (s.tensor, s.start))
    # every tensor must be covered exactly once, rows 0..dim0
    for i, t in enumerate(tensors):
        rows = 0
        for s in shards:
            if s.tensor == i:
                if s.start != rows:
                    raise ValueError(f"tensor {t.name!r}: shards do not tile dim 0 (a shard starts at row "
                                     f"{s.start}, the ones before end at {rows})")
                rows = s.stop
        if t.size and rows != (t.shape[0] if t.shape else 1):
            raise ValueError(f"tensor {t.name!r}: its shards cover {rows} rows of {t.shape[0]}")
    return ShardedLayout(world, int(R), int(cw), tuple(shards))


def layout_of(header: "Header") -> ShardedLayout | None:
    """The sharded layout of a store (None for an unsharded one)."""
    d = header.extra.get("sharded")
    return None if d is None else ShardedLayout.from_json(d)


def store_array_specs(header: "Header") -> list[ArraySpec]:
    """:func:`array_specs` of an existing store (its lag band and sharded layout)."""
    return array_specs(header.tensors, header.tiers, header.param_chunk, header.extra.get("lag_band", 0),
                       layout=layout_of(header))


def codecs_for(kind: str):
    return {
        "lossless": _lossless_codecs,
        "lossless_bitshuffle": _lossless_bitshuffle_codecs,
        "raw": _scalar_codecs,  # no compressor: the float32 bytes as they are
        "rounded": _rounded_codecs,
        "bits": _bits_codecs,
        "scalar": _scalar_codecs,
    }[kind]()


# --------------------------------------------------------------------------------------
# Query index (derived arrays in the sub-group "index"; see the module docstring)
# --------------------------------------------------------------------------------------

INDEX_GROUP = "index"
INDEX_ATTR = "gradtrace_index"
INDEX_VERSION = 1
INDEX_LAYOUTS = ("full", "band")
INDEX_ROW_DIM = "index_row"
INDEX_COL_DIM = "index_col"
INDEX_LAG_DIM = "index_lag"
INDEX_CHECK_DIM = "index_check"
INDEX_ANCHOR_DIM = "index_anchor"
#: columns of ``index/check``: the per-row values a row is recognised by
INDEX_CHECK_FIELDS = ("step", "flags", *NORM_ARRAYS)
INDEX_CHUNK = 512  # full layout: 512 x 512 float64 = 2 MiB per chunk
INDEX_BAND_CHUNK_ROWS = 4096
INDEX_PRODUCTS = ("gg", "gv", "vv")
INDEX_BAND_PRODUCTS = ("gg", "gv", "vg", "vv")
INDEX_SIGNS = ("sign_disagree", "sign_both")


@dataclasses.dataclass(frozen=True)
class IndexArraySpec:
    """One array of the query index: name, dims, dtype, fill value, chunks and meaning."""

    name: str
    dims: tuple[str, ...]
    dtype: str
    fill_value: Any
    chunks: tuple[int, ...]
    meaning: str

    def shape(self, rows: int, band: int | None, anchor_len: int = 0) -> tuple[int, ...]:
        if self.dims == (INDEX_ANCHOR_DIM,):
            return (int(anchor_len),)
        if len(self.dims) == 1:
            return (int(rows),)
        if self.dims[1] == INDEX_CHECK_DIM:
            return (int(rows), len(INDEX_CHECK_FIELDS))
        return (int(rows), int(rows) if band is None else int(band) + 1)


def index_specs(band: int | None = None) -> list[IndexArraySpec]:
    """Arrays of a query index: the full layout (``band=None``) or lags 0..band."""
    col = INDEX_COL_DIM if band is None else INDEX_LAG_DIM
    chunks = (INDEX_CHUNK, INDEX_CHUNK) if band is None else (INDEX_BAND_CHUNK_ROWS, int(band) + 1)
    pair = "rows i and j" if band is None else "rows i and i - l"
    out = [
        IndexArraySpec("step", (INDEX_ROW_DIM,), "int64", -1, (INDEX_BAND_CHUNK_ROWS,), "step of the indexed row"),
        IndexArraySpec("check", (INDEX_ROW_DIM, INDEX_CHECK_DIM), "float64", float("nan"),
                       (INDEX_BAND_CHUNK_ROWS, len(INDEX_CHECK_FIELDS)),
                       "the row's " + ", ".join(INDEX_CHECK_FIELDS) + " when it was indexed"),
        IndexArraySpec("anchor", (INDEX_ANCHOR_DIM,), "float64", float("nan"), (DEFAULT_PARAM_CHUNK,),
                       "the anchor a: the weights V = W - a are taken relative to (float64)"),
    ]
    names = INDEX_PRODUCTS if band is None else INDEX_BAND_PRODUCTS
    for name in names:
        x, y = name[0].upper(), name[1].upper()
        out.append(IndexArraySpec(name, (INDEX_ROW_DIM, col), "float64", float("nan"), chunks,
                                  f"<{x}, {y}> of {pair} (float64; V = W - anchor)"))
    out.append(IndexArraySpec("sign_disagree", (INDEX_ROW_DIM, col), "int64", -1, chunks,
                              f"entries where the gradients of {pair} have opposite non-zero signs (-1: no gradient, "
                              "or a non-finite one)"))
    out.append(IndexArraySpec("sign_both", (INDEX_ROW_DIM, col), "int64", -1, chunks,
                              f"entries where the gradients of {pair} are both non-zero (-1: no gradient, or a non-finite one)"))
    return out


def index_codecs():
    """Blosc lz4 with byte shuffle, then a CRC32C checksum of every chunk."""
    from zarr.codecs import BloscCodec, Crc32cCodec

    return [BloscCodec(cname="lz4", clevel=1, shuffle="shuffle", typesize=8), Crc32cCodec()]


def index_bytes(n_rows: int, band: int | None = None, anchor_len: int = 0) -> int:
    """Uncompressed bytes of a query index over ``n_rows`` store rows (full or banded), plus
    ``8 * anchor_len`` for the anchor vector (d, or the sketch dimension)."""
    n = int(n_rows)
    cols = n if band is None else int(band) + 1
    mats = len(INDEX_PRODUCTS if band is None else INDEX_BAND_PRODUCTS) + len(INDEX_SIGNS)
    return 8 * n * (1 + len(INDEX_CHECK_FIELDS)) + 8 * mats * n * cols + 8 * int(anchor_len)


# --------------------------------------------------------------------------------------
# Header (root attributes)
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Header:
    """The root ``gradtrace`` attribute of a store.

    Attributes:
        tensors: the parameter table.
        tiers: tier of ``grad`` and of ``weight``.
        n_steps: committed rows (the commit marker; written after each row's data).
        capacity: allocated rows (>= n_steps; rows past n_steps are not data).
        closed: True after a clean close (arrays trimmed to n_steps, metadata consolidated).
        has_final: True when the last committed row is the final iterate.
        param_chunk: chunk width along ``param``.
        schedule: description of the recording schedule.
        settings: the run's settings (optimizer, hyperparameters, seed, versions, model...).
        parent: for a branched ("zoom") run, the store and step it was branched from.
        source_dtype: dtype(s) of the recorded parameters before the float32 cast, e.g.
            ``"float32"`` or ``"bfloat16,float32"`` (None when unknown).
    """

    tensors: list[TensorInfo]
    tiers: dict[str, Tier]
    n_steps: int = 0
    capacity: int = 0
    closed: bool = False
    has_final: bool = False
    param_chunk: int = DEFAULT_PARAM_CHUNK
    schedule: Any = None
    settings: dict = dataclasses.field(default_factory=dict)
    parent: dict | None = None
    format_version: str = FORMAT_VERSION
    source_dtype: str | None = None
    extra: dict = dataclasses.field(default_factory=dict)

    @property
    def n_params(self) -> int:
        return int(sum(t.size for t in self.tensors))

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "n_steps": int(self.n_steps),
            "capacity": int(self.capacity),
            "closed": bool(self.closed),
            "has_final": bool(self.has_final),
            "n_params": self.n_params,
            "param_chunk": int(self.param_chunk),
            "tensors": [t.to_json() for t in self.tensors],
            "tiers": {k: v.to_json() for k, v in self.tiers.items()},
            "schedule": self.schedule,
            "settings": _jsonable(self.settings),
            "parent": self.parent,
            "flags": {str(k): v for k, v in FLAG_NAMES.items()},
            "source_dtype": self.source_dtype,
            **self.extra,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Header":
        known = {
            "format_version", "n_steps", "capacity", "closed", "has_final", "n_params", "param_chunk",
            "tensors", "tiers", "schedule", "settings", "parent", "flags", "source_dtype",
        }
        return cls(
            tensors=[TensorInfo.from_json(t) for t in d["tensors"]],
            tiers={k: Tier.from_json(v) for k, v in d["tiers"].items()},
            n_steps=int(d["n_steps"]),
            capacity=int(d.get("capacity", d["n_steps"])),
            closed=bool(d.get("closed", False)),
            has_final=bool(d.get("has_final", False)),
            param_chunk=int(d.get("param_chunk", DEFAULT_PARAM_CHUNK)),
            schedule=d.get("schedule"),
            settings=d.get("settings") or {},
            parent=d.get("parent"),
            format_version=str(d["format_version"]),
            source_dtype=d.get("source_dtype"),
            extra={k: v for k, v in d.items() if k not in known},
        )


def _jsonable(obj):
    """Best-effort conversion of settings to strict JSON.

    Unknown objects become their repr; non-finite floats become the strings "nan", "inf",
    "-inf" (strict JSON has no NaN).
    """
    try:
        json.dumps(obj, allow_nan=False)
        return obj
    except (TypeError, ValueError):
        pass
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else str(f)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return repr(obj)


def read_header(path: "str | Path", storage_options: dict | None = None) -> Header:
    """Read and validate the header of the store at ``path`` (a local path or fsspec URL).

    Raises:
        NotAStoreError: no Zarr group or no ``gradtrace`` attribute there.
        FormatVersionError: the store's format is newer than this gradtrace understands.
    """
    import zarr

    local = "://" not in str(path) or str(path).startswith("file://")
    root_meta = Path(str(path)[len("file://"):] if str(path).startswith("file://") else str(path)) / "zarr.json"
    if local and root_meta.is_file():
        # the root metadata is there: if it does not parse, the store is damaged (not a wrong path)
        try:
            doc = json.loads(root_meta.read_bytes())
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as err:
            raise damaged(path, None, f"its root metadata {root_meta} is not valid JSON ({err}); it was "
                          "truncated or overwritten") from err
    try:
        group = zarr.open_group(str(path), mode="r", storage_options=storage_options)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError, KeyError) as err:
        raise NotAStoreError(
            f"{path} is not a gradtrace run store (no Zarr group there). "
            "Record one with capture.Recorder or `gradtrace record`, or check the path."
        ) from err
    return header_of_group(group, path)


def header_of_group(group, path="the store") -> Header:
    attrs = group.attrs.asdict()
    if ATTR_KEY not in attrs:
        raise NotAStoreError(
            f"{path} is a Zarr group but not a gradtrace run store (no '{ATTR_KEY}' attribute). "
            "Record one with capture.Recorder or `gradtrace record`."
        )
    raw = attrs[ATTR_KEY]
    if not isinstance(raw, dict):
        raise damaged(path, None, f"the '{ATTR_KEY}' attribute is not a JSON object")
    check_format_version(raw, path)
    try:
        header = Header.from_json(raw)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise damaged(path, None, f"the '{ATTR_KEY}' header cannot be read ({type(err).__name__}: {err})") from err
    check_header(header, raw, path)
    return header


def check_format_version(raw: dict, path) -> None:
    """Refuse a store whose format this gradtrace does not read, saying what to do.

    ``raw`` is the root ``gradtrace`` attribute. Readable: ``"1.x"`` for any x. Refused with
    :class:`FormatVersionError`: a newer major version (upgrade gradtrace), and the integer
    versions of the development releases before 1.0, whose layout changed under one number
    (re-record the run, or read it with the gradtrace that wrote it). A version that is neither
    an integer nor ``"MAJOR.MINOR"`` is damage.
    """
    version = raw.get("format_version")
    major = None
    if isinstance(version, str):
        head, dot, minor = version.partition(".")
        if dot and head.isdigit() and minor.isdigit():
            major = int(head)
    elif isinstance(version, int) and not isinstance(version, bool):
        major = 0  # the development releases wrote an integer (1) before the format was declared final
    if major is None:
        raise damaged(path, None, f"the '{ATTR_KEY}' attribute has no format_version of the form "
                      f"'MAJOR.MINOR' ({version!r})")
    want = int(FORMAT_VERSION.partition(".")[0])
    if major > want:
        raise FormatVersionError(
            f"{path} uses run-store format {version}, newer than the {FORMAT_VERSION} this gradtrace reads: "
            "upgrade gradtrace (pip install -U gradtrace)."
        )
    if major < want:
        settings = raw.get("settings") if isinstance(raw.get("settings"), dict) else {}
        wrote = settings.get("gradtrace_version")
        by = f" (gradtrace {wrote})" if isinstance(wrote, str) and wrote[:1].isdigit() else ""
        raise FormatVersionError(
            f"{path} was written by a development version of gradtrace{by} in format {version!r}, from before "
            f"the final format {FORMAT_VERSION}; this gradtrace does not read it. Re-record the run, or read it "
            "with the gradtrace version that wrote it."
        )


def check_header(header: Header, raw: dict, path) -> None:
    """Plausibility of the header's own numbers (free: no data is read).

    The parameter table must tile the flat vector: offsets start at 0 and each follows the
    previous tensor's end, sizes equal the products of the shapes, and ``n_params`` their sum;
    ``0 <= n_steps <= capacity``. Raises :class:`DamagedStoreError` naming what disagrees.
    """
    off = 0
    for i, (t, rt) in enumerate(zip(header.tensors, raw.get("tensors", []))):
        if any(s < 0 for s in t.shape):
            raise damaged(path, None, f"parameter table entry {i} ({t.name!r}) has a negative shape {t.shape}")
        if t.offset != off:
            raise damaged(path, None, f"parameter table entry {i} ({t.name!r}) starts at offset {t.offset}, "
                          f"but the tensors before it end at {off}")
        if "size" in rt and int(rt["size"]) != t.size:
            raise damaged(path, None, f"parameter table entry {i} ({t.name!r}) has size {rt['size']}, but its "
                          f"shape {list(t.shape)} holds {t.size} entries")
        off += t.size
    if "n_params" in raw and int(raw["n_params"]) != off:
        raise damaged(path, None, f"the header says n_params = {raw['n_params']}, the parameter table sums to {off}")
    if header.n_steps < 0 or (header.capacity and header.n_steps > header.capacity):
        raise damaged(path, None, f"n_steps = {header.n_steps} is outside 0..capacity ({header.capacity})")
    if header.param_chunk < 1:
        raise damaged(path, None, f"param_chunk = {header.param_chunk} is not a positive chunk width")


# --------------------------------------------------------------------------------------
# Writer lock
# --------------------------------------------------------------------------------------


#: The writer lock file inside a store (holds the writer's pid; plain zarr readers ignore it).
#: Every process that writes a store (``capture.writer.StoreWriter``, ``analysis.build_index``)
#: holds an exclusive ``fcntl.flock`` on it while it writes.
LOCK_NAME = ".gradtrace.lock"


#: The lock file of query-index builders (``analysis.build_index``): one builder at a time. It
#: is not the writer lock: an index may be built while a recording appends (a live store).
INDEX_LOCK_NAME = ".gradtrace-index.lock"


def acquire_lock(store: Path, shown, name: str = LOCK_NAME) -> int:
    """An exclusive non-blocking ``flock`` on ``store/name``; StoreLockedError naming the
    holder's pid when another process (or another writer of this one) holds it."""
    lock = store / name
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise StoreLockedError(
                f"{shown} is being written by another writer (process {holder}, which holds "
                f"{Path(str(shown)) / name}); wait for it to close, or stop it (a dead process releases the lock "
                "by itself)"
            ) from None
        try:  # the holder before us may have removed the file after we opened it: retry
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        os.close(fd)
    raise StoreLockedError(f"{shown}: cannot take the writer lock {lock} (it keeps changing)")


def release_lock(fd: int, lock: Path | None = None) -> None:
    """Release the writer lock; with ``lock``, remove the lock file first (while still holding
    it: a writer that opened the old file sees it is gone and retries), so a closed store holds
    no file that plain zarr readers would warn about."""
    try:
        if lock is not None:
            try:
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    os.unlink(lock)
            except OSError:
                pass
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
