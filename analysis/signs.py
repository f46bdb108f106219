"""Sign shift between gradients (seed 000, "zigzag" paper; ../shared/METHODS.md).

Between steps j and k:

* ``sign_shift`` = 100 * #{i : G_j[i] * G_k[i] < 0} / #{i : G_j[i] != 0 and G_k[i] != 0}
  (percent of the coordinates where both are non-zero; NaN if there are none);
* ``zero_share`` = 100 * #{i : G_j[i] == 0 or G_k[i] == 0} / n (percent of *all* coordinates).

Counts are exact on every tier: dense tiers keep signs and zeros exactly (rounding never
changes them), and the sketch tier stores exact packed sign and nonzero bits. The counts come
from float32 BLAS products of {-1, 0, 1} matrices (exact integers, ../shared/STORAGE.md).
Steps whose gradient holds NaN/Inf give NaN.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis._common import group_attrs, lag_pairs, matrix, nonfinite, per_step, selected
from analysis.engine import Pass
from analysis.errors import AnalysisError, StepNotFoundError
from analysis.store import as_run

DEFINITION = ("sign_shift = 100 * #{G_j[i] G_k[i] < 0} / #{G_j[i] != 0 and G_k[i] != 0}; "
              "zero_share = 100 * #{G_j[i] == 0 or G_k[i] == 0} / n")


def _attrs(run, group) -> dict:
    tier = run.header.tiers["grad"].name
    src = "packed sign bits (exact)" if tier == "sketch" else "stored values (signs exact)"
    return {"metric": "sign shift (percent)", "definition": DEFINITION, "tier": tier, "source": src,
            "max_error": 0.0, **group_attrs(group)}


def _percent(disagree, both, n):
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(both > 0, 100.0 * disagree / both, np.nan)
    zero = 100.0 * (n - both) / n
    return shift, zero


def sign_shift_matrix(run, steps=None, *, params=None, progress=None, scheduler=None) -> xr.Dataset:
    """Sign-shift percentages between every pair of selected steps, in one pass.

    Returns:
        Dataset with ``sign_shift`` and ``zero_share``, both (step_i, step_j) percent in
        [0, 100]; ``sign_shift`` is 0 on the diagonal (NaN for an all-zero gradient).

    Example:
        >>> s = sign_shift_matrix(run, range(200, 205))        # doctest: +SKIP
        >>> s.sign_shift.sel(step_i=200, step_j=201).item()    # doctest: +SKIP
        91.2
    """
    run = as_run(run)
    group = run.params(params)
    sel = selected(run, steps)
    p = Pass(run, group)
    key = p.sign_gram(run.rows_of(sel))
    counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = _percent(counts[0], counts[1], float(group.size))
    bad = nonfinite(run, sel)
    for arr in (shift, zero):
        arr[bad, :] = np.nan
        arr[:, bad] = np.nan
    attrs = _attrs(run, group)
    return xr.Dataset({"sign_shift": matrix(shift, sel, "sign_shift", attrs),
                       "zero_share": matrix(zero, sel, "zero_share", attrs)}, attrs=attrs)


def sign_shift(run, j: int, k: int, *, params=None, progress=None, scheduler=None) -> xr.Dataset:
    """Sign shift between two gradient steps j and k (one pass over the two rows).

    Returns:
        Dataset of 0-d ``sign_shift`` (percent of the coordinates non-zero at both steps whose
        signs differ; NaN if there are none) and ``zero_share`` (percent of all coordinates
        zero at either step), scalar coords ``step_j``, ``step_k``; NaN for a NaN/Inf gradient.

    Raises:
        StepNotFoundError: j or k is not a recorded gradient step.

    Example:
        >>> sign_shift(run, 10, 11)["sign_shift"].item()       # doctest: +SKIP
        48.7
    """
    run = as_run(run)
    group = run.params(params)
    j, k = int(j), int(k)
    run.select_steps([j, k])
    p = Pass(run, group)
    key = p.sign_pairs(run.rows_of([j]), run.rows_of([k]))
    counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = _percent(counts[0], counts[1], float(group.size))
    if (nonfinite(run, np.array([j])) | nonfinite(run, np.array([k]))).any():
        shift, zero = shift * np.nan, zero * np.nan
    attrs = _attrs(run, group)
    coords = {"step_j": j, "step_k": k}
    return xr.Dataset({"sign_shift": xr.DataArray(float(shift[0]), coords=coords, attrs=attrs),
                       "zero_share": xr.DataArray(float(zero[0]), coords=coords, attrs=attrs)}, attrs=attrs)


def sign_shift_window(run, step: int, h: int = 5, *, params=None, progress=None, scheduler=None) -> xr.Dataset:
    """Sign-shift matrix of the window of training steps ``step .. step + h - 1``."""
    run = as_run(run)
    if int(h) < 1:
        raise AnalysisError(f"h={h}: a window holds at least one step")
    try:
        run.select_steps(range(int(step), int(step) + int(h)))
    except StepNotFoundError as err:
        raise StepNotFoundError(
            f"the h={h} window at step {step} needs training steps {step}..{int(step) + int(h) - 1}: {err}"
        ) from err
    out = sign_shift_matrix(run, range(int(step), int(step) + int(h)), params=params, progress=progress,
                            scheduler=scheduler)
    out.attrs.update(h=int(h), window_start=int(step))
    return out


def sign_shift_lag(run, lag: int = 1, steps=None, *, params=None, progress=None, scheduler=None) -> xr.Dataset:
    """Sign shift between t and t + lag (training steps) for every selected t.

    Returns:
        Dataset along ``step`` (= t, only where t + lag is recorded) with ``sign_shift`` and
        ``zero_share`` (percent), coords ``epoch``, ``lr``, ``loss``; attrs ``lag``.

    Raises:
        LagNotAvailableError: no two recorded steps are ``lag`` training steps apart.

    Example:
        >>> sign_shift_lag(run, 1).sign_shift.mean().item()    # doctest: +SKIP
    """
    run = as_run(run)
    group = run.params(params)
    a, b = lag_pairs(run, selected(run, steps), lag)
    p = Pass(run, group)
    key = p.sign_pairs(run.rows_of(a), run.rows_of(b))
    counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = _percent(counts[0], counts[1], float(group.size))
    bad = nonfinite(run, a) | nonfinite(run, b)
    shift[bad] = np.nan
    zero[bad] = np.nan
    return per_step({"sign_shift": shift, "zero_share": zero}, run, a, {**_attrs(run, group), "lag": int(lag)})
