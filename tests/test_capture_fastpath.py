"""The recorder's fast path: gradients by reference (and the version-counter guard), batched
commits, on_full="skip", the weight schedule, step checks and the threads warning."""

import threading
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr

import analysis as ga
from gradtrace_format import format as fmt
from gradtrace_format.errors import StepNotFoundError
from capture import Recorder
from capture import recorder as rmod


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


def loop(model, opt, rec, steps, after_record=None, set_to_none=True):
    """Train; return the gradient and weights each step had when record() was called."""
    seen = {}
    for t in range(steps):
        x, y = batch(t)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        ps = list(model.parameters())
        seen[t] = (torch.cat([p.grad.reshape(-1) for p in ps]).numpy().copy(),
                   torch.cat([p.detach().reshape(-1) for p in ps]).numpy().copy(), float(loss.detach()))
        rec.record(t, loss=loss)
        if after_record is not None:
            after_record(t, model)
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
    return seen


def stored(path):
    ds = xr.open_zarr(path)
    return ds, np.asarray(ds.flags.values), np.asarray(ds.grad.values), np.asarray(ds.weight.values)


def test_reference_mode_engages_and_stores_the_exact_gradients(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "r.zarr", opt) as rec:
        seen = loop(model, opt, rec, 12)
        summary = rec.summary()
    assert summary["grads_by_reference"] and summary["n_grad_changed_steps"] == 0
    ds, flags, g, w = stored(tmp_path / "r.zarr")
    for t in range(12):
        np.testing.assert_array_equal(g[t], seen[t][0])
        np.testing.assert_array_equal(w[t], seen[t][1])
    assert not (flags[:12] & fmt.FLAG_SKIPPED).any()


@pytest.mark.parametrize("how", ["clip_after_record", "zero_in_place"])
def test_loops_that_change_gradients_never_use_references(tmp_path, how):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def clip(t, m):
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01)  # in place, after record()

    with Recorder(model, tmp_path / "r.zarr", opt) as rec:
        seen = loop(model, opt, rec, 10, after_record=clip if how == "clip_after_record" else None,
                    set_to_none=how != "zero_in_place")
        assert not rec.summary()["grads_by_reference"]
    _, flags, g, _ = stored(tmp_path / "r.zarr")
    for t in range(10):  # the gradient as record() saw it: before the clip, before zeroing
        np.testing.assert_array_equal(g[t], seen[t][0])


def test_a_gradient_changed_in_place_in_reference_mode_is_not_stored(tmp_path):
    """The loop behaves for 6 steps (references engage), then scales the gradient in place
    after record(): that step must not be stored as a number that may be wrong."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = {"hold": False}
    orig = rmod.Recorder._references_unchanged

    def slow_check(self, slot):  # row 7 (the 8th record() call) is checked after the loop changed it
        while gate["hold"] and slot.call_no == 8:
            time.sleep(0.001)
        return orig(self, slot)

    def scale(t, m):
        if t == 7:
            for p in m.parameters():
                p.grad.mul_(3.0)
            gate["hold"] = False

    rmod.Recorder._references_unchanged = slow_check
    try:
        with Recorder(model, tmp_path / "r.zarr", opt) as rec, pytest.warns(RuntimeWarning, match="changed in place"):
            seen = {}
            for t in range(10):
                x, y = batch(t)
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                seen[t] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()
                gate["hold"] = t == 7
                by_ref = rec._by_ref
                rec.record(t, loss=loss)
                scale(t, model)
                opt.step()
                opt.zero_grad()
                if t == 7:
                    assert by_ref
            rec.flush()
            summary = rec.summary()
    finally:
        rmod.Recorder._references_unchanged = orig
    assert summary["n_grad_changed_steps"] == 1 and not summary["grads_by_reference"]
    ds, flags, g, w = stored(tmp_path / "r.zarr")
    assert flags[7] & fmt.FLAG_SKIPPED and np.isnan(g[7]).all() and np.isfinite(w[7]).all()
    assert np.isnan(ds.grad_sqnorm.values[7])
    for t in [*range(7), 8, 9]:
        np.testing.assert_array_equal(g[t], seen[t])
    run = ga.open_run(tmp_path / "r.zarr")
    assert 7 not in run.grad_steps and 8 in run.grad_steps


def test_on_full_skip_never_waits_and_flags_what_it_dropped(tmp_path, stuck_writer):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    release = stuck_writer  # the writer is stuck until the loop ends
    with Recorder(model, tmp_path / "r.zarr", opt, on_full="skip", queue_size=1) as rec:
        seen = loop(model, opt, rec, 20)
        summary = rec.summary()
        release.set()
    # three buffers (queue_size + 1, and one for the row a writer holds until its check on a
    # CPU): step 0 (held by the stuck writer), steps 1 and 2 (queued); 3..19 are skipped
    assert rec._pool_size == 3
    assert summary["wait_seconds"] == 0 and summary["n_skipped_steps"] == 17
    n_skipped = 17
    ds, flags, g, w = stored(tmp_path / "r.zarr")
    steps = np.asarray(ds.step.values)
    skipped = (flags & fmt.FLAG_SKIPPED) != 0
    assert skipped.sum() == n_skipped and list(steps[:20]) == list(range(20))
    assert np.isnan(g[skipped]).all() and np.isnan(w[skipped]).all()
    # the loss of a skipped step is kept, and the lr
    np.testing.assert_array_equal(ds.loss.values[:20], [seen[t][2] for t in range(20)])
    np.testing.assert_array_equal(ds.lr.values[:20], 0.1)
    for t in np.flatnonzero(~skipped[:20]):
        np.testing.assert_array_equal(g[t], seen[t][0])
    run = ga.open_run(tmp_path / "r.zarr")
    assert len(run.grad_steps) == 20 - n_skipped
    lag = ga.lag_series(run, 1)
    assert np.isfinite(lag.values).all()


def test_on_full_skip_refuses_a_loss_that_is_not_a_scalar_as_a_recorded_step_does(tmp_path, stuck_writer):
    model = mlp()
    release = stuck_writer
    with Recorder(model, tmp_path / "r.zarr", on_full="skip", queue_size=1, grads_by_reference=False) as rec:
        x, y = batch(0)
        for step in range(2):  # step 0 in the stuck writer, step 1 queued: the pool is taken
            nn.functional.cross_entropy(model(x), y).backward()
            rec.record(step)
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        with pytest.raises(ValueError, match=r"record: loss must be a scalar, got a tensor of shape \(32,\)"):
            rec.record(2, loss=losses)  # would be skipped: still refused
        release.set()


def test_weight_schedule_stores_weights_on_its_steps_only(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "r.zarr", opt, weight_schedule="every:3") as rec:
        seen = loop(model, opt, rec, 10)
    ds, flags, g, w = stored(tmp_path / "r.zarr")
    has_w = (flags & fmt.FLAG_NO_WEIGHT) == 0
    assert list(np.flatnonzero(has_w)) == [0, 3, 6, 9, 10]  # the final iterate always has weights
    for t in range(10):
        np.testing.assert_array_equal(g[t], seen[t][0])
        if t % 3 == 0:
            np.testing.assert_array_equal(w[t], seen[t][1])
        else:
            assert np.isnan(w[t]).all() and np.isnan(ds.weight_sqnorm.values[t])
    gg = np.array([np.dot(seen[t][0].astype(np.float64), seen[t][0]) for t in range(10)])
    np.testing.assert_allclose(ds.grad_sqnorm.values[:10], gg, rtol=1e-12)
    r = ga.rsi(tmp_path / "r.zarr")
    assert list(r.step.values) == [0, 3, 6, 9]
    with pytest.raises(StepNotFoundError, match=r"weights at step\(s\) \[1, 2\]"):
        ga.rsi(tmp_path / "r.zarr", steps=[0, 1, 2])
    with pytest.raises(StepNotFoundError, match="weights"):
        ga.rsi(tmp_path / "r.zarr", reference=4)
    ws = ga.open_run(tmp_path / "r.zarr").header.settings["weight_schedule"]
    assert ws["kind"] == "every" and ws["k"] == 3


def test_batched_commits_are_all_committed_by_flush_and_close(tmp_path, monkeypatch):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    commits = []
    from capture import writer as cw

    real = cw.StoreWriter.commit
    monkeypatch.setattr(cw.StoreWriter, "commit", lambda self: (commits.append(self.n_written), real(self))[1])
    with Recorder(model, tmp_path / "r.zarr", opt, commit_interval=3600.0, queue_size=8) as rec:
        loop(model, opt, rec, 15)
        rec.flush()
        assert fmt.read_header(tmp_path / "r.zarr").n_steps == 15
    assert fmt.read_header(tmp_path / "r.zarr").n_steps == 16


@pytest.mark.parametrize("bad", [-1, 2**63, 1.5, True, "3", None])
def test_record_refuses_bad_steps_at_once(tmp_path, bad):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Recorder(model, tmp_path / "r.zarr", opt) as rec:
        x, y = batch(0)
        nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="step"):
            rec.record(bad)
        rec.record(np.int64(0))
        rec.record(torch.tensor(1))  # a step counter kept as a tensor


def test_warns_once_when_torch_takes_every_core(tmp_path, monkeypatch):
    monkeypatch.setattr(rmod, "_THREADS_WARNED", False)
    monkeypatch.setattr(rmod, "THREADS_WARNING_MIN_PARAMS", 100)
    with warnings.catch_warnings():  # a model below the threshold: no warning
        warnings.simplefilter("error")
        small = nn.Linear(2, 2)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
        monkeypatch.setattr(rmod.os, "cpu_count", lambda: 2)
        Recorder(small, tmp_path / "s.zarr").close(record_final=False)
    monkeypatch.setattr(rmod.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    model = mlp()
    with pytest.warns(RuntimeWarning, match=r"set_num_threads\(1\)"):
        Recorder(model, tmp_path / "a.zarr").close(record_final=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Recorder(model, tmp_path / "b.zarr").close(record_final=False)
    monkeypatch.setattr(rmod, "_THREADS_WARNED", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Recorder(model, tmp_path / "c.zarr").close(record_final=False)


def test_referenced_gradients_reach_the_writer_in_pieces_and_commit_without_a_flush(tmp_path, monkeypatch):
    """In reference mode the writer reads the .grad tensors in place (a SplitRow, no copy of
    the row), checks them once the loop has dropped them, and commits them on its own: the
    last recorded row is committed a gap after the loop's next record() call, with no flush."""
    from capture import kernels
    from capture import writer as cw

    kinds = []
    real = cw.StoreWriter.append

    def spy(self, step, grad, weight, **kw):
        kinds.append(type(grad).__name__)
        return real(self, step, grad, weight, **kw)

    monkeypatch.setattr(cw.StoreWriter, "append", spy)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.zarr"
    rec = Recorder(model, path, opt, schedule="every:2")
    seen = loop(model, opt, rec, 12)  # records 0, 2, ..., 10; record(11) drops step 10's gradients
    assert rec.summary()["grads_by_reference"]
    deadline = time.monotonic() + 20  # a loaded machine: the commit comes a gap after the writer's last row
    while fmt.read_header(path).n_steps < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fmt.read_header(path).n_steps == 6
    if kernels.BACKEND == "numba":  # asked once the writer has had every row (it may lag the loop)
        assert "SplitRow" in kinds
    rec.close()
    _, flags, g, _ = stored(path)
    for i, t in enumerate(range(0, 12, 2)):
        np.testing.assert_array_equal(g[i], seen[t][0])
    assert not (flags & fmt.FLAG_SKIPPED).any()


def _finishes(fn, timeout=60):
    """Run fn in a thread; True when it returned within timeout (a hang fails the test)."""
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("v", fn()), daemon=True)
    th.start()
    th.join(timeout)
    return not th.is_alive()


@pytest.mark.parametrize("change", ["scale_in_place_once", "keep_tensors_later"])
def test_loops_that_change_course_in_reference_mode_never_hang(tmp_path, change):
    """After reference mode has begun, the loop scales a gradient in place once, or starts to
    keep its .grad tensors (zero_grad(set_to_none=False)): the rows read by reference are
    still checked (the training thread publishes its gradients' ids at every record()), the
    changed ones are stored without their gradient, and training never waits forever."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.zarr"
    seen = {}

    def train():
        with Recorder(model, path, opt, queue_size=1) as rec:
            for t in range(24):
                x, y = batch(t)
                nn.functional.cross_entropy(model(x), y).backward()
                seen[t] = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy()
                rec.record(t)
                if change == "scale_in_place_once" and t == 8:
                    time.sleep(0.02)  # the writer has read the row by now
                    for p in model.parameters():
                        p.grad.mul_(3.0)
                opt.step()
                opt.zero_grad(set_to_none=not (change == "keep_tensors_later" and t >= 8))
            return rec.summary()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert _finishes(train)
    _, flags, g, _ = stored(path)
    skipped = (flags[:24] & fmt.FLAG_SKIPPED) != 0
    flagged = list(np.flatnonzero(skipped))
    if change == "scale_in_place_once":
        assert flagged == [8]
    else:  # row 8 and the rows read by reference before the writer had seen it (a few, by timing)
        assert flagged == list(range(8, 8 + len(flagged))) and 1 <= len(flagged) <= 5
    for t in np.flatnonzero(~skipped):
        np.testing.assert_array_equal(g[t], seen[t])
    assert np.isnan(g[:24][skipped]).all()


def test_rows_before_a_held_row_are_committed_while_the_loop_pauses(tmp_path):
    """A pause of the loop (an evaluation, a checkpoint) after record(): every recorded row but
    the last is committed within the commit gap; the last one (read by reference, its gradient
    still the parameters' .grad) waits for the next record() or flush()."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "r.zarr"
    rec = Recorder(model, path, opt)
    for t in range(10):
        x, y = batch(t)
        nn.functional.cross_entropy(model(x), y).backward()
        rec.record(t)
        opt.step()  # the gradients stay the parameters' .grad: the loop zeroes them next step
        if t < 9:
            opt.zero_grad()
    assert rec.summary()["grads_by_reference"]
    deadline = time.monotonic() + 10
    while fmt.read_header(path).n_steps < 9 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fmt.read_header(path).n_steps == 9
    rec.flush()
    assert fmt.read_header(path).n_steps == 10
    rec.close()


def test_a_writer_holding_a_row_does_not_spin_with_commit_interval_zero(tmp_path):
    """commit_interval=0 (commit as often as possible) while the writer holds a row read by
    reference and the loop pauses: the writer polls, it does not burn a core."""
    import os

    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model, tmp_path / "r.zarr", opt, commit_interval=0)
    loop(model, opt, rec, 8)
    rec.flush()
    x, y = batch(99)
    nn.functional.cross_entropy(model(x), y).backward()
    rec.record(8)  # held by the writer until the next record() or flush
    stat = f"/proc/self/task/{rec._thread.native_id}/stat"
    if not os.path.exists(stat):
        rec.close()
        pytest.skip("per-thread CPU times need Linux /proc")

    def cpu():
        fields = open(stat).read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    time.sleep(0.2)
    c0, t0 = cpu(), time.monotonic()
    time.sleep(1.0)
    busy = (cpu() - c0) / (time.monotonic() - t0)
    rec.close()
    assert busy < 0.2, f"the writer used {busy:.0%} of a core while it waited"
