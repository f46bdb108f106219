"""Per-layer table and balancedness against slow numpy."""

import numpy as np
import pytest

import analysis as ga
from tests.helpers_stores import make_store, slow_corr, slow_rsi, slow_sign_shift


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("layers")
    return {tier: make_store(base / f"{tier.split(':')[0]}.zarr", steps=8, tiers=tier, seed=12)
            for tier in ("lossless", "sketch:64")}


def test_layer_table_matches_slow(stores):
    d = stores["lossless"]
    tab = ga.layer_table(d.path, lag=2, exclude_tail=1)
    assert list(tab["tensor"].values) == [t.name for t in d.tensors]
    for t in d.tensors:
        sl = d.tensor_slice(t.name)
        row = tab.sel(tensor=t.name)
        corr = np.nanmean([slow_corr(d.grads[k, sl], d.grads[k + 2, sl]) for k in range(6)])
        sign = [slow_sign_shift(d.grads[k, sl], d.grads[k + 2, sl]) for k in range(6)]
        gam = [slow_rsi(d.grads[k, sl], d.weights[k, sl], d.final_weight[sl]) for k in range(7)]
        assert row.corr_mean.item() == pytest.approx(corr, abs=1e-10)
        assert row.sign_shift_mean.item() == pytest.approx(np.nanmean([s[0] for s in sign]), abs=1e-10)
        assert row.zero_share_mean.item() == pytest.approx(np.mean([s[1] for s in sign]), abs=1e-10)
        assert row.gamma_mean.item() == pytest.approx(np.mean([g["gamma"] for g in gam]), abs=1e-10)
        assert row.rsi_mean.item() == pytest.approx(np.mean([g["rsi"] for g in gam]), rel=1e-10)
        assert row["size"].item() == t.size and row["shape"].item() == str(t.shape)
    assert tab.attrs["lag"] == 2
    small = ga.layer_table(d.path, params="fc*", reference=None)
    assert list(small["tensor"].values) == ["fc1.weight", "fc1.bias", "fc2.weight"] and "gamma_mean" not in small


def test_layer_table_sketch_tier(stores):
    d = stores["sketch:64"]
    tab = ga.layer_table(d.path)
    # fc2.weight has 18 entries: stored exactly in the sketch, so its row is exact
    sl = d.tensor_slice("fc2.weight")
    want = np.mean([slow_corr(d.raw_grads[k, sl], d.raw_grads[k + 1, sl]) for k in range(7)])
    assert tab.sel(tensor="fc2.weight").corr_mean.item() == pytest.approx(want, abs=1e-10)
    sign = np.mean([slow_sign_shift(d.raw_grads[k], d.raw_grads[k + 1])[0] for k in range(7)])
    assert np.isfinite(tab.sign_shift_mean.values).all() and sign > 0


def test_balancedness(stores):
    d = stores["lossless"]
    assert ga.linear_pairs(d.path) == [(2, 4)]  # fc1.weight (6, 9) -> fc2.weight (3, 6)
    b = ga.balancedness(d.path)
    assert b.dims == ("step", "pair") and list(b["pair"].values) == ["fc1.weight->fc2.weight"]
    allw = np.vstack([d.weights, d.final_weight[None]]).astype(np.float64)
    for k in range(9):
        w1 = allw[k, d.tensor_slice("fc1.weight")].reshape(6, 9)
        w2 = allw[k, d.tensor_slice("fc2.weight")].reshape(3, 6)
        want = np.linalg.norm(w2.T @ w2 - w1 @ w1.T) / np.linalg.norm(w1) ** 2
        assert b.values[k, 0] == pytest.approx(want, rel=1e-12)
    a = ga.balancedness(d.path, form="absolute")
    assert a.attrs["form"] == "absolute" and b.attrs["form"] == "relative" and "/" not in a.attrs["definition"]
    for k in range(9):
        w1 = allw[k, d.tensor_slice("fc1.weight")].reshape(6, 9)
        w2 = allw[k, d.tensor_slice("fc2.weight")].reshape(3, 6)
        assert a.values[k, 0] == pytest.approx(np.linalg.norm(w2.T @ w2 - w1 @ w1.T), rel=1e-12)
    with pytest.raises(ga.AnalysisError, match="form='abs'"):
        ga.balancedness(d.path, form="abs")
    with pytest.raises(ga.AnalysisError, match="no consecutive linear layers"):
        ga.balancedness(d.path, layers="conv*")
    with pytest.raises(ga.TierError):
        ga.balancedness(stores["sketch:64"].path)
