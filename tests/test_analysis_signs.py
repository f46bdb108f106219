"""Sign shift against slow coordinate loops; exact on every tier."""

import numpy as np
import pytest

import analysis as ga
from analysis import engine
from tests.helpers_stores import count_decodes, make_store, slow_sign_shift


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("signs")
    shapes = (("big", (300,)), ("b", (7,)), ("c", (5, 5)))  # 300 > 64 buckets: really sketched
    out = {tier: make_store(base / f"{tier.split(':')[0]}.zarr", steps=9, tiers=tier, shapes=shapes, seed=3)
           for tier in ("lossless", "rounded:4", "sketch:64")}
    g = out["lossless"].grads.copy()
    g[2] = 0.0
    g[4, 1] = np.inf
    out["special"] = make_store(base / "special.zarr", steps=9, shapes=shapes, grads=g, weights=out["lossless"].weights)
    return out


def slow_matrix(G):
    n = len(G)
    shift, zero = np.empty((n, n)), np.empty((n, n))
    for i in range(n):
        for j in range(n):
            shift[i, j], zero[i, j] = slow_sign_shift(G[i], G[j])
    return shift, zero


@pytest.mark.parametrize("tier", ["lossless", "rounded:4", "sketch:64"])
def test_matrix_matches_slow_on_every_tier(stores, tier):
    d = stores[tier]
    s = ga.sign_shift_matrix(d.path)
    shift, zero = slow_matrix(d.raw_grads)  # signs and zeros are exact on every tier
    np.testing.assert_allclose(s.sign_shift.values, shift, atol=1e-12)
    np.testing.assert_allclose(s.zero_share.values, zero, atol=1e-12)
    assert s.sign_shift.dims == ("step_i", "step_j")
    v = s.sign_shift.values
    assert ((v >= 0) & (v <= 100)).all() and (np.diag(v) == 0).all()
    np.testing.assert_array_equal(v, v.T)
    assert s.attrs["tier"] == tier.split(":")[0] and s.attrs["max_error"] == 0.0
    if tier.startswith("sketch"):
        assert "sign bits" in s.attrs["source"]


def test_zero_share_is_counted(stores):
    d = stores["lossless"]
    s = ga.sign_shift_matrix(d.path)
    assert 0 < s.zero_share.values.min()  # make_store puts exact zeros in every gradient


@pytest.mark.parametrize("tier", ["lossless", "sketch:64"])
def test_lag_window_and_group(stores, tier, monkeypatch):
    d = stores[tier]
    monkeypatch.setattr(engine, "SLAB_BYTES", 1)  # many slabs, bit pieces crossing bytes
    lag = ga.sign_shift_lag(d.path, 2)
    assert list(lag["step"].values) == list(range(7)) and lag.attrs["lag"] == 2
    want = [slow_sign_shift(d.raw_grads[t], d.raw_grads[t + 2]) for t in range(7)]
    np.testing.assert_allclose(lag.sign_shift.values, [w[0] for w in want], atol=1e-12)
    np.testing.assert_allclose(lag.zero_share.values, [w[1] for w in want], atol=1e-12)
    win = ga.sign_shift_window(d.path, 3, h=4)
    np.testing.assert_allclose(win.sign_shift.values, slow_matrix(d.raw_grads[3:7])[0], atol=1e-12)
    grp = ga.sign_shift_lag(d.path, 1, params=["b", "c"])
    cols = np.r_[d.tensor_slice("b"), d.tensor_slice("c")]
    want = [slow_sign_shift(d.raw_grads[t, cols], d.raw_grads[t + 1, cols]) for t in range(8)]
    np.testing.assert_allclose(grp.sign_shift.values, [w[0] for w in want], atol=1e-12)
    odd = ga.sign_shift_lag(d.path, 1, params="b")  # 7 entries starting mid-byte
    want = [slow_sign_shift(d.raw_grads[t, d.tensor_slice("b")], d.raw_grads[t + 1, d.tensor_slice("b")])
            for t in range(8)]
    np.testing.assert_allclose(odd.zero_share.values, [w[1] for w in want], atol=1e-12)


def test_all_zero_and_nonfinite_gradients(stores):
    d = stores["special"]
    s = ga.sign_shift_matrix(d.path)
    assert np.isnan(s.sign_shift.values[2]).all()  # no coordinate where both are non-zero
    np.testing.assert_allclose(np.delete(s.zero_share.values[2], 4), 100.0)
    assert np.isnan(s.sign_shift.values[4]).all() and np.isnan(s.zero_share.values[:, 4]).all()
    with pytest.raises(ga.LagNotAvailableError):
        ga.sign_shift_lag(d.path, 40)


@pytest.mark.parametrize("tier", ["lossless", "sketch:64"])
def test_lag_cuts_rows_not_chunks(stores, tier, monkeypatch):
    """With many steps the sign-shift lag pass (dense values, or packed sign bits) cuts its
    rows into blocks of whole chunks: each chunk is decoded once (a block's last partner
    row twice), never once per fraction of a chunk."""
    d = stores[tier]  # 9 steps
    run = ga.open_run(d.path)
    dense = tier == "lossless"
    names = ("grad",) if dense else ("grad_signbits", "grad_nonzero")
    cw = run.chunk_width(names[0])  # bytes of packed bits in the sketch tier
    col_bits, col_bytes = (cw, 4) if dense else (8 * cw, 2)  # slab columns, bytes per row and column
    monkeypatch.setattr(engine, "SLAB_BYTES", 3 * col_bits * col_bytes)  # 3 rows of one chunk
    monkeypatch.setattr(engine, "CHUNK_SLAB_BYTES", 3 * col_bits * col_bytes)
    monkeypatch.setattr(engine, "MIN_SLAB_COLS", 1)
    decodes, reads = count_decodes(monkeypatch)
    lag = ga.sign_shift_lag(run, 1)
    want = [slow_sign_shift(d.raw_grads[t], d.raw_grads[t + 1]) for t in range(8)]
    np.testing.assert_allclose(lag.sign_shift.values, [w[0] for w in want], atol=1e-12)
    np.testing.assert_allclose(lag.zero_share.values, [w[1] for w in want], atol=1e-12)
    width = d.d if dense else -(-d.d // 8)
    n_chunks = -(-width // cw)
    assert all(n <= 3 and lo % cw == 0 for _, n, lo, _ in reads)
    assert set(decodes) == {(a, r, c) for a in names for r in range(9) for c in range(n_chunks)}
    # blocks of first rows 0-1, 2-3, 4-5, 6-8: rows 2, 4, 6 also end the previous block's last pair
    assert {r for (_, r, _), k in decodes.items() if k == 2} == {2, 4, 6} and max(decodes.values()) == 2


def slow_flip_share_all(x, y) -> float:
    """Percent of ALL coordinates with opposite signs (zeros count as no flip)."""
    flips = sum((a < 0 < b) or (b < 0 < a) for a, b in zip(np.asarray(x).tolist(), np.asarray(y).tolist()))
    return 100.0 * flips / len(x)


@pytest.mark.parametrize("tier", ["lossless", "sketch:64"])
def test_denominator_all_matches_slow(stores, tier):
    d = stores[tier]
    G = d.raw_grads
    m = ga.sign_shift_matrix(d.path, denominator="all")
    want = np.array([[slow_flip_share_all(G[i], G[j]) for j in range(len(G))] for i in range(len(G))])
    np.testing.assert_allclose(m.sign_shift.values, want, atol=1e-12)
    np.testing.assert_allclose(m.zero_share.values, slow_matrix(G)[1], atol=1e-12)
    assert m.attrs["denominator"] == "all" and "n (all coordinates)" in m.attrs["definition"]
    assert m.sign_shift.attrs["long_name"] == "% of all coordinates flipping sign"
    lag = ga.sign_shift_lag(d.path, 1, denominator="all")
    np.testing.assert_allclose(lag.sign_shift.values, [slow_flip_share_all(G[t], G[t + 1]) for t in range(8)],
                               atol=1e-12)
    assert lag.attrs["denominator"] == "all" and lag.sign_shift.attrs["denominator"] == "all"
    both = ga.sign_shift_lag(d.path, 1)  # the default, labelled too
    assert both.attrs["denominator"] == "both_nonzero" and "non-zero at both" in both.sign_shift.attrs["long_name"]
    # all = both_nonzero * (share of coordinates non-zero at both): strictly lower where zeros exist
    np.testing.assert_allclose(lag.sign_shift.values, both.sign_shift.values * (1 - both.zero_share.values / 100),
                               rtol=1e-12)
    win = ga.sign_shift_window(d.path, 3, h=4, denominator="all")
    np.testing.assert_allclose(win.sign_shift.values, want[3:7, 3:7], atol=1e-12)
    assert win.attrs["denominator"] == "all"


def test_denominator_all_on_zero_and_bad_input(stores):
    d = stores["special"]  # step 2 all-zero: 0% of all entries flip (not NaN), step 4 non-finite: NaN
    m = ga.sign_shift_matrix(d.path, denominator="all")
    assert (np.delete(m.sign_shift.values[2], 4) == 0).all() and np.isnan(m.sign_shift.values[4]).all()
    with pytest.raises(ga.AnalysisError, match="denominator='most'.*'both_nonzero'.*'all'"):
        ga.sign_shift_lag(d.path, 1, denominator="most")


def test_layer_table_denominator(stores):
    d = stores["lossless"]
    G = d.raw_grads
    for den in ("both_nonzero", "all"):
        tab = ga.layer_table(d.path, reference=None, denominator=den)
        assert tab.attrs["denominator"] == den
        for name in ("big", "c"):
            cols = d.tensor_slice(name)
            if den == "all":
                per = [slow_flip_share_all(G[t, cols], G[t + 1, cols]) for t in range(8)]
            else:
                per = [slow_sign_shift(G[t, cols], G[t + 1, cols])[0] for t in range(8)]
            np.testing.assert_allclose(tab.sign_shift_mean.sel(tensor=name).item(), np.nanmean(per), rtol=1e-12)
