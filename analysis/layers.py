"""Per-layer views: a breakdown table (one row per tensor) and balancedness.

Every metric function accepts ``params=`` (a name, a glob, a list) to restrict it to a
parameter group. :func:`layer_table` computes the per-tensor breakdown of the adjacent
correlation, the sign shift and gamma in ONE pass (the engine splits each slab at tensor
boundaries). :func:`balancedness` follows consecutive linear layers along the trajectory
(seed 002).
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis import engine, slabs
from analysis._common import cosines, lag_pairs, nonfinite, selected
from analysis.engine import Pass
from gradtrace_format import format as fmt
from gradtrace_format.errors import AnalysisError, TierError
from analysis.reference import resolve_reference
from analysis.signs import LONG_NAME, check_denominator, percent
from analysis.rsi import drop_tail, reference_in_space, rsi_from_products, rsi_space
from analysis.store import as_run


def layer_table(run, steps=None, *, lag: int = 1, reference="final", exclude_tail=None, params=None,
                strict: bool = True, denominator: str = "both_nonzero", progress=None, scheduler=None) -> xr.Dataset:
    """Per-tensor breakdown of the main metrics, in one pass over the store.

    Args:
        steps: gradient steps to use (default all).
        lag: lag (training steps) of the correlation and sign-shift columns.
        reference: w* for the gamma / RSI columns (see ``rsi``); ``None`` skips them.
        exclude_tail: tail excluded from the gamma / RSI columns (see ``rsi``).
        params: restrict the table to some tensors.
        denominator: of the sign shift: ``"both_nonzero"`` (default) or ``"all"``
            (see :mod:`analysis.signs`).

    Returns:
        Dataset along ``tensor`` (names) with ``size``, ``shape``, ``corr_mean`` (mean over t
        of mu(t, t+lag) restricted to the tensor), ``sign_shift_mean`` and ``zero_share_mean``
        (percent), and with a reference ``gamma_mean`` and ``rsi_mean``. NaN where a tensor's
        gradient is zero at every step. attrs: ``lag``, ``reference``, ``tier``,
        ``denominator``.

    Example:
        >>> layer_table(run).to_dataframe()                      # doctest: +SKIP
    """
    check_denominator(denominator)
    run = as_run(run)
    group = run.params(params)
    sel = selected(run, steps)
    a, b = lag_pairs(run, sel, lag)
    uniq = np.unique(np.concatenate([a, b]))
    p = Pass(run, group, per_tensor=True)
    ra, rb, ru = run.rows_of(a), run.rows_of(b), run.rows_of(uniq)
    k_dots = p.pair_dots(np.concatenate([ra, ru]), np.concatenate([rb, ru]))
    k_sign = p.sign_pairs(ra, rb)
    k_ref = ref = None
    if reference is not None:
        space = rsi_space(run)
        rsel, _ = drop_tail(run, sel, exclude_tail)
        ref = resolve_reference(run, reference, strict=strict)
        k_ref = p.ref_dist(run.rows_of(rsel), space, ref_vector=reference_in_space(run, ref, space),
                           ref_rows=ref.rows, coef=ref.coef)
    res = p.compute(progress=progress, scheduler=scheduler)

    dots = res[k_dots]  # (n_tensors, P + U)
    sq = dots[:, len(a):]
    sq[:, nonfinite(run, uniq)] = np.nan
    ia, ib = np.searchsorted(uniq, a), np.searchsorted(uniq, b)
    corr = cosines(dots[:, : len(a)], sq[:, ia], sq[:, ib])
    counts = res[k_sign]  # (n_tensors, 2, P)
    sizes = np.array([run.header.tensors[i].size for i in group.indices], dtype=np.float64)
    shift, zero = percent(counts[:, 0], counts[:, 1], sizes[:, None], denominator)
    bad = nonfinite(run, a) | nonfinite(run, b)
    shift[:, bad] = np.nan
    zero[:, bad] = np.nan
    data = {
        "size": ("tensor", sizes.astype(np.int64)),
        "shape": ("tensor", np.array([str(tuple(run.header.tensors[i].shape)) for i in group.indices], dtype=object)),
        "corr_mean": ("tensor", _nanmean(corr)),
        "sign_shift_mean": ("tensor", _nanmean(shift)),
        "zero_share_mean": ("tensor", _nanmean(zero)),
    }
    if k_ref is not None:
        dist2, gdiff = res[k_ref][:, 0], res[k_ref][:, 1]  # (n_tensors, n)
        rows = run.rows_of(rsel)
        gg = run.tensor_scalars(fmt.GRAD_SQNORM, rows, group).T
        m = rsi_from_products(dist2, gdiff, gg)
        data["gamma_mean"] = ("tensor", _nanmean(m["gamma"]))
        data["rsi_mean"] = ("tensor", _nanmean(m["rsi"]))
    attrs = {"lag": int(lag), "n_pairs": len(a), "reference": "none" if ref is None else ref.label,
             "tier": run.header.tiers["grad"].name, "params": group.label, "denominator": denominator,
             "corr_mean": "mean over t of mu(t, t+lag) on the tensor's coordinates"}
    out = xr.Dataset(data, coords={"tensor": np.array(group.names, dtype=object)}, attrs=attrs)
    out["sign_shift_mean"].attrs.update(long_name="mean " + LONG_NAME[denominator], denominator=denominator)
    return out


def _nanmean(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    n = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(ok, x, 0.0).sum(axis=-1) / n, np.nan)


def linear_pairs(run, layers=None) -> list[tuple[int, int]]:
    """Consecutive linear layers: pairs (j, j+1) of 2-D weight tensors, in table order, with
    ``W_{j+1}.shape[1] == W_j.shape[0]`` (1-D tensors such as biases in between are skipped)."""
    run = as_run(run)
    group = run.params(layers)
    two_d = [i for i in group.indices if len(run.header.tensors[i].shape) == 2]
    out = []
    for j, k in zip(two_d[:-1], two_d[1:]):
        if run.header.tensors[k].shape[1] == run.header.tensors[j].shape[0]:
            out.append((j, k))
    return out


def _balance_block(ref, rows, pieces, pairs_local, shapes, relative=True):
    arr = ref.open()
    block = slabs.read(arr, rows, pieces).astype(np.float64)
    sizes = np.zeros(len(shapes), dtype=np.int64)  # a tensor may be several pieces (shards), in order
    for n, lo, hi in pieces:
        sizes[n] += hi - lo
    offsets = np.cumsum(np.concatenate([[0], sizes]))
    out = np.empty((len(rows), len(pairs_local)))
    for r in range(len(rows)):
        mats = [block[r, offsets[i]: offsets[i + 1]].reshape(shapes[i]) for i in range(len(shapes))]
        for c, (j, k) in enumerate(pairs_local):
            wj, wk = mats[j], mats[k]
            diff = wk.T @ wk - wj @ wj.T
            norm = np.sqrt(np.einsum("ij,ij->", diff, diff))
            if not relative:
                out[r, c] = norm
                continue
            nj = np.einsum("ij,ij->", wj, wj)
            out[r, c] = norm / nj if nj > 0 else np.nan
    return out


def balancedness(run, steps=None, *, layers=None, form: str = "relative", progress=None,
                 scheduler=None) -> xr.DataArray:
    """Balancedness of consecutive linear layers along the trajectory (seed 002).

    For each pair of consecutive 2-D weight tensors (see :func:`linear_pairs`), at every
    selected recorded iterate (the final iterate included), in float64:

    * ``form="relative"`` (default): ``||W_{j+1}^T W_{j+1} - W_j W_j^T||_F / ||W_j||_F^2``;
    * ``form="absolute"``: ``||W_{j+1}^T W_{j+1} - W_j W_j^T||_F``. Seed 002's statement is
      about this one: under gradient flow on a deep linear network (no biases, no weight
      decay) ``W_{j+1}^T W_{j+1} - W_j W_j^T`` is conserved, so the absolute form stays at its
      initial value up to O(lr) drift, while the relative form falls as the norms grow.

    Args:
        steps: recorded steps (default every row, final iterate included).
        layers: restrict to some tensors (name, glob, list) before pairing.
        form: ``"relative"`` or ``"absolute"``.

    Returns:
        DataArray ``balancedness`` with dims ``(step, pair)``; ``pair`` labels are
        ``"fc1.weight->fc2.weight"``.

    Raises:
        AnalysisError: no consecutive linear layers with matching shapes.
        TierError: the weights are stored as a sketch.

    Example:
        >>> balancedness(run).sel(pair="fc1.weight->fc2.weight").plot()   # doctest: +SKIP
    """
    import dask

    if form not in ("relative", "absolute"):
        raise AnalysisError(f"form={form!r}: use 'relative' (divided by ||W_j||_F^2) or 'absolute'")
    run = as_run(run)
    if not run.dense("weight"):
        raise TierError("balancedness needs the full weight matrices; this store keeps a weight sketch only")
    pairs = linear_pairs(run, layers)
    if not pairs:
        shapes = ", ".join(f"{t.name}{tuple(t.shape)}" for t in run.tensors[:10])
        raise AnalysisError(
            f"no consecutive linear layers in {run.path}: balancedness needs consecutive 2-D weights with "
            f"W_(j+1).shape[1] == W_j.shape[0]. Tensors: {shapes}"
        )
    sel = run.select_steps(steps, grads=False)
    if len(sel) == 0:
        raise AnalysisError(f"steps={steps!r} selects no recorded step")
    used = sorted({i for pr in pairs for i in pr})
    local = {i: n for n, i in enumerate(used)}
    tensors = [run.header.tensors[i] for i in used]
    pieces = tuple((n, lo, hi) for n, i in enumerate(used) for lo, hi in run.tensor_columns(i))
    shapes = [t.shape for t in tensors]
    pairs_local = [(local[j], local[k]) for j, k in pairs]
    per_row = 4 * sum(t.size for t in tensors) + 8 * sum(t.size for t in tensors)
    chunk = max(1, int(engine.SLAB_BYTES // max(1, per_row)))
    rows = run.rows_of(sel)
    ref = run.array_ref("weight")
    parts = [dask.delayed(_balance_block, pure=True)(ref, rows[i: i + chunk], pieces, pairs_local, shapes,
                                                     form == "relative")
             for i in range(0, len(rows), chunk)]
    whole = dask.delayed(np.concatenate, pure=True)(parts, axis=0)
    vals = engine.compute(whole, progress=bool(progress), scheduler=scheduler)
    names = [f"{run.header.tensors[j].name}->{run.header.tensors[k].name}" for j, k in pairs]
    coords = {"step": sel, "pair": np.array(names, dtype=object), **run.step_coords(sel)}
    return xr.DataArray(vals, dims=("step", "pair"), coords=coords, name="balancedness",
                        attrs={"definition": "||W_{j+1}^T W_{j+1} - W_j W_j^T||_F"
                               + (" / ||W_j||_F^2" if form == "relative" else ""), "form": form,
                               "long_name": f"{form} balancedness",
                               "tier": run.header.tiers["weight"].name,
                               "max_rel_error": run.header.tiers["weight"].max_rel_error})
