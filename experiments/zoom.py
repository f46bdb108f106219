"""Zoom: branch a new recorded run from any recorded iterate, with another learning rate.

The zigzag paper (seed 000, section 3.3) "zooms into the local geometry" by training from a
point of the trajectory with a much smaller learning rate and looking at the same gradient
correlations. :func:`branch` restores ``w_t`` from a run store (:func:`capture.restore_weights`),
trains from it and records into a new store whose header names its parent
(``header.parent == {"store": ..., "step": t}``)::

    from experiments.zoom import branch
    child = branch("runs/demo.zarr", 200, None, "runs/demo-zoom200.zarr", lr_factor=0.01, steps=100)

The branch keeps the parent's global step numbers: its first recorded step is ``t``, whose
weights equal the parent's ``w_t`` (so, with full batches, its first gradient equals the
parent's ``G_t``), and its final iterate is at ``t + steps``.

What is not carried over: optimizer state (momentum buffers, Adam moments start from zero)
and BatchNorm running statistics (buffers are not recorded; they keep their initial values).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from experiments.recipes import RunConfig, apply_overrides, config_from_store

__all__ = ["branch"]


def _recorded_lr(store, step: int) -> float | None:
    """The learning rate recorded at ``step`` (None when there is none, e.g. the final iterate)."""
    import analysis

    run = analysis.open_run(store)
    lr = float(run.ds["lr"].sel(step=int(step)).values)
    return lr if math.isfinite(lr) and lr > 0 else None


def _check_step(store, step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"branch: step={step!r} must be a recorded step (an int >= 0)")
    import analysis

    run = analysis.open_run(store)
    run.rows_of([step])  # StepNotFoundError naming the nearest recorded steps
    return step


def branch(
    parent_store: "str | os.PathLike",
    step: int,
    config_or_model: "RunConfig | nn.Module | None" = None,
    out_path: "str | os.PathLike | None" = None,
    *,
    lr: float | None = None,
    lr_factor: float | None = None,
    steps: int = 100,
    record: str = "every",
    data: "tuple[torch.Tensor, torch.Tensor] | None" = None,
    loss_fn: Callable | None = None,
    micro_batch: int | None = 2048,
    overwrite: bool = False,
    progress: "bool | int" = False,
    **overrides,
) -> Path:
    """Train from the iterate ``w_step`` of a recorded run with another learning rate.

    Args:
        parent_store: the recorded run (weights stored lossless or rounded, not sketched).
        step: a recorded step of the parent (its final iterate's step works too).
        config_or_model: what to train:

            - None: the parent's own recipe (``settings["recipe"]`` of a store written by
              :func:`experiments.recipes.run_recipe`);
            - a :class:`RunConfig`: its model, data, optimizer and batch size;
            - an ``nn.Module`` with the parent's parameter table: trained with full-batch
              gradient descent on ``data`` with ``loss_fn``.
        out_path: the branch's store (required).
        lr: the branch's learning rate (constant).
        lr_factor: or the parent's learning rate at ``step`` (as recorded there, so a
            scheduled rate counts; the config's ``lr`` for the final iterate) times this factor. Default when neither is given: 0.01, the 100x
            smaller rate of the paper's zoom experiments.
        steps: number of steps of the branch (its steps are ``step .. step + steps - 1``).
        record: recording schedule of the branch (``"every"``, ``"every:10"``, ...).
        data: ``(X, y)`` for an ``nn.Module`` (ignored with a config).
        loss_fn: for an ``nn.Module``: ``loss_fn(model(x), y)`` batch mean (default
            cross-entropy).
        micro_batch: examples per forward/backward of the full-batch gradient (module case).
        overwrite: replace an existing store at ``out_path``.
        progress: as :func:`experiments.recipes.run_recipe`.
        **overrides: further :class:`RunConfig` fields for the branch (config case), e.g.
            ``optimizer="gd"``.

    Returns:
        ``Path(out_path)``. The header's ``parent`` is ``{"store": str(parent_store),
        "step": step}`` and ``settings["branch"]`` holds the parent, the step, the parent's
        and the branch's learning rates.

    Raises:
        ValueError: bad arguments (the message says which); the parent has no recipe and no
            config or model was given.
        analysis.StepNotFoundError: ``step`` is not recorded in the parent.
        gradtrace_format.format.StoreMismatchError: the model's parameters differ from the parent's,
            or the parent's weights are sketched.

    Example:
        >>> branch("runs/demo.zarr", 200, None, "runs/zoom.zarr", lr_factor=0.01,
        ...        steps=50)                                          # doctest: +SKIP
    """
    from capture.recorder import restore_weights

    if out_path is None:
        raise ValueError("branch: out_path is required (where the branch's store goes)")
    if Path(out_path).resolve() == Path(parent_store).resolve():
        raise ValueError(f"branch: out_path {out_path} is the parent store itself; choose a new path")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"branch: steps={steps!r} must be a positive int")
    if lr is not None and lr_factor is not None:
        raise ValueError(f"branch: give lr={lr} or lr_factor={lr_factor}, not both")
    for name, v in (("lr", lr), ("lr_factor", lr_factor)):
        if v is not None and not (isinstance(v, int | float) and not isinstance(v, bool)
                                  and math.isfinite(v) and v > 0):
            raise ValueError(f"branch: {name}={v!r} must be a finite number > 0")
    step = _check_step(parent_store, step)
    factor = 0.01 if (lr is None and lr_factor is None) else lr_factor
    parent = {"store": str(parent_store), "step": int(step)}

    if isinstance(config_or_model, nn.Module):
        if overrides:
            raise ValueError(f"branch: options {sorted(overrides)} are RunConfig fields; with a model "
                             "pass lr, steps, record, data, loss_fn, micro_batch")
        parent_lr = _recorded_lr(parent_store, step)
        if parent_lr is None and lr is None:
            raise ValueError(f"branch: {parent_store} holds no learning rate at step {step} (the final "
                             "iterate has none); pass lr= explicitly")
        parent_lr = parent_lr or float(lr)
        new_lr = float(lr) if lr is not None else parent_lr * factor
        return _branch_module(config_or_model, parent_store, step, out_path, new_lr, parent_lr, steps,
                              record, data, loss_fn, micro_batch, overwrite, parent)

    if config_or_model is None:
        cfg = config_from_store(parent_store)
    elif isinstance(config_or_model, RunConfig):
        cfg = config_or_model
    else:
        raise ValueError(f"branch: config_or_model must be None, a RunConfig or an nn.Module, got "
                         f"{type(config_or_model).__name__}")
    parent_lr = _recorded_lr(parent_store, step) or float(cfg.lr)  # a schedule's lr at that step
    new_lr = float(lr) if lr is not None else parent_lr * factor
    changes = {"name": f"{cfg.name}-branch{step}", "lr": new_lr, "steps": steps, "epochs": None,
               "lr_schedule": "constant", "lr_schedule_kwargs": {}, "record": record, **overrides}
    cfg = apply_overrides(cfg, changes)

    def init(built) -> None:
        restore_weights(built.model, parent_store, step)

    from experiments.train import train_config

    info = {"parent_store": str(parent_store), "parent_step": int(step), "parent_lr": parent_lr,
            "lr": new_lr, "lr_factor": new_lr / parent_lr,
            "not_carried": "optimizer state, BatchNorm running statistics"}
    return train_config(cfg, out_path, overwrite=overwrite, progress=progress, start_step=step,
                        init=init, parent=parent, extra_settings={"branch": info})


def _branch_module(model, parent_store, step, out_path, lr, parent_lr, steps, record, data, loss_fn,
                   micro_batch, overwrite, parent) -> Path:
    from experiments.fullbatch import full_batch_gradient
    from capture.recorder import Recorder, restore_weights

    if data is None or not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("branch: with an nn.Module, pass data=(X, y), the training set whose full-batch "
                         "gradient drives the branch")
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    restore_weights(model, parent_store, step)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    info = {"parent_store": str(parent_store), "parent_step": int(step), "parent_lr": parent_lr,
            "lr": lr, "lr_factor": lr / parent_lr, "optimizer": "gd (full batch)",
            "not_carried": "optimizer state, BatchNorm running statistics"}
    model.train()
    with Recorder(model, out_path, optimizer=opt, schedule=record, overwrite=overwrite,
                  settings={"branch": info}, expected_steps=steps + 1, parent=parent) as rec:
        for k in range(step, step + steps):
            loss = full_batch_gradient(model, loss_fn, data, micro_batch)
            rec.record(k, loss=loss, epoch=k, lr=lr)
            opt.step()
    return Path(out_path)
