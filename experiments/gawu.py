"""Geometry-adapted warm-up (GAWU, seed 000 section 5) and its fixed-switch baseline (WU).

Both schedules warm up exponentially, ``eta_k = exp(omega) * eta_{k-1}`` from ``eta_0``
(docs/methods.md, ``warmup_form="geometric"``, the default). The paper's text prints
``eta_k = exp(omega k) * eta_{k-1}``, which grows super-exponentially,
``eta_k = eta_0 * exp(omega * k (k + 1) / 2)``: ``warmup_form="literal"`` gives that form
(paper values omega = 0.1, eta_0 = 0.001: lr 0.74 at k = 11 against 0.003 geometric). Either
is optionally capped at ``max_lr``, then annealed with one cosine period from the learning
rate at the switch step ``s`` down to ``eta_min`` at ``total_steps``:

    eta_k = min(max_lr, eta_0 * exp(omega * k))           (literal: omega * k (k+1) / 2)   for k <= s
    eta_k = eta_min + (eta_s - eta_min) * (1 + cos(pi * (k - s) / (T - s))) / 2   for s < k < T
    eta_k = eta_min                                                            for k >= T

- :class:`FixedSwitchWU` (the paper's WU) switches at a hand-chosen ``s``.
- :class:`GAWU` chooses ``s`` online: the first step at which the mean gradient correlation
  (zigzag paper, eq. 3, window h) turns from positive to negative, i.e. smooth geometry gave
  way to zigzag. It needs only the previous gradient and the last ``h - 1`` adjacent cosines
  (:class:`OnlineMeanCorrelation`).

Step k is the k-th ``optimizer.step()`` (counted from 0). A training loop::

    sched = GAWU(opt, total_steps=T)            # sets every group's lr to eta_0
    for k in range(T):
        opt.zero_grad(); loss_fn(model(x), y).backward()
        sched.observe(model)                    # after backward, before opt.step()
        opt.step()                              # uses eta_k
        sched.step()                            # sets eta_{k+1}

``observe`` takes the model, an optimizer, an iterable of parameters or gradient tensors, or
one (flat) gradient tensor/array, e.g. the vector a gradtrace Recorder flattened, so it works
with or without a Recorder. The LR is absolute: every parameter group gets the same value.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

#: Warm-up forms: docs/methods.md's per-step factor exp(omega), or the paper's printed exp(omega k).
WARMUP_FORMS = ("geometric", "literal")
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["GAWU", "FixedSwitchWU", "OnlineMeanCorrelation", "gradients_of"]


def gradients_of(obj) -> list[torch.Tensor]:
    """The gradient tensors held by ``obj``, in a fixed order (no copies).

    Args:
        obj: an ``nn.Module`` (its trainable parameters' ``.grad`` in ``named_parameters()``
            order, as gradtrace flattens them); a ``torch.optim.Optimizer`` (the parameters of
            its groups); a single tensor or numpy array (taken as the gradient itself); or an
            iterable mixing parameters (their ``.grad``) and plain tensors (taken as gradients).
            A parameter whose ``.grad`` is None contributes zeros (docs/methods.md).

    Returns:
        List of tensors whose concatenation, flattened, is the gradient ``G`` (length d).
    """
    if isinstance(obj, str | bytes):
        raise ValueError(
            f"cannot read gradients from a {type(obj).__name__}; pass the model, the "
            "optimizer, its parameters, or the gradient tensor itself"
        )
    if isinstance(obj, nn.Module):
        params: Iterable = [p for _, p in obj.named_parameters() if p.requires_grad]
    elif isinstance(obj, torch.optim.Optimizer):
        params = [p for g in obj.param_groups for p in g["params"] if p.requires_grad]
    elif isinstance(obj, np.ndarray):
        return [torch.from_numpy(obj)]
    elif isinstance(obj, torch.Tensor) and not isinstance(obj, nn.Parameter):
        return [obj.detach()]
    elif isinstance(obj, Iterable):
        params = list(obj)
    else:
        raise ValueError(
            f"cannot read gradients from a {type(obj).__name__}; pass the model, the "
            "optimizer, its parameters, or the gradient tensor itself"
        )
    out = []
    for p in params:
        if isinstance(p, np.ndarray):
            out.append(torch.from_numpy(p))
        elif not isinstance(p, torch.Tensor):
            raise ValueError(f"expected tensors or parameters, got a {type(p).__name__}")
        elif isinstance(p, nn.Parameter) or p.requires_grad:
            out.append(p.grad.detach() if p.grad is not None else torch.zeros_like(p.detach()))
        else:
            out.append(p.detach())
    if not out:
        raise ValueError("no gradients found: the object has no trainable parameters")
    return out


class OnlineMeanCorrelation:
    """Mean gradient correlation (zigzag paper, eq. 3) computed online, one step at a time.

    Keeps a copy of the previous gradient and the last ``window - 1`` adjacent cosines
    ``mu(t-1, t) = <G_{t-1}, G_t> / (||G_{t-1}|| ||G_t||)`` (dot products in float64). After
    step t is observed, the trailing mean of those cosines is
    ``1/(h-1) * sum_{m=1}^{h-1} mu(t-h+m, t-h+m+1)``, which is the paper's ``mu_k`` for
    ``k = t - h + 1`` (the window ``{k, ..., k+h-1}`` ends at the newest gradient).

    Undefined values are NaN, never 0: a zero or non-finite gradient has NaN cosines, the mean
    is NaN until ``h - 1`` adjacent cosines exist, and a window holding a NaN is NaN. Lags
    count training steps: if step t-1 was not observed, ``mu(t-1, t)`` is NaN (the previous
    gradient kept is older and is not adjacent).

    Args:
        window: h >= 2 (the paper uses 5).

    Attributes:
        steps: the observed steps t, in order.
        cosines: ``mu(t-1, t)`` for each observed t (NaN for the first).
        means: the trailing mean after each observed t.
    """

    def __init__(self, window: int = 5):
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(
                f"window={window!r} must be an int >= 2 (the mean needs at least one adjacent "
                "pair; the paper uses 5)"
            )
        self.window = window
        self.steps: list[int] = []
        self.cosines: list[float] = []
        self.means: list[float] = []
        self._prev: list[torch.Tensor] | None = None
        self._prev_norm2: torch.Tensor | None = None
        self._recent: deque[float] = deque(maxlen=window - 1)

    def update(self, grads, step: int) -> float:
        """Observes the gradient of training step ``step`` and returns the trailing mean.

        Args:
            grads: anything :func:`gradients_of` accepts (model, optimizer, tensors).
            step: the training step the gradient belongs to; must increase from call to call.

        Returns:
            The trailing mean correlation after this step (NaN while undefined).
        """
        if self.steps and step <= self.steps[-1]:
            raise ValueError(
                f"step={step} is not after the last observed step {self.steps[-1]}; "
                "observe each training step once, in order"
            )
        cur = [g.detach().clone() for g in gradients_of(grads)]
        shapes = [tuple(g.shape) for g in cur]
        norm2 = _sum64(cur, cur)
        cos = math.nan
        if self._prev is not None and self.steps[-1] == step - 1:
            prev_shapes = [tuple(g.shape) for g in self._prev]
            if prev_shapes != shapes:
                raise ValueError(
                    f"the gradient at step {step} has tensor shapes {shapes[:4]}... but the "
                    f"previous one had {prev_shapes[:4]}...; observe the same parameters "
                    "every step"
                )
            dot = _sum64(self._prev, cur)
            # one device sync for the three reductions
            dot_v, n_prev, n_cur = torch.stack([dot, self._prev_norm2, norm2]).tolist()
            finite = all(math.isfinite(v) for v in (dot_v, n_prev, n_cur))
            if finite and n_prev > 0 and n_cur > 0:
                cos = dot_v / (math.sqrt(n_prev) * math.sqrt(n_cur))
                cos = max(-1.0, min(1.0, cos))
        self._recent.append(cos)
        full = len(self._recent) == self.window - 1
        mean = math.fsum(self._recent) / (self.window - 1) if full else math.nan
        self._prev, self._prev_norm2 = cur, norm2
        self.steps.append(step)
        self.cosines.append(cos)
        self.means.append(mean)
        return mean

    def state_dict(self) -> dict:
        """A copy of the state (tensors, lists, numbers only: loads with ``weights_only``)."""
        return {
            "window": self.window,
            "steps": list(self.steps),
            "cosines": list(self.cosines),
            "means": list(self.means),
            "prev": None if self._prev is None else [g.clone() for g in self._prev],
            "prev_norm2": None if self._prev_norm2 is None else self._prev_norm2.clone(),
            "recent": list(self._recent),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a state made by :meth:`state_dict`."""
        self.window = int(state["window"])
        self.steps = list(state["steps"])
        self.cosines = list(state["cosines"])
        self.means = list(state["means"])
        self._prev = None if state["prev"] is None else [g.clone() for g in state["prev"]]
        self._prev_norm2 = state["prev_norm2"]
        self._recent = deque(state["recent"], maxlen=self.window - 1)


def _sum64(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """``sum_i <a_i, b_i>`` in float64, converting one tensor at a time (bounded memory)."""
    total = torch.zeros((), dtype=torch.float64, device=a[0].device)
    for x, y in zip(a, b):
        dot = torch.dot(x.reshape(-1).double(), y.reshape(-1).double())
        total = total + dot.to(total.device)  # parameters may live on several devices
    return total


class FixedSwitchWU(LRScheduler):
    """The paper's WU baseline: exponential warm-up, cosine annealing after a fixed step.

    Args:
        optimizer: the optimizer; every group's ``lr`` is set to ``eta_0`` here.
        total_steps: T, the number of ``optimizer.step()`` calls of the run; the cosine reaches
            ``eta_min`` at step T.
        switch_step: s, the last warm-up step (the cosine starts from ``eta_s``); None never
            switches (pure warm-up, for :class:`GAWU` before it has decided).
        omega: growth exponent per step (paper: 0.1).
        eta_0: learning rate of step 0 (paper: 0.001).
        max_lr: cap of the warm-up (None: no cap).
        eta_min: learning rate at the end of the cosine.
        window: h of the mean gradient correlation tracked by :meth:`observe`.
        warmup_form: ``"geometric"`` (``eta_k = exp(omega) eta_{k-1}``, default) or
            ``"literal"`` (the paper's printed ``eta_k = exp(omega k) eta_{k-1}``).
        track: whether :meth:`observe` computes correlations (False makes it a no-op).
        last_epoch: PyTorch's resume argument; leave at -1.

    Attributes:
        switch_step: s, or None.
        history: trailing mean gradient correlation after each observed step (NaN while
            undefined); ``history_steps`` holds the matching step numbers.
    """

    observes_gradients = True  # recipes call observe(model) between backward and opt.step

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        switch_step: int | None,
        *,
        omega: float = 0.1,
        eta_0: float = 1e-3,
        max_lr: float | None = None,
        eta_min: float = 0.0,
        window: int = 5,
        track: bool = True,
        last_epoch: int = -1,
        warmup_form: str = "geometric",
    ):
        cls = type(self).__name__
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"{cls}: total_steps={total_steps!r} must be a positive int")
        if switch_step is not None and (
            isinstance(switch_step, bool) or not isinstance(switch_step, int) or switch_step < 0
        ):
            raise ValueError(f"{cls}: switch_step={switch_step!r} must be an int >= 0 or None")
        for arg, v in (("omega", omega), ("eta_0", eta_0)):
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"{cls}: {arg}={v!r} must be a finite number > 0 (paper: "
                                 "omega=0.1, eta_0=0.001)")
        if max_lr is not None and not (isinstance(max_lr, int | float) and max_lr >= eta_0):
            raise ValueError(f"{cls}: max_lr={max_lr!r} must be None or a number >= "
                             f"eta_0={eta_0}")
        if not (isinstance(eta_min, int | float) and 0 <= eta_min):
            raise ValueError(f"{cls}: eta_min={eta_min!r} must be a number >= 0")
        if warmup_form not in WARMUP_FORMS:
            raise ValueError(f"{cls}: warmup_form={warmup_form!r}: use 'geometric' (eta_k = exp(omega) eta_(k-1)) "
                             "or 'literal' (the paper's printed eta_k = exp(omega k) eta_(k-1))")
        self.warmup_form = warmup_form
        self.total_steps = total_steps
        self.switch_step = switch_step
        self.omega = float(omega)
        self.eta_0 = float(eta_0)
        self.max_lr = None if max_lr is None else float(max_lr)
        self.eta_min = float(eta_min)
        self.track = track
        self._tracker = OnlineMeanCorrelation(window)
        super().__init__(optimizer, last_epoch)

    # ------------------------------------------------------------------ schedule
    def warmup_lr(self, k: int) -> float:
        """``min(max_lr, eta_0 * exp(omega * k))`` (literal form: ``exp(omega * k (k + 1) / 2)``);
        ``inf`` past float range when uncapped."""
        growth = k * (k + 1) / 2 if getattr(self, "warmup_form", "geometric") == "literal" else k
        log_lr = math.log(self.eta_0) + self.omega * growth
        if self.max_lr is not None:
            log_lr = min(log_lr, math.log(self.max_lr))
            return min(math.exp(log_lr), self.max_lr)
        return math.exp(log_lr) if log_lr < 709.0 else math.inf

    def lr_at(self, k: int) -> float:
        """The learning rate of step k under the current ``switch_step`` (closed form)."""
        s, T = self.switch_step, self.total_steps
        if s is None or k <= s:
            return self.warmup_lr(k)
        if k >= T:
            return self.eta_min
        peak = self.warmup_lr(s)
        return self.eta_min + (peak - self.eta_min) * (1 + math.cos(math.pi * (k - s) / (T - s))) / 2

    def get_lr(self) -> list[float]:
        return [self.lr_at(self.last_epoch)] * len(self.optimizer.param_groups)

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict:
        """The scheduler's state, with the correlation tracker's copied (for checkpoints)."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "_tracker")}
        state["_tracker"] = self._tracker.state_dict()
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict`'s output (create the scheduler first, then load)."""
        state = dict(state_dict)
        tracker = OnlineMeanCorrelation(int(state["_tracker"]["window"]))
        tracker.load_state_dict(state.pop("_tracker"))
        self.__dict__.update(state)
        self._tracker = tracker

    # ------------------------------------------------------------------ observation
    @property
    def window(self) -> int:
        return self._tracker.window

    @property
    def history(self) -> list[float]:
        return self._tracker.means

    @property
    def history_steps(self) -> list[int]:
        return self._tracker.steps

    def observe(self, grads) -> float:
        """Takes the gradient of the current step (``last_epoch``); call after backward.

        Args:
            grads: the model, the optimizer, an iterable of parameters/gradient tensors, or the
                flat gradient (see :func:`gradients_of`).

        Returns:
            The trailing mean gradient correlation after this step (NaN while undefined, and
            when tracking is off).
        """
        if not self.track:
            return math.nan
        step = self.last_epoch
        if self._tracker.steps and self._tracker.steps[-1] == step:
            raise RuntimeError(
                f"observe() was called twice for step {step}; call it once per step, after "
                "backward and before optimizer.step(), and call scheduler.step() after "
                "optimizer.step()"
            )
        return self._tracker.update(grads, step)


class GAWU(FixedSwitchWU):
    """Geometry-adapted warm-up: the switch step is found online from gradient correlations.

    The switch ``s`` is the first observed step whose trailing mean gradient correlation
    (window h, :class:`OnlineMeanCorrelation`) is negative while the previous defined
    (finite, non-zero) one was positive; NaN means are skipped, not treated as a sign. A mean
    that starts negative (ResNets often start in zigzag geometry) does not trigger the
    switch: it has to turn positive first. The LR of step ``s`` itself is still the warm-up
    value; from ``s + 1`` on the cosine applies. If no switch happens, the warm-up continues
    (capped at ``max_lr``) to the end.

    Args:
        optimizer, total_steps, omega, eta_0, max_lr, eta_min, window, last_epoch, warmup_form: as
            :class:`FixedSwitchWU`.
        track_after_switch: keep computing correlations after the switch (for ``history``);
            False stops the per-step cost once the switch is found.

    Attributes:
        switch_step: None until the switch is found, then s.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        *,
        omega: float = 0.1,
        eta_0: float = 1e-3,
        max_lr: float | None = None,
        eta_min: float = 0.0,
        window: int = 5,
        track_after_switch: bool = True,
        last_epoch: int = -1,
        warmup_form: str = "geometric",
    ):
        self.track_after_switch = track_after_switch
        self._last_sign = 0
        super().__init__(
            optimizer, total_steps, None, omega=omega, eta_0=eta_0, max_lr=max_lr,
            eta_min=eta_min, window=window, track=True, last_epoch=last_epoch, warmup_form=warmup_form,
        )

    def observe(self, grads) -> float:
        if self.switch_step is not None and not self.track_after_switch:
            return math.nan
        mean = super().observe(grads)
        if self.switch_step is None and math.isfinite(mean) and mean != 0:
            sign = 1 if mean > 0 else -1
            if self._last_sign > 0 and sign < 0:
                self.switch_step = self.last_epoch
            self._last_sign = sign
        return mean
