"""Slab reads into reused per-thread buffers (analysis.slabs): same values, memory released."""

from __future__ import annotations

import numpy as np
import pytest

from analysis import slabs
from tests.helpers_stores import make_store


def test_buffered_reads_equal_plain_reads_and_reuse_memory(tmp_path):
    import analysis as ga

    data = make_store(tmp_path / "s.zarr", steps=10, param_chunk=16)
    run = ga.open_run(tmp_path / "s.zarr")
    arr = run.array_ref("grad").open()
    d = arr.shape[1]
    big = slabs.read(arr, np.arange(10), ((0, 0, d),), buf="t")
    first = big.__array_interface__["data"][0]
    np.testing.assert_array_equal(big, data.grads)
    small = slabs.read(arr, np.array([1, 4, 7]), ((0, 16, 48),), buf="t")  # rows out of order: oindex
    assert small.__array_interface__["data"][0] == first  # the same memory, reused
    np.testing.assert_array_equal(small, data.grads[[1, 4, 7], 16:48])
    np.testing.assert_array_equal(small, slabs.read(arr, np.array([1, 4, 7]), ((0, 16, 48),)))
    assert slabs.release_buffers() >= data.grads.nbytes
    assert slabs.release_buffers() == 0
    fresh = slabs.read(arr, np.arange(10), ((0, 0, d),), buf="t")
    np.testing.assert_array_equal(fresh, data.grads)


def test_slabs_above_the_limit_are_not_kept(tmp_path, monkeypatch):
    import analysis as ga

    make_store(tmp_path / "s.zarr", steps=6, param_chunk=16)
    arr = ga.open_run(tmp_path / "s.zarr").array_ref("grad").open()
    slabs.release_buffers()
    monkeypatch.setattr(slabs, "REUSE_BYTES", 100)
    slabs.read(arr, np.arange(6), ((0, 0, 64),), buf="t")  # 6 x 64 x 4 bytes > 100
    assert slabs.release_buffers() == 0


def test_a_pass_releases_its_buffers_and_repeats_exactly(tmp_path):
    import analysis as ga

    make_store(tmp_path / "s.zarr", steps=12, param_chunk=16)
    run = ga.open_run(tmp_path / "s.zarr")
    slabs.release_buffers()
    a = ga.corr_matrix(run).values
    assert slabs.release_buffers() == 0  # the pass dropped what its tasks kept
    b = ga.corr_matrix(run).values
    r1, r2 = ga.rsi(run), ga.rsi(run)
    assert np.array_equal(a, b, equal_nan=True)
    assert np.array_equal(r1.rsi.values, r2.rsi.values, equal_nan=True)


def test_block_ops_work_arrays_live_in_the_one_pool():
    """The ops' work arrays (here the Gram's float64 copy of a column block) come from the same
    per-thread pool as the decoded slabs, so a pass's end (release_buffers) drops them too."""
    from analysis import blockops

    class Mem:  # what SlabData offers the ops
        space, n_grad = "param", 6
        grad = np.random.default_rng(3).standard_normal((6, 3000)).astype(np.float32)

    slabs.release_buffers()
    out = blockops.Gram("g", np.arange(6), "float64").partial(Mem(), 0, 3000)
    x = Mem.grad.astype(np.float64)
    np.testing.assert_allclose(out, x @ x.T, rtol=1e-12)
    assert slabs.release_buffers() >= x.nbytes
    assert slabs.release_buffers() == 0


def test_pass_requests_are_typed(tmp_path):
    import analysis as ga
    from analysis import engine
    from analysis import pass_requests as rq

    data = make_store(tmp_path / "s.zarr", steps=6, param_chunk=16)
    run = ga.open_run(tmp_path / "s.zarr")
    p = engine.Pass(run, run.params())
    keys = [p.gram([0, 1, 2]), p.pair_dots([0, 1], [1, 2]), p.ref_dist([0, 1], "param", ref_rows=[5], coef=[1.0])]
    assert keys == ["gram0", "pairs1", "refdist2"]
    assert [type(q) for q in p.requests] == [rq.GramRequest, rq.PairDotsRequest, rq.RefDistRequest]
    assert p.requests[2].weight_rows == (0, 1, 5) and p.requests[2].ref == -1
    with pytest.raises(TypeError, match="precison"):  # a misspelt field is an error, not an ignored dict key
        p._add(rq.GramRequest, "param", [0], precison="float32")
    res = p.compute()
    g, w = data.grads.astype(np.float64), data.weights.astype(np.float64)
    np.testing.assert_allclose(res["gram0"], g[:3] @ g[:3].T, rtol=1e-12)
    np.testing.assert_allclose(res["pairs1"], np.einsum("ij,ij->i", g[[0, 1]], g[[1, 2]]), rtol=1e-12)
    diff = w[:2] - w[5]
    np.testing.assert_allclose(res["refdist2"], [np.einsum("ij,ij->i", diff, diff), np.einsum("ij,ij->i", g[:2], diff)],
                               rtol=1e-12)
