"""FSDP2-sharded capture straight to object storage: two gloo ranks record to ``s3://`` (a moto
server in this process), each putting its own chunk objects (tests/helpers_sharded.py ``--s3``).

The store equals, array by array with plain xarray, the same sharded run recorded to a local
path; a SIGKILL of one rank leaves it readable up to its last committed step, every committed
row whole; resume on a URL is refused in one line.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
import zarr

from gradtrace_format import format as fmt
from gradtrace_format.integrity import verify_store
from tests.test_capture_sharded import PC, _kill_rank_1_after, _natural, _run, _start

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from tests.helpers_s3 import moto_s3  # noqa: E402

# each test starts 2-5 Python processes that import torch and join a gloo group
pytestmark = pytest.mark.slow

BUCKET = "sharded"  # moto keeps one backend per process: a bucket of this module's own


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server in a thread and an empty bucket (the ranks reach it over HTTP)."""
    with moto_s3(BUCKET) as server:
        yield {**server, "flag": f"--s3={server['endpoint']}"}


def url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


def _committed(fs, name) -> int:
    """The remote store's commit marker (0 before its root ``zarr.json`` exists)."""
    try:
        fs.invalidate_cache()
        return int(json.loads(fs.cat(f"{BUCKET}/{name}/zarr.json"))["attributes"]["gradtrace"]["n_steps"])
    except (FileNotFoundError, KeyError):
        return 0


def test_sharded_s3_equals_sharded_local(s3, tmp_path):
    local = tmp_path / "local.zarr"
    _run(2, url("run.zarr"), 4, "lossless", s3["flag"], f"--putlog={tmp_path}")
    _run(2, local, 4)
    a = xr.open_zarr(url("run.zarr"), storage_options=s3["opts"])
    b = xr.open_zarr(local)
    assert sorted(a.data_vars) == sorted(b.data_vars) and "shard_column" in a.data_vars
    assert dict(a.sizes) == dict(b.sizes) and a.sizes["step"] == 5
    for name in [*a.data_vars, *a.coords]:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    h = fmt.read_header(url("run.zarr"), storage_options=s3["opts"])
    assert h.closed and h.n_steps == 5 and fmt.layout_of(h) == fmt.layout_of(fmt.read_header(local))
    assert verify_store(url("run.zarr"), storage_options=s3["opts"]) == []
    # one object per chunk: every column chunk of every gradient row (the final row has none),
    # and nothing else (no shard files, no leftover uncommitted rows)
    lay = fmt.layout_of(h)
    s3["fs"].invalidate_cache()
    keys = {k.rsplit("/", 1)[1] for k in s3["fs"].find(f"{BUCKET}/run.zarr/grad")} - {"zarr.json"}
    assert keys == {f"c.{r}.{j}" for r in range(4) for j in range(lay.columns // PC)}

    # the puts, as each rank logged them: every chunk object put once, by the rank owning its
    # columns; the root marker put by rank 0 only, and a marker saying n_steps = n starts after
    # every chunk put of rows < n has returned, on every rank
    puts = [json.loads(line) for r in range(2) for line in (tmp_path / f"puts{r}.jsonl").read_text().splitlines()]
    chunks = [(p["rank"], k, p["t1"]) for p in puts for k in p["keys"] if k.split("/")[0] in ("grad", "weight")]
    assert len(chunks) == len({k for _, k, _ in chunks}) == 2 * len(keys) + lay.columns // PC  # final row: weights only
    for rank, key, _ in chunks:
        lo, hi = lay.rank_columns(rank)
        assert lo // PC <= int(key.rsplit(".", 1)[1]) < hi // PC, (rank, key)
    assert {r for r, _, _ in chunks} == {0, 1}
    markers = [p for p in puts if "n_steps" in p]
    assert markers and {p["rank"] for p in markers} == {0} and markers[-1]["n_steps"] == 5
    for m in markers:
        late = [(r, k) for r, k, t1 in chunks if int(k.split(".")[1]) < m["n_steps"] and t1 > m["t0"]]
        assert not late, (m["n_steps"], late)


def test_kill_one_rank_keeps_committed_steps_on_s3(s3, tmp_path):
    steps, name = 60, "killed.zarr"
    store = url(name)
    procs = _start(2, store, steps, "lossless", "--slow", s3["flag"])
    out0 = _kill_rank_1_after(procs, lambda: _committed(s3["fs"], name), 4)
    h = fmt.read_header(store, storage_options=s3["opts"])
    n = h.n_steps
    assert 4 <= n < steps and not h.closed, (n, out0[-1500:])
    ref = tmp_path / "ref.zarr"
    _run(1, ref, n + 1, "lossless", "--plain")
    r = xr.open_zarr(ref)
    g = zarr.open_group(store, mode="r", use_consolidated=False, storage_options=s3["opts"])
    cols = fmt.layout_of(h).natural_columns(len(h.tensors))
    np.testing.assert_array_equal(g["step"][:n], np.arange(n))
    for arr in ("grad", "weight"):
        rows = g[arr][:n][:, cols]  # every committed row whole: no chunk object of either rank missing
        np.testing.assert_allclose(rows, r[arr].values[:n], rtol=0, atol=1e-6)
    np.testing.assert_allclose(g["grad_sqnorm"][:n], r.grad_sqnorm.values[:n], rtol=1e-12)
    # the analysis reader takes the committed rows (rows >= n_steps are ignored)
    import analysis

    run = analysis.open_run(store, storage_options=s3["opts"])
    assert run.ds.sizes["step"] == n
    np.testing.assert_allclose(run.natural("grad", n - 1).values, r.grad.values[n - 1], rtol=0, atol=1e-6)

    # resume on a URL is refused in one line, on every rank, and the store is left alone
    procs = _start(2, store, steps, "lossless", "--resume", s3["flag"])
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode != 0
        assert "ValueError: resume=True is for local paths only" in out, out[-2000:]
    assert fmt.read_header(store, storage_options=s3["opts"]).n_steps == n


def test_remote_sharded_creation_puts_the_marker_last(s3, monkeypatch):
    """Rank 0's writer of a sharded store at a URL (in process, no ranks needed): the root
    ``zarr.json`` with the gradtrace header is first put once every array, the shard table
    included, exists; a creation killed before it leaves no run."""
    from capture.sharded import _ShardedStoreWriter
    from capture.writer import StoreWriter

    tensors = fmt.tensor_table([("a", (10, 6)), ("b", (10,))])
    layout = fmt.sharded_layout(tensors, [[(0, 0, 5), (1, 0, 5)], [(0, 5, 10), (1, 5, 10)]], 16)
    seen = []

    def write_header(self):
        s3["fs"].invalidate_cache()
        seen.append(sorted(k.rsplit("/", 2)[-2] for k in s3["fs"].find(f"{BUCKET}/created.zarr")
                           if k.endswith("/zarr.json") and k.count("/") > 2))
        raise KeyboardInterrupt("killed at the marker")

    monkeypatch.setattr(StoreWriter, "_write_header", write_header)
    with pytest.raises(KeyboardInterrupt):
        _ShardedStoreWriter(url("created.zarr"), tensors, {}, layout, storage_options=s3["opts"])
    assert len(seen) == 1 and set(fmt.SHARD_ARRAYS) <= set(seen[0]) and {"grad", "weight", "step"} <= set(seen[0])
    with pytest.raises(Exception, match="not a gradtrace run store"):
        import analysis

        analysis.open_run(url("created.zarr"), storage_options=s3["opts"])
