"""benchmarks/index.py end to end at its quick size (T=64, d=2^16): the script runs, the index
answers every query and equals the pass."""

from benchmarks import index as bench


def test_index_benchmark_quick(tmp_path, capsys):
    assert bench.main(["--quick", "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| `gradtrace index --rebuild` (all 65 rows) |" in out
    assert "index equal to the pass within 1e-10: yes" in out
    for q in ("lag_series(1)", "mean_corr(h=5)", "corr_window(", "rsi(reference=", 'rsi("final")'):
        assert f"| {q}" in out
    assert "| 100,000 |" in out
