"""gradtrace capture stage: records PyTorch training runs into run stores.

Public names (``__all__``)::

    Recorder(model, path, optimizer=None, *, schedule=every_step, tiers="lossless", ...)
    restore_weights(model, path, step)
    every_step, every, at, per_epoch, windows, union, parse_schedule   (schedules)
    Tier, parse_tiers, model_table                                       (tiers, tables)
    StoreWriter                                                          (numpy-level writer)

Under a training framework: ``capture.callbacks.LightningCallback(path, ...)`` (a Lightning
callback) and ``capture.callbacks.TrainerCallback(path, ...)`` (a transformers one) create the
Recorder and record each optimizer step (extras ``lightning`` / ``transformers``).

Importing :mod:`capture` stays light: it loads the format layer (:mod:`gradtrace_format`) and
the schedules, never the analysis stage, xarray, pandas or dask. The names that need torch
(``Recorder``, ``restore_weights``, ``parse_tiers``, ``model_table``) are imported on first
use; without torch installed they raise one line naming the extra to install,
``pip install "gradtrace[capture]"``. The training harness (recipes, models, data,
full-batch gradients) is :mod:`experiments`.
"""

from capture.schedules import (
    Schedule,
    at,
    every,
    every_step,
    parse_schedule,
    per_epoch,
    union,
    windows,
)
from gradtrace_format.format import Tier

__all__ = [
    "Recorder",
    "RecorderWriteError",
    "restore_weights",
    "Schedule",
    "every_step",
    "every",
    "at",
    "per_epoch",
    "windows",
    "union",
    "parse_schedule",
    "Tier",
    "parse_tiers",
    "model_table",
    "StoreWriter",
]

_LAZY = {
    "Recorder": ("capture.recorder", "Recorder"),
    "RecorderWriteError": ("capture.recorder", "RecorderWriteError"),
    "restore_weights": ("capture.recorder", "restore_weights"),
    "parse_tiers": ("capture.recorder", "parse_tiers"),
    "model_table": ("capture.recorder", "model_table"),
    "StoreWriter": ("capture.writer", "StoreWriter"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'capture' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
