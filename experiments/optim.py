"""Optimizers and learning-rate schedules for recipes, by name.

::

    opt = build_optimizer("sgd", model.parameters(), lr=0.1, momentum=0.9)
    sched = build_lr_schedule("warmup_cosine", opt, total_steps=T, warmup_steps=10)
    for k in range(T):
        ...backward...
        if getattr(sched, "observes_gradients", False):
            sched.observe(model)          # GAWU / WU only: after backward, before opt.step()
        opt.step(); sched.step()

Optimizers (:data:`OPTIMIZERS`): ``"gd"`` (plain gradient descent, ``torch.optim.SGD``
without momentum; full batch or not is the data loader's business), ``"sgd"`` (SGD, optional
heavy-ball or Nesterov momentum), ``"adam"`` (L2 weight decay inside the update), ``"adamw"``
(decoupled weight decay). Weight decay applied inside ``optimizer.step()`` is not part of the
recorded gradient (docs/methods.md).

Schedules (:data:`SCHEDULES`), all stepped once per ``optimizer.step()``, with step k's
learning rate set before step k runs:

- ``"constant"``: the optimizer's lr throughout.
- ``"step"``: multiply by ``gamma`` at each of ``milestones``, or every ``step_size`` steps.
- ``"cosine"``: one cosine period from the optimizer's lr to ``eta_min`` at ``total_steps``,
  then ``eta_min`` (no restart, unlike ``CosineAnnealingLR`` past ``T_max``).
- ``"warmup_cosine"``: linear warm-up ``lr * (k + 1) / W`` for the first W = ``warmup_steps``
  steps (Goyal et al. 2017), then the cosine from lr at step W to ``eta_min`` at
  ``total_steps``.
- ``"gawu"``: :class:`experiments.gawu.GAWU` (geometry-adapted warm-up, zigzag paper section 5).
- ``"wu"``: :class:`experiments.gawu.FixedSwitchWU` (the paper's WU, switch at ``switch_step``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, MultiStepLR, StepLR

from experiments.gawu import GAWU, FixedSwitchWU

__all__ = ["OPTIMIZERS", "SCHEDULES", "build_lr_schedule", "build_optimizer", "cosine_factor"]

OPTIMIZERS = ("gd", "sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "cosine", "warmup_cosine", "gawu", "wu")


def _number(fn: str, arg: str, value, *, low: float, low_ok: bool, high: float | None = None):
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_ok else value > low) and (high is None or value < high)
    if not ok:
        bound = f"{'>=' if low_ok else '>'} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{fn}: {arg}={value!r} must be a finite number {bound}")
    return float(value)


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    betas: tuple[float, float] | None = None,
    *,
    nesterov: bool = False,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """Builds an optimizer by name.

    Args:
        name: one of :data:`OPTIMIZERS`.
        params: parameters or parameter groups, as for any ``torch.optim`` optimizer.
        lr: learning rate (> 0). GAWU/WU schedules overwrite it with their ``eta_0``.
        momentum: SGD momentum in [0, 1); must be 0 for ``"gd"``, ``"adam"``, ``"adamw"``
            (Adam's momentum is ``betas[0]``).
        weight_decay: >= 0; L2 inside the update for gd/sgd/adam, decoupled for adamw.
        betas: Adam's ``(beta1, beta2)``, default ``(0.9, 0.999)``; only for adam/adamw.
        nesterov: Nesterov momentum (``"sgd"`` with momentum > 0 only).
        eps: Adam's epsilon.

    Returns:
        A ``torch.optim.Optimizer``.
    """
    fn = "build_optimizer"
    if name not in OPTIMIZERS:
        raise ValueError(f"{fn}: unknown optimizer {name!r}; choose one of {OPTIMIZERS}")
    lr = _number(fn, "lr", lr, low=0.0, low_ok=False)
    momentum = _number(fn, "momentum", momentum, low=0.0, low_ok=True, high=1.0)
    weight_decay = _number(fn, "weight_decay", weight_decay, low=0.0, low_ok=True)
    if name in ("gd", "sgd"):
        if betas is not None:
            raise ValueError(f"{fn}: betas={betas!r} is for adam/adamw; {name!r} takes momentum")
        if name == "gd" and momentum != 0:
            raise ValueError(f"{fn}: 'gd' is plain gradient descent but momentum={momentum}; "
                             "use name='sgd' for momentum")
        if nesterov and momentum == 0:
            raise ValueError(f"{fn}: nesterov=True needs momentum > 0 (and name='sgd')")
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov)
    if momentum != 0:
        raise ValueError(f"{fn}: momentum={momentum} does not apply to {name!r}; set "
                         "betas=(beta1, beta2) instead")
    if nesterov:
        raise ValueError(f"{fn}: nesterov=True applies to 'sgd' only")
    betas = (0.9, 0.999) if betas is None else tuple(betas)
    if len(betas) != 2 or not all(isinstance(b, int | float) and 0 <= b < 1 for b in betas):
        raise ValueError(f"{fn}: betas={betas!r} must be two numbers in [0, 1)")
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def cosine_factor(k: int, start: int, total: int, floor: float) -> float:
    """Cosine from 1 at step ``start`` to ``floor`` at step ``total`` (``floor`` after it)."""
    if k >= total:
        return floor
    return floor + (1 - floor) * (1 + math.cos(math.pi * (k - start) / (total - start))) / 2


_OPTIONS = {  # which keyword options each schedule uses
    "constant": set(),
    "step": {"milestones", "step_size", "gamma"},
    "cosine": {"eta_min"},
    "warmup_cosine": {"warmup_steps", "eta_min"},
    "gawu": {"omega", "eta_0", "max_lr", "eta_min", "window", "warmup_form"},
    "wu": {"switch_step", "omega", "eta_0", "max_lr", "eta_min", "window", "warmup_form"},
}


def build_lr_schedule(
    name: str,
    opt: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int | None = None,
    *,
    eta_min: float | None = None,
    milestones: Iterable[int] | None = None,
    step_size: int | None = None,
    gamma: float | None = None,
    omega: float | None = None,
    eta_0: float | None = None,
    max_lr: float | None = None,
    window: int | None = None,
    switch_step: int | None = None,
    warmup_form: str | None = None,
) -> LRScheduler:
    """Builds a learning-rate schedule by name (see the module docstring for each).

    Options a schedule does not use must be left unset (None): passing ``warmup_steps`` to
    ``"cosine"`` is an error, not silently ignored.

    Args:
        name: one of :data:`SCHEDULES`.
        opt: the optimizer; its groups' ``lr`` is the peak/base learning rate, except for
            gawu/wu whose warm-up starts at ``eta_0`` (default: the first group's lr).
        total_steps: T, the number of ``optimizer.step()`` calls of the run.
        warmup_steps: W for ``"warmup_cosine"`` (0 <= W < T).
        eta_min: final learning rate of the cosine schedules (default 0).
        milestones: steps at which ``"step"`` multiplies by ``gamma``.
        step_size: alternative to milestones: decay every ``step_size`` steps.
        gamma: decay factor of ``"step"`` (default 0.1).
        omega, eta_0, max_lr, window: warm-up growth, start, cap and correlation window of
            gawu/wu (defaults 0.1, the optimizer's lr, no cap, 5).
        switch_step: the fixed switch step of ``"wu"`` (required there).
        warmup_form: gawu/wu warm-up: ``"geometric"`` (default, ``eta_k = exp(omega) eta_{k-1}``)
            or ``"literal"`` (the paper's printed ``eta_k = exp(omega k) eta_{k-1}``).

    Returns:
        A ``torch.optim.lr_scheduler.LRScheduler``; gawu/wu have ``observes_gradients = True``
        and an ``observe(model)`` method to call after backward.
    """
    fn = "build_lr_schedule"
    if name not in SCHEDULES:
        raise ValueError(f"{fn}: unknown schedule {name!r}; choose one of {SCHEDULES}")
    if not isinstance(opt, torch.optim.Optimizer):
        raise ValueError(f"{fn}: opt must be a torch.optim.Optimizer, got {type(opt).__name__}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"{fn}: total_steps={total_steps!r} must be a positive int")
    given = {k: v for k, v in dict(
        warmup_steps=warmup_steps, eta_min=eta_min, milestones=milestones, step_size=step_size,
        gamma=gamma, omega=omega, eta_0=eta_0, max_lr=max_lr, window=window,
        switch_step=switch_step, warmup_form=warmup_form).items() if v is not None}
    unused = sorted(set(given) - _OPTIONS[name])
    if unused:
        raise ValueError(f"{fn}: schedule {name!r} does not use {unused}; it takes "
                         f"{sorted(_OPTIONS[name]) or 'no options'}")
    eta_min = _number(fn, "eta_min", 0.0 if eta_min is None else eta_min, low=0, low_ok=True)

    if name == "constant":
        return LambdaLR(opt, lambda k: 1.0)
    if name == "step":
        gamma = _number(fn, "gamma", 0.1 if gamma is None else gamma, low=0, low_ok=False)
        if (milestones is None) == (step_size is None):
            raise ValueError(f"{fn}: 'step' needs exactly one of milestones=[...] or "
                             f"step_size=N (got milestones={milestones!r}, "
                             f"step_size={step_size!r})")
        if step_size is not None:
            if isinstance(step_size, bool) or not isinstance(step_size, int) or step_size < 1:
                raise ValueError(f"{fn}: step_size={step_size!r} must be a positive int")
            return StepLR(opt, step_size, gamma)
        ms = list(milestones)
        if any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in ms) or (
            ms != sorted(set(ms))
        ):
            raise ValueError(f"{fn}: milestones={milestones!r} must be increasing positive ints")
        return MultiStepLR(opt, ms, gamma)
    if name in ("cosine", "warmup_cosine"):
        w = 0 if warmup_steps is None else warmup_steps
        if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < total_steps:
            raise ValueError(f"{fn}: warmup_steps={warmup_steps!r} must be an int in "
                             f"[0, total_steps={total_steps})")
        lambdas = []
        for group in opt.param_groups:
            base = float(group["lr"])
            if eta_min > base:
                raise ValueError(f"{fn}: eta_min={eta_min} is above the optimizer's lr={base}")
            floor = eta_min / base

            def factor(k: int, floor: float = floor) -> float:
                if k < w:
                    return (k + 1) / w
                return cosine_factor(k, w, total_steps, floor)

            lambdas.append(factor)
        return LambdaLR(opt, lambdas)

    common = {
        "omega": 0.1 if omega is None else omega,
        "eta_0": float(opt.param_groups[0]["lr"]) if eta_0 is None else eta_0,
        "max_lr": max_lr,
        "eta_min": eta_min,
        "window": 5 if window is None else window,
        "warmup_form": "geometric" if warmup_form is None else warmup_form,
    }
    if name == "gawu":
        return GAWU(opt, total_steps, **common)
    if switch_step is None:
        raise ValueError(f"{fn}: schedule 'wu' needs switch_step=s (the paper tried 5, 10, 12)")
    return FixedSwitchWU(opt, total_steps, switch_step, **common)
