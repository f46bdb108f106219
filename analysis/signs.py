"""Sign shift between gradients (seed 000, "zigzag" paper; docs/methods.md).

Between steps j and k:

* ``sign_shift`` = 100 * #{i : G_j[i] * G_k[i] < 0} / D, with the denominator D chosen by
  ``denominator=``:

  - ``"both_nonzero"`` (default): D = #{i : G_j[i] != 0 and G_k[i] != 0}, the coordinates
    where both are non-zero (NaN if there are none);
  - ``"all"``: D = n, every coordinate of the group: the zigzag paper's "~90% of entries
    change sign" read literally. Coordinates zero at either step count as "no flip", so this
    is ``(1 - zero_share / 100)`` times the both-nonzero value (lower on a ReLU net).

* ``zero_share`` = 100 * #{i : G_j[i] == 0 or G_k[i] == 0} / n (percent of *all* coordinates).

Every result says which denominator it used: ``attrs["denominator"]`` and the ``long_name``
of ``sign_shift``.

Counts are exact on every tier: dense tiers keep signs and zeros exactly (rounding never
changes them), and the sketch tier stores exact packed sign and nonzero bits. The counts come
from float32 BLAS products of {-1, 0, 1} matrices (exact integers, ../shared/STORAGE.md).
Steps whose gradient holds NaN/Inf give NaN.

With a query index (``gradtrace index``) that covers the steps, the two counts are read from
it (``index/sign_disagree``, ``index/sign_both``: the same exact integers) and the result says
``answered_by="index"``; ``index=False`` forces the pass.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis._common import group_attrs, lag_pairs, matrix, nonfinite, per_step, select, selected
from analysis.engine import Pass
from gradtrace_format.errors import AnalysisError, StepNotFoundError
from analysis.index import index_for, require
from analysis.store import as_run

DENOMINATORS = ("both_nonzero", "all")
_DENOM_TEXT = {"both_nonzero": "#{G_j[i] != 0 and G_k[i] != 0}", "all": "n (all coordinates)"}
LONG_NAME = {"both_nonzero": "% of coordinates flipping sign, among those non-zero at both steps",
             "all": "% of all coordinates flipping sign"}


def definition(denominator: str = "both_nonzero") -> str:
    """The formula behind a result computed with ``denominator``."""
    return (f"sign_shift = 100 * #{{G_j[i] G_k[i] < 0}} / {_DENOM_TEXT[check_denominator(denominator)]}; "
            "zero_share = 100 * #{G_j[i] == 0 or G_k[i] == 0} / n")


def check_denominator(denominator: str) -> str:
    if denominator not in DENOMINATORS:
        raise AnalysisError(f"denominator={denominator!r}: use 'both_nonzero' (coordinates non-zero at both steps, "
                            "the default) or 'all' (every coordinate, the zigzag paper's wording)")
    return denominator


DEFINITION = definition("both_nonzero")


def _attrs(run, group, denominator: str) -> dict:
    tier = run.header.tiers["grad"]
    src = "packed sign bits (exact)" if tier.is_sketch else "stored values (signs exact)"
    return {"metric": "sign shift (percent)", "definition": definition(denominator), "denominator": denominator,
            "tier": tier.name, "source": src, "max_error": 0.0, **group_attrs(group)}


def percent(disagree, both, n, denominator: str = "both_nonzero"):
    """``(sign_shift, zero_share)`` in percent from the counts ``disagree`` = #{G_j G_k < 0},
    ``both`` = #{both non-zero} and the coordinate count ``n`` (broadcast together)."""
    disagree, both = np.asarray(disagree, dtype=np.float64), np.asarray(both, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if check_denominator(denominator) == "all":
            shift = np.where(n > 0, 100.0 * disagree / n, np.nan)
        else:
            shift = np.where(both > 0, 100.0 * disagree / both, np.nan)
        zero = 100.0 * (n - both) / n
    return shift, zero


def _label(ds: xr.Dataset, denominator: str) -> xr.Dataset:
    ds["sign_shift"].attrs.update(long_name=LONG_NAME[denominator], units="%", denominator=denominator)
    ds["zero_share"].attrs.update(long_name="% of coordinates zero at either step", units="%")
    return ds


def sign_shift_matrix(run, steps=None, *, params=None, denominator: str = "both_nonzero", progress=None,
                      scheduler=None, index=None) -> xr.Dataset:
    """Sign-shift percentages between every pair of selected steps, in one pass.

    Args:
        denominator: ``"both_nonzero"`` (default) or ``"all"`` (see the module docstring).
        index: ``None`` (read the counts from the query index when it covers the steps),
            ``False`` (a pass), ``True`` (the index must answer). Both denominators come
            from the index: "all" divides its ``sign_disagree`` count by the group size n.

    Returns:
        Dataset with ``sign_shift`` and ``zero_share``, both (step_i, step_j) percent in
        [0, 100]; ``sign_shift`` is 0 on the diagonal (NaN for an all-zero gradient).
        attrs ``answered_by``: ``"index"`` or ``"pass"``.

    Example:
        >>> s = sign_shift_matrix(run, range(200, 205))        # doctest: +SKIP
        >>> s.sign_shift.sel(step_i=200, step_j=201).item()    # doctest: +SKIP
        91.2
    """
    check_denominator(denominator)
    s = select(run, steps, params)
    run, group, sel, rows = s.run, s.group, s.steps, s.rows
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers_block(rows), f"the {len(rows)} selected steps")
    if idx is not None:
        counts = np.stack([idx.block("sign_disagree", rows), idx.block("sign_both", rows)])
    else:
        p = Pass(run, group)
        key = p.sign_gram(rows)
        counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = percent(counts[0], counts[1], float(group.size), denominator)
    for arr in (shift, zero):
        arr[s.nonfinite, :] = np.nan
        arr[:, s.nonfinite] = np.nan
    attrs = {**_attrs(run, group, denominator), "answered_by": "pass" if idx is None else "index"}
    return _label(xr.Dataset({"sign_shift": matrix(shift, sel, "sign_shift", dict(attrs)),
                              "zero_share": matrix(zero, sel, "zero_share", dict(attrs))}, attrs=attrs), denominator)


def sign_shift(run, j: int, k: int, *, params=None, denominator: str = "both_nonzero", progress=None,
               scheduler=None) -> xr.Dataset:
    """Sign shift between two gradient steps j and k (one pass over the two rows).

    Args:
        denominator: ``"both_nonzero"`` (default) or ``"all"`` (see the module docstring).

    Returns:
        Dataset of 0-d ``sign_shift`` (percent of the coordinates whose signs differ, over the
        coordinates non-zero at both steps or over all of them; NaN if there are none) and ``zero_share`` (percent of all coordinates
        zero at either step), scalar coords ``step_j``, ``step_k``; NaN for a NaN/Inf gradient.

    Raises:
        StepNotFoundError: j or k is not a recorded gradient step.

    Example:
        >>> sign_shift(run, 10, 11)["sign_shift"].item()       # doctest: +SKIP
        48.7
    """
    check_denominator(denominator)
    run = as_run(run)
    group = run.params(params)
    j, k = int(j), int(k)
    run.select_steps([j, k])
    p = Pass(run, group)
    key = p.sign_pairs(run.rows_of([j]), run.rows_of([k]))
    counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = percent(counts[0], counts[1], float(group.size), denominator)
    if (nonfinite(run, np.array([j])) | nonfinite(run, np.array([k]))).any():
        shift, zero = shift * np.nan, zero * np.nan
    attrs = _attrs(run, group, denominator)
    coords = {"step_j": j, "step_k": k}
    return _label(xr.Dataset({"sign_shift": xr.DataArray(float(shift[0]), coords=coords, attrs=dict(attrs)),
                              "zero_share": xr.DataArray(float(zero[0]), coords=coords, attrs=dict(attrs))},
                             attrs=attrs), denominator)


def sign_shift_window(run, step: int, h: int = 5, *, params=None, denominator: str = "both_nonzero", progress=None,
                      scheduler=None, index=None) -> xr.Dataset:
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
    out = sign_shift_matrix(run, range(int(step), int(step) + int(h)), params=params, denominator=denominator,
                            progress=progress, scheduler=scheduler, index=index)
    out.attrs.update(h=int(h), window_start=int(step))
    return out


def sign_shift_lag(run, lag: int = 1, steps=None, *, params=None, denominator: str = "both_nonzero", progress=None,
                   scheduler=None, index=None) -> xr.Dataset:
    """Sign shift between t and t + lag (training steps) for every selected t.

    Args:
        denominator: ``"both_nonzero"`` (default) or ``"all"`` (see the module docstring).
        index: as for :func:`sign_shift_matrix`.

    Returns:
        Dataset along ``step`` (= t, only where t + lag is recorded) with ``sign_shift`` and
        ``zero_share`` (percent), coords ``epoch``, ``lr``, ``loss``; attrs ``lag``,
        ``denominator``.

    Raises:
        LagNotAvailableError: no two recorded steps are ``lag`` training steps apart.

    Example:
        >>> sign_shift_lag(run, 1).sign_shift.mean().item()    # doctest: +SKIP
    """
    check_denominator(denominator)
    run = as_run(run)
    group = run.params(params)
    a, b = lag_pairs(run, selected(run, steps), lag)
    ra, rb = run.rows_of(a), run.rows_of(b)
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers(ra, rb), f"{len(a)} step pairs at lag {lag}")
    if idx is not None:
        counts = np.stack([idx.pairs("sign_disagree", ra, rb), idx.pairs("sign_both", ra, rb)])
    else:
        p = Pass(run, group)
        key = p.sign_pairs(ra, rb)
        counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = percent(counts[0], counts[1], float(group.size), denominator)
    bad = nonfinite(run, a) | nonfinite(run, b)
    shift[bad] = np.nan
    zero[bad] = np.nan
    ds = per_step({"sign_shift": shift, "zero_share": zero}, run, a,
                  {**_attrs(run, group, denominator), "lag": int(lag),
                   "answered_by": "pass" if idx is None else "index"})
    return _label(ds, denominator)
