"""The rounded and lossless tiers' Blosc frames (capture.kernels.shuffle_frame_into,
plain_frame_into): written by a compiled kernel instead of c-blosc, read by every Blosc
decoder as the values format.bitround gives (the values themselves for lossless)."""

from __future__ import annotations

import struct

import numcodecs.lz4
import numpy as np
import pytest
import xarray as xr
import zarr
from numcodecs import Blosc

from capture import kernels
from capture.writer import StoreWriter
from gradtrace_format import format as fmt
from tests.helpers_kernels import use_backend

_BLOSC = Blosc("lz4", 1, Blosc.SHUFFLE)  # decode only: the header says how the chunk was made


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    return use_backend(kernels, request.param, monkeypatch)


def _decode(frame: np.ndarray) -> np.ndarray:
    return np.frombuffer(_BLOSC.decode(frame.tobytes()), dtype=np.float32)


def _frame(x: np.ndarray, keepbits, block=kernels.FRAME_BLOCK) -> np.ndarray:
    out = np.full(kernels.frame_capacity(x.shape[0], block), 0xAB, dtype=np.uint8)
    return out[: kernels.shuffle_frame_into(x, keepbits, out, block)]


def _gradient_like(rng, n: int) -> np.ndarray:
    """Scales from 1e-6 to 1e2, runs of exact zeros of every length 1..100 (ReLU gradients
    have them), scattered zeros, negative zeros, NaN, infinities and subnormals."""
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-6, 3, size=n)).astype(np.float32)
    at = 0
    while at < n:
        at += int(rng.integers(1, 200))
        x[at: at + int(rng.integers(1, 101))] = 0.0
        at += 100
    x[rng.random(n) < 0.1] = 0.0
    special = [np.nan, -np.nan, np.inf, -np.inf, -0.0, 1e-40, -1e-44, 3.4e38]
    pos = rng.choice(n, size=min(n, len(special)), replace=False)
    x[pos] = np.array(special[: len(pos)], dtype=np.float32)
    return x


@pytest.mark.parametrize("keepbits", [None, 1, 7, 10, 15, 22, 23])
@pytest.mark.parametrize("n, block", [(128, 16384), (1000, 16384), (16384, 16384), (3 * 16384 + 136, 16384),
                                      (5000, 512), (262144, 16384)])
def test_frames_decode_to_bitround_bit_for_bit(backend, n, block, keepbits):
    """Any n >= 128 (a last block shorter than the others included) and any keepbits: the
    frame decodes through c-blosc to format.bitround(x, keepbits), NaN payloads included."""
    rng = np.random.default_rng(n + (keepbits or 0))
    x = _gradient_like(rng, n)
    want = x if keepbits is None else fmt.bitround(x, keepbits)
    got = _decode(_frame(x, keepbits, block))
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("n, block", [(128, 16384), (1003, 16384), (16384, 16384), (3 * 16384 + 136, 16384),
                                      (5000, 512), (262144, 16384)])
@pytest.mark.parametrize("keepbits", [None, 7])
def test_plain_frames_decode_to_the_values_bit_for_bit(backend, n, block, keepbits):
    rng = np.random.default_rng(n)
    x = _gradient_like(rng, n)
    out = np.full(kernels.frame_capacity(n, block), 0xAB, dtype=np.uint8)
    frame = out[: kernels.plain_frame_into(x, out, block, keepbits=keepbits)]
    got = np.frombuffer(Blosc("lz4", 1, Blosc.NOSHUFFLE).decode(frame.tobytes()), dtype=np.float32)
    want = x if keepbits is None else fmt.bitround(x, keepbits)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_frames_refuse_what_they_cannot_encode():
    out = np.empty(kernels.frame_capacity(1024), dtype=np.uint8)
    for bad in (np.zeros(1024), np.zeros(2048, np.float32)[::2], np.zeros((32, 32), np.float32)):
        with pytest.raises(ValueError, match="contiguous 1-d float32"):
            kernels.shuffle_frame_into(bad, 7, out)
    with pytest.raises(ValueError, match="at least 128 entries"):
        kernels.plain_frame_into(np.zeros(100, np.float32), out)
    with pytest.raises(ValueError, match="frame buffer holds"):
        kernels.plain_frame_into(np.zeros(1024, np.float32), out[:100])


def test_backends_write_the_same_bytes(monkeypatch):
    rng = np.random.default_rng(1)
    cases = [(_gradient_like(rng, n), keepbits) for n, keepbits in
             [(3 * 16384 + 136, 7), (20000, 10), (16384, None), (4096, 3), (1003, 7)]]
    padded = _gradient_like(rng, 16384 * 2)
    padded[20000:] = np.nan  # an edge chunk's fill: runs of one non-zero byte value per split
    padded[3000:3400] = 1.0
    cases += [(padded, 7), (padded, None)]

    def plain(x):
        out = np.empty(kernels.frame_capacity(x.size), dtype=np.uint8)
        return out[: kernels.plain_frame_into(x, out)].tobytes()

    use_backend(kernels, "numba", monkeypatch)
    compiled = [(_frame(x, keepbits).tobytes(), plain(x)) for x, keepbits in cases]
    use_backend(kernels, "numpy", monkeypatch)
    for (x, keepbits), (a, b) in zip(cases, compiled):
        assert _frame(x, keepbits).tobytes() == a, (x.size, keepbits)
        assert plain(x) == b, x.size
    frame = np.frombuffer(compiled[-2][0], dtype=np.uint8)
    assert len(frame) < 0.75 * 2 * padded.size  # the NaN fill's planes are runs
    want = fmt.bitround(padded, 7)
    np.testing.assert_array_equal(_decode(frame).view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -3.5e-7])
def test_a_constant_chunk_is_half_a_percent_of_raw(backend, value):
    """Every plane of one byte value is an LZ4 run: a chunk of one value (a frozen layer's
    zero gradient) takes ~80 bytes per plane of 16384 bytes."""
    x = np.full(262144, value, dtype=np.float32)
    frame = _frame(x, 7)
    assert len(frame) < 16 + 4 * 16 + 16 * 4 * (4 + 80)
    np.testing.assert_array_equal(_decode(frame).view(np.uint32), fmt.bitround(x, 7).view(np.uint32))


def test_lz4_runs_decode_at_every_length_boundary():
    """The LZ4 run of n bytes (literal, offset-1 match, 5 literals) through liblz4, at the
    lengths where the token's nibble and its 255-byte extensions change."""
    for n in list(range(13, 40)) + [269, 270, 271, 524, 525, 526, 16384, 65536]:
        for v in (0, 1, 0x7F, 255):
            block = kernels._lz4_run_np(n, v)
            got = numcodecs.lz4.decompress(struct.pack("<I", n) + block)
            assert got == bytes([v]) * n, (n, v)


def test_byte_runs_of_a_plane_decode_through_liblz4():
    """The byte-run LZ4 blocks of planes with runs (of zeros, 0xFF and other values) at the
    start, the end, across the 12- and 5-byte limits at the end of a block, side by side, and
    of every length around the 16-byte threshold."""
    rng = np.random.default_rng(5)
    cases = []
    for n in (128, 1024, 16384):
        for _ in range(60):
            p = rng.integers(1, 256, n).astype(np.uint8)
            for _ in range(int(rng.integers(0, 25))):
                a = int(rng.integers(0, n))
                p[a: a + int(rng.integers(1, 40 if rng.random() < 0.5 else 400))] = rng.choice([0, 0, 255, 7])
            cases.append(p)
        for tail in range(1, 40):
            p = rng.integers(1, 256, n).astype(np.uint8)
            p[n - tail:] = 0
            p[: int(rng.integers(0, 30))] = 0
            cases.append(p)
        cases.append(np.zeros(n, dtype=np.uint8))
    for p in cases:
        block = kernels._lz4_byte_runs_np(p)
        assert numcodecs.lz4.decompress(struct.pack("<I", p.size) + block) == p.tobytes()


def test_frames_are_at_most_an_eighth_larger_than_c_blosc():
    """The frame skips LZ4's search for short repeats in the sign-and-exponent plane (most of
    c-blosc's 1-2 ns per entry): its chunks are ~8% larger than c-blosc's on gradients with runs
    of zeros and ~11% on dense weights, never 12%."""
    rng = np.random.default_rng(2)
    n = 262144
    g = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    g[np.repeat(rng.random(n // 64) < 0.4, 64)] = 0.0  # runs of 64 zeros, as ReLU layers give
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    for x in (g, w):
        ours = len(_frame(x, 7))
        theirs = len(_BLOSC.encode(fmt.bitround(x, 7)))
        assert ours <= 1.12 * theirs, (ours, theirs)
        assert ours < 0.55 * 4 * n  # the two zero planes are gone


@pytest.mark.parametrize("tiers, keep", [(("rounded:7", "rounded:10"), (7, 10)), (("lossless", "lossless"), (None, None))])
def test_a_store_of_frames_reads_the_same_through_every_reader(tmp_path, tiers, keep):
    """A store written with frames: zarr-python, zarrs (gradtrace's reader) and plain
    xarray.open_zarr all give format.bitround of the rows (lossless: the rows)."""
    from analysis.store import ArrayRef, open_run, zarrs_available

    rng = np.random.default_rng(3)
    tensors = fmt.tensor_table([("a", (600,)), ("b", (40, 10)), ("c", (3,))])
    d = sum(t.size for t in tensors)
    rows = [(_gradient_like(rng, d), rng.standard_normal(d).astype(np.float32)) for _ in range(5)]
    sw = StoreWriter(tmp_path / "r.zarr", tensors, dict(zip(("grad", "weight"), tiers)), param_chunk=256)
    assert sw._w["grad"].frames == sw._w["weight"].frames == ("plain" if keep[0] is None else "shuffle")
    for t, (g, w) in enumerate(rows):
        sw.append(t, g, w, loss=1.0, lr=0.1)
    sw.close()

    def stored(x, k):
        return x if k is None else fmt.bitround(x, k)

    want_g = np.stack([stored(g, keep[0]) for g, _ in rows]).view(np.uint32)
    want_w = np.stack([stored(w, keep[1]) for _, w in rows]).view(np.uint32)
    plain = xr.open_zarr(tmp_path / "r.zarr", consolidated=False)
    np.testing.assert_array_equal(plain["grad"].values[:5].view(np.uint32), want_g)
    np.testing.assert_array_equal(plain["weight"].values[:5].view(np.uint32), want_w)
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "r.zarr/grad", mode="r")[:5].view(np.uint32), want_g)
    run = open_run(tmp_path / "r.zarr")
    if zarrs_available():
        arr = ArrayRef(str(tmp_path / "r.zarr"), "grad", zarrs=True).open()
        np.testing.assert_array_equal(np.asarray(arr[:5]).view(np.uint32), want_g)
    np.testing.assert_array_equal(run.natural("grad", 4).values.view(np.uint32), want_g[4])


def test_rounded_small_keeps_c_bloscs_search_and_smaller_chunks(tmp_path):
    """``rounded:7:small``: the same codec and values, chunks from c-blosc's LZ4 search over
    every byte plane (smaller on gradients with scattered zeros); the tier says so in the store."""
    assert fmt.Tier.parse("rounded:7:small") == fmt.Tier("rounded", keepbits=7, small=True)
    assert fmt.Tier.parse("rounded:small") == fmt.Tier("rounded", small=True)
    assert fmt.Tier.from_json(fmt.Tier.parse("rounded:9:small").to_json()).small
    for bad in ("rounded:7:tiny", "rounded:7:8", "rounded:small:small"):
        with pytest.raises(ValueError, match="rounded"):
            fmt.Tier.parse(bad)
    with pytest.raises(ValueError, match="rounded tier only"):
        fmt.Tier("lossless", small=True)
    rng = np.random.default_rng(9)
    tensors = fmt.tensor_table([("a", (4096,))])
    g = (rng.standard_normal((4, 4096)) * 1e-3).astype(np.float32)
    g[rng.random(g.shape) < 0.45] = 0.0  # scattered zeros, as conv gradients have
    sizes = {}
    for tier in ("rounded:7", "rounded:7:small"):
        path = tmp_path / f"{tier.replace(':', '-')}.zarr"
        sw = StoreWriter(path, tensors, {"grad": tier, "weight": "lossless"}, param_chunk=4096)
        assert (sw._w["grad"].frames is None) == tier.endswith("small")
        for t in range(4):
            sw.append(t, g[t], g[t], loss=1.0, lr=0.1)
        sw.close()
        arr = zarr.open_array(path / "grad", mode="r")
        np.testing.assert_array_equal(arr[:4].view(np.uint32), fmt.bitround(g, 7).view(np.uint32))
        sizes[tier] = sum(f.stat().st_size for f in (path / "grad").rglob("c*"))
        assert fmt.Tier.from_json(zarr.open_group(path, mode="r").attrs["gradtrace"]["tiers"]["grad"]).small == \
            tier.endswith("small")
    assert sizes["rounded:7:small"] < 0.97 * sizes["rounded:7"], sizes
