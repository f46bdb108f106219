"""Analysis-stage benchmark: the full correlation matrix and a new-reference RSI, from the store.

In ONE run on the same data (a lossless store of T gradient steps and d parameters, written
once with StoreWriter into a cache directory and reused):

* ``X @ X.T`` with numpy on the gradients already in memory, in float32 (the data's own type)
  and in float64 (the precision of the default pass): each pass is compared with the numpy
  product of its own precision (float64 BLAS costs twice float32 BLAS whoever calls it);
* ``corr_matrix`` from the store, float64 (exact, default) and ``precision="float32"``;
* the float64 Gram of the in-memory data through the engine's own per-block code (the BLAS
  cost alone, without reading);
* one plain read of the store: every chunk of ``grad`` and ``weight`` decoded once (zarrs
  pipeline, one task per slab on the threaded scheduler, as the metrics read);
* ``rsi`` against a new reference vector (one pass over grad and weight).

Targets (issue 3, T=512, d=2^20): correlation within 1.3x of the in-memory numpy product, new-
reference RSI within 1.2x of a read. Prints a markdown table with the ratios and which
resource binds. Run::

    .venv/bin/python benchmarks/analysis.py            # T=512, d=2^20 (2 GiB per array)
    .venv/bin/python benchmarks/analysis.py --quick    # T=128, d=2^18, a few seconds
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
from analysis import blockops, engine, slabs  # noqa: E402
from gradtrace_format import format as fmt  # noqa: E402


def build_store(path: Path, T: int, d: int, seed: int = 0, shard_files: bool = True) -> None:
    """Gradient-like float32 data: a decaying oscillating direction plus noise, layered scales."""
    from capture.writer import StoreWriter

    n_t = 8  # a few tensors of different scales
    sizes = [d // n_t] * (n_t - 1) + [d - (d // n_t) * (n_t - 1)]
    tensors = fmt.tensor_table([(f"layer{i}.weight", (s,)) for i, s in enumerate(sizes)])
    scales = np.repeat(np.float32(10.0) ** -np.arange(n_t, dtype=np.float32) / 2, sizes)
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(d, dtype=np.float32)
    w = rng.standard_normal(d, dtype=np.float32)
    writer = StoreWriter(path, tensors, {"grad": "lossless", "weight": "lossless"}, mode="overwrite",
                         expected_steps=T + 1, shard_files=shard_files)
    t0 = time.perf_counter()
    for t in range(T):
        g = scales * (np.float32((-1) ** t * np.exp(-t / T)) * direction + rng.standard_normal(d, dtype=np.float32))
        writer.append(t, g, w, loss=float(np.exp(-t / T)), lr=0.01, epoch=t // 32)
        w = w - np.float32(0.01) * g
        if t % 64 == 63:
            print(f"  wrote {t + 1}/{T} steps ({time.perf_counter() - t0:.0f} s)", flush=True)
    writer.close(final_weight=w)


def _is_sharded(path: Path) -> bool:
    import json

    codecs = json.loads((path / "grad" / "zarr.json").read_text())["codecs"]
    return codecs[0]["name"] == "sharding_indexed"


def store_for(cache: Path, T: int, d: int, shard_files: bool = True) -> Path:
    path = cache / f"analysis-T{T}-d{d}{'' if shard_files else '-chunkfiles'}.zarr"
    try:
        h = fmt.read_header(path)
        if h.closed and h.n_steps == T + 1 and h.n_params == d and _is_sharded(path) == shard_files:
            return path
    except (fmt.StoreError, OSError, KeyError):
        pass
    print(f"writing the benchmark store {path} (once) ...", flush=True)
    build_store(path, T, d, shard_files=shard_files)
    return path


def interleaved(cases: dict, repeat: int) -> tuple[dict, dict]:
    """Best time of each case over ``repeat`` rounds, the cases taking turns in every round
    (a load that comes and goes on a shared machine hits all of them alike)."""
    times: dict = {k: [] for k in cases}
    outs: dict = {}
    for _ in range(repeat):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}, outs


def plain_read(run, names) -> None:
    """Read and decode every chunk of the arrays once, as the metrics read: one task per slab
    of at most ``SLAB_BYTES`` (chunk-wide slabs cut into row blocks when all rows do not fit),
    decoded into the thread's reused slab buffer. The fastest plain read we know here (a task
    per whole chunk column, into fresh arrays, took 1.2-1.4x as long)."""
    import dask

    n = run.header.n_steps
    tasks = []
    for name in names:
        ref, cw = run.array_ref(name), run.chunk_width(name)
        width = max(cw, (engine.SLAB_BYTES // (4 * n)) // cw * cw)
        nrows = max(1, engine.SLAB_BYTES // (4 * width))
        for lo in range(0, run.n_params, width):
            pieces = ((0, lo, min(run.n_params, lo + width)),)
            for r0 in range(0, n, nrows):
                tasks.append(dask.delayed(_read_task)(ref, np.arange(r0, min(n, r0 + nrows)), pieces, name))
    engine.compute(dask.delayed(sum)(tasks))


def _read_task(ref, rows, pieces, name):
    # rows removed on purpose (the final iterate's gradient) read as NaN, as the metrics read them
    return int(slabs.read(ref.open(), rows, pieces, buf=name, absent=ref.absent_rows()).shape[1])


def engine_gram_in_memory(X: np.ndarray) -> np.ndarray:
    """The float64 Gram through the engine's own block loop, on data already in memory."""
    from concurrent.futures import ThreadPoolExecutor

    class Mem:  # what SlabData offers the ops
        def __init__(self, x):
            self.grad, self.n_grad, self.space = x, x.shape[0], "param"

    op = blockops.Gram("g", np.arange(X.shape[0]), "float64")
    width = max(1, engine.SLAB_BYTES // (4 * X.shape[0]))
    slabs = [X[:, lo: lo + width] for lo in range(0, X.shape[1], width)]
    with engine._blas_single_thread(True), ThreadPoolExecutor(os.cpu_count() or 1) as ex:
        parts = list(ex.map(lambda s: op.partial(Mem(s), 0, s.shape[1]), slabs))
    return sum(parts)


def np_lag1(X: np.ndarray) -> np.ndarray:
    """Lag-1 correlation in memory, the way a numpy user writes it (float32 row products)."""
    dots = np.einsum("ij,ij->i", X[:-1], X[1:])
    sq = np.einsum("ij,ij->i", X, X)
    return dots / np.sqrt(sq[:-1] * sq[1:])


def np_signs_lag1(X: np.ndarray) -> np.ndarray:
    """Sign shift (percent) between adjacent rows in memory, row by row (boolean masks)."""
    out = np.empty(len(X) - 1)
    neg0, nz0 = X[0] < 0, X[0] != 0
    for t in range(len(X) - 1):
        neg1, nz1 = X[t + 1] < 0, X[t + 1] != 0
        both = nz0 & nz1
        out[t] = 100.0 * np.count_nonzero((neg0 != neg1) & both) / np.count_nonzero(both)
        neg0, nz0 = neg1, nz1
    return out


def np_sign_matrix(X: np.ndarray) -> np.ndarray:
    """Sign-shift matrix in memory: two float32 BLAS products of {-1, 0, 1} matrices."""
    S = np.sign(X)
    N = (X != 0).astype(np.float32)
    ss, nn = (S @ S.T).astype(np.float64), (N @ N.T).astype(np.float64)
    return 100.0 * (nn - ss) / 2.0 / nn


def np_rsi_products(G: np.ndarray, W: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``||w_t - r||^2`` and ``<G_t, w_t - r>`` in memory, float64, row by row."""
    r = ref.astype(np.float64)
    out = np.empty((2, len(G)))
    for t in range(len(G)):
        diff = W[t] - r
        out[0, t] = diff @ diff
        out[1, t] = G[t].astype(np.float64) @ diff
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=512, help="gradient steps (default 512)")
    ap.add_argument("--d", type=int, default=2**20, help="parameters (default 2^20)")
    ap.add_argument("--quick", action="store_true", help="T=128, d=2^18: a quick check")
    ap.add_argument("--repeat", type=int, default=2, help="runs per timing, best kept (default 2)")
    ap.add_argument("--cache", default=os.environ.get("GRADTRACE_BENCH_CACHE", "/tmp/gradtrace-bench"),
                    help="directory of the cached store (default /tmp/gradtrace-bench)")
    ap.add_argument("--chunk-files", action="store_true",
                    help="a store with one file per chunk (StoreWriter(shard_files=False)) instead of shard files")
    args = ap.parse_args(argv)
    T, d = (128, 2**18) if args.quick else (args.T, args.d)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    path = store_for(cache, T, d, shard_files=not args.chunk_files)
    run = ga.open_run(path)
    meta = run._arrays["grad"].metadata.codecs
    layout = "one file per chunk"
    if meta[0].to_dict()["name"] == "sharding_indexed":
        shards = run._arrays["grad"].shards
        meta, layout = meta[0].codecs, f"shard files of {shards[0]} rows x {shards[1]} entries"
    codec = [c for c in meta if c.to_dict()["name"] not in ("bytes", "crc32c")]
    codec = codec[0].to_dict() if codec else {"name": "none"}
    gib = 4 * T * d / 2**30
    print(f"\nstore {path}: T={T}, d={d} ({gib:.2f} GiB per array), {layout}, codec {codec['name']} "
          f"{codec.get('configuration', {}).get('cname', '')}, zarrs={run.use_zarrs}, cores={os.cpu_count()}")

    X = np.asarray(run._arrays["grad"][:T])  # the gradients, in memory (not timed)
    Wm = np.asarray(run._arrays["weight"][:T])  # the weights they were computed at
    X64 = X.astype(np.float64)  # the same gradients as a float64 numpy user holds them
    ref = np.random.default_rng(1).standard_normal(d).astype(np.float32)  # a new reference
    cases = {
        "np": lambda: X @ X.T,
        "np64": lambda: X64 @ X64.T,
        "np_lag": lambda: np_lag1(X),
        "lag": lambda: ga.lag_series(run, 1),
        "np_signs": lambda: np_signs_lag1(X),
        "signs": lambda: ga.sign_shift_lag(run, 1),
        "np_smat": lambda: np_sign_matrix(X),
        "smat": lambda: ga.sign_shift_matrix(run),
        "np_rsi": lambda: np_rsi_products(X, Wm, ref),
        "blas64": lambda: engine_gram_in_memory(X),
        "read_g": lambda: plain_read(run, ["grad"]),
        "read": lambda: plain_read(run, ["grad", "weight"]),
        "corr": lambda: ga.corr_matrix(run),
        "corr32": lambda: ga.corr_matrix(run, precision="float32"),
        "rsi": lambda: ga.rsi(run, reference=ref),
    }
    t, out = interleaved(cases, args.repeat)
    t_np, t_blas64, t_read_g, t_read = t["np"], t["blas64"], t["read_g"], t["read"]
    t_corr, t_corr32, t_rsi = t["corr"], t["corr32"], t["rsi"]
    G32, G64, corr, corr32, r = out["np"], out["blas64"], out["corr"], out["corr32"], out["rsi"]
    del X, Wm, X64
    load = os.getloadavg()[0]
    n64 = np.sqrt(np.diag(G64))
    exact = G64 / np.outer(n64, n64)
    err64 = float(np.nanmax(np.abs(corr.values - exact)))
    err32 = float(np.nanmax(np.abs(corr32.values - exact)))
    n32 = np.sqrt(np.diag(G32).astype(np.float64))
    err_np = float(np.nanmax(np.abs(G32 / np.outer(n32, n32) - exact)))

    def row(name, t, base=None, target=None):
        ratio = f"{t / base:.2f}x" if base else ""
        return f"| {name} | {t:.2f} | {ratio} | {target or ''} |"

    print("\n| quantity | seconds | ratio | target |\n|---|---|---|---|")
    t_np64 = t["np64"]
    print(row("numpy `X @ X.T` in memory, float32 (baseline of the float32 pass)", t_np))
    print(row("numpy `X @ X.T` in memory, float64 (baseline of the float64 pass)", t_np64, t_np))
    print(row("float64 Gram of the in-memory data (engine blocks, BLAS only)", t_blas64, t_np64))
    print(row("plain read of `grad` (decode every chunk once)", t_read_g, t_np))
    print(row(f"**corr_matrix from the store, float64 (default)**, max err {err64:.1e}", t_corr, t_np64, "1.3x"))
    print(row("  the same, against numpy float32", t_corr, t_np))
    print(row(f"**corr_matrix from the store, precision='float32'**, max err {err32:.1e}", t_corr32, t_np, "1.3x"))
    print(row("plain read of `grad` + `weight` (baseline)", t_read))
    print(row("**rsi, new reference vector**", t_rsi, t_read, "1.2x"))
    print(row("rsi products in memory with numpy (float64, row by row)", t["np_rsi"], t_read))
    e_rsi = float(np.max(np.abs(r.distance.values[:T] ** 2 - out["np_rsi"][0]) / out["np_rsi"][0]))
    lag_err = float(np.nanmax(np.abs(out["lag"].values - out["np_lag"])))
    sig_err = float(np.nanmax(np.abs(out["signs"].sign_shift.values - out["np_signs"])))
    smat_err = float(np.nanmax(np.abs(out["smat"].sign_shift.values - out["np_smat"])))
    print("\n| other queries | from the store (s) | numpy in memory (s) | store / numpy | store / read of `grad` | max diff |")
    print("|---|---|---|---|---|---|")
    for name, a, b, err in (("lag-1 correlation series", "lag", "np_lag", lag_err),
                            ("sign shift, lag 1 (percent)", "signs", "np_signs", sig_err),
                            ("sign-shift matrix T x T", "smat", "np_smat", smat_err)):
        print(f"| {name} | {t[a]:.2f} | {t[b]:.2f} | {t[a] / t[b]:.2f}x | {t[a] / t_read_g:.2f}x | {err:.1e} |")
    print(f"(RSI distance^2 relative difference to the in-memory numpy float64: {e_rsi:.1e})")
    print(f"\nmax |error| of the correlation matrix against the float64 Gram of the same data: "
          f"float64 pass {err64:.1e}, float32 pass {err32:.1e}, numpy float32 X @ X.T {err_np:.1e}")
    print(f"binds: correlation float64: BLAS ({t_blas64:.2f} s of float64 products vs {t_read_g:.2f} s to read); "
          f"correlation float32 and RSI: read/decode (RSI {t_rsi:.2f} s vs read {t_read:.2f} s)")
    print(f"(gamma of step 0 against the new reference: {float(r.gamma.values[0]):+.4f}; best of {args.repeat} "
          f"interleaved rounds; 1-minute load average at the end {load:.1f} on {os.cpu_count()} cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
