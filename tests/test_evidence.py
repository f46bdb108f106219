"""Evidence that gradtrace's numbers show what the source papers describe, on CPU-sized runs.

Every test records a run with :func:`experiments.recipes.run_recipe` and reads it back only through
the analysis API (``analysis.open_run`` and the metric functions), as a user would. The
settings are the CPU presets of ``experiments/recipes.py`` (digits, no download), one thread each
(so that a busy 2-core machine does not make them crawl), shared through module-scoped
fixtures. docs/reproduction.md shows the same runs at full length with figures.

Thresholds: each assertion states what was measured on this machine (seed 0, torch 2.x CPU)
and leaves a margin for BLAS/platform differences without letting the opposite phenomenon
pass (e.g. "strongly negative" is asserted as <= -0.8 where -0.93 is measured, and a
smooth phase sits at +0.99).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import analysis as ga
from gradtrace_format.format import read_header
from experiments.recipes import load_config, run_recipe

warnings.filterwarnings("ignore", message="Consolidated metadata")

pytestmark = pytest.mark.slow


def _record(tmp_path_factory, name: str, preset: str, **overrides):
    cfg = load_config(preset, num_threads=1, **overrides)
    path = tmp_path_factory.mktemp("evidence") / f"{name}.zarr"
    return run_recipe(cfg, path, progress=False)


def _longest_run(mask: np.ndarray) -> tuple[int, int]:
    """(start, stop) positions of the longest stretch of True in ``mask``."""
    best, start = (0, 0), None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            if i - start > best[1] - best[0]:
                best = (start, i)
            start = None
    return best


# --------------------------------------------------------------------------- (a), (b) zigzag
@pytest.fixture(scope="module")
def zigzag_store(tmp_path_factory):
    # "demo-quick": cnn3 width 16 (23,946 params) on all 1,437 standardized digits,
    # full-batch GD at lr 0.15, 150 steps, every step recorded (~5 s on one core).
    return _record(tmp_path_factory, "zigzag", "demo-quick")


@pytest.fixture(scope="module")
def smooth_store(tmp_path_factory):
    # the same network, data, seed and steps at a 100x smaller learning rate
    return _record(tmp_path_factory, "smooth", "demo-quick", lr=0.0015)


def test_large_lr_full_batch_gd_turns_from_smooth_to_zigzag(zigzag_store):
    run = ga.open_run(zigzag_store)
    lag1 = ga.lag_series(run, 1)
    lag2 = ga.lag_series(run, 2)
    flips = ga.sign_shift_lag(run, 1)["sign_shift"]
    ph = ga.phases(run, h=5)

    # Smooth phase first (zigzag paper, section 3.1): measured >= +0.98 on steps 0-29.
    assert float(lag1.sel(step=slice(0, 29)).min()) > 0.9

    # The zigzag stretch: the longest run of steps whose mean correlation (eq. 3, h = 5) is
    # <= -0.5 (analysis.phases' default threshold). Measured: steps 85-145 (61 steps).
    lo, hi = _longest_run(ph["phase"].values == "zigzag")
    steps = ph["step"].values[lo:hi]
    assert len(steps) >= 30, f"zigzag stretch only {len(steps)} steps: {steps}"
    zz = slice(int(steps[0]), int(steps[-1]))

    adjacent = float(lag1.sel(step=zz).mean())
    lag_two = float(lag2.sel(step=zz).mean())
    flipped = float(flips.sel(step=zz).mean())
    print(f"zigzag stretch {zz.start}-{zz.stop}: mu(t,t+1) {adjacent:+.3f}, mu(t,t+2) {lag_two:+.3f}, "
          f"sign flips {flipped:.1f}%")
    # Measured: adjacent -0.93, lag 2 +0.97. "Strongly negative" / "positive" with margin.
    assert adjacent <= -0.8
    assert lag_two >= 0.7
    # Measured ~64% of the entries flip sign between adjacent steps (the paper reports ~90%
    # for its CIFAR-10 CNN at mu ~ -0.9; this small CNN on digits shows ~2/3). Random signs
    # would give 50%, a smooth phase ~2% (see the 100x smaller lr below).
    assert flipped >= 55.0
    # Most of the recorded steps after the transition are zigzag, and the loss still falls
    # there (2.3 -> 0.1 overall; the paper: "a substantial part of the loss decrease").
    loss = run.ds["loss"]
    assert float(loss.sel(step=zz.stop)) < float(loss.sel(step=zz.start)) < float(loss.sel(step=0))


def test_small_lr_stays_smooth(smooth_store, zigzag_store):
    run = ga.open_run(smooth_store)
    lag1 = ga.lag_series(run, 1)
    flips = ga.sign_shift_lag(run, 1)["sign_shift"]
    # Measured: every adjacent correlation >= 0.99 and ~1% sign flips over all 150 steps.
    assert float(lag1.min()) > 0.9
    assert float(flips.mean()) < 10.0
    assert (ga.phases(run, h=5)["phase"].values[:-4] == "smooth").all()  # last 4: window incomplete
    # ...while the 100x larger rate, same steps, ended in zigzag:
    assert float(ga.lag_series(ga.open_run(zigzag_store), 1).isel(step=slice(-20, None)).mean()) < -0.8


# --------------------------------------------------------------------------- (c) No Wrong Turns
@pytest.fixture(scope="module")
def sgd_store(tmp_path_factory):
    # "nwt-cnn3-digits": cnn3 width 8 on standardized digits, plain SGD, batch 64, lr 0.1,
    # 8 epochs of 23 minibatches = 184 steps, every step recorded (~2 s).
    return _record(tmp_path_factory, "sgd", "nwt-cnn3-digits")


def _erratic(gamma: np.ndarray) -> tuple[float, float]:
    """(share of consecutive steps where gamma changes sign, std of the step-to-step change of
    gamma relative to mean |gamma|): 0 and small for a steady gamma, large for an erratic one."""
    g = gamma[np.isfinite(gamma)]
    changes = float(np.mean(np.sign(g[1:]) != np.sign(g[:-1])))
    return changes, float(np.std(np.diff(g)) / np.mean(np.abs(g)))


def test_minibatch_sgd_gamma_positive_on_almost_every_step(sgd_store):
    run = ga.open_run(sgd_store)
    # The paper's protocol: reference = final iterate, last epoch excluded.
    r = ga.rsi(run, reference="final", exclude_tail="epoch")
    gamma = r["gamma"].values
    assert len(gamma) == 184 - 23 and np.isfinite(gamma).all()
    # Measured: gamma > 0 on 100% of the 161 steps, mean 0.30. "Large majority": >= 95%.
    assert np.mean(gamma > 0) >= 0.95
    # RSI > 0 exactly when gamma > 0 (gamma = RSI / EB with EB > 0).
    np.testing.assert_array_equal(r["rsi"].values > 0, gamma > 0)
    # Steady, not erratic (contrast with ALM below): measured 0 sign changes, relative
    # step-to-step spread 0.36.
    changes, spread = _erratic(gamma)
    assert changes <= 0.05 and spread < 0.5


# --------------------------------------------------------------------------- (d) counter-examples
def test_sm_gamma_negative_on_a_substantial_share(tmp_path_factory):
    # "sm": ||w||^2 + 100 sum sin(a_i w_i)^2, d = 100, full-batch GD lr 0.005, 300 steps.
    run = ga.open_run(_record(tmp_path_factory, "sm", "sm"))
    gamma = ga.rsi(run, exclude_tail=1)["gamma"].values
    share = float(np.mean(gamma < 0))
    print(f"SM: gamma < 0 on {share:.0%} of steps")
    # Measured 30% (seeds 0-3: 19-40%). A network under SGD shows 0% (test above); 10% is
    # "substantial" and far from it. (Coordinates with 2 + 200 a_i^2 > 2 / lr keep hopping
    # between the sinusoid's basins, so their gradients point away from w_T.)
    assert share >= 0.10


def test_alm_gamma_is_erratic_across_minibatches(tmp_path_factory, sgd_store):
    # "alm": asymmetric linear model, d = 20, 512 samples, RMSE on minibatches of 16, SGD
    # lr 0.05, 20 epochs = 640 steps.
    run = ga.open_run(_record(tmp_path_factory, "alm", "alm"))
    gamma = ga.rsi(run, exclude_tail="epoch")["gamma"].values
    changes, spread = _erratic(gamma)
    _, cnn_spread = _erratic(ga.rsi(ga.open_run(sgd_store), exclude_tail="epoch")["gamma"].values)
    print(f"ALM: sign changes {changes:.0%}, relative spread {spread:.2f} (CNN {cnn_spread:.2f})")
    # Erratic = gamma jumps from minibatch to minibatch by about its own size and keeps
    # changing sign. Measured: sign changes between consecutive steps 27%, relative spread
    # 1.0 (the CNN under SGD: 0% and 0.36).
    assert changes >= 0.10
    assert spread >= 0.6 and spread >= 2 * cnn_spread
    assert np.mean(gamma < 0) >= 0.05  # measured 17%: negative gamma, a "wrong turn"


# --------------------------------------------------------------------------- (e) GAWU
GAWU_RUN = dict(n_train=512, batch_size=128, steps=70)


@pytest.fixture(scope="module")
def gawu_stores(tmp_path_factory):
    # "gawu-resnet_small-digits" made smaller: resnet_small (5k params, BatchNorm) on 512
    # standardized digits, SGD batch 128, GAWU omega 0.1 from eta_0 0.001, 70 steps; twice.
    return [_record(tmp_path_factory, f"gawu{i}", "gawu-resnet_small-digits", **GAWU_RUN) for i in range(2)]


def test_gawu_finds_reports_and_reproduces_its_switch(gawu_stores):
    first, second = gawu_stores
    s1 = read_header(first).settings["training"]["switch_step"]
    s2 = read_header(second).settings["training"]["switch_step"]
    print(f"GAWU switch step: {s1} (again: {s2})")
    # Found (measured: step 53 with one thread) and reproducible with the fixed seed.
    assert s1 is not None and 10 <= s1 < GAWU_RUN["steps"] - 5
    assert s1 == s2
    a, b = ga.open_run(first), ga.open_run(second)
    np.testing.assert_array_equal(a.ds["loss"].values, b.ds["loss"].values)

    # The recorded learning rate shows the two phases: exponential warm-up up to the switch,
    # cosine decay after it.
    lr = a.ds["lr"].sel(step=slice(0, GAWU_RUN["steps"] - 1)).values
    np.testing.assert_allclose(lr[: s1 + 1], 0.001 * np.exp(0.1 * np.arange(s1 + 1)), rtol=1e-6)
    assert np.all(np.diff(lr[s1 + 1:]) < 0)

    # The same switch offline, from the recorded gradients through the analysis API:
    # eq. 3's window k..k+4 ends at the online step s, so k = s - (h - 1).
    m = ga.mean_corr(a, h=5)
    assert ga.gawu_switch(m) == s1 - 4
    assert float(m.sel(step=s1 - 5)) > 0 > float(m.sel(step=s1 - 4))
