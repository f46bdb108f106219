"""Stores in object storage: an S3-compatible server (moto) on 127.0.0.1, read through fsspec URLs.

The same metrics from ``s3://bucket/run.zarr`` as from the local copy, equal to float64
rounding (the slab plan does not depend on where the bytes come from, but which worker or
thread finishes first may change the order of a few float64 additions), on the threaded
scheduler, on a 2-process LocalCluster (each worker opens the remote arrays itself), through
a ``file://`` URL, and through the ``gradtrace`` command (``--storage-options`` or fsspec's
``FSSPEC_S3_*`` environment variables).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import analysis as ga
from analysis import engine
from analysis.store import zarrs_available
from tests.helpers_stores import delete_chunk, flip_chunk_byte, make_store

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from tests.helpers_s3 import moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server in a thread, a bucket holding a lossless and a sketch-tier store."""
    with moto_s3(BUCKET) as server:
        yield _with_stores(server, tmp_path_factory.mktemp("remote"))


def _with_stores(server, root):
    fs = server["fs"]
    # chunks of 64 entries: several chunks per row, so reads cross chunk boundaries (every chunk
    # is one request, about 10 ms each to this server)
    lossless = make_store(root / "run.zarr", steps=10, seed=31, param_chunk=64)
    sketch = make_store(root / "sketch.zarr", steps=6, tiers="sketch:64", seed=32, param_chunk=64,
                        shapes=(("big", (300,)), ("small", (9,))))
    for data in (lossless, sketch):
        fs.put(str(data.path), f"{BUCKET}/{data.path.name}", recursive=True)
    fs.invalidate_cache()
    return {**server, "lossless": lossless, "sketch": sketch}


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def results(run, ref) -> dict[str, np.ndarray]:
    """corr matrix, lag series, sign shift (matrix and lag), RSI (final and a new reference)."""
    return {
        "corr": ga.corr_matrix(run).values,
        "lag1": ga.lag_series(run, 1).values,
        "signs": ga.sign_shift_matrix(run).to_array().values,
        "sign_lag1": ga.sign_shift_lag(run, 1).to_array().values,
        "rsi_final": ga.rsi(run).to_array().values,
        "rsi_new": ga.rsi(run, reference=ref).to_array().values,
        "rsi_fc": ga.rsi(run, reference=slice(2, 4), params="fc*").to_array().values,
    }


def sketch_results(run) -> dict[str, np.ndarray]:
    return {
        "corr": ga.corr_matrix(run).values,
        "sign_lag1": ga.sign_shift_lag(run, 1).to_array().values,
        "rsi": ga.rsi(run).to_array().values,
    }


def assert_same(got: dict, want: dict) -> None:
    """Equal to float64 rounding: NaN where NaN, and within a few ulps of the largest value.

    Not bit for bit: under load the threads or workers finish in another order and a float64
    sum may be formed in another order (one ulp, 3.6e-15, was seen on a busy machine).
    """
    assert got.keys() == want.keys()
    for k in want:
        w = np.asarray(want[k], dtype=np.float64)
        scale = np.nanmax(np.abs(w)) if np.isfinite(w).any() else 1.0
        np.testing.assert_allclose(got[k], w, rtol=1e-12, atol=1e-13 * scale, equal_nan=True, err_msg=k)


@pytest.fixture
def many_slabs(monkeypatch):
    """One storage chunk per slab task: many tasks, many reads."""
    monkeypatch.setattr(engine, "SLAB_BYTES", 1)


def test_s3_equals_local(s3):
    data, sketch = s3["lossless"], s3["sketch"]
    ref = np.random.default_rng(5).standard_normal(data.d)
    run = ga.open_run(url("run.zarr"), storage_options=s3["opts"])
    assert not run.use_zarrs  # zarrs reads local files only; remote chunks go through zarr-python
    assert run.n_params == data.d and len(run.grad_steps) == 10 and run.final_step == 10
    np.testing.assert_array_equal(run.ds.grad.values[:10], data.grads)
    assert_same(results(run, ref), results(ga.open_run(data.path), ref))
    sk = ga.open_run(url("sketch.zarr"), storage_options=s3["opts"])
    assert_same(sketch_results(sk), sketch_results(ga.open_run(sketch.path)))


def test_s3_info(s3):
    from analysis.summary import store_info

    run = ga.open_run(url("run.zarr"), storage_options=s3["opts"])
    info = store_info(run)  # what the report writes; it used to reopen the URL without the options
    local = store_info(s3["lossless"].path)
    assert info["path"] == url("run.zarr")
    for k in ("n_gradient_steps", "final_iterate_step", "n_params", "data_bytes_on_disk", "layers"):
        assert info[k] == local[k], k
    assert info == store_info(url("run.zarr"), storage_options=s3["opts"])


def test_s3_missing_store(s3):
    with pytest.raises(ga.NotAStoreError, match="not a gradtrace run store"):
        ga.open_run(url("nothing.zarr"), storage_options=s3["opts"])


def test_file_url_equals_path(s3):
    data = s3["lossless"]
    ref = np.random.default_rng(6).standard_normal(data.d)
    run = ga.open_run(data.path.resolve().as_uri())
    assert run.use_zarrs == zarrs_available()  # a file:// URL is read as a local path
    assert_same(results(run, ref), results(ga.open_run(data.path), ref))


@pytest.mark.slow
def test_s3_on_localcluster(s3, many_slabs):
    distributed = pytest.importorskip("distributed")
    data, sketch = s3["lossless"], s3["sketch"]
    ref = np.random.default_rng(7).standard_normal(data.d)
    local = results(ga.open_run(data.path), ref)
    local_sketch = sketch_results(ga.open_run(sketch.path))
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            distributed.Client(cl):
        with distributed.get_task_stream() as stream:
            remote = results(ga.open_run(url("run.zarr"), storage_options=s3["opts"]), ref)
            remote_sketch = sketch_results(ga.open_run(url("sketch.zarr"), storage_options=s3["opts"]))
    ran = [t for t in stream.data if "_slab_task" in str(t["key"])]
    assert len({t["worker"] for t in ran}) == 2  # both worker processes read from the server
    assert_same(remote, local)
    assert_same(remote_sketch, local_sketch)


def gradtrace(*args, env=None):
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    e.pop("GRADTRACE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "gradtrace.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=120)
    assert p.returncode == 0, f"gradtrace {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}"
    return p


@pytest.mark.slow
def test_cli_storage_options(s3, tmp_path):
    data = s3["lossless"]
    opts = json.dumps(s3["opts"])
    info = json.loads(gradtrace("info", url("run.zarr"), "--json", "--storage-options", opts).stdout)
    assert info["n_gradient_steps"] == 10 and info["n_params"] == data.d and info["data_bytes_on_disk"] > 0
    gradtrace("corr", url("run.zarr"), "--storage-options", opts, "-o", tmp_path / "corr.nc")
    with xr.open_dataarray(tmp_path / "corr.nc") as got:
        np.testing.assert_allclose(got.values, ga.corr_matrix(data.path).values, rtol=1e-12, atol=1e-13)
    # fsspec's own environment variables reach the store without the flag
    env = {"FSSPEC_S3_ENDPOINT_URL": s3["endpoint"], "FSSPEC_S3_KEY": "testing", "FSSPEC_S3_SECRET": "testing"}
    gradtrace("signs", url("run.zarr"), "--lag", "1", "-o", tmp_path / "signs.nc", env=env)
    with xr.open_dataset(tmp_path / "signs.nc") as got:
        np.testing.assert_array_equal(got.sign_shift.values, ga.sign_shift_lag(data.path, 1).sign_shift.values)


def test_cli_bad_storage_options():
    from gradtrace.cli import UserError, parse_storage_options

    assert parse_storage_options(None) is None
    assert parse_storage_options('{"anon": true}') == {"anon": True}
    for bad in ("{anon: true}", "[1, 2]"):
        with pytest.raises(UserError, match="--storage-options"):
            parse_storage_options(bad)


def test_damaged_remote_chunks_are_errors(s3, tmp_path):
    """A missing or flipped chunk in object storage is an error naming it, as on a local disk
    (the missing-chunk check asks the store only about spans that read as the fill value).
    The stores are sharded (as recorded to a local disk, then uploaded): the damage is done to
    a local copy, chunk by chunk inside the shard files, before the upload."""
    import shutil

    fs, opts = s3["fs"], s3["opts"]
    copies = {}
    for name, data in (("dmg.zarr", s3["lossless"]), ("dmgsk.zarr", s3["sketch"])):
        copies[name] = tmp_path / name
        shutil.copytree(data.path, copies[name])
    delete_chunk(copies["dmg.zarr"], "grad", 3, 1)
    flip_chunk_byte(copies["dmgsk.zarr"], "grad_signbits", 2, 0, 10**6, 0x20)
    delete_chunk(copies["dmgsk.zarr"], "grad_nonzero", 4, 0)
    for name, local in copies.items():
        fs.put(str(local), f"{BUCKET}/{name}", recursive=True)
    fs.invalidate_cache()
    with pytest.raises(ga.DamagedStoreError, match=r"'grad' is damaged at step 3.*missing"):
        ga.corr_matrix(ga.open_run(url("dmg.zarr"), storage_options=opts))
    run = ga.open_run(url("dmgsk.zarr"), storage_options=opts)
    with pytest.raises(ga.DamagedStoreError, match=r"'grad_(signbits|nonzero)' is damaged at step [24]"):
        ga.sign_shift_matrix(run)
