"""Recorder: exact round trip, settings, AMP, bad input, resume, write failures, restore."""

import errno
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
import zarr

from gradtrace_format import format as fmt
from capture import Recorder, RecorderWriteError, restore_weights
from capture import writer as cw


class Net(nn.Module):
    def __init__(self, hidden=8, frozen_head=False):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.fc = nn.Linear(3 * 4 * 4, hidden)
        self.head = nn.Linear(hidden, 3)
        self.bn = nn.BatchNorm1d(hidden)  # buffers are not part of w
        if frozen_head:
            self.head.weight.requires_grad_(False)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)
        return self.head(self.bn(torch.relu(self.fc(h))))


def data(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu().numpy().copy()


def train(model, opt, rec, steps, start=0, x=None, y=None, keep=None):
    """Plain loop; ``keep`` collects (step, grad, weight, loss) as the test computes them."""
    if x is None:
        x, y = data()
    for step in range(start, start + steps):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        if keep is not None:
            ps = [p for p in model.parameters() if p.requires_grad]
            keep.append((step, flat([p.grad for p in ps]), flat(ps), float(loss.detach())))
        rec.record(step, loss=loss)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("writer_threads", [1, 3])
def test_lossless_round_trip_is_exact(tmp_path, writer_threads):
    torch.manual_seed(0)
    model = Net(frozen_head=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    keep = []
    with Recorder(model, tmp_path / "run.zarr", opt, settings={"grad_clip": None, "note": "test"}, queue_size=1,
                  writer_threads=writer_threads, param_chunk=64) as rec:
        train(model, opt, rec, 7, keep=keep)
    ds = xr.open_zarr(tmp_path / "run.zarr")
    assert ds.sizes["step"] == 8
    np.testing.assert_array_equal(ds.step.values, np.arange(8))
    for i, (step, g, w, loss) in enumerate(keep):
        np.testing.assert_array_equal(ds.grad.values[i], g)
        np.testing.assert_array_equal(ds.weight.values[i], w)
        assert ds.loss.values[i] == pytest.approx(loss, rel=1e-7)
    final = flat([p for p in model.parameters() if p.requires_grad])
    np.testing.assert_array_equal(ds.weight.values[7], final)
    assert np.isnan(ds.grad.values[7]).all() and ds.flags.values[7] & fmt.FLAG_FINAL
    np.testing.assert_array_equal(ds.lr.values[:7], 0.1)
    # the parameter table: trainable parameters only, named_parameters order
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert list(ds.tensor.values) == names and "head.weight" not in names
    h = fmt.read_header(tmp_path / "run.zarr")
    s = h.settings
    assert s["optimizer"]["class"] == "SGD" and s["optimizer"]["defaults"]["momentum"] == 0.9
    assert s["weight_decay"] == 1e-4 and s["seed"] == torch.initial_seed()
    assert s["torch_version"] == torch.__version__ and s["note"] == "test"
    assert s["model"]["n_trainable"] == h.n_params and s["model"]["class"] == "Net"
    assert h.source_dtype == "float32" and h.closed
    summary = rec.summary()
    assert summary["n_recorded"] == 7 and summary["n_committed"] == 8 and summary["error"] is None


def test_lr_groups_are_stored_and_flagged(tmp_path):
    model = Net()
    opt = torch.optim.SGD([
        {"params": model.conv.parameters(), "lr": 0.1},
        {"params": list(model.fc.parameters()) + list(model.head.parameters()) + list(model.bn.parameters()), "lr": 0.01},
    ], lr=0.1)
    with Recorder(model, tmp_path / "g.zarr", opt) as rec:
        train(model, opt, rec, 2)
    ds = xr.open_zarr(tmp_path / "g.zarr")
    assert (ds.flags.values[:2] & fmt.FLAG_LR_GROUPS_DIFFER).all()
    np.testing.assert_array_equal(ds.lr.values[:2], 0.1)
    s = fmt.read_header(tmp_path / "g.zarr").settings
    assert [g["lr"] for g in s["param_groups"]] == [0.1, 0.01] and s["lr_groups_differ"]


@pytest.mark.cuda
def test_cuda_tensor_lrs_of_param_groups_are_compared_on_the_device(tmp_path):
    """Tensor lrs on the GPU (capturable optimizers keep them there): group 0's lr is stored and
    the groups' difference flagged, both read off the device by the writer, not by record()."""
    model = Net().to("cuda")
    dev = torch.device("cuda")
    opt = torch.optim.SGD([
        {"params": model.conv.parameters(), "lr": torch.tensor(0.1, device=dev)},
        {"params": list(model.fc.parameters()) + list(model.head.parameters()) + list(model.bn.parameters()),
         "lr": torch.tensor(0.01, device=dev)},
    ], lr=torch.tensor(0.1, device=dev), foreach=False)  # the single-tensor step, as on a CPU
    x, y = (t.to(dev) for t in data())
    with Recorder(model, tmp_path / "g.zarr", opt) as rec:
        train(model, opt, rec, 2, x=x, y=y)
        opt.param_groups[1]["lr"].fill_(0.1)  # the same values now: no flag
        train(model, opt, rec, 2, start=2, x=x, y=y)
    ds = xr.open_zarr(tmp_path / "g.zarr")
    assert list(ds.flags.values[:4] & fmt.FLAG_LR_GROUPS_DIFFER) == [16, 16, 0, 0]
    np.testing.assert_array_equal(ds.lr.values[:4], float(torch.tensor(0.1)))


@pytest.mark.cuda
def test_cuda_lr_comparison_promotes_as_the_host_does():
    """Mixes of CUDA tensors, CPU tensors and numbers: the device comparison (a CPU 0-dim tensor
    as a scalar operand of a CUDA op) answers what ``lr != lrs[0]`` answers on the host."""
    dev = torch.device("cuda")
    f32, f64 = torch.float32, torch.float64
    mixes = [
        [torch.tensor(0.1, device=dev), torch.tensor(0.1, dtype=f64)],  # 0.1f != 0.1 in float64
        [0.1, torch.tensor(0.1), torch.tensor(0.1, device=dev)],  # a number takes float32
        [torch.tensor(0.1, dtype=f64), torch.tensor(0.1, device=dev, dtype=f32)],
        [torch.tensor(0.1, device=dev), 0.1, torch.tensor(0.1)],
        [torch.tensor(0.5, device=dev, dtype=f64), torch.tensor(0.5, device=dev, dtype=f32), 0.5],
        # a tensor with a dimension outranks a 0-dim one in promotion: float32 here, equal
        [torch.tensor([0.1], device=dev), torch.tensor(0.1, dtype=f64)],
        [torch.tensor(0.1, device=dev), torch.tensor([0.1], dtype=f64)],  # float64 here: differ
        [torch.tensor([0.1], device=dev), torch.tensor([0.1]), 0.1],
    ]
    for lrs in mixes:
        on_host = [x.cpu() if isinstance(x, torch.Tensor) else x for x in lrs]
        host = any(bool(x != on_host[0]) for x in on_host[1:])
        got = Recorder._lrs_differ_on_device(None, lrs)
        assert (got is True) or (got is not None and got.device.type == "cuda")
        assert bool(got) == host, lrs


def test_missing_grads_are_zeros_and_flagged(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with Recorder(model, tmp_path / "m.zarr", opt) as rec:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        model.conv.bias.grad = None
        expect = flat([torch.zeros(3) if n == "conv.bias" else p.grad for n, p in model.named_parameters()])
        rec.record(0, loss=loss)
        opt.step()
    ds = xr.open_zarr(tmp_path / "m.zarr")
    np.testing.assert_array_equal(ds.grad.values[0], expect)
    assert ds.flags.values[0] & fmt.FLAG_MISSING_GRAD
    assert rec.summary()["n_missing_grad_steps"] == 1


def test_record_before_backward_names_the_fix(tmp_path):
    model = Net()
    with Recorder(model, tmp_path / "b.zarr") as rec:
        with pytest.raises(RuntimeError, match=r"after loss\.backward\(\)"):
            rec.record(0)
    assert fmt.read_header(tmp_path / "b.zarr").n_steps == 0


def test_no_trainable_parameters(tmp_path):
    model = Net()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Recorder(model, tmp_path / "n.zarr")
    assert not (tmp_path / "n.zarr").exists()


def test_nonfinite_gradients_are_recorded_flagged_and_counted(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Recorder(model, tmp_path / "nan.zarr", opt) as rec:
            for step in range(4):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                if step in (1, 2):
                    model.fc.weight.grad[0, 0] = float("nan") if step == 1 else float("inf")
                rec.record(step, loss=loss)
                rec.flush()
                for p in model.parameters():
                    p.grad.nan_to_num_(0.0, 0.0, 0.0)  # as a skipped AMP step would: weights stay finite
                opt.step()
                opt.zero_grad()
    ds = xr.open_zarr(tmp_path / "nan.zarr")
    flags = ds.flags.values
    assert [bool(f & fmt.FLAG_NONFINITE_GRAD) for f in flags[:4]] == [False, True, True, False]
    assert np.isnan(ds.grad.values[1]).sum() == 1 and np.isinf(ds.grad.values[2]).sum() == 1
    assert rec.summary()["n_nonfinite_steps"] == 2 and rec.summary()["nonfinite_steps"] == [1, 2]
    assert fmt.read_header(tmp_path / "nan.zarr").extra["n_nonfinite_steps"] == 2
    ours = [w for w in caught if "NaN or Inf" in str(w.message)]
    assert len(ours) == 1  # warned once, training went on


@pytest.mark.parametrize("user_unscales", [False, True])
def test_amp_gradients_are_recorded_unscaled(tmp_path, user_unscales):
    torch.manual_seed(1)
    model = Net()
    ref = Net()
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert scaler.is_enabled()
    x, y = data()
    expect, scaled = [], []
    with Recorder(model, tmp_path / f"amp{user_unscales}.zarr", opt, scaler=scaler) as rec:
        for step in range(3):
            ref.load_state_dict(model.state_dict())
            nn.functional.cross_entropy(ref(x), y).backward()  # the unscaled gradient, by hand
            expect.append(flat([p.grad for p in ref.parameters()]))
            ref.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            scaled.append(flat([p.grad for p in model.parameters()]))
            if user_unscales:
                scaler.unscale_(opt)
            rec.record(step, loss=loss)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    ds = xr.open_zarr(tmp_path / f"amp{user_unscales}.zarr")
    for i in range(3):
        assert np.abs(scaled[i]).max() > 100 * np.abs(expect[i]).max()  # the scale was really applied
        np.testing.assert_allclose(ds.grad.values[i], expect[i], rtol=1e-6, atol=1e-9)
    assert fmt.read_header(tmp_path / f"amp{user_unscales}.zarr").settings["amp"]["enabled"]


def test_scaler_needs_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="optimizer="):
        Recorder(Net(), tmp_path / "s.zarr", scaler=torch.amp.GradScaler("cpu"))


def test_resume_appends_and_refuses_mismatches(tmp_path):
    torch.manual_seed(2)
    path = tmp_path / "r.zarr"
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keep = []
    with Recorder(model, path, opt) as rec:
        train(model, opt, rec, 3, keep=keep)
    with pytest.raises(FileExistsError, match="resume=True"):
        Recorder(model, path, opt)
    with pytest.raises(fmt.StoreMismatchError, match="parameter table"):
        Recorder(Net(hidden=9), path, resume=True)
    with pytest.raises(fmt.StoreMismatchError, match="float64"):
        Recorder(Net().double(), path, resume=True)
    with pytest.raises(fmt.StoreMismatchError, match="tier"):
        Recorder(model, path, resume=True, tiers={"weight": "rounded:7"})
    with pytest.raises(ValueError, match="contradict"):
        Recorder(model, path, resume=True, overwrite=True)
    # restart from a checkpoint taken at step 2: step 2 is recorded again
    with Recorder(model, path, opt, resume=True, resume_step=2) as rec:
        with pytest.raises(ValueError, match="steps must increase"):
            rec.record(1)
        train(model, opt, rec, 2, start=2, keep=keep)
    ds = xr.open_zarr(path)
    np.testing.assert_array_equal(ds.step.values, [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(ds.grad.values[:2], np.stack([k[1] for k in keep[:2]]))
    np.testing.assert_array_equal(ds.grad.values[2:4], np.stack([k[1] for k in keep[3:]]))
    # overwrite replaces
    with Recorder(model, path, opt, overwrite=True) as rec:
        train(model, opt, rec, 1)
    assert fmt.read_header(path).n_steps == 2


def _fail_after(monkeypatch, n_ok):
    """Chunk writes (appends to shard files) fail with ENOSPC after the first ``n_ok``."""
    calls = {"n": 0}
    real = cw._ShardFile.put

    def flaky(self, entry, parts):
        calls["n"] += 1
        if calls["n"] > n_ok:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path))
        real(self, entry, parts)

    monkeypatch.setattr(cw._ShardFile, "put", flaky)


def test_disk_full_is_raised_to_the_training_loop_and_the_store_stays_consistent(tmp_path, monkeypatch):
    torch.manual_seed(3)
    path = tmp_path / "full.zarr"
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, path, opt, param_chunk=64)
    per_row = 2 * -(-rec.d // 64)
    _fail_after(monkeypatch, 3 * per_row + 1)  # rows 0-2 fit, row 3 fails halfway
    keep = []
    with pytest.raises(RecorderWriteError, match=r"No space left.*3 steps committed.*Free disk space") as info:
        for step in range(50):
            train(model, opt, rec, 1, start=step, keep=keep)
            rec.flush()
    assert isinstance(info.value.__cause__, OSError)
    with pytest.raises(RecorderWriteError):
        rec.close()
    monkeypatch.undo()
    h = fmt.read_header(path)
    assert h.n_steps == 3 and not h.closed
    g = zarr.open_group(str(path), mode="r", use_consolidated=False)
    np.testing.assert_array_equal(g["grad"][:3], np.stack([k[1] for k in keep[:3]]))
    # and the store resumes
    with Recorder(model, path, opt, resume=True) as rec2:
        train(model, opt, rec2, 1, start=3)
    np.testing.assert_array_equal(xr.open_zarr(path).step.values, [0, 1, 2, 3, 4])


def test_a_failed_commit_is_reported_as_a_commit_not_as_a_lost_step(tmp_path, monkeypatch):
    """The rows were written, their commit marker was not: the error says so, and the store
    holds the steps of the commits before it."""
    torch.manual_seed(3)
    path = tmp_path / "nocommit.zarr"
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, path, opt)
    real, calls = cw.StoreWriter.commit, {"n": 0}

    def flaky(self):
        if self.n_steps < self.n_written:  # a commit with rows to commit
            calls["n"] += 1
            if calls["n"] > 2:
                raise OSError(errno.EIO, "Input/output error", str(self.path))
        real(self)

    monkeypatch.setattr(cw.StoreWriter, "commit", flaky)
    with pytest.raises(RecorderWriteError, match=r"could not commit the steps up to step \d+ to .*: OSError.*"
                                                 r"Input/output error.*2 steps committed") as info:
        for step in range(20):
            train(model, opt, rec, 1, start=step)
            rec.flush()
    assert "could not write step" not in str(info.value)
    with pytest.raises(RecorderWriteError):
        rec.close()
    monkeypatch.undo()
    assert fmt.read_header(path).n_steps == 2


def test_unwritable_path_fails_at_construction(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError):
        Recorder(Net(), tmp_path / "file" / "run.zarr")


def test_restore_weights(tmp_path):
    torch.manual_seed(4)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    keep = []
    with Recorder(model, tmp_path / "a.zarr", opt) as rec:
        train(model, opt, rec, 4, keep=keep)
    fresh = Net()
    parent = restore_weights(fresh, tmp_path / "a.zarr", 2)
    assert parent == {"store": str(tmp_path / "a.zarr"), "step": 2}
    np.testing.assert_array_equal(flat(fresh.parameters()), keep[2][2])
    restore_weights(fresh, tmp_path / "a.zarr", 4)  # the final iterate
    np.testing.assert_array_equal(flat(fresh.parameters()), flat(model.parameters()))
    with pytest.raises(KeyError, match=r"nearest recorded steps: \[3, 4\]"):
        restore_weights(fresh, tmp_path / "a.zarr", 7)
    with pytest.raises(fmt.StoreMismatchError, match="parameter table"):
        restore_weights(Net(hidden=5), tmp_path / "a.zarr", 1)
    import capture

    assert not hasattr(Recorder, "restore") and "restore" not in capture.__all__  # one spelling: restore_weights
    # rounded weights: allowed, with a warning, within the tier's bound
    with Recorder(model, tmp_path / "r.zarr", opt, tiers={"weight": "rounded:8"}) as rec:
        train(model, opt, rec, 1)
    w0 = flat(model.parameters())
    with pytest.warns(UserWarning, match="rounded to 8 mantissa bits"):
        restore_weights(fresh, tmp_path / "r.zarr", 1)
    w = flat(fresh.parameters())
    nz = w0 != 0
    assert (np.abs(w[nz] - w0[nz]) / np.abs(w0[nz])).max() <= 2.0**-9
    with Recorder(model, tmp_path / "s.zarr", opt, tiers="sketch:64") as rec:
        train(model, opt, rec, 1)
    with pytest.raises(fmt.StoreMismatchError, match="sketch"):
        restore_weights(fresh, tmp_path / "s.zarr", 0)


def test_ddp_wrapper_names_are_unwrapped(tmp_path):
    model = Net()
    wrapped = nn.DataParallel(model)  # same unwrapping path as DistributedDataParallel
    rec = Recorder(wrapped, tmp_path / "dp.zarr")
    assert [t.name for t in rec.tensors] == [n for n, _ in model.named_parameters()]
    rec.close()


@pytest.mark.cuda
def test_cuda_path_pinned_non_blocking_copies_are_exact(tmp_path):
    """On a GPU: device staging, pinned host buffers, events; values equal p.grad exactly."""
    torch.manual_seed(5)
    dev = torch.device("cuda")
    model = Net().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = (t.to(dev) for t in data())
    keep, losses = [], []
    with Recorder(model, tmp_path / "gpu.zarr", opt, scaler=scaler, queue_size=1) as rec:
        for step in range(6):
            with torch.autocast("cuda", dtype=torch.float16):
                loss = nn.functional.cross_entropy(model(x), y)
            scaler.scale(loss).backward()
            inv = 1.0 / scaler.get_scale()
            keep.append((flat([p.grad for p in model.parameters()]) * np.float32(inv), flat(model.parameters())))
            losses.append(loss.detach().double().clone())
            # no sync here: the loss goes through pinned memory too. A temporary, as the callbacks
            # pass it, freed at once and its memory written over by the training stream: the
            # recorder must have taken its value before
            rec.record(step, loss=loss.detach() * 1.0)
            torch.full((64,), -7.0, device=dev)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    ds = xr.open_zarr(tmp_path / "gpu.zarr")
    for i, (g, w) in enumerate(keep):
        np.testing.assert_array_equal(ds.grad.values[i], g)
        np.testing.assert_array_equal(ds.weight.values[i], w)
    np.testing.assert_array_equal(ds.loss.values[:6], [float(v) for v in losses])
    assert fmt.read_header(tmp_path / "gpu.zarr").settings["device"].startswith("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["lossless", "rounded:7", "sketch:64"])
def test_cuda_pool_and_device_encoder_are_made_with_the_recorder(tmp_path, tier):
    """On a GPU the Recorder makes its whole pool (device staging, pinned host buffers) and the
    device encoder when it is made: record() allocates nothing, and a pool that does not fit
    fails at construction."""
    model = Net().to("cuda")
    rec = Recorder(model, tmp_path / "pool.zarr", tiers=tier, queue_size=2)
    try:
        assert rec._n_slots == rec._pool_size == 3
        assert "_encoder" in rec.__dict__ and rec._encoder is not None  # one device: every tier encoded there
        slots = [rec._free.get_nowait() for _ in range(3)]
        for slot in slots:
            assert all(t.device.type == "cuda" and t.numel() == rec.d for pair in slot.stage.values() for t in pair)
            host = list(slot.host.values()) if slot.host else [slot.grad, slot.weight]
            assert all(t.is_pinned() for t in host)
            rec._free.put(slot)
    finally:
        rec.close()


@pytest.mark.cuda
@pytest.mark.parametrize("tier", ["lossless", "sketch:64"])
def test_cuda_on_full_skip_keeps_the_loss_and_lr_of_what_it_dropped(tmp_path, stuck_writer, tier):
    """On a GPU with on_full="skip" and the writer stuck: the skipped steps keep their loss (a
    device temporary, freed at once) and a device lr, read off the device by the writer (no
    sync on the training thread); the steps recorded hold their gradients exactly."""
    release = stuck_writer
    torch.manual_seed(6)
    dev = torch.device("cuda")
    model = Net().to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = (t.to(dev) for t in data())
    lr = torch.tensor(0.25, device=dev)
    grads, losses = [], []
    with Recorder(model, tmp_path / "skip.zarr", opt, tiers=tier, on_full="skip", queue_size=1) as rec:
        for step in range(12):
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            grads.append(flat([p.grad for p in model.parameters()]))
            losses.append(float(loss))
            rec.record(step, loss=loss.detach() * 1.0, lr=lr * 1.0)
            torch.full((64,), -7.0, device=dev)  # the training stream reuses the freed memory
            opt.step()
            opt.zero_grad()
        n_skipped = rec.summary()["n_skipped_steps"]
        release.set()
    ds = xr.open_zarr(tmp_path / "skip.zarr")
    skipped = (np.asarray(ds.flags.values[:12]) & fmt.FLAG_SKIPPED) != 0
    assert n_skipped >= 8 and skipped.sum() == n_skipped
    np.testing.assert_array_equal(ds.loss.values[:12], losses)
    np.testing.assert_array_equal(ds.lr.values[:12], 0.25)
    if tier == "lossless":
        for t in np.flatnonzero(~skipped):
            np.testing.assert_array_equal(ds.grad.values[t], grads[t])


def test_a_writer_that_keeps_up_commits_within_the_gap_not_at_every_step(tmp_path, monkeypatch):
    """Fast steps share commits (the marker is rewritten at most every COMMIT_GAP while the
    writer keeps up), rows left uncommitted are committed COMMIT_GAP later without any call,
    and flush() commits at once."""
    import time

    from capture import recorder as rmod

    monkeypatch.setattr(rmod, "COMMIT_GAP", 0.3)
    headers = []
    real = cw.StoreWriter._write_header
    monkeypatch.setattr(cw.StoreWriter, "_write_header", lambda self: (headers.append(self.n_steps), real(self))[1])
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = data()
    # gradients copied: held by reference, the last step's row waits for the next record()
    # (or flush) before it may finish, whatever the commit timing
    with Recorder(model, tmp_path / "r.zarr", optimizer=opt, grads_by_reference=False) as rec:
        train(model, opt, rec, 1, x=x, y=y)
        deadline = time.monotonic() + 30  # a fresh clone compiles the kernels first (seconds)
        while rec.writer.n_steps < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rec.writer.n_steps == 1  # committed by the writer's own wait, no flush
        n_before = len(headers)
        t0 = time.perf_counter()
        train(model, opt, rec, 10, start=1, x=x, y=y)
        fast = time.perf_counter() - t0 < 0.25
        deadline = time.monotonic() + 30
        while rec.writer.n_steps < 11 and time.monotonic() < deadline:
            time.sleep(0.02)  # no flush: the writer's timed wait commits what is left
        assert rec.writer.n_steps == 11
        if fast:  # ten steps inside one gap: at most two commits for them (one in a job, one timed), not ten
            assert len(headers) - n_before <= 2, headers[n_before:]
        train(model, opt, rec, 1, start=11, x=x, y=y)
        rec.flush()  # commits at once
        assert rec.writer.n_steps == 12
