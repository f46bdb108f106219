"""Recompute full-batch or fixed-probe-batch gradients at a store's recorded iterates.

The No Wrong Turns measurements use the gradient of the whole training set (or of one fixed
probe batch) at every iterate, not the minibatch gradient the optimizer consumed. From one
recorded run, :func:`recompute_gradients` restores each selected iterate ``w_t`` into the
model, computes

    G'_t = (1/N) sum_{i in S} grad loss_i(w_t)        (S: the whole training set, or a probe batch)

and writes a *sibling store*: the same parameter table, the same steps, ``weight`` rows equal to
the parent's (float32, bit for bit), ``grad`` = G'_t, ``loss`` = the loss on S at w_t, the
parent's ``lr`` and ``epoch``, and the parent's final iterate. Every analysis (``rsi``,
correlations, ...) then runs on the sibling store unchanged. Its header says where the
gradients come from (``settings["recomputed"]``: parent store, gradient source, probe
indices, loss).

Runs in-process (a workstation) or as a batch of dask tasks (``scheduler="threads"``,
``"processes"``, or a ``dask.distributed`` client's address/Client): each task restores and
differentiates a block of steps on its own copy of the model, the driver writes the rows in
step order as blocks arrive (memory: a few blocks of gradients).

Example::

    from experiments.recompute import recompute_gradients
    recompute_gradients("runs/sgd.zarr", "runs/sgd-fullbatch.zarr")          # full training set
    recompute_gradients("runs/sgd.zarr", "runs/sgd-probe.zarr", probe=1000)  # a fixed probe batch
    ga.rsi("runs/sgd-fullbatch.zarr")                                         # NWT's measurement
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.interpolate import model_from_store

__all__ = ["recompute_gradients", "probe_indices"]


def probe_indices(n: int, size: int, seed: int = 0) -> np.ndarray:
    """The fixed probe batch: the first ``size`` entries of a permutation of ``range(n)`` seeded
    by ``seed`` (numpy ``default_rng``), sorted."""
    if not (isinstance(size, int) and 1 <= size <= n):
        raise ValueError(f"probe={size!r} must be an int in [1, {n}] (examples in the probe batch)")
    return np.sort(np.random.default_rng(seed).permutation(n)[:size])


def _grad_block(store: str, steps: list[int], model: nn.Module, data, loss_fn, micro_batch, device, copy_model: bool):
    """(steps, grads (n, d) float32, weights (n, d) float32, losses (n,)) for a block of steps."""
    from experiments.fullbatch import objective_gradient
    from experiments.interpolate import _trainable
    from capture.recorder import restore_weights

    if copy_model:  # a dask task: its own model, so threads never share parameters
        model = copy.deepcopy(model)
    model.to(device)
    params = _trainable(model)
    grads, weights, losses = [], [], []
    for s in steps:
        restore_weights(model, store, int(s))
        loss = objective_gradient(model, params, loss_fn, data, micro_batch)
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1)
                                .to("cpu", torch.float32) for p in params]).numpy())
        weights.append(torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in params]).numpy())
        losses.append(loss)
    return list(steps), np.stack(grads), np.stack(weights), np.asarray(losses, dtype=np.float64)


def recompute_gradients(
    store: "str | os.PathLike",
    out: "str | os.PathLike",
    *,
    steps=None,
    model: nn.Module | None = None,
    data="train",
    probe: int | None = None,
    probe_seed: int = 0,
    loss_fn: Callable | None = None,
    micro_batch: int | None = 2048,
    device: "str | torch.device | None" = None,
    tiers="lossless",
    overwrite: bool = False,
    block: int = 16,
    scheduler=None,
    parallel: int | None = None,
) -> Path:
    """Write a sibling store whose gradients are recomputed at ``store``'s iterates.

    Args:
        store: the recorded run (its weights must be dense: lossless or rounded).
        out: path of the sibling store to create.
        steps: gradient steps of ``store`` to recompute (``analysis`` selection: None = all,
            ``slice(a, b)``, a list); the final iterate is copied as the sibling's final row.
        model: the network (default: built from the store's recipe).
        data: ``"train"`` (the recipe's training split, with its ``n_train`` subset and
            standardization), ``(X, y)`` tensors, or None for an objective with its own loss.
        probe: use a fixed probe batch of this many examples of ``data`` instead of all of it
            (:func:`probe_indices`; the indices are stored in the header).
        probe_seed: seed of the probe batch.
        loss_fn: ``loss_fn(model(x), y)`` batch mean (default: the recipe's loss, else
            cross-entropy).
        micro_batch: examples per forward/backward (the sum is the full-batch gradient).
        device: where to compute (default: the recipe's device, else CPU).
        tiers: tiers of the sibling store (default lossless).
        overwrite: replace an existing ``out``.
        block: steps per task.
        scheduler: None (in-process, one block after another), or a dask scheduler
            (``"threads"``, ``"processes"``, ``"sync"``, a ``distributed.Client`` or its
            address): blocks run as dask tasks, each with its own copy of the model.
        parallel: blocks in flight at once with a scheduler (default: the CPU count).

    Returns:
        ``Path(out)``.

    Raises:
        ValueError: bad arguments, a sketched weight tier, no model/data.
    """
    import analysis
    from capture.recorder import model_table
    from capture.writer import StoreWriter

    store, out = str(store), Path(out)
    run = analysis.open_run(store)
    if not run.dense("weight"):
        raise ValueError(f"recompute_gradients: {store} stores a weight sketch; the iterates cannot be restored")
    sel = [int(s) for s in run.select_steps(steps)]
    if not sel:
        raise ValueError(f"recompute_gradients: steps={steps!r} selects no gradient step of {store}")
    if not (isinstance(block, int) and block >= 1):
        raise ValueError(f"recompute_gradients: block={block!r} must be a positive int")
    model, built, cfg, dev = model_from_store(store, model, data, device, "recompute_gradients")
    if isinstance(data, str):
        if data != "train":
            raise ValueError(f"recompute_gradients: data={data!r}; use 'train', (X, y) or None")
        data = None if built.objective else (built.X, built.y)
    if data is None and not callable(getattr(model, "loss", None)):
        raise ValueError("recompute_gradients: data=None needs a model with its own loss(batch) (ALM/SM)")
    if loss_fn is None:
        loss_fn = built.loss_fn if built is not None and built.loss_fn is not None else nn.CrossEntropyLoss()
    source = "objective's own loss" if data is None else f"full batch ({len(data[0])} examples)"
    idx = None
    if probe is not None:
        if data is None:
            raise ValueError("recompute_gradients: probe= needs data (X, y)")
        idx = probe_indices(len(data[0]), probe, probe_seed)
        it = torch.from_numpy(idx).to(data[0].device)
        data = (data[0][it], data[1][it])
        source = f"fixed probe batch ({probe} examples, seed {probe_seed})"

    table = model_table(model)
    if [t.to_json() for t in table] != [t.to_json() for t in run.header.tensors]:
        raise ValueError(f"recompute_gradients: the model's parameter table differs from {store}'s; build the same model")
    settings = {
        "recomputed": {
            "parent": store,
            "gradient": source,
            "probe_indices": None if idx is None else [int(i) for i in idx],
            "probe_seed": None if idx is None else int(probe_seed),
            "loss": type(loss_fn).__name__ if data is not None else "objective",
            "note": "grad = gradient of the mean loss over the set at the parent's recorded weights; weight, lr, "
                    "epoch copied from the parent; loss = the set's mean loss at w_t",
        },
        "parent_settings": run.header.settings,
    }
    lr = np.asarray(run.ds["lr"].values)
    ep = np.asarray(run.ds["epoch"].values)
    rows = {int(s): r for s, r in zip(sel, run.rows_of(sel))}
    writer = StoreWriter(out, run.header.tensors, _tiers(tiers), mode="overwrite" if overwrite else "create",
                         expected_steps=len(sel) + 1, settings=settings)
    blocks = [sel[i: i + block] for i in range(0, len(sel), block)]
    try:
        for st, g, w, loss in _blocks(store, blocks, model, data, loss_fn, micro_batch, dev, scheduler, parallel):
            for k, s in enumerate(st):
                r = rows[s]
                writer.append(s, g[k], w[k], loss=float(loss[k]), lr=float(lr[r]), epoch=int(ep[r]))
        fin = run.final_step
        if fin is not None:
            fw = np.asarray(run.ds["weight"].isel(step=int(run.rows_of([fin])[0])).values, dtype=np.float32)
            writer.close(final_weight=fw, final_step=fin, epoch=int(ep[run.rows_of([fin])[0]]))
        else:
            writer.close()
    except BaseException:
        writer.abort()
        raise
    return out


def _tiers(tiers) -> dict:
    from gradtrace_format import format as fmt

    if isinstance(tiers, dict):
        return {a: fmt.Tier.parse(tiers.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
    return {a: fmt.Tier.parse(tiers) for a in fmt.DATA_ARRAYS}


def _blocks(store, blocks, model, data, loss_fn, micro_batch, dev, scheduler, parallel):
    """Yield each block's result in step order, in-process or through dask."""
    if scheduler is None:
        for st in blocks:
            yield _grad_block(store, st, model, data, loss_fn, micro_batch, dev, False)
        return
    import dask

    client = None
    if not isinstance(scheduler, str) or "://" in scheduler:
        from distributed import Client

        client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    wave = max(1, int(parallel or os.cpu_count() or 1))
    for i in range(0, len(blocks), wave):
        tasks = [dask.delayed(_grad_block, pure=False)(store, st, model, data, loss_fn, micro_batch, dev, True)
                 for st in blocks[i: i + wave]]
        if client is not None:
            results = client.gather(client.compute(tasks))
        else:
            results = dask.compute(*tasks, scheduler=scheduler)
        yield from results
