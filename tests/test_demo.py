"""`gradtrace demo` end to end through the real entry point (quick settings), as a new user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import analysis as ga

ROOT = Path(__file__).resolve().parent.parent


def test_demo_quick_writes_store_and_report(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-m", "gradtrace.cli", "demo", "--quick", "--out", str(out)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    store, index = out / "run.zarr", out / "report" / "index.html"
    assert f"store:  {store}" in p.stdout and f"report: {index}" in p.stdout
    assert "step 150/150" in p.stdout + p.stderr  # progress was shown
    html = index.read_text()
    for fig in ("fig1_overview.png", "corr_full.png", "sign_shift.png", "lags.png", "phases.png",
                "rsi_eb_gamma.png", "eta_star_distance.png"):
        assert f'src="{fig}"' in html and (out / "report" / fig).stat().st_size > 10_000, fig
    # The demo's point: the report shows a smooth phase, then a zigzag phase.
    run = ga.open_run(store)
    assert len(run.grad_steps) == 150 and run.final_step == 150
    lag1 = ga.lag_series(run, 1).values
    assert np.nanmean(lag1[:20]) > 0.8   # smooth at the start
    assert np.nanmean(lag1[-30:]) < -0.8  # zigzag at the end
    assert "zigzag" in html
    # the zigzag share on the demo run: the record_low rule, in [0, 1], equals a loop over the losses
    ph = ga.phases(run, h=5)
    lab, loss = ph.phase.values.tolist(), ph["loss"].values.tolist()
    low, total, zz = loss[0], 0.0, 0.0
    for t in range(len(loss) - 1):
        gain = max(0.0, low - loss[t + 1])
        low = min(low, loss[t + 1])
        total += gain
        zz += gain if lab[t] == "zigzag" else 0.0
    assert 0 <= ph.attrs["zigzag_share"] <= 1
    assert abs(ph.attrs["zigzag_share"] - zz / total) <= 1e-12
