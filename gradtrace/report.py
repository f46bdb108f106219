"""``gradtrace report``: every figure of a recorded run into a directory with an index.html.

The report computes the results once, saves them under ``results/`` (netCDF, reloadable with
``xarray.open_dataset``), draws each figure from those results with :mod:`analysis.plots`,
and writes an ``index.html`` that shows the figures beside the run's settings.
"""

from __future__ import annotations

import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xarray as xr

from analysis import plots
from gradtrace_format.errors import AnalysisError
from analysis.io import save_result as _save_result

#: Marker file of a report directory (``gradtrace report -o DIR --force`` replaces only these).
REPORT_MARK = ".gradtrace-report"


def save_result(result, path):
    """The report's results live in its own directory: a rerun replaces them."""
    return _save_result(result, path, force=True)

MAX_FULL_MATRIX = 600  # steps drawn in the full T x T heatmap (evenly subsampled beyond this)


def _log(msg: str, progress: bool):
    if progress:
        print(f"[report] {msg}", flush=True)


def _pick_windows(mc: xr.DataArray, labels: np.ndarray, steps: np.ndarray, h: int) -> list[int]:
    """Three window starts like the zigzag paper's Figure 1: early, inside the longest zigzag
    stretch (else the middle of training), and the last complete window."""
    starts = np.asarray(mc["step"].values)
    ok = np.isfinite(np.asarray(mc.values, float))
    valid = starts[ok]
    if len(valid) == 0:
        return []
    picks = [int(valid[0])]
    zig = (labels == "zigzag") & ok
    best, cur, best_lo, lo = 0, 0, None, None
    for i, z in enumerate(zig):
        if z:
            if cur == 0:
                lo = i
            cur += 1
            if cur > best:
                best, best_lo = cur, lo
        else:
            cur = 0
    if best_lo is not None:
        picks.append(int(starts[best_lo + best // 2]))
    else:
        picks.append(int(valid[len(valid) // 2]))
    picks.append(int(valid[-1]))
    out = []
    for p in picks:
        if p not in out:
            out.append(p)
    return out


ZOOM_STEPS = 40  # steps in the zoomed block beside the full matrix
PNG_DPI = 110


def _cell_dpi(n: int, axes_inches: float, min_pixels: int = 3) -> int:
    """A dpi at which each of n matrix cells across ``axes_inches`` gets >= ``min_pixels``."""
    return max(PNG_DPI, int(np.ceil(min_pixels * n / (0.8 * axes_inches))))


def _zoom_block(labels, mc, sel: np.ndarray, size: int):
    """Positions (into ``sel``) of ``size`` consecutive steps: the middle of the longest
    zigzag stretch, else the middle of the run; None when the run is not longer than that."""
    n = len(sel)
    if n <= size:
        return None
    centre = int(sel[n // 2])
    if labels is not None and mc is not None:
        zig = np.asarray(mc["step"].values)[labels == "zigzag"]
        if len(zig):
            gap = np.median(np.diff(np.asarray(mc["step"].values))) if len(mc) > 1 else 1
            runs = np.split(zig, np.flatnonzero(np.diff(zig) > gap) + 1)  # stretches of consecutive steps
            best = max(runs, key=len)
            centre = int(best[len(best) // 2])
    c = int(np.searchsorted(sel, centre))
    lo = min(max(0, c - size // 2), n - size)
    return slice(lo, lo + size)


def _save_fig(fig, path: Path, dpi: int = PNG_DPI):
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path.name


@dataclass
class _Report:
    """What the report's sections share: the run, where files go, and what they collect
    (figures with captions, key numbers, notes) and pass on (phases, lags, windows)."""

    run: object
    out: Path
    h: int
    progress: bool
    gsteps: np.ndarray  # the gradient steps
    loss: xr.DataArray  # the loss at those steps
    figures: list = field(default_factory=list)  # (file, caption)
    facts: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    ph: xr.Dataset | None = None
    mc: xr.DataArray | None = None  # mean gradient correlation
    labels: np.ndarray | None = None  # phase of each mean-correlation step
    lag_results: dict = field(default_factory=dict)
    windows: list = field(default_factory=list)

    @property
    def res_dir(self) -> Path:
        return self.out / "results"

    def log(self, msg: str):
        _log(msg, self.progress)

    def figure(self, fig, name: str, caption: str, dpi: int = PNG_DPI):
        self.figures.append((_save_fig(fig, self.out / name, dpi=dpi), caption))


def write_report(store, out_dir, *, h: int = 5, reference="final", exclude_tail=1, progress: bool = True) -> Path:
    """Compute the run's statistics, draw every figure and write ``out_dir/index.html``.

    Args:
        store: path of a run store (or an opened :class:`analysis.Run`).
        out_dir: directory for ``index.html``, the PNG figures and ``results/``.
        h: window size of the correlation windows and the mean gradient correlation.
        reference: reference point of RSI/EB/gamma (see :func:`analysis.rsi`).
        exclude_tail: gradient steps dropped from the end for RSI/EB/gamma (default 1).

    Returns:
        Path of ``index.html``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)

    from analysis.store import as_run
    from analysis.summary import format_info, store_info

    t0 = time.perf_counter()
    run = as_run(store)
    _check_reference(run, reference)
    out = Path(out_dir)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / REPORT_MARK).write_text(f"written by gradtrace report from {run.path}\n")
    gsteps = run.grad_steps
    if len(gsteps) < 2:
        raise AnalysisError(f"{run.path} holds {len(gsteps)} gradient step(s): a report needs at least 2")
    rep = _Report(run, out, h, progress, gsteps, run.ds["loss"].sel(step=gsteps))

    _phase_stats(rep)
    _lag_stats(rep)
    rep.windows = _pick_windows(rep.mc, rep.labels, rep.gsteps, h) if rep.mc is not None else []
    _overview_figure(rep)
    _full_matrix_figure(rep)
    _sign_shift_figure(rep)
    _sign_shift_facts(rep)
    _lags_figure(rep)
    _phases_figure(rep)
    _rsi_figures(rep, reference, exclude_tail)
    layer_html = _layer_table(rep, exclude_tail)

    info = store_info(run)
    (rep.res_dir / "info.json").write_text(json.dumps(info, indent=1, default=str))
    index = rep.out / "index.html"
    index.write_text(_html(run, info, format_info(info), rep.figures, rep.facts, rep.notes, layer_html,
                           time.perf_counter() - t0))
    rep.log(f"done in {time.perf_counter() - t0:.1f} s: {index}")
    return index


def _check_reference(run, reference):
    """An explicit reference that does not resolve is an error, not a note."""
    from analysis.reference import parse_reference, resolve_reference

    if not (reference is None or (isinstance(reference, str) and parse_reference(reference) == "final")):
        resolve_reference(run, reference)


def _phase_stats(rep: _Report):
    """Mean gradient correlation and phases (``results/phases.nc``) and their key numbers."""
    from analysis.phases import phases as _phases

    try:
        rep.log(f"mean gradient correlation (h={rep.h}) and phases")
        ph = _phases(rep.run, h=rep.h)
        save_result(ph, rep.res_dir / "phases.nc")
        rep.ph, rep.mc = ph, ph["mean_corr"]
        rep.labels = labels = np.asarray(ph["phase"].values).astype(str)
        rep.facts["share of the loss decrease under zigzag (new lows only; spikes add nothing)"] = \
            f"{100 * float(ph.attrs['zigzag_share']):.1f}%" if np.isfinite(ph.attrs.get("zigzag_share", np.nan)) else "n/a"
        gs = ph.attrs.get("gawu_step", -1)
        rep.facts["GAWU change point (first + to - crossing of the mean correlation)"] = "none" if gs < 0 else f"step {gs}"
        counts = {k: int((labels == k).sum()) for k in ("smooth", "zigzag", "random")}
        rep.facts["steps per phase (thresholds +-0.5)"] = ", ".join(f"{k} {v}" for k, v in counts.items())
    except AnalysisError as err:
        rep.notes.append(f"No mean gradient correlation: {err}")


def _lag_stats(rep: _Report):
    """Lag 1, 2, 3 correlation series (``results/lags.nc``)."""
    import analysis.correlation as C

    for lag in (1, 2, 3):
        try:
            rep.lag_results[lag] = C.lag_series(rep.run, lag)
        except AnalysisError as err:
            rep.notes.append(f"lag {lag}: {err}")
    if rep.lag_results:
        save_result(xr.Dataset({f"lag{k}": v.reset_coords(drop=True) for k, v in rep.lag_results.items()}),
                    rep.res_dir / "lags.nc")


def _overview_figure(rep: _Report):
    """Figure 1: loss, mean correlation and the h x h correlation windows."""
    import matplotlib.pyplot as plt

    import analysis.correlation as C

    run, h, windows = rep.run, rep.h, rep.windows
    rep.log("figure 1: loss, mean correlation and h x h windows")
    nwin = max(len(windows), 1)
    fig = plt.figure(figsize=(4.6 * max(nwin, 2), 8.2), layout="constrained")
    gs_ = fig.add_gridspec(2, 2 * nwin)
    ax_loss = fig.add_subplot(gs_[0, :nwin])
    ax_mc = fig.add_subplot(gs_[0, nwin:])
    plots.plot_loss(rep.loss, ax_loss, markers=windows)
    if rep.mc is not None:
        plots.plot_mean_corr(rep.mc, ax_mc, markers=windows)
    else:
        ax_mc.text(0.5, 0.5, "mean correlation not available\n(see notes)", ha="center", va="center")
    for i, w in enumerate(windows):
        cw = C.corr_window(run, w, h=h)
        save_result(cw, rep.res_dir / f"corr_window_{w}.nc")
        plots.plot_corr_matrix(cw, fig.add_subplot(gs_[1, 2 * i : 2 * i + 2]), title=f"window at step {w}")
    fig.suptitle(f"{Path(str(run.path)).name}: training loss, mean gradient correlation and {h} x {h} windows")
    rep.figure(fig, "fig1_overview.png",
               "Training loss and mean gradient correlation (zigzag paper, eq. 3) with markers at the steps "
               f"whose {h} x {h} pairwise correlation matrices are drawn below (zigzag paper, Figure 1).")


def _full_matrix_figure(rep: _Report):
    """The full T x T correlation matrix (evenly subsampled beyond MAX_FULL_MATRIX) and a zoom."""
    import matplotlib.pyplot as plt

    import analysis.correlation as C

    gsteps, labels = rep.gsteps, rep.labels
    sel = gsteps if len(gsteps) <= MAX_FULL_MATRIX else gsteps[np.linspace(0, len(gsteps) - 1, MAX_FULL_MATRIX).round().astype(int)]
    rep.log(f"full correlation matrix over {len(sel)} steps")
    full = C.corr_matrix(rep.run, list(map(int, sel)))
    save_result(full, rep.res_dir / "corr_full.nc")
    # one matrix cell must cover several pixels: at one pixel a zigzag block (cells alternating
    # +-1) is a red/blue checkerboard that reads as purple, a colour not on the colour bar
    zoom = _zoom_block(labels, rep.mc, sel, ZOOM_STEPS)
    fig, axes = plt.subplots(1, 2, figsize=(13.5, 6.0), layout="constrained", width_ratios=[1.25, 1])
    plots.plot_corr_matrix(full, axes[0], title=f"gradient correlation, all {len(sel)} steps"
                           + ("" if len(sel) == len(gsteps) else f" (evenly subsampled from {len(gsteps)})"))
    if zoom is not None:
        plots.plot_corr_matrix(full.isel(step_i=zoom, step_j=zoom), axes[1], annotate=False,
                               title=f"zoom: steps {int(sel[zoom][0])}..{int(sel[zoom][-1])}")
    else:
        axes[1].set_axis_off()
    rep.figure(fig, "corr_full.png",
               "The full pairwise gradient correlation matrix (one Gram pass over the store), drawn with "
               "at least 3 pixels per cell (click for full size), and a zoom into "
               + ("the longest zigzag stretch" if zoom is not None and labels is not None and (labels == "zigzag").any()
                  else "the middle of the run")
               + ": in a zigzag phase neighbouring cells alternate red (+) and blue (-).",
               dpi=_cell_dpi(len(sel), 6.0))


def _sign_shift_figure(rep: _Report):
    """Sign shift in the same windows as figure 1 (zigzag paper, Figure 8)."""
    if not rep.windows:
        return
    import matplotlib.pyplot as plt

    import analysis.signs as S

    windows = rep.windows
    rep.log("sign shift windows")
    fig, axes = plt.subplots(1, len(windows), figsize=(4.6 * len(windows), 4.1), layout="constrained", squeeze=False)
    for i, w in enumerate(windows):
        sw = S.sign_shift_window(rep.run, w, h=rep.h)
        save_result(sw, rep.res_dir / f"sign_window_{w}.nc")
        plots.plot_sign_shift_matrix(sw["sign_shift"], axes[0, i], title=f"% entries flipping sign, step {w}")
    rep.figure(fig, "sign_shift.png",
               f"The percentage of gradient entries with opposite signs, among entries non-zero at both "
               f"steps, in the same {rep.h} x {rep.h} windows whose correlations the first figure shows "
               "(zigzag paper, Figure 8).")


def _sign_shift_facts(rep: _Report):
    """Sign shift between adjacent steps (``results/sign_shift_lag1.nc``): zigzag phase and whole run."""
    import analysis.signs as S

    try:
        sl = S.sign_shift_lag(rep.run, 1)
        save_result(sl, rep.res_dir / "sign_shift_lag1.nc")
        v = np.asarray(sl["sign_shift"].values, float)
        if rep.labels is not None and rep.mc is not None:
            zz = np.isin(np.asarray(sl["step"].values), np.asarray(rep.mc["step"].values)[rep.labels == "zigzag"])
            if zz.any():
                rep.facts["entries flipping sign between adjacent steps, zigzag phase"] = f"{np.nanmean(v[zz]):.1f}%"
        rep.facts["entries flipping sign between adjacent steps, whole run"] = f"{np.nanmean(v):.1f}%"
    except AnalysisError as err:
        rep.notes.append(f"sign shift at lag 1: {err}")


def _lags_figure(rep: _Report):
    """Correlation at lags 1, 2, 3 and the adjacent-step key number."""
    if not rep.lag_results:
        return
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    plots.plot_lags(rep.lag_results, ax)
    rep.figure(fig, "lags.png",
               "Correlation between gradients 1, 2 and 3 training steps apart. Zigzag: lag 1 negative, "
               "lag 2 positive, lag 3 negative.")
    if 1 in rep.lag_results:
        v = np.asarray(rep.lag_results[1].values, float)
        rep.facts["adjacent gradient correlation mu(t, t+1): min / median"] = f"{np.nanmin(v):+.3f} / {np.nanmedian(v):+.3f}"


def _phases_figure(rep: _Report):
    """Geometry phases behind the training loss."""
    if rep.labels is None:
        return
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    plots.plot_phases(rep.ph["phase"], rep.loss, ax)
    rep.figure(fig, "phases.png",
               "Geometry phases from the mean gradient correlation (smooth > 0.5, zigzag < -0.5, "
               "random otherwise) behind the training loss.")


def _rsi_figures(rep: _Report, reference, exclude_tail):
    """RSI / EB / gamma (``results/rsi.nc``), the locally optimal learning rate and the distance."""
    import matplotlib.pyplot as plt

    from analysis.rsi import rsi as _rsi

    try:
        rep.log(f"RSI / EB / gamma against {reference}")
        r = _rsi(rep.run, reference, exclude_tail=exclude_tail)
        save_result(r, rep.res_dir / "rsi.nc")
        g = np.asarray(r["gamma"].values, float)
        fin = g[np.isfinite(g)]
        if fin.size:
            rep.facts[f"gamma > 0 (against {r.attrs.get('reference')})"] = f"{100 * (fin > 0).mean():.1f}% of {fin.size} steps"
        fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
        plots.plot_gamma(r, axes[0])
        plots.plot_rsi(r, axes[1])
        plots.plot_eb(r, axes[2])
        rep.figure(fig, "rsi_eb_gamma.png",
                   "gamma = cos(G_t, w_t - w*), RSI and EB against the reference, mean per epoch (or per bin of "
                   "steps) with min-max shading; dashed: the random-walk baseline (T - t)^(-1/2) "
                   "(No Wrong Turns, Figures 1-2).")
        fig, axes = plt.subplots(1, 2, figsize=(12, 4), layout="constrained")
        plots.plot_eta_star(r, axes[0])
        plots.plot_distance(r, axes[1])
        rep.figure(fig, "eta_star_distance.png",
                   "Locally optimal learning rate RSI / EB^2 beside the learning rate used (No Wrong Turns, "
                   "Figure 3), and the distance to the reference.")
    except AnalysisError as err:
        rep.notes.append(f"RSI / EB / gamma: {err}")


def _layer_table(rep: _Report, exclude_tail) -> str:
    """The per-layer table (``results/layers.nc``) as HTML ("" when not available)."""
    import analysis.layers as L

    try:
        lt = L.layer_table(rep.run, exclude_tail=exclude_tail)
        save_result(lt, rep.res_dir / "layers.nc")
        df = lt.to_dataframe() if hasattr(lt, "to_dataframe") else lt
        return df.to_html(float_format=lambda x: f"{x:.4g}", border=0, classes="tbl")
    except AnalysisError as err:
        rep.notes.append(f"per-layer table: {err}")
        return ""


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ddd}
figure{margin:1.5em 0} figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:.92em;max-width:70em}
pre{background:#f6f8fa;padding:1em;overflow-x:auto;font-size:.85em}
table.facts td{padding:.2em 1em .2em 0} .tbl{border-collapse:collapse;font-size:.85em}
.tbl td,.tbl th{padding:.2em .6em;border-bottom:1px solid #eee;text-align:right}
.note{color:#8a5a00}
"""


def _html(run, info, info_text, figures, facts, notes, layer_html, seconds) -> str:
    e = html.escape
    rows = "".join(f"<tr><td>{e(k)}</td><td><b>{e(v)}</b></td></tr>" for k, v in facts.items())
    figs = "".join(
        f'<figure><a href="{e(f)}"><img src="{e(f)}" alt="{e(f)}"></a><figcaption>{e(c)}</figcaption></figure>'
        for f, c in figures
    )
    note_html = "".join(f'<p class="note">{e(n)}</p>' for n in notes)
    settings = json.dumps(info.get("settings") or {}, indent=1, default=str)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>gradtrace report: {e(str(run.path))}</title><style>{CSS}</style></head>
<body>
<h1>gradtrace report</h1>
<p>Store <code>{e(str(run.path))}</code>: {info['n_gradient_steps']} gradient steps, {info['n_params']:,} parameters.
Made in {seconds:.1f} s. Every figure is drawn from the results saved in <code>results/</code>
(open them with <code>xarray.open_dataset</code>).</p>
<h2>Key numbers</h2>
<table class="facts">{rows}</table>
{note_html}
<h2>Figures</h2>
{figs}
<h2>Per layer</h2>
{layer_html or '<p>not available</p>'}
<h2>The run</h2>
<pre>{e(info_text)}</pre>
<h2>Settings</h2>
<pre>{e(settings)}</pre>
</body></html>
"""
