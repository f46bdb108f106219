"""Loss along the straight line between two iterates, and its barrier (seed 003; docs/methods.md).

For endpoints ``w_a`` and ``w_b`` (flat parameter vectors of length d) and ``alpha`` in
[0, 1], the path is ``w(alpha) = (1 - alpha) w_a + alpha w_b`` and the barrier is

    barrier = max_alpha L(w(alpha)) - max(L(w_a), L(w_b))

(0 when the loss never rises above the higher endpoint; Goodfellow et al. 2015 found none
between initialisation and solution for many networks). Needs the model and the data, so it
lives in the capture stage (torch)::

    from experiments.interpolate import interpolate
    ds = interpolate("runs/demo.zarr", 0, "final", n_points=21)     # model and data from the recipe
    ds.loss.plot(); ds.attrs["barrier"]

Endpoints may be recorded steps of the store, ``"final"`` (the final iterate), a state dict,
a checkpoint file (``torch.save`` of a state dict or of ``{"model": state_dict}``) or a flat
vector. Only trainable parameters are interpolated; buffers keep the model's values.

BatchNorm: running statistics are not recorded, so models with BatchNorm are evaluated with
batch statistics (training-mode normalisation per micro-batch, no gradient, buffers restored
afterwards) rather than with stale running averages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

__all__ = ["interpolate", "barrier_height", "flat_parameters", "set_flat_parameters"]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in model.named_parameters() if p.requires_grad]


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """Trainable parameters in ``named_parameters()`` order, flattened: float64 ``(d,)`` on CPU."""
    return torch.cat([p.detach().reshape(-1).to("cpu", torch.float64) for p in _trainable(model)])


@torch.no_grad()
def set_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Write a flat vector ``(d,)`` into the trainable parameters (inverse of :func:`flat_parameters`)."""
    params = _trainable(model)
    d = sum(p.numel() for p in params)
    if flat.numel() != d:
        raise ValueError(f"a vector of length {flat.numel()} does not fit the model's {d} trainable "
                         "parameters; pass a vector of the same model")
    pos = 0
    for p in params:
        n = p.numel()
        p.copy_(flat[pos:pos + n].view(p.shape).to(p.device, p.dtype))
        pos += n


def barrier_height(loss: "xr.DataArray | Sequence[float] | np.ndarray") -> float:
    """``max(loss) - max(loss[0], loss[-1])`` of a loss profile whose ends are the endpoints.

    Args:
        loss: losses along the path, first and last entries at alpha = 0 and 1 (an xarray
            DataArray along ``alpha`` or any 1-D sequence).

    Returns:
        The barrier (>= 0); NaN when any loss is NaN/Inf.

    Example:
        >>> barrier_height([1.0, 1.5, 0.5])
        0.5
    """
    v = np.asarray(loss.values if isinstance(loss, xr.DataArray) else loss, dtype=np.float64).ravel()
    if v.size < 2:
        raise ValueError(f"barrier_height: need a profile with both endpoints, got {v.size} value(s)")
    if not np.isfinite(v).all():
        return float("nan")
    return float(v.max() - max(v[0], v[-1]))


def _endpoint(spec, store, model: nn.Module, what: str) -> tuple[torch.Tensor, dict]:
    """(flat float64 vector, description) of one endpoint."""
    from analysis.reference import unwrap_checkpoint
    from capture.recorder import restore_weights

    if isinstance(spec, str) and spec == "final" or isinstance(spec, int | np.integer) and not isinstance(spec, bool):
        if store is None:
            raise ValueError(f"{what}={spec!r} is a recorded step, but no store was given")
        import analysis

        run = analysis.open_run(store)
        step = spec
        if spec == "final":
            step = run.final_step
            if step is None:
                raise ValueError(f"{what}='final': {store} has no final iterate (the run was not closed)")
        run.rows_of([int(step)])  # StepNotFoundError naming the nearest recorded steps
        restore_weights(model, store, int(step))
        return flat_parameters(model), {"kind": "step", "step": int(step), "label": f"step {int(step)}"}
    if isinstance(spec, str | os.PathLike):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"{what}={spec!r} is neither a recorded step (an int), 'final', nor an "
                             "existing checkpoint file")
        sd = unwrap_checkpoint(torch.load(path, map_location="cpu", weights_only=True), str(path))
        model.load_state_dict(sd)
        return flat_parameters(model), {"kind": "checkpoint", "label": str(path)}
    if isinstance(spec, Mapping):
        model.load_state_dict(unwrap_checkpoint(spec, what))
        return flat_parameters(model), {"kind": "state_dict", "label": "state dict"}
    if isinstance(spec, np.ndarray | torch.Tensor):
        vec = torch.as_tensor(spec).detach().reshape(-1).to("cpu", torch.float64)
        d = sum(p.numel() for p in _trainable(model))
        if vec.numel() != d:
            raise ValueError(f"{what}: a vector of length {vec.numel()}, but the model has {d} trainable "
                             "parameters")
        return vec, {"kind": "vector", "label": "vector"}
    raise ValueError(f"{what}={spec!r}: give a recorded step (int), 'final', a checkpoint path, a "
                     "state dict or a flat vector")


class _EvalMode:
    """eval() for everything but BatchNorm (batch statistics); restores flags and buffers."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = {m: m.training for m in self.model.modules()}
        self.buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}
        self.model.eval()
        self.batch_norm = False
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                self.batch_norm = True
        return self

    def __exit__(self, *exc):
        for m, flag in self.flags.items():
            m.train(flag)
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                if n in self.buffers:
                    b.copy_(self.buffers[n])


@torch.no_grad()
def _data_loss(model, data, loss_fn, micro_batch, device) -> tuple[float, float]:
    """(mean loss, accuracy) over ``data``; accuracy NaN when targets are not class labels."""
    if data is None:  # ALM / SM objective: its own full-data loss
        return float(model.loss(None)), math.nan
    X, y = data
    n = len(X)
    step = n if micro_batch is None else int(micro_batch)
    total, correct = 0.0, 0
    classes = y.dtype in (torch.int64, torch.int32) and y.ndim == 1
    for lo in range(0, n, step):
        xb, yb = X[lo:lo + step].to(device), y[lo:lo + step].to(device)
        out = model(xb)
        total += float(loss_fn(out, yb)) * len(xb)
        if classes and out.ndim == 2:
            correct += int((out.argmax(1) == yb).sum())
    return total / n, (correct / n if classes else math.nan)



def model_from_store(store, model, data, device, what: str, hint: str = "pass model= and data=(X, y)"):
    """``(model, built, cfg, device)`` for a tool that evaluates a store's model: the recipe's
    model rebuilt from the store when ``model`` is None or ``data`` names a split, else the
    given model; moved to ``device`` (default: the recipe's, else the model's own)."""
    built = cfg = None
    if model is None or isinstance(data, str):
        if store is None:
            raise ValueError(f"{what}: without a store, {hint}")
        from experiments.recipes import config_from_store
        from experiments.train import build

        cfg = config_from_store(store)
        built = build(cfg, device=device)
    if model is None:
        model = built.model
    dev = torch.device(device) if device is not None else (
        built.device if built is not None else next(model.parameters()).device)
    model.to(dev)
    return model, built, cfg, dev

def interpolate(
    store: "str | os.PathLike | None",
    a=0,
    b="final",
    *,
    model: nn.Module | None = None,
    data: "str | tuple[torch.Tensor, torch.Tensor]" = "train",
    loss_fn: Callable | None = None,
    n_points: int = 21,
    alphas: "Sequence[float] | np.ndarray | None" = None,
    micro_batch: int | None = 2048,
    device: "str | torch.device | None" = None,
) -> xr.Dataset:
    """Loss along ``(1 - alpha) w_a + alpha w_b`` and the barrier height.

    Args:
        store: the run store holding the endpoints given as steps (None when both endpoints
            are state dicts, checkpoints or vectors; then ``model`` and ``data`` are needed).
        a: first endpoint: a recorded step (int), ``"final"``, a checkpoint path, a state
            dict, or a flat vector of length d.
        b: second endpoint, same forms (default the final iterate).
        model: the network (its parameter table must match the store's). Default: built from
            the store's recipe (``settings["recipe"]``, see
            :func:`experiments.recipes.config_from_store`).
        data: ``(X, y)`` tensors, or ``"train"`` / ``"test"``: that split of the recipe's data
            set (with the recipe's ``n_train`` subset and standardization for "train"; the
            test split is standardized with the training statistics). None for an ALM/SM
            objective passed as ``model`` (its own full-data loss); ignored by ALM/SM.
        loss_fn: ``loss_fn(model(x), y)`` batch mean; default the recipe's loss (built from
            the store), else cross-entropy.
        n_points: number of evenly spaced alphas in [0, 1] (>= 2), ends included.
        alphas: explicit alphas instead (must start at 0 and end at 1 for the barrier).
        micro_batch: examples per forward pass.
        device: where to evaluate (default: the recipe's device, else CPU).

    Returns:
        Dataset along ``alpha`` with ``loss`` (mean full-data loss) and, for classifiers,
        ``accuracy``; attrs: ``barrier`` (docs/methods.md: max along path - max endpoint loss),
        ``loss_a``, ``loss_b``, ``a``, ``b`` (labels), ``steps`` (the endpoints' steps,
        -1 for non-steps), ``distance`` (``||w_b - w_a||``), ``n_examples``, ``store``,
        ``batch_norm`` (whether batch statistics were used).

    Raises:
        ValueError: a malformed endpoint, alphas not spanning [0, 1], no model/data.
        gradtrace_format.format.StoreMismatchError: the model does not match the store.

    Example:
        >>> ds = interpolate("runs/demo.zarr", 0, "final", n_points=11)   # doctest: +SKIP
        >>> ds.attrs["barrier"]                                          # doctest: +SKIP
        0.0
    """
    if alphas is None:
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 2:
            raise ValueError(f"interpolate: n_points={n_points!r} must be an int >= 2 (both endpoints)")
        alphas = np.linspace(0.0, 1.0, n_points)
    alphas = np.asarray(alphas, dtype=np.float64).ravel()
    if alphas.size < 2 or not np.isfinite(alphas).all():
        raise ValueError(f"interpolate: alphas={alphas!r} must hold at least 2 finite values")
    model, built, cfg, dev = model_from_store(store, model, data, device, "interpolate")
    if isinstance(data, str):
        data = _split(built, cfg, data)
    elif data is not None and not (isinstance(data, tuple | list) and len(data) == 2):
        raise ValueError("interpolate: data must be (X, y), 'train' or 'test'")
    if data is not None and hasattr(model, "loss") and built is not None and built.objective:
        data = None
    if data is None and not callable(getattr(model, "loss", None)):
        raise ValueError("interpolate: data=None only works for the ALM/SM objectives (their own loss); "
                         "pass data=(X, y), 'train' or 'test'")
    if loss_fn is None:  # the recipe's own loss (cross-entropy or MSE) when the store has one
        loss_fn = built.loss_fn if built is not None and built.loss_fn is not None else nn.CrossEntropyLoss()

    wa, da = _endpoint(a, store, model, "a")
    wb, db = _endpoint(b, store, model, "b")
    losses, accs = [], []
    with _EvalMode(model) as mode:
        for al in alphas:
            set_flat_parameters(model, (1.0 - al) * wa + al * wb)
            lo, ac = _data_loss(model, data, loss_fn, micro_batch, dev)
            losses.append(lo)
            accs.append(ac)
    set_flat_parameters(model, wb)
    losses = np.asarray(losses)
    spans = bool(np.isclose(alphas[0], 0.0) and np.isclose(alphas[-1], 1.0))
    barrier = barrier_height(losses) if spans else float("nan")
    i0, i1 = int(np.argmin(np.abs(alphas))), int(np.argmin(np.abs(alphas - 1.0)))
    ds = xr.Dataset(
        {"loss": ("alpha", losses, {"long_name": "mean loss at (1 - alpha) w_a + alpha w_b"})},
        coords={"alpha": alphas},
    )
    if not np.isnan(accs).all():
        ds["accuracy"] = ("alpha", np.asarray(accs), {"long_name": "accuracy"})
    ds.attrs = {
        "barrier": barrier,
        "barrier_definition": "max over alpha of loss - max(loss at alpha=0, loss at alpha=1)",
        "loss_a": float(losses[i0]),
        "loss_b": float(losses[i1]),
        "a": da["label"],
        "b": db["label"],
        "steps": [da.get("step", -1), db.get("step", -1)],
        "distance": float(torch.linalg.vector_norm(wb - wa)),
        "n_examples": int(len(data[0])) if data is not None else 0,
        "store": "" if store is None else str(store),
        "batch_norm": "batch statistics" if mode.batch_norm else "none",
    }
    return ds


def _split(built, cfg, which: str):
    if built.objective:
        return None
    if which == "train":
        return built.X, built.y
    if which != "test":
        raise ValueError(f"interpolate: data={which!r}; use 'train', 'test' or (X, y)")
    from experiments.data import load_dataset

    X, y = load_dataset(cfg.dataset, root=cfg.data_root, train=False, **cfg.dataset_kwargs)
    stats = built.data_info.get("standardization")
    if stats:
        shape = (1, -1) + (1,) * (X.ndim - 2)
        X = (X - torch.tensor(stats["mean"]).view(shape)) / torch.tensor(stats["std"]).view(shape)
    return X.to(built.device), y.to(built.device)
