"""The "No Wrong Turns" counter-examples (seed 001, eq. 9) as small ``nn.Module`` objectives.

Both hold a single parameter ``w`` of shape ``(dim,)``, so the recorded vectors are ``w``
itself and its gradient. Their gamma/RSI misbehave (negative values, erratic paths), which
makes them test fixtures for the analysis stage (docs/methods.md, "RSI, EB and friends").

- :class:`ALM`, the asymmetric linear model (stochastic, convex): a linear model penalised
  only when its output exceeds the target, ``sum_i max(0, w.x_i - y_i)^2`` over a fixed finite
  data set with ``x_i ~ N(0, I_dim)``, ``y_i ~ N(0, 1)``. The paper measures the error "on
  stochastic minibatches using Root Mean Square Error", so the default reduction is
  ``sqrt(mean_{i in B} max(0, w.x_i - y_i)^2)``; ``reduction="sum"`` is eq. 9 literally.
- :class:`SM`, the sinusoidal mixture (deterministic, non-convex):
  ``||w||^2 + 100 * sum_i sin(a_i w_i)^2`` with ``a_i ~ N(0, 1)``.

Example::

    alm = ALM(dim=20, n_samples=512, seed=0)
    opt = torch.optim.SGD(alm.parameters(), lr=0.05)
    for batch in alm_minibatches(alm, batch_size=32, seed=0, epochs=5):
        opt.zero_grad(); alm.loss(batch).backward(); opt.step()
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["ALM", "SM", "alm_minibatches"]

_REDUCTIONS = ("rmse", "mean", "sum")


def _check_int(cls: str, arg: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{cls}: {arg}={value!r} must be an int >= {minimum}")
    return value


def _check_scale(cls: str, value) -> float:
    if not (isinstance(value, int | float) and value >= 0):
        raise ValueError(f"{cls}: init_scale={value!r} must be a number >= 0")
    return float(value)


class ALM(nn.Module):
    """Asymmetric linear model: ``loss(w) = R({max(0, w.x_i - y_i)^2 : i in batch})``.

    Data and the initial ``w`` are drawn from one ``torch.Generator`` seeded with ``seed`` (in
    the order x, y, w0), so a seed fixes the whole problem.

    Args:
        dim: d, the length of ``w`` and of each ``x_i``.
        n_samples: n, the size of the finite data set.
        seed: seed of the data and the initialisation.
        reduction: ``"rmse"`` (paper: ``sqrt(mean r_i^2)``), ``"mean"`` (``mean r_i^2``) or
            ``"sum"`` (eq. 9: ``sum r_i^2``), where ``r_i = max(0, w.x_i - y_i)``.
        init_scale: ``w0 ~ N(0, init_scale^2 I)``; 0 starts at the origin.
        dtype: floating dtype of data and parameter.

    Attributes:
        w: ``nn.Parameter`` of shape ``(dim,)``.
        x: buffer ``(n_samples, dim)``.
        y: buffer ``(n_samples,)``.
    """

    def __init__(
        self,
        dim: int = 100,
        n_samples: int = 1000,
        seed: int = 0,
        *,
        reduction: str = "rmse",
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.dim = _check_int("ALM", "dim", dim)
        self.n_samples = _check_int("ALM", "n_samples", n_samples)
        if reduction not in _REDUCTIONS:
            raise ValueError(f"ALM: reduction={reduction!r} is not one of {_REDUCTIONS}")
        self.reduction = reduction
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(n_samples, dim, generator=gen, dtype=torch.float64)
        y = torch.randn(n_samples, generator=gen, dtype=torch.float64)
        w0 = torch.randn(dim, generator=gen, dtype=torch.float64) * _check_scale("ALM", init_scale)
        self.register_buffer("x", x.to(dtype))
        self.register_buffer("y", y.to(dtype))
        self.w = nn.Parameter(w0.to(dtype))

    def residuals(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """``r_i = max(0, w.x_i - y_i)`` for the batch (the whole data set when None), ``(B,)``."""
        x, y = (self.x, self.y) if batch is None else batch
        if x.ndim != 2 or x.shape[1] != self.dim or y.shape != x.shape[:1]:
            raise ValueError(
                f"ALM: batch shapes x={tuple(x.shape)}, y={tuple(y.shape)} do not fit; expected "
                f"x of shape (B, {self.dim}) and y of shape (B,)"
            )
        return torch.relu(x @ self.w - y)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """The objective on a minibatch ``(x (B, dim), y (B,))``, or on all data when None.

        Returns:
            0-d tensor. For ``"rmse"`` the gradient where every residual is 0 is 0 (the
            subgradient), not the NaN that autograd's ``sqrt'(0)`` would give.
        """
        sq = self.residuals(batch).square()
        if self.reduction == "sum":
            return sq.sum()
        ms = sq.mean()
        if self.reduction == "mean":
            return ms
        positive = ms > 0
        return torch.where(positive, torch.where(positive, ms, 1.0).sqrt(), 0.0)

    forward = loss


def alm_minibatches(
    model: ALM,
    batch_size: int,
    seed: int = 0,
    *,
    epochs: int | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Minibatches of an :class:`ALM`'s data: each epoch a fresh seeded permutation.

    Args:
        model: the ALM whose ``x``, ``y`` are sampled.
        batch_size: B.
        seed: seed of the permutations (independent of the model's seed).
        epochs: number of passes; None never stops.
        drop_last: skip the last, smaller batch of each epoch.

    Yields:
        ``(x, y)`` with shapes ``(B, dim)`` and ``(B,)`` (views into ``model.x``, ``model.y``
        selected by index), ready for ``model.loss``.
    """
    n = model.n_samples
    _check_int("alm_minibatches", "batch_size", batch_size)
    if batch_size > n:
        raise ValueError(f"alm_minibatches: batch_size={batch_size} exceeds n_samples={n}")
    if epochs is not None:
        _check_int("alm_minibatches", "epochs", epochs)
    gen = torch.Generator().manual_seed(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = torch.randperm(n, generator=gen).to(model.x.device)
        for lo in range(0, n, batch_size):
            idx = perm[lo:lo + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            yield model.x[idx], model.y[idx]
        epoch += 1


class SM(nn.Module):
    """Sinusoidal mixture: ``loss(w) = ||w||^2 + amplitude * sum_i sin(a_i w_i)^2``.

    Deterministic (``loss`` ignores any batch) and non-convex; its global minimum is ``w = 0``
    with many local minima around it. ``a`` and the initial ``w`` come from one generator
    seeded with ``seed`` (in the order a, w0).

    Args:
        dim: d, the length of ``w`` and ``a``.
        seed: seed of ``a`` and the initialisation.
        amplitude: the factor of the sinusoidal term (paper: 100).
        init_scale: ``w0 ~ N(0, init_scale^2 I)``.
        dtype: floating dtype.

    Attributes:
        w: ``nn.Parameter`` of shape ``(dim,)``.
        a: buffer ``(dim,)``.
    """

    def __init__(
        self,
        dim: int = 100,
        seed: int = 0,
        *,
        amplitude: float = 100.0,
        init_scale: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ):
        super().__init__()
        self.dim = _check_int("SM", "dim", dim)
        if not isinstance(amplitude, int | float):
            raise ValueError(f"SM: amplitude={amplitude!r} must be a number (paper: 100)")
        self.amplitude = float(amplitude)
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(dim, generator=gen, dtype=torch.float64)
        w0 = torch.randn(dim, generator=gen, dtype=torch.float64) * _check_scale("SM", init_scale)
        self.register_buffer("a", a.to(dtype))
        self.w = nn.Parameter(w0.to(dtype))

    def loss(self, batch=None) -> torch.Tensor:
        """The objective (0-d tensor); ``batch`` is accepted for a uniform interface and ignored."""
        return self.w.square().sum() + self.amplitude * torch.sin(self.a * self.w).square().sum()

    forward = loss
