"""The capture's compiled encodings (capture.kernels) against plain float64 numpy, on both backends."""

from __future__ import annotations

import numpy as np
import pytest

from capture import kernels
from tests.helpers_kernels import kernel_data, use_backend


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    """Run a test on the compiled kernels and again on the numpy fallback."""
    return use_backend(kernels, request.param, monkeypatch)


_data = kernel_data


def test_tensor_sums_are_the_float64_scalars_of_each_tensor(backend):
    rng = np.random.default_rng(6)
    g, w = _data(rng, rows=4, cols=1000)[2:]  # rows with exact zeros and negative zeros
    g[700] = np.nan
    starts, ends, idx = np.array([0, 10, 600, 990]), np.array([10, 600, 990, 1000]), np.array([3, 0, 1, 2])
    gg, ww, gw = np.full(4, -1.0), np.full(4, -1.0), np.full(4, -1.0)
    kernels.tensor_sums(g, w, starts, ends, idx, gg, ww, gw)
    for j in range(4):
        gs, ws = g[starts[j]:ends[j]].astype(np.float64), w[starts[j]:ends[j]].astype(np.float64)
        k = idx[j]
        np.testing.assert_allclose([gg[k], ww[k], gw[k]], [gs @ gs, ws @ ws, gs @ ws], rtol=1e-12)
    assert np.isnan(gg[1]) and np.isnan(gw[1]) and np.isfinite(ww[1])  # the NaN is in tensor 1
    gg2, ww2, gw2 = np.full(4, 7.0), np.zeros(4), np.full(4, 7.0)
    kernels.tensor_sums(None, w, starts, ends, idx, gg2, ww2, gw2)  # the final iterate: no grad
    np.testing.assert_allclose(ww2, ww, rtol=1e-14)  # same sums; vector lanes may differ
    assert (gg2 == 7.0).all() and (gw2 == 7.0).all()


def test_the_writer_scalars_agree_between_backends(monkeypatch):
    from gradtrace_format import format as fmt
    from capture import writer

    # a run of adjoining small tensors (the empty one inside it), a large one, a lone small one
    shapes = [("a", (3, 5)), ("a2", (4,)), ("b", (0,)), ("a3", (9,)), ("c", (5000,)), ("d", (7,)), ("e", (64, 80))]
    tensors = fmt.tensor_table(shapes)
    d = sum(t.size for t in tensors)
    rng = np.random.default_rng(7)
    g, w = rng.standard_normal(d, dtype=np.float32), rng.standard_normal(d, dtype=np.float32)
    kernels._get()
    fast = writer.tensor_scalars(tensors, g, w)
    monkeypatch.setattr(kernels, "_impl", kernels._NUMPY)
    monkeypatch.setattr(kernels, "BACKEND", "numpy")
    slow = writer.tensor_scalars(tensors, g, w)
    for f, s_ in zip(fast, slow):
        np.testing.assert_allclose(f, s_, rtol=1e-12)
    assert fast[1][2] == 0.0 and slow[1][2] == 0.0  # the empty tensor
    assert [len(u[0]) for u in writer._scalar_plan(tensors)] == [3, 1, 1, 1]  # the run is one unit
    want = [float(np.dot(w[t.offset:t.offset + t.size].astype(np.float64), w[t.offset:t.offset + t.size]))
            for t in tensors]
    np.testing.assert_allclose(slow[1], want, rtol=1e-12)


def test_the_store_writer_loads_the_scalar_kernel_at_setup(tmp_path):
    """Opening a StoreWriter compiles (or loads) the scalar kernel, so the first recorded row
    does not pay numba's import while training steps queue behind it."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        from gradtrace_format import format as fmt
        from capture import kernels
        from capture.writer import StoreWriter
        assert kernels._impl is None
        StoreWriter({str(tmp_path / "s.zarr")!r}, fmt.tensor_table([("a", (4,))]))
        sums = kernels._impl[0]
        assert kernels.BACKEND != "numba" or len(sums.signatures) == 1, sums.signatures
        print(kernels.BACKEND)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_two_row_sketch_equals_each_rows_sketch_bit_for_bit(backend):
    """``sketch2_into`` (gradient and weights in one sweep) gives, per column, the float64
    sums of ``format.Sketcher`` and of ``sketch_into`` bit for bit, exact tensors included."""
    from capture.writer import _FastSketcher
    from gradtrace_format import format as fmt

    rng = np.random.default_rng(8)
    tensors = fmt.tensor_table([("big", (300, 40)), ("tiny", (3,)), ("mid", (700,)), ("bias", (40,))])
    d = sum(t.size for t in tensors)
    g, w = _data(rng, rows=4, cols=d)[2:]
    g[17] = np.nan
    plan = fmt.sketch_plan(tensors, 512, 3)
    assert any(plan.exact) and not all(plan.exact)  # both kinds of tensor
    sk = _FastSketcher(tensors, plan)
    twin = _FastSketcher(tensors, plan, twin=sk)
    assert twin.codes is sk.codes
    both = twin.both(g, w).copy()
    ref = fmt.Sketcher(tensors, plan)
    for col, row in enumerate((g, w)):
        np.testing.assert_array_equal(both[:, col], sk(row))
        np.testing.assert_array_equal(both[:, col], ref(row))  # the format's numpy definition


@pytest.mark.parametrize("n", [1, 7, 8, 4095, 4096, 4097, 4096 * 3 + 5, 100_003])
def test_pack_signs_equals_the_format_definition(backend, n):
    """Sign and non-zero bit planes: ``format.pack_signs`` bit for bit at every tail length
    and across the kernel's 4096-entry blocks; NaN counts as non-zero, -0.0 as zero."""
    from gradtrace_format import format as fmt

    rng = np.random.default_rng(n)
    x = rng.standard_normal(n).astype(np.float32)
    x[rng.random(n) < 0.3] = 0.0
    x[rng.random(n) < 0.1] = -0.0
    for i, v in zip(range(0, n, max(1, n // 5)), (np.nan, -np.inf, np.inf, -np.nan, -1e-45)):
        x[i] = v
    nb = (n + 7) // 8
    sb, nz = np.full(nb, 0xAA, dtype=np.uint8), np.full(nb, 0xAA, dtype=np.uint8)
    kernels.pack_signs_into(x, sb, nz)
    want_sb, want_nz = fmt.pack_signs(x)
    np.testing.assert_array_equal(sb, want_sb)
    np.testing.assert_array_equal(nz, want_nz)


def _pieces(rng, d: int) -> list[int]:
    """Piece sizes summing to d: zero-size, one-entry and sub-byte pieces among larger ones."""
    sizes, left = [], d
    while left:
        n = int(min(left, rng.choice([0, 1, 3, 5, 7, 8, 9, 13, 4095, 4097, 20_000])))
        sizes.append(n)
        left -= n
    return sizes


def test_pack_signs_of_pieces_packed_in_order_are_the_whole_rows_planes(backend):
    """``pack_signs_at``: a row packed piece by piece (pieces starting inside a byte, of 0, 1
    and 9 entries, across the 4096-entry blocks) into buffers holding stale bytes gives
    ``format.pack_signs`` of the whole row bit for bit."""
    from gradtrace_format import format as fmt

    rng = np.random.default_rng(21)
    for d in (1, 13, 4103, 61_111):
        x = rng.standard_normal(d).astype(np.float32)
        x[rng.random(d) < 0.3] = 0.0
        x[rng.random(d) < 0.1] = -0.0
        x[:: max(1, d // 3)] = np.nan
        nb = (d + 7) // 8
        sb, nz = np.full(nb, 0xAA, dtype=np.uint8), np.full(nb, 0x55, dtype=np.uint8)
        pos = 0
        for n in _pieces(rng, d):
            kernels.pack_signs_at(x[pos:pos + n].copy(), pos, sb, nz)
            pos += n
        want_sb, want_nz = fmt.pack_signs(x)
        np.testing.assert_array_equal(sb, want_sb)
        np.testing.assert_array_equal(nz, want_nz)


def test_sketch_of_a_row_in_pieces_equals_the_flat_rows_sketch_bit_for_bit(backend):
    """``sketch_parts_into`` (one array per tensor, as a CPU model's .grad tensors) gives the
    float64 sums of ``sketch_into`` and ``sketch2_into`` of the joined row bit for bit."""
    from gradtrace_format import format as fmt

    rng = np.random.default_rng(22)
    tensors = fmt.tensor_table([("big", (300, 40)), ("empty", (0,)), ("tiny", (3,)), ("mid", (700,)),
                                ("bias", (40,))])
    d = sum(t.size for t in tensors)
    g, w = _data(rng, rows=4, cols=d)[2:]
    plan = fmt.sketch_plan(tensors, 512, 3)
    from capture.writer import _FastSketcher

    sk = _FastSketcher(tensors, plan)
    parts = [g[t.offset:t.offset + t.size].copy() for t in tensors]
    args = (sk.starts, sk.sizes, sk.offsets, sk.codes, sk.code_starts)
    one = kernels.sketch_parts_into(parts, None, *args, np.full(plan.dim, 7.0)).copy()
    np.testing.assert_array_equal(one, kernels.sketch_into(g, *args, np.empty(plan.dim)))
    two = kernels.sketch_parts_into(parts, w, *args, np.full((plan.dim, 2), 7.0)).copy()
    np.testing.assert_array_equal(two, kernels.sketch2_into(g, w, *args, np.empty((plan.dim, 2))))


def test_sketch_and_sign_planes_in_one_sweep_equal_them_apart(backend):
    """``sketch2_signs_parts_into``: the sketch of both rows and both rows' sign planes, block
    by block per tensor (tensors starting inside a byte, longer than a block, exactly copied
    ones), equal ``sketch2_into`` and ``format.pack_signs`` of the joined rows bit for bit."""
    from capture.writer import _FastSketcher
    from gradtrace_format import format as fmt

    rng = np.random.default_rng(23)
    tensors = fmt.tensor_table([("a", (5,)), ("big", (3, 4001)), ("empty", (0,)), ("c", (13,)), ("d", (9000,))])
    d = sum(t.size for t in tensors)
    g, w = _data(rng, rows=4, cols=d)[2:].astype(np.float32)  # rows as the writer has them
    plan = fmt.sketch_plan(tensors, 600, 5)
    assert any(plan.exact) and not all(plan.exact)
    sk = _FastSketcher(tensors, plan)
    nb = (d + 7) // 8
    gb = (np.full(nb, 0xAA, np.uint8), np.full(nb, 0x55, np.uint8))
    wb = (np.full(nb, 0x0F, np.uint8), np.full(nb, 0xF0, np.uint8))
    parts = [g[t.offset:t.offset + t.size].copy() for t in tensors]
    args = (sk.starts, sk.sizes, sk.offsets, sk.codes, sk.code_starts)
    both = kernels.sketch2_signs_parts_into(parts, w, *args, np.full((plan.dim, 2), 3.0), gb, wb).copy()
    np.testing.assert_array_equal(both, kernels.sketch2_into(g, w, *args, np.empty((plan.dim, 2))))
    for row, bits in ((g, gb), (w, wb)):
        want = fmt.pack_signs(row)
        np.testing.assert_array_equal(bits[0], want[0])
        np.testing.assert_array_equal(bits[1], want[1])


def test_the_plane_kernels_refuse_what_does_not_fit():
    """The compiled kernels do not check bounds: their entry points do."""
    x = np.ones(20, np.float32)
    small = np.zeros(2, np.uint8)
    with pytest.raises(ValueError, match="do not fit planes of 2 bytes"):
        kernels.pack_signs_at(x, 0, small, small.copy())
    with pytest.raises(ValueError, match="do not fit"):
        kernels.pack_signs_at(x[:3], -1, np.zeros(8, np.uint8), np.zeros(8, np.uint8))
    big = (np.zeros(3, np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(ValueError, match="planes of 3 bytes"):
        kernels.sketch2_signs_parts_into([x], x, [0], [20], [0], np.zeros(20, np.int32), [0],
                                         np.zeros((4, 2)), big, (small, small.copy()))
