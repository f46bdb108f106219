"""Figures: bins that say their size, a visible "undetermined" phase, labelled negative eta*
ticks, settings text cut between items, the full correlation matrix at cell resolution."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import xarray as xr  # noqa: E402

from analysis import plots  # noqa: E402
from gradtrace.report import _cell_dpi, _zoom_block  # noqa: E402
from analysis.summary import setting_text  # noqa: E402


def series(values, steps=None, epoch=None):
    steps = np.arange(len(values)) if steps is None else np.asarray(steps)
    coords = {"step": steps}
    if epoch is not None:
        coords["epoch"] = ("step", np.asarray(epoch))
    return xr.DataArray(np.asarray(values, float), dims="step", coords=coords, name="gamma")


def test_step_bins_have_a_stated_whole_width():
    rng = np.random.default_rng(0)
    v = rng.standard_normal(300)
    agg = plots.aggregate(series(v), n_bins=50)
    assert agg.attrs["grouped_by"] == "bin of 6 steps" and agg.sizes["group"] == 50
    for b in (0, 17, 49):  # a numpy reference, bin by bin
        chunk = v[6 * b: 6 * b + 6]
        assert agg["mean"].values[b] == pytest.approx(chunk.mean(), rel=1e-12)
        assert agg["min"].values[b] == chunk.min() and agg["max"].values[b] == chunk.max()
        assert agg["step"].values[b] == pytest.approx(6 * b + 2.5)
    agg = plots.aggregate(series(v[:7]), n_bins=50)
    assert agg.attrs["grouped_by"] == "step"  # fewer steps than bins: one step each
    ax = plots.plot_band(series(v), n_bins=50)
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "mean per bin of 6 steps" in labels and "min-max per bin of 6 steps" in labels
    plt.close("all")


def test_undetermined_phase_is_visible_in_the_legend():
    labs = np.array(["undetermined"] * 3 + ["smooth"] * 10 + ["zigzag"] * 10 + ["undetermined"] * 3)
    ax = plots.plot_phases(series(np.zeros(len(labs))).copy(data=labs))
    handle = next(h for h, t in zip(ax.get_legend().legend_handles, ax.get_legend().get_texts())
                  if t.get_text() == "undetermined")
    assert handle.get_hatch()
    edge = np.asarray(handle.get_edgecolor())[:3]
    assert (edge < 0.9).any()  # not white on white
    plt.close("all")


def test_eta_star_symlog_labels_negative_ticks():
    steps = np.arange(200)
    eta = np.where(steps < 100, 20.0, -3.0)
    r = xr.Dataset({"eta_star": ("step", eta)}, coords={"step": steps, "lr": ("step", np.full(200, 0.1))})
    ax = plots.plot_eta_star(r)
    ax.figure.canvas.draw()
    ticks = ax.get_yticks()
    labels = {round(t, 12): lab.get_text() for t, lab in zip(ticks, ax.get_yticklabels())}
    neg = [t for t in labels if t < 0]
    assert neg and all(labels[t].startswith("-") and "10^" in labels[t] for t in neg), labels
    assert any(t > 0 for t in labels) and labels.get(0.0) == "0"
    plt.close("all")


def test_setting_text_is_cut_between_items():
    opt = {"class": "SGD", "defaults": {"lr": 0.1, "momentum": 0.0}, "param_groups": [{"lr": 0.1}]}
    assert setting_text(opt) == "class=SGD, lr=0.1, momentum=0.0"
    model = {"class": "Net", "repr": "Net(\n  (fc): Linear(in_features=3, out_features=2)\n)", "n_params": 8}
    assert setting_text(model) == "class=Net, n_params=8"
    long = {f"key{i}": "value_" + "x" * 10 for i in range(40)}
    text = setting_text(long, limit=100)
    head, _, tail = text.partition(" ... (+")
    items = head.split(", ")
    assert all(it in {f"key{i}=value_" + "x" * 10 for i in range(40)} for it in items)  # whole items only
    assert len(head) <= 100 and tail.startswith(f"{40 - len(items)} more")


def test_full_matrix_cells_get_pixels_and_a_zoom():
    assert _cell_dpi(600, 6.0) * 0.8 * 6.0 >= 3 * 600
    assert _cell_dpi(20, 6.0) == 110
    steps = np.arange(300)
    mc = xr.DataArray(np.zeros(300), dims="step", coords={"step": steps})
    labels = np.array(["smooth"] * 120 + ["zigzag"] * 40 + ["random"] * 10 + ["zigzag"] * 130)
    z = _zoom_block(labels, mc, steps, 40)
    assert z.stop - z.start == 40 and 170 <= z.start and z.stop <= 300  # inside the longest zigzag stretch
    assert _zoom_block(labels, mc, steps[:30], 40) is None
