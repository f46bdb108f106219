"""Recomputed full-batch / probe-batch gradients at a store's iterates, against direct autograd."""

import numpy as np
import pytest
import torch
import xarray as xr

import analysis as ga
from gradtrace_format.format import FLAG_FINAL, read_header
from experiments.recipes import RunConfig, run_recipe
from experiments.recompute import probe_indices, recompute_gradients
from experiments.train import build

# minibatch SGD with momentum: the recorded gradients are minibatch gradients
CFG = dict(name="mb", model="mlp", model_kwargs={"hidden": [8]}, dataset="digits", n_train=96, standardize=True,
           optimizer="sgd", momentum=0.9, lr=0.05, batch_size=16, steps=9, num_threads=1)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return run_recipe(RunConfig(**CFG), tmp_path_factory.mktemp("rc") / "mb.zarr", progress=False)


def direct(parent, rows_idx=None):
    """Full-batch (or probe) gradients and losses at every recorded weight row, plain autograd."""
    ds = xr.open_zarr(parent)
    final = (ds.flags.values & FLAG_FINAL) != 0
    built = build(RunConfig(**CFG))
    X, y = built.X, built.y
    if rows_idx is not None:
        X, y = X[torch.from_numpy(rows_idx)], y[torch.from_numpy(rows_idx)]
    params = list(built.model.parameters())
    G, L = [], []
    for w in ds.weight.values[~final]:
        pos = 0
        with torch.no_grad():
            for p in params:
                p.copy_(torch.from_numpy(w[pos: pos + p.numel()].copy()).view(p.shape))
                pos += p.numel()
        for p in params:
            p.grad = None
        loss = built.loss_fn(built.model(X), y)
        loss.backward()
        G.append(torch.cat([p.grad.reshape(-1) for p in params]).numpy())
        L.append(float(loss.detach()))
    return ds, np.array(G), np.array(L), final


def test_full_batch_gradients_into_a_sibling_store(parent, tmp_path):
    out = recompute_gradients(parent, tmp_path / "full.zarr")
    ds, G, L, final = direct(parent)
    sib = xr.open_zarr(out)
    np.testing.assert_array_equal(sib.step.values, ds.step.values)
    np.testing.assert_array_equal(sib.weight.values, ds.weight.values)  # iterates copied bit for bit
    np.testing.assert_allclose(sib.grad.values[~final], G, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sib.loss.values[~final], L, rtol=1e-6)
    np.testing.assert_array_equal(sib.lr.values, ds.lr.values)
    assert (sib.flags.values[-1] & FLAG_FINAL) and not np.allclose(sib.grad.values[:-1], ds.grad.values[:-1])
    s = read_header(out).settings["recomputed"]
    assert s["parent"] == str(parent) and s["gradient"] == "full batch (96 examples)" and s["probe_indices"] is None
    r = ga.rsi(out)  # NWT's measurement from one recorded run
    assert r.sizes["step"] == 9 and np.isfinite(r.gamma.values[:-1]).all()


def test_probe_batch_and_dask_batch(parent, tmp_path):
    a = recompute_gradients(parent, tmp_path / "probe.zarr", probe=20, probe_seed=3, steps=slice(2, 6))
    idx = probe_indices(96, 20, 3)
    assert read_header(a).settings["recomputed"]["probe_indices"] == idx.tolist()
    ds, G, L, final = direct(parent, idx)
    sib = xr.open_zarr(a)
    assert list(sib.step.values) == [2, 3, 4, 5, 6, 9]  # slice is inclusive; the parent's final iterate closes it
    np.testing.assert_allclose(sib.grad.values[:5], G[2:7], rtol=1e-5, atol=1e-7)
    b = recompute_gradients(parent, tmp_path / "probe_dask.zarr", probe=20, probe_seed=3, steps=slice(2, 6),
                            block=1, scheduler="threads", parallel=2)
    np.testing.assert_allclose(xr.open_zarr(b).grad.values[:5], sib.grad.values[:5], rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="probe=500 must be an int in \\[1, 96\\]"):
        recompute_gradients(parent, tmp_path / "bad.zarr", probe=500)


def test_distributed_client(parent, tmp_path):
    distributed = pytest.importorskip("distributed")
    with distributed.Client(processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None) as client:
        out = recompute_gradients(parent, tmp_path / "dist.zarr", steps=slice(0, 3), block=2, scheduler=client)
    ref = recompute_gradients(parent, tmp_path / "local.zarr", steps=slice(0, 3))
    np.testing.assert_allclose(xr.open_zarr(out).grad.values[:4], xr.open_zarr(ref).grad.values[:4], rtol=1e-6,
                               atol=1e-9)
    assert list(xr.open_zarr(out).step.values) == [0, 1, 2, 3, 9]
