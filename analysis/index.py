"""The query index: a few T x T matrices in the store that answer later questions instantly.

Every correlation is a ratio of entries of ``GG = G G^T``; RSI, EB and gamma against a
recorded iterate (or a mean of recorded iterates) follow from ``GV = G V^T`` and
``VV = V V^T``, ``V = W - a`` the iterates relative to a fixed anchor ``a`` (the last row with
weights when the index is first built: differences ``w_t - w_s = V_t - V_s`` are all RSI needs, and
the small V lose fewer digits to cancellation than W); a sign shift is a ratio of two integer
counts. :func:`build_index` computes
them in one out-of-core pass of the analysis engine (slabs of the parameter axis, summed in a
tree; the local threads or a ``dask.distributed`` cluster) and stores them in the run store
(sub-group ``index``, layout in :mod:`gradtrace_format.format`). The analysis functions then answer
from it when it covers the request (same result, attribute ``answered_by="index"``) and run
the pass otherwise; ``index=False`` forces the pass.

Layouts:

* ``full``: every pair of rows. 5 matrices of n x n (3 float64, 2 int64): 40 n^2 bytes
  uncompressed (0.04 GB at T = 10^3, 4 GB at 10^4). Answers every correlation (matrix, window,
  lag, mean), sign shift, and RSI/EB/gamma against any recorded step, mean of recorded steps
  or the final iterate, and :func:`analysis.rsi_pairs.rsi_all_references`.
* ``band`` L: lags 0..L in store rows only: 6 arrays of n x (L + 1), for long runs. Answers lag
  series and sign shifts at lags <= L (in rows: lags in training steps when every step is
  recorded), mean correlations for every h (adjacent pairs), windows of h <= L + 1 steps, and
  RSI for the steps within L rows of the reference (in practice: nothing useful for RSI; the
  pass answers).

Incremental: a row is used only while the store still holds what was indexed (``index/check``:
step, flags and the exact per-step norms the capture stored). After a resumed run grew (or
rewrote its final-iterate row), :func:`build_index` computes only the rows from the first
changed one on: their products with every row (``full``; a full read of the store, but
``new x all`` instead of ``all x all`` products) or with the L rows before them (``band``; reads
only the new rows and L before). ``rebuild=True`` recomputes everything.

The index covers the whole parameter vector; a ``params=`` group always runs the pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from gradtrace_format import format as fmt
from gradtrace_format.errors import AnalysisError
from analysis.store import Run, as_run

#: Partial results of one index pass up to this many bytes; larger indexes are built in
#: column tiles (each tile one more read of the store).
MAX_PARTIAL_BYTES = 256 * 2**20
#: Bytes of a one-chunk-wide slab an index pass may hold (engine.CHUNK_SLAB_BYTES is 1 GiB):
#: T = 512 steps, their weights and the final iterate are 1026 rows of 1 MiB chunks.
INDEX_CHUNK_SLAB_BYTES = 5 * 2**28
#: Store rows per pass of a banded build (with the L rows before them): keeps a slab one
#: storage chunk wide (analysis.engine.CHUNK_SLAB_BYTES) at the default chunk width.
BAND_PASS_ROWS = 448


# ------------------------------------------------------------------------------ reading


def _check_table(run: Run, n: int) -> np.ndarray:
    """(n, 5) float64: the per-row values an index row is recognised by (INDEX_CHECK_FIELDS)."""
    ds = run.ds
    cols = [np.asarray(ds["step"].values[:n], np.float64), np.asarray(ds["flags"].values[:n], np.float64)]
    for name in fmt.INDEX_CHECK_FIELDS[2:]:
        cols.append(np.asarray(ds[name].values[:n], np.float64))
    return np.stack(cols, axis=1) if n else np.zeros((0, len(fmt.INDEX_CHECK_FIELDS)))


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise equality, NaN equal to NaN."""
    eq = (a == b) | (np.isnan(a) & np.isnan(b))
    return eq.all(axis=1)


@dataclass
class QueryIndex:
    """An opened query index of a run (read lazily: queries read only the entries they need).

    Attributes:
        run: the opened store.
        layout: ``"full"`` or ``"band"``.
        band: L for the band layout, else None.
        n_rows: rows written by the last build.
        n_valid: leading rows that still match the store (the rows queries may use).
        spaces: column space of each product ("param", "sketch", "bits").
        attrs: the ``gradtrace_index`` attribute.
    """

    run: Run
    group: object
    layout: str
    band: int | None
    n_rows: int
    n_valid: int
    spaces: dict
    attrs: dict

    def array(self, name: str):
        return self.group[name]

    def has(self, name: str) -> bool:
        return name in self.spaces

    def covers(self, rows_a, rows_b=None) -> bool:
        """True when every pair (rows_a[k], rows_b[k]) (or every row of rows_a) is indexed."""
        a = np.asarray(rows_a, np.int64)
        if a.size and int(a.max()) >= self.n_valid:
            return False
        if rows_b is None:
            return True
        b = np.asarray(rows_b, np.int64)
        if b.size and int(b.max()) >= self.n_valid:
            return False
        return self.band is None or not a.size or int(np.abs(a - b).max()) <= self.band

    def covers_block(self, rows) -> bool:
        r = np.asarray(rows, np.int64)
        if not r.size:
            return True
        return self.covers(r) and (self.band is None or int(r.max() - r.min()) <= self.band)

    def pairs(self, name: str, rows_a, rows_b) -> np.ndarray:
        """Entries ``name[rows_a[k], rows_b[k]]`` (``gg``, ``gv``, ``vv``, ``sign_*``) as float64."""
        a = np.asarray(rows_a, np.int64)
        b = np.asarray(rows_b, np.int64)
        if not a.size:
            return np.zeros(0)
        if self.band is None:
            return np.asarray(self.group[name].vindex[a, b], np.float64)
        if name == "gv":  # <G_a, V_b>: gv[a, a - b] for a >= b, else vg[b, b - a]
            out = np.empty(len(a))
            lo = a >= b
            if lo.any():
                out[lo] = self.group["gv"].vindex[a[lo], (a - b)[lo]]
            if (~lo).any():
                out[~lo] = self.group["vg"].vindex[b[~lo], (b - a)[~lo]]
            return out
        hi, lo = np.maximum(a, b), np.minimum(a, b)
        return np.asarray(self.group[name].vindex[hi, hi - lo], np.float64)

    def block(self, name: str, rows, cols=None) -> np.ndarray:
        """The sub-matrix ``name[rows][:, cols]`` (cols default rows) as float64."""
        r = np.asarray(rows, np.int64)
        c = r if cols is None else np.asarray(cols, np.int64)
        if self.band is None:
            if not r.size or not c.size:
                return np.zeros((len(r), len(c)))
            return np.asarray(self.group[name].oindex[r, c], np.float64)
        ra, cb = np.meshgrid(r, c, indexing="ij")
        return self.pairs(name, ra.ravel(), cb.ravel()).reshape(len(r), len(c))

    def describe(self) -> dict:
        """JSON-able summary (for ``gradtrace info``)."""
        out = {"layout": self.layout, "band": self.band, "n_rows": self.n_rows, "valid_rows": self.n_valid,
               "store_rows": int(self.run.header.n_steps), "spaces": self.spaces,
               "up_to_date": self.n_valid == self.run.header.n_steps}
        if self.n_valid:
            out["steps"] = [int(self.run.steps[0]), int(self.run.steps[self.n_valid - 1])]
        for k in ("built_seconds", "rows_computed", "anchor_step"):
            if k in self.attrs:
                out[k] = self.attrs[k]
        return out


def _index_location(run: Run) -> str:
    return f"{run.location.rstrip('/')}/{fmt.INDEX_GROUP}"


def open_index(run) -> QueryIndex | None:
    """The store's query index, or None when it has none (or one this version cannot read)."""
    import zarr

    run = as_run(run)
    kw = {"storage_options": run.storage_options} if run.storage_options else {}
    try:
        group = zarr.open_group(_index_location(run), mode="r", use_consolidated=False, **kw)
    except Exception:  # noqa: BLE001 - no index (any zarr "not found")
        return None
    attrs = group.attrs.asdict().get(fmt.INDEX_ATTR)
    if not isinstance(attrs, dict) or int(attrs.get("version", 0)) != fmt.INDEX_VERSION:
        return None
    n_rows = int(attrs.get("n_rows", 0))
    n = min(n_rows, int(run.header.n_steps))
    n_valid = 0
    if n:
        stored = np.asarray(group["check"][:n], np.float64)
        ok = _same(stored, _check_table(run, n))
        n_valid = int(n if ok.all() else np.argmin(ok))
    band = attrs.get("band")
    return QueryIndex(run, group, str(attrs["layout"]), None if band is None else int(band), n_rows, n_valid,
                      dict(attrs.get("spaces", {})), attrs)


def index_for(run: Run, group, index) -> QueryIndex | None:
    """The index a query may use: None when ``index`` is False, the group is not every tensor,
    or the store has no index. ``index=True`` makes a missing index an error."""
    if index is False:
        return None
    whole = len(group.indices) == len(run.header.tensors)
    idx = open_index(run) if whole else None
    if index is True and (idx is None or idx.n_valid == 0):
        why = ("index=True covers the whole parameter vector only, not params=" + repr(group.label)) if not whole \
            else f"{run.path} has no valid query index"
        raise AnalysisError(f"{why}. Build it with `gradtrace index {run.path}` (analysis.build_index), "
                            "or pass index=None to fall back to a pass.")
    return idx


def require(idx: QueryIndex | None, index, ok: bool, what: str) -> QueryIndex | None:
    """``idx`` when it can answer (``ok``), else None; with ``index=True`` a gap is an error."""
    if idx is not None and ok:
        return idx
    if index is True:
        raise AnalysisError(f"index=True, but the query index of this store does not cover {what} "
                            "(rows past the index, or lags beyond its band). Run `gradtrace index STORE` to "
                            "update it (--rebuild --band L to change the band), or pass index=None.")
    return None


# ------------------------------------------------------------------------------ building


def _spaces(run: Run) -> dict:
    g = "param" if run.dense("grad") else "sketch"
    w = "param" if run.dense("weight") else "sketch"
    out = {"gg": g, "vv": w, "sign_disagree": "param" if run.dense("grad") else "bits"}
    out["sign_both"] = out["sign_disagree"]
    if g == w:
        out["gv"] = g
    return out


def _no_grad(run: Run, n: int) -> np.ndarray:
    return (run.flags[:n] & fmt.FLAG_FINAL) != 0


def build_index(run, band: int | None = None, rebuild: bool = False, *, progress=None, scheduler=None) -> dict:
    """Build (or bring up to date) the query index of a store, in one pass over it.

    Args:
        run: a :class:`analysis.Run` or a store path (local or fsspec URL; written in place).
        band: store only lags 0..band (rows) instead of every pair. ``None`` keeps the layout
            of an existing index (full for a new one). Changing it needs ``rebuild=True``.
        rebuild: recompute every row (otherwise only rows the index lacks or that changed).
        progress: progress bar (``None``: for long passes on a terminal).
        scheduler: dask scheduler; default the active distributed client, else threads.

    Returns:
        dict: ``layout``, ``band``, ``n_rows``, ``rows_computed``, ``seconds``, ``bytes`` (of the
        index arrays, uncompressed).

    Raises:
        AnalysisError: a band that differs from the existing index's without ``rebuild``, or a
            negative band.
    """
    import zarr

    t0 = time.perf_counter()
    run = as_run(run)
    if band is not None and int(band) < 0:
        raise AnalysisError(f"band={band}: give the largest lag to keep (>= 0), or None for every pair")
    n = int(run.header.n_steps)
    if n == 0:
        raise AnalysisError(f"{run.path} has no committed rows yet: record some steps before indexing it")
    old = None if rebuild else open_index(run)
    if old is not None and band is not None and (old.band != int(band)):
        have = "every pair" if old.band is None else f"lags 0..{old.band}"
        raise AnalysisError(f"{run.path} already has an index of {have}; pass rebuild=True (--rebuild) to "
                            f"replace it with {'lags 0..' + str(band) if band is not None else 'every pair'}")
    if old is not None and band is None:
        band = old.band
    band = None if band is None else int(band)
    first = 0 if old is None else old.n_valid
    if first == 0:
        old = None  # nothing to keep: a fresh index (with a fresh anchor)
    spaces = _spaces(run)
    if first >= n:
        return {"layout": old.layout, "band": band, "n_rows": n, "rows_computed": 0, "seconds": 0.0,
                "bytes": fmt.index_bytes(n, band, old.group["anchor"].shape[0]), "up_to_date": True}
    if old is None:
        # the last row with weights (a weight schedule leaves NaN weights on the steps it skips)
        has_w = np.flatnonzero((np.asarray(run.flags[:n]) & (fmt.FLAG_NO_WEIGHT | fmt.FLAG_SKIPPED)) == 0)
        if len(has_w):
            anchor_row = int(has_w[-1])
            anchor = _weight_row(run, anchor_row)
            anchor_step = int(run.steps[anchor_row])
        else:  # no weights yet: anchor 0 (the iterates themselves)
            anchor = np.zeros_like(_weight_row(run, n - 1))
            anchor_step = -1
    else:
        anchor = np.asarray(old.group["anchor"][:], np.float64)
        anchor_step = int(old.attrs.get("anchor_step", -1))
    try:
        if band is None:
            parts = _build_full(run, first, n, spaces, anchor, progress, scheduler)
        else:
            parts = _build_band(run, first, n, band, spaces, anchor, progress, scheduler)
    except fmt.DamagedStoreError as err:  # a damaged chunk: name the store and the steps
        raise err.with_steps(run.path, run.steps) from None
    seconds = time.perf_counter() - t0
    # one index builder at a time (its own lock file: a recording may be appending meanwhile)
    from pathlib import Path

    loc, _ = _local_path(run)
    lock_fd = fmt.acquire_lock(Path(loc), run.path, fmt.INDEX_LOCK_NAME) if loc is not None else None
    try:
        _write(run, parts, first, n, band, spaces, fresh=old is None, seconds=seconds, anchor=anchor,
               anchor_step=anchor_step)
        _consolidate(run)
    finally:
        if lock_fd is not None:
            fmt.release_lock(lock_fd, Path(loc) / fmt.INDEX_LOCK_NAME)
    return {"layout": "full" if band is None else "band", "band": band, "n_rows": n, "rows_computed": n - first,
            "seconds": time.perf_counter() - t0, "bytes": fmt.index_bytes(n, band, len(anchor)), "up_to_date": True,
            "anchor_step": anchor_step}


def _local_path(run):
    """``(directory, True)`` of a local store, ``(None, False)`` of a remote one."""
    loc = str(run.location)
    if loc.startswith("file://"):
        loc = loc[len("file://"):]
    return (None, False) if "://" in loc else (loc, True)


def _consolidate(run) -> None:
    import zarr

    if run.header.closed:  # plain xarray readers use the consolidated metadata of a closed store
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
                warnings.filterwarnings("ignore", message="Object at .* is not recognized")  # the lock file
                kw = {"storage_options": run.storage_options} if run.storage_options else {}
                root = zarr.open_group(run.location, mode="r+", use_consolidated=False, **kw)
                zarr.consolidate_metadata(root.store)
        except Exception:  # noqa: BLE001 - remote stores without listing: the index still works
            pass


def _weight_row(run: Run, row: int) -> np.ndarray:
    """The weights of store row ``row`` in the weight space (d values, or the sketch), float64."""
    name = "weight" if run.dense("weight") else fmt.sketch_array("weight")
    return np.asarray(run.array_ref(name).open()[int(row)], np.float64)


def _build_full(run: Run, first: int, n: int, spaces: dict, anchor, progress, scheduler) -> dict:
    """Rows ``first..n-1`` against every row: ``{name: (n, n - first) array}`` (columns = new rows)."""
    import dask

    from analysis.engine import Pass, compute

    rows = np.arange(n, dtype=np.int64)
    new = np.arange(first, n, dtype=np.int64)
    same = "gv" in spaces
    stacked = 2 * n if same else n
    per_new_row = 8 * stacked * (2 if same else 1) + 16 * n  # partial bytes per new row (products, signs)
    tile = max(1, int(MAX_PARTIAL_BYTES // max(1, per_new_row)))
    graphs, layout = [], []
    for c0 in range(0, len(new), tile):
        cols = new[c0: c0 + tile]
        full = first == 0 and len(cols) == n  # one symmetric product (syrk)
        p = Pass(run, run.params())
        p.chunk_slab_bytes = INDEX_CHUNK_SLAB_BYTES
        keys = {}
        if same:
            sel = None if full else np.concatenate([cols, n + cols])
            keys["x"] = p.index_gram(spaces["gg"], rows, rows, cols=sel, anchor=anchor)
        else:
            keys["g"] = p.index_gram(spaces["gg"], rows, (), cols=None if full else cols)
            keys["w"] = p.index_gram(spaces["vv"], (), rows, cols=None if full else cols, anchor=anchor)
        keys["s"] = p.index_signs(rows, cols=None if full else cols)
        graphs.append(p.graph()[0])
        layout.append((cols, keys))
    if progress is None:
        import sys

        progress = sys.stderr.isatty() and n * n >= 10**6
    results = compute(dask.delayed(_pack, pure=True)(*graphs), progress=bool(progress), scheduler=scheduler)
    out = {name: np.full((n, len(new)), np.nan) for name in ("gg", "vv", "gv", "gv_t", "sign_disagree", "sign_both")}
    for (cols, keys), res in zip(layout, results):
        j = cols - first
        if "x" in keys:
            x = res[keys["x"]]
            m = len(cols)
            out["gg"][:, j] = x[:n, :m]
            out["gv"][:, j] = x[:n, m:]  # <G_i, V_new>
            out["gv_t"][:, j] = x[n:, :m]  # <V_i, G_new> = gv[new, i]
            out["vv"][:, j] = x[n:, m:]
        else:
            out["gg"][:, j] = res[keys["g"]]
            out["vv"][:, j] = res[keys["w"]]
        s = res[keys["s"]]
        out["sign_disagree"][:, j] = s[0]
        out["sign_both"][:, j] = s[1]
    if not same:
        del out["gv"], out["gv_t"]
    return out


def _pack(*parts):
    return parts


def _build_band(run: Run, first: int, n: int, band: int, spaces: dict, anchor, progress, scheduler) -> dict:
    """Rows ``first..n-1`` against the ``band`` rows before each: ``{name: (n - first, band + 1)}``."""
    import dask

    from analysis.engine import Pass, compute

    same = "gv" in spaces
    step = max(1, BAND_PASS_ROWS - band)
    graphs, layout = [], []
    for r0 in range(first, n, step):
        r1 = min(n, r0 + step)
        p0 = max(0, r0 - band)
        rows = np.arange(p0, r1, dtype=np.int64)
        p = Pass(run, run.params())
        keys = {}
        if same:
            keys["x"] = p.index_band(spaces["gg"], rows, r0 - p0, band, anchor=anchor)
        else:
            keys["g"] = p.index_band(spaces["gg"], rows, r0 - p0, band, weight=False)
            keys["w"] = p.index_band(spaces["vv"], rows, r0 - p0, band, grad=False, anchor=anchor)
        keys["s"] = p.index_sign_band(rows, r0 - p0, band)
        graphs.append(p.graph()[0])
        layout.append((r0, r1, keys))
    if progress is None:
        import sys

        progress = sys.stderr.isatty() and (n - first) * (band + 1) >= 10**6
    results = compute(dask.delayed(_pack, pure=True)(*graphs), progress=bool(progress), scheduler=scheduler)
    names = ("gg", "gv", "vg", "vv", "sign_disagree", "sign_both")
    out = {name: np.full((n - first, band + 1), np.nan) for name in names}
    for (r0, r1, keys), res in zip(layout, results):
        i = slice(r0 - first, r1 - first)
        if "x" in keys:
            x = res[keys["x"]]
            for k, name in enumerate(("gg", "gv", "vg", "vv")):
                out[name][i] = x[k]
        else:
            out["gg"][i] = res[keys["g"]][0]
            out["vv"][i] = res[keys["w"]][3]
        s = res[keys["s"]]
        out["sign_disagree"][i] = s[0]
        out["sign_both"][i] = s[1]
    lag = np.arange(band + 1)[None, :]
    before = (np.arange(first, n)[:, None] - lag) < 0  # partner row i - l does not exist
    for name in names:
        out[name][before] = np.nan
    if not same:
        del out["gv"], out["vg"]
    return out


def _write(run: Run, parts: dict, first: int, n: int, band: int | None, spaces: dict, *, fresh: bool,
           seconds: float, anchor: np.ndarray, anchor_step: int) -> None:
    """Write the new rows (and, full layout, columns) and then the attribute that commits them."""
    import zarr

    kw = {"storage_options": run.storage_options} if run.storage_options else {}
    loc = _index_location(run)
    specs = fmt.index_specs(band)
    if fresh:
        root = zarr.open_group(run.location, mode="r+", use_consolidated=False, **kw)
        if fmt.INDEX_GROUP in root:
            del root[fmt.INDEX_GROUP]
        group = root.create_group(fmt.INDEX_GROUP)
        for spec in specs:
            if spec.name in ("gv", "vg") and "gv" not in spaces:
                continue
            group.create_array(spec.name, shape=spec.shape(n, band, len(anchor)), chunks=spec.chunks, dtype=spec.dtype,
                               fill_value=spec.fill_value, compressors=fmt.index_codecs(),
                               dimension_names=list(spec.dims), attributes={"meaning": spec.meaning})
    else:
        group = zarr.open_group(loc, mode="r+", use_consolidated=False, **kw)
        attrs = dict(group.attrs.asdict().get(fmt.INDEX_ATTR, {}))
        attrs["n_rows"] = first  # rows past `first` are being rewritten
        group.attrs[fmt.INDEX_ATTR] = attrs
        for spec in specs:
            if spec.name in group and spec.name != "anchor":
                group[spec.name].resize(spec.shape(n, band))
    no_grad = _no_grad(run, n)
    if fresh:
        group["anchor"][:] = anchor
    group["step"][first:n] = run.steps[first:n]
    group["check"][first:n] = _check_table(run, n)[first:n]
    new = np.arange(first, n)
    for name, vals in parts.items():
        if name == "gv_t":
            continue
        v = vals
        if name in ("gg", "gv", "vg", "sign_disagree", "sign_both"):
            v = vals.copy()
            if band is None:
                if name in ("gg", "sign_disagree", "sign_both"):
                    v[no_grad, :] = np.nan
                    v[:, no_grad[first:]] = np.nan
                elif name == "gv":
                    v[no_grad, :] = np.nan
            else:
                rows_ng = no_grad[first:]
                lag_ng = no_grad[np.clip(new[:, None] - np.arange(band + 1)[None, :], 0, None)]
                if name in ("gg", "sign_disagree", "sign_both"):
                    v[rows_ng, :] = np.nan
                    v[lag_ng] = np.nan
                elif name == "gv":
                    v[rows_ng, :] = np.nan
                else:  # wg: the gradient is the partner's (row i - l)
                    v[lag_ng] = np.nan
        if name.startswith("sign_"):
            v = np.where(np.isnan(v), -1, np.rint(v)).astype(np.int64)
        arr = group[name]
        if band is not None:
            arr[first:n, :] = v
            continue
        # full layout: columns new (all rows), and their mirror rows new (old columns)
        arr[:, first:n] = v
        if first:
            if name == "gv":
                mirror = parts["gv_t"][:first].T.copy()  # gv[new, old] = <G_new, V_old>
                mirror[no_grad[first:], :] = np.nan
            else:
                mirror = v[:first].T
            arr[first:n, :first] = mirror
    group.attrs[fmt.INDEX_ATTR] = {
        "version": fmt.INDEX_VERSION, "layout": "full" if band is None else "band", "band": band,
        "n_rows": int(n), "spaces": spaces, "built_seconds": round(float(seconds), 3), "anchor_step": anchor_step,
        "rows_computed": int(n - first),
        "definitions": "V_j = W_j - anchor; gg[i,j] = <G_i, G_j>, gv[i,j] = <G_i, V_j>, vv[i,j] = <V_i, V_j> "
                       "(full); band: [i, l] pairs rows i and i - l, vg[i, l] = <V_i, G_{i-l}>; "
                       "sign_disagree = #{G_i G_j < 0}, "
                       "sign_both = #{G_i != 0 and G_j != 0}; NaN / -1 where a row has no gradient",
    }


def index_sizes(rows=(10**3, 10**4, 10**5), band: int = 16) -> list[dict]:
    """Uncompressed bytes of full and banded indexes for some run lengths (README table)."""
    return [{"rows": int(t), "full_bytes": fmt.index_bytes(t), f"band{band}_bytes": fmt.index_bytes(t, band)}
            for t in rows]


def cancellation(s: np.ndarray, dist2: np.ndarray) -> np.ndarray:
    """Predicted relative error of ``||w_t - w*||^2`` from the expanded form:
    ``eps (K S / dist2 + F)``.

    ``S`` is the expanded sum taken over absolute values (``|VV_tt| + 2 |c|.|VV_ts| + ...``):
    each index entry is a float64 sum of d products with an error of a few ``eps`` times the
    size of its terms, and the subtraction turns that into a relative error ``S / dist2`` times
    larger. ``F`` is the floor that summation order alone leaves (index and pass sum the same
    products in different orders). K and F are measured (``benchmarks/index.py``; README).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.finfo(np.float64).eps * (RSI_ERROR_FACTOR * s / dist2 + RSI_ERROR_FLOOR)


#: K of :func:`cancellation`: about 3x the largest ratio of the error of the expanded form to
#: ``eps S / dist2`` that ``benchmarks/index.py`` measures where the cancellation dominates
#: (the README, "The query index", has the figures).
RSI_ERROR_FACTOR = 8.0
#: F of :func:`cancellation`: where nothing cancels (S / dist2 ~ 1) the index and the pass still
#: differ by summation order; F is about 4x the largest such difference ``benchmarks/index.py``
#: measures (README).
RSI_ERROR_FLOOR = 1024.0
#: The index answers a step's RSI/EB/gamma when the predicted relative error of its distance
#: (and gamma's absolute error) is below this; other steps are computed by a pass.
RSI_INDEX_RTOL = 1e-11
