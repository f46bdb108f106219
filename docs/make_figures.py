"""Record the evidence runs of docs/reproduction.md and draw its figures.

    python docs/make_figures.py                    # record (~4 min on 2 cores) and draw
    python docs/make_figures.py --reuse            # redraw from the stores already recorded
    python docs/make_figures.py --runs /tmp/r --out /tmp/figs

Writes the PNGs and ``numbers.json`` (every number quoted on the page) to ``docs/figures/``;
the stores go to ``runs/reproduction/`` (git-ignored). Every figure is drawn by an
``analysis.plots`` function from results of the analysis API, read from the recorded stores.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import analysis as ga  # noqa: E402
from analysis import plots  # noqa: E402
from gradtrace_format.format import read_header  # noqa: E402

warnings.filterwarnings("ignore", message="Consolidated metadata")

# name -> (preset, overrides). The commands in docs/reproduction.md are the same.
RUNS = {
    "demo": ("demo", {}),
    "demo-small-lr": ("demo", {"lr": 0.001}),
    "nwt": ("nwt-cnn3-digits", {}),
    "sm": ("sm", {}),
    "alm": ("alm", {}),
    "gawu": ("gawu-resnet_small-digits", {}),
}
ZOOM_STEP, ZOOM_STEPS, ZOOM_FACTOR = 200, 100, 0.01


def record(runs: Path, reuse: bool) -> dict[str, Path]:
    from experiments.recipes import load_config, run_recipe
    from experiments.zoom import branch

    paths = {}
    for name, (preset, overrides) in RUNS.items():
        path = runs / f"{name}.zarr"
        if not (reuse and path.exists()):
            run_recipe(load_config(preset, **overrides), path, overwrite=True, progress=True)
        paths[name] = path
    zoom = runs / "demo-zoom.zarr"
    if not (reuse and zoom.exists()):
        branch(paths["demo"], ZOOM_STEP, None, zoom, lr_factor=ZOOM_FACTOR, steps=ZOOM_STEPS,
               overwrite=True, progress=True)
    paths["zoom"] = zoom
    return paths


def _longest(mask: np.ndarray) -> tuple[int, int]:
    best, start = (0, 0), None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            best = max(best, (start, i), key=lambda b: b[1] - b[0])
            start = None
    return best


def zigzag_stats(run) -> dict:
    """Statistics of the smooth start and of the longest zigzag stretch of a run."""
    lag1, lag2, lag3 = (ga.lag_series(run, k) for k in (1, 2, 3))
    flips = ga.sign_shift_lag(run, 1)["sign_shift"]
    ph = ga.phases(run, h=5)
    lo, hi = _longest(ph["phase"].values == "zigzag")
    out = {"phase_counts": {k: int((ph["phase"].values == k).sum()) for k in ("smooth", "zigzag", "random")},
           "zigzag_share_of_loss_decrease": round(float(ph.attrs["zigzag_share"]), 3),
           "first_zigzag_step (gawu_step)": int(ph.attrs["gawu_step"])}
    first = int(ph["step"].values[0])
    smooth = slice(first, first + 49)
    out["first_50_steps"] = {"adjacent_corr": round(float(lag1.sel(step=smooth).mean()), 3),
                             "sign_flip_percent": round(float(flips.sel(step=smooth).mean()), 1)}
    if hi > lo:
        st = ph["step"].values[lo:hi]
        zz = slice(int(st[0]), int(st[-1]))
        out["zigzag_stretch"] = {
            "steps": [int(st[0]), int(st[-1])],
            "adjacent_corr": round(float(lag1.sel(step=zz).mean()), 3),
            "lag2_corr": round(float(lag2.sel(step=zz).mean()), 3),
            "lag3_corr": round(float(lag3.sel(step=zz).mean()), 3),
            "sign_flip_percent": round(float(flips.sel(step=zz).mean()), 1),
            "zero_share_percent": round(float(ga.sign_shift_lag(run, 1, zz)["zero_share"].mean()), 2),
        }
    loss = run.ds["loss"].values
    out["loss_first_last"] = [round(float(loss[0]), 4), round(float(loss[np.isfinite(loss)][-1]), 4)]
    return out


def training(path) -> dict:
    t = read_header(path).settings.get("training", {})
    return {k: t[k] for k in ("seconds", "s_per_step", "steps_run", "switch_step") if k in t}


def _save(fig, out: Path, name: str) -> str:
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    print(f"wrote {out / name}")
    return name


def fig_overview(run, out: Path, name: str, title: str) -> tuple[str, list[int]]:
    """Zigzag paper Figure 1: loss and mean correlation with markers, three 5x5 windows."""
    mc = ga.mean_corr(run, h=5)
    ph = ga.phases(run, h=5)
    lo, hi = _longest(ph["phase"].values == "zigzag")
    steps = mc["step"].values
    valid = steps[np.isfinite(mc.values)]
    marks = [int(valid[5]), int(ph["step"].values[(lo + hi) // 2]) if hi > lo else int(valid[len(valid) // 2]),
             int(valid[-1])]
    fig = plt.figure(figsize=(13, 7), layout="constrained")
    gs = fig.add_gridspec(2, 3)
    plots.plot_loss(run.ds["loss"].sel(step=run.grad_steps), fig.add_subplot(gs[0, 0]), markers=marks)
    plots.plot_mean_corr(mc, fig.add_subplot(gs[0, 1]), markers=marks)
    plots.plot_phases(ph["phase"], run.ds["loss"].sel(step=ph["step"].values), fig.add_subplot(gs[0, 2]))
    for i, k in enumerate(marks):
        plots.plot_corr_matrix(ga.corr_window(run, k, 5), fig.add_subplot(gs[1, i]))
    fig.suptitle(title)
    return _save(fig, out, name), marks


def fig_signs(run, k: int, out: Path, name: str) -> str:
    """Zigzag paper Figure 8: a zigzag window's correlations beside its sign-shift matrix."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    plots.plot_corr_matrix(ga.corr_window(run, k, 5), axes[0])
    plots.plot_sign_shift_matrix(ga.sign_shift_window(run, k, 5)["sign_shift"], axes[1])
    plots.plot_lags({1: ga.lag_series(run, 1), 2: ga.lag_series(run, 2), 3: ga.lag_series(run, 3)}, axes[2])
    return _save(fig, out, name)


def fig_full_matrix(run, out: Path, name: str) -> str:
    """The whole T x T correlation matrix, and a 40-step crop of the zigzag phase."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), layout="constrained")
    full = ga.corr_matrix(run)
    plots.plot_corr_matrix(full, axes[0], title=f"gradient correlation, all {full.sizes['step_i']} steps",
                           annotate=False)
    crop = slice(ZOOM_STEP - 20, ZOOM_STEP + 19)
    plots.plot_corr_matrix(full.sel(step_i=crop, step_j=crop), axes[1], annotate=False,
                           title=f"steps {crop.start}..{crop.stop} (zigzag: sign alternates with the lag)")
    return _save(fig, out, name)


def fig_compare_lr(big, small, zoom, out: Path, name: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    plots.plot_mean_corr(ga.mean_corr(big, 5), axes[0])
    axes[0].set_title("lr 0.1: smooth, then zigzag")
    plots.plot_mean_corr(ga.mean_corr(small, 5), axes[1])
    axes[1].set_title("lr 0.001 (100x smaller): smooth throughout")
    plots.plot_mean_corr(ga.mean_corr(zoom, 5), axes[2])
    axes[2].set_title(f"zoom: from step {ZOOM_STEP} of the lr 0.1 run at lr 0.001")
    return _save(fig, out, name)


def fig_interpolation(store, out: Path, name: str, numbers: dict) -> str:
    from experiments.interpolate import interpolate

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    pairs = [((0, "final"), axes[0]), ((ZOOM_STEP, ZOOM_STEP + 1), axes[1]), ((ZOOM_STEP, ZOOM_STEP + 2), axes[1])]
    for (a, b), ax in pairs:
        ds = interpolate(store, a, b, n_points=41)
        label = f"{ds.attrs['a']} -> {ds.attrs['b']} (barrier {ds.attrs['barrier']:.3f})"
        plots.plot_series(ds["loss"], ax, label=label, ylabel="training loss")
        numbers[f"{a}->{b}"] = {"barrier": round(ds.attrs["barrier"], 4), "loss_a": round(ds.attrs["loss_a"], 4),
                                "loss_b": round(ds.attrs["loss_b"], 4), "min_along_path": round(float(ds["loss"].min()), 4),
                                "distance": round(ds.attrs["distance"], 4)}
    for ax, t in zip(axes, ("initialisation to final iterate", "adjacent zigzag iterates")):
        ax.set_xlabel("alpha in (1 - alpha) w_a + alpha w_b")
        ax.set_title(f"loss along the segment: {t}")
        ax.legend(fontsize=8)
    return _save(fig, out, name)


def fig_nwt(run, out: Path, name: str) -> str:
    r = ga.rsi(run, exclude_tail="epoch")
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    plots.plot_gamma(r, axes[0])
    plots.plot_rsi(r, axes[1])
    plots.plot_eb(r, axes[2])
    return _save(fig, out, name)


def fig_counter(sm, alm, out: Path, name: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    plots.plot_gamma(ga.rsi(sm, exclude_tail=1), axes[0], by="step")
    axes[0].set_title("SM (deterministic, non-convex): gamma against w_T")
    plots.plot_gamma(ga.rsi(alm, exclude_tail="epoch"), axes[1])
    axes[1].set_title("ALM (stochastic, convex): gamma against w_T")
    return _save(fig, out, name)


def fig_gawu(run, switch: int, out: Path, name: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), layout="constrained")
    lr = run.ds["lr"].sel(step=run.grad_steps)
    plots.plot_series(lr, axes[0], ylabel="learning rate", title="GAWU learning rate", markers=[switch], logy=True)
    plots.plot_mean_corr(ga.mean_corr(run, 5), axes[1], markers=[switch - 4])
    axes[1].set_title(f"mean correlation; red: window ending at the switch, step {switch}")
    plots.plot_loss(run.ds["loss"].sel(step=run.grad_steps), axes[2], markers=[switch])
    return _save(fig, out, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default=str(ROOT / "runs" / "reproduction"), help="where the stores go")
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures"), help="where the PNGs go")
    ap.add_argument("--reuse", action="store_true", help="keep stores that already exist")
    args = ap.parse_args(argv)
    runs, out = Path(args.runs), Path(args.out)
    runs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    paths = record(runs, args.reuse)
    r = {k: ga.open_run(p) for k, p in paths.items()}
    numbers: dict = {}

    numbers["demo"] = {**zigzag_stats(r["demo"]), "training": training(paths["demo"])}
    _, marks = fig_overview(r["demo"], out, "demo_overview.png",
                            "demo: cnn3 on digits, full-batch GD, lr 0.1 (zigzag paper, Figure 1)")
    numbers["demo"]["window_steps"] = marks
    fig_signs(r["demo"], marks[1], out, "demo_signs.png")
    w = ga.corr_window(r["demo"], marks[1], 5).values
    s = ga.sign_shift_window(r["demo"], marks[1], 5)["sign_shift"].values
    numbers["demo"]["zigzag_window"] = {"step": marks[1], "corr": np.round(w, 2).tolist(),
                                        "sign_shift": np.round(s, 1).tolist()}
    fig_full_matrix(r["demo"], out, "demo_corr_full.png")
    numbers["demo-small-lr"] = {**zigzag_stats(r["demo-small-lr"]), "training": training(paths["demo-small-lr"])}
    numbers["zoom"] = {**zigzag_stats(r["zoom"]), "parent": read_header(paths["zoom"]).parent}
    fig_compare_lr(r["demo"], r["demo-small-lr"], r["zoom"], out, "lr_and_zoom.png")
    numbers["interpolation"] = {}
    fig_interpolation(paths["demo"], out, "interpolation.png", numbers["interpolation"])

    g = ga.rsi(r["nwt"], exclude_tail="epoch")["gamma"].values
    numbers["nwt"] = {"steps": len(g), "gamma_positive_share": round(float(np.mean(g > 0)), 4),
                      "gamma_mean": round(float(np.mean(g)), 4), "gamma_min": round(float(np.min(g)), 4),
                      "training": training(paths["nwt"])}
    fig_nwt(r["nwt"], out, "nwt_gamma.png")
    gs = ga.rsi(r["sm"], exclude_tail=1)["gamma"].values
    ga_ = ga.rsi(r["alm"], exclude_tail="epoch")["gamma"].values
    ga_ = ga_[np.isfinite(ga_)]
    numbers["sm"] = {"gamma_negative_share": round(float(np.mean(gs < 0)), 3),
                     "loss_first_last": [round(float(x), 1) for x in r["sm"].ds["loss"].values[[0, -2]]]}
    numbers["alm"] = {"gamma_negative_share": round(float(np.mean(ga_ < 0)), 3),
                      "sign_change_share": round(float(np.mean(np.sign(ga_[1:]) != np.sign(ga_[:-1]))), 3),
                      "relative_step_spread": round(float(np.std(np.diff(ga_)) / np.mean(np.abs(ga_))), 3)}
    gn = g[np.isfinite(g)]
    numbers["nwt"]["sign_change_share"] = round(float(np.mean(np.sign(gn[1:]) != np.sign(gn[:-1]))), 3)
    numbers["nwt"]["relative_step_spread"] = round(float(np.std(np.diff(gn)) / np.mean(np.abs(gn))), 3)
    fig_counter(r["sm"], r["alm"], out, "counterexamples_gamma.png")
    sw = read_header(paths["gawu"]).settings["training"]["switch_step"]
    numbers["gawu"] = {"switch_step": sw, "offline_first_crossing_k": ga.gawu_switch(ga.mean_corr(r["gawu"], 5)),
                       "training": training(paths["gawu"])}
    if sw is not None:
        fig_gawu(r["gawu"], sw, out, "gawu.png")
    (out / "numbers.json").write_text(json.dumps(numbers, indent=1))
    print(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
