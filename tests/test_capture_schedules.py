"""Schedules: which steps each records, presets, JSON round trip, and what the Recorder stores."""

import numpy as np
import pytest
import torch
import xarray as xr

from capture import Recorder, at, every, every_step, parse_schedule, per_epoch, union, windows
from capture.schedules import recorded_steps, schedule_from_json


@pytest.mark.parametrize(
    "schedule, expected",
    [
        (every_step, list(range(12))),
        (every(4), [0, 4, 8]),
        (every(5, offset=3), [3, 8]),
        (at([0, 5, 9, 40]), [0, 5, 9]),
        (per_epoch(5), [0, 5, 10]),
        (per_epoch(3, every=2), [0, 6]),
        (windows(3, 5), [0, 1, 2, 5, 6, 7, 10, 11]),
        (windows(2, 5, offset=1), [1, 2, 6, 7, 11]),
        (every(6) | at([1]), [0, 1, 6]),
        (windows(2, 10) | every(4) | at([11]), [0, 1, 4, 8, 10, 11]),
    ],
)
def test_recorded_steps_and_json_round_trip(schedule, expected):
    assert recorded_steps(schedule, 12) == expected
    back = schedule_from_json(schedule.to_json())
    assert recorded_steps(back, 12) == expected and back == schedule
    assert isinstance(schedule.describe(), str) and schedule.describe()


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("every", list(range(8))),
        ("every:3", [0, 3, 6]),
        ("every:3:1", [1, 4, 7]),
        ("at:0,5,7", [0, 5, 7]),
        ("epoch:4", [0, 4]),
        ("epoch:2:2", [0, 4]),
        ("windows:2:4", [0, 1, 4, 5]),
        ("windows:2:4:1", [1, 2, 5, 6]),
        ("every:4|at:3", [0, 3, 4]),
    ],
)
def test_presets(spec, expected):
    assert recorded_steps(parse_schedule(spec), 8) == expected


@pytest.mark.parametrize(
    "bad, exc, msg",
    [
        (lambda: every(0), ValueError, "positive"),
        (lambda: every(2.5), ValueError, "positive integer"),
        (lambda: windows(6, 5), ValueError, "longer than its period"),
        (lambda: at([-1]), ValueError, ">= 0"),
        (lambda: per_epoch("x"), TypeError, "integer"),
        (lambda: parse_schedule("sometimes"), ValueError, "Presets|use 'every'"),
        (lambda: parse_schedule("every:x"), ValueError, "every"),
        (lambda: union(), ValueError, "at least one"),
        (lambda: union(3), TypeError, "callable"),
    ],
)
def test_bad_schedules_are_named(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        bad()


def test_custom_callable_is_described_but_not_rebuilt():
    s = union(lambda t: t == 2, every(5))
    assert recorded_steps(s, 8) == [0, 2, 5]
    with pytest.raises(ValueError, match="custom callable"):
        schedule_from_json(s.to_json())


def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))


def _train(rec, model, opt, steps, epoch=None):
    x = torch.randn(16, 4)
    for step in range(steps):
        loss = model(x).pow(2).mean()
        loss.backward()
        rec.record(step, loss=loss, epoch=epoch)
        opt.step()
        opt.zero_grad()


def test_recorder_stores_exactly_the_scheduled_steps(tmp_path):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, tmp_path / "w.zarr", opt, schedule="windows:3:10") as rec:
        _train(rec, model, opt, 25)
    ds = xr.open_zarr(tmp_path / "w.zarr")
    np.testing.assert_array_equal(ds.step.values, [0, 1, 2, 10, 11, 12, 20, 21, 22, 25])
    assert ds.attrs["gradtrace"]["schedule"]["kind"] == "windows"


def test_per_epoch_schedule_derives_epochs(tmp_path):
    model = _tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Recorder(model, tmp_path / "e.zarr", opt, schedule=per_epoch(4)) as rec:
        _train(rec, model, opt, 10)
    ds = xr.open_zarr(tmp_path / "e.zarr")
    np.testing.assert_array_equal(ds.step.values, [0, 4, 8, 10])
    np.testing.assert_array_equal(ds.epoch.values, [0, 1, 2, 2])


def test_a_skipped_step_does_no_work(tmp_path, monkeypatch):
    """The schedule is asked first: a skipped step never reaches flattening or copying."""
    model = _tiny()
    rec = Recorder(model, tmp_path / "n.zarr", schedule=at([3]))

    def must_not_run(*args, **kwargs):
        raise AssertionError("a skipped step flattened or copied tensors")

    monkeypatch.setattr(rec, "_record", must_not_run)
    for step in (0, 1, 2, 4):
        assert rec.record(step) is False  # grads are all None: nothing looked at them
    with pytest.raises(AssertionError, match="skipped step"):
        rec.record(3)
    rec.close(record_final=False)
