"""Slab reads into reused per-thread buffers (analysis.slabs): same values, memory released."""

from __future__ import annotations

import numpy as np

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
