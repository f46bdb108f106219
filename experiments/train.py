"""Training loop of the recipes: build a :class:`~experiments.recipes.RunConfig`, train, record.

:func:`run_recipe` is what ``gradtrace record`` and ``gradtrace demo`` call. One step k
(global step, counted from 0) is::

    G_k = gradient of the step's loss at w_k        (full batch: exact, over micro-batches)
    sched.observe(model)                            (gawu / wu only)
    [clip_grad_norm_ if grad_clip and grad_recorded == "after_clip"]
    recorder.record(k, loss, epoch, lr)             (if the record schedule selects k)
    [clip_grad_norm_ if grad_clip and grad_recorded == "before_clip"]
    optimizer.step(); sched.step()                  (w_{k+1})

and :class:`capture.Recorder` records the final iterate ``w_T`` when it closes. Minibatch
order is a function of ``(seed, epoch)`` alone (one seeded permutation per epoch), so any
step's batch can be rebuilt: a resumed run or a zoom branch sees the same batches as the
original run.

Resuming: while a run is in progress, a checkpoint ``<store>.ckpt.pt`` (model, optimizer,
schedule and step) is written every ~10 % of the steps and removed when the run finishes;
``run_recipe(..., resume=True)`` continues from it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from experiments.recipes import RunConfig

__all__ = ["Built", "build", "run_recipe", "resolve_device", "checkpoint_path", "minibatch_indices",
           "train_config"]


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    return torch.device(name)


@dataclasses.dataclass
class Built:
    """A config made concrete.

    Attributes:
        model: the freshly initialised model (on ``device``).
        X: training inputs ``(N, C, *spatial)`` float32 on ``device``; None for objectives.
        y: labels ``(N,)`` int64; None for objectives.
        loss_fn: ``loss_fn(model(x), y) -> scalar`` batch mean (classifiers); None for
            objectives, whose ``model.loss(batch)`` is the loss.
        device: where the model and data live.
        data_info: what was loaded (data set, N, standardization statistics), stored in the
            header.
    """

    model: nn.Module
    X: torch.Tensor | None
    y: torch.Tensor | None
    loss_fn: Callable | None
    device: torch.device
    data_info: dict

    @property
    def objective(self) -> bool:
        return self.X is None

    @property
    def n(self) -> int:
        if self.X is not None:
            return len(self.X)
        return int(getattr(self.model, "n_samples", 1))

    def batch(self, idx: torch.Tensor | None):
        """The batch of example indices ``idx`` (None: the full training set)."""
        if self.X is None:
            if idx is None or not hasattr(self.model, "x"):
                return None
            return self.model.x[idx], self.model.y[idx]
        if idx is None:
            return self.X, self.y
        return self.X[idx], self.y[idx]

    def step_loss_and_grad(self, batch, micro_batch: int | None) -> float:
        """Set every ``.grad`` to the gradient of the batch's mean loss; return the loss."""
        if self.X is None:
            for p in self.model.parameters():
                p.grad = None
            loss = self.model.loss(batch)
            loss.backward()
            return float(loss.detach())
        from experiments.fullbatch import full_batch_gradient

        return full_batch_gradient(self.model, self.loss_fn, batch, micro_batch)

    @torch.no_grad()
    def full_loss(self, micro_batch: int | None = 2048) -> float:
        """Mean loss over the whole training set at the current weights (no gradient)."""
        if self.X is None:
            return float(self.model.loss(None))
        total, n = 0.0, len(self.X)
        step = n if micro_batch is None else micro_batch
        for lo in range(0, n, step):
            xb, yb = self.X[lo:lo + step], self.y[lo:lo + step]
            total += float(self.loss_fn(self.model(xb), yb)) * len(xb)
        return total / n


def _standardize(X: torch.Tensor) -> tuple[torch.Tensor, list[float], list[float]]:
    dims = [0] + list(range(2, X.ndim))
    mean = X.mean(dim=dims, keepdim=True)
    std = X.std(dim=dims, keepdim=True).clamp_min(1e-8)
    return (X - mean) / std, mean.flatten().tolist(), std.flatten().tolist()


def build(config: RunConfig, *, device: "torch.device | str | None" = None) -> Built:
    """Model, data and loss of a config (the model initialised with ``torch.manual_seed(seed)``).

    Args:
        config: the recipe.
        device: overrides ``config.device``.

    Returns:
        A :class:`Built`.

    Raises:
        experiments.data.DatasetMissingError: a torchvision data set is not on disk.
    """
    from experiments.data import DATASETS, load_dataset
    from experiments.models import build_model
    from experiments.objectives import ALM, SM

    dev = resolve_device(config.device) if device is None else torch.device(device)
    if config.model in ("alm", "sm"):
        kw = {"seed": config.seed, **config.model_kwargs}
        try:
            model = (ALM if config.model == "alm" else SM)(**kw)
        except TypeError as err:
            raise ValueError(f"model {config.model!r}: bad model_kwargs {config.model_kwargs} ({err}); "
                             f"see help(experiments.objectives.{config.model.upper()})") from err
        info = {"objective": config.model, "n": int(getattr(model, "n_samples", 1)),
                "dim": int(model.dim)}
        return Built(model.to(dev), None, None, None, dev, info)
    X, y = load_dataset(config.dataset, root=config.data_root, train=True, n=config.n_train,
                        seed=config.data_seed, **config.dataset_kwargs)
    info: dict = {"dataset": config.dataset, "n": int(len(X)), "input_shape": list(X.shape[1:])}
    if config.standardize:
        X, mean, std = _standardize(X)
        info["standardization"] = {"mean": mean, "std": std}
    torch.manual_seed(config.seed)
    model = build_model(config.model, **DATASETS[config.dataset].model_kwargs(), **config.model_kwargs)
    loss_fn = OneHotMSE(int(y.max()) + 1) if config.loss == "mse" else nn.CrossEntropyLoss()
    return Built(model.to(dev), X.to(dev), y.to(dev), loss_fn, dev, info)


class OneHotMSE(nn.Module):
    """``mean((out - onehot(y))^2)`` over the batch and the C outputs (torch's ``mse_loss``).

    A mean over examples (of the per-example mean over outputs), so micro-batch accumulation
    weighted by examples gives the full-batch value.
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = int(num_classes)

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        target = nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)
        return nn.functional.mse_loss(out, target)


def minibatch_indices(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of ``range(n)`` used in ``epoch`` (a function of seed and epoch only)."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


class _Batches:
    """Batch of any global step: full batch, or slices of a per-epoch permutation."""

    def __init__(self, config: RunConfig, n: int):
        self.full = config.batch_size is None
        self.seed, self.n, self.bs = config.seed, n, config.batch_size
        self.spe = config.steps_per_epoch()
        self._cache: tuple[int, np.ndarray] | None = None

    def epoch_of(self, step: int) -> int:
        return step // self.spe

    def indices(self, step: int) -> torch.Tensor | None:
        if self.full:
            return None
        epoch, pos = divmod(step, self.spe)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, minibatch_indices(self.seed, epoch, self.n))
        lo = pos * self.bs
        return torch.from_numpy(self._cache[1][lo:lo + self.bs].copy())


def checkpoint_path(store: "str | os.PathLike") -> Path:
    """Where an unfinished run keeps its checkpoint: ``<store>.ckpt.pt`` beside the store."""
    p = Path(store)
    return p.with_name(p.name + ".ckpt.pt")


def _schedule_kwargs(config: RunConfig) -> dict:
    return dict(config.lr_schedule_kwargs)


def _build_optim(config: RunConfig, model: nn.Module, total: int):
    from experiments.optim import build_lr_schedule, build_optimizer

    opt = build_optimizer(config.optimizer, model.parameters(), lr=config.lr, momentum=config.momentum,
                          weight_decay=config.weight_decay, nesterov=config.nesterov)
    sched = build_lr_schedule(config.lr_schedule, opt, total_steps=total, **_schedule_kwargs(config))
    return opt, sched


def _nice(x: float) -> int:
    """The 1-2-5 number (1, 2, 5, 10, 20, 50, ...) nearest to x (at least 1)."""
    if x <= 1:
        return 1
    mag = 10 ** math.floor(math.log10(x))
    return int(min((m * mag for m in (1, 2, 5, 10)), key=lambda v: abs(v - x)))


class _Progress:
    """One line every ``every`` steps: step, loss, lr, seconds per step, time left."""

    def __init__(self, progress, total: int, label: str, stream=None):
        if progress is True:
            every = _nice(total / 20)
        elif progress is False or progress is None:
            every = 0
        elif isinstance(progress, int) and progress > 0:
            every = progress
        else:
            raise ValueError(f"progress={progress!r}: give True, False or a number of steps between lines")
        self.every, self.total, self.label = every, total, label
        self.stream = stream or sys.stderr
        self.t0 = time.perf_counter()
        self.done = 0

    def line(self, text: str) -> None:
        if self.every:
            print(text, file=self.stream, flush=True)

    def step(self, i: int, step: int, loss: float, lr: float) -> None:
        self.done = i + 1
        if not self.every or (self.done % self.every and self.done != self.total):
            return
        el = time.perf_counter() - self.t0
        sps = el / self.done
        left = sps * (self.total - self.done)
        where = f"step {step + 1}/{self.total}" if step + 1 == self.done else \
            f"step {step} ({self.done}/{self.total})"
        self.line(f"[{self.label}] {where}  loss {loss:.4f}  "
                  f"lr {lr:.3g}  {sps:.3f} s/step  {el:.0f}s elapsed, ~{left:.0f}s left")


@contextlib.contextmanager
def _threads(n: int | None):
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _record_schedule(config: RunConfig):
    from capture.schedules import parse_schedule, per_epoch

    if config.record.strip() == "epoch":
        return per_epoch(config.steps_per_epoch())
    return parse_schedule(config.record)


def train_config(
    config: RunConfig,
    path: "str | os.PathLike",
    *,
    overwrite: bool = False,
    resume: bool = False,
    progress: "bool | int" = True,
    start_step: int = 0,
    init: Callable[[Built], None] | None = None,
    parent: dict | None = None,
    extra_settings: dict | None = None,
    checkpoint_every: int | None = None,
) -> Path:
    """The training loop behind :func:`run_recipe` and :func:`experiments.zoom.branch`.

    Args:
        config: the recipe.
        path: the run store to write.
        overwrite: replace an existing store (and its checkpoint).
        resume: continue an unfinished run from its checkpoint.
        progress: True (about 20 lines), False, or a number of steps between lines.
        start_step: global step of the first step (a zoom branch continues its parent's
            numbering).
        init: called with the :class:`Built` before training (e.g. restore weights).
        parent: ``{"store", "step"}`` of the run this one branches from (header ``parent``).
        extra_settings: more header settings.
        checkpoint_every: steps between checkpoints (default about 10 % of the run; 0: none).

    Returns:
        The store path.
    """
    from capture.recorder import Recorder

    path = Path(path)
    if resume and overwrite:
        raise ValueError("run_recipe: resume=True and overwrite=True contradict each other; pick one")
    if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
        raise ValueError(f"start_step={start_step!r} must be an int >= 0")
    ckpt = checkpoint_path(path)
    total = config.total_steps()
    first = start_step
    ck_state = None
    if resume:
        ck_state = _load_checkpoint(path, ckpt, config)
        first = int(ck_state["step"])
    elif path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it, "
                              "or resume=True to continue an unfinished run")
    if overwrite and ckpt.exists():
        ckpt.unlink()
    if checkpoint_every is None:
        checkpoint_every = max(1, total // 10)

    with _threads(config.num_threads):
        built = build(config)
        if init is not None:
            init(built)
        model = built.model
        model.train()
        opt, sched = _build_optim(config, model, total)
        if ck_state is not None:
            model.load_state_dict(ck_state["model"])
            opt.load_state_dict(ck_state["optimizer"])
            sched.load_state_dict(ck_state["schedule"])
        batches = _Batches(config, built.n)
        _warn_batch_norm(config, built)
        observes = bool(getattr(sched, "observes_gradients", False))
        settings = {
            "recipe": config.to_dict(),
            "seed": config.seed,
            "data": built.data_info,
            "total_steps": total,
            "steps_per_epoch": config.steps_per_epoch(),
            "start_step": start_step,
            "device": str(built.device),
            **(extra_settings or {}),
        }
        tiers = {"grad": config.grad_tier, "weight": config.weight_tier}
        label = config.name
        prog = _Progress(progress, start_step + total - first, label)
        what = built.data_info.get("dataset") or built.data_info.get("objective")
        prog.line(f"[{label}] {config.model} on {what} ({built.n} examples), {config.optimizer} "
                  f"lr {config.lr:g}, batch {config.batch_size or 'full'}, steps {first}..{start_step + total - 1}"
                  f" -> {path}")
        t0 = time.perf_counter()
        loss = math.nan
        clip = config.grad_clip
        if clip is not None:
            settings["grad_clip"] = clip
        with Recorder(model, path, optimizer=opt, schedule=_record_schedule(config), tiers=tiers,
                      overwrite=overwrite, resume=resume, resume_step=first if resume else None,
                      settings=settings, expected_steps=total + 1, parent=parent,
                      grad_recorded=config.grad_recorded if clip is not None else None) as rec:
            for i, step in enumerate(range(first, start_step + total)):
                batch = built.batch(batches.indices(step))
                loss = built.step_loss_and_grad(batch, config.micro_batch)
                if observes:
                    sched.observe(model)
                lr = float(opt.param_groups[0]["lr"])
                if clip is not None and config.grad_recorded == "after_clip":
                    nn.utils.clip_grad_norm_(model.parameters(), clip)
                rec.record(step, loss=loss, epoch=batches.epoch_of(step), lr=lr)
                if clip is not None and config.grad_recorded == "before_clip":
                    nn.utils.clip_grad_norm_(model.parameters(), clip)  # record() already copied .grad
                opt.step()
                sched.step()
                prog.step(i, step, loss, lr)
                if not math.isfinite(loss):
                    warnings.warn(f"{label}: the loss is {loss} at step {step}; training diverged "
                                  "(lower the learning rate)", RuntimeWarning, stacklevel=2)
                if checkpoint_every and (step + 1 - start_step) % checkpoint_every == 0 \
                        and step + 1 < start_step + total:
                    _save_checkpoint(ckpt, step + 1, config, model, opt, sched)
            seconds = time.perf_counter() - t0
            n_done = start_step + total - first
            summary = {"seconds": round(seconds, 3), "steps_run": n_done,
                       "s_per_step": round(seconds / max(n_done, 1), 5), "last_loss": loss}
            if hasattr(sched, "switch_step"):
                summary["switch_step"] = sched.switch_step
            if rec.writer is not None:  # rank 0: the header keeps the run's summary
                rec.writer.update_settings(training=summary)
        prog.line(f"[{label}] done: {n_done} steps in {seconds:.1f}s ({summary['s_per_step']:.3f} s/step), "
                  f"last loss {loss:.4f}" + (f", GAWU switch at step {summary['switch_step']}"
                                             if summary.get("switch_step") is not None else ""))
    if ckpt.exists():
        ckpt.unlink()
    return path


def _warn_batch_norm(config: RunConfig, built: Built) -> None:
    """Full batches split into micro-batches are not one batch for BatchNorm: say so once."""
    batch = built.n if config.batch_size is None else config.batch_size
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.model.modules())
    if has_bn and config.micro_batch is not None and config.micro_batch < batch:
        warnings.warn(
            f"{config.name}: {config.model} has BatchNorm and each batch of {batch} examples is split into "
            f"micro-batches of {config.micro_batch}, each normalised with its own statistics, so the "
            "recorded gradient is not exactly that of one batch. Raise micro_batch to the batch size if "
            "memory allows, or use a model without BatchNorm for exact full-batch GD.",
            UserWarning, stacklevel=3)


def _save_checkpoint(ckpt: Path, step: int, config: RunConfig, model, opt, sched) -> None:
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    torch.save({"step": int(step), "recipe": config.to_dict(), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "schedule": sched.state_dict()}, tmp)
    os.replace(tmp, ckpt)


def _load_checkpoint(path: Path, ckpt: Path, config: RunConfig) -> dict:
    if not ckpt.exists():
        from gradtrace_format.format import NotAStoreError, read_header

        try:
            header = read_header(path)
        except NotAStoreError:
            header = None
        if header is not None and header.closed and header.has_final:
            raise ValueError(f"resume: {path} is a finished run (closed, final iterate recorded); "
                             "nothing to resume. Record to a new path, or branch from it with experiments.zoom")
        raise ValueError(f"resume: no checkpoint {ckpt} to resume {path} from (checkpoints are written "
                         "every ~10% of the steps); start again with overwrite=True")
    try:  # weights_only: a checkpoint is tensors, numbers and strings; never unpickle code from a file
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, a truncated zip, ...
        raise ValueError(f"resume: cannot load the checkpoint {ckpt} with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it is damaged or "
                         "not a gradtrace checkpoint. Start again with overwrite=True") from None
    if not isinstance(state, dict):
        raise ValueError(f"resume: {ckpt} is not a gradtrace checkpoint (a {type(state).__name__}, not a dict)")
    if state.get("recipe") != config.to_dict():
        theirs, ours = state.get("recipe") or {}, config.to_dict()
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise ValueError(f"resume: {path} was recorded with a different config (fields differ: {diff}); "
                         "resume with the same config, or record to a new path")
    return state


def run_recipe(config: RunConfig, path: "str | os.PathLike", *, overwrite: bool = False,
               resume: bool = False, progress: "bool | int" = True) -> Path:
    """Train ``config`` and record every selected step into the run store at ``path``.

    The header's settings hold the full config (``settings["recipe"]``, so
    :func:`experiments.recipes.config_from_store` rebuilds it), the data actually used
    (``settings["data"]``: N, standardization statistics) and, after the run, a summary
    (``settings["training"]``: seconds, seconds per step, last loss, GAWU switch step).
    Each recorded step carries its loss, epoch and learning rate. Deterministic on CPU for a
    given seed (and thread count).

    Args:
        config: a :class:`RunConfig` (e.g. ``load_config("demo")``).
        path: directory of the run store to create.
        overwrite: replace an existing store at ``path``.
        resume: continue an unfinished run from its checkpoint ``<path>.ckpt.pt``.
        progress: print a line to stderr every ~5 % of the steps (True), never (False), or
            every N steps (an int).

    Returns:
        ``Path(path)``.

    Raises:
        FileExistsError: ``path`` exists and neither overwrite nor resume was given.
        ValueError: bad arguments, or nothing to resume.
        experiments.data.DatasetMissingError: a torchvision data set is not on disk.

    Example:
        >>> from experiments.recipes import load_config
        >>> run_recipe(load_config("demo-quick"), "/tmp/q.zarr", overwrite=True,
        ...            progress=False)                                    # doctest: +SKIP
        PosixPath('/tmp/q.zarr')
    """
    if not isinstance(config, RunConfig):
        raise ValueError(f"run_recipe: config must be a RunConfig (see experiments.recipes.load_config), "
                         f"got {type(config).__name__}")
    return train_config(config, path, overwrite=overwrite, resume=resume, progress=progress)
