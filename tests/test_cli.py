"""The ``gradtrace`` command through its real entry point (subprocesses), against the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

import analysis as ga
from tests.helpers_stores import make_store

ROOT = Path(__file__).resolve().parent.parent


def gradtrace(*args, check=True, env=None, timeout=240):
    """Run ``python -m gradtrace.cli ARGS`` (what the ``gradtrace`` script runs)."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    e.pop("GRADTRACE_DEBUG", None)
    p = subprocess.run([sys.executable, "-m", "gradtrace.cli", *map(str, args)], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"gradtrace {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cli") / "run.zarr", steps=16, steps_per_epoch=4)


@pytest.fixture(scope="module")
def sparse_store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("cli") / "sparse.zarr", steps=range(0, 100, 10))


def _json_var(path: Path, name: str) -> np.ndarray:
    d = json.loads(path.read_text())
    v = d["data_vars"][name]["data"]
    return np.array([[np.nan if x is None else x for x in row] for row in v] if isinstance(v[0], list)
                    else [np.nan if x is None else x for x in v], dtype=float)


def test_help_lists_subcommands():
    p = gradtrace("--help")
    for sub in ("demo", "record", "info", "corr", "signs", "rsi", "report", "phases", "layers"):
        assert sub in p.stdout
    for sub in ("demo", "record", "info", "corr", "signs", "rsi", "report", "phases", "layers"):
        assert gradtrace(sub, "--help").stdout.startswith("usage: gradtrace " + sub)


def test_info(store):
    p = gradtrace("info", store.path)
    assert "16 gradient steps" in p.stdout and "conv.weight" in p.stdout and "lossless" in p.stdout
    info = json.loads(gradtrace("info", store.path, "--json").stdout)
    assert info["n_gradient_steps"] == 16 and info["final_iterate_step"] == 16
    assert info["n_params"] == store.d


def test_corr_matrix_json_matches_api(store, tmp_path):
    out = tmp_path / "corr.json"
    gradtrace("corr", store.path, "--steps", "2:9", "-o", out)
    api = ga.corr_matrix(ga.open_run(store.path), slice(2, 9))
    np.testing.assert_allclose(_json_var(out, "correlation"), api.values, rtol=0, atol=1e-12)


def test_corr_lag_mean_window_and_formats(store, tmp_path):
    run = ga.open_run(store.path)
    gradtrace("corr", store.path, "--lag", "2", "-o", tmp_path / "lag.csv")
    import pandas as pd

    df = pd.read_csv(tmp_path / "lag.csv")
    np.testing.assert_allclose(df[ga.lag_series(run, 2).name].values, ga.lag_series(run, 2).values, atol=1e-12)
    gradtrace("corr", store.path, "--mean", "4", "-o", tmp_path / "mean.nc")
    nc = xr.open_dataset(tmp_path / "mean.nc")
    api = ga.mean_corr(run, 4)
    np.testing.assert_allclose(nc[api.name].values, api.values, atol=1e-12)
    p = gradtrace("corr", store.path, "--window", "3", "--h", "4")
    assert "1.00" in p.stdout
    gradtrace("corr", store.path, "--params", "fc*", "--lag", "1", "-o", tmp_path / "fc.json")
    np.testing.assert_allclose(_json_var(tmp_path / "fc.json", "correlation" if "correlation" in json.loads(
        (tmp_path / "fc.json").read_text())["data_vars"] else ga.lag_series(run, 1, params="fc*").name),
        ga.lag_series(run, 1, params="fc*").values, atol=1e-12)


def test_signs_json_matches_api(store, tmp_path):
    out = tmp_path / "signs.json"
    gradtrace("signs", store.path, "--steps", "0:7", "-o", out)
    api = ga.sign_shift_matrix(ga.open_run(store.path), slice(0, 7))
    np.testing.assert_allclose(_json_var(out, "sign_shift"), api["sign_shift"].values, atol=1e-12)
    p = gradtrace("signs", store.path, "--lag", "1")
    assert "zero at either step" in p.stdout


def test_rsi_json_matches_api(store, tmp_path):
    out = tmp_path / "rsi.json"
    p = gradtrace("rsi", store.path, "--ref", "step:10", "--exclude-tail", "2", "-o", out)
    assert "gamma" in p.stdout
    api = ga.rsi(ga.open_run(store.path), 10, exclude_tail=2)
    for v in ("rsi", "eb", "gamma", "eta_star", "distance"):
        np.testing.assert_allclose(_json_var(out, v), api[v].values, atol=1e-12, equal_nan=True)
    np.save(tmp_path / "ref.npy", store.final_weight)
    gradtrace("rsi", store.path, "--ref", tmp_path / "ref.npy", "-o", tmp_path / "rsi2.json")
    api2 = ga.rsi(ga.open_run(store.path), "final")
    np.testing.assert_allclose(_json_var(tmp_path / "rsi2.json", "gamma"), api2["gamma"].values, atol=1e-12,
                               equal_nan=True)


def test_phases_and_layers(store, tmp_path):
    p = gradtrace("phases", store.path, "--h", "3")
    assert "steps per phase" in p.stdout and "GAWU" in p.stdout and "rule record_low" in p.stdout
    p = gradtrace("phases", store.path, "--h", "3", "--share-rule", "net")
    assert "rule net" in p.stdout
    p = gradtrace("layers", store.path, "-o", tmp_path / "layers.csv")
    assert "conv.weight" in p.stdout and (tmp_path / "layers.csv").exists()


def test_report(store, tmp_path):
    p = gradtrace("report", store.path, "-o", tmp_path / "rep")
    index = tmp_path / "rep" / "index.html"
    assert index.exists() and str(index) in p.stdout
    html = index.read_text()
    for fig in ("fig1_overview.png", "corr_full.png", "sign_shift.png", "rsi_eb_gamma.png", "phases.png"):
        assert fig in html and (tmp_path / "rep" / fig).stat().st_size > 5000
    assert (tmp_path / "rep" / "results" / "corr_full.nc").exists()


# ----------------------------------------------------------------------------- bad input


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stderr.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("gradtrace: error:"), p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_store(tmp_path):
    for sub in ("info", "corr", "signs", "rsi", "report"):
        _one_line_error(gradtrace(sub, tmp_path / "nope.zarr", check=False), "nope.zarr")


def test_not_a_store(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(gradtrace("corr", tmp_path / "empty", check=False), "not a gradtrace run store")


def test_lag_not_recorded(sparse_store):
    p = gradtrace("corr", sparse_store.path, "--lag", "1", check=False)
    _one_line_error(p, "10")  # the message lists the lags that exist (10, 20, ...)


def test_malformed_ref(store, tmp_path):
    _one_line_error(gradtrace("rsi", store.path, "--ref", "step:abc", check=False), "step:N")
    _one_line_error(gradtrace("rsi", store.path, "--ref", "mean:1", check=False), "mean:A:B")
    _one_line_error(gradtrace("rsi", store.path, "--ref", tmp_path / "no.npy", check=False), "no.npy")
    np.save(tmp_path / "short.npy", np.zeros(3, np.float32))
    _one_line_error(gradtrace("rsi", store.path, "--ref", tmp_path / "short.npy", check=False), "3")
    bad = np.array(store.final_weight, copy=True)
    bad[0] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    _one_line_error(gradtrace("rsi", store.path, "--ref", tmp_path / "nan.npy", check=False), "NaN")


def test_bad_steps_and_output(store, tmp_path):
    _one_line_error(gradtrace("corr", store.path, "--steps", "1:x", check=False), "--steps")
    _one_line_error(gradtrace("corr", store.path, "--steps", "1000", check=False), "1000")
    _one_line_error(gradtrace("corr", store.path, "-o", tmp_path / "out.xlsx", check=False), ".xlsx")


def test_analysis_commands_do_not_import_torch(store, tmp_path):
    """Blocking torch (as on a cluster node without it) must not break any analysis subcommand."""
    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {"PYTHONPATH": f"{block}{os.pathsep}{ROOT}"}
    for args in (("info", store.path), ("corr", store.path, "--lag", "1"), ("signs", store.path),
                 ("rsi", store.path), ("phases", store.path)):
        gradtrace(*args, env=env)


def test_signs_denominator_flag(store, tmp_path):
    out = tmp_path / "signs_all.json"
    p = gradtrace("signs", store.path, "--lag", "1", "--denominator", "all", "-o", out)
    assert "denominator=all" in p.stdout
    api = ga.sign_shift_lag(ga.open_run(store.path), 1, denominator="all")
    np.testing.assert_allclose(_json_var(out, "sign_shift"), api["sign_shift"].values, atol=1e-12)
    assert json.loads(out.read_text())["attrs"]["denominator"] == "all"


def test_rsi_direction_flag(store, tmp_path):
    out = tmp_path / "rsi_wd.json"
    p = gradtrace("rsi", store.path, "--direction", "gradient+wd", "--weight-decay", "0.01", "-o", out)
    assert "direction: gradient+wd" in p.stdout
    api = ga.rsi(ga.open_run(store.path), direction="gradient+wd", weight_decay=0.01)
    np.testing.assert_allclose(_json_var(out, "gamma"), api["gamma"].values, rtol=1e-12)

def test_output_checked_before_the_computation(store, tmp_path):
    # a step that is not recorded would fail the computation: the -o error must come first
    _one_line_error(gradtrace("corr", store.path, "--steps", "1000", "-o", tmp_path / "out.xlsx", check=False),
                    "unknown extension '.xlsx'")
    missing = tmp_path / "nope" / "deeper"
    _one_line_error(gradtrace("corr", store.path, "--steps", "1000", "-o", missing / "out.json", check=False),
                    "does not exist")
    _one_line_error(gradtrace("report", store.path, "-o", missing / "report", check=False), "does not exist")
    assert not (tmp_path / "nope").exists()


def test_closed_pipe_is_silent(store):
    """`gradtrace info STORE | head` when head has gone: no BrokenPipeError traceback."""
    e = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "gradtrace.cli", "info", str(store.path), "--json"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT)
    p.stdout.close()  # the reader goes away before the first line is written
    _, err = p.communicate(timeout=240)
    assert b"BrokenPipe" not in err and b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
    assert p.returncode == 1
