"""First-hour fixes: no zarr warning on close, the README Quickstart runs as written."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["MPLBACKEND"] = "Agg"
    return env


def test_recorder_close_prints_no_zarr_warning(tmp_path):
    code = (
        "import torch\n"
        "from capture import Recorder\n"
        "m = torch.nn.Linear(3, 2); opt = torch.optim.SGD(m.parameters(), lr=0.1)\n"
        f"with Recorder(m, {str(tmp_path / 'w.zarr')!r}, optimizer=opt) as rec:\n"
        "    for s in range(2):\n"
        "        m(torch.ones(4, 3)).sum().backward(); rec.record(s); opt.step(); opt.zero_grad()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True,
                         env=_env(), timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout
    assert "Consolidated metadata" not in out.stderr, out.stderr


def quickstart_code() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, "no python block in the README Quickstart"
    return m.group(1)


def test_readme_quickstart_runs_as_written(tmp_path):
    out = subprocess.run([sys.executable, "-W", "default", "-c", quickstart_code()], capture_output=True, text=True,
                         cwd=tmp_path, env=_env(), timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    # no warning of ours or zarr's (dependencies' Deprecation/FutureWarnings are not the Quickstart's)
    assert "UserWarning" not in out.stderr and "RuntimeWarning" not in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "runs" / "quickstart.zarr").is_dir()


# ------------------------------------------------------------------------------ two-step calls

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import analysis as ga  # noqa: E402
from tests.helpers_stores import make_store, slow_corr, slow_sign_shift  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    base = tmp_path_factory.mktemp("ux")
    return make_store(base / "s.zarr", steps=[0, 1, 2, 5, 6, 9], shapes=[("a", (7, 5)), ("b", (11,))], seed=4)


def test_corr_of_two_steps_matches_numpy(store):
    run = ga.open_run(store.path)
    idx = {int(s): i for i, s in enumerate(store.steps)}
    for j, k in ((0, 9), (9, 0), (2, 5), (6, 6)):
        got = ga.corr(run, j, k)
        want = slow_corr(store.grads[idx[j]], store.grads[idx[k]])
        assert got.ndim == 0 and int(got["step_j"]) == j and int(got["step_k"]) == k
        assert math.isclose(float(got), want, rel_tol=1e-12, abs_tol=1e-15)
    sl = store.tensor_slice("b")
    got = float(ga.corr(run, 1, 5, params="b"))
    assert math.isclose(got, slow_corr(store.grads[idx[1], sl], store.grads[idx[5], sl]), rel_tol=1e-12)
    # the same number as the matrix gives
    m = ga.corr_matrix(run, [1, 5])
    assert math.isclose(float(ga.corr(run, 1, 5)), float(m.sel(step_i=1, step_j=5)), rel_tol=1e-12)


def test_sign_shift_of_two_steps_matches_numpy(store):
    run = ga.open_run(store.path)
    idx = {int(s): i for i, s in enumerate(store.steps)}
    for j, k in ((0, 1), (5, 9)):
        got = ga.sign_shift(run, j, k)
        shift, zero = slow_sign_shift(store.grads[idx[j]], store.grads[idx[k]])
        assert math.isclose(float(got["sign_shift"]), shift, rel_tol=1e-12)
        assert math.isclose(float(got["zero_share"]), zero, rel_tol=1e-12, abs_tol=1e-12)
        assert int(got["step_j"]) == j and int(got["step_k"]) == k


def test_missing_gradient_step_never_offers_the_final_iterate(store):
    run = ga.open_run(store.path)
    assert store.final_step == 10
    with pytest.raises(ga.StepNotFoundError) as err:
        ga.corr(run, 11, 9)
    msg = str(err.value)
    assert "Nearest recorded gradient steps: 5, 6, 9 " in msg and "final iterate (weights only) at 10" in msg
    with pytest.raises(ga.StepNotFoundError, match="final iterate"):
        ga.sign_shift(run, 10, 9)
    with pytest.raises(ga.StepNotFoundError, match="Nearest recorded gradient steps: 0, 1, 2, 5, 6, 9"):
        ga.corr_window(run, 3, h=2)


def test_run_repr_does_not_count_the_final_iterate(store):
    text = repr(ga.open_run(store.path))
    assert "6 gradient steps 0..9 + final iterate at 10" in text, text
