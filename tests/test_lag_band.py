"""Exact lag correlations kept at capture (``Recorder(lag_band=L)``): ``grad_lag_dot`` equals
float64 dots of the recorded gradients, and lag series / mean correlations for lags <= L come
out exact and without a pass, for every tier, sketch included."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

import analysis as ga
from gradtrace_format import format as fmt
from gradtrace_format.format import StoreMismatchError
from capture import Recorder
from capture.recorder import lag_dots
from capture.writer import StoreWriter


def train_two(tmp_path, band=4, steps=14):
    """One training recorded twice: lossless, and sketch:16384 with a lag band."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 200), nn.ReLU(), nn.Linear(200, 80), nn.ReLU(), nn.Linear(80, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    grads = []
    with Recorder(model, tmp_path / "full.zarr", opt) as full, \
            Recorder(model, tmp_path / "sk.zarr", opt, tiers="sketch:1024", lag_band=band) as sk:
        for t in range(steps):
            x, y = torch.randn(64, 30, generator=g), torch.randint(0, 5, (64,), generator=g)
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().astype(np.float64))
            full.record(t, loss=loss)
            sk.record(t, loss=loss)
            opt.step()
            opt.zero_grad()
    return tmp_path / "full.zarr", tmp_path / "sk.zarr", np.array(grads)


def test_lag_band_makes_sketch_lag_series_exact(tmp_path):
    full, sk, G = train_two(tmp_path)
    band = xr.open_zarr(sk)["grad_lag_dot"].values
    for r in range(len(G)):
        for k in range(1, 5):
            want = G[r] @ G[r - k] if r - k >= 0 else np.nan
            np.testing.assert_allclose(band[r, k - 1], want, rtol=1e-12, equal_nan=True)
    assert np.isnan(band[len(G)]).all()  # the final iterate has no gradient
    for lag in (1, 2, 4):
        exact = ga.lag_series(full, lag)
        got = ga.lag_series(sk, lag)
        assert got.attrs["answered_by"] == "lag_band" and got.attrs["cosine_error_bound"] == 0.0
        np.testing.assert_allclose(got.values, exact.values, rtol=0, atol=1e-9)
        sketched = ga.lag_series(sk, lag, index=False)  # the sketch estimate is not exact
        assert sketched.attrs["answered_by"] == "pass" and np.abs(sketched.values - exact.values).max() > 1e-6
    m_full, m_sk = ga.mean_corr(full, h=5), ga.mean_corr(sk, h=5)
    assert m_sk.attrs["answered_by"] == "lag_band"
    np.testing.assert_allclose(m_sk.values, m_full.values, atol=1e-9)
    lag5 = ga.lag_series(sk, 5)  # beyond the band: the sketch pass answers
    assert lag5.attrs["answered_by"] == "pass"


def test_writer_lag_band_rows_without_gradient_resume_and_mismatch(tmp_path):
    tensors = fmt.tensor_table([("a", (7, 3)), ("b", (5,))])
    rng = np.random.default_rng(0)
    G = rng.standard_normal((6, 26)).astype(np.float32)
    w = rng.standard_normal(26).astype(np.float32)
    sw = StoreWriter(tmp_path / "s.zarr", tensors, lag_band=2)
    sw.append(0, G[0], w)
    sw.append(1, None, None, flags=fmt.FLAG_SKIPPED)
    sw.append(2, G[2], w)
    sw.append(3, G[3], w)
    sw.abort()
    band = np.asarray(xr.open_zarr(tmp_path / "s.zarr", consolidated=False)["grad_lag_dot"].values)[:4]
    g64 = G.astype(np.float64)
    np.testing.assert_allclose(band[2], [np.nan, g64[2] @ g64[0]], equal_nan=True, rtol=1e-12)
    np.testing.assert_allclose(band[3], [g64[3] @ g64[2], np.nan], equal_nan=True, rtol=1e-12)
    assert np.isnan(band[0]).all() and np.isnan(band[1]).all()
    with pytest.raises(StoreMismatchError, match="lag band"):
        StoreWriter(tmp_path / "s.zarr", tensors, mode="resume", lag_band=3)
    sw = StoreWriter(tmp_path / "s.zarr", tensors, mode="resume", lag_band=2)
    sw.append(4, G[4], w)  # the ring starts empty after a resume: NaN, never a wrong number
    sw.append(5, G[5], w)
    sw.close()
    band = np.asarray(xr.open_zarr(tmp_path / "s.zarr")["grad_lag_dot"].values)
    assert np.isnan(band[4]).all()
    np.testing.assert_allclose(band[5], [g64[5] @ g64[4], np.nan], equal_nan=True, rtol=1e-12)


def test_device_lag_dots_match_the_writer(tmp_path):
    rng = np.random.default_rng(3)
    G = rng.standard_normal((4, 1000)).astype(np.float32)
    ring = []
    for r in range(4):
        g = torch.from_numpy(G[r])
        got = lag_dots(g, ring, 3).numpy()
        want = [float(G[r].astype(np.float64) @ G[r - k].astype(np.float64)) if r - k >= 0 else np.nan
                for k in (1, 2, 3)]
        np.testing.assert_allclose(got, want, rtol=1e-12, equal_nan=True)
        ring = (ring + [g.clone()])[-3:]


@pytest.mark.cuda
def test_device_lag_dots_on_cuda():
    rng = np.random.default_rng(4)
    G = rng.standard_normal((3, 5000)).astype(np.float32)
    ring = [torch.from_numpy(G[0]).cuda(), torch.from_numpy(G[1]).cuda()]
    got = lag_dots(torch.from_numpy(G[2]).cuda(), ring, 2).cpu().numpy()
    g64 = G.astype(np.float64)
    np.testing.assert_allclose(got, [g64[2] @ g64[1], g64[2] @ g64[0]], rtol=1e-12)
