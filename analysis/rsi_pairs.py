"""RSI, EB and gamma against every recorded iterate at once, from the query index.

The No Wrong Turns protocol (seeds 001/004; docs/methods.md) asks, for a reference point
w*, whether the path ever turns away from it: ``RSI(t, w*) = <G_t, w_t - w*> / ||w_t - w*||^2
<= 0`` at some step t before it reaches w*. With the query index (``gradtrace index``) every
recorded iterate ``w_s`` is such a reference for free (``V = W - a``, the iterates relative to
the index's anchor)::

    ||w_t - w_s||^2 = VV_tt - 2 VV_ts + VV_ss,      <G_t, w_t - w_s> = GV_tt - GV_ts

for all (t, s) at once (T x (T + 1) numbers from three reads of the index).
:func:`rsi_all_references` returns them as a labelled Dataset and :func:`never_turns_away`
answers "which reference points does the path never turn away from" in one call.

Accuracy: the expanded form loses digits when w_t is close to w_s (t next to s), exactly as in
:func:`analysis.rsi.rsi` (its docstring and ``analysis.index.cancellation``). Those pairs
(predicted error above ``RSI_INDEX_RTOL``) are recomputed directly by one pass over the rows
they involve (``fallback=True``, the default), or set to NaN with ``inexact`` True
(``fallback=False``); the variable ``by_pass`` says which pairs the pass computed.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis._common import selected
from analysis.engine import Pass
from gradtrace_format import format as fmt
from gradtrace_format.errors import AnalysisError
from analysis.index import RSI_INDEX_RTOL, cancellation, index_for
from analysis.rsi import _tier_attrs, rsi_from_products, rsi_space
from analysis.store import as_run

DEFINITION = ("RSI(t, s) = <G_t, w_t - w_s> / ||w_t - w_s||^2; EB(t, s) = ||G_t|| / ||w_t - w_s||; "
              "gamma(t, s) = RSI / EB = cos(G_t, w_t - w_s); distance = ||w_t - w_s||")
RULE = ("reference step s is never turned away from when RSI(t, s) > 0 (equivalently gamma > 0) for every "
        "selected gradient step t < s (pairs with w_t = w_s or a non-finite gradient are skipped), and there is "
        "at least one such t")


def rsi_all_references(run, steps=None, references=None, *, fallback: bool = True, progress=None,
                       scheduler=None) -> xr.Dataset:
    """RSI, EB, gamma and distance for every (gradient step t, recorded iterate s) pair.

    Args:
        run: a :class:`analysis.Run` or a store path with a full query index (``gradtrace
            index STORE``; a banded index does not hold the far pairs).
        steps: gradient steps t (default all; ``slice(a, b)``, a range or a list).
        references: recorded iterates s used as w* (default every row, the final iterate
            included; same forms as ``steps``).
        fallback: recompute the pairs whose expanded form would lose digits by a direct pass
            (default); False sets them to NaN and marks them ``inexact``.

    Returns:
        Dataset with dims ``(step, reference)`` (T_sel x S_sel): ``rsi``, ``eb``, ``gamma``,
        ``eta_star``, ``distance`` (float64; NaN where w_t = w_s), ``by_pass`` and ``inexact``
        (bool); coords ``step`` (+ ``epoch``, ``lr``, ``loss``) and ``reference`` (step numbers).
        attrs: ``answered_by`` ("index" or "index+pass"), ``pass_pairs``, definitions, tier.

    Raises:
        AnalysisError: the store has no full, up-to-date index for these rows (the message says
            how to build it).

    Example:
        >>> pairs = rsi_all_references(run)                      # doctest: +SKIP
        >>> pairs.gamma.sel(reference=run.final_step)            # = rsi(run).gamma  # doctest: +SKIP
    """
    run = as_run(run)
    group = run.params()
    space = rsi_space(run)
    sel = selected(run, steps)
    refs = run.select_steps(references, grads=False)
    if len(refs) == 0:
        raise AnalysisError(f"references={references!r} selects no recorded iterate of {run.path}")
    rows, R = run.rows_of(sel), run.rows_of(refs)
    idx = index_for(run, group, None)
    if idx is None or idx.band is not None or not idx.has("gv") or not idx.covers(np.r_[rows, R]):
        have = ("no query index" if idx is None else
                f"a banded index (lags 0..{idx.band})" if idx.band is not None else
                f"an index of {idx.n_valid} valid rows of {run.header.n_steps}" if idx.has("gv") else
                "an index without <G, V> (grad and weight are stored in different spaces)")
        raise AnalysisError(f"rsi_all_references needs a full query index of {run.path}, which has {have}. "
                            f"Run `gradtrace index {run.path}` (with --rebuild to replace a banded one).")
    gv_tt, vv_tt = idx.pairs("gv", rows, rows), idx.pairs("vv", rows, rows)
    gv_ts, vv_ts = idx.block("gv", rows, R), idx.block("vv", rows, R)
    vv_ss = idx.pairs("vv", R, R)
    dist2 = vv_tt[:, None] - 2.0 * vv_ts + vv_ss[None, :]
    gdiff = gv_tt[:, None] - gv_ts
    s = np.abs(vv_tt)[:, None] + 2.0 * np.abs(vv_ts) + np.abs(vv_ss)[None, :]
    sg = np.abs(gv_tt)[:, None] + np.abs(gv_ts)
    gg = np.broadcast_to(run.per_tensor_scalar(fmt.GRAD_SQNORM, rows, group)[:, None], dist2.shape).copy()
    rel = cancellation(s, dist2)
    with np.errstate(divide="ignore", invalid="ignore"):
        gamma_err = np.where(gg > 0, cancellation(sg, np.sqrt(gg * np.maximum(dist2, 0.0))), 0.0) + rel
    same = rows[:, None] == R[None, :]
    dist2[same], gdiff[same] = 0.0, 0.0
    todo = ((dist2 <= 0) | (rel > RSI_INDEX_RTOL) | (gamma_err > RSI_INDEX_RTOL)) & ~same
    inexact = np.zeros(dist2.shape, bool)
    if todo.any() and fallback:
        p = Pass(run, group)
        keys = {}
        for j in np.flatnonzero(todo.any(axis=0)):
            keys[j] = p.ref_dist(rows[todo[:, j]], space, ref_rows=R[j:j + 1], coef=np.ones(1))
        res = p.compute(progress=progress, scheduler=scheduler)
        for j, k in keys.items():
            dist2[todo[:, j], j], gdiff[todo[:, j], j] = res[k]
    elif todo.any():
        dist2[todo], gdiff[todo] = np.nan, np.nan
        inexact = todo.copy()
    out = rsi_from_products(dist2, gdiff, gg)
    coords = {"step": ("step", sel), "reference": ("reference", refs.astype(np.int64)),
              **run.step_coords(sel)}
    data = {k: (("step", "reference"), out[k]) for k in ("rsi", "eb", "gamma", "eta_star", "distance")}
    data["by_pass"] = (("step", "reference"), todo & fallback)
    data["inexact"] = (("step", "reference"), inexact)
    attrs = {"definitions": DEFINITION, "answered_by": "index+pass" if (todo.any() and fallback) else "index",
             "pass_pairs": int(todo.sum()) if fallback else 0, "inexact_pairs": int(inexact.sum()),
             "rsi_index_rtol": RSI_INDEX_RTOL, **_tier_attrs(run, group)}
    return xr.Dataset(data, coords=coords, attrs=attrs)


def never_turns_away(run_or_pairs, steps=None, references=None, *, progress=None, scheduler=None) -> xr.Dataset:
    """The reference points the path never turns away from (one call).

    Rule: a recorded iterate ``w_s`` qualifies when ``RSI(t, s) > 0`` for every selected
    gradient step ``t < s`` (pairs with ``w_t = w_s`` or a non-finite gradient are skipped) and
    at least one such t exists. RSI > 0 is gamma > 0: the gradient always points away from w_s,
    so every small enough gradient step moves towards it.

    Args:
        run_or_pairs: a store (path or Run; :func:`rsi_all_references` is computed) or the
            Dataset :func:`rsi_all_references` returned.
        steps, references: as in :func:`rsi_all_references` (ignored for a Dataset).

    Returns:
        Dataset along ``reference``: ``never_turns_away`` (bool), ``first_turn_away`` (the
        earliest step t < s with RSI <= 0, -1 if none), ``share_positive`` (fraction of the
        steps t < s with RSI > 0, NaN if none), ``n_steps_before`` (steps t < s counted), and
        ``min_gamma`` (smallest gamma(t, s) over t < s). attrs: ``rule`` and ``steps`` (the
        qualifying reference steps).

    Example:
        >>> ntw = never_turns_away(run)                         # doctest: +SKIP
        >>> ntw.attrs["steps"]                                  # doctest: +SKIP
    """
    pairs = run_or_pairs if isinstance(run_or_pairs, xr.Dataset) else rsi_all_references(
        run_or_pairs, steps, references, progress=progress, scheduler=scheduler)
    t = np.asarray(pairs["step"].values)
    s = np.asarray(pairs["reference"].values)
    r = np.asarray(pairs["rsi"].values)
    g = np.asarray(pairs["gamma"].values)
    before = t[:, None] < s[None, :]
    counted = before & np.isfinite(r)
    bad = counted & (r <= 0)
    n = counted.sum(axis=0)
    first = np.where(bad.any(axis=0), t[np.argmax(bad, axis=0)], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(n > 0, (counted & (r > 0)).sum(axis=0) / n, np.nan)
    gmin = np.where(n > 0, np.where(counted, g, np.inf).min(axis=0), np.nan)
    ok = (n > 0) & ~bad.any(axis=0)
    out = xr.Dataset(
        {"never_turns_away": ("reference", ok), "first_turn_away": ("reference", first.astype(np.int64)),
         "share_positive": ("reference", share), "n_steps_before": ("reference", n.astype(np.int64)),
         "min_gamma": ("reference", gmin)},
        coords={"reference": s},
        attrs={"rule": RULE, "steps": s[ok].astype(np.int64), "answered_by": pairs.attrs.get("answered_by", "")},
    )
    return out
