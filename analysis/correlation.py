"""Pairwise gradient correlation (seed 000, the "zigzag" paper; docs/methods.md).

``mu(j, k) = <G_j, G_k> / (||G_j|| * ||G_k||)`` in [-1, 1]; NaN where a gradient has zero
norm (or holds NaN/Inf). Lags and windows count *training steps*: on a run that recorded every
10th step, lag 1 does not exist and asking for it is an error, never a silent lag 10.

Every function reads the store once (one :class:`analysis.engine.Pass`), restricted to a
parameter group when ``params`` is given, and returns a labelled xarray object whose attrs
carry the tier and its error bound. When the store has a query index (``gradtrace index``,
:mod:`analysis.index`) that covers the request, the function reads the few entries of
``G G^T`` it needs instead (same values to float64 rounding: both sum the same float64
products, in another order) and says so: ``answered_by="index"`` (else ``"pass"``).
``index=False`` forces the pass; ``index=True`` makes a request the index cannot answer an
error.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from gradtrace_format import format as fmt

from analysis._common import (available_lags, cosines, group_attrs, lag_pairs, matrix, nonfinite, per_step, select,
                              selected, tier_attrs)
from gradtrace_format import integrity
from analysis.engine import Pass
from gradtrace_format.errors import AnalysisError, LagNotAvailableError, StepNotFoundError
from analysis.index import index_for, require
from analysis.store import as_run

MU = "mu(j,k) = <G_j, G_k> / (||G_j|| ||G_k||)"


def corr_matrix(run, steps=None, *, params=None, precision: str = "float64", progress=None,
                scheduler=None, index=None) -> xr.DataArray:
    """Full pairwise correlation matrix over a step selection, from one Gram pass.

    The Gram matrix ``G_S G_S^T`` is accumulated in float64 over parameter slabs (symmetric
    rank-k updates), then ``mu = G_jk / sqrt(G_jj G_kk)``.

    Args:
        run: a :class:`analysis.Run` or a store path.
        steps: ``None`` (every gradient step), a ``slice(a, b)`` (recorded steps in [a, b]),
            a ``range`` or a list of recorded steps.
        params: parameter group (name, glob such as ``"conv*"``, list); default all.
        precision: ``"float64"`` (exact, default) or ``"float32"`` (float32 BLAS per block,
            float64 across blocks: faster, relative error about 1e-7).
        progress: show a progress bar (``None``: only for long passes).
        scheduler: dask scheduler; default the active distributed client, else threads.
        index: ``None`` (use the query index when it covers the steps), ``False`` (always
            a pass) or ``True`` (the index must answer). The index holds float64 products,
            so ``precision="float32"`` answered by the index is float64.

    Returns:
        DataArray ``correlation`` with dims ``(step_i, step_j)`` (both |S| long, labelled
        with step numbers): symmetric, unit diagonal, values in [-1, 1], NaN rows and
        columns for zero-norm gradients. attrs: ``tier``, error bounds, ``params``,
        ``precision``.

    Example:
        >>> c = corr_matrix(run, slice(0, 99))                 # doctest: +SKIP
        >>> c.sel(step_i=10, step_j=11).item()                 # doctest: +SKIP
        -0.93
    """
    s = select(run, steps, params)
    run, group, sel, rows = s.run, s.group, s.steps, s.rows
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers_block(rows), f"the {len(rows)} selected steps")
    if idx is not None:
        gram = idx.block("gg", rows)
        precision = "float64"
    else:
        p = Pass(run, group)
        key = p.gram(rows, precision=precision)
        gram = p.compute(progress=progress, scheduler=scheduler)[key]
    gram = (gram + gram.T) / 2.0  # exact symmetry
    sq = np.diag(gram).copy()
    integrity.check_norms(run, rows, sq, group, precision)  # free: the pass (or the index) computed sq
    sq[s.nonfinite] = np.nan
    corr = cosines(gram, sq[:, None], sq[None, :])
    ok = np.isfinite(sq) & (sq > 0)
    corr[np.diag_indices_from(corr)] = np.where(ok, 1.0, np.nan)
    attrs = {"metric": MU, "precision": precision, **s.attrs(),
             "answered_by": "pass" if idx is None else "index"}
    if precision == "float32":
        attrs["precision_note"] = "float32 products per block, float64 across blocks (~1e-7 relative error)"
    return matrix(corr, sel, "correlation", attrs)


def corr(run, j: int, k: int, *, params=None, progress=None, scheduler=None, index=None) -> xr.DataArray:
    """The correlation ``mu(j, k) = <G_j, G_k> / (||G_j|| ||G_k||)`` of two gradient steps.

    One pass that reads only the two rows (not a matrix over a selection).

    Args:
        run: a :class:`analysis.Run` or a store path.
        j, k: recorded gradient steps (any order; ``j == k`` gives 1, or NaN for a zero gradient).
        params: parameter group (name, glob, list); default all.

    Returns:
        0-d DataArray ``correlation`` with scalar coords ``step_j``, ``step_k``; NaN where a
        gradient has zero norm or holds NaN/Inf. attrs: ``tier``, error bounds, ``params``.

    Raises:
        StepNotFoundError: j or k is not a recorded gradient step (the final iterate has none).

    Example:
        >>> corr(run, 10, 40).item()                           # doctest: +SKIP
        0.12
    """
    run = as_run(run)
    group = run.params(params)
    j, k = int(j), int(k)
    run.select_steps([j, k])  # both recorded, both with a gradient
    mu, uniq, sq, by = _pair_corr(run, group, np.array([j]), np.array([k]), progress, scheduler, index=index)
    value = float(mu[0])
    if j == k and np.isfinite(sq[0]) and sq[0] > 0:
        value = 1.0
    attrs = {"metric": MU, **group_attrs(group), **_answer_attrs(run, group, by)}
    return xr.DataArray(value, coords={"step_j": j, "step_k": k}, name="correlation", attrs=attrs)


def corr_window(run, step: int, h: int = 5, *, params=None, progress=None, scheduler=None,
                index=None) -> xr.DataArray:
    """The h x h correlation matrix of training steps ``step .. step + h - 1``.

    Example:
        >>> corr_window(run, 200, h=5)                         # doctest: +SKIP
    """
    run = as_run(run)
    if int(h) < 1:
        raise AnalysisError(f"h={h}: a window holds at least one step")
    try:
        run.select_steps(range(int(step), int(step) + int(h)))
    except StepNotFoundError as err:
        raise StepNotFoundError(
            f"the h={h} window at step {step} needs training steps {step}..{int(step) + int(h) - 1}, "
            f"all recorded with a gradient: {err}"
        ) from err
    out = corr_matrix(run, range(int(step), int(step) + int(h)), params=params, progress=progress,
                      scheduler=scheduler, index=index)
    out.attrs.update(h=int(h), window_start=int(step))
    return out


def _pair_corr(run, group, a: np.ndarray, b: np.ndarray, progress, scheduler, also=(), index=None):
    """Correlations of step pairs (a_i, b_i) in one pass (pair dots and the norms), or from
    the query index when it holds every pair.

    Returns ``(mu, steps, sq, by)``: the P correlations, the squared norms ``sq`` of the
    gradients at ``steps`` (every step of a pair, plus ``also``), NaN where not finite, and
    ``"index"`` or ``"pass"``.
    """
    uniq = np.unique(np.concatenate([a, b, np.asarray(also, dtype=np.int64)]))
    ra, rb, ru = run.rows_of(a), run.rows_of(b), run.rows_of(uniq)
    ia_, ib_ = np.concatenate([ra, ru]), np.concatenate([rb, ru])
    idx = index_for(run, group, index)
    idx = require(idx, index, idx is not None and idx.covers(ia_, ib_), f"{len(a)} step pairs")
    band = None if (idx is not None or index is False) else lag_band_dots(run, group, ra, rb)
    if band is not None:  # exact dots kept at capture, norms from grad_sqnorm: no pass
        sq = np.asarray(run.ds[fmt.GRAD_SQNORM].values, dtype=np.float64)[ru]
        sq[nonfinite(run, uniq)] = np.nan
        ia, ib = np.searchsorted(uniq, a), np.searchsorted(uniq, b)
        return cosines(band, sq[ia], sq[ib]), uniq, sq, "lag_band"
    if idx is not None:
        dots = idx.pairs("gg", ia_, ib_)
    else:
        p = Pass(run, group)
        key = p.pair_dots(ia_, ib_)
        dots = p.compute(progress=progress, scheduler=scheduler)[key]
    sq = dots[len(a):]
    sq[nonfinite(run, uniq)] = np.nan
    ia, ib = np.searchsorted(uniq, a), np.searchsorted(uniq, b)
    return cosines(dots[: len(a)], sq[ia], sq[ib]), uniq, sq, "pass" if idx is None else "index"


def _answer_attrs(run, group, by: str) -> dict:
    """The tier's error attrs, or, when the lag band answered, the exact source instead."""
    if by != "lag_band":
        return {**tier_attrs(run, group), "answered_by": by}
    return {"tier": run.header.tiers["grad"].name, "grad_tier": run.header.tiers["grad"].name, "max_rel_error": 0.0,
            "cosine_error_bound": 0.0, "answered_by": by,
            "source": "grad_lag_dot: <G_t, G_s> in float64 from the full-precision gradients, kept while "
                      "recording (Recorder(lag_band=)), and grad_sqnorm: exact whatever the tier"}


def lag_band_dots(run, group, ra: np.ndarray, rb: np.ndarray) -> np.ndarray | None:
    """``<G_a, G_b>`` of row pairs from the lag band the recorder kept (``grad_lag_dot``), or
    None when the store has none, the group is not every tensor, or a pair is further apart
    than the band or holds a NaN there (a row without a gradient, or a resume in between)."""
    L = int(run.header.extra.get("lag_band", 0))
    if not L or len(group.indices) != len(run.header.tensors) or len(ra) == 0:
        return None
    lo, hi = np.minimum(ra, rb), np.maximum(ra, rb)
    k = hi - lo
    if (k < 1).any() or (k > L).any():
        return None
    band = np.asarray(run.ds[fmt.LAG_DOT_ARRAY].values, dtype=np.float64)
    dots = band[hi, k - 1]
    return None if not np.isfinite(dots).all() else dots


def lag_series(run, lag=1, steps=None, *, params=None, progress=None, scheduler=None, index=None):
    """Lag-l correlation series ``mu(t, t + l)`` for every selected t with t + l recorded.

    Args:
        lag: a lag in training steps, or a list of lags (computed in the same pass).
        steps: selection of the first steps t (default all).
        index: ``None`` (read the query index when it holds every pair), ``False`` (a pass),
            ``True`` (the index must answer); see the module docstring.

    Returns:
        For one lag: DataArray ``lag_corr`` along ``step`` (= t; only t whose partner is
        recorded) with coords ``epoch``, ``lr``, ``loss``; attrs ``lag``. For a list: dims
        ``(lag, step)`` over the union of those t, NaN where a pair is missing.

    Raises:
        LagNotAvailableError: the schedule never recorded two steps that far apart (the
            message lists the lags that are available).

    Example:
        >>> lag_series(run, 1).plot()                           # doctest: +SKIP
        >>> lag_series(run, [1, 2, 3])                          # doctest: +SKIP
    """
    run = as_run(run)
    group = run.params(params)
    many = not np.isscalar(lag)
    lags = [int(x) for x in (lag if many else [lag])]
    starts = selected(run, steps)
    pairs = [lag_pairs(run, starts, lg) for lg in lags]
    a = np.concatenate([p[0] for p in pairs])
    b = np.concatenate([p[1] for p in pairs])
    mu, _, _, by = _pair_corr(run, group, a, b, progress, scheduler, index=index)
    attrs = {"metric": "mu(t, t+lag), " + MU, **group_attrs(group), **_answer_attrs(run, group, by)}
    if not many:
        ds = per_step({"lag_corr": mu}, run, a, attrs)
        out = ds["lag_corr"]
        out.attrs.update(attrs, lag=lags[0])
        return out
    union = np.unique(a)
    table = np.full((len(lags), len(union)), np.nan)
    pos = 0
    for i, (t, _) in enumerate(pairs):
        table[i, np.searchsorted(union, t)] = mu[pos: pos + len(t)]
        pos += len(t)
    out = xr.DataArray(table, dims=("lag", "step"), coords={"lag": lags, "step": union,
                       **run.step_coords(union)}, name="lag_corr", attrs=attrs)
    return out


def mean_corr(run, h: int = 5, steps=None, *, params=None, progress=None, scheduler=None,
              index=None) -> xr.DataArray:
    """Mean gradient correlation, zigzag paper eq. 3, at every selected step k.

    ``mu_k = 1/(h-1) * sum_{m=1}^{h-1} mu(k+m-1, k+m)``: the mean adjacent correlation over
    the window of training steps k .. k+h-1. NaN where a step of the window is not recorded
    (or a gradient has zero norm).

    Args:
        index: ``None`` (read the query index when it holds the adjacent pairs), ``False`` (a
            pass), ``True`` (the index must answer).

    Returns:
        DataArray ``mean_corr`` along ``step`` (= k) with coords ``epoch``, ``lr``, ``loss``;
        attrs ``h``, tier and error bound, ``answered_by``.

    Raises:
        LagNotAvailableError: no window of h consecutive training steps is recorded.

    Example:
        >>> m = mean_corr(run, h=5)                              # doctest: +SKIP
    """
    run = as_run(run)
    h = int(h)
    if h < 2:
        raise AnalysisError(f"h={h}: the mean gradient correlation needs a window of h >= 2 steps")
    group = run.params(params)
    starts = selected(run, steps)
    pool = run.grad_steps
    full = np.ones(len(starts), dtype=bool)
    for m in range(h):
        full &= np.isin(starts + m, pool)
    if not full.any():
        avail = ", ".join(map(str, available_lags(pool)))
        raise LagNotAvailableError(
            f"the mean gradient correlation with h={h} needs h consecutive recorded training steps "
            f"(adjacent pairs, lag 1); none of the selected windows of {run.path} is complete. "
            f"Available lags: {avail or 'none'}. Record every step, or use lag_series with an available lag."
        )
    ks = starts[full]
    adj = np.unique(np.concatenate([ks + m for m in range(h - 1)]))
    mu_adj, _, _, by = _pair_corr(run, group, adj, adj + 1, progress, scheduler, index=index)
    idx = np.searchsorted(adj, ks[:, None] + np.arange(h - 1)[None, :])
    vals = np.full(len(starts), np.nan)
    vals[full] = mu_adj[idx].mean(axis=1)
    attrs = {"metric": "mean gradient correlation (zigzag eq. 3)", "equation":
             "mu_k = 1/(h-1) sum_{m=1}^{h-1} mu(k+m-1, k+m)", "h": h,
             **group_attrs(group), **_answer_attrs(run, group, by)}
    out = per_step({"mean_corr": vals}, run, starts, attrs)["mean_corr"]
    out.attrs.update(attrs)
    return out


def corr_windows(run, h: int = 5, steps=None, *, params=None, progress=None, scheduler=None,
                 index=None) -> xr.DataArray:
    """h x h windows ``mu(k+i, k+j)`` at every selected start k, all in one pass.

    Returns:
        DataArray ``window_corr`` with dims ``(step, offset_i, offset_j)``: ``step`` is the
        window start k, offsets 0..h-1; NaN where step k+i or k+j is not recorded.

    Example:
        >>> w = corr_windows(run, h=5)                          # doctest: +SKIP
        >>> w.sel(step=200)                                     # the window at step 200  # doctest: +SKIP
    """
    run = as_run(run)
    h = int(h)
    if h < 1:
        raise AnalysisError(f"h={h}: a window holds at least one step")
    group = run.params(params)
    starts = selected(run, steps)
    pool = run.grad_steps
    ii, jj = np.triu_indices(h, 1)
    a = (starts[:, None] + ii[None, :]).ravel()
    b = (starts[:, None] + jj[None, :]).ravel()
    ok = np.isin(a, pool) & np.isin(b, pool)
    members = starts[:, None] + np.arange(h)[None, :]
    present = np.isin(members, pool)
    pairs, inv = np.unique(np.stack([a[ok], b[ok]], 1), axis=0, return_inverse=True)
    mu, uniq, sq, by = _pair_corr(run, group, pairs[:, 0], pairs[:, 1], progress, scheduler, also=members[present],
                                  index=index)
    vals = np.full(len(a), np.nan)
    vals[ok] = mu[inv.ravel()]
    vals = vals.reshape(len(starts), -1)
    out = np.full((len(starts), h, h), np.nan)
    out[:, ii, jj] = vals
    out[:, jj, ii] = vals
    norm_ok = np.zeros(members.shape, dtype=bool)
    norm_ok[present] = (sq > 0)[np.searchsorted(uniq, members[present])]  # NaN compares False
    out[:, np.arange(h), np.arange(h)] = np.where(norm_ok, 1.0, np.nan)
    coords = {"step": starts, "offset_i": np.arange(h), "offset_j": np.arange(h), **run.step_coords(starts)}
    attrs = {"metric": "mu(k+i, k+j), " + MU, "h": h, **group_attrs(group), **_answer_attrs(run, group, by)}
    return xr.DataArray(out, dims=("step", "offset_i", "offset_j"), coords=coords, name="window_corr", attrs=attrs)
