"""Exact full-dataset gradients by micro-batch accumulation (the zigzag paper's setting).

Full-batch gradient descent needs ``grad L(w)`` with ``L(w) = 1/N sum_i l(f_w(x_i), y_i)`` over
the whole training set, which rarely fits in memory at once. Summing micro-batch gradients
of the *summed* loss and dividing by N once gives the same vector up to float32 rounding:

    grad L = 1/N sum_b grad (n_b * mean_{i in b} l_i)

Memory is bounded by one micro-batch's activations plus the gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch

__all__ = ["full_batch_gradient"]


def _micro_batches(data, micro_batch: int | None):
    """Yield ``(x, y)`` micro-batches from a tensor pair or an iterable of batches."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        batches: Iterable = [tuple(data)]
    else:
        batches = data
    for batch in batches:
        if not isinstance(batch, (tuple, list)) or len(batch) < 2:
            raise TypeError(
                "full_batch_gradient: data must be a pair of tensors (X, Y) or an iterable of (x, y) "
                f"batches such as a DataLoader; got a batch of type {type(batch).__name__}"
            )
        x, y = batch[0], batch[1]
        n = len(x)
        if len(y) != n:
            raise ValueError(f"full_batch_gradient: a batch has {n} inputs but {len(y)} targets")
        step = n if micro_batch is None else int(micro_batch)
        for lo in range(0, n, step):
            yield x[lo : lo + step], y[lo : lo + step]


def full_batch_gradient(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    data,
    micro_batch: int | None = 1024,
    *,
    reduction: Literal["mean", "sum"] = "mean",
    device: "torch.device | str | None" = None,
) -> float:
    """Set every trainable parameter's ``.grad`` to the gradient of the mean loss over ``data``.

    Args:
        model: the model; its trainable parameters' ``.grad`` are overwritten (not accumulated).
        loss_fn: ``loss_fn(model(x), y)``, returning the batch mean (``reduction="mean"``,
            e.g. ``nn.CrossEntropyLoss()``) or the batch sum (``reduction="sum"``).
        data: ``(X, Y)`` tensors with N rows, or an iterable of ``(x, y)`` batches (a
            DataLoader; every batch is used once).
        micro_batch: largest number of samples per forward/backward (None: whole batches).
        reduction: what ``loss_fn`` returns for a batch.
        device: move each micro-batch there (default: leave it where it is).

    Returns:
        The full-data mean loss ``1/N sum_i l_i`` as a float (one sync at the end).

    Raises:
        ValueError: empty data, a non-positive micro_batch, an unknown reduction.

    Note:
        With BatchNorm in training mode each micro-batch is normalised by its own statistics,
        so the result is not the gradient of one big batch; use ``model.eval()`` or a model
        without batch statistics for exact full-batch GD.
    """
    if micro_batch is not None and int(micro_batch) < 1:
        raise ValueError(f"full_batch_gradient: micro_batch={micro_batch} must be >= 1 (or None)")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"full_batch_gradient: reduction={reduction!r}; use 'mean' or 'sum'")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("full_batch_gradient: the model has no trainable parameters")
    for p in params:
        p.grad = None
    total = 0
    loss_sum = None
    for x, y in _micro_batches(data, micro_batch):
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n = len(x)
        if n == 0:
            continue
        loss = loss_fn(model(x), y)
        if loss.numel() != 1:
            raise ValueError(
                f"full_batch_gradient: loss_fn returned shape {tuple(loss.shape)}; it must reduce the "
                "batch to a scalar (reduction='mean' or 'sum')"
            )
        batch_sum = loss * n if reduction == "mean" else loss
        batch_sum.backward()
        detached = batch_sum.detach().double()
        loss_sum = detached if loss_sum is None else loss_sum + detached
        total += n
    if total == 0:
        raise ValueError("full_batch_gradient: data holds no samples")
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad.div_(total)
    return float(loss_sum / total)


def objective_gradient(model: torch.nn.Module, params, loss_fn, data, micro_batch: int | None = 1024) -> float:
    """:func:`full_batch_gradient` over ``data``, or, with ``data=None``, the gradient of the
    model's own objective ``model.loss(None)`` (the ALM/SM objectives of the recipes) into the
    ``.grad`` of ``params``. Returns the loss as a float."""
    if data is not None:
        return full_batch_gradient(model, loss_fn, data, micro_batch)
    for p in params:
        p.grad = None
    loss = model.loss(None)
    loss.backward()
    return float(loss.detach())
