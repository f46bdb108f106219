"""Shared by the kernel tests: run a test on a kernels module's compiled backend and again on
its numpy fallback, and data with zeros, negative zeros and scales from 1e-6 to 1e2."""

from __future__ import annotations

import numpy as np
import pytest


def use_backend(kernels, name: str, monkeypatch) -> str:
    """Select ``name`` ("numba" or "numpy") in the module ``kernels`` for this test."""
    if name == "numba":
        kernels._get()
        if kernels.BACKEND != "numba":
            pytest.skip("numba is not importable here")
    else:
        monkeypatch.setattr(kernels, "_impl", kernels._NUMPY)
        monkeypatch.setattr(kernels, "BACKEND", "numpy")
    return name


def kernel_data(rng, rows=7, cols=3001):
    x = rng.standard_normal((rows, cols)).astype(np.float32) * np.float32(10.0) ** rng.integers(-6, 3, size=(rows, 1))
    x[2, ::5] = 0.0  # zeros, and negative zeros that count as zero
    x[3, ::7] = -0.0
    return x
