"""Optimization-geometry phases from correlation statistics (seed 000; docs/methods.md).

The paper names three geometries: *smooth* (adjacent correlation strongly positive),
*zigzag* (adjacent correlation strongly negative) and *random* (correlations near zero, near
convergence). Labels come from a per-step statistic (by default the mean gradient
correlation of eq. 3) and user thresholds (default +-0.5). GAWU's offline switch point is
the first positive-to-negative crossing of the mean gradient correlation.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from analysis.correlation import lag_series, mean_corr
from gradtrace_format.errors import AnalysisError

PHASES = ("smooth", "zigzag", "random", "undetermined")


def phase_labels(stat: xr.DataArray, *, smooth: float = 0.5, zigzag: float = -0.5,
                 random: float | None = None) -> xr.DataArray:
    """Label each step from a correlation statistic.

    Args:
        stat: per-step DataArray along ``step`` (e.g. :func:`analysis.mean_corr` or a lag-1
            series).
        smooth: ``stat >= smooth`` is "smooth".
        zigzag: ``stat <= zigzag`` is "zigzag".
        random: ``|stat| <= random`` is "random"; ``None`` (default) labels everything
            between the two thresholds "random". Anything else, and NaN, is "undetermined".

    Returns:
        DataArray ``phase`` of strings along ``step`` (same coords as ``stat``); attrs hold
        the thresholds.

    Example:
        >>> labels = phase_labels(mean_corr(run, h=5))         # doctest: +SKIP
    """
    if not zigzag < smooth:
        raise AnalysisError(f"thresholds zigzag={zigzag} and smooth={smooth}: zigzag must be below smooth")
    v = np.asarray(stat.values, dtype=np.float64)
    lab = np.full(v.shape, "undetermined", dtype=object)
    with np.errstate(invalid="ignore"):
        mid = (v > zigzag) & (v < smooth)
        if random is not None:
            mid &= np.abs(v) <= random
        lab[mid] = "random"
        lab[v >= smooth] = "smooth"
        lab[v <= zigzag] = "zigzag"
    out = stat.copy(data=lab)  # object strings: variable-length in netCDF and Zarr v3
    out.name = "phase"
    out.attrs = {"smooth_threshold": smooth, "zigzag_threshold": zigzag,
                 "random_threshold": "between" if random is None else random,
                 "statistic": str(stat.name), "labels": ", ".join(PHASES)}
    return out


SHARE_RULES = ("record_low", "net")


def zigzag_share(labels: xr.DataArray, loss: xr.DataArray | None = None, *, rule: str = "record_low") -> float:
    """Share of the training progress achieved at zigzag steps (seed 000: "a substantial part
    of the training loss decrease is attained under the zigzag geometry").

    Steps are the labelled steps with a finite loss, in order; step t's interval runs to the
    next such step t'. Two rules (``rule=``):

    * ``"record_low"`` (default; always in [0, 1]): progress is counted only when the loss
      goes below every earlier loss. With ``m_t = min(loss_0..loss_t)``, step t contributes
      ``p_t = m_t - m_t'`` (>= 0), and the share is ``sum of p_t over zigzag steps /
      (loss_0 - min_t loss_t)``. The rule for spikes (catapults): a rise contributes nothing
      and the fall back to the previous low contributes nothing either; only the part of a
      fall that breaks the previous low counts, at the step where it happens. So a spike whose
      rise and fall carry different labels cannot make the share negative or above 1.
    * ``"net"``: ``p_t = loss_t - loss_t'`` (negative where the loss rises) over
      ``loss_0 - loss_T``. Rises and falls of a spike can land on differently labelled steps,
      so this share can be negative or above 1, and can change sign between re-runs of one
      setting. Kept for comparison.

    Args:
        labels: from :func:`phase_labels`, along ``step``.
        loss: per-step loss along ``step``; default the ``loss`` coordinate of ``labels``.
        rule: ``"record_low"`` or ``"net"``.

    Returns:
        The share (1.0 = all of the progress). NaN when the loss never decreased
        (``record_low``: no loss below loss_0; ``net``: loss_T >= loss_0).

    Example:
        >>> zigzag_share(phase_labels(mean_corr(run, h=5)))         # doctest: +SKIP
    """
    if rule not in SHARE_RULES:
        raise AnalysisError(f"rule={rule!r}: use 'record_low' (in [0, 1]; spikes count only below the previous "
                            "low) or 'net' (per-step differences; can leave [0, 1])")
    if loss is None:
        if "loss" not in labels.coords:
            raise AnalysisError("zigzag_share needs the loss: pass loss=, or labels with a 'loss' coordinate")
        loss = labels["loss"]
    steps = np.asarray(labels["step"].values)
    lv = np.asarray(loss.sel(step=steps).values if "step" in loss.dims else loss.values, dtype=np.float64)
    ok = np.isfinite(lv)
    lv, lab = lv[ok], np.asarray(labels.values)[ok]
    if len(lv) < 2:
        return float("nan")
    if rule == "net":
        total = lv[0] - lv[-1]
        dec = lv[:-1] - lv[1:]
    else:
        low = np.minimum.accumulate(lv)
        total = lv[0] - low[-1]
        dec = low[:-1] - low[1:]
    if not total > 0:
        return float("nan")
    return float(dec[lab[:-1] == "zigzag"].sum() / total)


def gawu_switch(mean_corr_series: xr.DataArray) -> int | None:
    """Offline GAWU change point: the first step where the mean gradient correlation goes
    from positive to negative (NaN and exact zeros are skipped). None when it never does.

    Example:
        >>> gawu_switch(mean_corr(run, h=5))                   # doctest: +SKIP
        412
    """
    v = np.asarray(mean_corr_series.values, dtype=np.float64)
    steps = np.asarray(mean_corr_series["step"].values)
    keep = np.isfinite(v) & (v != 0)
    v, steps = v[keep], steps[keep]
    cross = np.nonzero((v[:-1] > 0) & (v[1:] < 0))[0]
    return int(steps[cross[0] + 1]) if len(cross) else None


def phases(run, h: int = 5, steps=None, *, params=None, statistic: str = "mean_corr", smooth: float = 0.5,
           zigzag: float = -0.5, random: float | None = None, share_rule: str = "record_low", progress=None,
           scheduler=None) -> xr.Dataset:
    """Phase labels, the zigzag share of the loss decrease and the GAWU switch, in one pass.

    Args:
        statistic: ``"mean_corr"`` (eq. 3 with window h, default) or ``"lag1"`` (adjacent
            correlation mu(t, t+1)).
        share_rule: rule of ``zigzag_share`` (see :func:`zigzag_share`): ``"record_low"``
            (default, in [0, 1]) or ``"net"``.

    Returns:
        Dataset along ``step`` with the statistic (``mean_corr`` or ``lag_corr``) and
        ``phase``; coords ``epoch``, ``lr``, ``loss``; attrs ``zigzag_share`` (with
        ``zigzag_share_rule``), ``zigzag_share_net`` (the "net" rule, for comparison),
        ``gawu_step`` (-1 when there is no crossing) and the thresholds.

    Example:
        >>> ph = phases(run, h=5)                               # doctest: +SKIP
        >>> ph.attrs["zigzag_share"], ph.attrs["gawu_step"]     # doctest: +SKIP
    """
    if statistic == "mean_corr":
        stat = mean_corr(run, h, steps, params=params, progress=progress, scheduler=scheduler)
    elif statistic == "lag1":
        stat = lag_series(run, 1, steps, params=params, progress=progress, scheduler=scheduler)
    else:
        raise AnalysisError(f"statistic={statistic!r}: use 'mean_corr' or 'lag1'")
    labels = phase_labels(stat, smooth=smooth, zigzag=zigzag, random=random)
    switch = gawu_switch(stat)  # for "lag1": eq. 3 with h = 2 is exactly mu(k, k+1)
    ds = xr.Dataset({stat.name: stat, "phase": labels})
    ds.attrs = {**stat.attrs, **labels.attrs, "zigzag_share": zigzag_share(labels, rule=share_rule),
                "zigzag_share_rule": share_rule, "zigzag_share_net": zigzag_share(labels, rule="net"),
                "gawu_step": -1 if switch is None else int(switch)}
    return ds

