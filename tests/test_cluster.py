"""The same numbers on a real 2-process dask.distributed LocalCluster as on the threaded scheduler."""

import numpy as np
import pytest

import analysis as ga
from analysis import engine
from tests.helpers_stores import make_store

distributed = pytest.importorskip("distributed")


def results(path, ref):
    return {
        "corr": ga.corr_matrix(path).values,
        "corr_f32": ga.corr_matrix(path, precision="float32").values,
        "windows": ga.corr_windows(path, h=3).values,
        "signs": ga.sign_shift_matrix(path).sign_shift.values,
        "rsi": ga.rsi(path, reference=ref).to_array().values,
        "rsi_mean": ga.rsi(path, reference=slice(2, 4), params="fc*").gamma.values,
        "layers": ga.layer_table(path).drop_vars("shape").to_array().values,
        "balance": ga.balancedness(path).values,
    }


@pytest.mark.slow
def test_localcluster_matches_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(engine, "SLAB_BYTES", 1)  # one storage chunk per task: many tasks
    data = make_store(tmp_path / "run.zarr", steps=10, seed=21)
    sketch = make_store(tmp_path / "sketch.zarr", steps=6, tiers="sketch:64", seed=22,
                        shapes=(("big", (300,)), ("small", (9,))))
    ref = np.random.default_rng(0).standard_normal(data.d)
    local = results(data.path, ref)
    local_sketch = ga.sign_shift_lag(sketch.path, 1).sign_shift.values
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cl, \
            distributed.Client(cl):
        with distributed.get_task_stream() as stream:
            remote = results(data.path, ref)
            remote_sketch = ga.sign_shift_lag(sketch.path, 1).sign_shift.values
        explicit = ga.corr_matrix(data.path, scheduler="threads").values  # an explicit scheduler wins
    ran = [t for t in stream.data if "_slab_task" in str(t["key"])]
    assert len(ran) > 20 and len({t["worker"] for t in ran}) == 2  # the slabs ran on both worker processes
    for k in local:
        np.testing.assert_allclose(remote[k], local[k], rtol=1e-12, atol=1e-12, err_msg=k)
    np.testing.assert_array_equal(remote_sketch, local_sketch)
    np.testing.assert_array_equal(explicit, local["corr"])
