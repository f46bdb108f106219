"""The analysis stage works with torch blocked (Dask workers on a cluster have no torch)."""

import subprocess
import sys
import textwrap

import numpy as np

from tests.helpers_stores import make_store

SCRIPT = textwrap.dedent(
    """
    import sys
    sys.modules["torch"] = None  # any `import torch` now raises ImportError
    import numpy as np
    import analysis as ga

    path, npy = sys.argv[1], sys.argv[2]
    run = ga.open_run(path)
    assert np.isfinite(ga.corr_matrix(run).values).all()
    ga.corr_window(run, 0, h=3)
    ga.corr_windows(run, h=3)
    ga.lag_series(run, [1, 2])
    ga.mean_corr(run, h=3)
    ga.sign_shift_matrix(run)
    ga.sign_shift_window(run, 0, h=3)
    ga.sign_shift_lag(run, 1)
    r = ga.rsi(run, exclude_tail=1)
    ga.by_epoch(r)
    ga.rsi(run, reference=npy)
    ga.rsi(run, reference=slice(0, 3), params="fc*")
    ga.phases(run, h=3)
    ga.layer_table(run)
    ga.balancedness(run)
    try:
        ga.rsi(run, reference=npy.replace(".npy", ".pt"))
    except ga.BadReferenceError as err:
        assert "needs torch" in str(err), err
    else:
        raise AssertionError("a checkpoint reference without torch must be a clear error")
    assert sys.modules["torch"] is None
    print("ok")
    """
)


def test_every_metric_runs_with_torch_blocked(tmp_path):
    data = make_store(tmp_path / "run.zarr", steps=8)
    np.save(tmp_path / "ref.npy", data.final_weight)
    (tmp_path / "ref.pt").write_bytes(b"not really a checkpoint")
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(data.path), str(tmp_path / "ref.npy")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
