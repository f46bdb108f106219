"""Fidelity tiers on real gradients, beside what users do today: size, write speed and error.

The gradients and weights come from training the ~1M-parameter CNN of
``benchmarks/capture_overhead.py`` on synthetic data (ReLU nets give exact zeros and layered
scales; Gaussian noise would flatter no tier and mislead about all of them). The same rows go,
in one run, to:

* every gradtrace tier, through :class:`capture.writer.StoreWriter` (float64 scalars, encoding,
  files): grad *and* weight, as a recording stores them;
* ``numpy.save``: the flattened float32 gradient, one ``.npy`` file per step (what users do
  today);
* ``torch.save``: the list of per-parameter gradient tensors (``[p.grad for p in
  model.parameters()]``, each its own storage) per step, one file per step.

Nothing is fsync'ed in any row (plain writes into the page cache, the same for all). Flattening
(``torch.cat``) and the copy off the training's tensors are not timed in any row: the Recorder
does them in ``record()``, and ``benchmarks/capture_overhead.py`` measures that.

Columns (gradient array):
    bytes/param-step   stored bytes of the gradient (sketch: sketch + sign + nonzero bits;
                       npy / torch.save: the files) per entry
    vs raw float32     those bytes / 4 (raw float32 is 4 bytes per entry)
    write MB/s         raw float32 input per second of writing: grad + weight for the tiers
                       (StoreWriter.append), grad only for the numpy.save / torch.save rows
    cos err            lossless/rounded: max over steps of 1 - cos(stored G_t, G_t);
                       sketch: max over step pairs of |estimated cos - true cos|, with the
                       median per-tensor stderr bound (format.sketch_cosine_stderr_tensors)
                       and the largest error in units of it
    max rel err        max over entries of |stored - true| / |true| (true != 0)
    sign agreement     share of entries whose stored sign equals the true sign (sketch: the
                       stored sign bits)

Usage::

    .venv/bin/python benchmarks/tiers.py --quick    # 4 rows, 3 tiers: checks the script
    .venv/bin/python benchmarks/tiers.py            # ~1M-param CNN, 12 gradient rows
    .venv/bin/python benchmarks/tiers.py --rows 24 --hw 32
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import warnings

import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gradtrace_format import format as fmt  # noqa: E402
from benchmarks.capture_overhead import build  # noqa: E402
from capture.recorder import model_table  # noqa: E402
from capture.writer import StoreWriter  # noqa: E402

warnings.filterwarnings("ignore", message="Consolidated metadata")  # printed at every close

TIERS = ["lossless", "rounded:12", "rounded:10", "rounded:7", "rounded:7:small", "rounded:4", "sketch:262144",
         "sketch:16384"]


def real_rows(rows: int, hw: int, batch: int, every: int = 3, warmup: int = 10):
    """(rows, d) gradients and weights from a CNN in training (SGD + momentum)."""
    torch.manual_seed(0)
    model = build("cnn", hw)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(2048, 3, hw, hw, generator=gen)
    Y = (X[:, 0].mean((1, 2)) > 0).long() + 2 * (X[:, 1].mean((1, 2)) > 0).long()  # learnable labels
    G, W = [], []
    step = 0
    while len(G) < rows:
        idx = torch.randint(0, len(X), (batch,), generator=gen)
        nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        if step >= warmup and (step - warmup) % every == 0:
            G.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy().copy())
            W.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().copy())
        opt.step()
        opt.zero_grad()
        step += 1
    return model_table(model), np.stack(G), np.stack(W)


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def bench_tier(tier: str, tensors, G, W, root: Path) -> dict:
    path = root / f"{tier.replace(':', '-')}.zarr"
    sw = StoreWriter(path, tensors, {"grad": tier, "weight": tier}, mode="overwrite", expected_steps=len(G))
    t0 = time.perf_counter()
    for t in range(len(G)):
        sw.append(t, G[t], W[t])
    dt = time.perf_counter() - t0
    sw.close()
    T, d = G.shape
    names = list(fmt.stored_arrays("grad", fmt.Tier.parse(tier)))
    gbytes = sum(du(path / n) for n in names)
    g = zarr.open_group(str(path), mode="r")
    row = {"tier": tier, "bpp": gbytes / (T * d), "mbs": 2 * G.nbytes / dt / 1e6}
    true64 = G.astype(np.float64)
    norms = np.linalg.norm(true64, axis=1)
    if not tier.startswith("sketch"):
        S = np.asarray(g["grad"][:T]).astype(np.float64)
        cos = (S * true64).sum(1) / (np.linalg.norm(S, axis=1) * norms)
        nz = true64 != 0
        row["cos"] = float(np.max(1 - cos))
        row["rel"] = float(np.max(np.abs(S[nz] - true64[nz]) / np.abs(true64[nz])))
        row["sign"] = float(np.mean(np.sign(S) == np.sign(true64)))
    else:
        sk = np.asarray(g[fmt.sketch_array("grad")][:T]).astype(np.float64)
        est = (sk @ sk.T) / np.outer(np.linalg.norm(sk, axis=1), np.linalg.norm(sk, axis=1))
        true = (true64 @ true64.T) / np.outer(norms, norms)
        iu = np.triu_indices(T, 1)
        row["cos"] = float(np.max(np.abs(est - true)[iu]))
        row["rel"] = float("nan")
        bits = np.unpackbits(np.asarray(g[fmt.signbits_array("grad")][:T]), axis=1)[:, :d].astype(bool)
        row["sign"] = float(np.mean(bits == (G < 0)))
        plan = fmt.SketchPlan.from_json(g[fmt.sketch_array("grad")].attrs["sketch_plan"])
        sq = np.asarray(g["grad_sqnorm_tensor"][:T])  # exact, stored by the writer
        bound = fmt.sketch_cosine_stderr_tensors(plan, sq[:, None, :], sq[None, :, :])
        row["z"] = float(np.max((np.abs(est - true) / bound)[iu]))
        row["stderr"] = float(np.median(bound[iu]))
    shutil.rmtree(path)
    return row


def _timed_files(root: Path, T: int, write) -> tuple[float, int]:
    """Seconds to call ``write(t, path)`` for every step, and the bytes of the files written."""
    root.mkdir(parents=True, exist_ok=True)
    paths = [root / f"step{t:06d}" for t in range(T)]
    t0 = time.perf_counter()
    for t in range(T):
        write(t, paths[t])
    dt = time.perf_counter() - t0
    nbytes = du(root)
    shutil.rmtree(root)
    return dt, nbytes


def bench_npy(G, root: Path) -> dict:
    """``numpy.save`` of the flat float32 gradient, one ``.npy`` file per step."""
    T, d = G.shape
    dt, nbytes = _timed_files(root / "npy", T, lambda t, p: np.save(p.with_suffix(".npy"), G[t]))
    return {"tier": "numpy.save (.npy per step)", "bpp": nbytes / (T * d), "mbs": G.nbytes / dt / 1e6,
            "cos": 0.0, "rel": 0.0, "sign": 1.0, "exact": True}


def bench_torch_save(tensors, G, root: Path) -> dict:
    """``torch.save`` of the list of per-parameter gradient tensors, one file per step."""
    T, d = G.shape
    # as p.grad: one tensor (own storage) per parameter; torch.save of views into one flat
    # buffer would write the whole buffer for every tensor
    rows = [[torch.from_numpy(G[t, ti.offset: ti.offset + ti.size].reshape(ti.shape)).clone() for ti in tensors]
            for t in range(T)]
    dt, nbytes = _timed_files(root / "torch", T, lambda t, p: torch.save(rows[t], p.with_suffix(".pt")))
    return {"tier": "torch.save (.grad list per step)", "bpp": nbytes / (T * d), "mbs": G.nbytes / dt / 1e6,
            "cos": 0.0, "rel": 0.0, "sign": 1.0, "exact": True}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=None, help="gradient rows to store (default 12; --quick 4)")
    ap.add_argument("--hw", type=int, default=8, help="input size of the CNN (8 or 32)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on the same disk as /tmp)")
    ap.add_argument("--tiers", nargs="*", default=None, help=f"gradtrace tiers (default: {' '.join(TIERS)})")
    ap.add_argument("--no-baselines", action="store_true", help="skip the numpy.save / torch.save rows")
    ap.add_argument("--quick", action="store_true",
                    help="4 rows; tiers lossless rounded:7 sketch:16384 (checks the script)")
    args = ap.parse_args(argv)
    args.rows = args.rows or (4 if args.quick else 12)
    tiers = args.tiers if args.tiers is not None else (["lossless", "rounded:7", "sketch:16384"] if args.quick else TIERS)
    tensors, G, W = real_rows(args.rows, args.hw, args.batch)
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-tiers-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        rows = []
        if not args.no_baselines:
            rows += [bench_npy(G, root), bench_torch_save(tensors, G, root)]
        rows += [bench_tier(t, tensors, G, W, root) for t in tiers]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    d = G.shape[1]
    print(
        f"\n{args.rows} gradient rows of a {d / 1e6:.2f}M-parameter CNN in training ({args.hw}x{args.hw}, batch "
        f"{args.batch}); {100 * np.mean(G == 0):.0f}% of gradient entries exactly zero\n"
    )
    print("| tier | bytes/param-step (grad) | vs raw float32 | write MB/s | cos err | max rel err | sign agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cos = f"{r['cos']:.1e}" + (f" (stderr bound {r['stderr']:.1e}, max {r['z']:.1f} se)" if "stderr" in r else "")
        rel = "-" if np.isnan(r["rel"]) else f"{r['rel']:.1e}"
        if r.get("exact"):
            cos, rel = "0 (exact)", "0 (exact)"
        print(
            f"| {r['tier']} | {r['bpp']:.3f} | {r['bpp'] / 4:.3f} | {r['mbs']:.0f} | {cos} | {rel} | "
            f"{100 * r['sign']:.3f}% |"
        )
    return rows


if __name__ == "__main__":
    main()
