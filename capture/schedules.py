"""Recording schedules: plain ``step -> bool`` callables with a JSON description.

A schedule decides, from the global training step alone, whether :meth:`Recorder.record`
stores that step. The recorder calls it first, before touching any tensor, so a step that is
not recorded costs one Python call.

Every schedule here can describe itself (:meth:`Schedule.describe`, a short string) and
serialise itself (:meth:`Schedule.to_json`, stored in the run store's header; rebuilt with
:func:`schedule_from_json`). Schedules combine with ``|`` (record a step if either records
it). Any other callable ``step -> bool`` works too; the header then holds its repr.

Presets for the command line (:func:`parse_schedule`)::

    "every"            every step
    "every:10"         steps 0, 10, 20, ...          "every:10:3": 3, 13, 23, ...
    "at:0,5,9"         exactly these steps
    "epoch:50"         the first step of every epoch of 50 steps ("epoch:50:2": every 2nd)
    "windows:5:100"    5 consecutive steps every 100 steps: 0-4, 100-104, ...
    "every:100|windows:5:1000"   a union

>>> s = windows(5, 100) | at([42])
>>> [t for t in range(210) if s(t)]
[0, 1, 2, 3, 4, 42, 100, 101, 102, 103, 104, 200, 201, 202, 203, 204]
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "Schedule",
    "every_step",
    "every",
    "at",
    "per_epoch",
    "windows",
    "union",
    "parse_schedule",
    "schedule_from_json",
    "schedule_to_json",
    "recorded_steps",
]


class Schedule:
    """Base class: a ``step -> bool`` callable that can describe and serialise itself."""

    #: steps per epoch, when the schedule knows it (the recorder then derives epochs)
    steps_per_epoch: int | None = None

    def __call__(self, step: int) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        """Short human-readable description, e.g. ``"every 10th step from 3"``."""
        raise NotImplementedError

    def to_json(self) -> dict:
        """JSON form stored in the header; :func:`schedule_from_json` rebuilds the schedule."""
        raise NotImplementedError

    def __or__(self, other: Callable[[int], bool]) -> "Schedule":
        return union(self, other)

    def __ror__(self, other: Callable[[int], bool]) -> "Schedule":
        return union(other, self)

    def __repr__(self) -> str:
        return f"<schedule: {self.describe()}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Schedule) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(repr(self.to_json()))


class _EveryStep(Schedule):
    def __call__(self, step: int) -> bool:
        return True

    def describe(self) -> str:
        return "every step"

    def to_json(self) -> dict:
        return {"kind": "every", "k": 1, "offset": 0}


#: Record every step.
every_step: Schedule = _EveryStep()


def _positive_int(value, what: str, fn: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: {what} must be an integer, got {value!r}") from err
    if v != value or v < 1:
        raise ValueError(f"{fn}: {what} must be a positive integer, got {value!r}")
    return v


def _nonneg_int(value, what: str, fn: str) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{fn}: {what} must be an integer, got {value!r}") from err
    if v != value or v < 0:
        raise ValueError(f"{fn}: {what} must be a non-negative integer, got {value!r}")
    return v


class _Every(Schedule):
    def __init__(self, k: int, offset: int = 0):
        self.k = _positive_int(k, "k", "every(k, offset)")
        self.offset = _nonneg_int(offset, "offset", "every(k, offset)")

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.k == 0

    def describe(self) -> str:
        if self.k == 1 and self.offset == 0:
            return "every step"
        return f"every {_ordinal(self.k)} step" + (f" from step {self.offset}" if self.offset else "")

    def to_json(self) -> dict:
        return {"kind": "every", "k": self.k, "offset": self.offset}


def every(k: int, offset: int = 0) -> Schedule:
    """Record steps ``offset, offset + k, offset + 2k, ...``.

    Args:
        k: period in training steps (>= 1).
        offset: first recorded step (>= 0).
    """
    s = _Every(k, offset)
    return every_step if (s.k, s.offset) == (1, 0) else s


class _At(Schedule):
    def __init__(self, steps: Iterable[int]):
        steps = list(steps)
        bad = [s for s in steps if not isinstance(s, int) and not hasattr(s, "__index__")]
        if bad:
            raise TypeError(f"at(steps): steps must be integers, got {bad[:3]!r}")
        self.steps = frozenset(int(s) for s in steps)
        if any(s < 0 for s in self.steps):
            raise ValueError(f"at(steps): steps must be >= 0, got {sorted(self.steps)[:3]}")

    def __call__(self, step: int) -> bool:
        return step in self.steps

    def describe(self) -> str:
        s = sorted(self.steps)
        body = ", ".join(map(str, s[:8])) + (f", ... ({len(s)} steps)" if len(s) > 8 else "")
        return f"at steps {body}"

    def to_json(self) -> dict:
        return {"kind": "at", "steps": sorted(self.steps)}


def at(steps: Iterable[int]) -> Schedule:
    """Record exactly the given steps (any iterable of non-negative integers)."""
    return _At(steps)


class _PerEpoch(Schedule):
    def __init__(self, steps_per_epoch: int, every: int = 1):
        self.steps_per_epoch = _positive_int(steps_per_epoch, "steps_per_epoch", "per_epoch(steps_per_epoch)")
        self.every = _positive_int(every, "every", "per_epoch(steps_per_epoch, every)")
        self._period = self.steps_per_epoch * self.every

    def __call__(self, step: int) -> bool:
        return step % self._period == 0

    def describe(self) -> str:
        which = "every epoch" if self.every == 1 else f"every {self.every}th epoch"
        return f"first step of {which} ({self.steps_per_epoch} steps per epoch)"

    def to_json(self) -> dict:
        return {"kind": "per_epoch", "steps_per_epoch": self.steps_per_epoch, "every": self.every}


def per_epoch(steps_per_epoch: int, every: int = 1) -> Schedule:
    """Record the first step of every ``every``-th epoch.

    Args:
        steps_per_epoch: optimizer steps per epoch (e.g. ``len(train_loader)``); with
            full-batch gradient descent this is 1.
        every: record every this many epochs.

    The recorder derives ``epoch = step // steps_per_epoch`` when ``record`` is given no epoch.
    """
    return _PerEpoch(steps_per_epoch, every)


class _Windows(Schedule):
    def __init__(self, h: int, period: int, offset: int = 0):
        self.h = _positive_int(h, "h", "windows(h, every)")
        self.period = _positive_int(period, "every", "windows(h, every)")
        self.offset = _nonneg_int(offset, "offset", "windows(h, every, offset)")
        if self.h > self.period:
            raise ValueError(
                f"windows(h={h}, every={period}): a window cannot be longer than its period; "
                "use every_step to record everything"
            )

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.period < self.h

    def describe(self) -> str:
        return f"windows of {self.h} consecutive steps every {self.period} steps" + (
            f" from step {self.offset}" if self.offset else ""
        )

    def to_json(self) -> dict:
        return {"kind": "windows", "h": self.h, "every": self.period, "offset": self.offset}


def windows(h: int, every: int, offset: int = 0) -> Schedule:
    """Record ``h`` consecutive steps every ``every`` steps: all a windowed correlation needs.

    Steps ``offset + j * every + i`` for ``i < h``. With h = 5 this gives the zigzag paper's
    5 x 5 correlation windows (and the lags 1..4 inside each window).
    """
    return _Windows(h, every, offset)


class _Function(Schedule):
    def __init__(self, fn: Callable[[int], bool]):
        self.fn = fn

    def __call__(self, step: int) -> bool:
        return bool(self.fn(step))

    def describe(self) -> str:
        return f"custom schedule {self.fn!r}"

    def to_json(self) -> dict:
        return {"kind": "callable", "repr": repr(self.fn)[:200]}


class _Union(Schedule):
    def __init__(self, parts: list[Schedule]):
        self.parts = parts
        self.steps_per_epoch = next((p.steps_per_epoch for p in parts if p.steps_per_epoch), None)

    def __call__(self, step: int) -> bool:
        return any(p(step) for p in self.parts)

    def describe(self) -> str:
        return " | ".join(p.describe() for p in self.parts)

    def to_json(self) -> dict:
        return {"kind": "union", "parts": [p.to_json() for p in self.parts]}


def _as_schedule(s) -> Schedule:
    if isinstance(s, Schedule):
        return s
    if callable(s):
        return _Function(s)
    raise TypeError(f"a schedule must be a callable step -> bool, got {type(s).__name__}: {s!r}")


def union(*schedules: Callable[[int], bool]) -> Schedule:
    """Record a step when any of ``schedules`` records it (also written ``a | b``)."""
    parts: list[Schedule] = []
    for s in schedules:
        s = _as_schedule(s)
        parts.extend(s.parts if isinstance(s, _Union) else [s])
    if not parts:
        raise ValueError("union() needs at least one schedule")
    return parts[0] if len(parts) == 1 else _Union(parts)


def schedule_to_json(schedule: Callable[[int], bool]) -> dict:
    """JSON description of any schedule (plain callables give ``{"kind": "callable"}``)."""
    return _as_schedule(schedule).to_json()


def schedule_from_json(d: dict) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_json` output.

    Raises:
        ValueError: for a custom callable (its code is not stored) or an unknown kind.
    """
    kind = d.get("kind")
    if kind == "every":
        return every(d["k"], d.get("offset", 0))
    if kind == "at":
        return at(d["steps"])
    if kind == "per_epoch":
        return per_epoch(d["steps_per_epoch"], d.get("every", 1))
    if kind == "windows":
        return windows(d["h"], d["every"], d.get("offset", 0))
    if kind == "union":
        return union(*(schedule_from_json(p) for p in d["parts"]))
    if kind == "callable":
        raise ValueError(
            f"the schedule was a custom callable ({d.get('repr')}); its code is not stored in the "
            "run store. Pass the callable again."
        )
    raise ValueError(f"unknown schedule kind {kind!r} in {d!r}")


_PRESET_HELP = (
    "use 'every', 'every:K', 'every:K:OFFSET', 'at:S1,S2,...', 'epoch:STEPS_PER_EPOCH', "
    "'epoch:STEPS_PER_EPOCH:EVERY', 'windows:H:EVERY' or 'windows:H:EVERY:OFFSET', joined by '|'"
)


def parse_schedule(spec: "str | Schedule | Callable[[int], bool]") -> Schedule:
    """Parse a preset string (see the module docstring); schedules pass through.

    >>> parse_schedule("windows:5:100").describe()
    'windows of 5 consecutive steps every 100 steps'
    """
    if not isinstance(spec, str):
        return _as_schedule(spec)
    text = spec.strip()
    if "|" in text:
        return union(*(parse_schedule(p) for p in text.split("|")))
    name, *args = [a.strip() for a in text.split(":")]
    name = name.lower()
    try:
        if name in ("every", "every_step", "all") and not args:
            return every_step
        if name == "every" and len(args) in (1, 2):
            return every(int(args[0]), int(args[1]) if len(args) == 2 else 0)
        if name == "at" and len(args) == 1:
            return at(int(s) for s in args[0].split(",") if s.strip())
        if name in ("epoch", "per_epoch") and len(args) in (1, 2):
            return per_epoch(int(args[0]), int(args[1]) if len(args) == 2 else 1)
        if name == "windows" and len(args) in (2, 3):
            return windows(int(args[0]), int(args[1]), int(args[2]) if len(args) == 3 else 0)
    except ValueError as err:
        raise ValueError(f"schedule {spec!r}: {err}. Presets: {_PRESET_HELP}") from err
    raise ValueError(f"unknown schedule {spec!r}: {_PRESET_HELP}")


def recorded_steps(schedule: Callable[[int], bool], n_steps: int) -> list[int]:
    """The steps in ``range(n_steps)`` that ``schedule`` records (for sizing and tests)."""
    return [t for t in range(int(n_steps)) if schedule(t)]


def _describe_any(schedule: Any) -> dict:
    d = schedule_to_json(schedule)
    d["description"] = _as_schedule(schedule).describe()
    return d


def _ordinal(k: int) -> str:
    """1st, 2nd, 3rd, 4th, 11th, 12th, 13th, 21st, ..."""
    k = int(k)
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"
