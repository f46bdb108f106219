"""gradtrace capture stage: records PyTorch training runs into run stores.

Public names (``__all__``)::

    Recorder(model, path, optimizer=None, *, schedule=every_step, tiers="lossless", ...)
    restore_weights(model, path, step) / restore (the same)
    full_batch_gradient(model, loss_fn, data, micro_batch=...)
    every_step, every, at, per_epoch, windows, union, parse_schedule   (schedules)
    Tier, parse_tiers, model_table                                       (tiers, tables)
    StoreWriter                                                          (numpy-level writer)

Under a training framework: ``capture.callbacks.LightningCallback(path, ...)`` (a Lightning
callback) and ``capture.callbacks.TrainerCallback(path, ...)`` (a transformers one) create the
Recorder and record each optimizer step (extras ``lightning`` / ``transformers``).

Importing :mod:`capture` stays light: the names that need torch (``Recorder``,
``restore_weights``, ``full_batch_gradient``, ``parse_tiers``, ``model_table``) are imported
on first use.
"""

from analysis.format import Tier
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

__all__ = [
    "Recorder",
    "RecorderWriteError",
    "restore_weights",
    "restore",
    "full_batch_gradient",
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
    "restore": ("capture.recorder", "restore_weights"),
    "parse_tiers": ("capture.recorder", "parse_tiers"),
    "model_table": ("capture.recorder", "model_table"),
    "full_batch_gradient": ("capture.fullbatch", "full_batch_gradient"),
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
