"""StoreWriter: the bytes it writes itself decode exactly as zarr's own, and the commit protocol holds."""

import json
import math
import os

import numpy as np
import pytest
import xarray as xr
import zarr

from gradtrace_format import format as fmt
from capture import writer as cw
from capture.writer import StoreWriter, tensor_scalars


def _table(sizes=((3, 5), (7,), (2, 2, 2))):
    return fmt.tensor_table([(f"t{i}", s) for i, s in enumerate(sizes)])


def _rows(rng, T, d):
    g = rng.standard_normal((T, d)).astype(np.float32)
    g[:, ::5] = 0.0  # exact zeros, as ReLU nets have
    w = rng.standard_normal((T, d)).astype(np.float32)
    return g, w


def _shard_chunks(path, n_entries: int) -> dict[int, bytes]:
    """The chunks of a shard file (index first, ``(offset, nbytes)`` little-endian uint64)."""
    raw = path.read_bytes()
    idx = np.frombuffer(raw[: 16 * n_entries], dtype="<u8").reshape(n_entries, 2)
    return {i: raw[int(o): int(o) + int(nb)] for i, (o, nb) in enumerate(idx) if o != 2**64 - 1}


@pytest.mark.parametrize("shard_files", [True, False])
@pytest.mark.parametrize("tier", ["lossless", "lossless:raw", "rounded:9", "sketch:16"])
def test_chunks_are_byte_identical_to_zarr_setitem(tmp_path, tier, shard_files):
    """Each chunk (file, or chunk inside a shard file) equals what zarr writes for the same
    array metadata and values."""
    rng = np.random.default_rng(0)
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 3, d)
    sw = StoreWriter(tmp_path / "a.zarr", tensors, {"grad": tier, "weight": tier}, param_chunk=8, shard_files=shard_files)
    for t in range(3):
        sw.append(t, g[t], w[t], loss=0.5 * t, lr=0.1, epoch=t)
    assert all(aw.mode in (("shards" if shard_files else "rows"), "patch") for aw in sw._w.values())
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r", use_consolidated=False)
    ref = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w")
    compared = 0
    for name, aw in sw._w.items():
        arr = group[name]
        twin = ref.create_array(
            name, shape=arr.shape, chunks=arr.shards or arr.chunks, dtype=arr.dtype, fill_value=arr.fill_value,
            compressors=None if arr.shards else arr.compressors,
            serializer=arr.metadata.codecs[0] if arr.shards else arr.serializer, dimension_names=arr.metadata.dimension_names,
            config={"write_empty_chunks": True}, chunk_key_encoding=arr.metadata.chunk_key_encoding,
        )
        twin[:3] = arr[:3]
        keys = [k for k in (tmp_path / "ref.zarr" / name).rglob("*") if k.is_file() and k.name != "zarr.json"]
        assert keys, name
        for key in keys:
            mine = tmp_path / "a.zarr" / name / key.relative_to(tmp_path / "ref.zarr" / name)
            if aw.mode == "shards":  # the same chunks; their order in the file may differ
                n_entries = aw.shard[0] * aw.shard[1]
                theirs, ours = _shard_chunks(key, n_entries), _shard_chunks(mine, n_entries)
                assert ours == theirs and len(ours) >= 3, (name, key)
                compared += len(ours)
            else:
                assert mine.read_bytes() == key.read_bytes(), (name, key)
                compared += 1
    assert compared >= 3 * 2 + 11


def test_lossless_round_trip_and_per_step_values(tmp_path):
    rng = np.random.default_rng(1)
    tensors = _table(((40,), (13, 3), (5,)))  # d = 84: edge chunks of 84 % 16
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 5, d)
    g[3, 7] = np.inf
    sw = StoreWriter(tmp_path / "r.zarr", tensors, param_chunk=16, expected_steps=2)  # forces growth
    for t in range(5):
        sw.append(10 + 2 * t, g[t], w[t], loss=t + 0.25, lr=0.1 / (t + 1), epoch=t // 2)
    final = rng.standard_normal(d).astype(np.float32)
    sw.close(final)
    ds = xr.open_zarr(tmp_path / "r.zarr")
    assert ds.sizes["step"] == 6
    np.testing.assert_array_equal(ds.step.values, [10, 12, 14, 16, 18, 19])
    np.testing.assert_array_equal(ds.grad.values[:5], g)
    assert np.isnan(ds.grad.values[5]).all()
    np.testing.assert_array_equal(ds.weight.values, np.vstack([w, final]))
    np.testing.assert_array_equal(ds.loss.values[:5], np.arange(5) + 0.25)
    np.testing.assert_array_equal(ds.lr.values[:5], 0.1 / (np.arange(5) + 1))
    np.testing.assert_array_equal(ds.epoch.values, [0, 0, 1, 1, 2, -1])
    flags = ds.flags.values
    assert flags[3] & fmt.FLAG_NONFINITE_GRAD and not flags[2] & fmt.FLAG_NONFINITE_GRAD
    assert flags[5] & fmt.FLAG_FINAL
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    np.testing.assert_allclose(ds.weight_sqnorm.values[:5], (w64**2).sum(1), rtol=1e-13)
    np.testing.assert_allclose(ds.grad_dot_weight.values[[0, 1, 2, 4]], (g64 * w64).sum(1)[[0, 1, 2, 4]], rtol=1e-12)
    per_tensor = ds.grad_sqnorm_tensor.values
    for i, t in enumerate(tensors):
        np.testing.assert_allclose(per_tensor[[0, 1, 2, 4], i], (g64[[0, 1, 2, 4], t.offset : t.offset + t.size] ** 2).sum(1), rtol=1e-12)
    header = fmt.read_header(tmp_path / "r.zarr")
    assert header.closed and header.has_final and header.n_steps == 6
    assert header.extra["n_nonfinite_steps"] == 1


def test_header_is_strict_json(tmp_path):
    sw = StoreWriter(tmp_path / "j.zarr", _table(), settings={"clip": float("inf"), "x": np.float32(2.5)})
    sw.append(0, np.zeros(sw.d, np.float32), np.ones(sw.d, np.float32))

    def refuse(const):
        raise ValueError(f"non-standard JSON constant {const}")

    doc = json.loads((tmp_path / "j.zarr" / "zarr.json").read_text(), parse_constant=refuse)
    assert doc["attributes"]["gradtrace"]["settings"]["clip"] == "inf"


def test_torn_row_is_never_visible_and_is_rewritten(tmp_path):
    """A kill after a row's chunks but before the marker: readers see n rows; resume rewrites it."""
    rng = np.random.default_rng(2)
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 4, d)
    path = tmp_path / "t.zarr"
    sw = StoreWriter(path, tensors, param_chunk=8)
    sw.append(0, g[0], w[0], loss=1.0)
    sw.append(1, g[1], w[1], loss=2.0)
    # simulate the torn step 2: garbage chunks for row 2 and a half-written per-step row
    for name in ("grad", "weight"):
        aw = sw._w[name]
        assert aw.mode == "shards"
        for j in range(aw.n_col_chunks):  # garbage bytes, indexed in the shard as row 2's chunks
            shard, entry = aw._shard_of(2, j)
            shard.put(entry, [b"torn"])
    sw._w["loss"].set(2, 99.0)
    del sw  # killed: no close
    header = fmt.read_header(path)
    assert header.n_steps == 2 and not header.closed
    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(group["grad"][:2], g[:2])
    np.testing.assert_array_equal(group["loss"][:2], [1.0, 2.0])
    # resume and close at once: row 2 becomes the final iterate, its grad must read as NaN
    sw = StoreWriter(path, tensors, mode="resume")
    sw.close(w[2])
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.step.values, [0, 1, 2])
    assert np.isnan(ds.grad.values[2]).all()
    np.testing.assert_array_equal(ds.weight.values[2], w[2])
    assert np.isnan(ds.loss.values[2])


def test_resume_inside_a_block_keeps_committed_rows(tmp_path):
    rng = np.random.default_rng(3)
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 6, d)
    path = tmp_path / "b.zarr"
    sw = StoreWriter(path, tensors)
    for t in range(3):
        sw.append(t, g[t], w[t], loss=float(t))
    sw.close(w[3])
    sw = StoreWriter(path, tensors, mode="resume")  # drops the final iterate, appends after step 2
    assert sw.n_steps == 3 and sw.last_step == 2
    for t in range(3, 6):
        sw.append(t, g[t], w[t], loss=float(t))
    sw.close()
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.loss.values, np.arange(6.0))
    np.testing.assert_array_equal(ds.grad.values, g)
    assert not list(path.rglob("*.partial"))


def test_rounded_small_resumes_as_rounded_and_back_but_no_other_tier(tmp_path):
    """``small`` picks the encoder, not the stored values: a store resumes with or without it;
    another keepbits is refused with a line that names both tiers."""
    rng = np.random.default_rng(5)
    tensors = _table()
    g, w = _rows(rng, 6, sum(t.size for t in tensors))
    path = tmp_path / "small.zarr"
    small = {"grad": fmt.Tier.parse("rounded:7:small"), "weight": fmt.Tier.parse("lossless")}
    plain = {"grad": fmt.Tier.parse("rounded:7"), "weight": fmt.Tier.parse("lossless")}
    for t, tiers in enumerate([small, plain, small]):
        sw = StoreWriter(path, tensors, tiers=tiers, mode="resume" if t else "create")
        for s in (2 * t, 2 * t + 1):
            sw.append(s, g[s], w[s])
        sw.close()
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.grad.values, fmt.bitround(g, 7))
    np.testing.assert_array_equal(ds.weight.values, w)
    assert fmt.read_header(path).tiers["grad"] == small["grad"]  # the first run's
    with pytest.raises(fmt.StoreMismatchError, match=r"cannot resume .*tier .*rounded.*asks for .*'keepbits': 8"):
        StoreWriter(path, tensors, tiers={**plain, "grad": fmt.Tier.parse("rounded:8")}, mode="resume")


def test_resume_step_drops_later_rows(tmp_path):
    rng = np.random.default_rng(4)
    tensors = _table()
    g, w = _rows(rng, 8, sum(t.size for t in tensors))
    path = tmp_path / "s.zarr"
    sw = StoreWriter(path, tensors)
    for t in range(6):
        sw.append(t, g[t], w[t])
    sw.close(w[6])
    sw = StoreWriter(path, tensors, mode="resume", resume_step=4)  # checkpoint taken at step 4
    assert sw.n_steps == 4
    sw.append(4, g[7], w[7])
    sw.close()
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.step.values, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.grad.values[4], g[7])
    with pytest.raises(ValueError, match="steps must increase"):
        StoreWriter(path, tensors, mode="resume").append(2, g[0], w[0])


def test_compressed_per_step_arrays_of_older_stores_still_resume(tmp_path, monkeypatch):
    """Stores written before the per-step arrays went uncompressed use the block path."""
    from zarr.codecs import ZstdCodec

    monkeypatch.setattr(fmt, "_scalar_codecs", lambda: [ZstdCodec(level=3)])
    rng = np.random.default_rng(5)
    tensors = _table()
    g, w = _rows(rng, 4, sum(t.size for t in tensors))
    path = tmp_path / "old.zarr"
    sw = StoreWriter(path, tensors)
    assert sw._w["loss"].mode == "block"
    sw.append(0, g[0], w[0], loss=1.5)
    sw.append(1, g[1], w[1], loss=2.5)
    del sw
    monkeypatch.undo()
    sw = StoreWriter(path, tensors, mode="resume")
    assert sw._w["loss"].mode == "block"
    sw.append(2, g[2], w[2], loss=3.5)
    sw.close()
    np.testing.assert_array_equal(xr.open_zarr(path).loss.values, [1.5, 2.5, 3.5])


def test_unknown_codecs_fall_back_to_zarr(tmp_path, monkeypatch):
    from zarr.codecs import GzipCodec

    monkeypatch.setattr(fmt, "_lossless_codecs", lambda: [GzipCodec(level=1)])
    rng = np.random.default_rng(6)
    tensors = _table()
    g, w = _rows(rng, 2, sum(t.size for t in tensors))
    sw = StoreWriter(tmp_path / "gz.zarr", tensors, param_chunk=8)
    assert sw._w["grad"].mode == "zarr"
    sw.append(0, g[0], w[0])
    sw.append(1, g[1], w[1])
    sw.close()
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "gz.zarr").grad.values, g)


def test_refusals(tmp_path):
    tensors = _table()
    path = tmp_path / "x.zarr"
    StoreWriter(path, tensors).close()
    with pytest.raises(FileExistsError, match="resume=True"):
        StoreWriter(path, tensors)
    with pytest.raises(fmt.StoreMismatchError, match="parameter table"):
        StoreWriter(path, _table(((3, 5), (8,))), mode="resume")
    with pytest.raises(fmt.StoreMismatchError, match="tier"):
        StoreWriter(path, tensors, {"grad": "rounded:7"}, mode="resume")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        StoreWriter(tmp_path / "nope.zarr", tensors, mode="resume")
    with pytest.raises(ValueError, match="no trainable parameters"):
        StoreWriter(tmp_path / "e.zarr", [])
    (tmp_path / "notzarr").mkdir()
    (tmp_path / "notzarr" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a gradtrace run store"):
        StoreWriter(tmp_path / "notzarr", tensors, mode="overwrite")
    assert (tmp_path / "notzarr" / "precious.txt").exists()


def test_tensor_scalars_are_float64_accurate():
    rng = np.random.default_rng(7)
    tensors = fmt.tensor_table([("a", (100_000,)), ("b", (3,))])
    g = (rng.standard_normal(100_003) * 1e3).astype(np.float32)
    w = rng.standard_normal(100_003).astype(np.float32)
    gg, ww, gw = tensor_scalars(tensors, g, w)
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    for i, sl in enumerate((slice(0, 100_000), slice(100_000, None))):
        assert math.isclose(gg[i], float(np.dot(g64[sl], g64[sl])), rel_tol=1e-13)
        assert math.isclose(gw[i], float(np.dot(g64[sl], w64[sl])), rel_tol=1e-10, abs_tol=1e-9)
    gg, ww, gw = tensor_scalars(tensors, None, w)
    assert np.isnan(gg).all() and np.isnan(gw).all() and np.isfinite(ww).all()


def test_atomic_put_leaves_old_content_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "k"
    cw.atomic_put(target, b"old")

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cw.os, "replace", boom)
    with pytest.raises(OSError):
        cw.atomic_put(target, b"new")
    assert target.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("tier", ["lossless", "rounded:7", "sketch:16"])
def test_threaded_writer_writes_the_same_bytes(tmp_path, tier):
    """threads > 1 encodes a row's chunks concurrently; the store is byte for byte the same."""
    rng = np.random.default_rng(4)
    tensors = _table(((40,), (13, 3), (5,), (9, 2)))
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 5, d)
    g[2, 3] = np.nan  # the non-finite flag comes out of the concurrent reductions too
    paths = {}
    for threads in (1, 4):
        path = tmp_path / f"t{threads}.zarr"
        sw = StoreWriter(path, tensors, {"grad": tier, "weight": tier}, param_chunk=8, threads=threads)
        flags = [sw.append(t, g[t], w[t], loss=0.1 * t, lr=0.1, epoch=0) for t in range(5)]
        flags.append(sw.append(5, None, w[4], loss=float("nan"), lr=float("nan"), epoch=0))
        sw.close()
        paths[threads] = (path, flags)
    (a, fa), (b, fb) = paths[1], paths[4]
    assert fa == fb and fa[2] & fmt.FLAG_NONFINITE_GRAD
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name in ("zarr.json",):
            continue  # metadata holds the creation time
        if rel.parts[0] in ("grad", "weight"):  # shard files: threads append a row's chunks in any order
            arr = zarr.open_array(str(a / rel.parts[0]), mode="r")
            n_entries = int(np.prod(arr.shards)) // int(np.prod(arr.chunks))
            assert _shard_chunks(a / rel, n_entries) == _shard_chunks(b / rel, n_entries), rel
            continue
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_threads_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="threads=0"):
        StoreWriter(tmp_path / "x.zarr", _table(), {}, threads=0)
    assert not (tmp_path / "x.zarr").exists()


def test_tensor_scalars_batched_small_tensors_match_slow_float64():
    """Runs of small tensors are reduced together; every tensor still gets its own exact sums."""
    rng = np.random.default_rng(8)
    shapes = [(3, 3), (0,), (5000,), (7,), (1,), (64, 65), (2,), (70_000,), (11,)] + [(300,)] * 400
    tensors = fmt.tensor_table([(f"t{i}", s) for i, s in enumerate(shapes)])
    d = sum(t.size for t in tensors)
    g = (rng.standard_normal(d) * 10).astype(np.float32)
    w = rng.standard_normal(d).astype(np.float32)
    g[tensors[3].offset + 2] = np.inf  # non-finite stays with its own tensor
    gg, ww, gw = tensor_scalars(tensors, g, w)
    for i, t in enumerate(tensors):
        gs = g[t.offset: t.offset + t.size].astype(np.float64)
        ws = w[t.offset: t.offset + t.size].astype(np.float64)
        with np.errstate(invalid="ignore"):
            want = (sum(gs * gs), sum(ws * ws), sum(gs * ws))
        for got, exp in zip((gg[i], ww[i], gw[i]), want):
            if math.isfinite(exp):
                assert math.isclose(got, exp, rel_tol=1e-12, abs_tol=1e-12), (i, got, exp)
            else:
                assert not math.isfinite(got), i
    assert (gg[1], ww[1], gw[1]) == (0.0, 0.0, 0.0)
    assert np.isfinite(gg[[0, 2, 4, 5, 6, 7, 8]]).all()


# ------------------------------------------------------------------ shard files of several rows


@pytest.fixture
def small_shards(monkeypatch):
    """Shards of 480 raw bytes: 2 rows of ``_table()``'s 30 float32 in 4 chunks of 8 (128 bytes
    a row), so that tests cross shard boundaries."""
    monkeypatch.setattr(fmt, "SHARD_BYTES", 480)


@pytest.mark.parametrize("shard_bytes", [480, 64])  # 64: shards of one row and 2 of its 4 chunks
@pytest.mark.parametrize("tier", ["lossless", "rounded:7", "sketch:16", "lossless:raw"])
def test_rows_across_shards_resume_and_rewrite(tmp_path, monkeypatch, tier, shard_bytes):
    """Rows across several shard files; a resume inside a shard and one at a shard boundary;
    torn rows of a killed writer; the result equals a store of one file per chunk, array by array."""
    monkeypatch.setattr(fmt, "SHARD_BYTES", shard_bytes)
    rng = np.random.default_rng(11)
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(rng, 14, d)
    tiers = {"grad": tier, "weight": tier}
    path, ref = tmp_path / "s.zarr", tmp_path / "ref.zarr"
    sw = StoreWriter(path, tensors, tiers, param_chunk=8)
    big = sw._w["grad" if "sketch" not in tier else "grad_sketch"]
    assert big.mode == "shards" and big.shard[0] in (1, 2, 4), big.shard
    if shard_bytes == 64 and "sketch" not in tier:
        assert big.shard == (1, 2) and big.n_col_chunks == 4  # two shard files per row
    for t in range(5):  # rows 0-4 over several shards
        sw.append(t, g[t], w[t], loss=float(t))
    sw.append(5, g[11], w[11], loss=55.0, commit=False)  # written, never committed: "killed"
    sw._close_files()
    sw._unlock()
    del sw  # killed
    sw = StoreWriter(path, tensors, tiers, mode="resume")  # inside a shard: row 5 of rows 4-5 or 4-7
    assert sw.n_steps == 5
    for t in range(5, 8):
        sw.append(t, g[t], w[t], loss=float(t))
    sw.append(8, g[12], w[12], loss=99.0, commit=False)  # first row of shard 4, uncommitted
    sw._close_files()
    sw._unlock()
    del sw  # killed
    sw = StoreWriter(path, tensors, tiers, mode="resume")  # at a shard boundary: row 8 starts a shard afresh
    assert sw.n_steps == 8
    for t in range(8, 13):
        sw.append(t, g[t], w[t], loss=float(t))
    sw.close(w[13])
    plain = StoreWriter(ref, tensors, tiers, param_chunk=8, shard_files=False)
    for t in range(13):
        plain.append(t, g[t], w[t], loss=float(t))
    plain.close(w[13])
    a, b = xr.open_zarr(path), xr.open_zarr(ref)
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    from gradtrace_format.integrity import verify_store

    assert verify_store(path) == []


def test_durable_fsyncs_every_shard_before_the_marker(tmp_path, small_shards, monkeypatch):
    """durable=True: each commit's zarr.json replace comes after an fsync of every shard file
    its rows were written to (and of the new shards' directory)."""
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        try:
            events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        except OSError:
            events.append(("fsync", "?"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    rng = np.random.default_rng(12)
    tensors = _table()
    g, w = _rows(rng, 7, sum(t.size for t in tensors))
    path = tmp_path / "d.zarr"
    sw = StoreWriter(path, tensors, param_chunk=8, durable=True)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for t in range(6):
        events.append(("row", t))
        sw.append(t, g[t], w[t])
    monkeypatch.undo()
    sw.close()
    root = str(path / "zarr.json")
    R = fmt.shard_geometry(30, 8, 4, 480)[0]
    assert R == 2
    for t in range(6):
        at = events.index(("row", t))
        marker = next(i for i in range(at, len(events)) if events[i] == ("replace", root))
        synced = {p for kind, p in events[at:marker] if kind == "fsync"}
        for name in ("grad", "weight"):
            shard = str(path / name / f"c.{t // R}.0")
            assert shard in synced, (t, name, sorted(synced))
        if t % R == 0:  # a new shard file: its directory entry too
            assert str(path / "grad") in synced, (t, sorted(synced))


# the tier JSON the header and each data array's attributes stored before tiers became parsed
# objects (TierKind): a reader written against the old strings reads the same bytes
_TIER_JSON = {
    "lossless": '{"tier": "lossless"}',
    "lossless:raw": '{"tier": "lossless", "compress": false}',
    "lossless:bitshuffle": '{"tier": "lossless", "bitshuffle": true}',
    "rounded:9": '{"tier": "rounded", "keepbits": 9, "max_rel_error": 0.0009765625}',
    "bf16": '{"tier": "rounded", "keepbits": 7, "max_rel_error": 0.00390625}',
    "sketch:16": '{"tier": "sketch", "sketch_dim": 16, "seed": 0}',
}


@pytest.mark.parametrize("tier", sorted(_TIER_JSON))
def test_stored_tier_json_is_unchanged(tmp_path, tier):
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(np.random.default_rng(1), 1, d)
    sw = StoreWriter(tmp_path / "a.zarr", tensors, {"grad": tier, "weight": "lossless"}, param_chunk=8)
    sw.append(0, g[0], w[0], loss=0.5, lr=0.1, epoch=0)
    sw.close()
    root = json.loads((tmp_path / "a.zarr" / "zarr.json").read_text())["attributes"]["gradtrace"]
    assert json.dumps(root["tiers"]) == '{"grad": ' + _TIER_JSON[tier] + ', "weight": {"tier": "lossless"}}'
    arrays = ["grad_sketch", "grad_signbits", "grad_nonzero"] if tier.startswith("sketch") else ["grad"]
    for name in arrays:
        attrs = json.loads((tmp_path / "a.zarr" / name / "zarr.json").read_text())["attributes"]
        assert json.dumps(attrs["gradtrace_tier"]) == _TIER_JSON[tier], name
    back = fmt.read_header(tmp_path / "a.zarr").tiers["grad"]
    assert back == fmt.Tier.parse(tier) and type(back.name) is str


@pytest.mark.parametrize("tier", ["lossless", "sketch:16"])
def test_every_stored_array_is_named_by_the_format(tmp_path, tier):
    """The parameter table is created from fmt.TABLE_SPECS, the data arrays from the array
    specs; the store holds exactly these, under the names the format module spells."""
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(np.random.default_rng(2), 1, d)
    sw = StoreWriter(tmp_path / "a.zarr", tensors, {"grad": tier, "weight": "lossless"}, param_chunk=8)
    sw.append(0, g[0], w[0], loss=0.5, lr=0.1, epoch=0)
    sw.close()
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r")
    header = fmt.read_header(tmp_path / "a.zarr")
    for spec in fmt.TABLE_SPECS:
        arr = group[spec.name]
        assert arr.metadata.dimension_names == (fmt.TENSOR_DIM,)
        assert list(arr[:]) == spec.column(tensors), spec.name
    assert list(group[fmt.TENSOR_SHAPE][:]) == ["[3, 5]", "[7]", "[2, 2, 2]"]
    specs = {s.name for s in fmt.store_array_specs(header)}
    assert set(group.array_keys()) == specs | {s.name for s in fmt.TABLE_SPECS}
    data = {n for a in fmt.DATA_ARRAYS for n in fmt.stored_arrays(a, header.tiers[a])}
    assert data == ({"grad_sketch", "grad_signbits", "grad_nonzero", "weight"} if tier.startswith("sketch")
                    else {"grad", "weight"})
    assert data <= specs and set(fmt.PER_STEP_TENSOR_ARRAYS) <= specs and fmt.GRAD_SQNORM in specs


def test_one_row_shards_do_not_pile_up_open_files(tmp_path, monkeypatch):
    """Shards of one row (wide models) are closed after their row, even while commits are
    batched: open file descriptors do not grow with uncommitted rows."""
    import os

    monkeypatch.setattr(fmt, "SHARD_BYTES", 64)
    rng = np.random.default_rng(13)
    tensors = _table()
    g, w = _rows(rng, 6, sum(t.size for t in tensors))
    sw = StoreWriter(tmp_path / "o.zarr", tensors, param_chunk=8)
    assert sw._w["grad"].shard == (1, 2)
    sw.append(0, g[0], w[0], commit=False)
    base = len(os.listdir("/proc/self/fd"))
    for t in range(1, 5):  # kept open, they would be 4 more per row (2 arrays x 2 shard files)
        sw.append(t, g[t], w[t], commit=False)
        assert len(os.listdir("/proc/self/fd")) <= base + 2, t  # slack: another thread's file
    sw.close()
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "o.zarr").grad.values, g[:5])


def test_per_step_blocks_stay_readable_between_commits(tmp_path):
    """Uncommitted rows' per-step values reach the file with the commit, together with the
    block's crc: between commits (where a kill may come) plain zarr reads every block with
    a valid crc, the committed rows and the fill value after them."""
    tensors = _table()
    d = sum(t.size for t in tensors)
    g, w = _rows(np.random.default_rng(2), 5, d)
    sw = StoreWriter(tmp_path / "a.zarr", tensors, {"grad": "lossless", "weight": "lossless"})
    for t in range(3):
        sw.append(t, g[t], w[t], loss=float(t), lr=0.1)
    for t in (3, 4):
        sw.append(t, g[t], w[t], loss=float(t), lr=0.1, commit=False)
    group = zarr.open_group(str(tmp_path / "a.zarr"), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(group["loss"][:5], [0.0, 1.0, 2.0, np.nan, np.nan])  # crc checked
    np.testing.assert_array_equal(group["step"][:5], [0, 1, 2, -1, -1])
    sw.commit()
    np.testing.assert_array_equal(group["loss"][:5], [0.0, 1.0, 2.0, 3.0, 4.0])
    sw.close()


@pytest.mark.parametrize("tiers", ["lossless", "rounded:7", "rounded:5:small", "sketch:64",
                                   {"grad": "sketch:64", "weight": "lossless"}, "lossless:raw"])
@pytest.mark.parametrize("threads,lag_band", [(1, 0), (2, 0), (1, 2)])
def test_a_split_gradient_stores_what_the_flat_one_stores(tmp_path, tiers, threads, lag_band):
    """``SplitRow`` (a CPU model's .grad tensors, read in place): every stored array, per-step
    scalars and per-tensor sums included, equals the flat row's bit for bit: chunks inside one
    tensor, chunks across several, a size-0 tensor, the padded edge chunk, rows without
    weights, a writer pool, and a lag band (which joins the pieces)."""
    from capture.recorder import parse_tiers
    from capture.writer import SplitRow

    tensors = fmt.tensor_table([("a", (700,)), ("e", (0,)), ("b", (3, 5)), ("c", (300, 2)), ("d", (9,))])
    d = sum(t.size for t in tensors)
    rng = np.random.default_rng(9)
    g, w = _rows(rng, 5, d)
    g[:, 100:400] = 0.0  # runs of zeros, as ReLU gradients have
    out = {}
    for how in ("flat", "split"):
        path = tmp_path / f"{how}.zarr"
        sw = StoreWriter(path, tensors, parse_tiers(tiers), param_chunk=256, threads=threads, lag_band=lag_band)
        if how == "split":
            from capture import kernels

            assert sw.reads_split() == (kernels.BACKEND == "numba" and not lag_band)
        for t in range(5):
            row = g[t] if how == "flat" else SplitRow([g[t, x.offset:x.offset + x.size].copy() for x in tensors],
                                                      tensors)
            sw.append(t, row, None if t == 2 else w[t])
        sw.close()
        group = zarr.open_group(str(path), mode="r")
        out[how] = {name: np.asarray(arr[...]) for name, arr in group.arrays()}
    assert out["flat"].keys() == out["split"].keys()
    for name, want in out["flat"].items():
        np.testing.assert_array_equal(out["split"][name], want, err_msg=name)
    assert np.isfinite(out["split"]["grad_sqnorm"]).all()


def test_split_row_pieces_are_views_inside_a_tensor_and_copies_across():
    from capture.writer import SplitRow

    tensors = fmt.tensor_table([("a", (10,)), ("e", (0,)), ("b", (4,)), ("c", (6,))])
    flat = np.arange(20, dtype=np.float32)
    row = SplitRow([flat[t.offset:t.offset + t.size].copy() for t in tensors], tensors)
    inside = row.piece(11, 14)
    assert np.shares_memory(inside, row.parts[2]) and list(inside) == [11, 12, 13]
    for a, b in [(0, 20), (8, 12), (9, 10), (10, 10), (13, 20), (3, 17)]:
        np.testing.assert_array_equal(row.piece(a, b), flat[a:b])
    buf = np.full(20, -1, np.float32)
    assert row.piece(8, 16, buf).base is buf or np.shares_memory(row.piece(8, 16, buf), buf)
    np.testing.assert_array_equal(row.flat(), flat)
    with pytest.raises(ValueError, match=r"tensor 'b' needs a contiguous float32 array of 4 entries"):
        SplitRow([flat[:10], flat[:0], flat[10:13], flat[14:]], tensors)


@pytest.mark.parametrize("fallocate", ["works", "refused"])
def test_shard_files_allocated_ahead_end_at_their_last_chunk(tmp_path, monkeypatch, fallocate):
    """Shard files get their blocks allocated ahead of the appends (Linux fallocate, doubling);
    once closed each file ends at its last chunk, and every chunk reads back. Where fallocate
    fails (a file system without it, or no room for the blocks ahead: the chunks themselves may
    still fit) the file gets plain appends."""
    if fallocate == "refused":
        monkeypatch.setattr(cw, "_FALLOCATE", lambda fd, mode, off, n: -1)
    elif cw._FALLOCATE is None:
        pytest.skip("no fallocate here")
    rng = np.random.default_rng(13)
    tensors = _table()
    g, w = _rows(rng, 9, sum(t.size for t in tensors))
    path = tmp_path / "p.zarr"
    sw = StoreWriter(path, tensors, param_chunk=8)
    for t in range(9):
        sw.append(t, g[t], w[t])
        if t == 4:  # open shard files hold allocated blocks past their chunks, or never try again
            files = sw._w["grad"]._shards.values()
            assert all(f.alloc == 1 << 62 for f in files) if fallocate == "refused" else \
                any(f.alloc > f.end for f in files)
    sw.close()
    _assert_holds_and_ends_at_last_chunks(path, g, w)


def test_shard_files_of_chunks_without_a_crc_are_never_allocated_ahead(tmp_path):
    """Zeros allocated ahead are safe only where every chunk ends in its crc32c: an index entry
    that a power cut left pointing into them fails its checksum. Without one (stores from
    before the crc codec) the readers' other check is an entry past the end of the file, so
    such shard files get plain appends and never hold zeros past their last chunk."""
    if cw._FALLOCATE is None:
        pytest.skip("no fallocate here")
    chunk = np.arange(1000, dtype=np.uint8)
    for ahead in (True, False):
        f = cw._ShardFile(tmp_path / f"c.{ahead}", 4, fresh=True, durable=False, ahead=ahead)
        f.put(0, [chunk])
        f.put(1, [chunk[:10]])
        if ahead and f.alloc == 1 << 62:
            f.close()
            pytest.skip("this file system refuses fallocate")
        size = os.fstat(f.fd).st_size
        assert (size > f.end) == ahead and f.end == 64 + 1010, (ahead, size, f.end)
        f.close()
        assert (tmp_path / f"c.{ahead}").stat().st_size == 64 + 1010
    # the store's own arrays all carry the crc, so their shard files are allocated ahead
    rng = np.random.default_rng(17)
    tensors = _table()
    g, w = _rows(rng, 2, sum(t.size for t in tensors))
    sw = StoreWriter(tmp_path / "s.zarr", tensors, param_chunk=8)
    sw.append(0, g[0], w[0])
    files = [f for name in ("grad", "weight") for f in sw._w[name]._shards.values()]
    assert files and all(f.ahead for f in files)
    sw.close()


def _assert_holds_and_ends_at_last_chunks(path, g, w):
    """The store reads back g and w, and each shard file ends at its last indexed chunk."""
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.grad.values, g)
    np.testing.assert_array_equal(ds.weight.values, w)
    for name in ("grad", "weight"):
        for f in (path / name).glob("c.*"):
            raw = f.read_bytes()
            ends, k, index_end = [], 0, len(raw)
            while 16 * (k + 1) <= index_end:  # the index: entries up to the first chunk's bytes
                o, nb = (int(x) for x in np.frombuffer(raw[16 * k: 16 * k + 16], dtype="<u8"))
                if o != 2**64 - 1:
                    ends.append(o + nb)
                    index_end = min(index_end, o)
                k += 1
            assert len(raw) == max(ends), (f, len(raw), max(ends))


def test_a_resume_appends_over_the_zeros_a_killed_writer_allocated(tmp_path):
    """A killed writer leaves zeros past its shard files' last chunks (blocks allocated ahead):
    a resume appends after the last chunk an index entry points to, and its close trims them."""
    if cw._FALLOCATE is None:
        pytest.skip("no fallocate here")
    rng = np.random.default_rng(15)
    tensors = _table()
    g, w = _rows(rng, 6, sum(t.size for t in tensors))
    path = tmp_path / "k.zarr"
    sw = StoreWriter(path, tensors, param_chunk=8)
    for t in range(3):
        sw.append(t, g[t], w[t])
    # as a kill leaves it: files open and allocated ahead, nothing trimmed, lock released
    open_files = [f for aw in sw._w.values() for f in aw._shards.values()]
    assert any(f.alloc > f.end for f in open_files)
    for f in open_files:
        os.close(f.fd)
        f.fd = None
    sw._unlock()
    sizes = {f.path: f.path.stat().st_size for f in open_files}
    assert any(sizes[f.path] > f.end for f in open_files)  # zeros past the last chunk
    sw2 = StoreWriter(path, tensors, mode="resume")
    for t in range(3, 6):
        sw2.append(t, g[t], w[t])
    sw2.close()
    _assert_holds_and_ends_at_last_chunks(path, g, w)
