"""capture.encode against the numpy definitions the CPU writer stores (gradtrace_format.format, writer).

Every check runs on CPU tensors here and, unchanged, on CUDA when a GPU is present (the
``cuda``-marked parameter and class skip otherwise). Bit for bit where the docstrings say so;
the float64 sums are held to the order-independent bound ``(n - 1) * 2**-53 * sum |terms|``.
"""

import math

import numpy as np
import pytest
import torch

from gradtrace_format import format as fmt
from capture import encode as enc
from capture.writer import tensor_scalars as writer_tensor_scalars

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
U = 2.0**-53  # float64 unit roundoff

# float32 bit patterns that every encoding must get right
SPECIAL = np.array([
    0x00000000, 0x80000000,  # +-0
    0x00000001, 0x80000001, 0x00000FFF, 0x007FFFFF, 0x807FFFFF, 0x00008000, 0x00018000,  # subnormals, ties
    0x00800000, 0x3F800000, 0xBF800000,  # smallest normal, +-1
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0xBF808000, 0xBF818000,  # ties at keepbits 7
    0x7F7F7FFF, 0x7F7F8000, 0x7F7FFFFF, 0xFF7FFFFF,  # largest floats: the last three round up to Inf
    0x7F800000, 0xFF800000,  # +-Inf
    0x7FC00000, 0xFFC00000, 0x7F800001, 0xFF800001, 0x7FFFFFFF, 0xFFFFFFFF, 0x7FC0FFFF, 0x7F810000,  # NaNs
], dtype=np.uint32).view(np.float32)


def _bits(a):
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _all_patterns(rng, drop=16):
    """Every sign/exponent/top-mantissa combination (the 65536 upper halves) with low halves
    0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF and random; plus exact ties at ``drop`` bits."""
    upper = np.arange(1 << 16, dtype=np.uint32) << np.uint32(16)
    lows = [0, 1, 0x7FFF, 0x8000, 0x8001, 0xFFFF]
    parts = [upper | np.uint32(lo) for lo in lows]
    parts.append(upper | rng.integers(0, 1 << 16, size=upper.size, dtype=np.uint32))
    ties = rng.integers(0, 1 << 32, size=1 << 14, dtype=np.uint32)
    ties = (ties & np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)) | np.uint32(1 << (drop - 1))
    parts.append(ties)
    return np.concatenate(parts).view(np.float32)


def _gpu(a, device):
    return torch.as_tensor(np.ascontiguousarray(a, dtype=np.float32), device=device)


def _host(t):
    return t.detach().cpu().numpy()


def _vector(rng, d, special_every=0):
    """float32 normals at mixed scales, -0.0 sprinkled, optionally every special pattern."""
    x = (rng.standard_normal(d) * 10.0 ** rng.integers(-30, 30, size=d)).astype(np.float32)
    if d:
        x[rng.random(d) < 0.05] = -0.0
        x[rng.random(d) < 0.05] = 0.0
    if special_every and d:
        pos = rng.choice(d, size=min(d, len(SPECIAL)), replace=False)
        x[pos] = SPECIAL[: len(pos)]
    return x


# ------------------------------------------------------------------------------ rounded


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keepbits", [1, 3, 7, 10, 16, 22, 23])
def test_bitround_bit_for_bit_on_every_pattern(device, keepbits):
    rng = np.random.default_rng(keepbits)
    x = _all_patterns(rng, drop=max(1, 23 - keepbits))
    ours = _host(enc.bitround(_gpu(x, device), keepbits))
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(_bits(ours), _bits(fmt.bitround(x, keepbits)))  # NaN payloads too


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("keepbits", [1, 4, 7])
def test_upper16_widens_to_bitround_but_nan_payloads(device, keepbits):
    rng = np.random.default_rng(100 + keepbits)
    x = _all_patterns(rng, drop=23 - keepbits)
    up = enc.round_upper16(_gpu(x, device), keepbits)
    assert up.dtype == torch.int16 and up.shape == (x.size,)
    wide = fmt.widen_bf16(_host(up))
    ref = fmt.bitround(x, keepbits)
    nan = np.isnan(x)
    np.testing.assert_array_equal(_bits(wide)[~nan], _bits(ref)[~nan])  # finite, Inf, -0.0, subnormals
    # a NaN stays a NaN with its sign and upper 16 bits, quiet bit set; low 16 bits dropped
    xb = _bits(x)[nan]
    np.testing.assert_array_equal(_bits(wide)[nan], (xb & np.uint32(0xFFFF0000)) | np.uint32(0x00400000))
    assert np.isnan(wide[nan]).all()
    # the NaNs CPUs make (x86 default, float('nan')) come back bit for bit
    same = ((xb & np.uint32(0xFFFF)) == 0) & ((xb & np.uint32(0x00400000)) != 0)
    np.testing.assert_array_equal(_bits(wide)[nan][same], xb[same])
    if keepbits == 7:  # the bfloat16 cast gives the same bits for every non-NaN pattern
        cast = _host(enc.to_bf16_bits(_gpu(x, device)))
        np.testing.assert_array_equal(_host(up)[~nan], cast[~nan])
        assert np.isnan(fmt.widen_bf16(cast)[nan]).all()  # and a NaN for a NaN


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_bits_edge_values(device):
    x = np.array([3.4028235e38, -3.4028235e38, 0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, 1e-45,
                  np.inf, -np.inf, 0], dtype=np.float32)
    x[2] = np.uint32(0x7F7F7FFF).view(np.float32)  # just below the tie: rounds down to bf16's largest
    x[9] = np.uint32(0x7F7F8000).view(np.float32)  # the tie itself: odd lsb, rounds up to Inf
    ref = fmt.bitround(x, 7)
    assert np.isposinf(ref[0]) and np.isneginf(ref[1])  # the largest floats round up to Inf ...
    wide = fmt.widen_bf16(_host(enc.to_bf16_bits(_gpu(x, device))))
    np.testing.assert_array_equal(_bits(wide), _bits(ref))  # ... on the device too
    assert _bits(wide)[2] == 0x7F7F0000 and np.isposinf(wide[9]) and wide[3] == 1.0 and wide[4] == 1.0 + 2**-6  # ties to even
    assert np.signbit(wide[5]) and wide[6] == 0.0
    up = fmt.widen_bf16(_host(enc.round_upper16(_gpu(x, device), 7)))
    np.testing.assert_array_equal(_bits(up), _bits(ref))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [0, 1, 7, 9, 1000])
@pytest.mark.parametrize("keepbits", [4, 7, 12])
def test_encode_rounded_round_trip(device, d, keepbits):
    rng = np.random.default_rng(d)
    x = _vector(rng, d, special_every=1)
    shipped = enc.encode_rounded(_gpu(x, device), keepbits)
    assert shipped.element_size() == (2 if keepbits <= 7 else 4)
    got, ref = enc.decode_rounded(_host(shipped)), fmt.bitround(x, keepbits)
    nan = np.isnan(x)  # NaN payloads: see test_upper16_widens_to_bitround_but_nan_payloads
    np.testing.assert_array_equal(_bits(got)[~nan], _bits(ref)[~nan])
    assert np.isnan(got[nan]).all() and (keepbits <= 7 or (_bits(got) == _bits(ref)).all())


def test_rounded_bad_input():
    with pytest.raises(ValueError, match="1..7"):
        enc.round_upper16(torch.zeros(3), 8)
    with pytest.raises(ValueError, match="1..23"):
        enc.bitround(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="float32"):
        enc.bitround(torch.zeros(3, dtype=torch.float64), 7)
    with pytest.raises(ValueError, match="flat"):
        enc.bitround(torch.zeros(3, 2), 7)
    with pytest.raises(ValueError, match="16-bit"):
        fmt.widen_bf16(np.zeros(3, np.float32))


# ------------------------------------------------------------------------------ scalars

TABLES = [[1], [0, 1, 7, 0, 1000, 3, 9], [5000, 1, 0, 3000, 17, 0], [600] * 40]
PLANS = [{}, {"chunk": 1024, "block": 256}, {"chunk": 64, "block": 64}, {"chunk": 64, "block": 8}]


def _table(sizes):
    return fmt.tensor_table([(f"t{i}", (n,)) for i, n in enumerate(sizes)])


def _exact_sums(g, w, table):
    """math.fsum of the float64 products per tensor (exact), and sum |terms| for the bound."""
    out, mag = np.zeros((3, len(table))), np.zeros((3, len(table)))
    for j, t in enumerate(table):
        gs = g[t.offset : t.offset + t.size].astype(np.float64)
        ws = w[t.offset : t.offset + t.size].astype(np.float64)
        for r, p in enumerate((gs * gs, ws * ws, gs * ws)):
            out[r, j] = math.fsum(p)
            mag[r, j] = np.abs(p).sum()
    return out, mag


def _assert_scalars_close(ours, table, g, w):
    """(3, n) float64 against writer.tensor_scalars: NaN where it is NaN, else within twice
    the any-order bound (n - 1) u sum |terms| (g None: rows gg and gw NaN)."""
    ref = np.stack(writer_tensor_scalars(table, g, w))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    _, mag = _exact_sums(w if g is None else g, w, table)
    n = np.array([max(t.size - 1, 0) for t in table], dtype=np.float64)
    fin = np.isfinite(ref)
    assert (np.abs(ours - ref)[fin] <= (2 * n * U * mag * 1.0001)[fin]).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", TABLES)
@pytest.mark.parametrize("plan", PLANS)
def test_tensor_scalars_within_float64_rounding(device, sizes, plan):
    rng = np.random.default_rng(len(sizes))
    table = _table(sizes)
    d = sum(sizes)
    g, w = _vector(rng, d), _vector(rng, d)
    g *= np.float32(1e-10)  # keep every product finite and normal-range in float64
    w *= np.float32(1e-10)
    red = enc.ScalarReducer([t.offset for t in table], sizes, device, **plan)
    ours = _host(red(_gpu(g, device), _gpu(w, device)))
    assert ours.shape == (3, len(sizes)) and ours.dtype == np.float64
    exact, mag = _exact_sums(g, w, table)
    n = np.array([max(s - 1, 0) for s in sizes], dtype=np.float64)
    bound = n * U * mag * 1.0001  # any summation order
    assert (np.abs(ours - exact) <= bound).all()
    gg, ww, gw = writer_tensor_scalars(table, g, w)
    assert (np.abs(ours - np.stack([gg, ww, gw])) <= 2 * bound).all()
    assert (ours[:, np.array(sizes) == 0] == 0).all()
    # the one-call form: per tensor and totals, on the same device
    per, tot = enc.tensor_scalars(_gpu(g, device), _gpu(w, device), [t.offset for t in table], sizes)
    assert per.device.type == tot.device.type == torch.device(device).type
    np.testing.assert_allclose(_host(tot), np.stack([gg, ww, gw]).sum(1), rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("plan", PLANS[:2])
def test_tensor_scalars_nonfinite_and_final_iterate(device, plan):
    rng = np.random.default_rng(7)
    sizes = [0, 300, 5, 2000, 1]
    table = _table(sizes)
    g = rng.standard_normal(sum(sizes)).astype(np.float32)
    w = rng.standard_normal(sum(sizes)).astype(np.float32)
    g[10] = np.inf  # tensor 1: gg inf, gw +-inf
    w[310] = np.nan  # tensor 2: ww, gw NaN
    g[400], g[401] = np.inf, -np.inf  # tensor 3: gg inf, gw NaN or inf
    w[1500] = 0.0
    g[1500] = np.inf  # inf * 0 = NaN in gw
    g[-1] = 3.4028235e38  # largest float: its square is finite in float64
    red = enc.ScalarReducer([t.offset for t in table], sizes, device, **plan)
    ours = _host(red(_gpu(g, device), _gpu(w, device)))
    ref = np.stack(writer_tensor_scalars(table, g, w))
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_array_equal(np.isposinf(ours), np.isposinf(ref))
    np.testing.assert_array_equal(np.isneginf(ours), np.isneginf(ref))
    with np.errstate(invalid="ignore"):
        _assert_scalars_close(ours, table, g, w)
        final = _host(red(None, _gpu(w, device)))
        assert np.isnan(final[[0, 2]]).all()
        _assert_scalars_close(final, table, None, w)


def test_scalar_reducer_bad_input():
    with pytest.raises(ValueError, match="tile"):
        enc.ScalarReducer([0, 5], [4, 4])
    with pytest.raises(ValueError, match="power of two"):
        enc.ScalarReducer([0], [4], chunk=100, block=48)
    red = enc.ScalarReducer([0, 4], [4, 4])
    with pytest.raises(ValueError, match="8"):
        red(torch.zeros(7), torch.zeros(7))


# ------------------------------------------------------------------------------ sketch


def _assert_same_f32(a, b):
    """Bit for bit, NaN positions equal (a NaN's payload comes from the arithmetic)."""
    na, nb = np.isnan(a), np.isnan(b)
    np.testing.assert_array_equal(na, nb)
    np.testing.assert_array_equal(_bits(a)[~na], _bits(b)[~nb])


SKETCH_TABLES = [[0, 1, 5, 300, 2000, 7, 4096, 0, 3], [700] * 12, [33]]


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # numpy quiets a signalling NaN
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", SKETCH_TABLES)
@pytest.mark.parametrize("chunk", [enc.DEFAULT_CHUNK, 1000])
@pytest.mark.parametrize("nonfinite", [False, True])
def test_device_sketch_matches_stored_sketch(device, sizes, chunk, nonfinite):
    rng = np.random.default_rng(sum(sizes))
    table = _table(sizes)
    plan = fmt.sketch_plan(table, 256, seed=3)
    x = _vector(rng, sum(sizes), special_every=nonfinite)
    sk = enc.DeviceSketcher(table, plan, device, chunk=chunk)
    ours32 = _host(sk(_gpu(x, device)))
    ours64 = _host(sk.sketch64(_gpu(x, device)))
    ref64 = fmt.Sketcher(table, plan)(x)
    ref32 = ref64.astype(np.float32)  # what StoreWriter stores
    assert ours32.shape == (plan.dim,) and ours32.dtype == np.float32
    exact = np.zeros(plan.dim, bool)
    for o, k, e in zip(plan.offsets, plan.sizes, plan.exact):
        exact[o : o + k] = e
    _assert_same_f32(ours32[exact], ref32[exact])  # exact copies: -0.0 kept, every device
    if torch.device(device).type == "cpu":
        _assert_same_f32(ours32, ref32)  # same float64 addition order as np.bincount
        _assert_same_f32(ours64.astype(np.float32), ref32)
        np.testing.assert_array_equal(np.isnan(ours64), np.isnan(ref64))
        fin = np.isfinite(ref64)
        np.testing.assert_array_equal(ours64[fin], ref64[fin])
    else:
        # atomics add in another order: float64 within (m - 1) u sum|terms| of each other's
        # exact sum, float32 equal or one ulp apart where the float64 sits on a boundary
        dest = _host(sk.dest).astype(np.int64)
        m = np.bincount(dest, minlength=plan.dim)
        mag = np.bincount(dest, weights=np.abs(x.astype(np.float64)), minlength=plan.dim)
        np.testing.assert_array_equal(np.isnan(ours64), np.isnan(ref64))
        fin = np.isfinite(ref64)
        assert (np.abs(ours64 - ref64)[fin] <= (2 * np.maximum(m - 1, 0) * U * mag * 1.0001)[fin]).all()
        diff = np.abs(ours32.astype(np.float64) - ref32.astype(np.float64))[fin]
        assert (diff <= np.spacing(np.abs(ref32[fin]))).all()
    if sizes is SKETCH_TABLES[0]:  # this table has copied and sketched tensors both
        assert exact.any() and not exact.all()


@pytest.mark.parametrize("device", DEVICES)
def test_device_sketch_of_tensor_subsets_assembles_the_row(device):
    """Parameters on several devices: one sketcher per device, the host puts the pieces."""
    rng = np.random.default_rng(11)
    sizes = [0, 1, 5, 300, 2000, 7, 4096, 0, 3]
    table = _table(sizes)
    plan = fmt.sketch_plan(table, 256, seed=3)
    x = _vector(rng, sum(sizes))
    ref32 = fmt.Sketcher(table, plan)(x).astype(np.float32)
    row = np.full(plan.dim, np.nan, np.float32)
    for subset in ([6, 1, 3, 0], [2, 8, 4, 5, 7]):  # any order, as a device holds them
        xs = np.concatenate([x[table[i].offset : table[i].offset + table[i].size] for i in subset])
        sk = enc.DeviceSketcher(table, plan, device, subset=subset)
        out = _host(sk(_gpu(xs, device)))
        assert out.shape == (sk.dim,) == sk.bucket_index.shape
        row[sk.bucket_index] = out
    if torch.device(device).type == "cpu":
        _assert_same_f32(row, ref32)
    else:
        assert (np.abs(row - ref32) <= np.spacing(np.abs(ref32))).all()


def test_device_sketcher_bad_plan():
    table = _table([10, 20])
    with pytest.raises(ValueError, match="plan has 1 tensors"):
        enc.DeviceSketcher(table, fmt.sketch_plan(_table([30]), 8, 0))
    with pytest.raises(ValueError, match="distinct tensor indices"):
        enc.DeviceSketcher(table, fmt.sketch_plan(table, 8, 0), subset=[0, 0])


# ------------------------------------------------------------------------------ sign bits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 13, 64, 1000, 4097])
def test_sign_planes_bit_for_bit(device, d):
    rng = np.random.default_rng(d)
    x = _vector(rng, d, special_every=1)
    planes = enc.sign_planes(_gpu(x, device))
    assert planes.dtype == torch.uint8 and planes.shape == (2, (d + 7) // 8)
    sb, nz = fmt.pack_signs(x)
    np.testing.assert_array_equal(_host(planes[0]), sb)
    np.testing.assert_array_equal(_host(planes[1]), nz)
    a, b = enc.pack_signs(_gpu(x, device))
    np.testing.assert_array_equal(_host(a), sb)
    np.testing.assert_array_equal(_host(b), nz)


@pytest.mark.parametrize("device", DEVICES)
def test_sign_planes_every_pattern(device):
    x = _all_patterns(np.random.default_rng(1))
    sb, nz = fmt.pack_signs(x)
    planes = _host(enc.sign_planes(_gpu(x, device)))
    np.testing.assert_array_equal(planes[0], sb)
    np.testing.assert_array_equal(planes[1], nz)


# ------------------------------------------------------------------------------ one step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tiers", [
    {"grad": "lossless", "weight": "rounded:7"},
    {"grad": "rounded:10", "weight": "rounded:3"},
    {"grad": "sketch:256", "weight": "sketch:256"},
    {"grad": "sketch:128", "weight": "lossless"},
])
def test_device_encoder_gives_the_stored_rows(device, tiers):
    rng = np.random.default_rng(0)
    table = _table([0, 1, 300, 2000, 7, 129])
    d = sum(t.size for t in table)
    g, w = _vector(rng, d) * np.float32(1e-10), _vector(rng, d) * np.float32(1e-10)
    e = enc.DeviceEncoder(table, tiers, device)
    # fewer, larger chunks on a GPU (kernel launches), the same results
    assert e.scalars.chunk == (enc.CUDA_CHUNK if device == "cuda" else enc.DEFAULT_CHUNK)
    for gv in (g, None):  # a step, then the final iterate
        out = e.encode(None if gv is None else _gpu(gv, device), _gpu(w, device))
        spec = e.payload(with_grad=gv is not None)
        assert set(out) == set(spec)
        for name, (dtype, shape) in spec.items():
            assert out[name].dtype == dtype and tuple(out[name].shape) == shape, name
            assert out[name].device.type == torch.device(device).type
        _assert_scalars_close(_host(out["scalars"]), table, gv, w)
        for a, x in (("grad", gv), ("weight", w)):
            if x is None:
                continue
            tier = fmt.Tier.parse(tiers[a])
            if tier.name == "lossless":
                np.testing.assert_array_equal(_bits(_host(out[a])), _bits(x))
            elif tier.name == "rounded":
                np.testing.assert_array_equal(_bits(enc.decode_rounded(_host(out[a]))),
                                              _bits(fmt.bitround(x, tier.keepbits)))
            else:
                plan = fmt.sketch_plan(table, tier.sketch_dim, tier.seed)
                ref32 = fmt.Sketcher(table, plan)(x).astype(np.float32)
                got = _host(out[f"{a}_sketch"])
                if torch.device(device).type == "cpu":
                    _assert_same_f32(got, ref32)
                else:
                    assert (np.abs(got - ref32) <= np.spacing(np.abs(ref32))).all()
                sb, nz = fmt.pack_signs(x)
                np.testing.assert_array_equal(_host(out[f"{a}_bits"]), np.stack([sb, nz]))


# ------------------------------------------------------------------------------ CUDA only


@pytest.mark.cuda
class TestCudaStream:
    """On a GPU: results stay on the device and encoding never synchronises the host."""

    def test_encode_never_synchronises(self):
        dev = torch.device("cuda")
        table = _table([1000, 3, 50000, 0, 7])
        d = sum(t.size for t in table)
        g = torch.randn(d, device=dev)
        w = torch.randn(d, device=dev)
        encoders = [enc.DeviceEncoder(table, t, dev) for t in (
            {"grad": "lossless", "weight": "lossless"},
            {"grad": "rounded:7", "weight": "rounded:12"},
            {"grad": "sketch:1024", "weight": "sketch:1024"},
        )]
        for e in encoders:  # first calls allocate the reused buffers
            e.encode(g, w)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for e in encoders:
                outs = [e.encode(g, w), e.encode(None, w)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for out in outs:
            assert all(t.is_cuda for t in out.values())

    def test_scalars_deterministic_on_device(self):
        dev = torch.device("cuda")
        table = _table([70000, 5, 300000, 1])
        d = sum(t.size for t in table)
        g, w = torch.randn(d, device=dev), torch.randn(d, device=dev)
        red = enc.ScalarReducer([t.offset for t in table], [t.size for t in table], dev, chunk=1 << 16)
        a, b = red(g, w).cpu(), red(g, w).cpu()
        assert torch.equal(a, b)

    def test_side_stream_sequence_gives_the_cpu_rows(self):
        """The sequence the recorder uses: stage on the training stream, encode and copy into
        pinned buffers on a side stream, the training stream waits on an event before it
        writes the staged vectors again, the host waits on the copy's event only."""
        dev = torch.device("cuda")
        table = _table([3000, 1, 0, 70000, 17])
        d = sum(t.size for t in table)
        tiers = {"grad": "sketch:512", "weight": "rounded:7"}
        rng = np.random.default_rng(5)
        g_np, w_np = _vector(rng, d) * np.float32(1e-10), _vector(rng, d) * np.float32(1e-10)
        e = enc.DeviceEncoder(table, tiers, dev)
        host = {k: torch.empty(shape, dtype=dt, pin_memory=True) for k, (dt, shape) in e.payload().items()}
        g, w = _gpu(g_np, dev), _gpu(w_np, dev)  # the training stream's staged copies
        ready, done = torch.cuda.Event(), torch.cuda.Event()
        side = torch.cuda.Stream()
        ready.record()
        with torch.cuda.stream(side):
            side.wait_event(ready)
            out = e.encode(g, w)
            for k, t in out.items():
                host[k].copy_(t, non_blocking=True)
            done.record(side)
        torch.cuda.current_stream().wait_event(done)
        g.mul_(-3.0)  # the next step's staging, ordered after the encode read
        w.mul_(-3.0)
        done.synchronize()
        ref = enc.DeviceEncoder(table, tiers, "cpu").encode(torch.from_numpy(g_np), torch.from_numpy(w_np))
        _assert_scalars_close(host["scalars"].numpy(), table, g_np, w_np)
        np.testing.assert_array_equal(host["weight"].numpy(), ref["weight"].numpy())
        np.testing.assert_array_equal(host["grad_bits"].numpy(), ref["grad_bits"].numpy())
        r32 = ref["grad_sketch"].numpy()
        assert (np.abs(host["grad_sketch"].numpy() - r32) <= np.spacing(np.abs(r32))).all()
