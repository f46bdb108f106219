"""Analysis time as the number of steps T and of parameters d grow.

Per point (a lossless store of T gradient steps and d parameters, written once into a cache
directory by ``benchmarks/analysis.py``'s ``store_for`` and reused), best of ``--repeat``
interleaved rounds on the threaded scheduler:

* ``read``: one plain read of ``grad`` (every chunk decoded once, one task per slab): the floor;
* ``corr``: the full T x T correlation matrix (float64 Gram, O(T^2 d) flops, T d reads);
* ``lag``: the lag-1 correlation series (O(T d));
* ``signs``: the lag-1 sign-shift series (O(T d));
* ``rsi``: RSI/EB/gamma against a new reference vector (reads grad and weight: O(T d)).

Prints the seconds, the cost per element (ns per T*d element for the linear ones, ns per
T^2*d multiply-add for the Gram) and the exponents of a log-log fit of time against T (d
fixed) and against d (T fixed). Expected: exponent 1 in d for all; 1 in T for read/lag/
signs/rsi; between 1 and 2 in T for the Gram (read-bound at small T, flop-bound at large T).

    .venv/bin/python benchmarks/scaling.py            # T=128..512 at d=2^19, d=2^19..2^21 at T=256
    .venv/bin/python benchmarks/scaling.py --quick    # tiny sizes (seconds), checks the script
    .venv/bin/python benchmarks/scaling.py --Ts 256,512,1024 --d 524288

The d series starts at 2^19 because a pass runs one task per slab and a slab is at least one
storage chunk (2^18 parameters) wide: at d = 2^18 every pass is a single task on one core,
which would read as a sublinear d exponent on a 2-core machine (``--ds 262144,524288,1048576``
shows it; the ``slabs`` column counts the tasks).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))  # ahead of benchmarks/, whose analysis.py would shadow the package

import analysis as ga  # noqa: E402


def _bench_analysis():
    """``benchmarks/analysis.py`` as a module (its name would clash with the package)."""
    spec = importlib.util.spec_from_file_location("gradtrace_bench_analysis", Path(__file__).with_name("analysis.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


BA = _bench_analysis()

#: metric -> (how it is normalised, label)
METRICS = {
    "read": ("Td", "plain read of grad"),
    "corr": ("T2d", "corr_matrix (float64 Gram)"),
    "lag": ("Td", "lag_series(1)"),
    "signs": ("Td", "sign_shift_lag(1)"),
    "rsi": ("Td", "rsi, new reference"),
}


def slab_count(run, rows: int) -> int:
    """Slab tasks of a pass over ``rows`` rows of float32 (its parallelism on the threaded scheduler)."""
    from analysis import engine

    p = engine.Pass(run, run.params())
    return len(p._slabs("param", rows, run.chunk_width("grad"), 4.0))


def measure(cache: Path, T: int, d: int, repeat: int) -> dict:
    path = BA.store_for(cache, T, d)
    run = ga.open_run(path)
    ref = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    cases = {
        "read": lambda: BA.plain_read(run, ["grad"]),
        "corr": lambda: ga.corr_matrix(run),
        "lag": lambda: ga.lag_series(run, 1),
        "signs": lambda: ga.sign_shift_lag(run, 1),
        "rsi": lambda: ga.rsi(run, reference=ref),
    }
    t, _ = BA.interleaved(cases, repeat)
    t["slabs_corr"] = slab_count(run, T)
    t["slabs_rsi"] = slab_count(run, 2 * T)
    return t


def fit_exponent(x, y) -> float:
    return float(np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)[0])


def norm(metric: str, t: float, T: int, d: int) -> float:
    """Nanoseconds per element (T*d) or per Gram multiply-add (T^2*d)."""
    kind = METRICS[metric][0]
    return 1e9 * t / (T * d if kind == "Td" else T * T * d)


def pow2(n: int) -> str:
    k = int(np.log2(n))
    return f"2^{k}" if 2**k == n else str(n)


def table(title: str, points: list[tuple[int, int]], res: dict) -> None:
    print(f"\n### {title}\n")
    head = "| T | d | GiB/array | " + " | ".join(f"{m} s" for m in METRICS) + " | " + \
        " | ".join(f"{m} ns/{'T²d' if METRICS[m][0] == 'T2d' else 'Td'}" for m in METRICS) + " | slabs corr/rsi |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for T, d in points:
        r = res[(T, d)]
        secs = " | ".join(f"{r[m]:.3f}" for m in METRICS)
        ns = " | ".join(f"{norm(m, r[m], T, d):.3g}" for m in METRICS)
        print(f"| {T} | {pow2(d)} | {4 * T * d / 2**30:.2f} | {secs} | {ns} | {r['slabs_corr']}/{r['slabs_rsi']} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--Ts", default="128,256,512", help="steps for the T series (default 128,256,512)")
    ap.add_argument("--d", type=int, default=2**19, help="parameters of the T series (default 2^19)")
    ap.add_argument("--ds", default=f"{2**19},{2**20},{2**21}", help="parameters for the d series (default 2^19..2^21)")
    ap.add_argument("--T", type=int, default=256, help="steps of the d series (default 256)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: T=32..128 at d=2^16, d=2^15..2^17 at T=64")
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds, best kept (default 2)")
    ap.add_argument("--cache", default=os.environ.get("GRADTRACE_BENCH_CACHE", "/tmp/gradtrace-bench"),
                    help="directory of the cached stores (default /tmp/gradtrace-bench)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    if args.quick:
        Ts, d_fixed, ds, T_fixed = [32, 64, 128], 2**16, [2**15, 2**16, 2**17], 64
    else:
        Ts, d_fixed = [int(x) for x in args.Ts.split(",")], args.d
        ds, T_fixed = [int(x) for x in args.ds.split(",")], args.T
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_points = [(T, d_fixed) for T in Ts]
    d_points = [(T_fixed, d) for d in ds]
    res: dict = {}
    t0 = time.perf_counter()
    for T, d in dict.fromkeys(t_points + d_points):
        res[(T, d)] = measure(cache, T, d, args.repeat)
        print(f"  T={T}, d={pow2(d)}: " + ", ".join(f"{m} {res[(T, d)][m]:.3f} s" for m in METRICS), flush=True)
    run = ga.open_run(BA.store_for(cache, *t_points[0]))
    print(f"\nstores in {cache} (lossless, chunk {run.chunk_width('grad')} params), zarrs={run.use_zarrs}, "
          f"threaded scheduler, {os.cpu_count()} cores, best of {args.repeat} interleaved rounds, "
          f"{time.perf_counter() - t0:.0f} s in all")
    table(f"T grows, d = {pow2(d_fixed)}", t_points, res)
    table(f"d grows, T = {T_fixed}", d_points, res)
    print("\n### Fitted exponents (log-log least squares): time ~ T^a at fixed d, ~ d^b at fixed T\n")
    print("| metric | a (in T) | b (in d) | expected |\n|---|---|---|---|")
    for m, (kind, label) in METRICS.items():
        a = fit_exponent(Ts, [res[p][m] for p in t_points])
        b = fit_exponent(ds, [res[p][m] for p in d_points])
        exp = "a in [1, 2] (O(T^2 d) flops, T d reads), b = 1" if kind == "T2d" else "a = 1, b = 1 (O(T d))"
        print(f"| {label} | {a:.2f} | {b:.2f} | {exp} |")
    print(f"\n(1-minute load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; a pass runs "
          "one task per slab, so with fewer slabs than cores it uses fewer cores: see the slabs column)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
