"""Saving analysis results (labelled xarray objects) as ``.csv``, ``.json``, ``.nc`` or ``.zarr``.

The format follows the file extension. JSON holds ``{"name", "dims", "coords", "data",
"attrs"}`` for each variable, with NaN written as ``null`` so that any JSON reader takes it.
netCDF cannot store nested attributes, so dict/list attributes are written as JSON strings.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import xarray as xr

SUFFIXES = (".csv", ".json", ".nc", ".zarr")


def _plain(v):
    """numpy scalars/arrays to JSON-able Python values, NaN/Inf to None."""
    if isinstance(v, np.ndarray):
        return [_plain(x) for x in v.tolist()] if v.ndim else _plain(v.item())
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (np.str_, bytes)):
        return str(v)
    return v


def to_jsonable(result: xr.Dataset | xr.DataArray) -> dict:
    """A JSON-ready dict of a result: every variable with its dims, coords, data and attrs."""
    ds = result.to_dataset(name=result.name or "value") if isinstance(result, xr.DataArray) else result
    out = {"attrs": _plain(dict(ds.attrs)), "coords": {}, "data_vars": {}}
    for name, c in ds.coords.items():
        out["coords"][str(name)] = {"dims": list(c.dims), "data": _plain(np.asarray(c.values))}
    for name, v in ds.data_vars.items():
        out["data_vars"][str(name)] = {
            "dims": list(v.dims),
            "data": _plain(np.asarray(v.values)),
            "attrs": _plain(dict(v.attrs)),
        }
    return out


def _netcdf_attrs(attrs: dict) -> dict:
    out = {}
    for k, v in attrs.items():
        if isinstance(v, (dict, list, tuple)) or v is None or isinstance(v, bool):
            out[k] = json.dumps(_plain(v))
        elif isinstance(v, (np.bool_,)):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def _netcdf_ready(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = _netcdf_attrs(dict(ds.attrs))
    for name in list(ds.variables):
        var = ds[name]
        var.attrs = _netcdf_attrs(dict(var.attrs))
        if var.dtype.kind in ("U", "T", "O"):
            ds[name] = var.astype(str)
    return ds


#: Root attribute of a ``.zarr`` result written by :func:`save_result` (``force`` may replace it).
RESULT_MARK = "gradtrace_result"


def _is_result_zarr(path: Path) -> bool:
    try:
        doc = json.loads((path / "zarr.json").read_bytes())
    except (OSError, ValueError):
        return False
    attrs = doc.get("attributes") or {} if isinstance(doc, dict) else {}
    return bool(attrs.get(RESULT_MARK)) and "gradtrace" not in attrs


def check_output(path: "str | Path", force: bool = False) -> None:
    """Refuse to replace what exists at ``path``: anything without ``force``; with ``force``
    a regular file, or a ``.zarr`` result that :func:`save_result` wrote, and nothing else
    (never a run store, a symlink, or a directory it did not write).

    Raises:
        FileExistsError: naming the path and why.
    """
    path = Path(path)
    if not (path.exists() or path.is_symlink()):
        return
    if not force:
        raise FileExistsError(f"{path} already exists: choose another output path, or pass --force "
                              "(force=True) to replace a result written before")
    if path.is_symlink():
        raise FileExistsError(f"{path} is a symlink: refusing to replace it, even with --force")
    if path.is_dir():
        if (path / "zarr.json").exists() and not _is_result_zarr(path):
            raise FileExistsError(f"{path} is a Zarr store that save_result did not write (a run store?): "
                                  "refusing to replace it, even with --force")
        if not _is_result_zarr(path):
            raise FileExistsError(f"{path} is a directory that gradtrace did not write: refusing to replace it, "
                                  "even with --force")


def save_result(result: xr.Dataset | xr.DataArray, path: "str | Path", *, force: bool = False) -> Path:
    """Write a result to ``path``; the extension (.csv, .json, .nc, .zarr) picks the format.

    CSV is long format (one row per coordinate combination, one column per variable). The
    file (or ``.zarr`` directory) is written beside ``path`` and renamed into place, so a
    failure leaves nothing half-written. An existing ``path`` is replaced only with ``force``,
    and then only a regular file or a ``.zarr`` result written by this function
    (:func:`check_output`).

    Raises:
        ValueError: an unknown extension (the message lists the supported ones).
        FileExistsError: ``path`` exists (see :func:`check_output`).
    """
    import os
    import shutil

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"cannot write {path}: unknown extension {suffix or '(none)'!r}. Use one of {', '.join(SUFFIXES)}."
        )
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = result.to_dataset(name=result.name or "value") if isinstance(result, xr.DataArray) else result
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial{suffix}")
    try:
        if suffix == ".json":
            tmp.write_text(json.dumps(to_jsonable(ds), indent=1))
        elif suffix == ".csv":
            if not ds.data_vars:
                raise ValueError("the result has no data variables to write as CSV")
            df = ds.reset_coords().to_dataframe() if ds.dims else ds.to_pandas()
            df.to_csv(tmp)
        elif suffix == ".nc":
            _netcdf_ready(ds).to_netcdf(tmp, engine="h5netcdf")
        else:
            out = _netcdf_ready(ds)
            out.attrs[RESULT_MARK] = 1
            out.to_zarr(tmp, mode="w-", zarr_format=3, consolidated=False)
        if tmp.is_dir():
            old = None
            if path.exists():
                old = path.with_name(f".{path.name}.{os.getpid()}.old")
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    return path
