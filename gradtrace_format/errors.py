"""Errors the analysis stage raises on bad input.

Every class subclasses both :class:`ValueError` (the input value is wrong) and
:class:`gradtrace_format.format.StoreError` (``except StoreError`` catches every gradtrace problem).
Messages name the thing, show the value and say what to do.
"""

from __future__ import annotations

from gradtrace_format.format import StoreError


class AnalysisError(ValueError, StoreError):
    """Base class of the analysis stage's input errors."""


class StepNotFoundError(AnalysisError):
    """A requested training step is not recorded in the store (or has no gradient)."""


class LagNotAvailableError(AnalysisError):
    """The recording schedule never recorded two steps at the requested distance."""


class ParamSelectionError(AnalysisError):
    """A parameter name, glob or list matched nothing in the parameter table."""


class BadReferenceError(AnalysisError):
    """A reference point w* is unusable: wrong length, NaN, missing or mis-shaped tensors."""


class TierError(AnalysisError):
    """The store's fidelity tier cannot answer this question."""

