"""Dynamic String Sampling (seed 003, Freeman and Bruna, Algorithm 1) and the normalized
geodesic length.

Two models ``w_a`` and ``w_b`` with loss below a threshold ``L0`` are connected inside the
level set ``{w : L(w) <= L0}`` if a chain of models ("beads") ``w_a = b_0, b_1, ..., b_n = w_b``
exists whose straight segments all stay below ``L0``. The greedy algorithm builds the chain:

1. start with the chain ``(w_a, w_b)``;
2. for the first segment ``(b_i, b_{i+1})`` whose interpolated loss ``L((1 - t) b_i + t b_{i+1})``
   rises above ``L0`` (evaluated at ``n_points`` evenly spaced t, ends included), take the
   worst point ``t*`` of that segment, train the model started there with full-batch gradient
   descent until its loss is at most ``alpha * L0`` (the paper's alpha < 1 "aids
   convergence"), and insert it between ``b_i`` and ``b_{i+1}``;
3. repeat until every segment stays below ``L0`` (``connected = True``) or ``max_beads`` beads
   were inserted, or a bead cannot be trained below ``alpha * L0`` in ``max_train_steps``
   (``connected = False``: not a proof of disconnection, as the paper says).

The **normalized geodesic length** of the chain is ``sum_i ||b_{i+1} - b_i|| / ||w_b - w_a||``
(>= 1; 1 is the straight line). The loss is checked at the ``n_points`` grid of each segment
only: a narrower bump between grid points is not seen (raise ``n_points``).

Like :mod:`experiments.interpolate`, this needs the model and the data (torch), so it lives in the
capture stage. Endpoints are anything :func:`experiments.interpolate.interpolate` accepts: recorded
steps of ``store`` (``0``, ``"final"``), of a second store (``b_store=``: e.g. the final
weights of two runs), checkpoint files, state dicts or flat vectors::

    from experiments.dss import string_sampling
    ds = string_sampling("runs/a.zarr", "final", "final", b_store="runs/b.zarr", threshold=0.1,
                         lr=0.1)
    ds.attrs["connected"], ds.attrs["normalized_geodesic_length"], ds.attrs["straight_barrier"]
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np
import torch
import xarray as xr
from torch import nn

from experiments.interpolate import (
    model_from_store,
    _data_loss,
    _endpoint,
    _EvalMode,
    _split,
    _trainable,
    flat_parameters,
    set_flat_parameters,
)

__all__ = ["string_sampling", "normalized_geodesic_length"]


def normalized_geodesic_length(beads: "np.ndarray | torch.Tensor") -> float:
    """``sum_i ||b_{i+1} - b_i|| / ||b_n - b_0||`` of a chain ``(n + 1, d)`` (float64).

    Returns:
        The ratio (>= 1); NaN when the two ends coincide.

    Example:
        >>> normalized_geodesic_length(np.array([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]]))  # doctest: +ELLIPSIS
        1.414...
    """
    b = np.asarray(beads, dtype=np.float64)
    if b.ndim != 2 or len(b) < 2:
        raise ValueError(f"normalized_geodesic_length: need a chain of at least 2 points (n, d), got shape {b.shape}")
    path = float(np.sum(np.linalg.norm(np.diff(b, axis=0), axis=1)))
    straight = float(np.linalg.norm(b[-1] - b[0]))
    return path / straight if straight > 0 else float("nan")


def string_sampling(
    store: "str | os.PathLike | None",
    a=0,
    b="final",
    *,
    threshold: float,
    b_store: "str | os.PathLike | None" = None,
    model: nn.Module | None = None,
    data="train",
    loss_fn: Callable | None = None,
    alpha: float = 0.9,
    lr: float = 0.1,
    max_train_steps: int = 500,
    max_beads: int = 32,
    n_points: int = 21,
    micro_batch: int | None = 2048,
    device: "str | torch.device | None" = None,
    keep_weights: bool = True,
) -> xr.Dataset:
    """Greedy Dynamic String Sampling between two models at loss level ``threshold`` (L0).

    Args:
        store: run store of the endpoints given as steps (None when both are vectors, state
            dicts or checkpoints; then ``model`` and ``data`` are needed).
        a, b: endpoints: a recorded step (int), ``"final"``, a checkpoint path, a state dict
            or a flat vector of length d.
        threshold: L0, the loss level (both endpoints must be at or below it).
        b_store: the store of ``b`` when it is a step of another run (same model).
        model, data, loss_fn, micro_batch, device: as :func:`experiments.interpolate.interpolate`
            (default: built from ``store``'s recipe, its training split, and the recipe's
            loss). ``data=None`` with an objective that has its own ``loss`` (ALM/SM, or any
            module with ``loss(None)``).
        alpha: a new bead is trained until its loss is at most ``alpha * L0`` (0 < alpha <= 1).
        lr: learning rate of the beads' full-batch gradient descent.
        max_train_steps: gradient steps allowed per bead.
        max_beads: beads inserted at most.
        n_points: points per segment at which the interpolated loss is checked (>= 3).
        keep_weights: return the beads' flat weights (``bead_weight``, (bead, param)).

    Returns:
        Dataset along ``bead`` (0..n, in chain order) with ``loss`` (each bead's loss),
        ``bead_weight`` (with ``keep_weights``) and along ``segment`` (0..n-1)
        ``segment_max_loss`` (max of the interpolated loss on the segment's grid) and
        ``segment_length`` (``||b_{i+1} - b_i||``); the straight line's profile is
        ``straight_loss`` along ``t``. attrs: ``connected``, ``normalized_geodesic_length``,
        ``threshold``, ``straight_max_loss``, ``straight_barrier`` (max along the straight
        line minus the larger endpoint loss), ``n_beads_inserted``, ``train_steps``,
        ``stopped`` (why it ended), ``a``, ``b``, ``distance``.

    Raises:
        ValueError: an endpoint above the threshold, bad arguments.
    """
    for name, v, ok in (("threshold", threshold, isinstance(threshold, int | float) and math.isfinite(threshold)),
                        ("alpha", alpha, isinstance(alpha, int | float) and 0 < alpha <= 1),
                        ("lr", lr, isinstance(lr, int | float) and lr > 0),
                        ("max_train_steps", max_train_steps, isinstance(max_train_steps, int) and max_train_steps >= 1),
                        ("max_beads", max_beads, isinstance(max_beads, int) and max_beads >= 0),
                        ("n_points", n_points, isinstance(n_points, int) and n_points >= 3)):
        if not ok:
            raise ValueError(f"string_sampling: {name}={v!r} is out of range (threshold finite, 0 < alpha <= 1, "
                             "lr > 0, max_train_steps >= 1, max_beads >= 0, n_points >= 3)")
    model, built, cfg, dev = model_from_store(store, model, data, device, "string_sampling",
                                              "pass model= and data=(X, y) (or data=None for an objective with "
                                              "its own loss)")
    if isinstance(data, str):
        data = _split(built, cfg, data)
    if data is None and not callable(getattr(model, "loss", None)):
        raise ValueError("string_sampling: data=None needs a model with its own loss(batch) (ALM/SM objectives)")
    if loss_fn is None:
        loss_fn = built.loss_fn if built is not None and built.loss_fn is not None else nn.CrossEntropyLoss()

    wa, da = _endpoint(a, store, model, "a")
    wb, db = _endpoint(b, b_store if b_store is not None else store, model, "b")
    ts = np.linspace(0.0, 1.0, n_points)
    params = _trainable(model)

    def loss_at(w: torch.Tensor) -> float:
        set_flat_parameters(model, w)
        with _EvalMode(model):
            return _data_loss(model, data, loss_fn, micro_batch, dev)[0]

    def profile(w0: torch.Tensor, w1: torch.Tensor) -> np.ndarray:
        return np.array([loss_at((1.0 - t) * w0 + t * w1) for t in ts])

    def train(w: torch.Tensor) -> tuple[torch.Tensor, float, int]:
        """Full-batch GD from w until loss <= alpha * L0: (weights, loss, steps taken)."""
        from experiments.fullbatch import objective_gradient

        set_flat_parameters(model, w)
        opt = torch.optim.SGD(params, lr=lr)
        target = alpha * threshold
        for k in range(max_train_steps + 1):
            loss = objective_gradient(model, params, loss_fn, data, micro_batch)
            if loss <= target or not math.isfinite(loss) or k == max_train_steps:
                return flat_parameters(model), loss, k
            opt.step()
        raise AssertionError("unreachable")

    la, lb = loss_at(wa), loss_at(wb)
    for label, lv in (("a", la), ("b", lb)):
        if not lv <= threshold:
            raise ValueError(f"string_sampling: endpoint {label} has loss {lv:.6g} above threshold={threshold:g}; "
                             "train it below the level first or raise the threshold")
    straight = profile(wa, wb)
    beads, bead_loss = [wa, wb], [la, lb]
    seg_max = [float(straight.max())]
    inserted, steps_total, stopped = 0, 0, "every segment below the threshold"
    connected = True
    while True:
        bad = [i for i, m in enumerate(seg_max) if m > threshold]
        if not bad:
            break
        if inserted >= max_beads:
            connected, stopped = False, f"max_beads={max_beads} inserted and a segment still exceeds the threshold"
            break
        i = bad[0]
        prof = profile(beads[i], beads[i + 1])
        t_star = float(ts[int(np.argmax(prof))])
        start = (1.0 - t_star) * beads[i] + t_star * beads[i + 1]
        w_new, l_new, k = train(start)
        steps_total += k
        inserted += 1
        if not l_new <= alpha * threshold:
            connected = False
            stopped = (f"a bead started at t*={t_star:.3g} of segment {i} reached loss {l_new:.4g} > alpha * L0 after "
                       f"{k} steps (raise max_train_steps or lr)")
            break
        beads.insert(i + 1, w_new)
        bead_loss.insert(i + 1, l_new)
        seg_max[i: i + 1] = [float(profile(beads[i], beads[i + 1]).max()),
                             float(profile(beads[i + 1], beads[i + 2]).max())]
    set_flat_parameters(model, wb)
    B = torch.stack(beads).numpy()
    lengths = np.linalg.norm(np.diff(B, axis=0), axis=1)
    ds = xr.Dataset(
        {"loss": ("bead", np.asarray(bead_loss), {"long_name": "loss of each bead"}),
         "segment_max_loss": ("segment", np.asarray(seg_max),
                              {"long_name": f"max interpolated loss on the segment ({n_points} points)"}),
         "segment_length": ("segment", lengths, {"long_name": "||b_(i+1) - b_i||"}),
         "straight_loss": ("t", straight, {"long_name": "loss along (1 - t) w_a + t w_b"})},
        coords={"bead": np.arange(len(beads)), "segment": np.arange(len(beads) - 1), "t": ts},
    )
    if keep_weights:
        ds["bead_weight"] = (("bead", "param"), B)
    ds.attrs = {
        "connected": int(connected),
        "normalized_geodesic_length": normalized_geodesic_length(B),
        "threshold": float(threshold),
        "alpha": float(alpha),
        "straight_max_loss": float(straight.max()),
        "straight_barrier": float(straight.max() - max(la, lb)),
        "n_beads_inserted": int(len(beads) - 2),
        "train_steps": int(steps_total),
        "stopped": stopped,
        "a": da["label"],
        "b": db["label"],
        "distance": float(torch.linalg.vector_norm(wb - wa)),
        "definition": "normalized geodesic length = sum_i ||b_(i+1) - b_i|| / ||w_b - w_a|| over the chain",
    }
    return ds
