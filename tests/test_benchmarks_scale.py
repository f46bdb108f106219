"""The scaling and cluster benchmark scripts: their helpers, and each end to end at a tiny size."""

import numpy as np
import pytest

from benchmarks import cluster, scaling


def test_fit_exponent_recovers_powers():
    x = np.array([128, 256, 512])
    assert scaling.fit_exponent(x, 3e-9 * x**2) == pytest.approx(2.0)
    assert scaling.fit_exponent(x, 5.0 * x) == pytest.approx(1.0)


def test_norm_per_element_and_per_gram_entry():
    assert scaling.norm("lag", 1.0, 1000, 1000) == pytest.approx(1e3)  # ns per T*d
    assert scaling.norm("corr", 1.0, 1000, 1000) == pytest.approx(1.0)  # ns per T^2*d
    assert scaling.pow2(2**19) == "2^19" and scaling.pow2(1000) == "1000"


def test_scaling_tiny(tmp_path, capsys):
    args = ["--Ts", "8,16,32", "--d", "4096", "--ds", "2048,4096,8192", "--T", "16", "--repeat", "1",
            "--cache", str(tmp_path)]
    assert scaling.main(args) == 0
    out = capsys.readouterr().out
    assert "### T grows, d = 2^12" in out and "### d grows, T = 16" in out
    assert "| corr_matrix (float64 Gram) |" in out and "| rsi, new reference |" in out
    assert len(list(tmp_path.glob("analysis-T*-d*.zarr"))) == 5  # cached, shared point written once
    assert scaling.main(args) == 0  # the second run reuses the stores
    assert "writing the benchmark store" not in capsys.readouterr().out


@pytest.mark.slow
def test_cluster_tiny(tmp_path, capsys):
    assert cluster.main(["--T", "8", "--d", "8192", "--env", "tuned", "--repeat", "1", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "speed-up, 2 processes vs 1" in out and "(decode threads 1)" in out
    assert "MALLOC_TRIM_THRESHOLD_=None" in out  # the tuned workers run without dask's setting
