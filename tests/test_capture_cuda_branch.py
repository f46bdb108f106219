"""The Recorder's CUDA branch, run without a GPU: ``torch.cuda``'s streams, events and stream
contexts replaced by stand-ins, the parameters' "devices" CPU ones. This checks the branch's
own logic (device staging, per-device groups, the device encoder, the pool, lag ring,
weight schedule, steps skipped for want of a buffer) on every CI run. Not covered here: the
pool made in ``__init__`` (the Recorder is switched to the branch after it is made), and a
loss or lr that is itself a CUDA tensor (the snapshot, the side stream's wait, the writer's
read); those, and what only a GPU can show (stream order, pinned copies, atomics), are in the
tests marked ``cuda``.

Each case records the same training twice, through the CUDA branch and through the CPU
path, and compares the stores: every array bit for bit, but the float64 per-step sums, which
the device encoder adds in another order (``capture.encode``: within float64 rounding).
"""

import contextlib

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

from capture import Recorder
from gradtrace_format import format as fmt


class _Event:
    def __init__(self, *args, **kwargs):
        self.recorded = False
        self.synced = 0

    def record(self, stream=None):
        self.recorded = True

    def synchronize(self):
        assert self.recorded, "an event waited for before it was recorded"
        self.synced += 1


class _Stream:
    def __init__(self, device=None, **kwargs):
        self.device = device

    def wait_event(self, event):
        assert event.recorded, "a stream made to wait for an event never recorded"

    def wait_stream(self, stream):
        pass


@pytest.fixture
def fake_cuda(monkeypatch):
    train = _Stream()
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: train)
    empty, full = torch.empty, torch.full
    # pinned host memory needs a GPU: the same buffers, unpinned
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, **k: empty(*a, **k))
    monkeypatch.setattr(torch, "full", lambda *a, pin_memory=False, **k: full(*a, **k))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5), nn.Linear(5, 5))


def _as_cuda(rec: Recorder, groups: dict | None) -> Recorder:
    """Switch a CPU Recorder (made with grads_by_reference=False) to its CUDA branch, the
    parameters' "devices" given by ``groups`` (device -> tensor indices; default one device)."""
    rec._cuda = True
    if groups is None:
        rec.__dict__["_device_groups"] = {torch.device("cpu"): (list(range(len(rec._params))), 0, rec.d)}
    else:
        out = {}
        for dev, idx in groups.items():
            lo = rec.tensors[idx[0]].offset
            hi = max(rec.tensors[i].offset + rec.tensors[i].size for i in idx)
            out[dev] = (idx, lo, hi)
        rec.__dict__["_device_groups"] = out
    return rec


def _train(path, tiers, cuda: bool, groups=None, steps=6, **kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)
    rec = Recorder(model, path, opt, tiers=tiers, grads_by_reference=False, **kw)
    if cuda:
        _as_cuda(rec, groups)
    grads = []
    with rec:
        for step in range(steps):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
            rec.record(step, loss=loss)
            opt.step()
            opt.zero_grad()
    return rec, np.stack(grads)


def _assert_same_store(a, b):
    da, db = xr.open_zarr(a), xr.open_zarr(b)
    assert sorted(da.data_vars) == sorted(db.data_vars)
    for name in da.data_vars:
        va, vb = np.asarray(da[name].values), np.asarray(db[name].values)
        if va.dtype == np.float64 and name not in ("loss", "lr"):
            # the device encoder's float64 sums: another addition order
            np.testing.assert_allclose(va, vb, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
        else:
            np.testing.assert_array_equal(va, vb, err_msg=name)


GROUPS = {
    "one device": None,
    "two devices, contiguous": {torch.device("cpu"): [0, 1], torch.device("cpu", 0): [2, 3, 4, 5]},
    "two devices, interleaved": {torch.device("cpu"): [0, 2, 4], torch.device("cpu", 0): [1, 3, 5]},
}


@pytest.mark.parametrize("tiers", ["lossless", "rounded:7", "rounded:4", "rounded:12", "sketch:64",
                                   {"grad": "sketch:64", "weight": "rounded:7"}])
@pytest.mark.parametrize("lag_band", [0, 2])
@pytest.mark.parametrize("weight_schedule", [None, "every:2"])
def test_the_cuda_branch_stores_what_the_cpu_path_stores(tmp_path, fake_cuda, tiers, lag_band, weight_schedule):
    kw = dict(lag_band=lag_band, weight_schedule=weight_schedule, queue_size=1)
    rec, _ = _train(tmp_path / "dev.zarr", tiers, True, **kw)
    assert rec._encoder is not None  # one device: encoded there
    _train(tmp_path / "cpu.zarr", tiers, False, **kw)
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")


@pytest.mark.parametrize("groups", list(GROUPS))
@pytest.mark.parametrize("tiers", ["lossless", "sketch:32"])
def test_the_cuda_branch_over_several_devices_stores_what_the_cpu_path_stores(tmp_path, fake_cuda, groups, tiers):
    rec, _ = _train(tmp_path / "dev.zarr", tiers, True, GROUPS[groups])
    assert (rec._encoder is None) == (GROUPS[groups] is not None)  # several devices: encoded on the host
    _train(tmp_path / "cpu.zarr", tiers, False)
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")


@pytest.mark.parametrize("tiers", ["lossless", "sketch:64"])
def test_the_cuda_branch_skips_steps_when_the_writer_is_stuck(tmp_path, fake_cuda, stuck_writer, tiers):
    release = stuck_writer
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
    rec = _as_cuda(Recorder(model, tmp_path / "s.zarr", opt, tiers=tiers, grads_by_reference=False,
                            on_full="skip", queue_size=1), None)
    grads, losses = [], []
    with rec:
        for step in range(10):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
            losses.append(float(loss.detach()))
            rec.record(step, loss=loss)
            opt.step()
            opt.zero_grad()
        n_skipped = rec.summary()["n_skipped_steps"]
        release.set()
    assert rec._n_slots == 2  # the pool, never more
    ds = xr.open_zarr(tmp_path / "s.zarr")
    skipped = (np.asarray(ds.flags.values[:10]) & fmt.FLAG_SKIPPED) != 0
    assert n_skipped == skipped.sum() == 8  # step 0 in the writer, step 1 queued
    np.testing.assert_array_equal(ds.loss.values[:10], losses)
    if tiers == "lossless":
        for t in np.flatnonzero(~skipped):
            np.testing.assert_array_equal(ds.grad.values[t], grads[t])
        assert np.isnan(ds.grad.values[:10][skipped]).all()
