"""Helpers shared by the metric modules: tier attributes, lag bookkeeping, labelling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xarray as xr

from gradtrace_format import format as fmt
from gradtrace_format.errors import LagNotAvailableError, StepNotFoundError
from analysis.store import ParamGroup, Run, as_run


@dataclass(frozen=True)
class Selection:
    """What a metric asks of the store, resolved once: the run, the parameter group, the
    selected gradient steps (increasing), their store rows and which of them hold a
    non-finite gradient (``FLAG_NONFINITE_GRAD``)."""

    run: Run
    group: ParamGroup
    steps: np.ndarray
    rows: np.ndarray
    nonfinite: np.ndarray

    def attrs(self) -> dict:
        """The group's and the tier's attrs (:func:`group_attrs`, :func:`tier_attrs`)."""
        return {**group_attrs(self.group), **tier_attrs(self.run, self.group)}


def select(run, steps=None, params=None) -> Selection:
    """Open ``run`` (a :class:`Run` or a path), select the parameter group and the gradient
    steps (refusing an empty selection, see :func:`selected`), once for a whole metric call."""
    run = as_run(run)
    group = run.params(params)
    sel = selected(run, steps)
    rows = run.rows_of(sel)
    bad = (run.flags[rows] & fmt.FLAG_NONFINITE_GRAD) != 0
    return Selection(run, group, sel, rows, bad)


def selected(run: Run, steps) -> np.ndarray:
    """``run.select_steps(steps)`` (gradient steps), refusing an empty selection."""
    sel = run.select_steps(steps)
    if len(sel) == 0:
        raise StepNotFoundError(
            f"steps={steps!r} selects no gradient step of {run.path} "
            f"(gradient steps: {_span(run.grad_steps)})"
        )
    return sel


def _span(s: np.ndarray) -> str:
    return f"{int(s[0])}..{int(s[-1])}, {len(s)} recorded" if len(s) else "none"


def tier_attrs(run: Run, group: ParamGroup, array: str = "grad") -> dict:
    """Tier of ``array`` and the error bound that comes with it (netCDF-safe attrs).

    * lossless: exact (``max_rel_error`` 0).
    * rounded: per-entry relative error ``u = 2**-(keepbits+1)``; a cosine moves by at most
      ``2 * asin(u)`` (each vector turns by at most ``asin(u)``).
    * sketch: CountSketch estimate; standard error of a cosine ``sqrt((1 + cos^2) / k)``
      (``gradtrace_format.format.sketch_cosine_stderr``) with k the buckets of the sketched tensors.
    """
    tier = run.header.tiers[array]
    out = {"tier": tier.name, f"{array}_tier": tier.name}
    if tier.is_lossless:
        out["max_rel_error"] = 0.0
        out["cosine_error_bound"] = 0.0
    elif tier.rounds:
        u = tier.max_rel_error
        out.update(keepbits=int(tier.keepbits), max_rel_error=u, cosine_error_bound=2.0 * math.asin(min(1.0, u)))
    else:
        k = sketch_k(run, group, array)
        out.update(sketch_dim=int(tier.sketch_dim), sketch_k=int(k),
                   cosine_stderr_at_0=float(fmt.sketch_cosine_stderr(k, 0.0)) if k else 0.0,
                   error_note="CountSketch estimate: stderr of a cosine is sqrt((1 + cos^2) / sketch_k); "
                              "0 when every tensor of the group is stored exactly")
    return out


def sketch_k(run: Run, group: ParamGroup, array: str = "grad") -> int:
    """Buckets of the group's sketched (not exactly copied) tensors; 0 if all are exact."""
    plan = run.sketch_plan(array)
    return int(sum(plan.sizes[i] for i in group.indices if not plan.exact[i]))


def group_attrs(group: ParamGroup) -> dict:
    return {"params": group.label, "n_params": int(group.size), "n_tensors": len(group.indices)}


def nonfinite(run: Run, steps: np.ndarray) -> np.ndarray:
    """True where the gradient of a step holds NaN/Inf (flag ``FLAG_NONFINITE_GRAD``)."""
    return (run.flags[run.rows_of(steps)] & fmt.FLAG_NONFINITE_GRAD) != 0 if len(steps) else np.zeros(0, bool)


def available_lags(grad_steps: np.ndarray, most: int = 12) -> list[int]:
    """The smallest distances (in training steps) between two recorded gradient steps."""
    s = np.asarray(grad_steps)
    if len(s) < 2:
        return []
    diffs = np.unique(np.concatenate([s[k:] - s[:-k] for k in range(1, min(len(s), 64))]))
    return [int(x) for x in diffs[:most]]


def lag_pairs(run: Run, starts: np.ndarray, lag: int) -> tuple[np.ndarray, np.ndarray]:
    """``(t, t + lag)`` for each start t whose partner t + lag has a recorded gradient.

    Raises:
        LagNotAvailableError: no such pair (the message lists the lags that exist).
    """
    lag = int(lag)
    if lag < 1:
        raise LagNotAvailableError(f"lag={lag}: a lag counts training steps and must be >= 1")
    pool = run.grad_steps
    t = np.asarray(starts, dtype=np.int64)
    ok = np.isin(t + lag, pool)
    if not ok.any():
        avail = available_lags(pool)
        raise LagNotAvailableError(
            f"lag {lag} is not available in {run.path}: no two recorded gradient steps are {lag} training "
            f"steps apart among the selected steps (lags count training steps, not rows). Available lags: "
            f"{', '.join(map(str, avail)) or 'none (fewer than two gradient steps)'}"
            f"{', ...' if len(avail) >= 12 else ''}. Ask for one of those."
        )
    return t[ok], t[ok] + lag


def cosines(dots: np.ndarray, sq_a: np.ndarray, sq_b: np.ndarray) -> np.ndarray:
    """``dots / sqrt(sq_a * sq_b)`` clipped to [-1, 1]; NaN where a norm is 0 or not finite."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c = dots / np.sqrt(sq_a * sq_b)
    bad = ~(np.isfinite(sq_a) & np.isfinite(sq_b) & (sq_a > 0) & (sq_b > 0))
    c = np.clip(c, -1.0, 1.0)
    c[bad] = np.nan
    return c


def per_step(values: dict, run: Run, steps: np.ndarray, attrs: dict | None = None) -> xr.Dataset:
    """A Dataset along ``step`` with the epoch/lr/loss coordinates of those steps."""
    coords = {"step": ("step", np.asarray(steps, dtype=np.int64)), **run.step_coords(np.asarray(steps))}
    return xr.Dataset({k: ("step", np.asarray(v)) for k, v in values.items()}, coords=coords, attrs=attrs or {})


def matrix(values: np.ndarray, steps: np.ndarray, name: str, attrs: dict) -> xr.DataArray:
    """A (step_i, step_j) DataArray labelled with step numbers on both dims."""
    steps = np.asarray(steps, dtype=np.int64)
    return xr.DataArray(values, dims=("step_i", "step_j"), coords={"step_i": steps, "step_j": steps},
                        name=name, attrs=attrs)
