"""The Recorder's CUDA branch, run without a GPU: ``torch.cuda``'s streams, events and stream
contexts replaced by stand-ins, the parameters' "devices" CPU ones. This checks the branch's
own logic on every CI run:

* device staging, per-device groups, the device encoder, the lag ring, the weight schedule,
  steps skipped for want of a buffer: each case records the same training twice, through the
  CUDA branch and through the CPU path, and compares the stores: every array bit for bit, but
  the float64 per-step sums, which the device encoder adds in another order
  (``capture.encode``: within float64 rounding);
* the pool made in ``__init__``: the Recorder is made on the branch (``_CudaRecorder``), so its
  whole pool (device staging, pinned host buffers: ``_make_slot``) and the device encoder are
  made before the ``StoreWriter``, and ``record()`` makes none; a pool or encoder that does
  not fit (a stand-in out-of-memory error at its last allocation) fails at construction and
  leaves no store, no lock and no writer thread behind;
* a loss or lr that is itself a CUDA tensor (``_OnCuda``: CPU memory whose ``device`` says
  ``cuda:0``; no other tensor is touched): the ``_snapshot`` (a float64 copy made on the
  training stream, the side stream made to wait for it, ``record_stream``), the copy to the
  host on the side stream (``_fill``), the writer's read on the side stream (``_host_value``)
  of a dropped step's loss and lr (``_off_device``, ``on_full="skip"``) and of the groups'
  lr comparison made on the device (``_lrs_differ_on_device``). The stand-in device runs a
  side stream's copies only when an event recorded after them, or a host read on that
  stream, is waited for, and the tests change the loss and lr in place after ``record()``
  (a temporary reused, a scheduler's step) while it is paused: a value not snapshot in time
  is stored wrong. Every host read and device-to-host copy of such a value is checked
  against the log of the stand-ins (``_checked_reads``): made from a snapshot on the
  training stream, after ``wait_stream`` and ``record_stream``, on that side stream, never
  by the training thread (no sync in ``record()``). Loss, lr and flags are compared exactly
  with the CPU path's.

Still only the tests marked ``cuda`` (``tests/test_capture_recorder.py`` and others; skipped
without a GPU) cover what a GPU alone shows: real stream order and asynchrony
(here the training stream runs each op at once and a side stream's copies run in program
order on the CPU), pinned memory and non-blocking copies, the caching allocator's reuse of
memory that ``record_stream`` guards (here only its call is checked), device atomics (the
sketch's ``index_add_``), parameters that really are on one or several CUDA devices (here
``_device_groups`` is given, not derived from the parameters' devices, and the loss and lr
live on ``cuda:0`` while the parameters live on CPU "devices"), a real out-of-memory error
and GradScaler/autocast.
"""

import collections
import contextlib
import functools
import os
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn
import xarray as xr
from torch._C import DisableTorchFunctionSubclass
from torch.overrides import get_default_nowrap_functions
from torch.utils._pytree import tree_leaves

from capture import Recorder
from gradtrace_format import format as fmt

CUDA0 = torch.device("cuda", 0)


# --------------------------------------------------------------------------------------
# the stand-in device
# --------------------------------------------------------------------------------------


class _Sim:
    """The stand-in CUDA runtime of one test: the training stream, each thread's current
    stream, a log of what the recorder asked of the streams and of the ``_OnCuda`` values,
    a pause (side-stream copies wait while it holds) and the pool's allocations (counted;
    ``fail = (kind, n)`` makes the n-th of that kind raise an out-of-memory error)."""

    def __init__(self):
        self.log: list = []
        self._lock = threading.Lock()
        self._local = threading.local()
        self.train = _Stream(self, None, "train")
        self.trainer = threading.get_ident()  # the test's thread: the training thread
        self.running = threading.Event()
        self.running.set()
        self.allocs: collections.Counter = collections.Counter()
        self.fail: tuple | None = None

    def note(self, *entry) -> int:
        with self._lock:
            self.log.append(entry)
            return len(self.log) - 1

    def current(self) -> "_Stream":
        stack = getattr(self._local, "stack", None)
        return stack[-1] if stack else self.train

    @contextlib.contextmanager
    def stream(self, s):
        stack = self._local.__dict__.setdefault("stack", [])
        stack.append(s)
        try:
            yield
        finally:
            stack.pop()

    @contextlib.contextmanager
    def paused(self):
        """The device runs no side-stream copy until the block ends (the writer's syncs wait)."""
        self.running.clear()
        try:
            yield
        finally:
            self.running.set()

    def alloc(self, kind: str | None) -> None:
        if kind is None:
            return
        self.allocs[kind] += 1
        if self.fail == (kind, self.allocs[kind]):
            raise torch.OutOfMemoryError(f"stand-in: the {kind} allocation no. {self.allocs[kind]} does not fit")


class _Event:
    def __init__(self, sim: _Sim, **kwargs):
        self.sim = sim
        self.stream: "_Stream | None" = None
        self.upto = 0
        self.synced = 0

    @property
    def recorded(self) -> bool:
        return self.stream is not None

    def record(self, stream=None):
        self.stream = stream if stream is not None else self.sim.current()
        self.upto = len(self.stream.queued)

    def synchronize(self):
        assert self.recorded, "an event waited for before it was recorded"
        self.stream.run(self.upto)
        self.synced += 1


class _Stream:
    """A stream: the training stream runs everything at once (program order); a side stream
    queues the copies of ``_OnCuda`` values to the host and runs them when an event recorded
    after them is synchronized, or a host read is made on it."""

    def __init__(self, sim: _Sim, device=None, name="side", **kwargs):
        self.sim, self.device, self.name = sim, device, name
        self.queued: list = []
        self.n_run = 0
        self._lock = threading.Lock()

    def __repr__(self):
        return f"<stand-in {self.name} stream {self.device}>"

    def wait_event(self, event):
        assert event.recorded, "a stream made to wait for an event never recorded"
        self.sim.note("wait_event", self, event.stream)

    def wait_stream(self, stream):
        self.sim.note("wait_stream", self, stream)

    def run(self, upto: int | None = None) -> None:
        upto = len(self.queued) if upto is None else upto
        if self.n_run >= upto:
            return  # nothing queued: nothing to wait for
        assert self.sim.running.wait(60), "the stand-in device stayed paused"
        with self._lock:
            while self.n_run < upto:
                self.queued[self.n_run]()
                self.n_run += 1


class _Origin:
    """Where the memory of an ``_OnCuda`` value was made: by the test ("user") or by an op."""

    __slots__ = ("name", "dtype", "stream", "thread", "index")

    def __init__(self, name, dtype, stream, thread, index):
        self.name, self.dtype, self.stream, self.thread, self.index = name, dtype, stream, thread, index

    def __repr__(self):
        return f"<{self.name} -> {self.dtype} on {self.stream} at log[{self.index}]>"


#: what reads a device value on the host (a sync on the current stream)
_HOST_READS = {"__float__", "__int__", "__bool__", "__index__", "__array__", "__repr__", "__format__",
               "item", "tolist", "numpy"}


class _OnCuda(torch.Tensor):
    """A CPU tensor that the recorder takes for a CUDA one: ``device`` is ``cuda:0``; every op on
    it runs on the CPU (a ``.to(<cuda device>)`` stays on the CPU) and returns ``_OnCuda``; its
    host reads and copies to host memory are logged (a non-blocking copy on a side stream is
    queued there), and so is ``record_stream``. Each value knows where its memory was made
    (``_origin``: a view keeps its base's)."""

    sim: _Sim | None = None

    @property
    def device(self):
        return CUDA0

    def record_stream(self, stream):
        self.sim.note("record_stream", self._origin, stream)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sim, name = cls.sim, getattr(func, "__name__", "")
        if name == "__get__":  # dtype, shape...
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        stream, thread = sim.current(), threading.get_ident()
        if name in _HOST_READS:
            stream.run()  # a host read waits for its stream
            sim.note("read", args[0]._origin, stream, thread, name)
            with DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if name == "copy_" and isinstance(args[1], cls) and not isinstance(args[0], cls):  # to the host
            dst, src = args[0], args[1]
            sim.note("copy", src._origin, stream, thread)

            def go():
                with DisableTorchFunctionSubclass():
                    dst.copy_(src)

            if kwargs.get("non_blocking") and stream is not sim.train:
                with stream._lock:
                    stream.queued.append(go)
            else:
                go()
            return dst
        if name == "to":
            args = tuple(torch.device("cpu") if isinstance(a, torch.device) and a.type == "cuda" else a for a in args)
            if isinstance(kwargs.get("device"), torch.device) and kwargs["device"].type == "cuda":
                kwargs = {**kwargs, "device": torch.device("cpu")}
        with DisableTorchFunctionSubclass():
            ret = func(*args, **kwargs)
            if func in get_default_nowrap_functions():
                return ret
            bases = {t.untyped_storage().data_ptr(): getattr(t, "_origin", None)
                     for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            ret = _wrap(ret, cls)
            for out in tree_leaves(ret):
                if isinstance(out, cls):
                    ptr = out.untyped_storage().data_ptr()
                    if ptr in bases:  # a view, or the input itself (in place)
                        out._origin = bases[ptr]
                    else:
                        out._origin = origin = _Origin(name, out.dtype, stream, thread, None)
                        origin.index = sim.note("new", origin)
        return ret


def _wrap(ret, cls):
    if isinstance(ret, torch.Tensor) and not isinstance(ret, cls):
        return ret.as_subclass(cls)
    if isinstance(ret, (tuple, list)):
        return type(ret)(_wrap(r, cls) for r in ret)
    return ret


def _on_cuda(t: torch.Tensor) -> _OnCuda:
    """``t``'s memory (shared) as a stand-in CUDA tensor made by the test."""
    out = t.detach().as_subclass(_OnCuda)
    out._origin = _Origin("user", out.dtype, _OnCuda.sim.train, threading.get_ident(), None)
    out._origin.index = _OnCuda.sim.note("new", out._origin)
    return out


def _checked_reads(sim: _Sim) -> int:
    """Check every host read and copy to the host of an ``_OnCuda`` value in the log; return
    how many. None by the training thread (that would be a sync in ``record()``); each on a
    side stream S, of a float64 copy made on the training stream by the training thread (the
    snapshot), after which S was made to wait for the training stream and the copy's
    memory was recorded as used by S (``record_stream``)."""
    log = list(sim.log)
    n = 0
    for i, entry in enumerate(log):
        if entry[0] not in ("read", "copy"):
            continue
        origin, stream, thread = entry[1:4]
        if entry[0] == "read":
            assert thread != sim.trainer, f"the training thread read a CUDA value on the host ({entry[4]}): a sync"
        assert stream is not sim.train, f"{entry[0]} of {origin} on the training stream, not a side stream"
        assert origin.name == "to" and origin.dtype == torch.float64, f"{entry[0]} of {origin}, not of a snapshot"
        assert origin.stream is sim.train and origin.thread == sim.trainer, f"snapshot {origin} off the training stream"
        after = log[origin.index + 1 : i]
        assert ("wait_stream", stream, sim.train) in after, f"{stream} read {origin} without waiting for the training stream"
        assert ("record_stream", origin, stream) in after, f"{origin} read on {stream} without record_stream"
        n += 1
    return n


@pytest.fixture
def fake_cuda(monkeypatch):
    sim = _Sim()
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None, **k: _Stream(sim, device))
    monkeypatch.setattr(torch.cuda, "Event", lambda **k: _Event(sim, **k))
    monkeypatch.setattr(torch.cuda, "stream", sim.stream)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: sim.current())
    monkeypatch.setattr(_OnCuda, "sim", sim)
    empty, full = torch.empty, torch.full

    def kind(pinned, k):
        if pinned:
            return "pinned"
        if k.get("device") is not None:  # the pool's staging vectors; the encoder's working buffers
            return {torch.float32: "staging", torch.float64: "encoder"}.get(k.get("dtype"))
        return None

    # pinned host memory needs a GPU: the same buffers, unpinned (and counted)
    def fake_empty(*a, pin_memory=False, **k):
        sim.alloc(kind(pin_memory, k))
        return empty(*a, **k)

    def fake_full(*a, pin_memory=False, **k):
        sim.alloc(kind(pin_memory, {}))
        return full(*a, **k)

    monkeypatch.setattr(torch, "empty", fake_empty)
    monkeypatch.setattr(torch, "full", fake_full)
    yield sim
    sim.running.set()


class _CudaRecorder(Recorder):
    """A Recorder on the CUDA branch from its construction on: the branch's test in
    ``__init__`` (a parameter on a CUDA device) answers True, and the per-device groups are
    ``groups`` (device -> tensor indices; default: one device), not the parameters' devices.
    ``made`` notes each slot and device encoder made, with whether the store existed then."""

    _cuda = property(lambda self: True, lambda self, value: None)

    def __init__(self, *args, groups: dict | None = None, **kwargs):
        self._groups_given = groups
        self.made: list = []
        super().__init__(*args, **kwargs)

    @functools.cached_property
    def _device_groups(self) -> dict:
        return self._spans(self._groups_given or {torch.device("cpu"): list(range(len(self._params)))})

    @functools.cached_property
    def _encoder(self):
        enc = Recorder._encoder.func(self)
        if enc is not None:
            self.made.append(("encoder", os.path.exists(self.path)))
        return enc

    def _make_slot(self):
        self.made.append(("slot", os.path.exists(self.path)))
        return super()._make_slot()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 5), nn.Linear(5, 5))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 20, generator=g), torch.randint(0, 5, (16,), generator=g)


def _train(path, tiers, cuda: bool, groups=None, steps=6, after_init=None, **kw):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    if cuda:
        rec = _CudaRecorder(model, path, opt, tiers=tiers, groups=groups, **kw)
    else:
        rec = Recorder(model, path, opt, tiers=tiers, grads_by_reference=False, **kw)
    if after_init is not None:
        after_init(rec)
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


# --------------------------------------------------------------------------------------
# the stores the branch writes
# --------------------------------------------------------------------------------------


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
    rec = _CudaRecorder(model, tmp_path / "s.zarr", opt, tiers=tiers, on_full="skip", queue_size=1)
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


# --------------------------------------------------------------------------------------
# the pool, made with the Recorder
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("tiers,groups,lag_band", [
    ("lossless", "one device", 0),
    ("rounded:4", "one device", 2),
    ("sketch:64", "one device", 0),
    ("lossless", "two devices, contiguous", 2),
    ("sketch:32", "two devices, interleaved", 0),
])
def test_the_pool_and_the_device_encoder_are_made_with_the_recorder_before_the_store(tmp_path, fake_cuda, tiers,
                                                                                      groups, lag_band):
    """On CUDA ``__init__`` makes every slot of the pool (device staging; pinned host buffers of
    what crosses to the host: the encoded payload on one device, float32 rows over several)
    and the device encoder before the store exists; record() makes none, and the store is
    the CPU path's."""
    sim, one = fake_cuda, GROUPS[groups] is None
    at_init = {}

    def after_init(rec):
        pool = rec._pool_size
        assert pool == rec._n_slots == 3  # queue_size + 1, all made
        assert rec.made.count(("slot", False)) == pool and len(rec.made) == pool + one  # no store yet, each
        assert (("encoder", False) in rec.made) == one
        for slot in [rec._free.get_nowait() for _ in range(pool)]:
            stage = {dev: tuple(t.numel() for t in pair) for dev, pair in slot.stage.items()}
            if one:
                enc = rec._encoder
                assert stage == {enc.device: (rec.d, rec.d)}
                want = dict(enc.payload())
                if lag_band:
                    want["lag_dots"] = (torch.float64, (lag_band,))
                assert {k: (v.dtype, tuple(v.shape)) for k, v in slot.host.items()} == want
                assert slot.grad is None and slot.weight is None  # only the payload crosses
                n_pinned = 1 + len(want)  # and the loss/lr scalars
            else:
                assert stage == {dev: (hi - lo, hi - lo) for dev, (_, lo, hi) in rec._device_groups.items()}
                assert slot.host is None and slot.grad.numel() == slot.weight.numel() == rec.d
                n_pinned = 3
            rec._free.put(slot)
        assert sim.allocs["pinned"] == pool * n_pinned
        assert sim.allocs["staging"] == pool * 2 * len(rec._device_groups)
        at_init.update(sim.allocs, made=list(rec.made))

    rec, _ = _train(tmp_path / "dev.zarr", tiers, True, GROUPS[groups], after_init=after_init, queue_size=2,
                    lag_band=lag_band)
    assert rec.made == at_init["made"]  # record() made no slot, no encoder
    assert sim.allocs["pinned"] == at_init["pinned"] and sim.allocs["staging"] == at_init["staging"]
    _train(tmp_path / "cpu.zarr", tiers, False, queue_size=2, lag_band=lag_band)
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")


@pytest.mark.parametrize("kind", ["pinned", "staging", "encoder"])
@pytest.mark.parametrize("tiers", ["lossless", "sketch:64"])
def test_a_pool_that_does_not_fit_fails_at_construction_and_leaves_no_store(tmp_path, fake_cuda, kind, tiers):
    """The last pinned host buffer, device staging vector or encoder working buffer does not
    fit: the Recorder raises the out-of-memory error from its construction, with no store,
    lock or writer thread left behind."""
    sim = fake_cuda
    model = _model()
    _CudaRecorder(model, tmp_path / "fits.zarr", tiers=tiers, queue_size=3).close()
    n = sim.allocs[kind]
    assert n > 0
    sim.allocs.clear()
    sim.fail = (kind, n)
    writers = {t for t in threading.enumerate() if t.name.startswith("gradtrace-writer")}
    with pytest.raises(torch.OutOfMemoryError, match=f"{kind} allocation no. {n} "):
        _CudaRecorder(model, tmp_path / "big.zarr", tiers=tiers, queue_size=3)
    assert not (tmp_path / "big.zarr").exists()
    assert {t for t in threading.enumerate() if t.name.startswith("gradtrace-writer")} == writers
    sim.fail = None
    Recorder(model, tmp_path / "big.zarr").close()  # nothing there, no lock: the path is free


# --------------------------------------------------------------------------------------
# a loss or lr that is a CUDA tensor
# --------------------------------------------------------------------------------------

SCALAR_GROUPS = {
    "one device": None,  # the parameters' side stream is not the loss's (cuda:0)
    "one device, the loss's side stream": {torch.device("cpu", 0): list(range(6))},  # index 0 as cuda:0
    "two devices": GROUPS["two devices, contiguous"],
}


@pytest.mark.parametrize("groups", list(SCALAR_GROUPS))
def test_a_cuda_loss_and_lr_are_snapshots_copied_to_the_host_on_the_side_stream(tmp_path, fake_cuda, groups):
    """A loss (a float32 temporary, as the callbacks pass it) and an lr (float64, which a
    scheduler changes in place) that are CUDA tensors, both changed in place after record()
    while the device is paused: each step stores the value it had at record(), as the CPU
    path does; record() read neither, and each was copied to the host from its snapshot."""
    sim, steps = fake_cuda, 6
    losses = []

    def run(path, cuda):
        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        x, y = _data()
        lr = torch.tensor(0.1, dtype=torch.float64)
        if cuda:
            lr = _on_cuda(lr)
            rec = _CudaRecorder(model, path, opt, groups=SCALAR_GROUPS[groups], queue_size=steps)
        else:
            rec = Recorder(model, path, opt, grads_by_reference=False, queue_size=steps)
        with rec, (sim.paused() if cuda else contextlib.nullcontext()):
            for step in range(steps):
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                loss = loss.detach() * 1.0
                if cuda:
                    losses.append(float(loss))
                    loss = _on_cuda(loss)
                rec.record(step, loss=loss, lr=lr)
                loss.fill_(-7.0)  # the temporary's memory, reused by the training stream
                lr.mul_(0.5)  # the scheduler's step
                opt.step()
                opt.zero_grad()

    run(tmp_path / "dev.zarr", True)
    assert _checked_reads(sim) == 2 * steps
    run(tmp_path / "cpu.zarr", False)
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")
    ds = xr.open_zarr(tmp_path / "dev.zarr")
    np.testing.assert_array_equal(ds.loss.values[:steps], losses)
    np.testing.assert_array_equal(ds.lr.values[:steps], 0.1 * 0.5 ** np.arange(steps))


def _three_groups(model):
    return [{"params": model[0].parameters()}, {"params": model[2].parameters()}, {"params": model[3].parameters()}]


@pytest.mark.parametrize("tiers", ["lossless", "sketch:64"])
def test_a_dropped_steps_cuda_loss_and_lrs_are_snapshots_the_writer_reads_on_the_side_stream(
        tmp_path, fake_cuda, stuck_writer, tiers):
    """on_full="skip" with the writer behind: a CUDA loss and the optimizer's CUDA lrs, changed
    in place after each record(), are stored (dropped steps included) with each step's
    values, the groups' difference flagged from the device comparison, as the CPU path
    stores them; the writer read every one of them on the side stream."""
    sim, release, steps = fake_cuda, stuck_writer, 10

    def run(path, cuda):
        model = _model()
        opt = torch.optim.SGD(_three_groups(model), lr=0.1)
        x, y = _data()
        lrs = [torch.tensor(0.0), torch.tensor(0.0)]
        if cuda:
            lrs = [_on_cuda(t) for t in lrs]
            rec = _CudaRecorder(model, path, opt, tiers=tiers, on_full="skip", queue_size=1)
        else:
            rec = Recorder(model, path, opt, tiers=tiers, on_full="skip", queue_size=1, grads_by_reference=False)
        for group, t in zip(opt.param_groups, lrs):
            group["lr"] = t
        # the writer behind: the CPU path's is stuck at step 0's row; the CUDA branch's waits
        # for step 0's events, which the paused device does not reach before the loop ends
        with rec, (sim.paused() if cuda else contextlib.nullcontext()):
            for step in range(steps):
                lrs[0].fill_(0.5 * 0.9 ** step)
                lrs[1].fill_(0.5 * 0.9 ** step if step % 3 else 0.05)
                opt.param_groups[2]["lr"] = 0.5 * 0.9 ** step  # a number, compared on the device too
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                loss = loss.detach() * 1.0
                rec.record(step, loss=_on_cuda(loss) if cuda else loss)
                loss.fill_(-7.0)
                for t in lrs:
                    t.fill_(123.0)  # a scheduler's next value, in place
                opt.zero_grad()  # no optimizer step: its lrs are stand-ins
            assert rec.summary()["n_skipped_steps"] == 8  # step 0 in the writer, step 1 queued
            release.set()

    run(tmp_path / "cpu.zarr", False)  # first: the stuck writer is let go at its end
    run(tmp_path / "dev.zarr", True)
    assert _checked_reads(sim) == 3 * steps  # loss, lr and the groups' comparison of each step
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")
    ds = xr.open_zarr(tmp_path / "dev.zarr")
    flags = np.asarray(ds.flags.values[:steps])
    assert list((flags & fmt.FLAG_SKIPPED) != 0) == [False] * 2 + [True] * 8
    assert list((flags & fmt.FLAG_LR_GROUPS_DIFFER) != 0) == [True, False, False] * 3 + [True]
    np.testing.assert_array_equal(ds.lr.values[:steps], np.float32(0.5 * 0.9 ** np.arange(steps)))
    assert not (ds.loss.values[:steps] == -7.0).any()


# (kind of each group's lr, snapshots read per run, flags of LR_STEPS); "cpu": a float32
# CPU tensor, "cpu64" a float64 one
SOME_DIFFER = [0, 16, 16, 0, 16]
LR_KINDS = {
    "every lr a CUDA tensor": (("cuda", "cuda", "cuda"), 10, SOME_DIFFER),
    "a CUDA lr among numbers": (("float", "cuda", "float"), 3, SOME_DIFFER),
    "group 0 on CUDA, a CPU tensor and a number": (("cuda", "cpu", "float"), 10, SOME_DIFFER),
    # a number against a float32 CPU tensor compares in float32, as on the host (0.1 == 0.1f)
    "a number, a CPU tensor, a CUDA tensor": (("float", "cpu", "cuda"), 4, SOME_DIFFER),
    # float32 on the device against a float64 CPU tensor compares in float64: 0.1f != 0.1
    "group 0 on CUDA, a float64 CPU tensor": (("cuda", "cpu64", "float"), 10, [16] * 5),
}
LR_STEPS = [(0.1, 0.1, 0.1), (0.1, 0.01, 0.1), (0.1, 0.1, 0.2), (0.05, 0.05, 0.05), (0.2, 0.2, 0.1)]


@pytest.mark.parametrize("kinds", list(LR_KINDS))
def test_cuda_lrs_of_param_groups_are_compared_on_the_device_and_read_by_the_writer(tmp_path, fake_cuda, kinds):
    """Param groups whose lrs are CUDA tensors (changed in place after each record()), numbers
    or CPU tensors: group 0's lr and the groups' difference flag are stored as the CPU path
    stores them; the comparison is made on the device (True at once where two numbers
    differ) and read by the writer, never by record()."""
    sim = fake_cuda
    kind, n_reads, expected_flags = LR_KINDS[kinds]

    def run(path, cuda):
        model = _model()
        opt = torch.optim.SGD(_three_groups(model), lr=0.1)
        x, y = _data()
        if cuda:
            rec = _CudaRecorder(model, path, opt, queue_size=len(LR_STEPS))
        else:
            rec = Recorder(model, path, opt, queue_size=len(LR_STEPS), grads_by_reference=False)
        tensors = [None if k == "float" else torch.tensor(0.0, dtype=torch.float64 if k == "cpu64" else torch.float32)
                   for k in kind]
        tensors = [_on_cuda(t) if cuda and k == "cuda" else t for t, k in zip(tensors, kind)]
        with rec, (sim.paused() if cuda else contextlib.nullcontext()):
            for step, values in enumerate(LR_STEPS):
                for group, t, v in zip(opt.param_groups, tensors, values):
                    if t is None:
                        group["lr"] = v
                    else:
                        t.fill_(v)
                        group["lr"] = t
                loss = nn.functional.cross_entropy(model(x), y)
                loss.backward()
                rec.record(step, loss=float(loss.detach()))
                for group, t in zip(opt.param_groups, tensors):
                    if t is None:
                        group["lr"] = 123.0
                    else:
                        t.fill_(123.0)
                opt.zero_grad()  # no optimizer step: its lrs are stand-ins

    run(tmp_path / "dev.zarr", True)
    assert _checked_reads(sim) == n_reads
    run(tmp_path / "cpu.zarr", False)
    _assert_same_store(tmp_path / "dev.zarr", tmp_path / "cpu.zarr")
    ds = xr.open_zarr(tmp_path / "dev.zarr")
    n = len(LR_STEPS)
    assert list(np.asarray(ds.flags.values[:n]) & fmt.FLAG_LR_GROUPS_DIFFER) == expected_flags
    first = [v[0] if kind[0] == "float" else float(np.float32(v[0])) for v in LR_STEPS]
    np.testing.assert_array_equal(ds.lr.values[:n], first)
