"""Phase labels, zigzag share of the loss decrease, GAWU switch point."""

import numpy as np
import pytest
import xarray as xr

import analysis as ga
from tests.helpers_stores import make_store, slow_corr


def series(values, loss=None):
    steps = np.arange(len(values))
    coords = {"step": steps}
    if loss is not None:
        coords["loss"] = ("step", np.asarray(loss, dtype=float))
    return xr.DataArray(np.asarray(values, dtype=float), dims="step", coords=coords, name="mean_corr")


def test_labels_and_thresholds():
    s = series([0.9, 0.5, 0.2, -0.1, -0.5, -0.8, np.nan])
    assert ga.phase_labels(s).values.tolist() == ["smooth", "smooth", "random", "random", "zigzag", "zigzag",
                                                  "undetermined"]
    lab = ga.phase_labels(s, smooth=0.8, zigzag=-0.7, random=0.15)
    assert lab.values.tolist() == ["smooth", "undetermined", "undetermined", "random", "undetermined", "zigzag",
                                   "undetermined"]
    assert lab.attrs["smooth_threshold"] == 0.8 and lab.name == "phase"
    with pytest.raises(ga.AnalysisError, match="zigzag must be below smooth"):
        ga.phase_labels(s, smooth=-0.5, zigzag=0.5)


def test_zigzag_share():
    lab = ga.phase_labels(series([0.9, -0.9, -0.9, 0.9, 0.0], loss=[10, 8, 5, 4, 2]))
    # decreases: 0->1: 2 (smooth), 1->2: 3 (zigzag), 2->3: 1 (zigzag), 3->4: 2 (smooth); total 8
    assert ga.zigzag_share(lab) == pytest.approx(4 / 8)
    assert np.isnan(ga.zigzag_share(ga.phase_labels(series([0.9, -0.9], loss=[1, 2]))))


def slow_record_low_share(labels, losses):
    """Loop version of the record_low rule: only new lows count, at the step that reaches them."""
    low, total, zz = losses[0], 0.0, 0.0
    for t in range(len(losses) - 1):
        gain = max(0.0, low - losses[t + 1])
        low = min(low, losses[t + 1])
        total += gain
        if labels[t] == "zigzag":
            zz += gain
    return zz / total if total > 0 else float("nan")


def test_zigzag_share_rules_with_a_spike():
    # a catapult: the rise is labelled zigzag (1->2: +6), the fall "random" (2->3: -7);
    # the net rule gives a negative share, record_low counts only the new low of 3->4 etc.
    corr = [0.9, -0.9, 0.0, -0.9, -0.9, 0.9, 0.0]
    loss = [10.0, 8.0, 14.0, 7.0, 5.0, 4.5, 2.0]
    lab = ga.phase_labels(series(corr, loss=loss))
    L = lab.values.tolist()
    net = sum(loss[t] - loss[t + 1] for t in range(6) if L[t] == "zigzag") / (loss[0] - loss[-1])
    assert ga.zigzag_share(lab, rule="net") == pytest.approx(net) and net < 0
    got = ga.zigzag_share(lab)
    assert got == pytest.approx(slow_record_low_share(L, loss), rel=1e-12)
    # new lows: 10->8 smooth (2), 8->7 at step 2 "random" (1), 7->5 zigzag (2), 5->4.5 zigzag (0.5), 4.5->2 smooth (2.5)
    assert got == pytest.approx(2.5 / 8) and 0 <= got <= 1
    rng = np.random.default_rng(5)
    for _ in range(20):  # random walks with spikes: always in [0, 1], equal to the loop
        n = 40
        loss = 10 + np.cumsum(rng.normal(-0.2, 1.0, n))
        lab = ga.phase_labels(series(rng.uniform(-1, 1, n), loss=loss))
        got = ga.zigzag_share(lab)
        want = slow_record_low_share(lab.values.tolist(), loss.tolist())
        if np.isnan(want):
            assert np.isnan(got)
        else:
            assert got == pytest.approx(want, rel=1e-12) and 0 <= got <= 1
    with pytest.raises(ga.AnalysisError, match="rule='sum'"):
        ga.zigzag_share(lab, rule="sum")


def test_gawu_switch():
    assert ga.gawu_switch(series([0.5, 0.4, np.nan, 0.0, -0.2, 0.3, -0.1])) == 4
    assert ga.gawu_switch(series([-0.5, -0.4, 0.2])) is None


def test_phases_end_to_end(tmp_path):
    d = make_store(tmp_path / "run.zarr", steps=14, seed=11)
    ph = ga.phases(d.path, h=3)
    want = [np.mean([slow_corr(d.grads[k], d.grads[k + 1]), slow_corr(d.grads[k + 1], d.grads[k + 2])])
            for k in range(12)]
    np.testing.assert_allclose(ph.mean_corr.values[:12], want, atol=1e-10)
    assert ph.phase.values.tolist() == ga.phase_labels(ph.mean_corr).values.tolist()
    assert ph.attrs["zigzag_share"] == pytest.approx(ga.zigzag_share(ph.phase))
    assert ph.attrs["zigzag_share_rule"] == "record_low"
    assert ph.attrs["zigzag_share_net"] == pytest.approx(ga.zigzag_share(ph.phase, rule="net"))
    switch = ga.gawu_switch(ph.mean_corr)
    assert ph.attrs["gawu_step"] == (-1 if switch is None else switch)
    lag1 = ga.phases(d.path, statistic="lag1")
    assert "lag_corr" in lag1 and lag1.sizes["step"] == 13
    with pytest.raises(ga.AnalysisError, match="statistic"):
        ga.phases(d.path, statistic="lag7")
