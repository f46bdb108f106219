"""Every result is a labelled xarray object that saves to netCDF and Zarr and reads back identical."""

import pytest
import xarray as xr

import analysis as ga
from tests.helpers_stores import make_store


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    d = make_store(tmp_path_factory.mktemp("results") / "run.zarr", steps=10)
    run = ga.open_run(d.path)
    r = ga.rsi(run)
    return {
        "corr": ga.corr_matrix(run), "windows": ga.corr_windows(run, 3), "lags": ga.lag_series(run, [1, 2]),
        "mean": ga.mean_corr(run, 3), "signs": ga.sign_shift_matrix(run), "sign_lag": ga.sign_shift_lag(run, 1),
        "rsi": r, "by_epoch": ga.by_epoch(r), "phases": ga.phases(run, 3), "layers": ga.layer_table(run),
        "balance": ga.balancedness(run),
    }


@pytest.mark.parametrize("name", ["corr", "windows", "lags", "mean", "signs", "sign_lag", "rsi", "by_epoch",
                                  "phases", "layers", "balance"])
def test_roundtrip_netcdf_and_zarr(results, name, tmp_path):
    res = results[name]
    ds = res if isinstance(res, xr.Dataset) else res.to_dataset(name=res.name)
    ds.to_netcdf(tmp_path / "r.nc", engine="h5netcdf")
    with xr.open_dataset(tmp_path / "r.nc", engine="h5netcdf") as back:
        xr.testing.assert_identical(back.load(), ds)
    ds.to_zarr(tmp_path / "r.zarr", mode="w", consolidated=False)
    xr.testing.assert_identical(xr.open_zarr(tmp_path / "r.zarr", consolidated=False).load(), ds)
    assert "tier" in ds.attrs or name in ("by_epoch", "balance") or "tier" in next(iter(ds.data_vars.values())).attrs
