"""RSI, EB, gamma, locally optimal learning rate and distance to a reference point.

Seeds 001/004 ("No Wrong Turns"), as docs/methods.md defines them, for a reference w*
and each recorded gradient step t with w_t != w*::

    RSI_t   = <G_t, w_t - w*> / ||w_t - w*||^2
    EB_t    = ||G_t|| / ||w_t - w*||
    gamma_t = RSI_t / EB_t = cos(G_t, w_t - w*)
    eta*_t  = RSI_t / EB_t^2 = <G_t, w_t - w*> / ||G_t||^2
    distance_t = ||w_t - w*||

A new reference costs one pass over the store: the pass accumulates ``||w_t - w*||^2`` and
``<G_t, w_t - w*>`` per step in float64, and ``||G_t||^2`` comes from the per-step scalars the
capture stored (``grad_sqnorm``, per tensor for parameter groups).

Why not ``||w_t||^2 - 2<w_t, w*> + ||w*||^2`` with the stored ``weight_sqnorm`` and
``grad_dot_weight``: near the end of training ``||w_t - w*||`` is tiny next to ``||w_t||``,
and that formula loses ``log10((||w_t||^2 + ||w*||^2) / ||w_t - w*||^2)`` of float64's 16
digits (8 or more on the last steps of a converged run: errors far above 1e-10). Forming
``w_t - w*`` in float64 per entry has no cancellation and costs the same single pass.

With a query index (``gradtrace index``, :mod:`analysis.index`), a reference made of recorded
iterates (a step, a mean of steps, ``"final"``: ``w* = sum_k c_k w_{s_k}``, ``sum_k c_k = 1``)
needs no pass. The index holds the iterates relative to a fixed anchor a (``V = W - a``; then
``w_t - w* = V_t - sum_k c_k V_{s_k}``)::

    ||w_t - w*||^2  = VV_tt - 2 sum_k c_k VV_{t s_k} + sum_{k,m} c_k c_m VV_{s_k s_m}
    <G_t, w_t - w*> = GV_tt - sum_k c_k GV_{t s_k}

This is an expanded form like the one above, with the same kind of cancellation, only
relative to ``||V||`` (distances to the anchor, the last iterate with weights) instead of ``||w||``: its
relative error is about ``K eps S_t / ||w_t - w*||^2`` with ``S_t`` the same sum taken over
absolute values (``analysis.index.cancellation``; K measured, see the README). The index
answers the steps where that estimate (and the matching bound on gamma) is below
``RSI_INDEX_RTOL`` = 1e-11, and one pass over only the other steps (those very close to the
reference) computes them directly, as without an index. ``answered_by`` is ``"index"``,
``"index+pass"`` (attribute ``pass_steps``: how many) or ``"pass"``; ``index=False`` forces
the pass. Arrays and files as references always run the pass, and so do the directions
other than ``"gradient"`` (below): the index holds no weight-decay or update products.

Special cases: ``w_t == w*`` (distance 0) gives NaN for RSI, EB, gamma and eta* at that step
and sets ``zero_distance``; an all-zero gradient gives NaN gamma and eta* (RSI and EB are
then 0, as defined) and sets ``zero_grad``.

Direction (``direction=``; the No Wrong Turns code logs more than one): every formula above
with ``G_t`` replaced by a direction ``D_t``:

* ``"gradient"`` (default): ``D_t = G_t``, the recorded loss gradient. ``eta*_t`` is the
  plain-SGD step along ``-G_t`` that lands closest to w*; under momentum or Adam the optimizer
  did not take that step, so it is the best *SGD* step, not a statement about the optimizer.
* ``"gradient+wd"``: ``D_t = G_t + lambda w_t``, lambda the weight decay of each parameter's
  optimizer group as the header records it (``settings["param_groups"]`` and
  ``settings["param_group_of"]``), or ``weight_decay=`` (a number, or ``{tensor name or glob:
  number}``). It is the gradient of ``loss + lambda/2 ||w||^2``: for SGD with coupled weight
  decay, the direction plain SGD steps along, and ``eta*`` is the best SGD step on that
  regularized objective. For decoupled decay (AdamW) it is only that gradient, not the update.
* ``"update"``: ``D_t = (w_t - w_{t+1}) / lr_t`` from consecutive weight rows (``lr_t`` the
  recorded learning rate of step t), what the optimizer actually did per unit learning rate; it
  equals ``G_t`` for plain SGD without weight decay. ``eta*_t`` is then the multiple of
  ``D_t`` (to compare with the ``lr_t`` taken) that lands closest to w*: under momentum or Adam
  it is no longer "the best SGD step". Steps without a recorded weight row at t + 1 (sparse
  schedules) give NaN (``no_next_weight``), said in one warning line. Needs lossless weights:
  a difference of rounded weights is rounding noise.

For the two new directions ``||D_t||^2`` and ``<D_t, w_t - w*>`` come from the same one pass
(per entry, float64), not from stored scalars; dense tiers only.
"""

from __future__ import annotations

import fnmatch
import math
import warnings

import numpy as np
import xarray as xr

from gradtrace_format import format as fmt
from analysis._common import group_attrs, per_step, selected, sketch_k
from analysis.engine import Pass
from gradtrace_format.errors import AnalysisError, TierError
from analysis.index import RSI_INDEX_RTOL, cancellation, index_for, require
from analysis.reference import Reference, resolve_reference
from analysis.store import ParamGroup, Run, as_run

METRICS = ("rsi", "eb", "gamma", "eta_star", "distance")
DIRECTIONS = ("gradient", "gradient+wd", "update")
DIRECTION_TEXT = {
    "gradient": "D_t = G_t (recorded loss gradient); eta* = best plain-SGD step along -G_t",
    "gradient+wd": "D_t = G_t + lambda w_t (lambda: weight decay of the tensor's optimizer group); eta* = best "
                   "SGD step on loss + lambda/2 ||w||^2",
    "update": "D_t = (w_t - w_{t+1}) / lr_t (what the optimizer did); eta* = multiple of D_t closest to w*, "
              "not the best SGD step under momentum/Adam",
}


def rsi_space(run: Run) -> str:
    """The column space RSI is computed in: "param" (dense tiers) or "sketch"."""
    g, w = run.header.tiers["grad"], run.header.tiers["weight"]
    if g.is_dense and w.is_dense:
        return "param"
    if g.is_sketch and w.is_sketch and (g.sketch_dim, g.seed) == (w.sketch_dim, w.seed):
        return "sketch"
    raise TierError(
        f"{run.path} stores grad as {g.name!r} and weight as {w.name!r}: RSI needs <G_t, w_t - w*> with "
        "both in the same space (both dense, or both sketched with the same sketch_dim and seed). "
        "Record with matching tiers."
    )


def drop_tail(run: Run, steps: np.ndarray, tail) -> tuple[np.ndarray, int]:
    """Drop the last ``tail`` gradient steps of the run (an int) or its last epoch ("epoch")."""
    if tail is None or (not isinstance(tail, str) and int(tail) == 0):
        return steps, 0
    pool = run.grad_steps
    if isinstance(tail, str):
        if tail != "epoch":
            raise AnalysisError(f"exclude_tail={tail!r}: give a number of steps or 'epoch'")
        ep = np.asarray(run.ds["epoch"].values)[run.rows_of(pool)]
        if (ep < 0).all():
            raise AnalysisError(
                f"exclude_tail='epoch': {run.path} has no epoch numbers (epoch = -1). "
                "Exclude a number of steps instead, e.g. exclude_tail=100."
            )
        drop = pool[ep == ep.max()]
    else:
        n = int(tail)
        if n < 0:
            raise AnalysisError(f"exclude_tail={tail}: give a number of steps >= 0")
        drop = pool[len(pool) - min(n, len(pool)):]
    keep = steps[~np.isin(steps, drop)]
    if len(keep) == 0:
        raise AnalysisError(f"exclude_tail={tail!r} removes every selected step; exclude fewer")
    return keep, len(steps) - len(keep)


def reference_in_space(run: Run, ref: Reference, space: str):
    """The reference vector in the pass's column space (sketched for the sketch tier)."""
    if ref.vector is None:
        return None
    if space == "param":
        return run.to_columns(ref.vector)  # a sharded store's column layout (identity otherwise)
    return fmt.Sketcher(run.tensors, run.sketch_plan("weight"))(ref.vector)


def rsi(run, reference="final", *, steps=None, params=None, exclude_tail=None, strict: bool = True,
        direction: str = "gradient", weight_decay=None, progress=None, scheduler=None, index=None) -> xr.Dataset:
    """RSI, EB, gamma, eta* and distance against a reference point, in one pass.

    Args:
        run: a :class:`analysis.Run` or a store path.
        reference: w* (see :func:`analysis.reference.resolve_reference`): ``"final"``
            (default), a step, ``slice(a, b)`` (mean of iterates), an array, a state dict,
            a ``.npy`` / ``.safetensors`` / PyTorch checkpoint path.
        steps: gradient steps to evaluate (default all).
        params: restrict to a parameter group (all quantities use only its coordinates).
        exclude_tail: drop the last N gradient steps (int) or the last epoch (``"epoch"``),
            as the paper does (gamma_T = 1 is trivial on the last GD step).
        strict: refuse extra tensors in a state dict (see ``resolve_reference``).
        direction: ``"gradient"`` (default), ``"gradient+wd"`` or ``"update"``: the vector D_t
            that replaces G_t in every formula (see the module docstring for what eta* means
            in each).
        weight_decay: for ``"gradient+wd"``: lambda as a number, or ``{name or glob: number}``
            per tensor; default the weight decay the header records for each tensor's group.
        index: ``None`` (use the query index for references made of recorded iterates when it
            covers them; direction='gradient' only, the index holds no update or weight-decay terms), ``False`` (always a pass) or ``True`` (the index must answer).

    Returns:
        Dataset along ``step`` with ``rsi``, ``eb``, ``gamma``, ``eta_star``, ``distance``,
        ``random_walk`` (the baseline ``(T - t)^(-1/2)``, T the reference's step, else the
        final step), flags ``zero_distance`` and ``zero_grad``; coords ``epoch``, ``lr``,
        ``loss``. Lossy tiers add ``gamma_error_bound`` (rounded) or ``gamma_stderr``
        (sketch). attrs: ``reference``, ``tier``, ``params``, ``excluded_steps``,
        ``direction`` (and ``weight_decay`` for "gradient+wd"). ``"update"`` adds the flag
        ``no_next_weight``.

    Example:
        >>> r = rsi(run, exclude_tail="epoch")                 # doctest: +SKIP
        >>> by_epoch(r)["gamma_mean"].plot()                   # doctest: +SKIP
        >>> rsi(run, reference="ckpt/epoch10.pt")               # any w*, one more pass
    """
    if direction not in DIRECTIONS:
        raise AnalysisError(f"direction={direction!r}: use 'gradient' (default), 'gradient+wd' or 'update'")
    if weight_decay is not None and direction != "gradient+wd":
        raise AnalysisError(f"weight_decay= is used by direction='gradient+wd' only (direction={direction!r})")
    run = as_run(run)
    group = run.params(params)
    space = rsi_space(run)
    sel, n_excluded = drop_tail(run, selected(run, steps), exclude_tail)
    if steps is None:  # every gradient step that also has weights (a weight schedule may skip some)
        sel = sel[np.isin(sel, run.weight_steps)]
    run.require_weights(sel if len(sel) else run.grad_steps[:1], "RSI (w_t - w*)")
    ref = resolve_reference(run, reference, strict=strict)
    if ref.rows is not None:
        run.require_weights(run.steps[ref.rows], f"the reference {ref.label!r}")
    rows = run.rows_of(sel)
    gg = run.per_tensor_scalar(fmt.GRAD_SQNORM, rows, group) if direction == "gradient" else None
    idx = index_for(run, group, index) if direction == "gradient" else None
    if index is True and direction != "gradient":
        raise AnalysisError(f"index=True, but the query index answers direction='gradient' only (direction={direction!r} "
                            "needs the update or weight-decay term per entry): pass index=None or index=False")
    todo = np.ones(len(rows), bool)
    if direction == "gradient":
        ok = (idx is not None and ref.rows is not None and idx.has("gv")
              and idx.covers(np.repeat(rows, len(ref.rows)), np.tile(ref.rows, len(rows)))
              and idx.covers_block(ref.rows))
        idx = require(idx, index, ok, f"the reference {ref.label} against {len(rows)} steps")
    dir_attrs: dict = {}
    flags: dict = {}
    if direction == "gradient":
        dist2, gdiff = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
        if idx is not None:
            dist2, gdiff, todo = rsi_products_from_index(idx, rows, ref.rows, ref.coef, gg)
        if todo.any():
            p = Pass(run, group)
            vec = reference_in_space(run, ref, space)
            key = p.ref_dist(rows[todo], space, ref_vector=vec, ref_rows=ref.rows, coef=ref.coef)
            dist2[todo], gdiff[todo] = p.compute(progress=progress, scheduler=scheduler)[key]
    else:
        if space != "param":
            raise TierError(f"direction={direction!r} needs dense grad and weight tiers; {run.path} is sketched. "
                            "Use direction='gradient' or record with a dense tier.")
        p = Pass(run, group)
        vec = reference_in_space(run, ref, space)
        if direction == "gradient+wd":
            lam_t = weight_decays(run, weight_decay)
            lam = np.zeros(run.header.n_params)
            for t, v in zip(run.header.tensors, lam_t):
                lam[t.offset: t.offset + t.size] = v
            lam = run.to_columns(lam)
            key = p.ref_dir(rows, ref_vector=vec, ref_rows=ref.rows, coef=ref.coef, lam=lam)
            dist2, gdiff, gg = p.compute(progress=progress, scheduler=scheduler)[key]
            dir_attrs["weight_decay"] = ", ".join(f"{run.header.tensors[i].name}={lam_t[i]:g}" for i in group.indices)
        else:
            if not run.header.tiers["weight"].is_lossless:
                raise TierError(f"direction='update' needs lossless weights; {run.path} stores weights as "
                                f"{run.header.tiers['weight'].name!r}, and w_t - w_(t+1) of rounded weights is rounding "
                                "noise. Use direction='gradient' or record weights losslessly.")
            has_next = np.isin(sel + 1, run.steps)
            nxt = np.where(has_next, sel + 1, sel)  # a step without a next row pairs with itself (NaN below)
            key = p.ref_dir(rows, ref_vector=vec, ref_rows=ref.rows, coef=ref.coef, next_rows=run.rows_of(nxt))
            dist2, udiff, uu = p.compute(progress=progress, scheduler=scheduler)[key]
            lr = np.asarray(run.ds["lr"].values, dtype=np.float64)[rows]
            ok_lr = np.isfinite(lr) & (lr > 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                gdiff = np.where(has_next & ok_lr, udiff / lr, np.nan)
                gg = np.where(has_next & ok_lr, uu / lr ** 2, np.nan)
            flags["no_next_weight"] = ~has_next
            if (~has_next).any():
                warnings.warn(f"rsi(direction='update'): {int((~has_next).sum())} of {len(sel)} steps have no recorded "
                              f"weights at t + 1 (first: step {int(sel[~has_next][0])}); their values are NaN",
                              RuntimeWarning, stacklevel=2)
            if (has_next & ~ok_lr).any():
                dir_attrs["note"] = "steps with a missing or non-positive recorded lr give NaN"
            if (run.header.settings or {}).get("lr_groups_differ"):
                dir_attrs["lr_note"] = ("the optimizer groups had different learning rates; lr_t is group 0's, so "
                                        "D_t of the other groups' tensors is scaled by their lr / lr_0")
    out = rsi_from_products(dist2, gdiff, gg)
    if direction != "gradient":
        bad = ~np.isfinite(gg)
        for k in ("rsi", "eb", "gamma", "eta_star"):
            out[k][bad] = np.nan
    out.update(flags)
    t_ref = ref.step if ref.step is not None else (run.final_step if run.final_step is not None
                                                    else int(run.grad_steps[-1]) + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out["random_walk"] = np.where(sel < t_ref, 1.0 / np.sqrt(np.maximum(t_ref - sel, 1)), np.nan)
    sym = "G" if direction == "gradient" else "D"
    attrs = {"reference": ref.label, "random_walk_T": int(t_ref), "excluded_steps": int(n_excluded),
             "exclude_tail": str(exclude_tail), "definitions": f"RSI = <{sym}, w - w*>/||w - w*||^2; "
             f"EB = ||{sym}||/||w - w*||; gamma = RSI/EB; eta_star = RSI/EB^2; distance = ||w - w*||",
             "direction": direction, "direction_definition": DIRECTION_TEXT[direction], **dir_attrs,
             "grad_recorded": str((run.header.settings or {}).get("grad_recorded") or "not declared (no clipping "
                                  "declared: the gradient as .grad held at record())"),
             **group_attrs(group), **_tier_attrs(run, group),
             "answered_by": "pass" if idx is None else ("index+pass" if todo.any() else "index")}
    if idx is not None:
        attrs["pass_steps"] = int(todo.sum())
    if direction == "gradient":
        extra = _error_vars(run, group, rows, ref, out, space)
    else:
        extra = {}
        if run.header.tiers["grad"].rounds or run.header.tiers["weight"].rounds:
            attrs["error_note"] = f"no error bound for direction={direction!r} on a rounded tier"
    ds = per_step({**out, **extra}, run, sel, attrs)
    ds["random_walk"].attrs["long_name"] = "random walk (T - t)^(-1/2)"
    for k in ("rsi", "eb", "gamma", "eta_star"):
        ds[k].attrs["direction"] = direction
    return ds


def weight_decays(run: Run, weight_decay=None) -> np.ndarray:
    """lambda per tensor of the store (float64, one per row of the parameter table).

    Args:
        weight_decay: a number (every tensor), ``{name or glob: number}`` (tensors not matched
            get 0), or None: the header's ``settings["param_groups"][k]["weight_decay"]`` of each
            tensor's optimizer group (``settings["param_group_of"]`` maps tensors to groups;
            with one group every tensor is in it).
    """
    n = len(run.header.tensors)
    if weight_decay is not None:
        if isinstance(weight_decay, dict):
            out = np.zeros(n)
            for pat, v in weight_decay.items():
                hit = [i for i, t in enumerate(run.header.tensors) if t.name == pat or fnmatch.fnmatchcase(t.name, pat)]
                if not hit:
                    raise AnalysisError(f"weight_decay: {pat!r} matches no parameter tensor of {run.path}")
                out[hit] = float(v)
            return out
        return np.full(n, float(weight_decay))
    s = run.header.settings or {}
    groups = s.get("param_groups")
    if not groups:
        raise AnalysisError(f"{run.path} records no optimizer param_groups (Recorder without optimizer=?): "
                            "pass weight_decay= to rsi(direction='gradient+wd')")
    of = s.get("param_group_of")
    if of is None:
        if len(groups) > 1:
            raise AnalysisError(f"{run.path} has {len(groups)} optimizer groups but does not record which tensor is in "
                                "which (older recorder): pass weight_decay={name or glob: value}")
        of = [0] * n
    if any(k is None for k in of):
        missing = [run.header.tensors[i].name for i, k in enumerate(of) if k is None][:4]
        raise AnalysisError(f"tensors {missing} of {run.path} are in no recorded optimizer group: pass weight_decay= "
                            "explicitly")
    if len(of) != n:
        raise AnalysisError(f"settings['param_group_of'] of {run.path} has {len(of)} entries for {n} tensors: "
                            "pass weight_decay= explicitly")
    return np.array([float(groups[k].get("weight_decay") or 0.0) for k in of])


def rsi_products_from_index(idx, rows, ref_rows, coef, gg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(||w_t - w*||^2, <G_t, w_t - w*>, needs_pass)`` from the query index, for store rows
    ``rows`` and ``w* = coef @ W[ref_rows]``.

    ``needs_pass`` marks the steps whose expanded form may have lost digits: predicted relative
    error of the distance ``K eps S_t / dist2_t`` or predicted absolute error of gamma
    ``K eps (|GV_tt| + |c| . |GV_ts|) / (||G_t|| dist_t)`` above ``RSI_INDEX_RTOL``, or a
    distance that is not positive. A step that is the reference itself (one row, coefficient
    1) gets the exact 0.
    """
    rows = np.asarray(rows, np.int64)
    R = np.asarray(ref_rows, np.int64)
    c = np.asarray(coef, np.float64)
    gv_tt, vv_tt = idx.pairs("gv", rows, rows), idx.pairs("vv", rows, rows)
    gv_tr, vv_tr = idx.block("gv", rows, R), idx.block("vv", rows, R)
    vv_rr = idx.block("vv", R)
    vv_rr = (vv_rr + vv_rr.T) / 2.0
    ac = np.abs(c)
    dist2 = vv_tt - 2.0 * (vv_tr @ c) + c @ vv_rr @ c
    gdiff = gv_tt - gv_tr @ c
    s = np.abs(vv_tt) + 2.0 * (np.abs(vv_tr) @ ac) + ac @ np.abs(vv_rr) @ ac
    sg = np.abs(gv_tt) + np.abs(gv_tr) @ ac
    rel = cancellation(s, dist2)
    with np.errstate(divide="ignore", invalid="ignore"):
        gg = np.asarray(gg, np.float64)
        gamma_err = np.where(gg > 0, cancellation(sg, np.sqrt(gg * np.maximum(dist2, 0.0))), 0.0) + rel
    todo = (dist2 <= 0) | (rel > RSI_INDEX_RTOL) | (gamma_err > RSI_INDEX_RTOL)
    if len(R) == 1 and c[0] == 1.0:
        same = rows == R[0]
        dist2[same], gdiff[same], todo[same] = 0.0, 0.0, False
    return dist2, gdiff, todo


def rsi_from_products(dist2: np.ndarray, gdiff: np.ndarray, gg: np.ndarray) -> dict:
    """The five metrics from ``||w - w*||^2``, ``<G, w - w*>`` and ``||G||^2`` (float64 arrays)."""
    dist2, gdiff, gg = (np.asarray(x, dtype=np.float64) for x in (dist2, gdiff, gg))
    zero_d = dist2 == 0
    zero_g = gg == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.sqrt(dist2)
        gn = np.sqrt(gg)
        r = gdiff / dist2
        eb = gn / dist
        gamma = gdiff / (gn * dist)
        eta = gdiff / gg
    for arr in (r, eb, gamma, eta):
        arr[zero_d] = np.nan
    gamma[zero_g] = np.nan
    eta[zero_g] = np.nan
    return {"rsi": r, "eb": eb, "gamma": gamma, "eta_star": eta, "distance": dist,
            "zero_distance": zero_d, "zero_grad": zero_g}


def _tier_attrs(run: Run, group: ParamGroup) -> dict:
    g, w = run.header.tiers["grad"], run.header.tiers["weight"]
    out = {"tier": g.name if g.name == w.name else f"grad={g.name}, weight={w.name}",
           "grad_tier": g.name, "weight_tier": w.name,
           "grad_max_rel_error": g.max_rel_error if g.is_dense else float("nan"),
           "weight_max_rel_error": w.max_rel_error if w.is_dense else float("nan")}
    if g.is_sketch:
        out["sketch_k"] = sketch_k(run, group, "grad")
        out["error_note"] = "CountSketch estimates; gamma_stderr = sqrt((1 + gamma^2) / sketch_k)"
    elif g.rounds or w.rounds:
        out["error_note"] = ("gamma_error_bound = asin(u_g) + u_g + asin(min(1, u_w (||w_t|| + ||w*||) / "
                             "||w_t - w*||)), u = 2^-(keepbits+1) per rounded array; ||G_t|| is the exact "
                             "norm the capture stored, the dot products use the rounded values")
    return out


def _error_vars(run: Run, group: ParamGroup, rows, ref: Reference, out: dict, space: str) -> dict:
    """Per-step error estimates of gamma on lossy tiers."""
    g, w = run.header.tiers["grad"], run.header.tiers["weight"]
    if space == "sketch":
        k = sketch_k(run, group, "grad")
        gamma = np.nan_to_num(out["gamma"])
        return {"gamma_stderr": np.asarray(fmt.sketch_cosine_stderr(k, gamma)) if k else np.zeros(len(gamma))}
    if g.is_lossless and w.is_lossless:
        return {}
    ug, uw = g.max_rel_error, w.max_rel_error
    wn = np.sqrt(run.per_tensor_scalar(fmt.WEIGHT_SQNORM, rows, group))
    if ref.rows is not None:  # the reference was read from the (rounded) store too
        rn = np.abs(ref.coef) @ np.sqrt(run.per_tensor_scalar(fmt.WEIGHT_SQNORM, ref.rows, group))
    else:
        rn = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        turn = np.minimum(1.0, uw * (wn + rn) / out["distance"])
    # G turns by <= asin(u_g), w_t - w* by <= asin(turn); ||G|| is the stored exact norm, so
    # the rounded numerator adds a relative u_g (|gamma| <= 1).
    bound = math.asin(min(1.0, ug)) + ug + np.arcsin(np.nan_to_num(turn, nan=1.0))
    return {"gamma_error_bound": bound}


def by_epoch(result: xr.Dataset | xr.DataArray, stats=("mean", "min", "max")) -> xr.Dataset:
    """Per-epoch aggregation of per-step results (NaN skipped), as the paper plots them.

    Args:
        result: a Dataset or DataArray along ``step`` with an ``epoch`` coordinate (e.g. the
            result of :func:`rsi`).
        stats: any of ``"mean"``, ``"min"``, ``"max"``, ``"median"``, ``"std"``.

    Returns:
        Dataset along ``epoch`` with ``{var}_{stat}`` for every float variable, and
        ``n_steps`` (steps per epoch).

    Example:
        >>> agg = by_epoch(rsi(run))                            # doctest: +SKIP
        >>> agg.gamma_mean, agg.gamma_min, agg.gamma_max        # doctest: +SKIP
    """
    ds = result.to_dataset(name=result.name or "value") if isinstance(result, xr.DataArray) else result
    if "epoch" not in ds.coords:
        raise AnalysisError("by_epoch needs an 'epoch' coordinate along 'step'")
    if (np.asarray(ds["epoch"].values) < 0).all():
        raise AnalysisError("the store has no epoch numbers (epoch = -1): aggregate by steps instead, "
                            "e.g. result.coarsen(step=100, boundary='trim').mean()")
    floats = [v for v in ds.data_vars if ds[v].dtype.kind == "f" and ds[v].dims == ("step",)]
    plain = ds[floats].reset_coords(drop=True).assign_coords(epoch=("step", ds["epoch"].values))
    grouped = plain.groupby("epoch")
    out = xr.Dataset()
    for stat in stats:
        agg = getattr(grouped, stat)(skipna=True)
        for v in floats:
            out[f"{v}_{stat}"] = agg[v]
    out["n_steps"] = plain["epoch"].groupby("epoch").count()
    out.attrs = dict(ds.attrs)
    return out
