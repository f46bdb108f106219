"""The capture-side benchmark scripts: their helpers, and each script end to end at a tiny size."""

import numpy as np
import pytest

from benchmarks import capture_overhead, page_cache, tiers, two_run


def test_phase_order_rotates_every_phase_through_every_position():
    phases = ["bare", "lossless", "rounded:7", "sketch:4096"]
    orders = [capture_overhead.phase_order(phases, r) for r in range(len(phases))]
    for order in orders:
        assert sorted(order) == sorted(phases)
    for pos in range(len(phases)):
        assert sorted(o[pos] for o in orders) == sorted(phases)


def test_reference_steps_prefixes_distinct_in_range():
    T = 90
    big = two_run.reference_steps(T, 10)
    assert big[0] == "final" and len(big) == len(set(big)) == 10
    assert all(0 <= s < T for s in big[1:])
    for K in (1, 3, 7):
        assert two_run.reference_steps(T, K) == big[:K]
    many = two_run.reference_steps(20, 19)  # more than FRACTIONS gives: filled with other steps
    assert len(set(many)) == 19
    with pytest.raises(ValueError):
        two_run.reference_steps(3, 5)


def test_metrics_from_sums_match_the_definitions():
    rng = np.random.default_rng(0)
    g, w, ref = rng.standard_normal((3, 50))
    diff = w - ref
    m = two_run.metrics_from_sums([diff @ diff, 0.0, diff @ diff], [g @ diff, 0.0, 0.0], [g @ g, g @ g, 0.0])
    assert m["rsi"][0] == pytest.approx((g @ diff) / (diff @ diff), rel=1e-14)
    assert m["eb"][0] == pytest.approx(np.linalg.norm(g) / np.linalg.norm(diff), rel=1e-14)
    assert m["gamma"][0] == pytest.approx((g @ diff) / (np.linalg.norm(g) * np.linalg.norm(diff)), rel=1e-14)
    assert np.isnan([m["rsi"][1], m["eb"][1], m["gamma"][1]]).all()  # w_t == w*
    assert m["rsi"][2] == 0 and m["eb"][2] == 0 and np.isnan(m["gamma"][2])  # G_t == 0


def test_compare_refuses_different_nan_steps():
    import xarray as xr

    a = {"rsi": np.array([1.0, np.nan]), "eb": np.array([1.0, 2.0]), "gamma": np.array([0.5, 0.5])}
    ds = xr.Dataset({k: ("step", np.nan_to_num(v, nan=3.0)) for k, v in a.items()})
    with pytest.raises(AssertionError, match="NaN steps differ"):
        two_run.compare(a, ds)
    ds["rsi"] = ("step", a["rsi"])
    assert two_run.compare(a, ds)["rsi_abs"] == 0


def test_two_run_tiny_agrees_with_gradtrace(tmp_path):
    out = two_run.main(["--quick", "--epochs", "1", "--width", "4", "--K", "1", "2", "--dir", str(tmp_path)])
    assert out["refs"][0] == "final" and len(out["checks"]) == 2
    assert out["worst"] < 1e-9


def test_capture_overhead_tiny_two_tiers(tmp_path):
    rows = capture_overhead.main(["--hw", "8", "--batch", "4", "--steps", "2", "--repeats", "2",
                                  "--tiers", "lossless", "sketch:1024", "--writer-threads", "2", "--page-cache", "auto",
                                  "drop", "--dir", str(tmp_path)])
    assert [r["tier"] for r in rows] == ["lossless", "lossless/drop", "sketch:1024", "sketch:1024/drop"]
    assert rows[2]["mb"] < rows[0]["mb"]
    assert rows[1]["mb"] == pytest.approx(rows[0]["mb"], rel=0.01)  # the same store, kept or dropped
    assert rows[1]["ns"]["codec"] == rows[0]["ns"]["codec"]  # one floor per tier


def test_tiers_tiny_with_baselines(tmp_path):
    rows = tiers.main(["--rows", "2", "--batch", "8", "--tiers", "lossless", "--dir", str(tmp_path)])
    names = [r["tier"] for r in rows]
    assert names[0].startswith("numpy.save") and names[1].startswith("torch.save") and names[2] == "lossless"
    assert rows[0]["bpp"] == pytest.approx(4.0, rel=0.01)  # a .npy is raw float32 plus a small header
    assert rows[1]["bpp"] == pytest.approx(4.0, rel=0.05)
    assert rows[2]["cos"] < 1e-12 and rows[2]["rel"] == 0  # 1 - cos of identical rows: rounding


def test_capture_overhead_fast_mlp_prints_ns_beside_floors(tmp_path, capsys):
    rows = capture_overhead.main(["--model", "mlp", "--batch", "16", "--steps", "3", "--repeats", "1", "--threads", "1",
                                  "--floor-repeats", "1", "--tiers", "lossless", "rounded:7", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "ns per parameter-step" in out and "floor: memcpy" in out
    assert "bare step beside a busy core" in out  # the machine's core sharing, measured in the run
    for r in rows:
        assert r["beside"] > 0.5  # a ratio of two step times (a busy core beside can only slow it)
        ns = r["ns"]
        assert r["params"] == 784 * 1024 + 1024 + 1024 * 256 + 256 + 256 * 10 + 10
        assert all(v > 0 for k, v in ns.items() if k != "readahead")
        assert ns["readahead"] >= 0  # the weights' copy ahead of record() (0 when none landed in time)
        assert ns["codec"] > 0 and ns["write"] > 0 and ns["write_phase"] > 0 and ns["memcpy"] < ns["codec"]


def test_transformer_benchmark_model_shapes():
    import torch

    m = capture_overhead.TinyLM(vocab=64, width=32, layers=2, heads=4, seq=8)
    assert m(torch.randint(0, 64, (3, 8))).shape == (24, 64)
    assert abs(sum(p.numel() for p in capture_overhead.TinyLM().parameters()) - 185e6) < 1e6


def test_page_cache_floor_tiny(tmp_path):
    rows = page_cache.main(["--gb", "0.004", "--block-mb", "1", "--params", "1000", "--dir", str(tmp_path)])
    assert [r["case"] for r in rows] == ["new pages", "new pages again", "page_cache='drop'", "after deleting 1 and 2"]
    assert all(r["gb_s"] > 0 and r["ns_per_param_step"] >= 0 for r in rows)
    assert not list(tmp_path.iterdir())  # every file it wrote is removed
