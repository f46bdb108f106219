"""Figures of the source papers, drawn from analysis results (labelled xarray objects).

Every function is ``plot_x(result, ax=None, ...) -> Axes``: it draws on ``ax`` (a new figure
when None) and returns the axes. Nothing here computes a metric or reads a store; pass the
results of :mod:`analysis` functions (or results loaded back from netCDF/Zarr).

Correlations use a diverging colour map fixed to [-1, 1]; sign shifts use a sequential map
fixed to [0, 100] percent.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xarray as xr

CORR_CMAP = "RdBu_r"
SIGN_CMAP = "magma_r"
PHASE_COLORS = {"smooth": "#4daf4a", "zigzag": "#e41a1c", "random": "#999999", "undetermined": "#bbbbbb"}
# phases drawn hatched (no fill) so they stay visible on a white background and apart from "random"
PHASE_HATCH = {"undetermined": "///"}


def _axes(ax, figsize=(6, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize, layout="constrained")
    return ax


def _step_values(da: xr.DataArray, dim: str) -> np.ndarray:
    return np.asarray(da[dim].values) if dim in da.coords else np.arange(da.sizes[dim])


def _matrix(
    mat: xr.DataArray,
    ax,
    *,
    vmin: float,
    vmax: float,
    cmap: str,
    label: str,
    title: str | None,
    annotate: bool | None,
    fmt: str,
):
    if mat.ndim != 2:
        raise ValueError(f"expected a 2-D matrix (step_i, step_j), got dims {mat.dims}")
    ax = _axes(ax, (5, 4.2))
    di, dj = mat.dims
    si, sj = _step_values(mat, di), _step_values(mat, dj)
    vals = np.asarray(mat.values, dtype=float)
    n = vals.shape[0]
    im = ax.imshow(vals, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", origin="upper")
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label(label)
    ticks_i = _tick_positions(len(si))
    ticks_j = _tick_positions(len(sj))
    ax.set_yticks(ticks_i, [str(si[k]) for k in ticks_i])
    ax.set_xticks(ticks_j, [str(sj[k]) for k in ticks_j], rotation=90 if len(sj) > 12 else 0)
    ax.set_xlabel("step")
    ax.set_ylabel("step")
    if annotate is None:
        annotate = n <= 12
    if annotate:
        for i in range(vals.shape[0]):
            for j in range(vals.shape[1]):
                v = vals[i, j]
                txt = "nan" if not np.isfinite(v) else format(v, fmt)
                if cmap == CORR_CMAP:  # diverging: dark at both ends
                    dark = np.isfinite(v) and abs(v - (vmin + vmax) / 2) > 0.6 * (vmax - vmin) / 2
                else:  # sequential: dark at the top
                    dark = np.isfinite(v) and v > vmin + 0.55 * (vmax - vmin)
                ax.text(j, i, txt, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    if title:
        ax.set_title(title)
    return ax


def _tick_positions(n: int, most: int = 10) -> list[int]:
    if n <= most:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, most).round().astype(int).tolist()))


def plot_corr_matrix(corr: xr.DataArray, ax=None, *, title: str | None = None, annotate: bool | None = None):
    """Heatmap of a pairwise gradient correlation matrix (zigzag paper, Figure 1 bottom).

    Args:
        corr: 2-D DataArray of mu(j, k) with step coordinates on both dims.
        ax: matplotlib axes to draw on (new figure when None).
        title: defaults to "gradient correlation, steps a..b".
        annotate: write the values in the cells (default: when at most 12 x 12).
    """
    di = corr.dims[0]
    s = _step_values(corr, di)
    if title is None:
        title = f"gradient correlation, steps {s[0]}..{s[-1]}" if len(s) else "gradient correlation"
    return _matrix(corr, ax, vmin=-1, vmax=1, cmap=CORR_CMAP, label="correlation", title=title,
                   annotate=annotate, fmt=".2f")


def plot_sign_shift_matrix(shift: xr.DataArray, ax=None, *, title: str | None = None, annotate: bool | None = None):
    """Heatmap of sign-shift percentages between steps (zigzag paper, Figure 8).

    Args:
        shift: 2-D DataArray of percentages in [0, 100] with step coordinates on both dims.
    """
    di = shift.dims[0]
    s = _step_values(shift, di)
    if title is None:
        title = f"% entries that flip sign, steps {s[0]}..{s[-1]}" if len(s) else "sign shift"
    return _matrix(shift, ax, vmin=0, vmax=100, cmap=SIGN_CMAP, label="% of entries with opposite sign",
                   title=title, annotate=annotate, fmt=".0f")


def plot_series(
    series: xr.DataArray,
    ax=None,
    *,
    label: str | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    markers: Sequence[int] = (),
    logy: bool = False,
    **line_kw,
):
    """A per-step series (loss, mean correlation, lag series...) against the training step.

    Args:
        series: 1-D DataArray along a step dimension with step coordinates.
        markers: steps to mark with red dots (e.g. where window matrices are drawn).
    """
    ax = _axes(ax)
    dim = series.dims[0]
    x = _step_values(series, dim)
    y = np.asarray(series.values, dtype=float)
    ax.plot(x, y, label=label or series.name, **line_kw)
    if len(markers):
        idx = np.searchsorted(x, np.asarray(markers))
        ok = (idx < len(x)) & (x[np.minimum(idx, len(x) - 1)] == np.asarray(markers))
        ax.plot(x[idx[ok]], y[idx[ok]], "o", color="red", ms=6, zorder=5, label="window shown")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or str(series.name or ""))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax


def plot_loss(loss: xr.DataArray, ax=None, *, markers: Sequence[int] = (), logy: bool = True):
    """Training loss over steps, with optional markers (zigzag paper, Figure 1 top left)."""
    loss = loss.where(np.isfinite(loss), drop=True) if loss.size else loss
    ax = plot_series(loss, ax, ylabel="training loss", title="training loss", markers=markers, logy=logy, color="C0")
    return ax


def plot_mean_corr(mean_corr: xr.DataArray, ax=None, *, markers: Sequence[int] = ()):
    """Mean gradient correlation (eq. 3) over steps (zigzag paper, Figure 1 top right)."""
    h = mean_corr.attrs.get("h")
    ax = plot_series(mean_corr, ax, ylabel="mean gradient correlation",
                     title=f"mean gradient correlation (h={h})" if h else "mean gradient correlation",
                     markers=markers, color="C1")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    return ax


def plot_lags(lags: dict[int, xr.DataArray] | xr.DataArray, ax=None):
    """Lag-l correlation series mu(t, t+l) for several lags on one axes."""
    ax = _axes(ax)
    if isinstance(lags, xr.DataArray):
        lags = {int(lags.attrs.get("lag", 1)): lags}
    for lag, s in sorted(lags.items()):
        plot_series(s, ax, label=f"lag {lag}")
    ax.axhline(0, color="k", lw=0.8)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("correlation mu(t, t+lag)")
    ax.set_title("gradient correlation at fixed lags")
    ax.legend(loc="best", fontsize=8)
    return ax


def _group_key(ds: xr.Dataset | xr.DataArray, dim: str, by: str | None, n_bins: int):
    """Per-epoch groups when an epoch coordinate is known, else equal-width step bins."""
    if by is None:
        ep = ds.coords.get("epoch")
        if ep is not None and np.all(np.asarray(ep.values) >= 0):
            n_ep = len(np.unique(ep.values))
            # per epoch only when epochs hold several steps (full-batch GD has one step per epoch)
            if 1 < n_ep and ds.sizes[dim] >= 2 * n_ep:
                by = "epoch"
    if by == "epoch":
        return np.asarray(ds["epoch"].values), "epoch"
    steps = _step_values(ds, dim)
    if len(steps) == 0:
        return steps, "step"
    span = int(steps.max()) - int(steps.min()) + 1
    width = max(1, -(-span // max(1, min(n_bins, len(steps)))))  # ceil: at most n_bins bins
    key = (steps - steps.min()) // width
    return key, ("step" if width == 1 else f"bin of {width} steps")


def aggregate(series: xr.DataArray, by: str | None = None, n_bins: int = 50) -> xr.Dataset:
    """Mean, min and max of a per-step series per epoch (or per bin of steps).

    Without epochs (or with one step per epoch) the steps are cut into at most ``n_bins``
    bins of ``width = ceil((last - first + 1) / n_bins)`` training steps each.

    Returns:
        Dataset with ``mean``, ``min``, ``max`` and ``step`` (the mean step of each group)
        along dim ``group``; attr ``grouped_by`` says how ("epoch", "step", or "bin of W
        steps").
    """
    dim = series.dims[0]
    key, kind = _group_key(series, dim, by, n_bins)
    vals = np.asarray(series.values, dtype=float)
    steps = _step_values(series, dim).astype(float)
    groups = np.unique(key)
    out = {k: [] for k in ("mean", "min", "max", "step")}
    for g in groups:
        m = (key == g) & np.isfinite(vals)
        v = vals[m]
        out["mean"].append(v.mean() if v.size else np.nan)
        out["min"].append(v.min() if v.size else np.nan)
        out["max"].append(v.max() if v.size else np.nan)
        out["step"].append(steps[key == g].mean())
    ds = xr.Dataset({k: ("group", np.asarray(v, float)) for k, v in out.items()}, coords={"group": groups})
    ds.attrs["grouped_by"] = kind
    return ds


def plot_band(
    series: xr.DataArray,
    ax=None,
    *,
    by: str | None = None,
    n_bins: int = 50,
    baseline: xr.DataArray | None = None,
    ylabel: str | None = None,
    title: str | None = None,
    logy: bool = False,
    color: str = "C0",
):
    """Per-epoch mean with min-max shading (No Wrong Turns, Figures 1-3).

    Args:
        series: per-step DataArray (e.g. gamma, RSI, EB) with step (and epoch) coordinates.
        by: ``"epoch"`` or ``"step"`` bins; default epoch when an epoch coordinate is known.
        baseline: optional per-step series drawn dashed (e.g. the random-walk baseline).
    """
    ax = _axes(ax)
    agg = aggregate(series, by, n_bins)
    x = agg["step"].values
    ax.fill_between(x, agg["min"].values, agg["max"].values, color=color, alpha=0.25, lw=0,
                    label=f"min-max per {agg.attrs['grouped_by']}")
    ax.plot(x, agg["mean"].values, color=color, label=f"mean per {agg.attrs['grouped_by']}")
    if baseline is not None:
        bx = _step_values(baseline, baseline.dims[0])
        ax.plot(bx, np.asarray(baseline.values, float), "k--", lw=1, label=baseline.attrs.get("long_name", "baseline"))
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel or str(series.name or ""))
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return ax


def plot_gamma(rsi: xr.Dataset, ax=None, *, by: str | None = None, baseline: bool = True):
    """gamma_t = cos(G_t, w_t - w*) with the random-walk baseline (T - t)^(-1/2) dashed."""
    base = None
    if baseline and "random_walk" in rsi:
        base = rsi["random_walk"]
        base.attrs.setdefault("long_name", "random walk (T - t)^(-1/2)")
    ref = rsi.attrs.get("reference", "w*")
    ax = plot_band(rsi["gamma"], ax, by=by, baseline=base, ylabel="gamma = cos(G_t, w_t - w*)",
                   title=f"gamma against {ref}", color="C2")
    ax.axhline(0, color="k", lw=0.8)
    return ax


def plot_rsi(rsi: xr.Dataset, ax=None, *, by: str | None = None):
    """RSI_t = <G_t, w_t - w*> / ||w_t - w*||^2 (No Wrong Turns, Figure 2 top)."""
    return plot_band(rsi["rsi"], ax, by=by, ylabel="RSI", title=f"RSI against {rsi.attrs.get('reference', 'w*')}", color="C0")


def plot_eb(rsi: xr.Dataset, ax=None, *, by: str | None = None):
    """EB_t = ||G_t|| / ||w_t - w*|| (No Wrong Turns, Figure 2 middle)."""
    return plot_band(rsi["eb"], ax, by=by, ylabel="EB", title=f"EB against {rsi.attrs.get('reference', 'w*')}",
                     color="C1", logy=True)


def plot_eta_star(rsi: xr.Dataset, ax=None, *, by: str | None = None, show_lr: bool = True):
    """Locally optimal learning rate RSI / EB^2 (No Wrong Turns, Figure 3), with the lr used."""
    ax = plot_band(rsi["eta_star"], ax, by=by, ylabel="learning rate",
                   title="locally optimal learning rate", color="C4")
    if show_lr and "lr" in rsi.coords:
        lr = rsi["lr"]
        lrv = np.asarray(lr.values, float)
        ax.plot(_step_values(lr, lr.dims[0]), lrv, color="k", lw=1, ls=":", label="lr used")
        ax.legend(loc="best", fontsize=8)
        pos = lrv[np.isfinite(lrv) & (lrv > 0)]
        if pos.size:  # eta* spans decades: symmetric log keeps the lr used and negatives visible
            _symlog(ax, linthresh=float(pos.min()) / 10)
    return ax


def _symlog(ax, linthresh: float) -> None:
    """A symmetric-log y axis whose ticks are labelled on the negative side too.

    Matplotlib's default symlog locator puts a tick at each decade and its formatter drops
    the labels of minor-looking negative decades; here every decade tick (0, +-10^k) is a
    major, labelled one, thinned to at most ~9 labels.
    """
    import matplotlib.ticker as mticker

    ax.set_yscale("symlog", linthresh=linthresh)
    lo, hi = ax.get_ylim()
    k0 = int(np.floor(np.log10(linthresh)))
    top = max(abs(lo), abs(hi), linthresh * 10)
    decades = range(k0, int(np.ceil(np.log10(top))) + 1)
    pos = [10.0**k for k in decades if 10.0**k <= hi * 1.0001]
    neg = [-(10.0**k) for k in decades if -(10.0**k) >= lo * 1.0001]
    step = max(1, int(np.ceil((len(pos) + len(neg)) / 8)))
    ticks = [0.0] + pos[::-1][::step] + neg[::-1][::step]  # keep the outermost decades
    ax.yaxis.set_major_locator(mticker.FixedLocator(sorted(ticks)))
    ax.yaxis.set_major_formatter(mticker.FuncFormatter(
        lambda v, _: "0" if v == 0 else ("-" if v < 0 else "") + f"$10^{{{int(round(np.log10(abs(v))))}}}$"))
    ax.yaxis.set_minor_locator(mticker.NullLocator())
    ax.set_ylim(lo, hi)


def plot_distance(rsi: xr.Dataset, ax=None):
    """Distance ||w_t - w*|| to the reference over steps."""
    d = rsi["distance"]
    ax = plot_series(d, ax, ylabel="||w_t - w*||", title=f"distance to {rsi.attrs.get('reference', 'w*')}",
                     color="C5")
    return ax


def _phase_style(label: str, legend: bool = False) -> dict:
    """Patch style of a phase band: a light fill, or a grey hatch for "undetermined"."""
    color = PHASE_COLORS.get(label, "#dddddd")
    if label in PHASE_HATCH:
        return {"facecolor": "none", "edgecolor": color, "hatch": PHASE_HATCH[label]}
    return {"facecolor": color, "alpha": 0.4 if legend else 0.25}


def plot_phases(labels: xr.DataArray, loss: xr.DataArray | None = None, ax=None, *, logy: bool = True):
    """Phase bands (smooth / zigzag / random) behind the training loss.

    Args:
        labels: per-step DataArray of strings "smooth" / "zigzag" / "random" (or
            "undetermined", drawn hatched: steps without a complete window), with step
            coordinates.
        loss: per-step training loss to draw on top (optional).
    """
    import matplotlib.patches as mpatches

    ax = _axes(ax, (7, 3.5))
    dim = labels.dims[0]
    steps = _step_values(labels, dim)
    labs = np.asarray(labels.values).astype(str)
    if len(steps):
        gaps = np.diff(steps)
        half = np.median(gaps) / 2 if len(gaps) else 0.5
        start = 0
        for k in range(1, len(steps) + 1):
            if k == len(steps) or labs[k] != labs[start]:
                ax.axvspan(steps[start] - half, steps[k - 1] + half, lw=0, **_phase_style(labs[start]))
                start = k
    handles = [mpatches.Patch(label=n, **_phase_style(n, legend=True)) for n in PHASE_COLORS if n in set(labs)]
    if loss is not None:
        plot_series(loss.where(np.isfinite(loss), drop=True), ax, ylabel="training loss", logy=logy, color="k", lw=1)
        handles.append(ax.lines[-1])
        handles[-1].set_label("training loss")
    ax.set_xlabel("step")
    ax.set_title("optimization geometry phases")
    ax.legend(handles=handles, loc="best", fontsize=8)
    return ax


def plot_rsi_all_references(pairs: xr.Dataset, ax=None, *, var: str = "gamma", never: xr.Dataset | None = None,
                            title: str | None = None):
    """Heatmap of gamma (or ``var``) for every (step t, reference iterate s) pair.

    Args:
        pairs: the Dataset of :func:`analysis.rsi_pairs.rsi_all_references`.
        var: ``"gamma"`` (default; diverging map on [-1, 1]), ``"rsi"`` (diverging, symmetric
            about 0 at the 99th percentile of |RSI|), or ``"eb"`` / ``"distance"`` (log colour).
        never: the result of :func:`analysis.rsi_pairs.never_turns_away`: its reference steps are
            marked with a tick above the map.

    The diagonal t = s separates the pairs where s lies ahead of t (above it, t < s: the No
    Wrong Turns question) from those where the path already passed s.
    """
    import matplotlib.colors as mcolors

    ax = _axes(ax, (6, 4.8))
    da = pairs[var]
    vals = np.asarray(da.values, dtype=float)
    t = np.asarray(pairs["step"].values)
    s = np.asarray(pairs["reference"].values)
    norm = None
    if var == "gamma":
        kw = {"cmap": CORR_CMAP, "vmin": -1, "vmax": 1}
    elif var == "rsi":
        fin = np.abs(vals[np.isfinite(vals)])
        m = float(np.quantile(fin, 0.99)) if fin.size else 1.0
        kw = {"cmap": CORR_CMAP, "vmin": -m, "vmax": m}
    else:
        fin = vals[np.isfinite(vals) & (vals > 0)]
        norm = mcolors.LogNorm(vmin=float(fin.min()), vmax=float(fin.max())) if fin.size else None
        kw = {"cmap": "viridis"}
    extent = (s[0] - 0.5, s[-1] + 0.5, t[-1] + 0.5, t[0] - 0.5) if len(s) and len(t) else None
    im = ax.imshow(vals, interpolation="nearest", aspect="auto", extent=extent, norm=norm, **kw)
    cb = ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    cb.set_label({"gamma": "gamma = cos(G_t, w_t - w_s)", "rsi": "RSI(t, s)"}.get(var, var))
    if len(s) and len(t):
        lo, hi = max(s[0], t[0]), min(s[-1], t[-1])
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.6)
    if never is not None and len(np.asarray(never.attrs.get("steps", []))):
        marks = np.asarray(never.attrs["steps"])
        ax.plot(marks, np.full(len(marks), t[0] - 0.5), "v", color="k", ms=4, clip_on=False,
                label="never turned away from")
        ax.legend(loc="lower left", fontsize=8)
    ax.set_xlabel("reference iterate s (step)")
    ax.set_ylabel("gradient step t")
    ax.set_title(title or f"{var} against every recorded iterate")
    return ax
