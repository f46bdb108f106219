"""Recording straight to object storage: ``Recorder(model, "s3://...", storage_options=...)``.

Against a moto S3 server on 127.0.0.1 (as in ``tests/test_remote.py``): a run
recorded to s3:// equals the same run recorded to a local path, array by array, for every
tier (read with plain ``xarray.open_zarr`` and with ``analysis.open_run``); the integrity
verifier passes on it; a writer stopped between its chunk puts and its commit, or killed with
SIGKILL, leaves a store readable up to its last committed step; a creation stopped before its
root metadata is never taken for a run; bad URLs get one line naming the fix.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import warnings

import numpy as np
import pytest
import xarray as xr

import analysis as ga
from gradtrace_format import format as fmt
from gradtrace_format.integrity import verify_store
s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
torch = pytest.importorskip("torch")

from capture import Recorder  # noqa: E402
from capture import writer as writer_mod  # noqa: E402
from capture.writer import StoreWriter  # noqa: E402
from tests.helpers_s3 import moto_s3  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TENSORS = fmt.tensor_table([("a", (300,)), ("b", (7,))])
# moto keeps one in-memory backend per process: a bucket of its own, apart from test_remote's
BUCKET = "capture"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server in a thread and an empty bucket."""
    with moto_s3(BUCKET) as server:
        yield server


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def train(path, *, steps=7, storage_options=None, recorder=Recorder, **options) -> None:
    """A small MLP, plain SGD, the same batches every time: the same run wherever it is stored."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g)
    with recorder(model, path, opt, storage_options=storage_options, **options) as rec:
        for step in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x[step % 4 * 8:][:8]), y[step % 4 * 8:][:8])
            loss.backward()
            rec.record(step, loss=loss, epoch=step // 4)
            opt.step()
            opt.zero_grad()


def assert_same_arrays(a: xr.Dataset, b: xr.Dataset) -> None:
    assert sorted(a.data_vars) == sorted(b.data_vars)
    assert dict(a.sizes) == dict(b.sizes)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    for name in a.coords:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("tiers,options", [
    ("lossless", {"lag_band": 2, "weight_schedule": "every:3", "param_chunk": 128}),
    ("rounded:7", {"param_chunk": 128}),
    ("sketch:64", {"param_chunk": 64}),
])
def test_recorder_s3_equals_local(s3, tmp_path, tiers, options):
    name = f"rec-{tiers.replace(':', '-')}.zarr"
    train(tmp_path / name, tiers=tiers, **options)
    train(url(name), tiers=tiers, storage_options=s3["opts"], **options)
    s3["fs"].invalidate_cache()
    with xr.open_zarr(tmp_path / name) as local, xr.open_zarr(url(name), storage_options=s3["opts"]) as remote:
        assert local.sizes["step"] == 8  # seven gradient steps and the final iterate
        assert_same_arrays(remote, local)
    run_l, run_r = ga.open_run(tmp_path / name), ga.open_run(url(name), storage_options=s3["opts"])
    assert run_r.header.n_steps == run_l.header.n_steps == 8 and run_r.header.closed
    assert run_r.header.tiers == run_l.header.tiers
    assert [t.to_json() for t in run_r.header.tensors] == [t.to_json() for t in run_l.header.tensors]
    assert_same_arrays(run_r.ds.load(), run_l.ds.load())
    assert verify_store(url(name), storage_options=s3["opts"]) == []
    assert s3["fs"].exists(f"{BUCKET}/{name}/zarr.json")
    assert not s3["fs"].exists(f"{BUCKET}/{name}/{fmt.LOCK_NAME}")  # no lock object on a URL


def rows(seed: int, n: int, d: int = 307):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32), rng.standard_normal((n, d)).astype(np.float32)


def test_stopped_before_commit_reads_committed_rows(s3, monkeypatch):
    """Rows written but not committed (their chunk objects and per-step blocks put, the root
    zarr.json not) are not read; the rows before them are, exactly; the verifier passes.
    A capacity of 4 rows makes the arrays grow twice on the way."""
    monkeypatch.setattr(writer_mod, "INITIAL_CAPACITY", 4)
    G, W = rows(3, 12)
    w = StoreWriter(url("stopped.zarr"), TENSORS, param_chunk=256, storage_options=s3["opts"])
    for i in range(9):
        w.append(10 + i, G[i], W[i], loss=float(i))
    w.append(19, G[9], W[9], commit=False)  # written, never committed
    # the next commit dies after the per-step blocks and before the marker
    put = w.sink.put

    def killed(rel, data):
        if rel == "zarr.json":
            raise KeyboardInterrupt("killed")
        put(rel, data)

    w.append(20, G[10], W[10], commit=False)
    monkeypatch.setattr(w.sink, "put", killed)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    s3["fs"].invalidate_cache()
    run = ga.open_run(url("stopped.zarr"), storage_options=s3["opts"])
    assert run.header.n_steps == 9 and not run.header.closed
    np.testing.assert_array_equal(run.ds.step.values, 10 + np.arange(9))
    np.testing.assert_array_equal(run.ds.grad.values, G[:9])
    np.testing.assert_array_equal(run.ds.weight.values, W[:9])
    np.testing.assert_array_equal(run.ds.loss.values, np.arange(9.0))
    assert verify_store(url("stopped.zarr"), storage_options=s3["opts"]) == []
    with xr.open_zarr(url("stopped.zarr"), storage_options=s3["opts"], consolidated=False) as ds:
        np.testing.assert_array_equal(ds.grad.values[:9], G[:9])  # plain zarr: the committed rows, then rows to ignore


def test_half_created_store_is_not_a_run(s3, monkeypatch):
    """A creation stopped before the root metadata with the gradtrace header: not a run, and
    a new recorder at that URL refuses it in one line."""

    def killed(self):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(StoreWriter, "_write_header", killed)
    with pytest.raises(KeyboardInterrupt):
        StoreWriter(url("half.zarr"), TENSORS, storage_options=s3["opts"])
    monkeypatch.undo()
    s3["fs"].invalidate_cache()
    assert s3["fs"].exists(f"{BUCKET}/half.zarr/grad/zarr.json")  # the arrays were created
    with pytest.raises(ga.NotAStoreError, match="not a gradtrace run store"):
        ga.open_run(url("half.zarr"), storage_options=s3["opts"])
    with pytest.raises(FileExistsError, match="already holds objects") as err:
        StoreWriter(url("half.zarr"), TENSORS, storage_options=s3["opts"])
    assert "\n" not in str(err.value)


CHILD = textwrap.dedent(
    """
    import sys, numpy as np
    from gradtrace_format import format as fmt
    from capture.writer import StoreWriter
    url, endpoint = sys.argv[1], sys.argv[2]
    opts = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    rng = np.random.default_rng(7)
    G = rng.standard_normal((100000 // 307 + 1, 307)).astype(np.float32)
    w = StoreWriter(url, fmt.tensor_table([("a", (300,)), ("b", (7,))]), param_chunk=64, storage_options=opts)
    for i in range(100000):
        g = np.roll(G[i % G.shape[0]], i)
        w.append(i, g, -g, loss=float(i))
        print(i, flush=True)
    """
)


@pytest.mark.slow
def test_sigkill_reads_committed_rows(s3):
    """A writer process killed with SIGKILL while recording: the store opens, holds the rows
    committed before the kill (at least those it reported), each exactly as written."""
    rng = np.random.default_rng(7)
    G = rng.standard_normal((100000 // 307 + 1, 307)).astype(np.float32)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for k, (min_rows, delay) in enumerate(((4, 0.037),)):
        name = f"killed{k}.zarr"
        p = subprocess.Popen([sys.executable, "-c", CHILD, url(name), s3["endpoint"]], stdout=subprocess.PIPE,
                             text=True, env=env, cwd=ROOT)
        try:
            seen = -1
            deadline = time.monotonic() + 120
            while seen < min_rows - 1 and time.monotonic() < deadline:
                line = p.stdout.readline()
                assert line, "the writer process ended before it was killed"
                seen = int(line)
            time.sleep(delay)
            p.send_signal(signal.SIGKILL)
        finally:
            p.kill()
            p.wait(timeout=30)
        s3["fs"].invalidate_cache()
        run = ga.open_run(url(name), storage_options=s3["opts"])
        n = run.header.n_steps
        assert n >= seen + 1 and not run.header.closed
        want = np.stack([np.roll(G[i % G.shape[0]], i) for i in range(n)])
        np.testing.assert_array_equal(run.ds.grad.values, want)
        np.testing.assert_array_equal(run.ds.weight.values, -want)
        np.testing.assert_array_equal(run.ds.loss.values, np.arange(n, dtype=float))
        assert verify_store(url(name), storage_options=s3["opts"]) == []


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_urls(s3, tmp_path):
    opts = s3["opts"]
    with pytest.raises(FileNotFoundError, match="Create the bucket first") as e:
        StoreWriter("s3://no-such-bucket/run.zarr", TENSORS, storage_options=opts)
    assert "no-such-bucket" in one_line(e)
    with pytest.raises(ValueError, match="key inside the bucket") as e:
        StoreWriter(f"s3://{BUCKET}", TENSORS, storage_options=opts)
    one_line(e)
    with pytest.raises(ValueError, match="knows no protocol 'nosuch://'") as e:
        StoreWriter("nosuch://b/run.zarr", TENSORS)
    one_line(e)
    for mode in ("resume", "overwrite"):
        with pytest.raises(ValueError, match=f"{mode}=True is for local paths only") as e:
            StoreWriter(url("x.zarr"), TENSORS, mode=mode, storage_options=opts)
        one_line(e)
    with pytest.raises(ValueError, match="storage_options are for URLs") as e:
        StoreWriter(tmp_path / "local.zarr", TENSORS, storage_options=opts)
    one_line(e)
    bad = {**opts, "endpoint_url": "http://127.0.0.1:1"}  # nothing listens there
    with pytest.raises(OSError, match="cannot reach .*storage_options") as e:
        StoreWriter(url("y.zarr"), TENSORS, storage_options={**bad, "config_kwargs": {"retries": {"max_attempts": 1}}})
    one_line(e)


def test_missing_backend():
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed")
    with pytest.raises(ImportError, match="install it .*gcsfs") as e:
        StoreWriter("gs://bucket/run.zarr", TENSORS)
    one_line(e)


def test_recorder_url_errors(s3, tmp_path):
    with pytest.raises(ValueError, match="resume=True is for local paths only"):
        train(url("r.zarr"), steps=1, storage_options=s3["opts"], resume=True)
    train(url("twice.zarr"), steps=2, storage_options=s3["opts"])
    with pytest.raises(FileExistsError, match="already holds objects"):
        train(url("twice.zarr"), steps=2, storage_options=s3["opts"])


def test_file_url_is_a_local_path(tmp_path):
    """``file://`` is the local writer (lock, atomic creation, resume): the same store."""
    G, W = rows(4, 3)
    w = StoreWriter((tmp_path / "f.zarr").as_uri(), TENSORS, param_chunk=64)
    assert w.sink is None and w.path == tmp_path / "f.zarr"
    for i in range(3):
        w.append(i, G[i], W[i])
    w.close()
    w = StoreWriter((tmp_path / "f.zarr").as_uri(), TENSORS, param_chunk=64, mode="resume")
    w.append(3, G[0], W[0])
    w.close()
    run = ga.open_run(tmp_path / "f.zarr")
    np.testing.assert_array_equal(run.ds.grad.values, np.concatenate([G, G[:1]]))


def test_commit_order_of_puts(s3):
    """Each commit's puts: the rows' chunk objects and the per-step blocks, then the root
    ``zarr.json`` (the commit marker) alone and last."""
    G, W = rows(5, 3)
    w = StoreWriter(url("order.zarr"), TENSORS, param_chunk=256, storage_options=s3["opts"])
    log: list[list[str]] = []
    put, put_many = w.sink.put, w.sink.put_many
    w.sink.put = lambda rel, data: (log.append([rel]), put(rel, data))
    w.sink.put_many = lambda items: (log.append(sorted(items)), put_many(items))
    w.append(0, G[0], W[0])

    def keys(a, n=None):
        arr = w.arrays[a]
        coords = [(n, j) for j in range(2)] if n is not None else [(0,) * arr.ndim]
        return [f"{a}/{arr.metadata.encode_chunk_key(c)}" for c in coords]

    scalars = sorted(k for a in w._scalar_names for k in keys(a))
    # a row and its commit: every chunk object and block in one concurrent batch, then the marker
    assert log == [sorted(keys("grad", 0) + keys("weight", 0) + scalars), ["zarr.json"]]
    log.clear()
    w.append(1, G[1], W[1], commit=False)
    assert log == []  # staged until the commit or the next row
    w.append(2, G[2], None, commit=False)  # no weights: nothing to delete in a new store
    assert log == [sorted(keys("grad", 1) + keys("weight", 1))]
    w.commit()  # two rows under one commit: one put of each block
    assert log[1:] == [sorted(keys("grad", 2) + scalars), ["zarr.json"]]
    # a rewound row's staged chunks are never put
    log.clear()
    w.append(3, G[0], W[0], commit=False)
    w.rewind()
    w.append(3, G[1], None, commit=False)
    w.commit()
    assert log == [sorted(keys("grad", 3) + scalars), ["zarr.json"]]
    w.close()
    run = ga.open_run(url("order.zarr"), storage_options=s3["opts"])
    np.testing.assert_array_equal(run.ds.grad.values, np.stack([G[0], G[1], G[2], G[1]]))
    assert np.isnan(run.ds.weight.values[2:]).all()


def test_recorder_put_failure_keeps_committed_steps(s3, tmp_path):
    """The object store fails mid-run: record() raises one error naming the URL and the fix,
    and the store holds the steps committed before, exactly as a local recording of the run."""
    from capture.recorder import RecorderWriteError

    train(tmp_path / "ref.zarr", steps=8, param_chunk=128)
    calls = {"n": 0}

    class Failing(Recorder):
        def record(self, step, *a, **kw):
            if step == 4:  # the store goes away: every later put fails
                self.flush()

                def down(*_a, **_kw):
                    calls["n"] += 1
                    raise ConnectionError("endpoint unreachable")

                self.writer.sink.put_many = down
            return super().record(step, *a, **kw)

    # the error reaches the loop in a later record() (then the close after that training error
    # fails too, with a warning) or, when the loop finished before the writer failed, in close()
    # itself: which of the two depends on the threads' timing
    with pytest.raises(RecorderWriteError, match=r"could not write step \d to s3://.*4 steps committed.*"
                                                 r"a URL cannot be resumed") as e, \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(url("down.zarr"), steps=8, storage_options=s3["opts"], param_chunk=128, recorder=Failing)
    one_line(e)
    for w in caught:  # the close after the training error says so, if it came to that
        if "closing" in str(w.message):
            assert "after a training error also failed" in str(w.message), w.message
    assert calls["n"] >= 1
    s3["fs"].invalidate_cache()
    run = ga.open_run(url("down.zarr"), storage_options=s3["opts"])
    assert run.header.n_steps == 4 and not run.header.closed
    ref = ga.open_run(tmp_path / "ref.zarr")
    for name in ("grad", "weight", "loss", "step", "grad_sqnorm"):
        np.testing.assert_array_equal(run.ds[name].values, ref.ds[name].values[:4], err_msg=name)
    assert verify_store(url("down.zarr"), storage_options=s3["opts"]) == []


def test_memory_url(tmp_path):
    """Any fsspec URL, not only s3://: fsspec's in-memory filesystem (synchronous) gives the
    same store as a local path."""
    G, W = rows(6, 5)
    for path in (tmp_path / "m.zarr", f"memory://gradtrace-test-{os.getpid()}/m.zarr"):
        w = StoreWriter(path, TENSORS, param_chunk=64, tiers={"grad": "rounded:7"})
        for i in range(5):
            w.append(i, G[i], W[i], commit=i % 2 == 0)
        w.close(W[0])
    local, mem = ga.open_run(tmp_path / "m.zarr"), ga.open_run(path)
    assert mem.header.n_steps == 6 and mem.final_step == 5
    assert_same_arrays(mem.ds.load(), local.ds.load())
    assert verify_store(path) == []
