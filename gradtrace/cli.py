"""The ``gradtrace`` command.

Analysis subcommands (``info``, ``index``, ``corr``, ``signs``, ``rsi``, ``phases``, ``layers``,
``report``) never import torch, so they start fast and run on cluster nodes without it.
``record`` and ``demo`` import the capture stage (torch) only when they run.

User errors (a missing store, a lag that was not recorded, a malformed ``--ref``...) print
one line ``gradtrace: error: ...`` on stderr and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

EXIT_USAGE = 2
#: libraries ``record`` and ``demo`` need that a plain install lacks, and the extra that brings them
EXTRA_OF = {"torch": "experiments", "torchvision": "experiments", "sklearn": "experiments", "mnist1d": "experiments"}
EXIT_DAMAGED = 1  # `gradtrace verify` found damage (the check itself ran)

STEPS_HELP = (
    "steps to use: 'all' (default), 'A:B' (every recorded step with A <= step <= B), "
    "or a comma list '10,11,12'"
)
PARAMS_HELP = "parameter group: a tensor name, a glob such as 'conv*' or a comma list (default: all)"
OUT_HELP = "write the result to FILE; the extension picks the format: .csv, .json, .nc, .zarr"


class UserError(Exception):
    """A problem with what the user asked for: reported in one line, exit status 2."""


# ------------------------------------------------------------------------------ parsing


def parse_steps(text: str | None):
    """``None``/'all' -> None; 'A:B' -> slice(A, B) (inclusive); '1,2,3' -> [1, 2, 3]; 'N' -> [N]."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    t = text.strip()
    try:
        if ":" in t:
            a, _, b = t.partition(":")
            return slice(int(a) if a.strip() else None, int(b) if b.strip() else None)
        return [int(x) for x in t.split(",") if x.strip()]
    except ValueError as err:
        raise UserError(f"--steps {text!r}: {STEPS_HELP}") from err


def parse_params(text: str | None):
    if text is None or text.strip() in ("", "all"):
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


def parse_ref(text: str):
    """'final', 'step:N', 'mean:A:B', or a path to .npy / .safetensors / PyTorch checkpoint
    (parsed by :func:`analysis.reference.parse_reference`)."""
    from analysis.reference import parse_reference
    from gradtrace_format.errors import BadReferenceError

    try:
        return parse_reference(text)
    except BadReferenceError as err:
        raise UserError(f"--ref: {err}") from None


def parse_tail(text: str | None):
    if text is None:
        return None
    if text.strip().lower() == "epoch":
        return "epoch"
    try:
        n = int(text)
    except ValueError as err:
        raise UserError(f"--exclude-tail {text!r}: give a number of steps or 'epoch'") from err
    if n < 0:
        raise UserError(f"--exclude-tail {text!r}: must be >= 0")
    return n


# ------------------------------------------------------------------------------ helpers


def parse_storage_options(text: str | None) -> dict | None:
    """``--storage-options '{"endpoint_url": "http://...", "anon": true}'`` -> dict (fsspec kwargs)."""
    if not text:
        return None
    try:
        opts = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(f"--storage-options: not JSON ({err.msg}); e.g. '{{\"anon\": true}}'") from err
    if not isinstance(opts, dict):
        raise UserError(f"--storage-options {text!r}: give a JSON object of fsspec options")
    return opts


def _open(store: str, storage_options: str | None = None):
    from analysis.store import open_run

    if "://" not in store and not Path(store).exists():
        raise UserError(f"no store at {store}: check the path (record one with `gradtrace record` or `gradtrace demo`)")
    return open_run(store, storage_options=parse_storage_options(storage_options))


@contextlib.contextmanager
def _scheduler(address: str | None):
    if not address:
        yield None
        return
    try:
        from distributed import Client
    except ImportError as err:  # pragma: no cover - distributed is a dependency
        raise UserError("--scheduler needs the 'distributed' package: pip install distributed") from err
    try:
        client = Client(address, timeout="20s")
    except (OSError, TimeoutError) as err:
        raise UserError(f"--scheduler {address}: cannot connect to a Dask scheduler there ({err})") from err
    with client:
        yield client


def check_output(out: str | None, *, directory: bool = False) -> None:
    """Refuse a bad ``-o`` before any computation: an unknown extension, or a parent directory
    that does not exist (it is not created: a typo would otherwise write somewhere unexpected)."""
    if not out:
        return
    from analysis.io import SUFFIXES

    path = Path(out)
    if not directory and path.suffix.lower() not in SUFFIXES:
        raise UserError(
            f"-o {out}: unknown extension {path.suffix or '(none)'!r}; the extension picks the format: "
            f"{', '.join(SUFFIXES)}"
        )
    parent = path.absolute().parent
    if not parent.is_dir():
        raise UserError(f"-o {out}: directory {parent} does not exist; create it first (mkdir -p {parent})")


def _check_out(args) -> None:
    """Before any work: ``-o`` must not replace what exists (without --force: anything; with it:
    only a result gradtrace wrote) and must not point into the input store."""
    out = getattr(args, "output", None)
    if not out:
        return
    store = getattr(args, "store", None)
    if store and "://" not in store:
        o, st = Path(out).resolve(), Path(store).resolve()
        if o == st or st in o.parents:
            raise UserError(f"-o {out} is the input store {store} or inside it: write the result elsewhere")
    if args.command == "report":
        _check_report_dir(Path(out), bool(getattr(args, "force", False)))
        return
    from analysis.io import check_output as check_existing

    check_existing(out, bool(getattr(args, "force", False)))


def _check_report_dir(out: Path, force: bool) -> None:
    from gradtrace.report import REPORT_MARK

    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise UserError(f"{out} exists and is not a report directory: choose another -o")
    if not force and any(out.iterdir()):
        raise UserError(f"{out} already exists: choose another -o, or pass --force to replace a report written before")
    if any(out.iterdir()) and not (out / REPORT_MARK).exists():
        raise UserError(f"{out} is a directory that `gradtrace report` did not write: refusing to write into it, "
                        "even with --force")


def _save(result, out: str | None, force: bool = False) -> None:
    if not out:
        return
    from analysis.io import save_result

    path = save_result(result, out, force=force)
    print(f"wrote {path}")


def _fmt(x) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if x != x:
        return "nan"
    return f"{x:+.4f}" if abs(x) < 1e4 else f"{x:.4g}"


def _summary_series(name: str, da) -> str:
    import numpy as np

    v = np.asarray(da.values, dtype=float)
    fin = v[np.isfinite(v)]
    if not fin.size:
        return f"{name}: {v.size} values, all NaN"
    return (
        f"{name}: {v.size} values over steps {int(da['step'].values[0])}..{int(da['step'].values[-1])}; "
        f"mean {_fmt(fin.mean())}, min {_fmt(fin.min())}, max {_fmt(fin.max())}, NaN {int((~np.isfinite(v)).sum())}"
    )


def _print_matrix(da, digits: int = 2, most: int = 12) -> None:
    import numpy as np

    vals = np.asarray(da.values, dtype=float)
    si = da[da.dims[0]].values
    sj = da[da.dims[1]].values
    if len(si) > most:
        print(f"({len(si)} x {len(sj)} matrix; first {most} rows/columns shown)")
    head = "step".rjust(8) + "".join(str(s).rjust(digits + 6) for s in sj[:most])
    print(head)
    for i, s in enumerate(si[:most]):
        row = "".join(("nan" if not np.isfinite(v) else f"{v:.{digits}f}").rjust(digits + 6) for v in vals[i, :most])
        print(str(s).rjust(8) + row)


# ------------------------------------------------------------------------------ commands


def cmd_info(args) -> int:
    from analysis.summary import store_info

    info = store_info(_open(args.store, args.storage_options))
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    from analysis.summary import format_info

    print(format_info(info))
    return 0


def cmd_index(args) -> int:
    from analysis.index import build_index, open_index

    run = _open(args.store, args.storage_options)
    with _scheduler(args.scheduler):
        res = build_index(run, band=args.band, rebuild=args.rebuild, progress=args.progress)
    what = "every pair of rows" if res["band"] is None else f"lags 0..{res['band']} (rows)"
    if res["rows_computed"] == 0:
        print(f"index of {args.store} is up to date: {res['n_rows']} rows, {what}")
    else:
        print(f"indexed {res['rows_computed']} new rows of {res['n_rows']} ({what}) in {res['seconds']:.2f} s; "
              f"{res['bytes'] / 2**20:.1f} MiB uncompressed")
    idx = open_index(args.store if "://" in args.store else run.path)
    if idx is not None:
        print(_index_answers(idx.band))
    return 0


def _index_answers(band) -> str:
    if band is None:
        return ("instant: corr (matrix, --window, --lag, --mean), signs (all), rsi --ref final|step:N|mean:A:B, "
                "analysis.rsi_all_references")
    return (f"instant: corr --lag L and signs --lag L for L <= {band}, corr --mean H (any H: lag-1 pairs), "
            f"--window with --h <= {band + 1}; everything else runs a pass (rebuild without --band for all pairs)")


def cmd_corr(args) -> int:
    import analysis.correlation as C

    run = _open(args.store, args.storage_options)
    params = parse_params(args.params)
    with _scheduler(args.scheduler):
        if args.window is not None:
            res = C.corr_window(run, args.window, h=args.h, params=params, progress=args.progress)
            _print_matrix(res)
        elif args.lag is not None:
            res = C.lag_series(run, args.lag, parse_steps(args.steps), params=params, progress=args.progress)
            print(_summary_series(f"lag-{args.lag} correlation mu(t, t+{args.lag})", res))
        elif args.mean is not None:
            res = C.mean_corr(run, args.mean, parse_steps(args.steps), params=params, progress=args.progress)
            print(_summary_series(f"mean gradient correlation (h={args.mean})", res))
        else:
            res = C.corr_matrix(run, parse_steps(args.steps), params=params, precision=args.precision,
                                progress=args.progress)
            _print_matrix(res)
    _print_tier(res)
    _save(res, args.output, args.force)
    return 0


def cmd_signs(args) -> int:
    import analysis.signs as S

    run = _open(args.store, args.storage_options)
    params = parse_params(args.params)
    with _scheduler(args.scheduler):
        den = args.denominator
        if args.window is not None:
            res = S.sign_shift_window(run, args.window, h=args.h, params=params, denominator=den,
                                      progress=args.progress)
        elif args.lag is not None:
            res = S.sign_shift_lag(run, args.lag, parse_steps(args.steps), params=params, denominator=den,
                                   progress=args.progress)
        else:
            res = S.sign_shift_matrix(run, parse_steps(args.steps), params=params, denominator=den,
                                      progress=args.progress)
    main = res["sign_shift"] if "sign_shift" in res else res[list(res.data_vars)[0]]
    if main.ndim == 2:
        print(S.LONG_NAME[den] + f" (denominator={den}):")
        _print_matrix(main, digits=1)
    else:
        print(_summary_series(f"sign shift % at lag {args.lag} (denominator={den})", main))
    zero = res.get("zero_share")
    if zero is not None:
        import numpy as np

        z = np.asarray(zero.values, dtype=float)
        print(f"share of coordinates zero at either step: mean {np.nanmean(z):.3f}% (max {np.nanmax(z):.3f}%)")
    if res.attrs.get("answered_by", "pass") != "pass":
        print("answered from the query index")
    _save(res, args.output, args.force)
    return 0


def cmd_rsi(args) -> int:
    from analysis.rsi import by_epoch, rsi

    run = _open(args.store, args.storage_options)
    ref = parse_ref(args.ref)
    with _scheduler(args.scheduler):
        res = rsi(run, ref, steps=parse_steps(args.steps), params=parse_params(args.params),
                    exclude_tail=parse_tail(args.exclude_tail), direction=args.direction,
                    weight_decay=args.weight_decay, progress=args.progress)
    print(f"reference: {res.attrs.get('reference')}")
    print(f"direction: {res.attrs.get('direction')}: {res.attrs.get('direction_definition')}")
    if res.attrs.get("answered_by", "pass") != "pass":
        extra = f", {res.attrs['pass_steps']} steps by a pass" if res.attrs.get("pass_steps") else ""
        print(f"answered from the query index{extra}")
    for v in ("gamma", "rsi", "eb", "eta_star", "distance"):
        if v in res:
            print(_summary_series(v, res[v]))
    import numpy as np

    g = np.asarray(res["gamma"].values, float)
    fin = g[np.isfinite(g)]
    if fin.size:
        print(f"gamma > 0 on {100.0 * (fin > 0).mean():.1f}% of {fin.size} steps")
    if args.per_epoch:
        res = by_epoch(res)
    _save(res, args.output, args.force)
    return 0


def cmd_phases(args) -> int:
    from analysis.phases import phases

    run = _open(args.store, args.storage_options)
    with _scheduler(args.scheduler):
        res = phases(run, h=args.h, steps=parse_steps(args.steps), params=parse_params(args.params),
                       statistic=args.statistic, smooth=args.smooth, zigzag=args.zigzag, share_rule=args.share_rule,
                       progress=args.progress)
    import numpy as np

    labels = np.asarray(res["phase"].values).astype(str)
    counts = {k: int((labels == k).sum()) for k in sorted(set(labels))}
    print("steps per phase: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    share = res.attrs.get("zigzag_share")
    print(f"share of the loss decrease under zigzag: {_fmt(share)} (rule {res.attrs.get('zigzag_share_rule')}: "
          f"only decreases below the previous low count; per-step net rule: {_fmt(res.attrs.get('zigzag_share_net'))})")
    gs = res.attrs.get("gawu_step", -1)
    print(f"GAWU change point (first + to - crossing): {'none' if gs is None or gs < 0 else gs}")
    _save(res, args.output, args.force)
    return 0


def cmd_layers(args) -> int:
    import analysis.layers as L

    run = _open(args.store, args.storage_options)
    with _scheduler(args.scheduler):
        res = L.layer_table(run, parse_steps(args.steps), lag=args.lag, params=parse_params(args.params),
                            exclude_tail=parse_tail(args.exclude_tail), denominator=args.denominator,
                            progress=args.progress)
    import pandas as pd

    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.max_rows", 200):
        print(res.to_dataframe() if hasattr(res, "to_dataframe") else res)
    _save(res, args.output, args.force)
    return 0


def cmd_report(args) -> int:
    from gradtrace.report import write_report

    base = Path(args.store.rstrip("/"))
    if "://" in args.store:  # a URL: the report goes to the current directory
        base = Path(base.name)
    out = args.output or (str(base.with_suffix("")) + "-report")
    if not args.output:
        _check_report_dir(Path(out), args.force)
    with _scheduler(args.scheduler):
        index = write_report(_open(args.store, args.storage_options), out, h=args.h, reference=parse_ref(args.ref),
                             exclude_tail=parse_tail(args.exclude_tail), progress=True)
    print(f"report: {index}")
    return 0


def cmd_verify(args) -> int:
    from gradtrace_format.integrity import verify_store

    store = args.store
    if "://" not in store and not Path(store).exists():
        raise UserError(f"no store at {store}: check the path")
    problems = verify_store(store, storage_options=parse_storage_options(args.storage_options))
    if problems:
        for line in problems:
            print(f"{store}: {line}")
        print(f"gradtrace: {store} is damaged: {len(problems)} problem(s) above; the other steps read as recorded",
              file=sys.stderr)
        return EXIT_DAMAGED
    print(f"{store}: every committed chunk decodes and matches its checksum and the recorded norms")
    return 0


def cmd_record(args) -> int:
    from experiments.recipes import load_config, parse_overrides, run_recipe

    overrides = parse_overrides(args.set or [])
    for key, field in (("model", "model"), ("dataset", "dataset"), ("optimizer", "optimizer"), ("lr", "lr"),
                       ("steps", "steps"), ("epochs", "epochs"), ("batch_size", "batch_size"), ("seed", "seed"),
                       ("schedule", "record"), ("grad_tier", "grad_tier"), ("weight_tier", "weight_tier"),
                       ("device", "device")):
        val = getattr(args, key, None)
        if val is not None:
            overrides[field] = val
    if args.steps is not None and "epochs" not in overrides:
        overrides["epochs"] = None  # --steps replaces a preset's epochs
    if args.epochs is not None and "steps" not in overrides:
        overrides["steps"] = None
    source = args.config or args.preset
    if not source:
        raise UserError("give --preset NAME or --config FILE (see `gradtrace record --list-presets`)")
    config = load_config(source, **overrides)
    path = run_recipe(config, args.out, overwrite=args.overwrite, resume=args.resume, progress=True)
    print(f"store: {path}")
    return 0


def cmd_demo(args) -> int:
    from experiments.recipes import load_config, run_recipe

    out = Path(args.out)
    store = out / "run.zarr"
    overrides = {} if args.steps is None else {"steps": args.steps}
    config = load_config("demo-quick" if args.quick else "demo", **overrides)
    print(f"gradtrace demo: training {config.model} on {config.dataset} with full-batch gradient descent "
          f"(lr {config.lr}), recording every step into {store}")
    t0 = time.perf_counter()
    run_recipe(config, store, overwrite=True, progress=True)
    t1 = time.perf_counter()
    print(f"training + recording took {t1 - t0:.1f} s; writing the report...")
    from gradtrace.report import write_report

    index = write_report(store, out / "report", h=5, progress=True)
    print(f"analysis + figures took {time.perf_counter() - t1:.1f} s")
    print(f"store:  {store}")
    print(f"report: {index}")
    return 0


# ------------------------------------------------------------------------------ parser


def _common(p, *, steps=True, params=True, output=True):
    p.add_argument("store", help="path (or fsspec URL) of a gradtrace run store")
    if steps:
        p.add_argument("--steps", help=STEPS_HELP)
    if params:
        p.add_argument("--params", help=PARAMS_HELP)
    if output:
        p.add_argument("-o", "--output", metavar="FILE", help=OUT_HELP)
        p.add_argument("--force", action="store_true",
                       help="replace an existing -o file or a .zarr result written before (never a run store)")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster: scheduler address, e.g. tcp://10.0.0.5:8786")
    p.add_argument("--progress", action="store_true", default=None, help="show a progress bar")
    _storage_flag(p)


STORAGE_HELP = (
    "fsspec options of a remote store as JSON, e.g. '{\"endpoint_url\": \"http://minio:9000\", \"anon\": true}' "
    "(credentials are better left to the environment: AWS_ACCESS_KEY_ID or FSSPEC_S3_KEY...)"
)


def _denominator_flag(p) -> None:
    p.add_argument("--denominator", choices=("both_nonzero", "all"), default="both_nonzero",
                   help="sign shift among coordinates non-zero at both steps (both_nonzero, default) or among all "
                   "coordinates (all: the zigzag paper's '~90%% of entries')")


def _storage_flag(p) -> None:
    p.add_argument("--storage-options", metavar="JSON", help=STORAGE_HELP)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gradtrace",
        description="Record a training run's gradients and iterates once; analyse them afterwards.",
    )
    parser.add_argument("--version", action="version", version=f"gradtrace {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("demo", help="train a small CNN on built-in data, record every step, write a report",
                       description="Train a small CNN on scikit-learn's digits with full-batch gradient descent at "
                       "a large learning rate, record every step, and write the report (a few minutes on 2 cores).")
    p.add_argument("--out", default="gradtrace-demo", help="output directory (default: ./gradtrace-demo)")
    p.add_argument("--steps", type=int, help="training steps (default: the demo preset's)")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (seconds; used by the tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("record", help="train a recipe from the papers and record it",
                       description="Train and record one of the papers' set-ups (presets) or a config file (JSON or "
                       "TOML), with flags overriding single settings.")
    p.add_argument("--preset", help="a named recipe (see --list-presets)")
    p.add_argument("--config", help="a JSON or TOML file with RunConfig fields")
    p.add_argument("--out", help="the store to write")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any RunConfig field (repeatable)")
    for flag, typ, hlp in (
        ("--model", str, "model name (cnn3, vgg16, resnet18, resnet34, mlp, cnn1d, resnet_small, linear_deep)"),
        ("--dataset", str, "data set (cifar10, mnist, svhn, digits, mnist1d)"),
        ("--optimizer", str, "gd (full batch), sgd, adam, adamw"),
        ("--lr", float, "learning rate"),
        ("--steps", int, "training steps"),
        ("--epochs", int, "training epochs"),
        ("--batch-size", int, "minibatch size (omit for full batch)"),
        ("--seed", int, "random seed"),
        ("--schedule", str, "recording schedule: every, every:K, at:1,2,3, epoch:K, windows:H:N"),
        ("--grad-tier", str, "fidelity tier of gradients: lossless, rounded[:BITS], sketch[:K]"),
        ("--weight-tier", str, "fidelity tier of weights"),
        ("--device", str, "auto, cpu or cuda"),
    ):
        p.add_argument(flag, type=typ, help=hlp)
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--resume", action="store_true", help="append to an existing store")
    p.add_argument("--list-presets", action="store_true", help="list the named recipes and exit")
    p.set_defaults(func=cmd_record)

    p = sub.add_parser("info", help="what a store holds: steps, schedule, tiers, size, layers, flags, settings")
    p.add_argument("store", help="path (or fsspec URL) of a gradtrace run store")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    _storage_flag(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("index", help="build the query index: T x T products that answer later queries instantly",
                       description="One pass over the store computes <G_i, G_j>, <G_i, V_j>, <V_i, V_j> (V: the weights "
                       "minus a fixed anchor) and the sign counts for every pair of rows (or lags 0..L with --band) and stores them in the store's 'index' "
                       "group. corr, signs and rsi then answer from it. Run it again after a run grew: only the new "
                       "rows are computed.")
    p.add_argument("store", help="path (or fsspec URL) of a gradtrace run store")
    p.add_argument("--rebuild", action="store_true", help="recompute every row (needed to change --band)")
    p.add_argument("--band", type=int, metavar="L", help="store only lags 0..L (rows): for long runs")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster: scheduler address")
    p.add_argument("--progress", action="store_true", default=None, help="show a progress bar")
    _storage_flag(p)
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("corr", help="gradient correlations: full matrix, window, lag series, mean correlation",
                       description="Pairwise gradient correlation mu(j,k) = <G_j,G_k>/(||G_j|| ||G_k||). Default: the "
                       "full matrix over --steps. Lags and windows count training steps.")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--window", type=int, metavar="STEP", help="the h x h window starting at STEP")
    g.add_argument("--lag", type=int, help="the lag-L series mu(t, t+L)")
    g.add_argument("--mean", type=int, metavar="H", help="mean gradient correlation with window H (zigzag paper, eq. 3)")
    p.add_argument("--h", type=int, default=5, help="window size for --window (default 5)")
    p.add_argument("--precision", choices=("float64", "float32"), default="float64",
                   help="float64 (exact, default) or float32 products per block (faster, ~1e-7)")
    p.set_defaults(func=cmd_corr)

    p = sub.add_parser("signs", help="percentage of gradient entries that flip sign between steps",
                       description="Sign shift: % of coordinates with G_j[i] G_k[i] < 0 among those non-zero at both "
                       "steps; the share zero at either step is reported beside it.")
    _common(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--window", type=int, metavar="STEP", help="the h x h window starting at STEP")
    g.add_argument("--lag", type=int, help="the lag-L series")
    p.add_argument("--h", type=int, default=5, help="window size for --window (default 5)")
    _denominator_flag(p)
    p.set_defaults(func=cmd_signs)

    p = sub.add_parser("rsi", help="RSI, EB, gamma, locally optimal lr and distance against a reference point")
    _common(p)
    p.add_argument("--ref", default="final",
                   help="reference w*: final (default), step:N, mean:A:B, or a .npy / .safetensors / PyTorch checkpoint file")
    p.add_argument("--exclude-tail", metavar="N|epoch", help="drop the last N gradient steps, or the last epoch")
    p.add_argument("--per-epoch", action="store_true", help="write per-epoch mean/min/max instead of per-step values")
    p.add_argument("--direction", choices=("gradient", "gradient+wd", "update"), default="gradient",
                   help="D_t in place of G_t: the gradient (default), gradient + weight decay * w_t, or the update "
                   "(w_t - w_t+1) / lr_t; eta* is the best SGD step only for the first two")
    p.add_argument("--weight-decay", type=float, metavar="LAMBDA",
                   help="with --direction gradient+wd: lambda for every tensor (default: the recorded optimizer groups')")
    p.set_defaults(func=cmd_rsi)

    p = sub.add_parser("phases", help="smooth / zigzag / random phases, zigzag share of the loss decrease, GAWU point")
    _common(p)
    p.add_argument("--h", type=int, default=5, help="window of the mean gradient correlation (default 5)")
    p.add_argument("--statistic", choices=("mean_corr", "lag1"), default="mean_corr")
    p.add_argument("--smooth", type=float, default=0.5, help="label smooth above this (default 0.5)")
    p.add_argument("--zigzag", type=float, default=-0.5, help="label zigzag below this (default -0.5)")
    p.add_argument("--share-rule", choices=("record_low", "net"), default="record_low",
                   help="zigzag share: count only decreases below the previous low (record_low, default, in [0, 1]) "
                   "or per-step net decreases (net, can leave [0, 1])")
    p.set_defaults(func=cmd_phases)

    p = sub.add_parser("layers", help="per-layer breakdown: correlation, sign shift, gamma per parameter tensor")
    _common(p)
    p.add_argument("--lag", type=int, default=1, help="lag of the correlation and sign shift (default 1)")
    p.add_argument("--exclude-tail", metavar="N|epoch", help="drop the last N gradient steps from gamma")
    _denominator_flag(p)
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("report", help="every figure into a directory with an index.html")
    p.add_argument("store", help="path (or fsspec URL) of a gradtrace run store")
    p.add_argument("-o", "--output", metavar="DIR", help="output directory (default: STORE-report)")
    p.add_argument("--h", type=int, default=5, help="window size (default 5)")
    p.add_argument("--ref", default="final", help="reference for RSI/EB/gamma (see `gradtrace rsi --help`)")
    p.add_argument("--exclude-tail", metavar="N|epoch", default="1",
                   help="drop the last N gradient steps from RSI/EB/gamma (default 1: gamma_T = 1 is trivial)")
    p.add_argument("--force", action="store_true", help="replace a report directory written before")
    p.add_argument("--scheduler", metavar="ADDRESS", help="run on a Dask cluster")
    _storage_flag(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("verify", help="check every committed chunk of a store: checksums, missing chunks, norms",
                       description="Decode every committed chunk of every array (crc32c checksums, sizes), report "
                       "missing chunks, check flags and the parameter table, and recompute each dense row's squared "
                       "norm against the recorded one. Prints one line per damaged step; exit 1 on damage.")
    p.add_argument("store", help="path (or fsspec URL) of a gradtrace run store")
    _storage_flag(p)
    p.set_defaults(func=cmd_verify)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("gradtrace")
    except Exception:  # noqa: BLE001 - not installed (running from a checkout)
        return "unknown"


def _user_errors() -> tuple[type[BaseException], ...]:
    from gradtrace_format.format import StoreError

    errs: list[type[BaseException]] = [UserError, StoreError, ValueError, FileNotFoundError, FileExistsError,
                                       NotADirectoryError, PermissionError, KeyError]
    return tuple(errs)


def main(argv: list[str] | None = None) -> int:
    import warnings

    # zarr warns that consolidated metadata (written at close, for plain xarray readers) is not
    # in the v3 spec yet; that is known and harmless here, so keep the terminal clean.
    warnings.filterwarnings("ignore", message="Consolidated metadata is currently not part")
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "list_presets", False):
        from experiments.recipes import describe_presets

        for name, doc in describe_presets().items():
            print(f"{name:30s} {doc}")
        return 0
    if args.command == "record" and not args.out:
        print("gradtrace: error: record needs --out PATH (the store to write)", file=sys.stderr)
        return EXIT_USAGE
    debug = os.environ.get("GRADTRACE_DEBUG")
    try:
        output = getattr(args, "output", None)
        if output and "://" not in output:
            check_output(output, directory=args.command == "report")
        _check_out(args)
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe (`gradtrace info ... | head`) surfaces here, not at exit
        return code
    except BrokenPipeError:
        # the reader went away: say nothing, and keep Python from complaining at exit
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print("gradtrace: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as err:
        if debug:
            raise
        missing = (err.name or "").split(".")[0]
        if missing in EXTRA_OF:  # recording needs the harness's libraries, which a plain install lacks
            print(f"gradtrace: error: `gradtrace {args.command}` needs {missing}, which this install lacks: "
                  f'pip install "gradtrace[{EXTRA_OF[missing]}]"', file=sys.stderr)
        else:
            print(f"gradtrace: error: {_one_line(str(err))}", file=sys.stderr)
        return EXIT_USAGE
    except _user_errors() as err:
        if debug:
            raise
        msg = str(err).strip() or type(err).__name__
        if isinstance(err, KeyError):
            msg = f"unknown name {msg}"
        print(f"gradtrace: error: {_one_line(msg)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # noqa: BLE001 - every failure is one line; GRADTRACE_DEBUG=1 shows the traceback
        if debug:
            raise
        where = f" (store {args.store})" if getattr(args, "store", None) else ""
        print(f"gradtrace: error: {type(err).__name__}: {_one_line(str(err))}{where}. "
              "Set GRADTRACE_DEBUG=1 for the traceback.", file=sys.stderr)
        return EXIT_USAGE


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return " ".join(lines)[:2000] if lines else ""


def _print_tier(res) -> None:
    if res.attrs.get("answered_by", "pass") != "pass":
        print(f"answered from the query index ({res.attrs['answered_by']})")
    tier = res.attrs.get("tier")
    if tier and tier != "lossless":
        bound = {k: v for k, v in res.attrs.items() if "bound" in k or "stderr" in k or "error" in k}
        print(f"tier: {tier} {bound}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
