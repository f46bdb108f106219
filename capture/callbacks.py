"""Recording under PyTorch Lightning and the transformers ``Trainer``: one callback each.

::

    from capture.callbacks import LightningCallback, TrainerCallback

    trainer = lightning.pytorch.Trainer(..., callbacks=[LightningCallback("runs/pl.zarr")])
    trainer.fit(module)

    cb = TrainerCallback("runs/hf.zarr", schedule="every:10")
    transformers.Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()

``LightningCallback(path, *, clipping="after", **recorder_options)`` and
``TrainerCallback(path, *, clipping="after", **recorder_options)`` create a
:class:`capture.Recorder` on ``path`` when training starts (``recorder_options`` go to it:
``schedule``, ``tiers``, ``overwrite``, ``resume``, ``settings``...; the optimizer is the
trainer's) and record, once per optimizer step, exactly the gradient the optimizer steps with:

* after backward of the last micro-batch of a gradient-accumulation window (the accumulated
  gradient, ``G_t`` of docs/methods.md), after DDP's all-reduce (only rank 0 writes);
* unscaled under AMP (the trainers unscale before the hook the callback uses);
* ``clipping="after"`` (default): after gradient clipping, i.e. what ``optimizer.step()``
  reads; ``clipping="before"``: the unclipped gradient;
* at the weights ``w_t`` it is applied to, with the trainer's global step (optimizer steps
  taken before this one), epoch, loss and learning rate (``param_groups[0]["lr"]``).

The loss stored with step t is the objective whose gradient ``G_t`` is: the sum over the step's
micro-batches of the losses the trainer ran backward on, before AMP's loss scaling. Lightning:
the accumulation-normalised losses it hands ``on_before_backward`` (so the mean micro-batch
loss). transformers: the ``loss`` of the model's forward per micro-batch, averaged over the
micro-batches, or summed when the Trainer passed the model ``num_items_in_batch`` (it then does
not divide by the accumulation steps: a model that uses the count returns its share of the
step's mean; one that ignores it, such as BERT's classification head in transformers 5, gets
the gradient of the sum, and that sum is stored); NaN when the model returns no loss. Under DDP
it is rank 0's.

The store is closed, with the final iterate, when training ends, and without it when training
fails (Lightning's ``on_exception``). transformers has no failure event: use the callback as a
context manager (``with TrainerCallback(path) as cb: ... trainer.train()``), or call
``cb.close()``; an interpreter exit closes an open store too. Steps committed before a crash stay
readable either way (the store's commit protocol).

Where each framework offers the gradient:

* Lightning: ``clipping="before"`` records in ``on_before_optimizer_step`` (after the closure ran
  backward and AMP unscaled, before Lightning clips); ``"after"`` records from a step pre-hook
  on the optimizer: when the optimizer is handed Lightning's closure (backward + clipping run
  inside ``optimizer.step``), right after that closure returns, else (AMP: ``scaler.step``
  unscales, clipping already done) at the pre-hook itself. With AMP a step the scaler skips
  (Inf/NaN gradient) is not recorded with ``"after"`` and is recorded, flagged, with
  ``"before"``.
* transformers: ``on_pre_optimizer_step`` comes after clipping (``Trainer`` clips, then calls
  it, then ``optimizer.step()``); ``"after"`` records there. Under fp16 the callback hands
  accelerate's ``GradScaler`` to the Recorder, which divides by the loss scale unless the
  scaler already unscaled this step (transformers 5 always has by then, 4.x when it clipped).
  transformers has no event between unscaling and clipping, so with ``clipping="before"``
  and ``max_grad_norm > 0`` the callback takes the clipping over: it sets
  ``args.max_grad_norm = 0`` for the run (restored at the end), records the unclipped
  gradient in ``on_pre_optimizer_step`` and then calls
  ``torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)`` on every rank: the same
  call ``Accelerator.clip_grad_norm_`` makes after unscaling on one device or DDP. (Not
  supported with DeepSpeed or FSDP, which clip their own way: an error says so.)

One optimizer: the first (``trainer.optimizers[0]``) is the one whose steps are recorded;
every trainable parameter of the module is recorded.

lightning and transformers are optional (``pip install "gradtrace[lightning]"``,
``"gradtrace[transformers]"``); this module imports neither until a callback class is used.
"""

from __future__ import annotations

import atexit
import math
import os
import weakref
from typing import Any

__all__ = ["LightningCallback", "TrainerCallback"]

CLIPPING = ("after", "before")


class _Core:
    """What both callbacks share: options, the Recorder, the loss accumulator, closing."""

    def __init__(self, path, clipping: str, recorder_options: dict):
        if clipping not in CLIPPING:
            raise ValueError(f"clipping={clipping!r}: give 'after' (what optimizer.step() reads, default) or 'before'")
        for key in ("optimizer", "scaler"):
            if key in recorder_options:
                raise TypeError(f"the callback passes the trainer's {key} to the Recorder; do not give {key}=")
        self.path = os.fspath(path)
        self.clipping = clipping
        self.options = dict(recorder_options)
        self.rec = None
        self.n_recorded = 0
        self._loss_sum = None
        self._loss_n = 0
        self._atexit = None

    def start(self, model, optimizer, framework: str, scaler=None) -> None:
        from capture.recorder import Recorder

        if self.rec is not None:  # a second fit() with the same callback: close the first store
            self.close(final=True)
        options = {k: v for k, v in self.options.items() if k != "settings"}
        settings = dict(self.options.get("settings") or {})
        settings.setdefault("trainer", framework)
        settings.setdefault("recorded_gradient", f"{self.clipping} clipping, unscaled, accumulated, "
                                                 "once per optimizer step")
        self.rec = Recorder(model, self.path, optimizer=optimizer, settings=settings, scaler=scaler, **options)
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().close(final=False))
        atexit.register(self._atexit)

    def add_loss(self, loss) -> None:
        import torch

        if loss is None:
            return
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        loss = loss.detach().reshape(-1)[:1].to(torch.float64)
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss.to(self._loss_sum.device)
        self._loss_n += 1

    def take_loss(self, mean: bool):
        """The step's loss (sum or mean of what was added since the last step), then reset."""
        s, n = self._loss_sum, self._loss_n
        self._loss_sum, self._loss_n = None, 0
        if s is None:
            return math.nan
        return s / n if mean else s

    def record(self, step: int, epoch: int, loss) -> None:
        if self.rec is None:
            return
        if self.rec.record(int(step), loss=loss, epoch=int(epoch)):
            self.n_recorded += 1

    def close(self, final: bool = True) -> None:
        rec, self.rec = self.rec, None
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        if rec is not None:
            rec.close(record_final=final)

    def summary(self) -> dict | None:
        return None if self.rec is None else self.rec.summary()


# ------------------------------------------------------------------------------ Lightning


def _make_lightning_callback():
    from lightning.pytorch.callbacks import Callback

    class LightningCallback(Callback):
        """Record every optimizer step of a Lightning ``Trainer`` into a gradtrace store.

        Args:
            path: the run store to write (see :class:`capture.Recorder`).
            clipping: ``"after"`` (default: the gradient ``optimizer.step()`` reads, after
                ``gradient_clip_val``) or ``"before"`` (the unclipped gradient).
            **recorder_options: passed to :class:`capture.Recorder` (``schedule``, ``tiers``,
                ``overwrite``, ``resume``, ``settings``, ...).

        The step is ``trainer.global_step`` (optimizer steps before this one), the epoch
        ``trainer.current_epoch``, the loss the mean micro-batch loss of the step, the lr
        ``optimizer.param_groups[0]["lr"]``. See :mod:`capture.callbacks`.
        """

        def __init__(self, path, *, clipping: str = "after", **recorder_options):
            super().__init__()
            self._core = _Core(path, clipping, recorder_options)
            self._hook = None
            self._trainer = None

        # -- state
        @property
        def recorder(self):
            """The :class:`capture.Recorder` while training runs (None before and after)."""
            return self._core.rec

        @property
        def n_recorded(self) -> int:
            return self._core.n_recorded

        def _record(self, trainer) -> None:
            self._core.record(trainer.global_step, trainer.current_epoch, self._core.take_loss(mean=False))

        # -- hooks
        def on_train_start(self, trainer, pl_module):
            opts = trainer.optimizers
            if not opts:
                raise ValueError("LightningCallback: the trainer has no optimizer (configure_optimizers returned none)")
            optimizer = opts[0]
            self._trainer = trainer
            self._core.start(pl_module, optimizer, f"lightning {_version('lightning')}")
            if self._core.clipping == "after":
                self._hook = optimizer.register_step_pre_hook(self._pre_step)

        def on_before_backward(self, trainer, pl_module, loss):
            scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
            if scaler is not None and scaler.is_enabled():  # Lightning hands the scaled loss under AMP
                scale = getattr(scaler, "_scale", None)
                loss = loss.detach() / (scale if scale is not None else scaler.get_scale())
            self._core.add_loss(loss)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self._core.clipping == "before" and optimizer is trainer.optimizers[0]:
                self._record(trainer)

        def _pre_step(self, optimizer, args, kwargs):
            trainer = self._trainer
            if trainer is None or self._core.rec is None:
                return None
            # torch hands the hook step's positional arguments with the optimizer itself first
            off = 1 if args and args[0] is optimizer else 0
            closure = kwargs.get("closure", args[off] if len(args) > off else None)
            if closure is None:  # AMP: scaler.step() after unscaling and clipping
                self._record(trainer)
                return None

            def recording_closure():
                out = closure()  # Lightning: training step, backward, unscale, clipping
                self._record(trainer)
                return out

            if "closure" in kwargs:
                return args, {**kwargs, "closure": recording_closure}
            return (*args[:off], recording_closure, *args[off + 1:]), kwargs

        def _finish(self, final: bool):
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._trainer = None
            self._core.close(final=final)

        def on_train_end(self, trainer, pl_module):
            self._finish(final=True)

        def on_exception(self, trainer, pl_module, exception):
            self._finish(final=False)

        def state_dict(self) -> dict[str, Any]:
            return {"path": self._core.path, "n_recorded": self._core.n_recorded}

        def __repr__(self):
            return f"LightningCallback({self._core.path!r}, clipping={self._core.clipping!r})"

    LightningCallback.__module__ = __name__
    LightningCallback.__qualname__ = "LightningCallback"  # picklable (ddp_spawn): found again through __getattr__
    return LightningCallback


# ------------------------------------------------------------------------------ transformers


def _make_trainer_callback():
    import torch
    import transformers

    if not hasattr(transformers.TrainerCallback, "on_pre_optimizer_step"):
        raise ImportError(f"transformers {transformers.__version__} has no on_pre_optimizer_step event (needs >= 4.46)")

    class TrainerCallback(transformers.TrainerCallback):
        """Record every optimizer step of a transformers ``Trainer`` into a gradtrace store.

        Args:
            path: the run store to write (see :class:`capture.Recorder`).
            clipping: ``"after"`` (default: the gradient ``optimizer.step()`` reads, after
                ``max_grad_norm`` clipping) or ``"before"`` (the unclipped gradient; the
                callback then clips itself, see :mod:`capture.callbacks`).
            **recorder_options: passed to :class:`capture.Recorder`.

        The step is ``state.global_step`` (optimizer steps before this one), the epoch the
        integer epoch, the loss the mean of the micro-batch losses the model returned, the lr
        ``optimizer.param_groups[0]["lr"]`` (the scheduler steps after the optimizer).

        Use it as a context manager to close the store also when training fails
        (transformers has no failure event)::

            with TrainerCallback("runs/hf.zarr") as cb:
                Trainer(model, args, train_dataset=ds, callbacks=[cb]).train()
        """

        def __init__(self, path, *, clipping: str = "after", **recorder_options):
            self._core = _Core(path, clipping, recorder_options)
            self._hook = None
            self._scaler = None
            self._inner = None
            self._summed = False
            self._token_scale = 1
            self._epoch = 0
            self._max_norm = None
            self._args = None
            self._model = None

        @property
        def recorder(self):
            return self._core.rec

        @property
        def n_recorded(self) -> int:
            return self._core.n_recorded

        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            self._finish(final=exc_type is None)

        def close(self, final: bool = True) -> None:
            """Close the store (with the final iterate when ``final``)."""
            self._finish(final=final)

        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if model is None or optimizer is None:
                raise ValueError("TrainerCallback: the Trainer passed no model/optimizer to on_train_begin")
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
            self._model = model
            self._epoch = int(math.floor(state.epoch or 0))
            if self._core.clipping == "before" and args.max_grad_norm and args.max_grad_norm > 0:
                if getattr(args, "deepspeed", None) or getattr(args, "fsdp", None):
                    raise ValueError(
                        "TrainerCallback(clipping='before') cannot take the clipping over under DeepSpeed or FSDP; "
                        "record after clipping (clipping='after') or set max_grad_norm=0"
                    )
                self._max_norm = float(args.max_grad_norm)
                self._args = args
                args.max_grad_norm = 0.0  # the callback clips right after recording
            # accelerate's optimizer carries the GradScaler under fp16: the Recorder divides by the
            # loss scale unless the scaler already unscaled this step (transformers >= 5 always
            # has by this event; 4.x only when it clips)
            self._scaler = getattr(optimizer, "scaler", None)
            if self._scaler is not None and not self._scaler.is_enabled():
                self._scaler = None
            self._inner = inner
            self._core.start(model, inner, f"transformers {transformers.__version__}", scaler=self._scaler)
            self._token_scale = 1
            if getattr(args, "average_tokens_across_devices", False) and args.world_size > 1:
                self._token_scale = int(args.world_size)  # as Trainer.compute_loss scales it
            self._summed = False
            self._hook = model.register_forward_hook(self._forward_hook, with_kwargs=True)

        def _forward_hook(self, module, inputs, kwargs, output):
            if not module.training:
                return
            loss = getattr(output, "loss", None)
            if loss is None and isinstance(output, dict):
                loss = output.get("loss")
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                # given num_items_in_batch (the step's label count), a model returns its micro-batch's
                # share of the step's mean loss: those add up; otherwise each is a mean: average them
                self._summed = kwargs.get("num_items_in_batch") is not None
                self._core.add_loss(loss)

        def on_epoch_begin(self, args, state, control, **kwargs):
            self._epoch = int(math.floor((state.epoch or 0) + 1e-9))

        def on_step_begin(self, args, state, control, **kwargs):
            self._core.take_loss(mean=True)  # forget forwards outside training steps (evaluation)

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            loss = self._core.take_loss(mean=not self._summed)
            if self._summed and self._token_scale != 1:
                loss = loss * self._token_scale
            self._core.record(state.global_step, self._epoch, loss)
            if self._max_norm is not None:
                if self._scaler is not None and not _unscaled(self._scaler, self._inner):
                    self._scaler.unscale_(self._inner)  # as Accelerator.clip_grad_norm_ does first
                torch.nn.utils.clip_grad_norm_((model or self._model).parameters(), self._max_norm)

        def on_train_end(self, args, state, control, **kwargs):
            self._finish(final=True)

        def _finish(self, final: bool):
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            if self._args is not None:
                self._args.max_grad_norm = self._max_norm
                self._args = None
            self._max_norm = None
            self._model = None
            self._core.close(final=final)

        def __repr__(self):
            return f"TrainerCallback({self._core.path!r}, clipping={self._core.clipping!r})"

    TrainerCallback.__module__ = __name__
    TrainerCallback.__qualname__ = "TrainerCallback"  # picklable (ddp_spawn): found again through __getattr__
    return TrainerCallback


def _unscaled(scaler, optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` already ran this step (GradScaler's own record)."""
    state = getattr(scaler, "_per_optimizer_states", {}).get(id(optimizer))
    return state is not None and getattr(state.get("stage"), "name", None) == "UNSCALED"


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:  # noqa: BLE001
        return "?"


_FACTORIES = {
    "LightningCallback": (_make_lightning_callback, "lightning", "lightning"),
    "TrainerCallback": (_make_trainer_callback, "transformers", "transformers"),
}


def __getattr__(name):
    if name in _FACTORIES:
        factory, module, extra = _FACTORIES[name]
        try:
            cls = factory()
        except ImportError as err:
            raise ImportError(
                f"capture.callbacks.{name} needs {module}, which is not installed ({err}); "
                f'pip install "gradtrace[{extra}]"'
            ) from err
        globals()[name] = cls
        return cls
    raise AttributeError(f"module 'capture.callbacks' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
