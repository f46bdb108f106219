"""The query index (issue 15): build, incremental growth, band, rebuild, transparent use by every
analysis function, the RSI fallback, RSI against every recorded iterate, the CLI command.

Everything is checked against slow float64 numpy on stores from ``make_store`` (no torch).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import xarray as xr

import analysis as ga
from gradtrace_format import format as fmt
from analysis.index import RSI_INDEX_RTOL, build_index, cancellation, open_index
from capture.writer import StoreWriter
from tests.helpers_stores import dot, make_store, slow_corr, slow_rsi, slow_sign_shift

TOL = 1e-12  # index against the pass (same float64 products, another order of summation)
RSI_TOL = 1e-10


def _rows(data):
    """(G, W) float64 over store rows (the final iterate's gradient NaN), in the index's space."""
    if data.tiers["grad"].name == "sketch":
        g = data.grad_sketch.astype(np.float64)
        w = data.weight_sketch.astype(np.float64)
    else:
        g = data.grads.astype(np.float64)
        w = np.vstack([data.weights, data.final_weight[None]]).astype(np.float64)
    return np.vstack([g, np.full((1, g.shape[1]), np.nan)]), w


def _slow_products(data, anchor=None):
    """gg, gv, vv, disagree, both (n x n) with slow loops (fsum dots, coordinate counts);
    V = W - anchor (default the last weight row, as a fresh index takes it)."""
    G, W = _rows(data)
    W = W - (W[-1] if anchor is None else np.asarray(anchor, np.float64))
    signs = np.vstack([data.grads, np.zeros((1, data.d))])
    n = len(W)
    out = {k: np.full((n, n), np.nan) for k in ("gg", "gv", "vv", "sign_disagree", "sign_both")}
    for i in range(n):
        for j in range(n):
            out["vv"][i, j] = dot(W[i], W[j])
            if i < n - 1:
                out["gv"][i, j] = dot(G[i], W[j])
            if i < n - 1 and j < n - 1:
                out["gg"][i, j] = dot(G[i], G[j])
                a, b = signs[i].tolist(), signs[j].tolist()
                out["sign_disagree"][i, j] = sum((x < 0) != (y < 0) for x, y in zip(a, b) if x != 0 and y != 0)
                out["sign_both"][i, j] = sum(x != 0 and y != 0 for x, y in zip(a, b))
            else:
                out["sign_disagree"][i, j] = out["sign_both"][i, j] = -1
    return out


def _close(got, want, tol=TOL):
    got, want = np.asarray(got, float), np.asarray(want, float)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = np.isfinite(want)
    assert np.all(np.abs(got[ok] - want[ok]) <= tol * np.maximum(1.0, np.abs(want[ok]))), \
        np.max(np.abs(got[ok] - want[ok]))


@pytest.fixture(scope="module", params=["lossless", "rounded:7", "sketch:64"])
def indexed(request, tmp_path_factory):
    data = make_store(tmp_path_factory.mktemp("idx") / "run.zarr", steps=9, tiers=request.param, seed=5)
    res = build_index(data.path)
    return data, res


def test_full_index_matches_slow_numpy(indexed):
    data, res = indexed
    n = len(data.steps) + 1
    assert res["layout"] == "full" and res["n_rows"] == n and res["rows_computed"] == n
    idx = open_index(data.path)
    assert idx.n_valid == n and idx.band is None
    want = _slow_products(data)
    everything = np.arange(n)
    for name in want:
        _close(idx.block(name, everything), want[name])
    sketch = data.tiers["grad"].name == "sketch"
    assert idx.spaces["gg"] == ("sketch" if sketch else "param")
    assert idx.spaces["sign_both"] == ("bits" if sketch else "param")


def test_plain_xarray_reads_store_and_index(indexed):
    data, _ = indexed
    ds = xr.open_zarr(data.path)
    assert ds.sizes["step"] == len(data.steps) + 1
    ix = xr.open_zarr(data.path, group="index")
    assert ix["gg"].dims == ("index_row", "index_col") and ix["sign_both"].dtype == np.int64
    assert list(ix["step"].values) == list(ds["step"].values)
    assert ix.attrs[fmt.INDEX_ATTR]["layout"] == "full"
    meta = json.loads((data.path / "zarr.json").read_text())  # the closed store was reconsolidated
    assert "index/gg" in meta["consolidated_metadata"]["metadata"]
    info = ga.open_run(data.path)
    from analysis.summary import format_info, store_info

    text = format_info(store_info(info))
    assert "index:     every pair of rows, up to date" in text


def _both(f, *args, **kw):
    a = f(*args, index=None, **kw)
    b = f(*args, index=False, **kw)
    assert a.attrs["answered_by"] == "index", (f.__name__, a.attrs["answered_by"])
    assert b.attrs["answered_by"] == "pass"
    return a, b


def test_every_query_uses_the_index_and_equals_the_pass(indexed):
    data, _ = indexed
    run = ga.open_run(data.path)
    G, _ = _rows(data)
    a, b = _both(ga.corr_matrix, run)
    _close(a.values, b.values)
    want = np.array([[slow_corr(G[i], G[j]) for j in range(9)] for i in range(9)])
    _close(a.values, want)
    a, b = _both(ga.corr_window, run, 2, h=4)
    _close(a.values, b.values)
    a, b = _both(ga.lag_series, run, 1)
    _close(a.values, [slow_corr(G[t], G[t + 1]) for t in range(8)])
    _close(a.values, b.values)
    a, b = _both(ga.lag_series, run, [1, 3])
    _close(a.values, b.values)
    a, b = _both(ga.mean_corr, run, h=5)
    _close(a.values, b.values)
    a, b = _both(ga.corr_windows, run, h=3)
    _close(a.values, b.values)
    a, b = _both(ga.sign_shift_matrix, run)
    want = np.array([[slow_sign_shift(data.grads[i], data.grads[j])[0] for j in range(9)] for i in range(9)])
    _close(a.sign_shift.values, want)
    _close(a.zero_share.values, b.zero_share.values)
    a, b = _both(ga.sign_shift_lag, run, 2)
    _close(a.sign_shift.values, b.sign_shift.values)
    a, b = _both(ga.sign_shift_window, run, 1, h=3)
    _close(a.sign_shift.values, b.sign_shift.values)
    # a parameter group is not indexed: the pass answers, and index=True says why
    assert ga.lag_series(run, 1, params="fc1.*").attrs["answered_by"] == "pass"
    with pytest.raises(ga.AnalysisError, match="whole parameter vector"):
        ga.lag_series(run, 1, params="fc1.*", index=True)


@pytest.mark.parametrize("reference", ["final", 4, slice(2, 6)])
def test_rsi_from_the_index(indexed, reference):
    data, _ = indexed
    run = ga.open_run(data.path)
    a = ga.rsi(run, reference)
    b = ga.rsi(run, reference, index=False)
    assert a.attrs["answered_by"].startswith("index") and b.attrs["answered_by"] == "pass"
    for m in ("rsi", "eb", "gamma", "eta_star", "distance"):
        _close(a[m].values, b[m].values, RSI_TOL)
    if data.tiers["grad"].name == "lossless":  # against slow numpy (lossy tiers: ||G|| is the exact stored norm)
        W = np.vstack([data.weights, data.final_weight[None]]).astype(np.float64)
        ref = {"final": W[-1], 4: W[4]}.get(reference) if not isinstance(reference, slice) else W[2:7].mean(0)
        for t in range(9):
            want = slow_rsi(data.grads[t], data.weights[t], ref)
            for m in ("rsi", "gamma", "distance"):
                got = float(a[m].values[t])
                assert (math.isnan(want[m]) and math.isnan(got)) or abs(got - want[m]) <= RSI_TOL * max(1, abs(want[m]))


def test_vector_reference_runs_the_pass(indexed):
    data, _ = indexed
    vec = np.random.default_rng(1).standard_normal(data.d)
    assert ga.rsi(data.path, vec).attrs["answered_by"] == "pass"


def _close_weights(tmp_path, T=8):
    """A store whose iterates approach w_7 geometrically while the final iterate (the index's
    anchor) lies far away: the expanded form of ||w_t - w_7||^2 loses up to ~12 digits."""
    shapes = (("a", (40,)), ("b", (24,)))
    d = 64
    rng = np.random.default_rng(7)
    c = rng.standard_normal(d).astype(np.float32)
    scales = np.r_[np.logspace(0, -6, T - 1), 0.0]
    W = np.stack([c + (s * rng.standard_normal(d)).astype(np.float32) for s in scales]).astype(np.float32)
    G = rng.standard_normal((T, d)).astype(np.float32)
    far = (c + 10 * rng.standard_normal(d)).astype(np.float32)
    return make_store(tmp_path / "close.zarr", steps=T, shapes=shapes, grads=G, weights=W, final_weight=far)


def test_rsi_falls_back_to_the_pass_where_the_expanded_form_loses_digits(tmp_path):
    data = _close_weights(tmp_path)
    build_index(data.path)
    run = ga.open_run(data.path)
    idx = open_index(run)
    rows = np.arange(7)
    ref = data.weights[7].astype(np.float64)
    # the expanded form alone is wrong by far more than the tolerance on the steps near w_7...
    vv = idx.block("vv", np.arange(8))
    expanded = np.diag(vv)[:7] - 2 * vv[:7, 7] + vv[7, 7]
    direct = np.array([dot(data.weights[t] - ref, data.weights[t] - ref) for t in rows])
    rel = np.abs(expanded - direct) / direct
    assert rel.max() > 1e-8
    # ... and the cancellation estimate (K eps S / dist2) bounds the error that is there
    s = np.diag(vv)[:7] + 2 * np.abs(vv[:7, 7]) + vv[7, 7]
    assert np.all(rel <= cancellation(s, direct))
    r = ga.rsi(run, 7)
    assert r.attrs["answered_by"] == "index+pass" and 0 < r.attrs["pass_steps"] < 7
    for t in rows:
        want = slow_rsi(data.grads[t], data.weights[t], ref)
        for m in ("rsi", "gamma", "distance"):
            assert abs(float(r[m].values[t]) - want[m]) <= RSI_TOL * max(1.0, abs(want[m]))
    assert np.isnan(r["rsi"].values[7]) and r["zero_distance"].values[7]  # the reference itself
    # the steps the index answered are accurate; the flagged ones are the close ones
    from analysis.rsi import rsi_products_from_index

    gg = run.per_tensor_scalar("grad_sqnorm", rows, run.params())
    d2, _, todo = rsi_products_from_index(idx, rows, np.array([7]), np.ones(1), gg)
    assert todo.sum() == r.attrs["pass_steps"] and todo[-1] and not todo[0]
    assert np.all(np.abs(d2[~todo] - direct[~todo]) <= RSI_INDEX_RTOL * direct[~todo])
    assert ga.rsi(run, 7, index=False).attrs["answered_by"] == "pass"


def test_band_index(tmp_path):
    data = make_store(tmp_path / "run.zarr", steps=12, seed=8)
    res = build_index(data.path, band=3)
    assert res["layout"] == "band" and res["band"] == 3
    idx = open_index(data.path)
    want = _slow_products(data)
    n = 13
    i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    near = np.abs(i - j) <= 3
    for name in want:
        _close(idx.pairs(name, i[near], j[near]), want[name][near])
    ix = xr.open_zarr(data.path, group="index")
    assert ix["gg"].shape == (13, 4) and ix["gg"].dims == ("index_row", "index_lag") and "vg" in ix
    np.testing.assert_array_equal(ix["anchor"].values, data.final_weight.astype(np.float64))
    run = ga.open_run(data.path)
    for lag in (1, 3):
        a, b = _both(ga.lag_series, run, lag)
        _close(a.values, b.values)
    a, b = _both(ga.mean_corr, run, h=4)
    _close(a.values, b.values)
    a, b = _both(ga.sign_shift_lag, run, 3)
    _close(a.sign_shift.values, b.sign_shift.values)
    a, b = _both(ga.corr_window, run, 5, h=4)
    _close(a.values, b.values)
    # beyond the band the pass answers (index=True: an error that says how to widen it)
    assert ga.lag_series(run, 4).attrs["answered_by"] == "pass"
    assert ga.mean_corr(run, h=5).attrs["answered_by"] == "index"  # adjacent pairs only: lag 1
    assert ga.corr_matrix(run).attrs["answered_by"] == "pass"
    with pytest.raises(ga.AnalysisError, match="--band"):
        ga.lag_series(run, 4, index=True)
    with pytest.raises(ga.AnalysisError, match="full query index"):
        ga.rsi_all_references(run)
    with pytest.raises(ga.AnalysisError, match="rebuild"):
        build_index(data.path, band=5)
    assert build_index(data.path, band=5, rebuild=True)["rows_computed"] == n


def _grow(data, tmp_path, T2, band=None):
    """Resume ``data``'s store with StoreWriter and append steps T1..T2-1 and a new final."""
    rng = np.random.default_rng(11)
    T1 = len(data.steps)
    G = rng.standard_normal((T2 - T1, data.d)).astype(np.float32)
    G[rng.random(G.shape) < 0.2] = 0
    W = (data.final_weight + 0.1 * np.cumsum(rng.standard_normal((T2 - T1, data.d)), 0)).astype(np.float32)
    W[0] = data.final_weight  # the run resumes from its final iterate
    wfin = (W[-1] - 0.1 * G[-1]).astype(np.float32)
    w = StoreWriter(data.path, data.tensors, data.tiers, mode="resume", param_chunk=16)
    for k in range(T2 - T1):
        w.append(T1 + k, G[k], W[k], loss=1.0, lr=0.1, epoch=0)
    w.close(final_weight=wfin)
    data.grads = np.vstack([data.grads, G])
    data.weights = np.vstack([data.weights, W])
    data.final_weight = wfin
    data.steps = np.arange(T2)
    return data


@pytest.mark.parametrize("band", [None, 2])
def test_incremental_growth(tmp_path, band):
    data = make_store(tmp_path / "run.zarr", steps=6, seed=9)
    build_index(data.path, band=band)
    anchor = data.final_weight.copy()  # the last row when the index was first built
    data = _grow(data, tmp_path, 10)
    run = ga.open_run(data.path)
    idx = open_index(run)
    # the old final-iterate row (row 6) was rewritten by the resumed run: rows 0..5 stay valid
    assert idx.n_valid == 6 and idx.describe()["up_to_date"] is False
    assert ga.lag_series(run, 1, steps=slice(0, 4)).attrs["answered_by"] == "index"
    assert ga.lag_series(run, 1).attrs["answered_by"] == "pass"  # reaches rows past the index
    res = build_index(run)  # keeps the layout, computes only rows 6..10
    assert res["rows_computed"] == 5 and res["band"] == band
    idx = open_index(data.path)
    assert idx.n_valid == 11 and idx.attrs["anchor_step"] == 6
    want = _slow_products(data, anchor)
    i, j = np.meshgrid(np.arange(11), np.arange(11), indexing="ij")
    keep = np.ones_like(i, bool) if band is None else np.abs(i - j) <= band
    for name in want:
        _close(idx.pairs(name, i[keep], j[keep]), want[name][keep])
    assert build_index(data.path)["rows_computed"] == 0  # up to date: nothing to do
    assert build_index(data.path, rebuild=True)["rows_computed"] == 11


def test_interrupted_build_keeps_old_rows(tmp_path):
    data = make_store(tmp_path / "run.zarr", steps=6, seed=10)
    build_index(data.path)
    import zarr

    g = zarr.open_group(str(data.path / "index"), mode="r+")
    attrs = dict(g.attrs[fmt.INDEX_ATTR])
    attrs["n_rows"] = 4  # as a build that stopped before its commit would leave it
    g.attrs[fmt.INDEX_ATTR] = attrs
    assert open_index(data.path).n_valid == 4
    assert build_index(data.path)["rows_computed"] == 3


def test_damaged_index_chunk_fails_loudly(tmp_path):
    data = make_store(tmp_path / "run.zarr", steps=4, seed=12)
    build_index(data.path)
    chunk = next(p for p in (data.path / "index" / "gg").rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(Exception):  # CRC32C mismatch (or a Blosc error): never silent numbers
        open_index(data.path).block("gg", np.arange(5))


def _slow_pairs(G, W, steps, refs):
    out = {m: np.full((len(steps), len(refs)), np.nan) for m in ("rsi", "eb", "gamma", "distance")}
    for a, t in enumerate(steps):
        for b, s in enumerate(refs):
            r = slow_rsi(G[t], W[t], W[s])
            for m in out:
                out[m][a, b] = r[m]
    return out


def test_rsi_all_references_and_never_turns_away(tmp_path):
    rng = np.random.default_rng(13)
    T, d = 10, 30
    G = rng.standard_normal((T, d)).astype(np.float32)
    W = np.cumsum(rng.standard_normal((T, d)), 0).astype(np.float32)
    W[7] = W[6] + np.float32(1e-6) * rng.standard_normal(d).astype(np.float32)  # a near pair: fallback
    data = make_store(tmp_path / "run.zarr", steps=T, shapes=(("a", (d,)),), grads=G, weights=W)
    build_index(data.path)
    pairs = ga.rsi_all_references(data.path)
    Wall = np.vstack([data.weights, data.final_weight[None]])
    want = _slow_pairs(data.grads, Wall, range(T), range(T + 1))
    assert pairs["gamma"].dims == ("step", "reference") and pairs.sizes["reference"] == T + 1
    for m in want:
        got = pairs[m].values
        assert np.array_equal(np.isnan(got), np.isnan(want[m]))
        ok = np.isfinite(want[m])
        assert np.all(np.abs(got[ok] - want[m][ok]) <= RSI_TOL * np.maximum(1, np.abs(want[m][ok])))
    assert pairs.attrs["answered_by"] == "index+pass" and pairs["by_pass"].values[6, 7]
    # the column of the final iterate is rsi(run)
    r = ga.rsi(data.path, index=False)
    _close(pairs["gamma"].sel(reference=T).values, r["gamma"].values, RSI_TOL)
    # fallback=False: the near pairs are NaN and marked
    raw = ga.rsi_all_references(data.path, fallback=False)
    assert raw["inexact"].values[6, 7] and np.isnan(raw["rsi"].values[6, 7])
    # the rule, slow: s qualifies when RSI(t, s) > 0 for all t < s (and some t < s exists)
    ntw = ga.never_turns_away(pairs)
    slow = [s for s in range(T + 1) if s > 0 and all(want["rsi"][t, s] > 0 for t in range(T) if t < s)]
    assert list(ntw.attrs["steps"]) == slow
    assert list(ga.never_turns_away(data.path).attrs["steps"]) == slow
    for s in range(1, T + 1):
        bad = [t for t in range(min(s, T)) if want["rsi"][t, s] <= 0]
        assert int(ntw["first_turn_away"].sel(reference=s)) == (bad[0] if bad else -1)
        assert float(ntw["share_positive"].sel(reference=s)) == pytest.approx(1 - len(bad) / min(s, T))
    assert not bool(ntw["never_turns_away"].sel(reference=0))  # no step before it
    import matplotlib

    matplotlib.use("Agg")
    from analysis.plots import plot_rsi_all_references

    ax = plot_rsi_all_references(pairs, never=ntw)
    assert ax.get_xlabel().startswith("reference") and len(ax.images) == 1


def test_rsi_all_references_needs_an_index(tmp_path):
    data = make_store(tmp_path / "run.zarr", steps=4, seed=14)
    with pytest.raises(ga.AnalysisError, match="gradtrace index"):
        ga.rsi_all_references(data.path)
    with pytest.raises(ga.AnalysisError, match="no valid query index"):
        ga.corr_matrix(data.path, index=True)


def test_cli_index(tmp_path):
    from gradtrace.cli import main

    data = make_store(tmp_path / "run.zarr", steps=6, seed=15)
    assert main(["index", str(data.path)]) == 0
    assert open_index(data.path).n_valid == 7
    assert main(["index", str(data.path), "--band", "2"]) == 2  # another layout needs --rebuild
    assert main(["index", str(data.path), "--rebuild", "--band", "2"]) == 0
    assert open_index(data.path).band == 2
    assert main(["info", str(data.path)]) == 0


def test_cli_index_output(tmp_path, capsys):
    from gradtrace.cli import main

    data = make_store(tmp_path / "run.zarr", steps=5, seed=16)
    main(["index", str(data.path)])
    out = capsys.readouterr().out
    assert "indexed 6 new rows of 6 (every pair of rows)" in out and "instant:" in out
    main(["index", str(data.path)])
    assert "up to date" in capsys.readouterr().out
    main(["info", str(data.path)])
    assert "index:     every pair of rows, up to date" in capsys.readouterr().out
    main(["corr", str(data.path), "--lag", "1"])
    assert "answered from the query index (index)" in capsys.readouterr().out
    main(["rsi", str(data.path), "--ref", "step:2"])
    assert "answered from the query index" in capsys.readouterr().out


def test_index_sizes():
    assert fmt.index_bytes(1000) == 8 * 1000 * 6 + 40 * 1000**2
    assert fmt.index_bytes(10**5, band=16) == 8 * 10**5 * 6 + 48 * 10**5 * 17


def test_mixed_tiers_index_correlations_and_signs(tmp_path):
    """grad lossless, weight sketched: G products and signs in parameter space, V V^T in sketch
    space, no <G, V> (RSI needs both in one space and says so)."""
    data = make_store(tmp_path / "run.zarr", steps=6, seed=17, tiers={"grad": "lossless", "weight": "sketch:32"})
    build_index(data.path)
    idx = open_index(data.path)
    assert idx.spaces == {"gg": "param", "vv": "sketch", "sign_disagree": "param", "sign_both": "param"}
    assert not idx.has("gv") and "gv" not in xr.open_zarr(data.path, group="index")
    run = ga.open_run(data.path)
    a, b = _both(ga.corr_matrix, run)
    _close(a.values, b.values)
    a, b = _both(ga.sign_shift_lag, run, 1)
    _close(a.sign_shift.values, b.sign_shift.values)
    V = data.weight_sketch.astype(np.float64) - data.weight_sketch[-1].astype(np.float64)
    _close(idx.block("vv", np.arange(7)), np.array([[dot(x, y) for y in V] for x in V]))
    with pytest.raises(ga.TierError):
        ga.rsi(run)


@pytest.mark.slow
def test_build_on_a_localcluster_matches_threads(tmp_path, monkeypatch):
    distributed = pytest.importorskip("distributed")
    from analysis import engine

    monkeypatch.setattr(engine, "SLAB_BYTES", 1)  # one storage chunk per task: many tasks
    dense = make_store(tmp_path / "dense.zarr", steps=8, seed=18)
    sketch = make_store(tmp_path / "sketch.zarr", steps=6, tiers="sketch:64", seed=19,
                        shapes=(("big", (300,)), ("small", (9,))))
    local = {}
    for data in (dense, sketch):
        for band in (None, 2):
            build_index(data.path, band=band, rebuild=True)
            ix = xr.open_zarr(data.path, group="index").load()
            local[(str(data.path), band)] = ix
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            distributed.Client(cl):
        for data in (dense, sketch):
            for band in (None, 2):
                build_index(data.path, band=band, rebuild=True)
                ix = xr.open_zarr(data.path, group="index").load()
                want = local[(str(data.path), band)]
                for name in want.data_vars:
                    np.testing.assert_allclose(ix[name].values, want[name].values, rtol=1e-12, atol=1e-12,
                                               err_msg=name)


@pytest.mark.parametrize("band", [None, 2])
def test_build_in_tiles_equals_one_pass(tmp_path, monkeypatch, band):
    """Large indexes are built in column tiles (full) or row groups (band), one pass each."""
    from analysis import index as index_mod

    data = make_store(tmp_path / "run.zarr", steps=7, seed=20)
    monkeypatch.setattr(index_mod, "MAX_PARTIAL_BYTES", 1)  # one new row per tile
    monkeypatch.setattr(index_mod, "BAND_PASS_ROWS", 3)  # band 2: one row per pass
    build_index(data.path, band=band)
    idx = open_index(data.path)
    want = _slow_products(data)
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    keep = np.ones_like(i, bool) if band is None else np.abs(i - j) <= band
    for name in want:
        _close(idx.pairs(name, i[keep], j[keep]), want[name][keep])


def test_index_on_object_storage(tmp_path):
    """An S3 store (moto server) is indexed in place and queried through the URL."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        opts = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
        fs = s3fs.S3FileSystem(**opts)
        fs.mkdir("index-runs")  # moto's state is per process: a bucket of its own (test_remote uses "runs")
        data = make_store(tmp_path / "run.zarr", steps=6, seed=23, param_chunk=64)
        fs.put(str(data.path), "index-runs/run.zarr", recursive=True)
        fs.invalidate_cache()
        run = ga.open_run("s3://index-runs/run.zarr", storage_options=opts)
        assert ga.lag_series(run, 1).attrs["answered_by"] == "pass"
        res = build_index(run)
        assert res["rows_computed"] == 7
        fs.invalidate_cache()
        # the closed store's consolidated metadata now lists the index too (plain readers)
        meta = json.loads(fs.cat("index-runs/run.zarr/zarr.json"))
        assert "index/gg" in meta["consolidated_metadata"]["metadata"]
        run = ga.open_run("s3://index-runs/run.zarr", storage_options=opts)
        a = ga.lag_series(run, 1)
        assert a.attrs["answered_by"] == "index"
        _close(a.values, ga.lag_series(data.path, 1, index=False).values)
        r = ga.rsi(run, 3)
        assert r.attrs["answered_by"].startswith("index")
        _close(r.gamma.values, ga.rsi(data.path, 3, index=False).gamma.values, RSI_TOL)
        fs.rm("index-runs", recursive=True)
    finally:
        server.stop()


def test_nonfinite_gradient_row(tmp_path):
    """A gradient holding NaN gives NaN from the index exactly where the pass gives NaN."""
    rng = np.random.default_rng(24)
    G = rng.standard_normal((6, 20)).astype(np.float32)
    G[3, 5] = np.nan
    W = np.cumsum(rng.standard_normal((6, 20)), 0).astype(np.float32)
    data = make_store(tmp_path / "run.zarr", steps=6, shapes=(("a", (20,)),), grads=G, weights=W)
    build_index(data.path)
    run = ga.open_run(data.path)
    assert open_index(run).pairs("sign_both", [3], [1])[0] == -1
    for f, args in ((ga.corr_matrix, ()), (ga.lag_series, (1,)), (ga.mean_corr, ()), (ga.sign_shift_matrix, ()),
                    (ga.sign_shift_lag, (1,)), (ga.rsi, (2,))):
        a, b = f(run, *args), f(run, *args, index=False)
        assert a.attrs["answered_by"].startswith("index")
        xs = a if isinstance(a, xr.Dataset) else a.to_dataset(name="v")
        ys = b if isinstance(b, xr.Dataset) else b.to_dataset(name="v")
        for v in ys.data_vars:
            if ys[v].dtype.kind == "f":
                _close(xs[v].values, ys[v].values, RSI_TOL)


# ------------------------------------------------------------------ the index with paper parity (i16)


def test_index_answers_denominator_all_and_gradient_rsi_only(tmp_path):
    """Issue 15 x 16: sign shifts with denominator='all' and RSI against a recorded step come
    from the index equal to the pass; the other RSI directions always run the pass."""
    data = make_store(tmp_path / "run.zarr", steps=10, seed=7)  # 20% exact zeros: 'all' != 'both_nonzero'
    build_index(data.path)
    run = ga.open_run(data.path)
    for den in ("all", "both_nonzero"):
        a, b = _both(ga.sign_shift_lag, run, 1, denominator=den)
        assert a.attrs["denominator"] == b.attrs["denominator"] == den
        assert a.sign_shift.attrs["denominator"] == den
        _close(a.sign_shift.values, b.sign_shift.values, 1e-10)
        _close(a.zero_share.values, b.zero_share.values, 1e-10)
        a, b = _both(ga.sign_shift_matrix, run, denominator=den)
        assert a.attrs["denominator"] == den
        _close(a.sign_shift.values, b.sign_shift.values, 1e-10)
    # 'all' against slow numpy: flips among every coordinate (a zero at either step is no flip)
    a = ga.sign_shift_lag(run, 1, denominator="all")
    G = data.grads
    want = [100.0 * sum((x < 0) != (y < 0) for x, y in zip(G[t].tolist(), G[t + 1].tolist()) if x != 0 and y != 0)
            / data.d for t in range(9)]
    _close(a.sign_shift.values, want, 1e-12)
    # RSI against a recorded step: the index answers direction='gradient' ...
    a, b = _both(ga.rsi, run, 6)
    assert a.attrs["direction"] == b.attrs["direction"] == "gradient" and a.attrs["pass_steps"] == 0
    for m in ("rsi", "eb", "gamma", "eta_star", "distance"):
        _close(a[m].values, b[m].values, 1e-10)
    # ... the other directions run i16's pass, and index=True says why
    for direction in ("update", "gradient+wd"):
        kw = {"weight_decay": 5e-4} if direction == "gradient+wd" else {}
        r = ga.rsi(run, 6, direction=direction, **kw)  # (the final iterate gives every step its w_(t+1))
        assert r.attrs["answered_by"] == "pass" and "pass_steps" not in r.attrs
        assert r.attrs["direction"] == direction
        with pytest.raises(ga.AnalysisError, match="direction='gradient' only"):
            ga.rsi(run, 6, direction=direction, index=True, **kw)


def test_index_anchor_skips_rows_without_weights(tmp_path):
    """A weight schedule leaves NaN weights on skipped steps: the anchor is the last row with
    weights, so RSI from the index of a live store whose last row has none is still exact
    (an anchor of NaN made every RSI from the index NaN)."""
    tensors = fmt.tensor_table([("a", (6,)), ("b", (3, 4))])
    d = sum(t.size for t in tensors)
    rng = np.random.default_rng(3)
    tier = {a: fmt.Tier.parse("lossless") for a in fmt.DATA_ARRAYS}
    path = tmp_path / "ws.zarr"
    writer = StoreWriter(path, tensors, tier, mode="overwrite", param_chunk=8)
    w = rng.standard_normal(d)
    G, W = [], {}
    for t in range(8):
        g = (rng.standard_normal(d) + 0.5 * w).astype(np.float32)
        has_w = t % 3 == 0  # weights on steps 0, 3, 6; the last row (7) has none
        writer.append(t, g, w.astype(np.float32) if has_w else None, loss=1.0, lr=0.1, epoch=0)
        G.append(g)
        if has_w:
            W[t] = w.astype(np.float32)
        w = w - 0.1 * g
    writer.commit()
    build_index(path)
    idx = open_index(path)
    assert idx.attrs["anchor_step"] == 6
    assert np.all(np.isfinite(np.asarray(idx.group["anchor"][:])))
    a, b = _both(ga.rsi, path, 3)
    assert list(a.step.values) == [0, 3, 6] and a.attrs["pass_steps"] == 0
    for m in ("rsi", "gamma", "distance"):
        _close(a[m].values, b[m].values, 1e-10)
    for t in (0, 6):
        want = slow_rsi(G[t], W[t], W[3])
        for m in ("rsi", "gamma", "distance"):
            assert abs(float(a[m].sel(step=t)) - want[m]) <= 1e-10 * max(1.0, abs(want[m]))
    writer.close()
