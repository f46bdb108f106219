"""The two-run protocol against one recorded run: RSI / EB / gamma for K reference points.

"No Wrong Turns" (seeds 001/004) measures RSI, EB and gamma against a reference point w* (e.g.
the final iterate) by training twice: a first training produces w*, a second identical one
(same seed, same data order) computes the metrics online against it. For K reference points
that is K + 1 trainings. gradtrace records ONE training and computes each reference's metrics
from the store afterwards: one pass per reference (``ga.rsi(run, reference=...)``).

Both sides use the same model and data, in one process: the zigzag paper's 3-conv-block CNN
(``experiments.models.cnn3``) on scikit-learn's 8x8 digits (1,437 training images), minibatch SGD,
a fixed seed and a seeded shuffle per epoch, so every training is bitwise identical (checked:
the final weights of every training must equal the first one's, else the script fails).
Training uses one torch thread by default (``--threads``): a CNN this small gains nothing from
more, and with two OpenMP threads on a busy 2-core machine identical trainings took 0.2-12 s.
The Recorder's writer thread then has the other core to itself, as on a GPU host.

References, all taken from the first training: the final iterate, then the iterates (weights
before the update) at steps T/2, 3T/4, T/4, 0.9T, 0.1T, ... (:func:`reference_steps`).

* NWT way, for K references: training 1 (records nothing, keeps copies of the reference
  iterates) + K online trainings, each computing, at every step after ``backward()``, in
  float64 per docs/methods.md: ``||w_t - w*||^2``, ``<G_t, w_t - w*>`` and ``||G_t||^2``, hence
  RSI, EB, gamma. Every training is actually run: the K = 1 and K = 3 rows use the first 1 and
  3 of the online trainings that the largest K runs (each is timed on its own).
* Also shown, "NWT, 2 trainings": if all K references are known before the second training,
  one online training can carry all K at once (K + 1 trainings is what the protocol costs
  when each w* is chosen after looking at results, which is the usual case).
* gradtrace: one training with a ``Recorder`` (lossless tier, every step, ``close()``
  included) + ``ga.open_run`` + K calls of ``ga.rsi`` (each forces its result).

The check: for every reference, the online RSI, EB and gamma against gradtrace's, step by step:
max abs difference (and max relative difference of RSI and EB), and the steps where both are
NaN (w_t == w*) must coincide. Both sides compute in float64 from the same float32 vectors, so
the differences are float64 rounding (~1e-12 relative).

Usage::

    .venv/bin/python benchmarks/two_run.py --quick     # 2 epochs, width 8: ~20 s here
    .venv/bin/python benchmarks/two_run.py             # 10 epochs, width 32 (94k params)
    .venv/bin/python benchmarks/two_run.py --epochs 20 --width 64 --K 1 3 10

Prints the settings, a markdown table of times per K (NWT, NWT with all K in one second
training, gradtrace, and the ratio NWT / gradtrace) and a table of the agreement per reference.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import analysis as ga  # noqa: E402
from capture import Recorder  # noqa: E402
from experiments.data import load_dataset  # noqa: E402
from experiments.models import build_model  # noqa: E402

warnings.filterwarnings("ignore", message="Consolidated metadata")  # printed at every close

FRACTIONS = (0.5, 0.75, 0.25, 0.9, 0.1, 0.6, 0.4, 0.8, 0.2, 0.95, 0.05, 0.7, 0.3, 0.85, 0.15)


def reference_steps(T: int, K: int) -> list:
    """K references for a training of T steps: ``"final"``, then steps at T/2, 3T/4, T/4, ...

    The steps are distinct, in ``0..T-1``, and each list is a prefix of the next larger K.
    """
    if K < 1:
        raise ValueError(f"K={K} must be >= 1")
    refs: list = ["final"]
    for f in FRACTIONS:
        if len(refs) == K:
            break
        s = min(T - 1, max(0, int(round(f * T))))
        if s not in refs:
            refs.append(s)
    s = 0
    while len(refs) < K:  # more references than FRACTIONS: fill with the remaining steps
        if s not in refs:
            refs.append(s)
        s += 1
        if s >= T:
            raise ValueError(f"K={K} references need at least K - 1 = {K - 1} distinct steps; T={T}")
    return refs


def metrics_from_sums(dist2, gdiff, gg) -> dict[str, np.ndarray]:
    """RSI, EB and gamma from ``||w - w*||^2``, ``<G, w - w*>`` and ``||G||^2`` (docs/methods.md).

    Written out plainly (the online side of the comparison): NaN where ``w_t == w*``; gamma
    NaN where ``G_t == 0`` too.
    """
    dist2, gdiff, gg = (np.asarray(x, dtype=np.float64) for x in (dist2, gdiff, gg))
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.sqrt(dist2)
        rsi = np.where(dist2 > 0, gdiff / dist2, np.nan)
        eb = np.where(dist2 > 0, np.sqrt(gg) / dist, np.nan)
        gamma = np.where((dist2 > 0) & (gg > 0), gdiff / (np.sqrt(gg) * dist), np.nan)
    return {"rsi": rsi, "eb": eb, "gamma": gamma}


def compare(online: dict[str, np.ndarray], ds) -> dict[str, float]:
    """Max abs differences (and max relative ones for RSI and EB) of online vs gradtrace.

    Raises ``AssertionError`` if the NaN steps differ.
    """
    out = {}
    for v in ("rsi", "eb", "gamma"):
        a = np.asarray(online[v], dtype=np.float64)
        b = np.asarray(ds[v].values, dtype=np.float64)
        na, nb = np.isnan(a), np.isnan(b)
        if a.shape != b.shape or not np.array_equal(na, nb):
            raise AssertionError(f"{v}: NaN steps differ (online {np.flatnonzero(na)}, gradtrace {np.flatnonzero(nb)})")
        ok = ~na
        diff = np.abs(a[ok] - b[ok])
        out[f"{v}_abs"] = float(diff.max()) if diff.size else 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = diff / np.abs(a[ok])
        out[f"{v}_rel"] = float(np.nanmax(rel)) if rel.size else 0.0
        out["nan_steps"] = int(na.sum())
    return out


@dataclass
class Setup:
    X: torch.Tensor
    y: torch.Tensor
    width: int
    epochs: int
    batch: int
    lr: float
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return -(-len(self.y) // self.batch)

    @property
    def T(self) -> int:
        return self.epochs * self.steps_per_epoch


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def train(cfg: Setup, *, snapshot=(), refs=(), rec_path: Path | None = None):
    """One training; returns (seconds, final weights, {step: w_step}, online sums per ref or None).

    ``snapshot``: steps whose iterate (weights before that step's update) is kept;
    ``refs``: float64 reference vectors for the online metric; ``rec_path``: record with a
    Recorder into this store (every step, lossless).
    """
    torch.manual_seed(cfg.seed)
    model = build_model("cnn3", num_classes=10, in_channels=1, image_size=8, width=cfg.width)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr)
    loss_fn = nn.CrossEntropyLoss()
    order = torch.Generator().manual_seed(cfg.seed + 1)
    keep = set(snapshot)
    snaps: dict[int, np.ndarray] = {}
    T = cfg.T
    sums = None
    if refs:
        refs64 = [torch.as_tensor(r, dtype=torch.float64) for r in refs]
        sums = np.zeros((len(refs), 3, T))  # ||w - w*||^2, <G, w - w*>, ||G||^2
    rec = Recorder(model, rec_path, opt, overwrite=True, expected_steps=T + 1) if rec_path else None
    t0 = time.perf_counter()
    step = 0
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(cfg.y), generator=order)
        for i in range(0, len(perm), cfg.batch):
            idx = perm[i: i + cfg.batch]
            loss = loss_fn(model(cfg.X[idx]), cfg.y[idx])
            loss.backward()
            if step in keep:
                snaps[step] = flat([p.detach() for p in params]).numpy().copy()
            if sums is not None:
                with torch.no_grad():
                    g = flat([p.grad for p in params]).to(torch.float64)
                    w = flat([p.detach() for p in params]).to(torch.float64)
                    gg = torch.dot(g, g).item()
                    for j, ref in enumerate(refs64):
                        diff = w - ref
                        sums[j, 0, step] = torch.dot(diff, diff).item()
                        sums[j, 1, step] = torch.dot(g, diff).item()
                        sums[j, 2, step] = gg
            if rec is not None:
                rec.record(step, loss=loss, epoch=epoch)
            opt.step()
            opt.zero_grad()
            step += 1
    if rec is not None:
        rec.close()
    seconds = time.perf_counter() - t0
    final = flat([p.detach() for p in params]).numpy().copy()
    return seconds, final, snaps, sums


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--K", type=int, nargs="+", default=[1, 3, 10], help="numbers of reference points")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per training (default 10; --quick 2)")
    ap.add_argument("--width", type=int, default=None, help="cnn3 width (default 32: 94k params; --quick 8)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: see the docstring; 0 keeps torch's own)")
    ap.add_argument("--dir", default=None, help="where to write the store (default: a temp dir)")
    ap.add_argument("--quick", action="store_true", help="2 epochs, width 8: checks the script in seconds")
    args = ap.parse_args(argv)
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args) -> dict:
    X, y = load_dataset("digits", train=True)
    cfg = Setup(X, y, width=args.width or (8 if args.quick else 32), epochs=args.epochs or (2 if args.quick else 10),
                batch=args.batch, lr=args.lr, seed=args.seed)
    Ks = sorted(set(args.K))
    kmax = Ks[-1]
    refs = reference_steps(cfg.T, kmax)
    root = Path(args.dir or tempfile.mkdtemp(prefix="gradtrace-tworun-"))
    root.mkdir(parents=True, exist_ok=True)
    store = root / "run.zarr"
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    try:
        # untimed warm-up (lazy initialisation, allocator, a store written and read once)
        warm = Setup(X, y, cfg.width, 1, cfg.batch, cfg.lr, cfg.seed)
        train(warm, refs=[np.zeros(sum(p.numel() for p in build_model("cnn3", 10, 1, 8, width=cfg.width).parameters()))],
              rec_path=root / "warmup.zarr")
        ga.rsi(ga.open_run(root / "warmup.zarr")).compute()
        shutil.rmtree(root / "warmup.zarr")
        # --- NWT training 1: produces the references
        t_first, final, snaps, _ = train(cfg, snapshot=[r for r in refs if r != "final"])
        ref_vecs = [final if r == "final" else snaps[r] for r in refs]
        log(f"training 1: {t_first:.2f} s, T = {cfg.T} steps")
        # --- NWT online trainings, one per reference
        t_online, online = [], []
        for k, (r, vec) in enumerate(zip(refs, ref_vecs)):
            t, fin, _, sums = train(cfg, refs=[vec.astype(np.float64)])
            if not np.array_equal(fin, final):
                raise SystemExit(f"online training {k + 1} is not bitwise identical to training 1: the protocol is void")
            t_online.append(t)
            online.append(metrics_from_sums(*sums[0]))
            log(f"online training {k + 1}/{kmax} (reference {r}): {t:.2f} s")
        # --- NWT, all K references in one second training
        t_together = {}
        for K in Ks:
            t, fin, _, _ = train(cfg, refs=[v.astype(np.float64) for v in ref_vecs[:K]])
            assert np.array_equal(fin, final)
            t_together[K] = t
        log(f"online trainings carrying K references at once: {t_together}")
        # --- gradtrace: one recorded training, then K passes
        t_rec, fin, _, _ = train(cfg, rec_path=store)
        if not np.array_equal(fin, final):
            raise SystemExit("the recorded training is not bitwise identical to training 1")
        t0 = time.perf_counter()
        run = ga.open_run(store)
        t_open = time.perf_counter() - t0
        t_rsi, results = [], []
        for r in refs:
            t0 = time.perf_counter()
            ds = ga.rsi(run, reference=r).compute()
            t_rsi.append(time.perf_counter() - t0)
            results.append(ds)
        log(f"recorded training {t_rec:.2f} s, open {t_open:.3f} s, rsi {[round(t, 3) for t in t_rsi]} s")
        stored_final = np.asarray(run.ds["weight"].sel(step=run.final_step).values)
        if not np.array_equal(stored_final, final):
            raise SystemExit("the store's final iterate differs from training 1's final weights")
        checks = [compare(o, ds) for o, ds in zip(online, results)]
        store_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e6
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)

    d = len(final)
    print(
        f"\ncnn3 width {cfg.width} ({d:,} params) on digits ({len(y)} images), SGD lr {cfg.lr}, batch {cfg.batch}, "
        f"{cfg.epochs} epochs = {cfg.T} steps; torch threads {torch.get_num_threads()}. Every training bitwise "
        f"identical (final weights equal).\nOne plain training {t_first:.2f} s; online trainings "
        f"{min(t_online):.2f}-{max(t_online):.2f} s (median {statistics.median(t_online):.2f}); recorded training "
        f"{t_rec:.2f} s (store {store_mb:.0f} MB, lossless, every step); open_run {t_open:.3f} s; one ga.rsi pass "
        f"{min(t_rsi):.3f}-{max(t_rsi):.3f} s.\nAll trainings were run (none multiplied): the K rows use the first "
        f"K of the {kmax} online trainings.\n"
    )
    print("| K | NWT: K + 1 trainings, s | gradtrace: 1 recorded training + K rsi, s | NWT / gradtrace | "
          "NWT with all K in one 2nd training, s | that / gradtrace |")
    print("|---|---|---|---|---|---|")
    for K in Ks:
        nwt = t_first + sum(t_online[:K])
        gt = t_rec + t_open + sum(t_rsi[:K])
        two = t_first + t_together[K]
        print(f"| {K} | {nwt:.2f} | {gt:.2f} | **{nwt / gt:.2f}x** | {two:.2f} | {two / gt:.2f}x |")
    print("\nAgreement, online (float64 in the loop) vs gradtrace (from the store), over all "
          f"{cfg.T} steps per reference:\n")
    print("| reference | NaN steps (w_t = w*) | max abs dRSI | max rel dRSI | max abs dgamma | max rel dEB |")
    print("|---|---|---|---|---|---|")
    for r, c in zip(refs, checks):
        name = "final iterate" if r == "final" else f"w at step {r}"
        print(f"| {name} | {c['nan_steps']} | {c['rsi_abs']:.1e} | {c['rsi_rel']:.1e} | {c['gamma_abs']:.1e} | "
              f"{c['eb_rel']:.1e} |")
    worst = max(max(c["rsi_rel"], c["gamma_abs"], c["eb_rel"]) for c in checks)
    print(f"\nworst of (rel dRSI, abs dgamma, rel dEB) over all references: {worst:.1e}"
          + ("" if worst < 1e-6 else "  <-- ABOVE 1e-6: investigate"))
    return {"refs": refs, "checks": checks, "worst": worst, "t_first": t_first, "t_online": t_online,
            "t_together": t_together, "t_rec": t_rec, "t_open": t_open, "t_rsi": t_rsi}


if __name__ == "__main__":
    main()
