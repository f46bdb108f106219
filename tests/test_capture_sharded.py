"""FSDP2-sharded capture with two real processes (gloo, CPU): every rank writes its own columns,
and the store equals a single-process recording of the same training (tests/helpers_sharded.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from gradtrace_format import format as fmt

# each test starts 2-5 Python processes that import torch and join a gloo group: 20-80 s here
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HELPER = ROOT / "tests" / "helpers_sharded.py"
PC = 16  # chunk width: several chunks per rank, and pad columns at the end of each rank's range
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(world, store, steps, tiers="lossless", *flags):
    port = _port()
    return [subprocess.Popen([sys.executable, str(HELPER), str(r), str(world), str(port), str(store), str(steps),
                              tiers, str(PC), *flags], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for r in range(world)]


def _run(world, store, steps, tiers="lossless", *flags):
    procs = _start(world, store, steps, tiers, *flags)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-3000:]}"


def _natural(ds, name):
    """Rows of a sharded array in natural order, from plain xarray and the stored shard table."""
    rows = np.asarray(ds[name].values)
    cols = np.concatenate([np.arange(c, c + n) for c, n in zip(ds.shard_column.values, ds.shard_size.values)])
    return rows[:, cols], cols


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded")
    sharded, plain = tmp / "sharded.zarr", tmp / "plain.zarr"
    _run(2, sharded, 4)
    _run(1, plain, 4, "lossless", "--plain")
    return sharded, plain


def test_sharded_store_equals_unsharded_recording(lossless):
    sharded, plain = lossless
    a, b = xr.open_zarr(sharded), xr.open_zarr(plain)
    d = int(b.sizes["param"])
    assert a.sizes["step"] == b.sizes["step"] == 5
    np.testing.assert_array_equal(a.step.values, b.step.values)
    np.testing.assert_array_equal(a.flags.values, b.flags.values)
    # the parameter table is the natural one; the shard table tiles every tensor's rows
    np.testing.assert_array_equal(a.tensor_offset.values, b.tensor_offset.values)
    assert int(a.shard_size.values.sum()) == d
    h = fmt.read_header(sharded)
    lay = fmt.layout_of(h)
    assert h.n_params == d and lay.world_size == 2 and lay.chunk % 8 == 0 and lay.rank_width % lay.chunk == 0
    assert a.sizes["param"] == lay.columns > d  # pads
    assert (a.shard_size.values[a.shard_tensor.values == 5] > 0).sum() == 1  # 4.bias: rank 1 holds nothing
    for name in ("grad", "weight"):
        nat, cols = _natural(a, name)
        ref = b[name].values
        np.testing.assert_allclose(nat, ref, rtol=0, atol=1e-6, equal_nan=True)
        # pad columns belong to no tensor and are zeros (NaN only where the row has no data)
        pads = np.setdiff1d(np.arange(a.sizes["param"]), cols)
        stored = a[name].values
        have = ~np.isnan(ref).all(axis=1)
        assert pads.size and (stored[have][:, pads] == 0).all()
    for name in ("grad_sqnorm", "weight_sqnorm", "grad_dot_weight"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, equal_nan=True)
        np.testing.assert_allclose(a[f"{name}_tensor"].values, b[f"{name}_tensor"].values, rtol=1e-12,
                                   atol=1e-300, equal_nan=True)
    # and against a float64 sum of the natural rows read back
    g = _natural(a, "grad")[0][:4].astype(np.float64)
    np.testing.assert_allclose(a.grad_sqnorm.values[:4], (g * g).sum(1), rtol=1e-12)
    np.testing.assert_allclose(a.loss.values, b.loss.values, rtol=1e-7, equal_nan=True)


def test_sharded_store_through_analysis(lossless):
    import analysis
    from capture import restore_weights
    from tests.helpers_sharded import build

    sharded, plain = lossless
    ra, rb = analysis.open_run(sharded), analysis.open_run(plain)
    grp = ra.params()
    lay = ra.layout
    assert grp.size == rb.params().size == ra.n_params
    covered = sum(hi - lo for lo, hi in grp.ranges)
    assert covered == ra.n_params < lay.columns  # the pads are in no range
    for t in range(4):
        np.testing.assert_array_equal(ra.natural("grad", t).values, rb.ds.grad.values[t])
        np.testing.assert_array_equal(ra.natural("weight", t, "2.*").values,
                                      rb.natural("weight", t, "2.*").values)
    for den in ("both_nonzero", "all"):
        ta, tb = analysis.layer_table(ra, denominator=den), analysis.layer_table(rb, denominator=den)
        for v in ("corr_mean", "sign_shift_mean", "zero_share_mean", "gamma_mean", "rsi_mean"):
            np.testing.assert_allclose(ta[v].values, tb[v].values, rtol=1e-9, err_msg=f"{v} ({den})")
        sa = analysis.sign_shift_lag(ra, 1, denominator=den)
        sb = analysis.sign_shift_lag(rb, 1, denominator=den)
        for v in ("sign_shift", "zero_share"):
            np.testing.assert_allclose(sa[v].values, sb[v].values, rtol=1e-12)
    np.testing.assert_allclose(analysis.balancedness(ra).values, analysis.balancedness(rb).values, rtol=1e-9)
    np.testing.assert_allclose(analysis.rsi(ra)["rsi"].values, analysis.rsi(rb)["rsi"].values, rtol=1e-9)
    # a reference given as a natural-order vector is mapped to the shard columns
    w2 = rb.ds.weight.values[2].astype(np.float64)
    np.testing.assert_allclose(analysis.rsi(ra, w2)["rsi"].values, analysis.rsi(rb, w2)["rsi"].values, rtol=1e-9)
    assert analysis.verify_store(sharded) == []
    # restore into an unsharded model: the natural weights
    model = build()
    restore_weights(model, sharded, 3)
    flat = np.concatenate([p.detach().numpy().reshape(-1) for p in model.parameters()])
    np.testing.assert_array_equal(flat, rb.ds.weight.values[3])


def test_sharded_sketch_and_rounded_equal_unsharded(tmp_path):
    """Also with a weight schedule (weights every other step) and a lag band of 2."""
    tiers = "grad=sketch:24,weight=rounded:7"
    _run(2, tmp_path / "s.zarr", 3, tiers, "--wsched")
    _run(1, tmp_path / "p.zarr", 3, tiers, "--plain", "--wsched")
    a, b = xr.open_zarr(tmp_path / "s.zarr"), xr.open_zarr(tmp_path / "p.zarr")
    d = int(b.tensor_size.values.sum())
    assert a.attrs["gradtrace"]["tiers"]["grad"]["tier"] == "sketch"
    # the sketch hashes by natural coordinate: the summed partial sketches are the unsharded sketch
    sk_a, sk_b = a.grad_sketch.values[:3], b.grad_sketch.values[:3]
    assert sk_a.shape == sk_b.shape and np.abs(sk_b).max() > 0
    np.testing.assert_allclose(sk_a, sk_b, rtol=1e-6, atol=1e-7 * np.abs(sk_b).max())
    for plane in ("grad_signbits", "grad_nonzero"):
        bits = np.unpackbits(a[plane].values, axis=1)
        cols = np.concatenate([np.arange(c, c + n) for c, n in zip(a.shard_column.values, a.shard_size.values)])
        np.testing.assert_array_equal(bits[:3][:, cols], np.unpackbits(b[plane].values, axis=1)[:3, :d])
        pads = np.setdiff1d(np.arange(bits.shape[1]), cols)
        assert (bits[:, pads] == 0).all()  # pads are zeros: no sign, not nonzero
    nat, _ = _natural(a, "weight")
    np.testing.assert_array_equal(nat, b.weight.values)  # NaN rows (no weights at step 1) included
    np.testing.assert_array_equal(a.flags.values, b.flags.values)
    assert (a.flags.values[1] & fmt.FLAG_NO_WEIGHT) and np.isnan(nat[1]).all() and not np.isnan(nat[2]).any()
    for name in ("grad_sqnorm", "weight_sqnorm", "grad_dot_weight", "grad_sqnorm_tensor", "grad_lag_dot"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-12, equal_nan=True, err_msg=name)
    assert np.isfinite(a.grad_lag_dot.values[2]).all()  # lags 1 and 2 at the third row
    import analysis

    for den in ("both_nonzero", "all"):
        sa = analysis.sign_shift_lag(str(tmp_path / "s.zarr"), 1, denominator=den)
        sb = analysis.sign_shift_lag(str(tmp_path / "p.zarr"), 1, denominator=den)
        for v in ("sign_shift", "zero_share"):
            np.testing.assert_allclose(sa[v].values, sb[v].values, rtol=1e-12)


def _committed(store):
    try:
        return fmt.read_header(store).n_steps
    except Exception:  # noqa: BLE001 - not created yet
        return 0


def _kill_rank_1_after(procs, committed, n: int) -> str:
    """Wait until ``committed()`` reaches n steps, SIGKILL rank 1, and return rank 0's output
    (gloo makes rank 0 fail on the lost peer); every process is gone afterwards."""
    try:
        t0 = time.time()
        while committed() < n:
            assert time.time() - t0 < 200, "the sharded run committed no step"
            assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-2000:]
            time.sleep(0.02)
        procs[1].send_signal(signal.SIGKILL)
        try:
            out0 = procs[0].communicate(timeout=60)[0]  # gloo reports the lost peer
        except subprocess.TimeoutExpired:
            procs[0].kill()
            out0 = procs[0].communicate()[0]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode != 0
    return out0


def test_kill_one_rank_keeps_every_committed_step_and_resume(tmp_path):
    steps = 60
    store, ref = tmp_path / "k.zarr", tmp_path / "ref.zarr"
    procs = _start(2, store, steps, "lossless", "--slow")
    out0 = _kill_rank_1_after(procs, lambda: _committed(store), 5)
    h = fmt.read_header(store)
    n = h.n_steps
    assert 5 <= n < steps and not h.closed, (n, out0[-1500:])
    _run(1, ref, steps, "lossless", "--plain")
    r = xr.open_zarr(ref)
    g = zarr.open_group(str(store), mode="r", use_consolidated=False)
    lay = fmt.layout_of(h)
    cols = lay.natural_columns(len(h.tensors))
    np.testing.assert_array_equal(g["step"][:n], np.arange(n))
    for name in ("grad", "weight"):
        rows = g[name][:n][:, cols]  # every committed row whole: no chunk of either rank missing
        np.testing.assert_allclose(rows, r[name].values[:n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["grad_sqnorm"][:n], r.grad_sqnorm.values[:n], rtol=1e-12)

    # resume with the same world size: the store ends as the uninterrupted recording
    _run(2, store, steps, "lossless", "--resume")
    a = xr.open_zarr(store)
    assert a.sizes["step"] == steps + 1
    np.testing.assert_allclose(_natural(a, "grad")[0], r.grad.values, rtol=0, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(_natural(a, "weight")[0], r.weight.values, rtol=0, atol=1e-6)
    np.testing.assert_allclose(a.grad_sqnorm.values, r.grad_sqnorm.values, rtol=1e-12, equal_nan=True)

    # another world size is refused with one line
    p = _start(1, store, steps + 5, "lossless", "--resume")[0]
    out = p.communicate(timeout=300)[0]
    assert p.returncode != 0
    assert "recorded by 2 ranks and this run has 1" in out, out[-2000:]
    assert fmt.read_header(store).n_steps == steps + 1  # untouched
