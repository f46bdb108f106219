"""Correlation metrics against slow float64 loops, plus their mathematical properties."""

import numpy as np
import pytest

import analysis as ga
from analysis import blockops, engine
from tests.helpers_stores import count_decodes, make_store, slow_corr, slow_corr_matrix

TOL = 1e-10


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("corr")
    out = {tier: make_store(base / f"{tier.split(':')[0]}.zarr", steps=12, tiers=tier, seed=1)
           for tier in ("lossless", "rounded:7", "sketch:64")}
    out["sparse"] = make_store(base / "sparse.zarr", steps=[0, 1, 2, 3, 10, 20, 21, 30], seed=2)
    g = out["lossless"].grads.copy()
    g[3] = 0.0  # an all-zero gradient
    g[6, 5] = np.nan  # a non-finite gradient (flagged by the writer)
    out["special"] = make_store(base / "special.zarr", steps=12, grads=g, weights=out["lossless"].weights)
    return out


def check_corr_properties(c):
    v = c.values
    ok = ~np.isnan(np.diag(v))
    sub = v[np.ix_(ok, ok)]
    np.testing.assert_array_equal(sub, sub.T)
    np.testing.assert_array_equal(np.diag(sub), 1.0)
    assert (np.abs(sub) <= 1.0).all()


@pytest.mark.parametrize("tier", ["lossless", "rounded:7"])
def test_corr_matrix_matches_slow_dense(stores, tier):
    d = stores[tier]
    c = ga.corr_matrix(d.path)
    assert c.dims == ("step_i", "step_j") and list(c["step_i"].values) == list(d.steps)
    np.testing.assert_allclose(c.values, slow_corr_matrix(d.grads), atol=TOL, rtol=0)
    check_corr_properties(c)
    assert c.attrs["tier"] == tier.split(":")[0]
    if tier.startswith("rounded"):
        # against the exact (unrounded) gradients, within the stated bound
        err = np.abs(c.values - slow_corr_matrix(d.raw_grads)).max()
        assert 0 < err <= c.attrs["cosine_error_bound"] and c.attrs["max_rel_error"] == 2.0**-8


def test_corr_matrix_sketch_tier(stores):
    d = stores["sketch:64"]
    c = ga.corr_matrix(d.path)
    np.testing.assert_allclose(c.values, slow_corr_matrix(d.grad_sketch), atol=TOL, rtol=0)
    check_corr_properties(c)
    assert c.attrs["tier"] == "sketch" and c.attrs["sketch_k"] > 0
    assert "sqrt((1 + cos^2) / sketch_k)" in c.attrs["error_note"]
    # a group made of exactly stored (small) tensors is exact
    small = ga.corr_matrix(d.path, params="fc1.bias")
    np.testing.assert_allclose(small.values, slow_corr_matrix(d.raw_grads[:, d.tensor_slice("fc1.bias")]), atol=TOL)
    assert small.attrs["sketch_k"] == 0


def test_many_slabs_and_blocks_give_the_same_numbers(stores, monkeypatch):
    d = stores["lossless"]
    ref = ga.corr_matrix(d.path).values
    monkeypatch.setattr(engine, "SLAB_BYTES", 1)  # one storage chunk (16 params) per slab
    monkeypatch.setattr(blockops, "BLOCK_BYTES", 1)
    np.testing.assert_allclose(ga.corr_matrix(d.path).values, ref, atol=1e-14)
    np.testing.assert_allclose(ga.lag_series(d.path, 2).values, np.diagonal(ref, 2), atol=1e-14)


def test_param_group_restriction(stores):
    d = stores["lossless"]
    c = ga.corr_matrix(d.path, [2, 5, 7], params=["conv.bias", "fc2*"])
    cols = np.r_[d.tensor_slice("conv.bias"), d.tensor_slice("fc2.weight")]
    np.testing.assert_allclose(c.values, slow_corr_matrix(d.grads[[2, 5, 7]][:, cols]), atol=TOL)
    assert c.attrs["params"] == "conv.bias,fc2*" and c.attrs["n_params"] == 4 + 18


def test_zero_and_nonfinite_gradients_give_nan(stores):
    d = stores["special"]
    c = ga.corr_matrix(d.path).values
    for bad in (3, 6):
        assert np.isnan(c[bad]).all() and np.isnan(c[:, bad]).all()
    good = [i for i in range(12) if i not in (3, 6)]
    np.testing.assert_allclose(c[np.ix_(good, good)], slow_corr_matrix(d.grads[good]), atol=TOL)
    lag = ga.lag_series(d.path, 1)
    assert np.isnan(lag.sel(step=[2, 3, 5, 6]).values).all() and np.isfinite(lag.sel(step=[0, 7]).values).all()
    w = ga.corr_windows(d.path, h=3)
    assert np.isnan(w.sel(step=2).values[1]).all()  # step 3 is the middle of the window at 2


def test_float32_precision_mode(stores):
    d = stores["lossless"]
    fast = ga.corr_matrix(d.path, precision="float32")
    assert np.abs(fast.values - slow_corr_matrix(d.grads)).max() < 1e-5
    assert fast.attrs["precision"] == "float32"
    with pytest.raises(ValueError, match="precision"):
        ga.corr_matrix(d.path, precision="float16")


def test_window(stores):
    d = stores["lossless"]
    w = ga.corr_window(d.path, 4, h=5)
    assert list(w["step_i"].values) == [4, 5, 6, 7, 8] and w.attrs["h"] == 5
    np.testing.assert_allclose(w.values, slow_corr_matrix(d.grads[4:9]), atol=TOL)
    with pytest.raises(ga.StepNotFoundError, match="window at step 9 needs training steps 9..13"):
        ga.corr_window(d.path, 9, h=5)


def test_windows_at_every_step(stores):
    d = stores["lossless"]
    w = ga.corr_windows(d.path, h=4)
    assert w.dims == ("step", "offset_i", "offset_j") and w.sizes["step"] == 12
    for k in range(9):
        np.testing.assert_allclose(w.sel(step=k).values, slow_corr_matrix(d.grads[k: k + 4]), atol=TOL)
    last = w.sel(step=10).values  # steps 10, 11 recorded; 12 is the final iterate, 13 absent
    np.testing.assert_allclose(last[:2, :2], slow_corr_matrix(d.grads[10:12]), atol=TOL)
    assert np.isnan(last[2:]).all() and np.isnan(last[:, 2:]).all()


def test_lag_series(stores):
    d = stores["lossless"]
    s = ga.lag_series(d.path, 3)
    assert list(s["step"].values) == list(range(9)) and s.attrs["lag"] == 3
    np.testing.assert_allclose(s.values, [slow_corr(d.grads[t], d.grads[t + 3]) for t in range(9)], atol=TOL)
    assert "epoch" in s.coords and "loss" in s.coords
    multi = ga.lag_series(d.path, [1, 2, 11])
    assert multi.dims == ("lag", "step") and multi.shape == (3, 11)
    np.testing.assert_allclose(multi.sel(lag=2).values[:10], [slow_corr(d.grads[t], d.grads[t + 2]) for t in range(10)],
                               atol=TOL)
    assert np.isnan(multi.sel(lag=11).values[1:]).all()


def test_lags_count_training_steps_on_a_sparse_schedule(stores):
    d = stores["sparse"]  # steps 0 1 2 3 10 20 21 30
    s = ga.lag_series(d.path, 10)
    assert list(s["step"].values) == [0, 10, 20]
    g = dict(zip(d.steps.tolist(), d.grads))
    np.testing.assert_allclose(s.values, [slow_corr(g[0], g[10]), slow_corr(g[10], g[20]), slow_corr(g[20], g[30])],
                               atol=TOL)
    with pytest.raises(ga.LagNotAvailableError) as err:
        ga.lag_series(d.path, 5)
    assert "Available lags: 1, 2, 3, 7, 8, 9, 10" in str(err.value)
    with pytest.raises(ga.LagNotAvailableError, match="h=5 needs h consecutive"):
        ga.mean_corr(d.path, h=5)


def test_mean_corr_eq3(stores):
    d = stores["lossless"]
    h = 4
    m = ga.mean_corr(d.path, h=h)
    assert m.attrs["h"] == h and list(m["step"].values) == list(range(12))
    for k in range(12):
        if k + h - 1 <= 11:
            want = np.mean([slow_corr(d.grads[k + i - 1], d.grads[k + i]) for i in range(1, h)])
            assert abs(m.sel(step=k).item() - want) < TOL
        else:
            assert np.isnan(m.sel(step=k).item())
    sparse = ga.mean_corr(stores["sparse"].path, h=3)
    assert np.isfinite(sparse.sel(step=[0, 1]).values).all() and np.isnan(sparse.sel(step=[2, 3, 10, 20]).values).all()
    with pytest.raises(ga.AnalysisError, match="h >= 2"):
        ga.mean_corr(d.path, h=1)


def test_progress_bar_on_request(stores, capsys):
    ga.corr_matrix(stores["lossless"].path, progress=True)
    assert "100% Completed" in capsys.readouterr().out


def test_slabs_narrower_than_a_chunk_when_rows_are_many(stores, monkeypatch):
    """Memory stays bounded for very many steps: a slab may be a fraction of a storage chunk."""
    d = stores["lossless"]
    monkeypatch.setattr(engine, "SLAB_BYTES", 12 * 4)  # 12 rows x 1 column of float32
    monkeypatch.setattr(engine, "CHUNK_SLAB_BYTES", 12 * 4 * 4)  # a one-chunk slab may hold 4 columns
    monkeypatch.setattr(engine, "MIN_SLAB_COLS", 4)
    run = ga.open_run(d.path)
    p = engine.Pass(run, run.params())
    p.gram(run.rows_of(d.steps))
    widths = {hi - lo for slab in p._slabs("param", 12, run.chunk_width("grad"), 4.0) for _, lo, hi in slab}
    assert max(widths) == 4  # chunk of 16 split in 4
    np.testing.assert_allclose(ga.corr_matrix(run).values, slow_corr_matrix(d.grads), atol=TOL)


def test_row_wise_passes_cut_rows_instead_of_chunks(stores, monkeypatch):
    """Lag pairs need no two rows together beyond their own: with many rows the pass keeps
    slabs one chunk wide and cuts the rows into blocks (each block holding ~SLAB_BYTES), so
    every chunk is decoded once, not once per fraction of the chunk as a Gram pass must."""
    d = stores["lossless"]  # 12 steps
    run = ga.open_run(d.path)
    cw = run.chunk_width("grad")
    n_chunks = -(-d.d // cw)
    monkeypatch.setattr(engine, "SLAB_BYTES", 4 * cw * 4)  # 4 rows of one chunk
    monkeypatch.setattr(engine, "CHUNK_SLAB_BYTES", 4 * cw * 4)
    monkeypatch.setattr(engine, "MIN_SLAB_COLS", 4)
    decodes, reads = count_decodes(monkeypatch)
    np.testing.assert_allclose(ga.corr_matrix(run).values, slow_corr_matrix(d.grads), atol=TOL)
    assert max(decodes.values()) == 4  # the Gram pass reads quarter chunks: each decoded 4 times
    decodes.clear()
    reads.clear()
    lag = ga.lag_series(run, 1)
    np.testing.assert_allclose(lag.values, [slow_corr(d.grads[t], d.grads[t + 1]) for t in range(11)], atol=TOL)
    # whole chunks, at most 4 rows per read
    assert all(n <= 4 and lo % cw == 0 and (hi - lo == cw or hi == d.d) for _, n, lo, hi in reads)
    assert set(decodes) == {("grad", r, c) for r in range(12) for c in range(n_chunks)}
    # blocks of first rows 0-2, 3-5, 6-8, 9-11: rows 3, 6, 9 are also the partners of the
    # previous block's last pair, read twice; every other chunk is decoded once
    assert {r for (_, r, _), k in decodes.items() if k == 2} == {3, 6, 9} and max(decodes.values()) == 2
    # several lags and windows (pairs further apart, norms) in blocks: the same numbers
    multi = ga.lag_series(run, [1, 3, 5])
    for lg in (1, 3, 5):
        np.testing.assert_allclose(multi.sel(lag=lg).values[: 12 - lg],
                                   [slow_corr(d.grads[t], d.grads[t + lg]) for t in range(12 - lg)], atol=TOL)
    w = ga.corr_windows(run, h=4)
    for k in range(9):
        np.testing.assert_allclose(w.sel(step=k).values, slow_corr_matrix(d.grads[k: k + 4]), atol=TOL)
    mean = ga.mean_corr(run, h=3).values
    np.testing.assert_allclose(mean[:10], [np.mean([slow_corr(d.grads[k + i], d.grads[k + i + 1]) for i in range(2)])
                                           for k in range(10)], atol=TOL)
