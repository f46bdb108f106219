"""The numbers of docs/reproduction.md's "paper parity" section: each seed finding measured in
the paper's own definition beside the project's default.

    python docs/parity_numbers.py            # records into runs/parity/ (~3-8 min on 2 CPU cores),
                                             # writes docs/figures/parity.json
    python docs/parity_numbers.py --reuse    # measure stores already recorded

Every number is read back from a recorded store through the analysis API.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import analysis as ga  # noqa: E402
from experiments.recipes import RunConfig, load_config, run_recipe  # noqa: E402

warnings.filterwarnings("ignore", message="Consolidated metadata")

# name -> config. The commands in docs/reproduction.md are the same.
NWT_MOMENTUM = {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 5e-4}
RUNS = {
    "demo": lambda: load_config("demo"),
    "nwt-momentum": lambda: load_config("nwt-cnn3-digits", **NWT_MOMENTUM),
    "nwt-clip-before": lambda: load_config("nwt-cnn3-digits", grad_clip=1.0, grad_recorded="before_clip"),
    "nwt-clip-after": lambda: load_config("nwt-cnn3-digits", grad_clip=1.0, grad_recorded="after_clip"),
    "linear-deep": lambda: RunConfig(name="linear-deep", model="linear_deep",
                                     model_kwargs={"depth": 3, "hidden": 16, "init_std": 0.05}, dataset="digits",
                                     n_train=256, standardize=True, loss="mse", optimizer="gd", lr=0.3, steps=200),
    "mlp-seed0": lambda: RunConfig(name="mlp0", model="mlp", model_kwargs={"hidden": [16]}, dataset="digits",
                                   n_train=128, standardize=True, optimizer="gd", lr=0.5, steps=150, seed=0,
                                   record="every:50"),
    "mlp-seed1": lambda: RunConfig(name="mlp1", model="mlp", model_kwargs={"hidden": [16]}, dataset="digits",
                                   n_train=128, standardize=True, optimizer="gd", lr=0.5, steps=150, seed=1,
                                   record="every:50"),
}


def _longest(mask) -> tuple[int, int]:
    best, start = (0, 0), None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            best = max(best, (start, i), key=lambda b: b[1] - b[0])
            start = None
    return best


def r(x, n=4):
    return None if x is None or not math.isfinite(float(x)) else round(float(x), n)


def seed000(path) -> dict:
    ph = ga.phases(path, h=5)
    lo, hi = _longest(ph["phase"].values == "zigzag")
    st = ph["step"].values[lo:hi]
    zz = slice(int(st[0]), int(st[-1]))
    both = ga.sign_shift_lag(path, 1, zz)
    allc = ga.sign_shift_lag(path, 1, zz, denominator="all")
    lag1 = ga.lag_series(path, 1, zz)
    from experiments.gawu import FixedSwitchWU
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    geo = FixedSwitchWU(opt, 100, 50, omega=0.1, eta_0=1e-3).lr_at(11)
    lit = FixedSwitchWU(opt, 100, 50, omega=0.1, eta_0=1e-3, warmup_form="literal").lr_at(11)
    return {
        "zigzag_stretch": [int(st[0]), int(st[-1])],
        "adjacent_corr": r(lag1.mean()),
        "sign_flip_percent_both_nonzero": r(both.sign_shift.mean(), 2),
        "sign_flip_percent_all": r(allc.sign_shift.mean(), 2),
        "zero_share_percent": r(both.zero_share.mean(), 2),
        "zigzag_share_record_low": r(ph.attrs["zigzag_share"], 3),
        "zigzag_share_net": r(ph.attrs["zigzag_share_net"], 3),
        "loss_decrease_after_first_zigzag_step": r(
            (float(ph["loss"].sel(step=int(st[0]))) - float(ph["loss"].values[-1]))
            / (float(ph["loss"].values[0]) - float(ph["loss"].values[-1])), 3),
        "gawu_lr_at_11": {"geometric": r(geo, 5), "literal": r(lit, 4)},
    }


def seed001(paths) -> dict:
    from experiments.recompute import recompute_gradients

    m = paths["nwt-momentum"]
    out = {}
    for d in ("gradient", "gradient+wd", "update"):
        res = ga.rsi(m, "final", exclude_tail="epoch", direction=d)
        g = res.gamma.values
        out[d] = {"gamma_mean": r(np.nanmean(g)), "gamma_median": r(np.nanmedian(g)),
                  "gamma_positive_percent": r(100 * np.mean(g[np.isfinite(g)] > 0), 1),
                  "eta_star_median": r(np.nanmedian(res.eta_star.values))}
    full = paths["nwt-momentum-fullbatch"]
    if not full.exists():
        recompute_gradients(m, full)
    res = ga.rsi(full, "final", exclude_tail="epoch")
    out["gradient (full-batch, recomputed)"] = {"gamma_mean": r(np.nanmean(res.gamma.values)),
                                                "gamma_median": r(np.nanmedian(res.gamma.values))}
    b = ga.rsi(paths["nwt-clip-before"], "final", exclude_tail="epoch")
    a = ga.rsi(paths["nwt-clip-after"], "final", exclude_tail="epoch")
    rel = {k: r(np.nanmax(np.abs(a[k].values / b[k].values - 1)), 3) for k in ("rsi", "eb", "eta_star", "gamma")}
    out["clipping_1.0_after_vs_before_max_rel_diff"] = rel
    gn = np.sqrt(ga.open_run(paths["nwt-clip-before"]).ds["grad_sqnorm"].values)
    out["clipping_1.0_share_of_steps_clipped_percent"] = r(100 * np.mean(gn[np.isfinite(gn)] > 1.0), 1)
    return out


def seed002(path) -> dict:
    ab = ga.balancedness(path, form="absolute").values
    rel = ga.balancedness(path).values
    return {"absolute_max_rel_change_percent": [r(100 * x, 3) for x in np.abs(ab / ab[0] - 1).max(axis=0)],
            "relative_last_over_first": [r(x, 3) for x in rel[-1] / rel[0]],
            "loss_first_last": [r(ga.open_run(path).ds["loss"].values[0]),
                                r(ga.open_run(path).ds["loss"].values[-2])]}


def seed003(paths) -> dict:
    from experiments.dss import string_sampling

    ds = string_sampling(paths["mlp-seed0"], "final", "final", b_store=paths["mlp-seed1"], threshold=0.1, lr=0.5,
                         max_train_steps=300, keep_weights=False)
    keys = ("connected", "normalized_geodesic_length", "straight_max_loss", "straight_barrier", "n_beads_inserted")
    return {k: (r(ds.attrs[k]) if isinstance(ds.attrs[k], float) else ds.attrs[k]) for k in keys} | {
        "endpoint_losses": [r(ds.loss.values[0]), r(ds.loss.values[-1])], "threshold": 0.1}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reuse", action="store_true", help="measure stores already in runs/parity/")
    ap.add_argument("--runs", default=str(ROOT / "runs" / "parity"))
    args = ap.parse_args(argv)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, cfg in RUNS.items():
        p = runs / f"{name}.zarr"
        if not (args.reuse and p.exists()):
            run_recipe(cfg(), p, overwrite=True, progress=False)
        paths[name] = p
    paths["nwt-momentum-fullbatch"] = runs / "nwt-momentum-fullbatch.zarr"
    if not args.reuse and paths["nwt-momentum-fullbatch"].exists():
        import shutil

        shutil.rmtree(paths["nwt-momentum-fullbatch"])
    numbers = {"seed000_zigzag (demo)": seed000(paths["demo"]), "seed001_nwt": seed001(paths),
               "seed002_balancedness": seed002(paths["linear-deep"]), "seed003_dss": seed003(paths)}
    out = ROOT / "docs" / "figures" / "parity.json"
    out.write_text(json.dumps(numbers, indent=1) + "\n")
    print(json.dumps(numbers, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
