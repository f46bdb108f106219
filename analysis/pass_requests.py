"""The typed requests a :class:`analysis.engine.Pass` collects, one class per kind of product.

A request names store rows (the rows a caller passes to ``Pass.gram``, ``Pass.pair_dots``...);
when the pass is planned, :meth:`Request.op` turns it into the block operation of
:mod:`analysis.blockops` that works on positions in the pass's row pools (``grads``: the
sorted unique grad rows of the column space, ``weights``: the weight rows), and
:meth:`Request.result_size` says how many float64 values one slab's partial result holds (the
engine sizes its reduction tree by it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from analysis import blockops as ops


def _none() -> np.ndarray:
    return np.zeros(0, np.int64)


def positions(rows, pool: np.ndarray) -> np.ndarray:
    """Positions of store ``rows`` in the sorted row ``pool`` (int64)."""
    return np.searchsorted(pool, np.asarray(rows, dtype=np.int64)).astype(np.int64)


@dataclass(frozen=True)
class Request:
    """One requested product: its result ``key``, column ``space`` ("param", "sketch" or
    "bits") and the store rows it reads (grad and weight)."""

    #: prefix of the result key (``gram0``, ``pairs1``...)
    kind: ClassVar[str] = ""

    key: str
    space: str
    grad_rows: tuple[int, ...] = ()
    weight_rows: tuple[int, ...] = ()

    def op(self, grads: np.ndarray, weights: np.ndarray):
        """The block operation of this request on the pools' positions."""
        raise NotImplementedError

    def result_size(self) -> int:
        """float64 values of one slab's partial result (a bound; the Gram types dominate)."""
        return 2 * len(self.grad_rows)

    def _n_grad(self) -> int:
        return len(set(self.grad_rows))

    def _n_weight(self) -> int:
        return len(set(self.weight_rows))


@dataclass(frozen=True)
class GramRequest(Request):
    """``G_S G_S^T`` of the grad rows (n x n)."""

    kind: ClassVar[str] = "gram"
    precision: str = "float64"

    def op(self, grads, weights):
        return ops.Gram(self.key, positions(self.grad_rows, grads), self.precision)

    def result_size(self):
        return self._n_grad() ** 2


@dataclass(frozen=True)
class PairDotsRequest(Request):
    """``<G_a, G_b>`` for each pair of store rows ``(a[k], b[k])``."""

    kind: ClassVar[str] = "pairs"
    a: np.ndarray = field(default_factory=_none)
    b: np.ndarray = field(default_factory=_none)

    def op(self, grads, weights):
        return ops.PairDots(self.key, positions(self.a, grads), positions(self.b, grads))


@dataclass(frozen=True)
class SignGramRequest(Request):
    """Sign counts ``[disagree, both_nonzero]`` of every pair of the grad rows (2, n, n)."""

    kind: ClassVar[str] = "signgram"

    def op(self, grads, weights):
        return ops.SignGram(self.key, positions(self.grad_rows, grads))

    def result_size(self):
        return 2 * self._n_grad() ** 2


@dataclass(frozen=True)
class SignPairsRequest(Request):
    """Sign counts of each pair of store rows ``(a[k], b[k])`` (2, P)."""

    kind: ClassVar[str] = "signpairs"
    a: np.ndarray = field(default_factory=_none)
    b: np.ndarray = field(default_factory=_none)

    def op(self, grads, weights):
        return ops.SignPairs(self.key, positions(self.a, grads), positions(self.b, grads))


@dataclass(frozen=True)
class IndexGramRequest(Request):
    """Products of the stacked rows ``[G; W - anchor]`` against the stacked rows ``cols``."""

    kind: ClassVar[str] = "igram"
    cols: np.ndarray | None = None
    anchor: int = -1  # explicit reference of the space, or -1 (none)

    def op(self, grads, weights):
        return ops.IndexGram(self.key, positions(self.grad_rows, grads), positions(self.weight_rows, weights),
                             self.cols, self.anchor)

    def result_size(self):
        stacked = self._n_grad() + self._n_weight()
        return stacked * (stacked if self.cols is None else len(self.cols))


@dataclass(frozen=True)
class IndexSignsRequest(Request):
    """Sign counts of the grad rows against the grad rows ``cols``."""

    kind: ClassVar[str] = "isigns"
    cols: np.ndarray | None = None

    def op(self, grads, weights):
        return ops.IndexSigns(self.key, positions(self.grad_rows, grads), self.cols)

    def result_size(self):
        n = self._n_grad()
        return 2 * n * (n if self.cols is None else len(self.cols))


@dataclass(frozen=True)
class IndexBandRequest(Request):
    """Banded index products of consecutive store ``rows`` (lags 0..band, from ``first``)."""

    kind: ClassVar[str] = "iband"
    rows: np.ndarray = field(default_factory=_none)
    first: int = 0
    band: int = 0
    grad: bool = True
    weight: bool = True
    anchor: int = -1

    def op(self, grads, weights):
        if self.grad and self.weight and not np.array_equal(grads, weights):
            raise ValueError("a banded index pass holds one row set for grad and weight")
        pool = grads if self.grad else weights
        return ops.IndexBand(self.key, positions(self.rows, pool), self.first, self.band, self.grad, self.weight,
                             self.anchor)

    def result_size(self):
        return 4 * max(self._n_grad(), self._n_weight()) * (self.band + 1)


@dataclass(frozen=True)
class IndexSignBandRequest(Request):
    """Banded sign counts of consecutive store rows (lags 0..band, from ``first``)."""

    kind: ClassVar[str] = "isband"
    first: int = 0
    band: int = 0

    def op(self, grads, weights):
        return ops.IndexSignBand(self.key, positions(self.grad_rows, grads), self.first, self.band)

    def result_size(self):
        return 2 * self._n_grad() * (self.band + 1)


@dataclass(frozen=True)
class RefDistRequest(Request):
    """``[||w_t - r||^2, <G_t, w_t - r>]`` for store rows ``w``; the reference is explicit
    reference ``ref`` of the space, or (``ref == -1``) ``coef @ weight[ref_rows]``."""

    kind: ClassVar[str] = "refdist"
    w: np.ndarray = field(default_factory=_none)
    ref: int = -1
    ref_rows: np.ndarray = field(default_factory=_none)
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def op(self, grads, weights):
        return ops.RefDist(self.key, positions(self.grad_rows, grads), positions(self.w, weights), int(self.ref),
                           positions(self.ref_rows, weights), self.coef)


@dataclass(frozen=True)
class RefDirRequest(Request):
    """``[||w_t - r||^2, <v_t, w_t - r>, ||v_t||^2]`` for store rows ``w`` with ``v_t = G_g +
    lam * w_t`` (``lam``: explicit reference) or, with ``lam == -1``, ``v_t = w_t - w_{w2}``."""

    kind: ClassVar[str] = "refdir"
    w: np.ndarray = field(default_factory=_none)
    g: np.ndarray = field(default_factory=_none)
    w2: np.ndarray = field(default_factory=_none)
    lam: int = -1
    ref: int = -1
    ref_rows: np.ndarray = field(default_factory=_none)
    coef: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def op(self, grads, weights):
        return ops.RefDir(self.key, positions(self.w, weights), positions(self.g, grads), positions(self.w2, weights),
                          int(self.lam), int(self.ref), positions(self.ref_rows, weights), self.coef)

    def result_size(self):
        return 3 * len(self.w)
