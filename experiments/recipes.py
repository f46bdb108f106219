"""Run recipes: the source papers' training setups as one frozen dataclass plus named presets.

A recipe is a :class:`RunConfig`: model, data, optimizer, learning rate and schedule, number
of steps, what to record and at which fidelity, seed and device. :data:`PRESETS` holds the
papers' settings and small CPU versions of them; :func:`load_config` builds a config from a
preset name or a JSON/TOML file, with overrides; :func:`run_recipe` trains and records it::

    from experiments.recipes import load_config, run_recipe
    cfg = load_config("demo")                        # or "zigzag-cnn3-cifar10", "run.toml"
    cfg = load_config("demo", lr=0.01, steps=100)    # overrides, checked like the fields
    store = run_recipe(cfg, "runs/demo.zarr")

The command line ``gradtrace record --preset NAME --out PATH --set key=value ...`` is a thin
mapping onto ``run_recipe(load_config(NAME, **parse_overrides(SETS)), PATH)``; dotted keys
reach into the dict fields (``--set model_kwargs.width=8``).

Importing this module does not import torch (``gradtrace record --help`` can list presets
quickly); validating a config imports the model and data registries.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "RunConfig",
    "PRESETS",
    "OBJECTIVES",
    "DEVICES",
    "LOSSES",
    "load_config",
    "apply_overrides",
    "parse_overrides",
    "preset_names",
    "describe_presets",
    "config_from_store",
    "run_recipe",
]

#: Model names that are objectives with their own loss and data (No Wrong Turns, eq. 9).
OBJECTIVES = ("alm", "sm")
#: Devices a config may name; "auto" is CUDA when available, else CPU.
DEVICES = ("auto", "cpu", "cuda")
#: Losses of classifier recipes ("objective" is the ALM/SM objective's own loss; "mse" is the
#: squared error against one-hot targets, mean over examples and outputs).
LOSSES = ("cross_entropy", "mse", "objective")
#: Where a clipping recipe records the gradient (header ``settings["grad_recorded"]``).
GRAD_RECORDED = ("before_clip", "after_clip")

_DICT_FIELDS = ("model_kwargs", "dataset_kwargs", "lr_schedule_kwargs")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class RunConfig:
    """One training run to record: everything :func:`run_recipe` needs, and nothing else.

    All fields are plain JSON values, so a config round-trips through :meth:`to_dict`, a
    JSON/TOML file and the run store's header (``settings["recipe"]``).

    Attributes:
        name: label of the recipe (the preset name, or ``"custom"``).
        model: a :data:`experiments.models.MODELS` name (``"cnn3"``, ``"vgg16"``, ``"resnet18"``,
            ``"resnet34"``, ``"mlp"``, ``"cnn1d"``, ``"resnet_small"``, ``"linear_deep"``), or
            an objective of :data:`OBJECTIVES` (``"alm"``, ``"sm"``; their data come from
            ``model_kwargs``, and ``dataset`` must be None).
        model_kwargs: options of the model factory (``{"width": 8}`` for cnn3) or of the
            objective (``dim``, ``n_samples``, ``reduction``, ``init_scale``, ...; ``seed``
            defaults to the config's ``seed``).
        dataset: a :data:`experiments.data.DATASETS` name (``"digits"``, ``"mnist1d"``,
            ``"cifar10"``, ``"mnist"``, ``"svhn"``), None for objectives.
        dataset_kwargs: data-set options (mnist1d: ``num_samples``, ``data_seed``).
        n_train: use the first n training examples after a shuffle seeded by ``data_seed``;
            None uses the whole training split.
        data_root: directory of torchvision's files (None: ``$GRADTRACE_DATA`` or ``./data``).
        data_seed: seed of the ``n_train`` subset (independent of ``seed``, so the same
            examples are used whatever the initialisation seed).
        standardize: subtract the per-channel mean and divide by the per-channel std of the
            training inputs actually used (statistics stored in the header). On digits
            (pixels in [0, 1]) this is ``(x - 0.305) / 0.376``. The torchvision sets are
            already normalised with their usual statistics by the loader.
        loss: ``"cross_entropy"`` (classifiers; mean over the batch), ``"mse"`` (classifiers:
            ``mean((f(x) - onehot(y))^2)`` over examples and outputs, torch's ``mse_loss``; seed
            002's squared loss, and the zigzag finding on an MLP) or ``"objective"`` (ALM/SM).
            None picks the right one for the model.
        grad_clip: clip the global l2 norm of the gradient to this value every step
            (``torch.nn.utils.clip_grad_norm_``, before ``optimizer.step()``); None: no clipping.
        grad_recorded: with ``grad_clip``: record the gradient ``"before_clip"`` (default, the
            raw gradient, what the No Wrong Turns code measures) or ``"after_clip"`` (what the
            optimizer consumed). Stored in the header as ``settings["grad_recorded"]``.
        optimizer: ``"gd"`` (full-batch gradient descent: the exact gradient of the whole
            training set each step, accumulated over micro-batches; plain SGD, no momentum),
            ``"sgd"`` (minibatch or full-batch SGD, optional momentum/Nesterov), ``"adam"``,
            ``"adamw"``.
        lr: learning rate (> 0). For gawu/wu schedules the warm-up starts at ``eta_0``
            (default: this lr).
        momentum: SGD momentum in [0, 1) (``"sgd"`` only).
        nesterov: Nesterov momentum (``"sgd"`` with momentum > 0).
        weight_decay: >= 0 (inside ``optimizer.step()``, so not part of the recorded gradient).
        batch_size: minibatch size; None means full batch (required for ``"gd"``).
        drop_last: with minibatches, skip the last smaller batch of each epoch.
        steps: number of optimizer steps T; give exactly one of ``steps`` and ``epochs``.
        epochs: number of passes over the training set (steps = epochs x steps per epoch;
            one step per epoch with full batches, as in the zigzag paper).
        lr_schedule: a :data:`experiments.optim.SCHEDULES` name: ``"constant"``, ``"step"``,
            ``"cosine"``, ``"warmup_cosine"``, ``"gawu"``, ``"wu"``.
        lr_schedule_kwargs: its options (``warmup_steps``, ``eta_min``, ``milestones``,
            ``step_size``, ``gamma``, ``omega``, ``eta_0``, ``max_lr``, ``window``, ``warmup_form``,
            ``switch_step``); options the schedule does not use are errors.
        record: recording schedule (:func:`capture.schedules.parse_schedule` strings such as
            ``"every"``, ``"every:10"``, ``"windows:5:100"``), plus ``"epoch"`` for the first
            step of every epoch.
        grad_tier: fidelity tier of the gradients (``"lossless"``, ``"rounded:7"``,
            ``"sketch:4096"``).
        weight_tier: fidelity tier of the weights (a sketch cannot be restored or branched).
        seed: seed of the initialisation (``torch.manual_seed`` before the model is built) and
            of the minibatch order.
        micro_batch: largest number of examples per forward/backward; full batches and large
            minibatches are accumulated over micro-batches (same gradient up to rounding;
            not with BatchNorm in training mode, see :func:`experiments.fullbatch.full_batch_gradient`).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        num_threads: torch CPU threads (None: torch's default).

    Raises:
        ValueError: at construction, for any field that is out of range or inconsistent,
            naming the field, the value and the fix.
    """

    name: str = "custom"
    model: str = "cnn3"
    model_kwargs: dict = field(default_factory=dict)
    dataset: str | None = "digits"
    dataset_kwargs: dict = field(default_factory=dict)
    n_train: int | None = None
    data_root: str | None = None
    data_seed: int = 0
    standardize: bool = False
    loss: str | None = None
    grad_clip: float | None = None
    grad_recorded: str = "before_clip"
    optimizer: str = "gd"
    lr: float = 0.1
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    batch_size: int | None = None
    drop_last: bool = False
    steps: int | None = None
    epochs: int | None = None
    lr_schedule: str = "constant"
    lr_schedule_kwargs: dict = field(default_factory=dict)
    record: str = "every"
    grad_tier: str = "lossless"
    weight_tier: str = "lossless"
    seed: int = 0
    micro_batch: int | None = 2048
    device: str = "auto"
    num_threads: int | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self):
        for f in _DICT_FIELDS:
            v = getattr(self, f)
            if v is None:
                object.__setattr__(self, f, {})
            elif not isinstance(v, Mapping):
                raise ValueError(f"RunConfig: {f}={v!r} must be a dict of options, e.g. {{}}")
            else:
                object.__setattr__(self, f, dict(v))
        if self.loss is None:
            object.__setattr__(self, "loss", "objective" if self.model in OBJECTIVES else "cross_entropy")
        self._validate()

    def _fail(self, msg: str):
        raise ValueError(f"RunConfig {self.name!r}: {msg}")

    def _validate(self) -> None:  # noqa: C901 - one flat list of checks reads best
        from experiments.data import DATASETS
        from experiments.models import MODELS
        from experiments.optim import OPTIMIZERS, SCHEDULES

        if not isinstance(self.name, str) or not self.name:
            self._fail(f"name={self.name!r} must be a non-empty string")
        if self.model not in MODELS and self.model not in OBJECTIVES:
            self._fail(f"model={self.model!r} is unknown; choose one of "
                       f"{sorted(MODELS) + list(OBJECTIVES)}")
        objective = self.model in OBJECTIVES
        if objective:
            if self.dataset is not None:
                self._fail(f"model={self.model!r} is an objective with its own data; set dataset=None "
                           f"(got dataset={self.dataset!r}) and size it with model_kwargs (dim, n_samples)")
            if self.loss != "objective":
                self._fail(f"loss={self.loss!r}: model {self.model!r} has its own loss; use loss='objective'")
            if self.standardize:
                self._fail("standardize=True applies to data sets, not to the ALM/SM objectives")
        else:
            if self.dataset not in DATASETS:
                self._fail(f"dataset={self.dataset!r} is unknown; choose one of {sorted(DATASETS)}")
            if self.loss not in ("cross_entropy", "mse"):
                self._fail(f"loss={self.loss!r}: classifier recipes use loss='cross_entropy' or 'mse'")
        if self.loss not in LOSSES:
            self._fail(f"loss={self.loss!r} is not one of {LOSSES}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip) or self.grad_clip <= 0):
            self._fail(f"grad_clip={self.grad_clip!r} must be a number > 0 (max gradient norm) or None")
        if self.grad_recorded not in GRAD_RECORDED:
            self._fail(f"grad_recorded={self.grad_recorded!r} must be one of {GRAD_RECORDED}")
        if self.n_train is not None and (not _is_int(self.n_train) or self.n_train < 1):
            self._fail(f"n_train={self.n_train!r} must be a positive int or None (whole split)")
        if objective and self.n_train is not None:
            self._fail("n_train does not apply to ALM/SM; set model_kwargs={'n_samples': N} for ALM")
        if not _is_int(self.data_seed):
            self._fail(f"data_seed={self.data_seed!r} must be an int")
        if not isinstance(self.standardize, bool):
            self._fail(f"standardize={self.standardize!r} must be true or false")
        if self.data_root is not None and not isinstance(self.data_root, str | os.PathLike):
            self._fail(f"data_root={self.data_root!r} must be a directory path or None")

        if self.optimizer not in OPTIMIZERS:
            self._fail(f"optimizer={self.optimizer!r} is unknown; choose one of {OPTIMIZERS}")
        if not _is_number(self.lr) or self.lr <= 0:
            self._fail(f"lr={self.lr!r} must be a finite number > 0")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            self._fail(f"momentum={self.momentum!r} must be a number in [0, 1)")
        if self.momentum and self.optimizer != "sgd":
            self._fail(f"momentum={self.momentum} needs optimizer='sgd' (got {self.optimizer!r}; "
                       "'gd' is plain gradient descent, Adam's momentum is fixed at beta1=0.9)")
        if not isinstance(self.nesterov, bool) or (self.nesterov and not self.momentum):
            self._fail(f"nesterov={self.nesterov!r}: needs optimizer='sgd' and momentum > 0")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            self._fail(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if self.batch_size is not None and (not _is_int(self.batch_size) or self.batch_size < 1):
            self._fail(f"batch_size={self.batch_size!r} must be a positive int, or None for full batch")
        if self.optimizer == "gd" and self.batch_size is not None:
            self._fail(f"optimizer='gd' is full-batch gradient descent, but batch_size={self.batch_size}; "
                       "set batch_size=None, or use optimizer='sgd' for minibatches")
        if self.model == "sm" and self.batch_size is not None:
            self._fail("SM is deterministic (no data to batch); set batch_size=None")
        if not isinstance(self.drop_last, bool):
            self._fail(f"drop_last={self.drop_last!r} must be true or false")
        n = self.n_examples()
        if self.batch_size is not None and self.batch_size > n:
            self._fail(f"batch_size={self.batch_size} is larger than the training set ({n} examples); "
                       "use batch_size=None for full batch")

        if (self.steps is None) == (self.epochs is None):
            self._fail(f"give exactly one of steps and epochs (got steps={self.steps!r}, "
                       f"epochs={self.epochs!r}); set the other to None")
        for f in ("steps", "epochs"):
            v = getattr(self, f)
            if v is not None and (not _is_int(v) or v < 1):
                self._fail(f"{f}={v!r} must be a positive int")

        if self.lr_schedule not in SCHEDULES:
            self._fail(f"lr_schedule={self.lr_schedule!r} is unknown; choose one of {SCHEDULES}")
        from experiments.optim import _OPTIONS

        unused = sorted(set(self.lr_schedule_kwargs) - _OPTIONS[self.lr_schedule])
        if unused:
            self._fail(f"lr_schedule={self.lr_schedule!r} does not take {unused}; it takes "
                       f"{sorted(_OPTIONS[self.lr_schedule]) or 'no options'}")
        if self.lr_schedule == "wu" and "switch_step" not in self.lr_schedule_kwargs:
            self._fail("lr_schedule='wu' needs lr_schedule_kwargs={'switch_step': s} (the paper tried 5, 10, 12)")

        if not isinstance(self.record, str):
            self._fail(f"record={self.record!r} must be a schedule string such as 'every' or 'every:10'")
        if self.record.strip() != "epoch":
            from capture.schedules import parse_schedule

            try:
                parse_schedule(self.record)
            except (TypeError, ValueError) as err:
                self._fail(f"record={self.record!r}: {err}")
        from gradtrace_format.format import Tier

        for f in ("grad_tier", "weight_tier"):
            try:
                Tier.parse(getattr(self, f))
            except (TypeError, ValueError) as err:
                self._fail(f"{f}={getattr(self, f)!r}: {err}")
        if not _is_int(self.seed):
            self._fail(f"seed={self.seed!r} must be an int")
        if self.micro_batch is not None and (not _is_int(self.micro_batch) or self.micro_batch < 1):
            self._fail(f"micro_batch={self.micro_batch!r} must be a positive int or None")
        if self.device not in DEVICES:
            self._fail(f"device={self.device!r} is not one of {DEVICES}")
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            self._fail(f"num_threads={self.num_threads!r} must be a positive int or None")

    # ------------------------------------------------------------------ derived sizes
    def n_examples(self) -> int:
        """Size N of the training set the run uses (ALM: ``n_samples``; SM: 1)."""
        if self.model == "alm":
            return int(self.model_kwargs.get("n_samples", 1000))
        if self.model == "sm":
            return 1
        if self.n_train is not None:
            return self.n_train
        from experiments.data import DATASETS

        if self.dataset == "mnist1d" and "num_samples" in self.dataset_kwargs:
            return int(self.dataset_kwargs["num_samples"] * 0.8)
        return DATASETS[self.dataset].n_train

    def steps_per_epoch(self) -> int:
        """Optimizer steps per pass over the data: 1 for full batch, else ceil/floor(N / B)."""
        if self.batch_size is None:
            return 1
        n = self.n_examples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def total_steps(self) -> int:
        """T, the number of optimizer steps of the run."""
        return self.steps if self.steps is not None else self.epochs * self.steps_per_epoch()

    # ------------------------------------------------------------------ conversions
    def to_dict(self) -> dict:
        """All fields as a plain JSON-able dict (what the store's header keeps)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; unknown keys are an error naming the valid ones."""
        _check_keys(d, "RunConfig.from_dict")
        return cls(**dict(d))

    def replace(self, **changes) -> "RunConfig":
        """A copy with ``changes`` applied (validated; dotted keys reach into dict fields)."""
        return apply_overrides(self, changes)

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(RunConfig)]


def _check_keys(d: Mapping, where: str) -> None:
    valid = _field_names()
    for key in d:
        base = str(key).split(".", 1)[0]
        if base not in valid:
            close = difflib.get_close_matches(base.lower(), valid, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"{where}: unknown key {key!r}{hint}; valid keys: {', '.join(valid)}")
        if "." in str(key) and base not in _DICT_FIELDS:
            raise ValueError(f"{where}: key {key!r}: only {', '.join(_DICT_FIELDS)} take dotted "
                             f"sub-keys; set {base}=... directly")


# --------------------------------------------------------------------------- presets
# Paper settings (seed 000 = zigzag paper, seed 001 = No Wrong Turns) and CPU-sized versions.
# The CPU versions are what the tests and docs/reproduction.md run.

_DIGITS_CNN = {"model": "cnn3", "dataset": "digits"}

_PRESET_DATA: dict[str, dict[str, Any]] = {
    # ---- the built-in demo (`gradtrace demo`): zigzag on real offline data, 2 CPU cores
    "demo": {
        **_DIGITS_CNN, "model_kwargs": {"width": 32},
        "optimizer": "gd", "lr": 0.1, "steps": 300, "record": "every", "seed": 0,
        "_doc": "cnn3 (width 32, 94k params) on all 1,437 digits, full-batch GD lr 0.1, 300 steps, "
                "every step recorded: smooth, then zigzag (the zigzag paper's Figure 1 in ~1 min)",
    },
    "demo-quick": {
        **_DIGITS_CNN, "model_kwargs": {"width": 16}, "standardize": True,
        "optimizer": "gd", "lr": 0.15, "steps": 150, "record": "every", "seed": 0,
        "_doc": "CI-sized demo (~5 s): cnn3 width 16 (24k params) on standardized digits, GD lr 0.15, "
                "150 steps: smooth, then zigzag from about step 90",
    },
    # ---- zigzag paper (seed 000), section 3: full-batch GD, lr 0.1
    "zigzag-cnn3-cifar10": {
        "model": "cnn3", "dataset": "cifar10", "optimizer": "gd", "lr": 0.1, "epochs": 1500,
        "record": "every", "micro_batch": 5000,
        "_doc": "zigzag paper Fig. 1: 3-block CNN, CIFAR-10, full-batch GD, lr 0.1, 1500 epochs",
    },
    "zigzag-vgg16-cifar10": {
        "model": "vgg16", "dataset": "cifar10", "optimizer": "gd", "lr": 0.1, "epochs": 1500,
        "record": "every", "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 2: VGG-16, CIFAR-10, full-batch GD, lr 0.1, 1500 epochs",
    },
    "zigzag-vgg16-cifar10-small-lr": {
        "model": "vgg16", "dataset": "cifar10", "optimizer": "gd", "lr": 0.01, "epochs": 1500,
        "record": "every", "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 5 (zoom): VGG-16, CIFAR-10, full-batch GD, lr 0.01",
    },
    "zigzag-resnet18-cifar10": {
        "model": "resnet18", "dataset": "cifar10", "optimizer": "gd", "lr": 0.1, "epochs": 500,
        "record": "every", "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 3: ResNet-18, CIFAR-10, full-batch GD, lr 0.1, 500 epochs "
                "(BatchNorm: micro-batches use their own batch statistics)",
    },
    "zigzag-resnet34-cifar10": {
        "model": "resnet34", "dataset": "cifar10", "optimizer": "gd", "lr": 0.1, "epochs": 500,
        "record": "every", "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 4: ResNet-34, CIFAR-10, full-batch GD, lr 0.1, 500 epochs",
    },
    "zigzag-cnn3-mnist": {
        "model": "cnn3", "dataset": "mnist", "optimizer": "gd", "lr": 0.1, "epochs": 1500,
        "record": "every", "micro_batch": 10000,
        "_doc": "zigzag paper appendix A: 3-block CNN, MNIST, full-batch GD, lr 0.1",
    },
    "zigzag-cnn3-svhn": {
        "model": "cnn3", "dataset": "svhn", "optimizer": "gd", "lr": 0.1, "epochs": 1500,
        "record": "every", "micro_batch": 5000,
        "_doc": "zigzag paper appendix A: 3-block CNN, SVHN, full-batch GD, lr 0.1",
    },
    # CPU stand-ins for section 3 (digits / MNIST-1D, no download)
    "zigzag-cnn3-digits": {
        **_DIGITS_CNN, "model_kwargs": {"width": 32}, "optimizer": "gd", "lr": 0.1,
        "steps": 300, "record": "every",
        "_doc": "CPU version of zigzag-cnn3-cifar10 on digits (same as demo)",
    },
    "zigzag-cnn3-digits-small-lr": {
        **_DIGITS_CNN, "model_kwargs": {"width": 32}, "optimizer": "gd", "lr": 0.001,
        "steps": 300, "record": "every",
        "_doc": "zigzag-cnn3-digits at a 100x smaller lr: stays smooth",
    },
    "zigzag-cnn1d-mnist1d": {
        "model": "cnn1d", "dataset": "mnist1d", "optimizer": "gd", "lr": 0.5, "steps": 300,
        "standardize": True, "record": "every",
        "_doc": "full-batch GD on MNIST-1D with the 1-D CNN (CPU, no download)",
    },
    # ---- No Wrong Turns (seed 001): minibatch SGD, gamma against the final iterate
    "nwt-resnet18-cifar10": {
        "model": "resnet18", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.01,
        "momentum": 0.9, "weight_decay": 1e-6, "batch_size": 256, "epochs": 190,
        "record": "every", "micro_batch": 256,
        "_doc": "No Wrong Turns appendix A.4: ResNet-18, CIFAR-10, SGD+momentum 0.9, batch 256, "
                "wd 1e-6, lr 0.01, 190 epochs",
    },
    "nwt-cnn3-digits": {
        **_DIGITS_CNN, "model_kwargs": {"width": 8}, "standardize": True, "optimizer": "sgd",
        "lr": 0.1, "batch_size": 64, "epochs": 8, "record": "every",
        "_doc": "CPU version of nwt-*: cnn3 width 8 on standardized digits, plain SGD batch 64, "
                "lr 0.1, 8 epochs (184 steps)",
    },
    "nwt-cnn1d-mnist1d": {
        "model": "cnn1d", "dataset": "mnist1d", "standardize": True, "optimizer": "sgd",
        "lr": 0.05, "momentum": 0.9, "batch_size": 128, "epochs": 10, "record": "every",
        "_doc": "CPU version of nwt-*: 1-D CNN on MNIST-1D, SGD+momentum, batch 128, 10 epochs",
    },
    "alm": {
        "model": "alm", "dataset": None,
        "model_kwargs": {"dim": 20, "n_samples": 512, "reduction": "rmse"},
        "optimizer": "sgd", "lr": 0.05, "batch_size": 16, "epochs": 20, "record": "every",
        "_doc": "No Wrong Turns eq. 9: asymmetric linear model, RMSE on minibatches of 16, SGD",
    },
    "sm": {
        "model": "sm", "dataset": None, "model_kwargs": {"dim": 100, "amplitude": 100.0},
        "optimizer": "gd", "lr": 0.005, "steps": 300, "record": "every",
        "_doc": "No Wrong Turns eq. 9: sinusoidal mixture ||w||^2 + 100 sum sin(a_i w_i)^2, GD",
    },
    # ---- GAWU (seed 000, section 5): large-batch SGD on ResNet-18
    "gawu-resnet18-cifar10": {
        "model": "resnet18", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.001,
        "batch_size": 5000, "epochs": 100, "lr_schedule": "gawu",
        "lr_schedule_kwargs": {"omega": 0.1, "eta_0": 0.001}, "record": "every",
        "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 10: ResNet-18, CIFAR-10, SGD batch 5000, GAWU omega 0.1, "
                "eta_0 0.001, one cosine period after the switch",
    },
    "wu-resnet18-cifar10": {
        "model": "resnet18", "dataset": "cifar10", "optimizer": "sgd", "lr": 0.001,
        "batch_size": 5000, "epochs": 100, "lr_schedule": "wu",
        "lr_schedule_kwargs": {"omega": 0.1, "eta_0": 0.001, "switch_step": 12},
        "record": "every", "micro_batch": 1000,
        "_doc": "zigzag paper Fig. 10 baseline: fixed-switch warm-up at t = 12",
    },
    "gawu-resnet_small-digits": {
        "model": "resnet_small", "dataset": "digits", "standardize": True, "optimizer": "sgd",
        "lr": 0.001, "batch_size": 256, "steps": 80, "lr_schedule": "gawu",
        "lr_schedule_kwargs": {"omega": 0.1, "eta_0": 0.001}, "record": "every",
        "_doc": "CPU version of gawu-resnet18-cifar10: resnet_small on digits, batch 256",
    },
}


def _preset(name: str) -> RunConfig:
    d = {k: v for k, v in _PRESET_DATA[name].items() if not k.startswith("_")}
    return RunConfig(name=name, **d)


def preset_names() -> list[str]:
    """Names of the presets, in definition order."""
    return list(_PRESET_DATA)


def describe_presets() -> dict[str, str]:
    """``{name: one-line description}`` of every preset (for ``--help`` and docs)."""
    return {k: v.get("_doc", "") for k, v in _PRESET_DATA.items()}


class _Presets(Mapping):
    """Read-only mapping name -> :class:`RunConfig`, validated when looked up."""

    def __getitem__(self, name: str) -> RunConfig:
        if name not in _PRESET_DATA:
            raise KeyError(name)
        return _preset(name)

    def __iter__(self):
        return iter(_PRESET_DATA)

    def __len__(self) -> int:
        return len(_PRESET_DATA)

    def __repr__(self) -> str:
        return f"PRESETS({', '.join(_PRESET_DATA)})"


#: Named recipes: ``PRESETS["demo"]`` is a :class:`RunConfig`. See :func:`describe_presets`.
PRESETS: Mapping[str, RunConfig] = _Presets()


# --------------------------------------------------------------------------- loading
def _coerce_value(text: str):
    """``--set`` value text -> JSON value when it parses (numbers, true/false, null, lists,
    dicts), else the string itself."""
    low = text.strip()
    if low.lower() in ("none", "null"):
        return None
    if low.lower() in ("true", "false"):
        return low.lower() == "true"
    try:
        return json.loads(low)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``["lr=0.01", "model_kwargs.width=8", "batch_size=none"]`` -> overrides dict.

    Values are read as JSON when they parse (``0.01``, ``true``, ``[1, 2]``,
    ``{"width": 8}``), ``none``/``null`` as None, anything else as a string.

    Raises:
        ValueError: an item without ``=``.
    """
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: write key=value, e.g. lr=0.01 or model_kwargs.width=8")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ValueError(f"--set {item!r}: the key before '=' is empty")
        out[key] = _coerce_value(value)
    return out


def _merge(d: dict, overrides: Mapping[str, Any]) -> dict:
    """``d`` (a config dict) with ``overrides`` applied; dotted keys set one dict entry."""
    d = dict(d)
    for key, value in overrides.items():
        if "." in key:
            base, sub = key.split(".", 1)
            d[base] = {**(d.get(base) or {}), sub: value}
        else:
            d[key] = value
    if "steps" in overrides and "epochs" not in overrides and overrides["steps"] is not None:
        d["epochs"] = None
    if "epochs" in overrides and "steps" not in overrides and overrides["epochs"] is not None:
        d["steps"] = None
    return d


def apply_overrides(config: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """A validated copy of ``config`` with ``overrides`` applied.

    Dotted keys set one entry of a dict field (``"model_kwargs.width": 8``); a whole dict
    replaces the field. Setting ``steps`` clears ``epochs`` and vice versa (unless both are
    given), so ``--set epochs=5`` works on a preset that counts steps.

    Raises:
        ValueError: an unknown key (the message lists the valid keys) or an invalid value.
    """
    _check_keys(overrides, f"overrides of {config.name!r}")
    return RunConfig(**_merge(config.to_dict(), overrides))


def _read_file(path: Path) -> dict:
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
    elif path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML ({err})") from err
    else:
        raise ValueError(f"config file {path}: use a .json or .toml file")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the config must be a table/object of RunConfig fields")
    return data


def load_config(source: "str | os.PathLike | RunConfig", **overrides) -> RunConfig:
    """A :class:`RunConfig` from a preset name or a JSON/TOML file, with overrides.

    A file holds RunConfig fields at the top level; it may name a ``preset`` to start from
    (``preset = "demo"`` then ``lr = 0.05``). TOML has no null: leave a key out to keep the
    default, or write ``"none"`` for ``batch_size``/``epochs``/``steps``/``n_train``.

    Args:
        source: a name of :data:`PRESETS`, a path ending in ``.json`` or ``.toml``, or a
            RunConfig (copied).
        **overrides: fields to change; dotted keys (``**{"model_kwargs.width": 8}``) set one
            option of a dict field.

    Returns:
        The validated config.

    Raises:
        ValueError: unknown preset (lists them), unreadable file, unknown key (names it and
            lists the valid keys), or an invalid value.
        FileNotFoundError: ``source`` looks like a file path but does not exist.

    Example:
        >>> load_config("demo", lr=0.001).lr
        0.001
    """
    if isinstance(source, RunConfig):
        return apply_overrides(source, overrides)
    text = os.fspath(source)
    if text in _PRESET_DATA:
        return apply_overrides(_preset(text), overrides)
    path = Path(text).expanduser()
    if path.suffix.lower() in (".json", ".toml"):
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = _read_file(path)
        data = {k: (None if v == "none" else v) for k, v in data.items()}
        base_name = data.pop("preset", None)
        if base_name is not None:
            if base_name not in _PRESET_DATA:
                raise ValueError(f"{path}: preset={base_name!r} is unknown; presets: "
                                 f"{', '.join(_PRESET_DATA)}")
            base = _preset(base_name).to_dict()
        else:
            base = {"name": path.stem}
        _check_keys(data, str(path))
        _check_keys(overrides, f"overrides of {path}")
        return RunConfig(**_merge(_merge(base, data), overrides))
    raise ValueError(f"unknown preset {text!r}; choose one of {', '.join(_PRESET_DATA)}, or give a "
                     ".json/.toml config file")


def config_from_store(path: "str | os.PathLike") -> RunConfig:
    """The :class:`RunConfig` a store was recorded with (``settings["recipe"]`` of its header).

    Raises:
        ValueError: the store was not recorded by :func:`run_recipe` (no recipe in its header);
            pass the model (and data) explicitly then.
    """
    from gradtrace_format.format import read_header

    header = read_header(path)
    recipe = (header.settings or {}).get("recipe")
    if not isinstance(recipe, dict):
        raise ValueError(
            f"{path} was not recorded from a recipe (no settings['recipe'] in its header); "
            "pass the model and the data explicitly, or a RunConfig"
        )
    known = set(_field_names())
    return RunConfig(**{k: v for k, v in recipe.items() if k in known})


def run_recipe(config: RunConfig, path: "str | os.PathLike", *, overwrite: bool = False,
               resume: bool = False, progress: "bool | int" = True) -> Path:
    """Train ``config`` and record it into the store at ``path``; see :func:`experiments.train.run_recipe`."""
    from experiments.train import run_recipe as _run

    return _run(config, path, overwrite=overwrite, resume=resume, progress=progress)
