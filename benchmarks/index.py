"""Query-index benchmark (issue 15): build cost against one correlation pass, and each query
before (a pass over the store) and after (``gradtrace index``).

On one lossless store of T gradient steps and d parameters (the data of
``benchmarks/analysis.py``, written once into its own cache directory: the index is written
into that store, so it must not be the store other benchmarks time passes on):

* one ``corr_matrix`` pass (float64, ``index=False``): the unit of cost;
* ``build_index(rebuild=True)``: every row from scratch; and an incremental build after the
  store "grew" by 64 rows (the index is told it holds 64 rows fewer);
* each query with ``index=False`` (the pass) and from the index: ``lag_series(1)``,
  ``mean_corr(h=5)``, a 64 x 64 ``corr_window``, ``sign_shift_lag(1)``,
  ``rsi(reference=<step T/2>)`` and ``rsi("final")``; the largest difference between the two
  (relative for RSI values above 1) must be <= 1e-10;
* the index's bytes on disk, and the uncompressed sizes for T = 10^3, 10^4, 10^5.

Targets (issue 15, T=512, d=2^20): every query <= 0.25 s from the index and equal to 1e-10;
``--rebuild`` <= 6x one correlation pass. Prints a markdown table. Run::

    .venv/bin/python benchmarks/index.py            # T=512, d=2^20 (2 GiB per array; minutes)
    .venv/bin/python benchmarks/index.py --quick    # T=64, d=2^16: seconds (the tests run this)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import analysis as ga  # noqa: E402
from gradtrace_format import format as fmt  # noqa: E402
from analysis.index import build_index, open_index  # noqa: E402
from benchmarks.analysis import store_for  # noqa: E402

TOL = 1e-10
QUERY_TARGET_S = 0.25
REBUILD_TARGET = 6.0


def timed(fn, repeat: int = 1):
    """(best seconds over ``repeat`` runs, last result)."""
    best, out = float("inf"), None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def max_diff(a, b) -> float:
    """Largest |a - b| / max(1, |b|) over the float variables (NaN must match NaN)."""
    import xarray as xr

    da = a if isinstance(a, xr.Dataset) else a.to_dataset(name="v")
    db = b if isinstance(b, xr.Dataset) else b.to_dataset(name="v")
    worst = 0.0
    for v in db.data_vars:
        if db[v].dtype.kind != "f":
            continue
        x, y = np.asarray(da[v].values, float), np.asarray(db[v].values, float)
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            return float("inf")
        ok = np.isfinite(y)
        if ok.any():
            worst = max(worst, float(np.max(np.abs(x[ok] - y[ok]) / np.maximum(1.0, np.abs(y[ok])))))
    return worst


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=512, help="gradient steps (default 512)")
    ap.add_argument("--d", type=int, default=2**20, help="parameters (default 2^20)")
    ap.add_argument("--quick", action="store_true", help="T=64, d=2^16: a few seconds")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each pass timing, best kept (default 1)")
    ap.add_argument("--cache", default=os.environ.get("GRADTRACE_INDEX_BENCH_CACHE", "/tmp/gradtrace-bench-index"),
                    help="directory of the cached store (default /tmp/gradtrace-bench-index)")
    args = ap.parse_args(argv)
    T, d = (64, 2**16) if args.quick else (args.T, args.d)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = store_for(cache, T, d)
    run = ga.open_run(path)
    print(f"## Query index: T={T} gradient steps, d={d} parameters, lossless ({path})\n", flush=True)

    t_corr, _ = timed(lambda: ga.corr_matrix(run, index=False), args.repeat)
    t_build, res = timed(lambda: build_index(run, rebuild=True), args.repeat)
    # incremental: the index forgets its last 64 rows, as after a resumed run grew by 64
    import zarr

    g = zarr.open_group(str(path / fmt.INDEX_GROUP), mode="r+")
    attrs = dict(g.attrs[fmt.INDEX_ATTR])
    grow = min(64, T // 2)
    attrs["n_rows"] = run.header.n_steps - grow
    g.attrs[fmt.INDEX_ATTR] = attrs
    t_incr, inc = timed(lambda: build_index(run), 1)
    assert inc["rows_computed"] == grow, inc
    idx = open_index(run)
    assert idx.n_valid == run.header.n_steps

    mid = int(run.grad_steps[len(run.grad_steps) // 2])
    h = min(64, T // 2)
    w0 = int(run.grad_steps[0]) + (T - h) // 2
    queries = {
        "lag_series(1)": lambda ix: ga.lag_series(run, 1, index=ix),
        "mean_corr(h=5)": lambda ix: ga.mean_corr(run, h=5, index=ix),
        f"corr_window({w0}, h={h})": lambda ix: ga.corr_window(run, w0, h=h, index=ix),
        "sign_shift_lag(1)": lambda ix: ga.sign_shift_lag(run, 1, index=ix),
        f"rsi(reference={mid})": lambda ix: ga.rsi(run, mid, index=ix),
        'rsi("final")': lambda ix: ga.rsi(run, "final", index=ix),
    }
    rows, ok = [], True
    for name, q in queries.items():
        t_pass, a = timed(lambda: q(False), args.repeat)
        t_idx, b = timed(lambda: q(None), 3)
        diff = max_diff(b, a)
        by = b.attrs.get("answered_by")
        good = diff <= TOL and by.startswith("index")
        ok &= good
        extra = f" ({b.attrs['pass_steps']} steps by pass)" if b.attrs.get("pass_steps") else ""
        rows.append((name, t_pass, t_idx, diff, by + extra, t_idx <= QUERY_TARGET_S))

    idx_disk = disk_bytes(path / fmt.INDEX_GROUP)
    print("| step | time (s) | vs one corr_matrix pass |")
    print("|---|---:|---:|")
    print(f"| corr_matrix pass (float64, index=False) | {t_corr:.2f} | 1.00x |")
    print(f"| `gradtrace index --rebuild` (all {run.header.n_steps} rows) | {t_build:.2f} | {t_build / t_corr:.2f}x |")
    print(f"| incremental index (+{grow} rows) | {t_incr:.2f} | {t_incr / t_corr:.2f}x |")
    print()
    print("| query | pass (s) | index (s) | speed-up | max difference | answered by |")
    print("|---|---:|---:|---:|---:|---|")
    for name, tp, ti, diff, by, _ in rows:
        print(f"| {name} | {tp:.2f} | {ti:.4f} | {tp / ti:.0f}x | {diff:.1e} | {by} |")
    print()
    print(f"index on disk: {idx_disk / 2**20:.1f} MiB for {run.header.n_steps} rows "
          f"(uncompressed {res['bytes'] / 2**20:.1f} MiB, including the {d}-entry anchor)")
    print()
    print("| T (rows) | full index | band L=16 | band L=64 |")
    print("|---:|---:|---:|---:|")
    for n in (10**3, 10**4, 10**5):
        print(f"| {n:,} | {fmt.index_bytes(n):,} B | {fmt.index_bytes(n, 16):,} B | {fmt.index_bytes(n, 64):,} B |")
    print("(uncompressed, without the anchor: + 8 d bytes, or 8 k for the sketch tier)")
    print()
    slow = [r[0] for r in rows if not r[5]]
    print(f"queries <= {QUERY_TARGET_S} s from the index: {'yes' if not slow else 'NO: ' + ', '.join(slow)}")
    print(f"index equal to the pass within {TOL:g}: {'yes' if ok else 'NO'}")
    print(f"rebuild <= {REBUILD_TARGET:g}x one corr_matrix pass: {'yes' if t_build <= REBUILD_TARGET * t_corr else 'NO'} "
          f"({t_build / t_corr:.2f}x)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
