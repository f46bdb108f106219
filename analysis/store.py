"""Open a run store lazily: :func:`open_run` returns a :class:`Run`.

A :class:`Run` holds the validated header, an xarray Dataset whose big arrays are dask arrays
aligned to the storage chunks, and the helpers every metric uses: step selection (by step
number, range or list, with errors that list the nearby recorded steps) and parameter-group
selection (by name, glob or list, returning the index ranges in the flat vector).

Store semantics (``gradtrace_format/format.py``): rows at index >= ``header.n_steps`` are not data
(crash leftovers), and after a crash the arrays may even differ in length, so the Dataset is
built from the zarr arrays sliced to ``n_steps`` rather than from ``xarray.open_zarr``.
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from gradtrace_format import format as fmt
from gradtrace_format import integrity
from gradtrace_format.errors import ParamSelectionError, StepNotFoundError, TierError

#: Bytes per dask chunk of ``Run.ds`` big arrays (the engine picks its own slab width).
DS_CHUNK_BYTES = 128 * 2**20

_ZARRS = {"codec_pipeline.path": "zarrs.ZarrsCodecPipeline"}
_open_lock = threading.Lock()
_open_cache: dict = {}  # (ArrayRef, pid) -> open zarr array, oldest first
_OPEN_CACHE_SIZE = 64


def zarrs_available() -> bool:
    """True when the Rust codec pipeline ``zarrs`` is installed and not disabled.

    Set ``GRADTRACE_ZARRS=0`` to read through zarr-python's own pipeline.
    """
    if os.environ.get("GRADTRACE_ZARRS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return importlib.util.find_spec("zarrs") is not None


def _location(path) -> tuple[str, bool]:
    """``(location for zarr, is_local)``; ``file://`` URLs become local paths (keeps zarrs)."""
    s = os.fspath(path) if isinstance(path, os.PathLike) else str(path)
    if s.startswith("file://"):
        return s[len("file://"):], True
    if "://" in s:
        return s, False
    return s, True


@dataclass(frozen=True)
class ArrayRef:
    """A picklable handle on one array of a store, opened once per process.

    Dask tasks carry this instead of an open array, so that each worker process opens the
    array itself, with the zarrs pipeline when it is available there (``zarr.config.set``
    does not reach worker processes, ../shared/STORAGE.md).
    """

    location: str
    name: str
    storage_options: str = "null"  # JSON, so the dataclass stays hashable
    zarrs: bool = True
    token: str = ""  # identifies the header the Run was opened with (a rewritten store is reopened)
    #: rows whose chunks the writer removed on purpose (np.packbits of a row mask; see
    #: ``gradtrace_format.integrity.absent_rows``): a missing chunk there is not damage
    absent: bytes = b""

    def absent_rows(self) -> np.ndarray:
        """Store rows whose chunks of this array are absent on purpose (read as the fill value)."""
        if not self.absent:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(np.unpackbits(np.frombuffer(self.absent, dtype=np.uint8)))

    def open(self):
        import zarr

        key = (self, os.getpid())
        arr = _open_cache.get(key)
        if arr is None:
            with _open_lock:
                arr = _open_cache.get(key)
                if arr is None:
                    while len(_open_cache) >= _OPEN_CACHE_SIZE:
                        _open_cache.pop(next(iter(_open_cache)))
                    opts = json.loads(self.storage_options)
                    kw = {"storage_options": opts} if opts else {}
                    path = f"{self.location.rstrip('/')}/{self.name}"
                    if self.zarrs and zarrs_available():
                        with zarr.config.set(_ZARRS):
                            arr = zarr.open_array(path, mode="r", **kw)
                    else:
                        arr = zarr.open_array(path, mode="r", **kw)
                    _open_cache[key] = arr
        return arr


@dataclass(frozen=True)
class ParamGroup:
    """A set of whole parameter tensors.

    Attributes:
        label: how the group was asked for (``"all"``, a name, a glob, a list).
        names: tensor names in table order.
        indices: their positions in the parameter table.
        ranges: merged ``[lo, hi)`` column ranges of the stored rows (the flat vector of length d;
            in a sharded store the shards' columns, pads excluded).
        size: number of entries.
    """

    label: str
    names: tuple[str, ...]
    indices: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]
    size: int


@dataclass
class Run:
    """An opened run store. Build it with :func:`open_run`.

    Attributes:
        path: the store location as given.
        header: the validated :class:`gradtrace_format.format.Header` (``n_steps`` rows are data).
        ds: Dataset with dims ``step`` (every committed row, the final iterate included),
            ``param`` / ``sketch`` / ``param_byte`` (data arrays, dask, chunked along ``param``
            to a multiple of the storage chunks) and ``tensor``; coords ``step``, ``epoch``,
            ``lr``, ``loss``, ``flags`` and the parameter table.
    """

    path: str
    header: fmt.Header
    ds: xr.Dataset
    location: str = ""
    storage_options: dict | None = None
    use_zarrs: bool = True
    _arrays: dict = field(default_factory=dict, repr=False)
    _token: str = ""

    # ------------------------------------------------------------------ properties
    @property
    def tier(self) -> dict[str, fmt.Tier]:
        """``{"grad": Tier, "weight": Tier}``."""
        return dict(self.header.tiers)

    @property
    def tensors(self) -> list[fmt.TensorInfo]:
        return list(self.header.tensors)

    @property
    def n_params(self) -> int:
        return self.header.n_params

    @property
    def steps(self) -> np.ndarray:
        """Step number of every committed row (int64, increasing), final iterate included."""
        return np.asarray(self.ds["step"].values)

    @property
    def flags(self) -> np.ndarray:
        return np.asarray(self.ds["flags"].values)

    @property
    def grad_steps(self) -> np.ndarray:
        """Steps that have a gradient (every row but the final iterate and skipped steps)."""
        return self.steps[(self.flags & (fmt.FLAG_FINAL | fmt.FLAG_SKIPPED)) == 0]

    @property
    def weight_steps(self) -> np.ndarray:
        """Steps that have weights (all but those a weight schedule or the writer skipped)."""
        return self.steps[(self.flags & (fmt.FLAG_NO_WEIGHT | fmt.FLAG_SKIPPED)) == 0]

    def require_weights(self, steps: np.ndarray, what: str) -> None:
        """Raise one line naming the steps among ``steps`` that have no recorded weights."""
        missing = np.asarray(steps)[~np.isin(steps, self.weight_steps)]
        if len(missing):
            w = self.weight_steps
            raise StepNotFoundError(
                f"{what} needs the weights at step(s) {missing[:5].tolist()}{' ...' if len(missing) > 5 else ''}, "
                f"which {self.path} does not hold: weights were recorded at {len(w)} of {len(self.steps)} rows "
                f"(the weight schedule: {(self.header.settings.get('weight_schedule') or {}).get('description', 'every recorded step')}). "
                "Ask for steps that have weights (run.weight_steps)."
            )

    @property
    def final_step(self) -> int | None:
        """Step of the final iterate row (weights after the last update), None if absent."""
        fin = self.steps[(self.flags & fmt.FLAG_FINAL) != 0]
        return int(fin[-1]) if len(fin) else None

    def dense(self, array: str) -> bool:
        """True when ``array`` ("grad" or "weight") is stored dense (lossless or rounded)."""
        return self.header.tiers[array].is_dense

    def array_ref(self, name: str) -> ArrayRef:
        if name not in self._arrays:
            raise TierError(
                f"{self.path} has no array '{name}' (tiers: grad={self.header.tiers['grad'].name}, "
                f"weight={self.header.tiers['weight'].name})."
            )
        rows = integrity.absent_rows(self.flags, name)
        mask = b""
        if len(rows):
            m = np.zeros(self.header.n_steps, dtype=bool)
            m[rows] = True
            mask = np.packbits(m).tobytes()
        return ArrayRef(self.location, name, json.dumps(self.storage_options), self.use_zarrs, self._token, mask)

    def chunk_width(self, name: str) -> int:
        return int(self._arrays[name].chunks[1])

    def tensor_scalars(self, name: str, rows: np.ndarray, group: ParamGroup) -> np.ndarray:
        """Stored per-step, per-tensor scalar ``name`` (``"grad_sqnorm"``, ``"weight_sqnorm"``,
        ``"grad_dot_weight"``) at store rows ``rows`` for the group's tensors: (rows, tensors)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, len(group.indices)))
        sel = (rows, np.asarray(group.indices, dtype=np.int64))
        arr = integrity.CheckedScalarArray(self._arrays[fmt.per_tensor_array(name)], self.header.n_steps)
        try:
            return np.asarray(arr.get_orthogonal_selection(sel), dtype=np.float64)
        except fmt.DamagedStoreError as err:
            raise err.with_steps(self.path, self.steps) from None

    def per_tensor_scalar(self, name: str, rows: np.ndarray, group: ParamGroup) -> np.ndarray:
        """Stored per-step scalar ``name`` over a group: the whole-vector value when the group
        is every tensor, else the sum of the per-tensor values."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(group.indices) == len(self.header.tensors):
            return np.asarray(self.ds[name].values)[rows]
        return self.tensor_scalars(name, rows, group).sum(axis=1)

    def sketch_plan(self, array: str = "grad") -> fmt.SketchPlan:
        tier = self.header.tiers[array]
        if tier.is_dense:
            raise TierError(f"'{array}' is stored with tier {tier.name!r}, not as a sketch")
        return fmt.SketchPlan.from_json(self._arrays[fmt.sketch_array(array)].attrs["sketch_plan"])

    # ------------------------------------------------------------------ steps
    def rows_of(self, steps) -> np.ndarray:
        """Row indices of recorded steps (each must be recorded)."""
        steps = np.atleast_1d(np.asarray(steps, dtype=np.int64))
        idx = np.searchsorted(self.steps, steps)
        ok = (idx < len(self.steps)) & (self.steps[np.minimum(idx, len(self.steps) - 1)] == steps)
        if not ok.all():
            raise self._missing(int(steps[~ok][0]))
        return idx.astype(np.int64)

    def select_steps(self, steps=None, *, grads: bool = True) -> np.ndarray:
        """Recorded step numbers of a selection, increasing.

        Args:
            steps: ``None`` (every recorded step), an int (that step), ``slice(a, b)`` (every
                recorded step s with a <= s <= b, inclusive like ``xarray.sel``; either end may
                be None), a ``range`` or a sequence of ints (each must be recorded).
            grads: only steps with a gradient (excludes the final iterate row).

        Raises:
            StepNotFoundError: an explicitly named step is not recorded (the message lists
                the nearest recorded steps).
        """
        pool = self.grad_steps if grads else self.steps
        if steps is None:
            return pool.copy()
        if isinstance(steps, slice):
            if steps.step not in (None, 1):
                raise StepNotFoundError(
                    f"steps={steps!r}: a slice selects every recorded step in [start, stop]; "
                    "use range(start, stop, step) for explicit steps"
                )
            lo = -math.inf if steps.start is None else int(steps.start)
            hi = math.inf if steps.stop is None else int(steps.stop)
            return pool[(pool >= lo) & (pool <= hi)]
        arr = np.atleast_1d(np.asarray(list(steps) if isinstance(steps, range) else steps))
        if arr.dtype.kind not in "iu":
            raise StepNotFoundError(
                f"steps={steps!r}: give step numbers (ints), a range, a slice(a, b) or None for all"
            )
        arr = np.unique(arr.astype(np.int64))
        if not grads:
            self.rows_of(arr)  # raises on a step not recorded at all
            return arr
        missing = arr[~np.isin(arr, pool)]
        if len(missing):
            step = int(missing[0])
            fin = self.final_step
            if fin is not None and step == fin:
                raise StepNotFoundError(
                    f"step {fin} is the final iterate of {self.path}: it holds weights only, no "
                    f"gradient. Gradient steps end at {int(self.grad_steps[-1]) if len(self.grad_steps) else 'none'}."
                )
            raise self._missing(step, grads=True)
        return arr

    def _missing(self, step: int, grads: bool = False) -> StepNotFoundError:
        """The error for a step that is not recorded; with ``grads`` (a gradient query) the
        nearest steps offered are gradient steps only, never the final iterate."""
        s = self.grad_steps if grads else self.steps
        what = "gradient steps" if grads else "steps"
        if len(s) == 0:
            return StepNotFoundError(f"step {step} is not in {self.path}: the store has no committed {what} yet")
        i = int(np.searchsorted(s, step))
        near = sorted(set(s[max(0, i - 3): i + 3].tolist()))
        g = self.grad_steps[:1000]
        gaps = np.unique(np.diff(g)) if len(g) > 1 else np.array([])
        every = (", every step" if gaps[0] == 1 else f", every {int(gaps[0])} steps") if len(gaps) == 1 else ""
        fin = self.final_step
        tail = f"; final iterate (weights only) at {fin}" if fin is not None else ""
        return StepNotFoundError(
            f"step {step} is not recorded in {self.path}. Nearest recorded {what}: "
            f"{', '.join(map(str, near))} (recorded {what}: {int(s[0])}..{int(s[-1])}{every}, {len(s)}{tail}). "
            "Pick a recorded step, or use slice(a, b) to take every recorded step in an interval."
        )

    # ------------------------------------------------------------------ parameters
    def params(self, params=None) -> ParamGroup:
        """Select whole tensors by name, glob or list (``None`` = every parameter).

        Args:
            params: ``None``, a name (``"fc.weight"``), a glob (``"conv*"``), a list of
                names/globs, or a :class:`ParamGroup` (returned as is).

        Returns:
            The :class:`ParamGroup` with the flat index ranges.

        Raises:
            ParamSelectionError: a name or glob matched no tensor.
        """
        if isinstance(params, ParamGroup):
            return params
        tensors = self.header.tensors
        names = [t.name for t in tensors]
        if params is None:
            chosen, label = list(range(len(tensors))), "all"
        else:
            pats = [params] if isinstance(params, str) else list(params)
            if not pats or not all(isinstance(p, str) for p in pats):
                raise ParamSelectionError(
                    f"params={params!r}: give a tensor name, a glob like 'conv*', or a list of them"
                )
            chosen = []
            for p in pats:
                hit = [i for i, n in enumerate(names) if n == p or fnmatch.fnmatchcase(n, p)]
                if not hit:
                    shown = ", ".join(names[:12]) + (f", ... ({len(names)} tensors)" if len(names) > 12 else "")
                    raise ParamSelectionError(
                        f"params: {p!r} matches no parameter tensor of {self.path}. Tensors: {shown}"
                    )
                chosen.extend(hit)
            chosen = sorted(set(chosen))
            label = params if isinstance(params, str) else ",".join(pats)
        ranges: list[list[int]] = []
        pieces = sorted(c for i in chosen for c in self.tensor_columns(i))
        for lo, hi in pieces:
            if ranges and ranges[-1][1] == lo:
                ranges[-1][1] = hi
            else:
                ranges.append([lo, hi])
        return ParamGroup(
            label=str(label),
            names=tuple(names[i] for i in chosen),
            indices=tuple(chosen),
            ranges=tuple((int(a), int(b)) for a, b in ranges if b > a),
            size=int(sum(tensors[i].size for i in chosen)),
        )

    @property
    def layout(self) -> "fmt.ShardedLayout | None":
        """The rank-major column layout of a sharded store (None: columns in natural order)."""
        return fmt.layout_of(self.header)

    def tensor_columns(self, index: int) -> list[tuple[int, int]]:
        """Column ranges ``[lo, hi)`` of tensor ``index`` in the stored ``grad`` / ``weight`` rows,
        in the tensor's natural order: one range, or one per shard in a sharded store (whose pad
        columns belong to no tensor)."""
        lay = self.layout
        if lay is not None:
            return lay.tensor_columns(index)
        t = self.header.tensors[index]
        return [(t.offset, t.offset + t.size)] if t.size else []

    def to_columns(self, vec: np.ndarray) -> np.ndarray:
        """A natural-order vector (length d) in the stored column layout (pads 0); unchanged
        for an unsharded store."""
        lay = self.layout
        if lay is None:
            return vec
        out = np.zeros(lay.columns, dtype=np.asarray(vec).dtype)
        out[lay.natural_columns(len(self.header.tensors))] = vec
        return out

    def natural(self, array: str, step: int, params=None) -> xr.DataArray:
        """The stored ``grad`` or ``weight`` row of ``step`` in natural order (the flat vector
        of the parameter table, whatever the store's column layout), float32, for the tensors
        of ``params`` (default all); dims ``param``, coord ``tensor`` (name of each entry)."""
        if array not in fmt.DATA_ARRAYS or not self.dense(array):
            raise TierError(f"natural({array!r}): give 'grad' or 'weight' of a lossless or rounded tier "
                            f"(this store keeps grad={self.header.tiers['grad'].name}, "
                            f"weight={self.header.tiers['weight'].name})")
        row = int(self.rows_of([step])[0])
        group = self.params(params)
        cols = [np.arange(lo, hi) for i in group.indices for lo, hi in self.tensor_columns(i)]
        cols = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
        vals = np.asarray(self.ds[array][row].values)[cols]
        names = np.repeat(np.array(group.names, dtype=object),
                          [self.header.tensors[i].size for i in group.indices])
        return xr.DataArray(vals, dims=("param",), coords={"tensor": ("param", names)}, name=array,
                            attrs={"step": int(step), "params": group.label})

    def step_coords(self, steps: np.ndarray) -> dict:
        """Coordinates ``epoch``, ``lr``, ``loss`` of the given (recorded) steps."""
        rows = self.rows_of(steps) if len(steps) else np.zeros(0, dtype=np.int64)
        return {k: ("step", np.asarray(self.ds[k].values)[rows]) for k in ("epoch", "lr", "loss")}

    def __repr__(self):
        tiers = ", ".join(f"{k}={v.name}" for k, v in self.header.tiers.items())
        g = self.grad_steps
        span = f" {int(g[0])}..{int(g[-1])}" if len(g) else ""
        fin = self.final_step
        final = f" + final iterate at {fin}" if fin is not None else " (no final iterate)"
        return (
            f"Run({self.path!r}: {len(g)} gradient steps{span}{final}, "
            f"d={self.n_params}, {len(self.header.tensors)} tensors, {tiers})"
        )


def open_run(path, *, chunks: int | None = None, storage_options: dict | None = None) -> Run:
    """Open a gradtrace run store lazily (nothing big is read until computed).

    Args:
        path: local path, ``file://`` URL or any fsspec URL of the store (a :class:`Run` is
            returned unchanged).
        chunks: entries per dask chunk along ``param`` in ``Run.ds`` (rounded up to whole
            storage chunks). Default: about 128 MiB per chunk over all rows.
        storage_options: passed to fsspec for remote URLs.

    Returns:
        A :class:`Run`; ``run.ds`` holds only the ``header.n_steps`` committed rows.

    Raises:
        gradtrace_format.format.NotAStoreError: no gradtrace store at ``path``.
        gradtrace_format.format.FormatVersionError: the store's format is newer, or from before 1.0.

    Example:
        >>> run = open_run("runs/cnn.zarr")            # doctest: +SKIP
        >>> run.ds.grad                                 # doctest: +SKIP
        <xarray.DataArray 'grad' (step: 1500, param: 620362)> dask.array<...>
    """
    if isinstance(path, Run):
        return path
    import zarr

    loc, local = _location(path)
    if local and not Path(loc).exists():
        raise fmt.NotAStoreError(
            f"{path} does not exist, so it is not a gradtrace run store. Check the path, or record "
            "one with capture.Recorder or `gradtrace record`."
        )
    header = fmt.read_header(loc, storage_options=None if local else storage_options)
    use_zarrs = local and zarrs_available()
    kw = {} if local or not storage_options else {"storage_options": storage_options}
    try:
        # use_consolidated=False: after a resume or a crash the consolidated metadata is stale.
        if use_zarrs:
            with zarr.config.set(_ZARRS):
                group = zarr.open_group(loc, mode="r", use_consolidated=False, **kw)
        else:
            group = zarr.open_group(loc, mode="r", use_consolidated=False, **kw)
    except Exception as err:  # noqa: BLE001 - any zarr failure here means "not readable"
        raise fmt.NotAStoreError(f"{path}: cannot open the Zarr group ({err})") from err
    specs = fmt.store_array_specs(header)
    n = header.n_steps
    arrays = {}
    for spec in specs:
        try:
            arr = group[spec.name]
        except KeyError as err:
            raise fmt.StoreError(
                f"{path} lacks the array '{spec.name}' that format version {header.format_version} "
                "requires: the store is damaged or was written by another tool."
            ) from err
        if arr.shape[0] < n:
            raise fmt.StoreError(
                f"{path}: array '{spec.name}' has {arr.shape[0]} rows but the header commits {n}: "
                "the store is damaged (rows were removed after they were committed)."
            )
        arrays[spec.name] = arr
    integrity.check_table_arrays(path, header, group)
    run = Run(
        path=str(path), header=header, ds=xr.Dataset(), location=loc,
        storage_options=None if local else storage_options, use_zarrs=use_zarrs, _arrays=arrays,
    )
    run._token = hashlib.sha1(json.dumps(header.to_json(), sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:
        run.ds = _build_dataset(run, group, specs, n, chunks)
    except fmt.DamagedStoreError as err:
        raise err.with_steps(str(path)) from None
    return run


def _build_dataset(run: Run, group, specs, n: int, chunks: int | None) -> xr.Dataset:
    import dask.array as da
    from dask.base import tokenize

    header = run.header
    # every committed chunk checked (checksums, missing chunks), the step column first so that
    # damage elsewhere can name steps
    per_step = {"step": integrity.read_scalar(run._arrays["step"], n)}
    steps = per_step["step"].astype(np.int64)
    if n > 1 and not (np.diff(steps) > 0).all():
        bad = np.flatnonzero(np.diff(steps) <= 0) + 1
        raise fmt.damaged(run.path, "step", "the step column is not strictly increasing", rows=bad, steps=steps[bad])
    if n and steps[0] < 0:
        raise fmt.damaged(run.path, "step", "the step column holds a negative step", rows=[0], steps=steps[:1])
    for name in fmt.PER_STEP_ARRAYS:
        if name != "step":
            try:
                per_step[name] = integrity.read_scalar(run._arrays[name], n)
            except fmt.DamagedStoreError as err:
                raise err.with_steps(run.path, steps) from None
    integrity.check_flags(run.path, per_step["flags"], per_step[fmt.GRAD_SQNORM], per_step[fmt.WEIGHT_SQNORM], steps)
    tensors = header.tensors
    coords = {
        "step": ("step", steps),
        "epoch": ("step", per_step["epoch"].astype(np.int64)),
        "lr": ("step", per_step["lr"].astype(np.float64)),
        "loss": ("step", per_step["loss"].astype(np.float64)),
        "flags": ("step", per_step["flags"].astype(np.int32)),
        **{t.name: (fmt.TENSOR_DIM, t.values(tensors, strings=object)) for t in fmt.TABLE_SPECS},
    }
    data = {}
    for name in fmt.NORM_ARRAYS:
        data[name] = ("step", per_step[name].astype(np.float64))
    token = tokenize(run.location, run._token)
    for spec in specs:
        if spec.width is None or spec.name in fmt.PER_STEP_ARRAYS:
            continue
        arr = run._arrays[spec.name]
        if spec.codecs == "scalar":  # (step, tensor) float64: lazy, it can be large; reads checked
            checked = integrity.CheckedScalarArray(arr, n)
            darr = da.from_array(checked, chunks=(max(1, min(fmt.SCALAR_CHUNK, n)), arr.shape[1]),
                                 name=f"gradtrace-{spec.name}-{token}", asarray=True)
            data[spec.name] = (spec.dims, darr)
            continue
        cw = int(arr.chunks[1])
        itemsize = np.dtype(spec.dtype).itemsize
        want = chunks if chunks else DS_CHUNK_BYTES // max(1, n * itemsize)
        width = max(cw, -(-int(want) // cw) * cw)
        cleared = integrity.absent_rows(per_step["flags"], spec.name)
        darr = da.from_array(integrity.CheckedRows(arr, run.path, steps, cleared), chunks=(max(n, 1), width),
                             name=f"gradtrace-{spec.name}-{token}", asarray=True)[:n]
        data[spec.name] = (spec.dims, darr, dict(arr.attrs))
    attrs = {
        "gradtrace_path": run.path,
        "format_version": header.format_version,
        "n_params": header.n_params,
        "grad_tier": header.tiers["grad"].name,
        "weight_tier": header.tiers["weight"].name,
        "closed": int(header.closed),
    }
    return xr.Dataset(data, coords=coords, attrs=attrs)


def as_run(run) -> Run:
    """A :class:`Run` from a Run or a path (metrics accept both)."""
    return run if isinstance(run, Run) else open_run(run)
