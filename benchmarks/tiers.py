"""Fidelity tiers on real gradients: size, write speed and error of each.

The gradients and weights come from training the ~1M-parameter CNN of
``benchmarks/capture_overhead.py`` on synthetic data (ReLU nets give exact zeros and layered
scales; Gaussian noise would flatter no tier and mislead about all of them). Every tier writes
the same rows through :class:`capture.writer.StoreWriter` (float64 scalars, encoding, files),
so "write MB/s" is raw float32 input (grad + weight) per second of ``append``.

Columns (gradient array):
    bytes/param-step   stored bytes of ``grad`` (sketch: sketch + sign + nonzero bits) per entry
    ratio              4 bytes / that
    write MB/s         raw input rate of StoreWriter.append (grad and weight, same tier)
    cos err            lossless/rounded: max over steps of 1 - cos(stored G_t, G_t);
                       sketch: max over step pairs of |estimated cos - true cos|, with the
                       median per-tensor stderr bound (format.sketch_cosine_stderr_tensors)
                       and the largest error in units of it
    max rel err        max over entries of |stored - true| / |true| (true != 0)
    sign agreement     share of entries whose stored sign equals the true sign (sketch: the
                       stored sign bits)

Usage::

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
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import format as fmt  # noqa: E402
from benchmarks.capture_overhead import build  # noqa: E402
from capture.recorder import model_table  # noqa: E402
from capture.writer import StoreWriter  # noqa: E402

TIERS = ["lossless", "rounded:12", "rounded:10", "rounded:7", "rounded:4", "sketch:262144", "sketch:16384"]


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
    names = ["grad"] if not tier.startswith("sketch") else ["grad_sketch", "grad_signbits", "grad_nonzero"]
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
        sk = np.asarray(g["grad_sketch"][:T]).astype(np.float64)
        est = (sk @ sk.T) / np.outer(np.linalg.norm(sk, axis=1), np.linalg.norm(sk, axis=1))
        true = (true64 @ true64.T) / np.outer(norms, norms)
        iu = np.triu_indices(T, 1)
        row["cos"] = float(np.max(np.abs(est - true)[iu]))
        row["rel"] = float("nan")
        bits = np.unpackbits(np.asarray(g["grad_signbits"][:T]), axis=1)[:, :d].astype(bool)
        row["sign"] = float(np.mean(bits == (G < 0)))
        plan = fmt.SketchPlan.from_json(g["grad_sketch"].attrs["sketch_plan"])
        sq = np.asarray(g["grad_sqnorm_tensor"][:T])  # exact, stored by the writer
        bound = fmt.sketch_cosine_stderr_tensors(plan, sq[:, None, :], sq[None, :, :])
        row["z"] = float(np.max((np.abs(est - true) / bound)[iu]))
        row["stderr"] = float(np.median(bound[iu]))
    shutil.rmtree(path)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=12, help="gradient rows to store")
    ap.add_argument("--hw", type=int, default=8, help="input size of the CNN (8 or 32)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir on the same disk as /tmp)")
    ap.add_argument("--tiers", nargs="*", default=TIERS)
    args = ap.parse_args(argv)
    tensors, G, W = real_rows(args.rows, args.hw, args.batch)
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-tiers-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        rows = [bench_tier(t, tensors, G, W, root) for t in args.tiers]
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    d = G.shape[1]
    print(
        f"\n{args.rows} gradient rows of a {d / 1e6:.2f}M-parameter CNN in training ({args.hw}x{args.hw}, batch "
        f"{args.batch}); {100 * np.mean(G == 0):.0f}% of gradient entries exactly zero\n"
    )
    print("| tier | bytes/param-step (grad) | ratio | write MB/s | cos err | max rel err | sign agreement |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cos = f"{r['cos']:.1e}" + (f" (stderr bound {r['stderr']:.1e}, max {r['z']:.1f} se)" if "stderr" in r else "")
        rel = "-" if np.isnan(r["rel"]) else f"{r['rel']:.1e}"
        print(
            f"| {r['tier']} | {r['bpp']:.3f} | {4 / r['bpp']:.1f}x | {r['mbs']:.0f} | {cos} | {rel} | "
            f"{100 * r['sign']:.3f}% |"
        )


if __name__ == "__main__":
    main()
