"""Sign shift between gradients (seed 000, "zigzag" paper; ../shared/METHODS.md).

Between steps j and k:

* ``sign_shift`` = 100 * #{i : G_j[i] * G_k[i] < 0} / #{i : G_j[i] != 0 and G_k[i] != 0}
  (percent of the coordinates where both are non-zero; NaN if there are none);
* ``zero_share`` = 100 * #{i : G_j[i] == 0 or G_k[i] == 0} / n (percent of *all* coordinates).

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

from analysis._common import group_attrs, lag_pairs, matrix, nonfinite, per_step, selected
from analysis.engine import Pass
from analysis.errors import AnalysisError, StepNotFoundError
from analysis.index import index_for, require
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


def sign_shift_matrix(run, steps=None, *, params=None, progress=None, scheduler=None, index=None) -> xr.Dataset:
    """Sign-shift percentages between every pair of selected steps, in one pass.

    Args:
        index: ``None`` (read the counts from the query index when it covers the steps),
            ``False`` (a pass), ``True`` (the index must answer).

    Returns:
        Dataset with ``sign_shift`` and ``zero_share``, both (step_i, step_j) percent in
        [0, 100]; ``sign_shift`` is 0 on the diagonal (NaN for an all-zero gradient).
        attrs ``answered_by``: ``"index"`` or ``"pass"``.

    Example:
        >>> s = sign_shift_matrix(run, range(200, 205))        # doctest: +SKIP
        >>> s.sign_shift.sel(step_i=200, step_j=201).item()    # doctest: +SKIP
        91.2
    """
    run = as_run(run)
    group = run.params(params)
    sel = selected(run, steps)
    rows = run.rows_of(sel)
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers_block(rows), f"the {len(rows)} selected steps")
    if idx is not None:
        counts = np.stack([idx.block("sign_disagree", rows), idx.block("sign_both", rows)])
    else:
        p = Pass(run, group)
        key = p.sign_gram(rows)
        counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = _percent(counts[0], counts[1], float(group.size))
    bad = nonfinite(run, sel)
    for arr in (shift, zero):
        arr[bad, :] = np.nan
        arr[:, bad] = np.nan
    attrs = {**_attrs(run, group), "answered_by": "pass" if idx is None else "index"}
    return xr.Dataset({"sign_shift": matrix(shift, sel, "sign_shift", attrs),
                       "zero_share": matrix(zero, sel, "zero_share", attrs)}, attrs=attrs)


def sign_shift_window(run, step: int, h: int = 5, *, params=None, progress=None, scheduler=None,
                      index=None) -> xr.Dataset:
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
                            scheduler=scheduler, index=index)
    out.attrs.update(h=int(h), window_start=int(step))
    return out


def sign_shift_lag(run, lag: int = 1, steps=None, *, params=None, progress=None, scheduler=None,
                   index=None) -> xr.Dataset:
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
    ra, rb = run.rows_of(a), run.rows_of(b)
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers(ra, rb), f"{len(a)} step pairs at lag {lag}")
    if idx is not None:
        counts = np.stack([idx.pairs("sign_disagree", ra, rb), idx.pairs("sign_both", ra, rb)])
    else:
        p = Pass(run, group)
        key = p.sign_pairs(ra, rb)
        counts = p.compute(progress=progress, scheduler=scheduler)[key]
    shift, zero = _percent(counts[0], counts[1], float(group.size))
    bad = nonfinite(run, a) | nonfinite(run, b)
    shift[bad] = np.nan
    zero[bad] = np.nan
    return per_step({"sign_shift": shift, "zero_share": zero}, run, a,
                    {**_attrs(run, group), "lag": int(lag), "answered_by": "pass" if idx is None else "index"})
