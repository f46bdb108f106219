"""The same analysis on a dask.distributed LocalCluster: 1 worker process against 2.

On one lossless store (cached in /tmp/gradtrace-bench like ``benchmarks/analysis.py``):
the full correlation matrix (float64 Gram) and RSI against a new reference vector, timed

* on the threaded scheduler in this process (the default, for reference),
* on a LocalCluster of 1 worker process with 1 thread,
* on a LocalCluster of 2 worker processes with 1 thread each (the speed-up against 1),

each cluster once with the workers' environment as gradtrace recommends (dask's
``MALLOC_TRIM_THRESHOLD_=65536`` removed, see docs/cluster.md) and once with dask's defaults.
dask's nanny sets that variable in every worker it spawns; it makes glibc hand every large
buffer back to the OS, so each slab read page-faults its memory afresh (slab reads 3x slower
on this machine).

Both clusters read the same store from disk; each worker opens the arrays itself with the
zarrs codec pipeline (``ArrayRef.open`` sets it per process; ``zarr.config.set`` in the
client does not reach worker processes, so the script asks a worker what it uses).
Cluster start-up is not timed; a small warm-up pass runs first on each cluster (imports,
opening the arrays), then the best of ``--repeat`` interleaved rounds is kept. The numbers
are checked against the threaded scheduler's. Run::

    .venv/bin/python benchmarks/cluster.py            # T=512, d=2^20 (2 GiB per array, the store
                                                      # of benchmarks/analysis.py), ~4 min
    .venv/bin/python benchmarks/cluster.py --quick    # T=32, d=2^20: checks the script
    .venv/bin/python benchmarks/cluster.py --env tuned   # skip the dask-default clusters
"""

from __future__ import annotations

import argparse
import collections
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

TRIM = "MALLOC_TRIM_THRESHOLD_"


def _bench_analysis():
    spec = importlib.util.spec_from_file_location("gradtrace_bench_analysis", Path(__file__).with_name("analysis.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker_info(ref) -> str:
    """Codec pipeline of the array as a worker opens it, its decode threads, BLAS threads and
    the malloc setting."""
    import threadpoolctl
    import zarr

    blas = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    pipeline = type(ref.open()._async_array.codec_pipeline).__name__
    return (f"{pipeline} (decode threads {zarr.config.get('threading.max_workers') or 'all cores'}), "
            f"BLAS threads {blas}, {TRIM}={os.environ.get(TRIM)}")


def cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (zarrs decodes in its own pool)."""
    t = os.times()
    return t.user + t.system


def timed(fns: dict, repeat: int, **kw) -> tuple[dict, dict]:
    """Best time of each function over ``repeat`` interleaved rounds, and the last results."""
    best = {k: float("inf") for k in fns}
    out: dict = {}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            out[k] = fn(**kw)
            best[k] = min(best[k], time.perf_counter() - t0)
    return best, out


def values(res) -> np.ndarray:
    return np.asarray(res.to_array() if hasattr(res, "to_array") else res)


def on_cluster(n_workers: int, env: str, run, fns: dict, warm, repeat: int, decode_threads: int) -> dict:
    """Time ``fns`` on a fresh LocalCluster of ``n_workers`` processes x 1 thread."""
    import dask
    import distributed

    cfg = {f"distributed.nanny.pre-spawn-environ.{TRIM}": None} if env == "tuned" else {}
    saved = os.environ.get(TRIM)
    if env == "tuned":  # a nanny of an earlier cluster in this process may have set it here
        os.environ.pop(TRIM, None)
    worker_env = {"ZARR_THREADING__MAX_WORKERS": str(decode_threads)} if decode_threads else {}
    t0 = time.perf_counter()
    try:
        with dask.config.set(cfg), distributed.LocalCluster(
                n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                env=worker_env) as cl, distributed.Client(cl) as client:
            started = time.perf_counter() - t0
            info = client.submit(worker_info, run.array_ref("grad"), pure=False).result()
            warm()
            cpu0, w0 = sum(client.run(cpu_seconds).values()), time.perf_counter()
            with distributed.get_task_stream() as stream:
                best, out = timed(fns, repeat)
            busy = (sum(client.run(cpu_seconds).values()) - cpu0) / (time.perf_counter() - w0)
    finally:
        if saved is None:
            os.environ.pop(TRIM, None)
        else:
            os.environ[TRIM] = saved
    slabs = collections.Counter(t["worker"] for t in stream.data if "_slab_task" in str(t["key"]))
    print(f"  {n_workers} worker process(es), {env} environment: started in {started:.1f} s; workers read with "
          f"{info}; slab tasks per worker {sorted(slabs.values(), reverse=True)}; "
          + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()) + f"; cores busy {busy:.2f}", flush=True)
    split = "/".join(map(str, sorted(slabs.values(), reverse=True)))
    return {"best": best, "out": out, "split": split, "busy": busy}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=512, help="gradient steps (default 512)")
    ap.add_argument("--d", type=int, default=2**20, help="parameters (default 2^20)")
    ap.add_argument("--quick", action="store_true", help="T=32, d=2^20: a quick check")
    ap.add_argument("--repeat", type=int, default=2, help="rounds per timing, best kept (default 2)")
    ap.add_argument("--env", choices=("both", "tuned", "dask"), default="both",
                    help=f"worker environment: tuned ({TRIM} removed), dask (its defaults) or both (default)")
    ap.add_argument("--decode-threads", type=int, default=1,
                    help="zarrs decode threads per worker (ZARR_THREADING__MAX_WORKERS; default 1, so a worker "
                         "process is one core; 0: zarr's default, every core)")
    ap.add_argument("--cache", default=os.environ.get("GRADTRACE_BENCH_CACHE", "/tmp/gradtrace-bench"),
                    help="directory of the cached store (default /tmp/gradtrace-bench)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    from analysis import engine

    BA = _bench_analysis()
    T, d = (32, 2**20) if args.quick else (args.T, args.d)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = BA.store_for(cache, T, d)
    run = ga.open_run(path)
    ref = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    n_corr = len(engine.Pass(run, run.params())._slabs("param", T, run.chunk_width("grad"), 4.0))
    n_rsi = len(engine.Pass(run, run.params())._slabs("param", 2 * T, run.chunk_width("grad"), 4.0))
    print(f"\nstore {path}: T={T}, d={d} ({4 * T * d / 2**30:.2f} GiB per array), chunk {run.chunk_width('grad')} "
          f"params; slab tasks per pass: corr {n_corr}, rsi {n_rsi}; {os.cpu_count()} cores", flush=True)

    fns = {
        "corr": lambda **kw: ga.corr_matrix(run, **kw),
        "rsi": lambda **kw: ga.rsi(run, reference=ref, **kw),
    }

    def warm():  # imports and array opening on the workers, one row of each array
        ga.rsi(run, reference=ref, steps=[int(run.grad_steps[0])])

    threads, want = timed(fns, args.repeat, scheduler="threads")
    print(f"  threaded scheduler: " + ", ".join(f"{k} {v:.2f} s" for k, v in threads.items()), flush=True)
    envs = ("tuned", "dask") if args.env == "both" else (args.env,)
    res = {}
    for env in envs:  # tuned first: a dask-default nanny leaves its variable in this process
        for n in (1, 2):
            res[(env, n)] = r = on_cluster(n, env, run, fns, warm, args.repeat, args.decode_threads)
            for k in fns:  # the same numbers as the threaded scheduler
                np.testing.assert_allclose(values(r["out"][k]), values(want[k]), rtol=1e-12, atol=1e-12)

    print("\n| scheduler | worker environment | corr_matrix s | rsi (new reference) s | slab tasks per worker "
          "| worker cores busy |")
    print("|---|---|---|---|---|---|")
    print(f"| threaded, {os.cpu_count()} threads (default) | - | {threads['corr']:.2f} | {threads['rsi']:.2f} | - | - |")
    for env in envs:
        label = f"tuned ({TRIM} unset)" if env == "tuned" else f"dask default ({TRIM}=65536)"
        one, two = res[(env, 1)]["best"], res[(env, 2)]["best"]
        print(f"| LocalCluster, 1 process x 1 thread | {label} | {one['corr']:.2f} | {one['rsi']:.2f} | - | "
              f"{res[(env, 1)]['busy']:.2f} |")
        print(f"| LocalCluster, 2 processes x 1 thread | {label} | {two['corr']:.2f} | {two['rsi']:.2f} | "
              f"{res[(env, 2)]['split']} | {res[(env, 2)]['busy']:.2f} |")
        print(f"| **speed-up, 2 processes vs 1** | {label} | **{one['corr'] / two['corr']:.2f}x** | "
              f"**{one['rsi'] / two['rsi']:.2f}x** | | |")
    gib = 4 * T * d / 2**30
    best2 = res[(envs[0], 2)]["best"]
    print(f"\naggregate rate, 2 processes ({envs[0]}): corr {gib / best2['corr']:.2f} GiB/s of float32 read (grad), "
          f"rsi {2 * gib / best2['rsi']:.2f} GiB/s (grad + weight); zarrs decode threads per worker: "
          f"{args.decode_threads or 'all cores'}; best of {args.repeat} rounds; 1-minute load "
          f"average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
