"""Shared pytest setup: make ``tests.helpers_stores`` importable however pytest is started."""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


def pytest_collection_modifyitems(config, items):
    """Skip tests marked ``@pytest.mark.cuda`` when no CUDA GPU is present (CI has none)."""
    import pytest

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
