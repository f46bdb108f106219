"""Shared pytest setup: make ``tests.helpers_stores`` importable however pytest is started."""

import sys
import threading
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``@pytest.mark.cuda`` when no CUDA GPU is present (CI has none)."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return  # do not import torch for torch-free test runs
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)



@pytest.fixture
def stuck_writer(monkeypatch):
    """The recorder's writer stuck at its first row with data until the test sets the returned
    event (set at teardown too): the pool fills, and on_full="skip" drops the steps after."""
    from capture import writer as cw

    real = cw.StoreWriter.append
    release = threading.Event()

    def stuck(self, step, grad, weight, **kw):
        if grad is not None or kw.get("encoded") is not None:  # a row with data, not a skipped step
            release.wait(30)
        return real(self, step, grad, weight, **kw)

    monkeypatch.setattr(cw.StoreWriter, "append", stuck)
    yield release
    release.set()
