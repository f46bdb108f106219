"""The fused row kernels of the analysis (analysis.kernels) against plain float64 numpy, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import kernels
from tests.helpers_kernels import kernel_data, use_backend


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    """Run a test on the compiled kernels and again on the numpy fallback."""
    return use_backend(kernels, request.param, monkeypatch)


_data = kernel_data


def test_ref_dist_matches_float64_numpy(backend):
    rng = np.random.default_rng(0)
    w2, g2 = _data(rng), _data(rng)
    r = rng.standard_normal(w2.shape[1])
    wi, gi = np.array([0, 3, 6, 3]), np.array([1, 1, 5, 2])
    for a, b in [(0, w2.shape[1]), (17, 2048), (5, 5)]:
        out = np.zeros((2, len(wi)))
        kernels.ref_dist(w2, g2, wi, gi, r[a:b], a, b, out)
        for k in range(len(wi)):
            diff = w2[wi[k], a:b].astype(np.float64) - r[a:b]
            want = [np.sum(diff * diff), np.sum(g2[gi[k], a:b].astype(np.float64) * diff)]
            np.testing.assert_allclose(out[:, k], want, rtol=1e-12, atol=1e-300)


def test_pair_dots_adds_float64_products(backend):
    rng = np.random.default_rng(1)
    x = _data(rng)
    ia, ib = np.array([0, 1, 2, 6]), np.array([1, 2, 2, 0])
    out = np.full(len(ia), 1.5)  # the kernels add to what is there
    kernels.pair_dots(x, ia, ib, 100, 2900, out)
    want = [1.5 + np.sum(x[i, 100:2900].astype(np.float64) * x[j, 100:2900].astype(np.float64)) for i, j in zip(ia, ib)]
    np.testing.assert_allclose(out, want, rtol=1e-12)


def test_sign_pairs_counts_exactly(backend):
    rng = np.random.default_rng(2)
    x = _data(rng)
    x[4, 10] = np.inf
    x[5, 11] = -np.inf
    ia, ib = np.array([0, 2, 3, 4, 2]), np.array([1, 3, 2, 5, 2])
    out = np.zeros((2, len(ia)))
    kernels.sign_pairs(x, ia, ib, 0, x.shape[1], out)
    for k, (i, j) in enumerate(zip(ia, ib)):
        s, t = np.sign(x[i].astype(np.float64)), np.sign(x[j].astype(np.float64))
        both = (s != 0) & (t != 0)
        assert out[0, k] == np.sum(both & (s != t))
        assert out[1, k] == np.sum(both)
    assert out[0, 4] == 0  # a row against itself never disagrees


def test_nan_makes_the_item_nan_and_stays_nan(backend):
    rng = np.random.default_rng(3)
    x = _data(rng)
    x[1, 50] = np.nan
    out = np.zeros((2, 2))
    kernels.sign_pairs(x, [0, 2], [1, 3], 0, 1000, out)
    kernels.sign_pairs(x, [0, 2], [1, 3], 1000, 3001, out)  # a later column range without NaN
    assert np.isnan(out[:, 0]).all() and np.isfinite(out[:, 1]).all()
    dots = np.zeros(2)
    kernels.pair_dots(x, [0, 2], [1, 3], 0, 3001, dots)
    assert np.isnan(dots[0]) and np.isfinite(dots[1])
    rd = np.zeros((2, 2))
    kernels.ref_dist(x, x, [1, 2], [0, 1], np.zeros(3001), 0, 3001, rd)
    assert np.isnan(rd[:, 0]).all() and np.isnan(rd[1, 1]) and np.isfinite(rd[0, 1])


def test_strided_views_give_the_same_bits_as_contiguous_copies(backend):
    rng = np.random.default_rng(4)
    base = _data(rng, cols=4000)
    view = base[:, 500:3500]  # not C-contiguous: the kernels copy the columns they need
    copy = np.ascontiguousarray(view)
    ia, ib = np.array([0, 1, 5]), np.array([1, 6, 5])
    o1, o2 = np.zeros(3), np.zeros(3)
    kernels.pair_dots(view, ia, ib, 10, 2990, o1)
    kernels.pair_dots(copy, ia, ib, 10, 2990, o2)
    assert np.array_equal(o1, o2)
    r = rng.standard_normal(2980)
    d1, d2 = np.zeros((2, 3)), np.zeros((2, 3))
    kernels.ref_dist(view, copy, ia, ib, r, 10, 2990, d1)
    kernels.ref_dist(copy, copy, ia, ib, r, 10, 2990, d2)
    assert np.array_equal(d1, d2)


def test_metrics_agree_between_backends(tmp_path, monkeypatch):
    """RSI, lag and sign-shift lag through the whole engine: numba and the numpy fallback."""
    from tests.helpers_stores import make_store

    import analysis as ga

    make_store(tmp_path / "s.zarr", steps=12, shapes=(("a", (40, 50)), ("b", (300,))), seed=5, param_chunk=512)
    run = ga.open_run(tmp_path / "s.zarr")

    def metrics():
        out = (ga.rsi(run), ga.lag_series(run, 2), ga.sign_shift_lag(run, 1))
        return [np.asarray(x.to_array() if hasattr(x, "data_vars") else x, dtype=float) for x in out]

    kernels._get()
    fast = metrics()
    monkeypatch.setattr(kernels, "_impl", kernels._NUMPY)
    monkeypatch.setattr(kernels, "BACKEND", "numpy")
    slow = metrics()
    for f, s in zip(fast, slow):
        np.testing.assert_allclose(f, s, rtol=1e-12, equal_nan=True)


def test_no_items_touch_no_rows(backend):
    """A row block can hold an op without items and without rows (its slab arrays are None)."""
    out2, out1 = np.zeros((2, 0)), np.zeros(0)
    kernels.ref_dist(None, None, [], [], np.zeros(0), 0, 10, out2)
    kernels.pair_dots(None, [], [], 0, 10, out1)
    kernels.sign_pairs(None, [], [], 0, 10, out2)
