"""``Recorder``: record a PyTorch training run's gradients and iterates into a run store.

What is recorded follows ``docs/methods.md``: at a recorded step t, ``G_t`` is the
``.grad`` of every trainable parameter (``named_parameters`` order, flattened, after backward
and after DDP's all-reduce, unscaled under AMP), ``w_t`` the weights it was computed at, plus
``loss``, ``lr`` (from the optimizer) and ``epoch``. At close the final iterate (the weights
after the last update) is recorded at one step past the last step seen.

The training thread only does cheap work:

1. the schedule is asked first; a step it skips costs one Python call;
2. a free buffer is taken from a small pool (``queue_size + 1`` buffers, allocated on first
   use on a CPU, when the Recorder is made on CUDA): if the writer is behind, this blocks
   (backpressure, bounded memory);
3. gradients and weights are flattened into it with one ``torch.cat`` each (on CUDA: into a
   device staging buffer, then one non-blocking copy to pinned host memory and a CUDA event;
   no ``.item()`` sync; the loss travels the same way). On a CPU, once the loop has shown that
   it drops its gradients, the ``.grad`` tensors themselves go to the writer, which reads them
   in place (``capture.writer.SplitRow``), and the weights are read ahead by a helper thread;
4. the buffer is queued to a writer thread that runs :class:`capture.writer.StoreWriter`
   (float64 scalars, encoding, chunk writes with crc32c, commit marker).

An error in the writer thread (disk full, unwritable path) is raised to the training loop at
the next ``record()`` or ``close()`` as :class:`RecorderWriteError`; the store then holds every
step committed before it and can be resumed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np

try:
    import torch
except ModuleNotFoundError as _err:  # a plain install reads and analyses stores; recording needs torch
    if _err.name != "torch":
        raise
    raise ModuleNotFoundError('recording needs PyTorch, which this install lacks: pip install "gradtrace[capture]"',
                              name="torch") from None

from gradtrace_format import format as fmt
from gradtrace_format.format import (
    FLAG_LR_GROUPS_DIFFER,
    FLAG_MISSING_GRAD,
    FLAG_NO_WEIGHT,
    FLAG_SKIPPED,
    StoreMismatchError,
    Tier,
)
from capture.schedules import Schedule, every_step, parse_schedule, schedule_to_json
from capture.sink import split_location, store_name
from capture.writer import SplitRow, StoreWriter, check_page_cache

__all__ = ["Recorder", "RecorderWriteError", "restore_weights", "model_table", "parse_tiers"]

MODEL_REPR_CHARS = 2000
#: seconds between commits while the writer keeps up: a commit (the per-step rows and the root
#: metadata, ~0.5-1 ms of CPU beside a fast training step here) at every fast step would cost
#: the writer more than its chunks of a small model; rows are committed this long after the
#: previous commit at the latest
COMMIT_GAP = 0.1


class _Commit:
    """A writer job: commit every row written so far, then set ``done`` (flush waits on it:
    the queue is FIFO, so every job queued before it has been written and is committed)."""

    def __init__(self):
        self.done = threading.Event()


class _Held(NamedTuple):
    """A written row whose gradients the writer read by reference, not yet checked."""

    step: int
    slot: "_Slot"
    weight: "np.ndarray | None"
    loss: float
    lr: float
    epoch: int
    flags: int
    stored: int  # the flags append returned


class _CommitFailed(Exception):
    """A commit failed and was reported (``_writer_failed``); the caller only stops."""


class RecorderWriteError(RuntimeError):
    """Writing the store failed in the writer thread; the store holds the steps before it."""


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DistributedDataParallel / DataParallel (their names lack 'module.')."""
    wrappers = (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model


def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in _unwrap(model).named_parameters() if p.requires_grad]


def model_table(model: torch.nn.Module) -> list[fmt.TensorInfo]:
    """The parameter table of ``model``'s trainable parameters (``named_parameters`` order)."""
    return fmt.tensor_table([(n, tuple(p.shape)) for n, p in _trainable(model)])


def parse_tiers(tiers: "str | Tier | Mapping[str, Any]") -> dict[str, Tier]:
    """``"lossless"`` (both arrays) or ``{"grad": "rounded:7", "weight": "lossless"}`` -> Tiers."""
    if isinstance(tiers, Mapping):
        unknown = set(tiers) - set(fmt.DATA_ARRAYS)
        if unknown:
            raise ValueError(
                f"tiers: unknown array(s) {sorted(unknown)}; give tiers for 'grad' and/or 'weight'"
            )
        return {a: Tier.parse(tiers.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
    t = Tier.parse(tiers)
    return {a: t for a in fmt.DATA_ARRAYS}


def _check_step(step) -> int:
    """``fmt.check_step`` (the format's one rule for steps), after taking a one-element integer
    tensor (a step counter kept on the device) for its value."""
    if isinstance(step, torch.Tensor) and step.numel() == 1 and not step.is_floating_point():
        step = int(step)
    return fmt.check_step(step, "record(step)")


def _scalar(v) -> float:
    """A loss or lr as a float (a tensor is read with a sync: only for skipped steps)."""
    if v is None:
        return math.nan
    return float(v.detach().reshape(-1)[0]) if isinstance(v, torch.Tensor) else float(v)


def _check_one(v: torch.Tensor, what: str) -> None:
    if v.numel() != 1:
        raise ValueError(
            f"record: {what} must be a scalar, got a tensor of shape {tuple(v.shape)}; "
            f"pass {what}.mean() or the value the optimizer used"
        )


def _host_value(v) -> float:
    """The float of a value :meth:`Recorder._off_device` prepared: a float, or ``(device
    tensor, side stream)``, read here (in the writer thread) by a copy on that stream and a
    wait for that stream alone."""
    if isinstance(v, tuple):
        t, stream = v
        with torch.cuda.stream(stream):
            return float(t.reshape(-1)[0])
    return v


def lag_dots(g: torch.Tensor, ring: list, band: int) -> torch.Tensor:
    """float64 ``<g, ring[-k]>`` for k = 1..band where the gradients live (NaN where the ring
    holds no gradient k rows back): float64 products of the float32 entries."""
    out = torch.full((band,), math.nan, dtype=torch.float64, device=g.device)
    g64 = None
    for k, prev in enumerate(reversed(ring), start=1):
        if prev is not None:
            g64 = g.double() if g64 is None else g64
            out[k - 1] = torch.dot(g64, prev.double())
    return out


def _dist_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _version() -> str:
    try:
        return importlib.metadata.version("gradtrace")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (gradtrace not installed; running from a source tree)"


def _hyper(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _run_settings(model, params, optimizer, scaler, schedule, user: dict | None, world: int) -> dict:
    """Settings stored in the header: optimizer, hyperparameters, seed, versions, model."""
    module = _unwrap(model)
    text = repr(module)
    s: dict[str, Any] = {
        "model": {
            "class": type(module).__name__,
            # cut at a line end, never inside a name
            "repr": text if len(text) <= MODEL_REPR_CHARS else text[:max(text.rfind("\n", 0, MODEL_REPR_CHARS), 0)] + "\n  ...",
            "n_params": int(sum(p.numel() for p in module.parameters())),
            "n_trainable": int(sum(p.numel() for _, p in params)),
            "n_tensors": len(params),
        },
        "seed": int(torch.initial_seed()),
        "torch_version": torch.__version__,
        "gradtrace_version": _version(),
        "device": str(params[0][1].device),
        "world_size": int(world),
        "schedule": schedule.describe() if isinstance(schedule, Schedule) else repr(schedule),
        "grad_clip": None,
        "grad_recorded": None,  # "before_clip" / "after_clip" when the loop clips (Recorder(grad_recorded=))
    }
    if optimizer is not None:
        groups = [_hyper(g) for g in optimizer.param_groups]
        s["optimizer"] = {
            "class": type(optimizer).__name__,
            "defaults": dict(optimizer.defaults),
            "param_groups": groups,
        }
        s["param_groups"] = groups
        where = {id(q): k for k, g in enumerate(optimizer.param_groups) for q in g["params"]}
        s["param_group_of"] = [where.get(id(p)) for _, p in params]  # group of each recorded tensor
        s["weight_decay"] = [g.get("weight_decay") for g in groups] if len(groups) > 1 else groups[0].get("weight_decay")
        lrs = [g.get("lr") for g in groups]
        s["lr_groups_differ"] = len({repr(x) for x in lrs}) > 1
    if scaler is not None:
        s["amp"] = {
            "grad_scaler": type(scaler).__name__,
            "enabled": bool(scaler.is_enabled()),
            "init_scale": getattr(scaler, "_init_scale", None),
            "recorded": "unscaled gradients (p.grad / loss scale)",
        }
    if user:
        s.update(user)
    return s


class _Slot:
    """One host buffer of the pool: flat grad and weight (float32, pinned on CUDA).

    On CUDA each slot also owns its device staging vectors (filled on the training stream)
    and one event per device, recorded on that device's side stream after its copies.
    """

    def __init__(self, d: int, cuda: bool, dense: bool = True):
        kw = {"dtype": torch.float32, "pin_memory": cuda}
        # dense=False: encoded on the device, the host receives only the encoded payload
        self.grad = torch.empty(d, **kw) if dense else None
        self.weight = torch.empty(d, **kw) if dense else None
        self.scalars = torch.full((2,), math.nan, dtype=torch.float64, pin_memory=cuda)
        self.grad_np = self.grad.numpy() if dense else None
        self.weight_np = self.weight.numpy() if dense else None
        self.scalars_np = self.scalars.numpy()
        self.events: list = []
        self.stage: dict = {}
        self.refs: list[torch.Tensor] | None = None  # gradients held by reference (CPU)
        self.versions: list[int] | None = None
        self.call_no = 0  # the record() call that filled refs (Recorder._n_calls)
        self.prefetch: list | None = None  # parameter state when the weights were read ahead
        self.host: dict | None = None  # pinned host copies of the device encoder's output
        self.host_np: dict | None = None


_THREADS_WARNED = False


#: Below this many parameters a row costs the writer well under a millisecond: no warning.
THREADS_WARNING_MIN_PARAMS = 100_000


def _warn_threads(cuda: bool, d: int) -> None:
    """Warn once per process when CPU training of a model of at least
    :data:`THREADS_WARNING_MIN_PARAMS` parameters lets torch use every core (the writer then
    takes a core from torch's threads, whose barrier waits multiply the step time)."""
    global _THREADS_WARNED
    cores = os.cpu_count() or 1
    if cuda or _THREADS_WARNED or cores < 2 or d < THREADS_WARNING_MIN_PARAMS or torch.get_num_threads() < cores:
        return
    _THREADS_WARNED = True
    warnings.warn(
        f"gradtrace: torch uses all {cores} cores (torch.get_num_threads() = {torch.get_num_threads()}) "
        "and the recorder's writer thread will take one of them from it, which can multiply the "
        f"step time. Leave the writer a core: torch.set_num_threads({cores - 1}) before training "
        "(README: Recording at training speed). This warning is shown once.",
        RuntimeWarning,
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------
# Recorder
# --------------------------------------------------------------------------------------


class Recorder:
    """Records gradients and iterates of a training run into a run store.

    Use it as a context manager (or call :meth:`close`), and call :meth:`record` after
    ``backward()`` and before ``optimizer.step()``::

        with Recorder(model, "runs/cnn.zarr", optimizer=opt) as rec:
            for step, (x, y) in enumerate(batches):
                loss = loss_fn(model(x), y)
                loss.backward()
                rec.record(step, loss=loss)
                opt.step(); opt.zero_grad()

    Args:
        model: the model (a DDP / DataParallel wrapper is unwrapped). Its trainable parameters,
            in ``named_parameters()`` order, define the flat vectors of length d.
        path: directory of the run store (Zarr v3), or an fsspec URL such as
            ``"s3://bucket/run.zarr"`` (``file://`` URLs are local paths): written straight to
            object storage as whole objects, with the same commit order and crash guarantees
            (a killed run is readable up to its last committed step; :mod:`capture.sink`). On a
            URL there is no writer lock (one writer per URL is up to you), ``resume`` and
            ``overwrite`` are refused, the URL must hold no objects yet, and ``durable`` is
            moot. Cost per step: README, "Recording straight to object storage".
        optimizer: read for ``lr`` (``param_groups[0]["lr"]``) and the run's settings; needed
            with ``scaler``.
        schedule: which steps to record: a ``step -> bool`` callable
            (:mod:`capture.schedules`) or a preset string such as ``"every:10"``.
        tiers: fidelity tier of both arrays (``"lossless"``, ``"rounded:7"``, ``"sketch:4096"``)
            or a dict ``{"grad": ..., "weight": ...}``.
        resume: append to an existing store (the parameter table, dtype and tiers must match).
        resume_step: with ``resume``, drop stored rows whose step is >= this (restart from a
            checkpoint taken at that step).
        overwrite: replace an existing gradtrace store at ``path`` (an empty directory too;
            anything else, a file or a foreign directory, is refused).
        scaler: a ``torch.amp.GradScaler``: gradients are recorded unscaled (divided by the
            loss scale unless ``scaler.unscale_(optimizer)`` was already called this step).
        settings: extra settings to store in the header (e.g. ``{"grad_clip": 1.0}``).
        expected_steps: number of rows to preallocate (optional).
        queue_size: steps that may wait for the writer; the pool holds ``queue_size + 1``
            buffers of 2 d float32 each, allocated on first use (one more on a CPU, where the
            writer keeps the buffer of a row read by reference until it has checked it). On
            CUDA all of them are allocated here, each with 2 d float32 of device staging and
            pinned host memory for what crosses to the host, whether or not the writer ever
            falls behind: ``record()`` allocates none of them, and a pool that does not fit
            fails now, before the store is created.
        param_chunk: chunk width of the stored rows along ``param``.
        writer_threads: threads the writer uses to encode and write one row's chunks (and
            reduce its per-tensor scalars) concurrently. 1 (default) suits a machine whose
            cores the training already uses; on a GPU host with idle cores, 2-8 lets the writer
            keep up with fast steps of a large model. The stored bytes are the same either way.
        parent: for a branched ("zoom") run, ``{"store": ..., "step": ...}`` of its origin (what
            :func:`restore_weights` returns).
        weight_schedule: which of the recorded steps also store the weights (a ``step -> bool``
            callable or a preset such as ``"every:10"``); None (default) stores them at every
            recorded step. Rows without weights carry ``FLAG_NO_WEIGHT``; RSI, EB and gamma
            exist on the steps that have weights. The final iterate always has them.
        on_full: what ``record()`` does when the writer is behind and every buffer is queued:
            ``"block"`` (default) waits for a free buffer, so nothing is lost and training slows
            down to the writer's pace; ``"skip"`` returns at once and stores the step as a
            skipped row (``FLAG_SKIPPED``: step, loss and lr only), so training never waits.
        commit_interval: while the writer is behind, rows are committed (the marker that
            readers and a resume trust) at most every this many seconds; while it keeps up,
            ``COMMIT_GAP`` (0.1 s) after the previous commit at the latest, and at once on
            ``flush()`` and ``close()``. A kill loses the uncommitted rows besides the queued ones.
        lag_band: keep the last L recorded gradients (float32, where they live: on the GPU when
            training there) and store ``grad_lag_dot`` = <G_r, G_(r-k)> for k = 1..L rows back,
            in float64 from the full-precision gradient: lag series and mean correlations for
            lags up to L are then exact and instant for every tier, sketch and rounded
            included. Costs L dot products and one copy per step (README: lag band).
        grads_by_reference: on CPU, hand the ``.grad`` tensors to the writer instead of copying
            them on the training thread. ``"auto"`` (default) does so once two recorded steps
            have shown that the loop drops its gradients (``zero_grad(set_to_none=True)``) and
            does not change them in place after ``record()``; each referenced gradient's version
            counter is checked after the writer has read it, and a gradient changed in place
            in between is not stored (the row is flagged ``FLAG_SKIPPED``, with a warning, and
            the recorder copies from then on). ``False`` always copies.
        grad_recorded: for a loop that clips gradients, where ``record()`` is called:
            ``"before_clip"`` (record() before ``clip_grad_norm_``: the raw gradient, what the
            No Wrong Turns code measures) or ``"after_clip"``; stored in the header as
            ``settings["grad_recorded"]`` (None: not declared). Put the threshold in
            ``settings={"grad_clip": ...}``. What is stored is ``.grad`` as record() saw it: an
            in-place clip afterwards does not change it (the recorder then copies gradients).
        durable: fsync each committed step (chunks, then the commit marker) so that it survives
            a power cut; without it a kill loses nothing committed, a power cut may (README,
            "Crash safety").
        sharded: None (default) detects a sharded model (DTensor parameters, FSDP2
            ``fully_shard``) and then returns a :class:`capture.sharded.ShardedRecorder` (every
            rank writes its own columns; ``record()`` is collective); True forces it, False
            never.
        storage_options: fsspec options for a URL ``path`` (``endpoint_url``, ``key``,
            ``secret``, ``anon``...), as ``analysis.open_run`` takes them.
        page_cache: ``"auto"`` (default): the first GiB of the store's chunks (at most 1/16
            of the memory the process may use) stays in the page cache like any file
            written, and from there on as ``"drop"``: each row's chunks are handed to the
            disk at once and dropped from the page cache once written, so a long run keeps a
            bounded window (about 64 MB beside the last row, and less than 1 MB of each shard
            file being appended to) instead of filling memory with the store and evicting
            other files' pages (README, "Long runs and the page cache"); ``"keep"``: every
            chunk stays in the page cache. A local store only; the stored bytes and commits
            are unchanged, but for a write error the kernel reports: raised, and no row
            committed after it.

    One writer per store: the recorder holds the store's lock file until ``close`` (a dead
    process releases it); a second writer gets ``gradtrace_format.format.StoreLockedError``.

    Under ``torch.distributed`` only rank 0 writes; on other ranks ``record`` is a no-op.
    A sharded model (FSDP2 ``fully_shard``: DTensor parameters, or ``sharded=True``) gets a
    :class:`capture.sharded.ShardedRecorder` on every rank instead: each rank writes its own
    shards' columns, nothing is gathered (README, "Sharded models").

    Raises:
        ValueError: no trainable parameters, bad arguments.
        FileExistsError: ``path`` exists and neither ``resume`` nor ``overwrite`` was given.
        gradtrace_format.format.StoreMismatchError: resuming a store that does not match.
        gradtrace_format.format.StoreLockedError: another writer holds the store.
    """

    def __new__(cls, model=None, *args, sharded: bool | None = None, **kwargs):
        # a sharded model (FSDP2 DTensor parameters, or sharded=True): every rank writes its
        # own columns (capture.sharded.ShardedRecorder)
        if cls is Recorder and model is not None and sharded is not False:
            from capture.sharded import ShardedRecorder, has_dtensors

            if sharded or has_dtensors(model):
                return ShardedRecorder(model, *args, **kwargs)
        return super().__new__(cls)

    def __init__(
        self,
        model: torch.nn.Module,
        path: "str | os.PathLike",
        optimizer: torch.optim.Optimizer | None = None,
        *,
        schedule: "Callable[[int], bool] | str" = every_step,
        tiers: "str | Tier | Mapping[str, Any]" = "lossless",
        resume: bool = False,
        resume_step: int | None = None,
        overwrite: bool = False,
        scaler=None,
        settings: dict | None = None,
        expected_steps: int | None = None,
        queue_size: int = 2,
        param_chunk: int = fmt.DEFAULT_PARAM_CHUNK,
        writer_threads: int = 1,
        parent: dict | None = None,
        weight_schedule: "Callable[[int], bool] | str | None" = None,
        on_full: str = "block",
        commit_interval: float = 1.0,
        grads_by_reference: "bool | str" = "auto",
        grad_recorded: str | None = None,
        lag_band: int = 0,
        durable: bool = False,
        sharded: bool | None = None,
        storage_options: dict | None = None,
        page_cache: str = "auto",
    ):
        if resume and overwrite:
            raise ValueError("Recorder: resume=True and overwrite=True contradict each other; pick one")
        if resume_step is not None and not resume:
            raise ValueError("Recorder: resume_step is only meaningful with resume=True")
        if int(queue_size) < 1:
            raise ValueError(f"Recorder: queue_size={queue_size} must be >= 1")
        if settings is not None and not isinstance(settings, Mapping):
            raise TypeError(f"Recorder: settings must be a dict, got {type(settings).__name__}")
        if grad_recorded not in (None, "before_clip", "after_clip"):
            raise ValueError(f"Recorder: grad_recorded={grad_recorded!r}: use 'before_clip' (record() called before "
                             "clip_grad_norm_), 'after_clip', or None when the loop does not clip")
        if grad_recorded is not None:
            settings = {**(settings or {}), "grad_recorded": grad_recorded}
        check_page_cache(page_cache, "Recorder: ")
        local, url = split_location(path)
        self.path = local if url is None else url  # a Path, or the URL of a remote store
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.scaler = scaler if (scaler is not None and scaler.is_enabled()) else None
        if self.scaler is not None and optimizer is None:
            raise ValueError(
                "Recorder: with a GradScaler, pass optimizer= too: the recorder asks the scaler whether "
                "unscale_(optimizer) was already called this step."
            )
        if on_full not in ("block", "skip"):
            raise ValueError(f"Recorder: on_full={on_full!r}: use 'block' (wait for the writer) or 'skip'")
        if grads_by_reference not in ("auto", True, False):
            raise ValueError(f"Recorder: grads_by_reference={grads_by_reference!r}: use 'auto' or False")
        if not float(commit_interval) >= 0:
            raise ValueError(f"Recorder: commit_interval={commit_interval} must be >= 0 seconds")
        self.on_full = on_full
        self.commit_interval = float(commit_interval)
        self.schedule = parse_schedule(schedule)
        self.weight_schedule = None if weight_schedule is None else parse_schedule(weight_schedule)
        self.tiers = parse_tiers(tiers)
        self._params = _trainable(model)
        if not self._params:
            raise ValueError(
                "Recorder: the model has no trainable parameters (none with requires_grad=True). "
                "Pass the model you train, after unfreezing what you want recorded."
            )
        self.tensors = fmt.tensor_table([(n, tuple(p.shape)) for n, p in self._params])
        self.d = sum(t.size for t in self.tensors)
        self.rank, self.world_size = _dist_rank()
        self.active = self.rank == 0
        devices = {p.device for _, p in self._params}
        self.device = next(iter(devices)) if len(devices) == 1 else None
        self._cuda = any(dev.type == "cuda" for dev in devices)
        dtypes = sorted({str(p.dtype).replace("torch.", "") for _, p in self._params})
        self.source_dtype = ",".join(dtypes)
        self._fast_cat = self.device is not None and dtypes == ["float32"]
        # gradients handed to the writer by reference: CPU float32 parameters, no loss scaling
        self._by_ref_allowed = (grads_by_reference == "auto" and not self._cuda and self._fast_cat
                                and self.scaler is None)
        self._by_ref = False  # decided after two clean recorded steps
        self._ref_clean = 0
        self._ref_probe: list | None = None  # (tensors, versions) of the last copied step
        self._quiet = threading.Event()  # set while the training thread waits in flush/close
        self._stepped = threading.Event()  # set by every record() call
        self._n_skipped = 0
        self._n_grad_changed = 0
        self._warned_changed = False
        self._grad_ids: tuple = ()  # id() of each parameter's .grad at the last record() call
        self._n_calls = 0  # record() calls so far (a row read by reference knows its own)
        self._pf_hook = None  # optimizer hook of the weights read ahead (rank 0, CPU)
        self._n_prefetched = 0
        self._readahead_cpu_s = 0.0  # CPU time of the helper thread that reads the weights ahead
        _warn_threads(self._cuda, self.d)
        self._steps_per_epoch = getattr(self.schedule, "steps_per_epoch", None)

        # counters (training thread unless noted)
        self._last_seen: int | None = None
        self._last_queued: int | None = None
        self._n_queued = 0
        self._n_missing = 0
        self._record_s = 0.0
        self._wait_s = 0.0
        self._warned_nonfinite = False
        self._closed = False
        # (error, what failed: "write step S" or "commit the steps up to S")
        self._error: tuple[BaseException, str] | None = None
        # writer-thread counters
        self._writer_s = 0.0
        self._writer_cpu_s = 0.0  # CPU time of the writer thread (its pool's threads not included)
        self._nonfinite_steps: list[int] = []

        self.writer: StoreWriter | None = None
        if not self.active:
            return
        self.lag_band = int(lag_band)
        if self.lag_band < 0:  # before the pool, whose buffers it sizes (the store says it again)
            raise ValueError(f"lag_band={lag_band} must be >= 0 (gradient rows back)")
        self._dev_ring: list = []  # device path: the last lag_band gradients (None: no gradient)
        # one more buffer where gradients may go by reference: the writer keeps a row's buffer
        # until it has checked the row, after the loop's next record() call
        self._pool_size = int(queue_size) + 1 + bool(self._by_ref_allowed)
        self._n_slots = 0
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        if self._cuda:
            # on a GPU the pool's buffers are made now (each with its device staging), and the
            # device encoder (its sketch hash codes and working buffers): record() allocates
            # none of them, never waits for their setup, and a pool that does not fit fails
            # here, before the store is created, not at the step where the writer falls behind
            for _ in range(self._pool_size):
                self._free.put(self._make_slot())
            self._n_slots = self._pool_size
        mode = "resume" if resume else ("overwrite" if overwrite else "create")
        user_settings = dict(settings or {})
        if self.weight_schedule is not None:
            user_settings["weight_schedule"] = {**schedule_to_json(self.weight_schedule),
                                                "description": self.weight_schedule.describe()}
        self.writer = StoreWriter(
            self.path,
            self.tensors,
            self.tiers,
            mode=mode,
            resume_step=resume_step,
            param_chunk=param_chunk,
            expected_steps=expected_steps,
            schedule={**schedule_to_json(self.schedule), "description": self.schedule.describe()},
            settings=_run_settings(model, self._params, optimizer, self.scaler, self.schedule, user_settings,
                                   self.world_size),
            parent=parent,
            source_dtype=self.source_dtype,
            threads=writer_threads,
            lag_band=lag_band,
            durable=durable,
            storage_options=storage_options,
            page_cache=page_cache,
        )
        self._last_queued = self.writer.last_step
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._writer_loop, name=f"gradtrace-writer:{store_name(self.path)}", daemon=True)
        self._thread.start()
        # weights read ahead: after each optimizer step a helper thread copies the new weights
        # into a free buffer while the next forward/backward runs; record() uses them when no
        # parameter changed since (version counters and storage pointers)
        self._pf_lock = threading.Condition()
        self._pf_slot: _Slot | None = None
        self._pf_running = False
        self._pf_go = threading.Event()
        if (grads_by_reference == "auto" and not self._cuda and self._fast_cat and optimizer is not None
                and hasattr(optimizer, "register_step_post_hook")):
            self._pf_hook = optimizer.register_step_post_hook(lambda *_: self._pf_go.set())
            self._pf_thread = threading.Thread(target=self._prefetch_loop, name=f"gradtrace-weights:{store_name(self.path)}",
                                               daemon=True)
            self._pf_thread.start()

    # ------------------------------------------------------------------ context manager

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        # training failed: keep what was committed, do not record a final iterate, and do not
        # hide the training error behind a writer error
        try:
            self.close(record_final=False)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"gradtrace: closing {self.path} after a training error also failed: {err}", stacklevel=2)

    # ------------------------------------------------------------------ training thread

    def record(self, step: int, loss=None, epoch: int | None = None, lr=None) -> bool:
        """Record step ``step`` if the schedule says so. Call after backward, before ``opt.step()``.

        Args:
            step: global training step (int, increasing across calls).
            loss: the step's loss (a scalar tensor, copied without a sync, or a float).
            epoch: the epoch; derived from the schedule's ``steps_per_epoch`` when None.
            lr: the learning rate of this step's update; read from
                ``optimizer.param_groups[0]["lr"]`` when None.

        Returns:
            True when the step was queued for writing (False: not scheduled, or skipped
            because the writer was behind and ``on_full="skip"``).

        Raises:
            RecorderWriteError: a previous step failed to write (the store keeps what was
                committed before it).
            RuntimeError: every trainable parameter's ``.grad`` is None (record before backward).
            ValueError: ``step`` is not a non-negative int, or not after the previously
                recorded step.
        """
        if self._error is not None:
            self._raise_writer_error()
        if not self.active:
            return False
        if self._ref_probe is not None:
            self._probe_references()
        if not self._cuda:
            # before waking the writer: a row it read by reference whose tensors are still
            # among these at a later call cannot be checked (published even after reference
            # mode ends: the last rows read by reference may still be waiting for their check)
            self._grad_ids = tuple(id(p.grad) for _, p in self._params)
        self._n_calls += 1
        self._stepped.set()
        if self._n_grad_changed and not self._warned_changed:
            self._warn_changed()
        step = _check_step(step)
        if not self.schedule(step):
            self._last_seen = step
            return False
        return self._record(step, loss, epoch, lr)

    def _record(self, step, loss, epoch, lr) -> bool:
        t0 = time.perf_counter()
        if self._closed:
            raise RuntimeError(f"Recorder for {self.path} is closed; create a new one (resume=True to append)")
        if self._last_queued is not None and step <= self._last_queued:
            raise ValueError(
                f"record(step={step}): steps must increase, and step {self._last_queued} was already "
                "recorded. Pass the global step counter; after a restart from a checkpoint use "
                "Recorder(..., resume=True, resume_step=<checkpoint step>)."
            )
        grads = [p.grad for _, p in self._params]
        n_missing = sum(g is None for g in grads)
        if n_missing == len(grads):
            raise RuntimeError(
                f"record(step={step}): every trainable parameter's .grad is None, so there is no "
                "gradient to record. Call rec.record(...) after loss.backward() and before "
                "optimizer.zero_grad() (zero_grad sets .grad to None by default)."
            )
        flags = FLAG_MISSING_GRAD if n_missing else 0
        self._n_missing += bool(n_missing)

        lr_value, lr_differ = lr, None
        if lr_value is None and self.optimizer is not None:
            groups = self.optimizer.param_groups
            lr_value = groups[0]["lr"]
            if len(groups) > 1:
                lrs = [g["lr"] for g in groups]
                if any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in lrs):
                    differ = self._lrs_differ_on_device(lrs)  # read by the writer: no sync here
                    if differ is True:
                        flags |= FLAG_LR_GROUPS_DIFFER
                    elif differ is not None:
                        lr_differ = self._off_device(differ, "lr")
                elif any(x != lr_value for x in lrs[1:]):
                    flags |= FLAG_LR_GROUPS_DIFFER
        if epoch is None:
            epoch = step // self._steps_per_epoch if self._steps_per_epoch else -1
        with_weights = self.weight_schedule is None or bool(self.weight_schedule(step))
        if not with_weights:
            flags |= FLAG_NO_WEIGHT

        slot, have_weights = self._take_prefetched(with_weights)
        if slot is None:
            slot = self._take_slot()
        if slot is None:  # on_full="skip": the writer is behind; store the step as skipped
            self._jobs.put((step, None, int(epoch), flags | FLAG_SKIPPED | FLAG_NO_WEIGHT,
                            (self._off_device(loss, "loss"), self._off_device(lr_value, "lr")), lr_differ))
            self._n_skipped += 1
            if self.lag_band and self._cuda:
                self._push_dev_ring(None)
            self._last_queued = self._last_seen = step
            self._record_s += time.perf_counter() - t0
            return False
        try:
            self._fill(slot, grads, n_missing, loss, lr_value, with_weights and not have_weights)
        except BaseException:
            self._free.put(slot)
            raise
        self._jobs.put((step, slot, int(epoch), flags, None, lr_differ))
        self._last_queued = self._last_seen = step
        self._n_queued += 1
        if self._nonfinite_steps and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"gradtrace: the gradient at step {self._nonfinite_steps[0]} holds NaN or Inf. It is "
                "recorded as it is and flagged (FLAG_NONFINITE_GRAD); rec.summary() counts such steps. "
                "Training goes on; this warning is shown once.",
                RuntimeWarning,
                stacklevel=3,
            )
        self._record_s += time.perf_counter() - t0
        return True

    def _new_slot(self) -> _Slot | None:
        """A free buffer without waiting, allocating one while the pool is not full."""
        try:
            return self._free.get_nowait()
        except queue.Empty:
            pass
        with self._pf_lock:
            if self._n_slots >= self._pool_size:
                return None
            self._n_slots += 1
        return self._make_slot()

    def _make_slot(self) -> _Slot:
        """A new buffer; on CUDA with its device staging vectors and, when the device encodes,
        the pinned host buffers of the encoded payload."""
        enc = self._encoder
        slot = _Slot(self.d, self._cuda, dense=enc is None)
        if enc is not None:
            slot.stage[enc.device] = (torch.empty(self.d, dtype=torch.float32, device=enc.device),
                                      torch.empty(self.d, dtype=torch.float32, device=enc.device))
            payload = dict(enc.payload())
            if self.lag_band:
                payload["lag_dots"] = (torch.float64, (self.lag_band,))
            slot.host = {k: torch.empty(shape, dtype=dtype, pin_memory=True) for k, (dtype, shape) in payload.items()}
            slot.host_np = {k: v.numpy() for k, v in slot.host.items()}
        elif self._cuda:
            for dev, (_, lo, hi) in self._device_groups.items():
                slot.stage[dev] = (torch.empty(hi - lo, dtype=torch.float32, device=dev),
                                   torch.empty(hi - lo, dtype=torch.float32, device=dev))
        return slot

    def _take_slot(self) -> _Slot | None:
        slot = self._new_slot()
        if slot is not None:
            return slot
        if self.on_full == "skip":
            if self._error is not None:
                self._raise_writer_error()
            return None
        t0 = time.perf_counter()
        while True:  # backpressure: wait for the writer, but notice if it died
            try:
                slot = self._free.get(timeout=0.05)
                self._wait_s += time.perf_counter() - t0
                return slot
            except queue.Empty:
                if self._error is not None:
                    self._raise_writer_error()

    def _flat(self, tensors: list[torch.Tensor], out: torch.Tensor, non_blocking: bool = True) -> None:
        """Flatten ``tensors`` (named_parameters order) into ``out`` (float32, length d)."""
        if self._fast_cat and out.device == tensors[0].device:
            torch.cat([t.reshape(-1) for t in tensors], out=out)
            return
        for t, info in zip(tensors, self.tensors):
            out[info.offset : info.offset + info.size].copy_(t.reshape(-1), non_blocking=non_blocking)

    def _fill(self, slot: _Slot, grads, n_missing: int, loss, lr, with_weights: bool = True) -> None:
        weights = [p.detach() for _, p in self._params]
        if n_missing or any(g.is_sparse for g in grads):
            grads = [
                torch.zeros_like(p) if g is None else (g.to_dense() if g.is_sparse else g)
                for g, (_, p) in zip(grads, self._params)
            ]
        inv_scale = self._inv_scale()
        slot.refs = slot.versions = None
        if self._cuda:
            self._fill_cuda(slot, grads, weights, inv_scale, with_weights)
        else:
            if self._by_ref and not n_missing:
                # no copy on the training thread: the writer reads them in place, then checks that
                # no version counter moved (see grads_by_reference)
                # the .grad tensors themselves (not detached views): their ids identify them
                slot.refs = list(grads)
                slot.versions = [g._version for g in grads]
                slot.call_no = self._n_calls
            else:
                # a copy that is multiplied afterwards must have landed first (blocking copy)
                self._flat(grads, slot.grad, non_blocking=inv_scale is None)
                if inv_scale is not None:
                    slot.grad.mul_(inv_scale.to(slot.grad.device))
                if self._by_ref_allowed and not n_missing:
                    self._ref_probe = [list(grads), [g._version for g in grads]]
            if with_weights:
                self._flat(weights, slot.weight, non_blocking=True)
        scalar_devs: list = []  # devices whose side stream copies the loss or lr
        for i, v in enumerate((loss, lr)):
            if v is None:
                slot.scalars_np[i] = math.nan
            elif isinstance(v, torch.Tensor):
                _check_one(v, "loss" if i == 0 else "lr")
                if v.device.type == "cuda":
                    src, side = self._snapshot(v)
                    with torch.cuda.stream(side):
                        slot.scalars[i : i + 1].copy_(src, non_blocking=True)
                    if v.device not in scalar_devs:
                        scalar_devs.append(v.device)
                else:
                    slot.scalars[i : i + 1].copy_(v.detach().reshape(1))
            else:
                slot.scalars_np[i] = float(v)
        if self._cuda:
            slot.events = []
            devs = self._devices
            devs += [x for x in scalar_devs if x not in devs]  # a loss on a device without parameters
            for dev in devs:
                # blocking: the writer's synchronize() sleeps instead of spinning a core
                ev = torch.cuda.Event(blocking=True)
                ev.record(self._side_stream(dev))
                slot.events.append(ev)

    # ------------------------------------------------------------------ weights read ahead

    def _param_state(self) -> list:
        return [(p._version, p.data_ptr()) for _, p in self._params]

    def _prefetch_loop(self) -> None:
        cpu0 = time.thread_time()
        while True:
            self._readahead_cpu_s = time.thread_time() - cpu0
            self._pf_go.wait()
            self._pf_go.clear()
            if self._closed:
                return
            nxt = (self._last_seen + 1) if self._last_seen is not None else None
            if nxt is not None and not (self.schedule(nxt) and (self.weight_schedule is None
                                                                or self.weight_schedule(nxt))):
                continue  # the next step is not recorded (or without weights): nothing to read
            with self._pf_lock:
                # _quiet: flush/close wait for every buffer; no read-ahead may take one then
                if self._pf_running or self._closed or self._quiet.is_set():
                    continue
                slot, self._pf_slot = self._pf_slot, None
                self._pf_running = True
            try:
                if slot is None:
                    slot = self._new_slot()
                if slot is not None:
                    before = self._param_state()
                    torch.cat([p.detach().reshape(-1) for _, p in self._params], out=slot.weight)
                    slot.prefetch = before if self._param_state() == before else None
            except BaseException:  # noqa: BLE001 - record() then copies the weights itself
                if slot is not None:
                    slot.prefetch = None
            finally:
                with self._pf_lock:
                    self._pf_slot = slot
                    self._pf_running = False
                    self._pf_lock.notify_all()

    def _take_prefetched(self, with_weights: bool) -> tuple[_Slot | None, bool]:
        """The read-ahead buffer, and whether its weights are this step's (no parameter
        changed since they were read)."""
        if self._pf_hook is None:
            return None, False
        with self._pf_lock:
            while self._pf_running:
                self._pf_lock.wait()
            slot, self._pf_slot = self._pf_slot, None
        if slot is None:
            return None, False
        ok = with_weights and slot.prefetch is not None and slot.prefetch == self._param_state()
        slot.prefetch = None
        self._n_prefetched += ok
        return slot, ok

    def _release_prefetched(self) -> None:
        """Give the read-ahead buffer back to the pool (flush and close wait for every buffer)."""
        if self._pf_hook is None:
            return
        with self._pf_lock:
            while self._pf_running:
                self._pf_lock.wait()
            slot, self._pf_slot = self._pf_slot, None
        if slot is not None:
            self._free.put(slot)

    # ------------------------------------------------------------------ CUDA

    def _lrs_differ_on_device(self, lrs: list):
        """Whether the param groups' lrs differ from group 0's, compared as the host comparison
        ``lr != lrs[0]`` would (the same dtype promotion) but where the CUDA ones live: True
        when two host values (numbers, CPU tensors) already differ, else a device bool tensor
        (None: nothing to compare on the device). A comparison on the host would read them
        with a sync. Every tensor keeps its shape (a tensor with a dimension outranks a 0-dim
        one in promotion); a 0-dim CPU tensor stays on the host, a scalar operand a CUDA op
        promotes as the host does (float32 on the device against float64 on the host compares
        in float64; a Python number takes the tensor's dtype)."""
        dev = next(x.device for x in lrs if isinstance(x, torch.Tensor) and x.device.type == "cuda")

        def here(x):
            """A tensor of its own shape (the shape takes part in dtype promotion): a CUDA one
            on dev (an async copy between GPUs), a 0-dim CPU one as it is (a CUDA op's scalar
            operand), any other CPU one copied to dev (from pageable memory: staged at once,
            no device sync)."""
            if isinstance(x, torch.Tensor):
                x = x.detach()
                if x.device.type == "cuda" or x.dim() > 0:
                    return x.to(dev, non_blocking=True)
            return x

        def on_cuda(x) -> bool:
            return isinstance(x, torch.Tensor) and x.device.type == "cuda"

        first = here(lrs[0])
        on_device = []
        for x in map(here, lrs[1:]):
            if on_cuda(first):
                on_device.append(torch.ne(first, x))
            elif on_cuda(x):
                on_device.append(torch.ne(x, first))  # ne is symmetric: the CUDA tensor first
            elif bool(x != first):  # two host values: compared now, as the host path does
                return True
        return torch.cat([t.reshape(-1) for t in on_device]).any() if on_device else None

    def _snapshot(self, v: torch.Tensor) -> tuple:
        """``(float64 copy of the one-element CUDA tensor v, v's side stream)``: the copy is made
        on the training stream (v may be a temporary the caller frees at once, such as the
        callbacks' averaged loss, or an lr a scheduler changes in place), and the side stream
        is made to wait for it, so that what the side stream then reads is this step's value."""
        src = v.detach().reshape(1).to(torch.float64, copy=True)
        side = self._side_stream(v.device)
        side.wait_stream(torch.cuda.current_stream(v.device))
        src.record_stream(side)
        return src, side

    def _off_device(self, v, what: str):
        """A loss, lr or flag for the writer without a sync on the training thread: a CUDA
        tensor as its :meth:`_snapshot`, which :func:`_host_value` reads in the writer;
        anything else as a float."""
        if isinstance(v, torch.Tensor):
            _check_one(v, what)
        if not (isinstance(v, torch.Tensor) and v.device.type == "cuda"):
            return _scalar(v)
        return self._snapshot(v)

    def _side_stream(self, device: torch.device):
        """The copy stream of ``device`` (one per device, created on first use)."""
        streams = self.__dict__.setdefault("_streams", {})
        key = torch.device(device).index
        if key not in streams:
            streams[key] = torch.cuda.Stream(device=device)
        return streams[key]

    @functools.cached_property
    def _encoder(self):
        """The device encoder (``capture.encode``) when every parameter is on one CUDA device,
        else None (parameters over several devices ship float32 and are encoded on the host)."""
        if not self._cuda or len(self._device_groups) != 1:
            return None
        from capture.encode import DeviceEncoder

        return DeviceEncoder(self.tensors, self.tiers, next(iter(self._device_groups)))

    def _fill_cuda(self, slot: _Slot, grads, weights, inv_scale, with_weights: bool) -> None:
        """Flatten on each device (training stream), then encode (one device: scalars, rounding,
        sketch and sign bits in ``capture.encode``) and copy to the slot's pinned buffers on
        that device's side stream, which first waits for the flatten: record() never blocks on
        the device, and the training stream's next kernels never queue behind the copy.

        The staging vectors belong to the slot; a slot is reused only after the writer has
        synchronized its events, so a staging vector is never overwritten mid-copy.
        """
        enc = self._encoder
        if enc is not None:
            self._fill_encoded(slot, enc, grads, weights, inv_scale, with_weights)
            return
        for dev, members in self._device_groups.items():
            idx, lo, hi = members
            sg, sw = slot.stage[dev]
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            train = torch.cuda.current_stream(dev)
            with torch.cuda.device(dev):
                if contiguous:
                    torch.cat([grads[i].reshape(-1).float() for i in idx], out=sg)
                    if with_weights:
                        torch.cat([weights[i].reshape(-1).float() for i in idx], out=sw)
                else:  # parameters of this device interleaved with others': per tensor
                    for i in idx:
                        a, b = self.tensors[i].offset - lo, self.tensors[i].offset - lo + self.tensors[i].size
                        sg[a:b].copy_(grads[i].reshape(-1))
                        if with_weights:
                            sw[a:b].copy_(weights[i].reshape(-1))
                if inv_scale is not None:
                    sg.mul_(inv_scale.to(dev))
                ready = torch.cuda.Event()
                ready.record(train)
                side = self._side_stream(dev)
                side.wait_event(ready)
                with torch.cuda.stream(side):
                    if contiguous:
                        slot.grad[lo:hi].copy_(sg, non_blocking=True)
                        if with_weights:
                            slot.weight[lo:hi].copy_(sw, non_blocking=True)
                    else:
                        for i in idx:
                            t = self.tensors[i]
                            a, b = t.offset - lo, t.offset - lo + t.size
                            slot.grad[t.offset:t.offset + t.size].copy_(sg[a:b], non_blocking=True)
                            if with_weights:
                                slot.weight[t.offset:t.offset + t.size].copy_(sw[a:b], non_blocking=True)

    def _fill_encoded(self, slot: _Slot, enc, grads, weights, inv_scale, with_weights: bool) -> None:
        dev = enc.device
        sg, sw = slot.stage[dev]
        with torch.cuda.device(dev):
            torch.cat([g.reshape(-1).float() for g in grads], out=sg)
            if inv_scale is not None:
                sg.mul_(inv_scale.to(dev))
            # the weights are flattened even when the weight schedule skips them: the per-tensor
            # scalars need them (a device copy); only what is stored crosses to the host
            torch.cat([w.reshape(-1).float() for w in weights], out=sw)
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(dev))
            side = self._side_stream(dev)
            side.wait_event(ready)
            with torch.cuda.stream(side):
                out = enc.encode(sg, sw)
                if self.lag_band:
                    out["lag_dots"] = lag_dots(sg, self._dev_ring, self.lag_band)
                    self._push_dev_ring(sg)
                for k, t in out.items():
                    if k.startswith("weight") and not with_weights:
                        continue
                    slot.host[k].copy_(t, non_blocking=True)

    def _push_dev_ring(self, g) -> None:
        """Append a gradient (a copy, on the current stream) or None to the device ring."""
        ring = self._dev_ring
        buf = ring.pop(0) if len(ring) >= self.lag_band else None
        if g is not None:
            buf = torch.empty_like(g) if buf is None else buf
            buf.copy_(g)
        else:
            buf = None
        ring.append(buf)

    @property
    def _devices(self) -> list:
        return list(self._device_groups)

    @functools.cached_property
    def _device_groups(self) -> dict:
        """device -> (tensor indices, first offset, end offset) of the CUDA parameters."""
        groups: dict = {}
        for i, (_, p) in enumerate(self._params):
            if p.device.type != "cuda":
                raise ValueError(
                    f"Recorder: parameter {self._params[i][0]!r} is on {p.device} while others are on CUDA; "
                    "move the whole model to CUDA devices (parameters on several GPUs are fine)"
                )
            groups.setdefault(p.device, []).append(i)
        return self._spans(groups)

    def _spans(self, groups: dict) -> dict:
        """device -> tensor indices, to device -> (indices, first offset, end offset)."""
        out = {}
        for dev, idx in groups.items():
            lo = self.tensors[idx[0]].offset
            hi = max(self.tensors[i].offset + self.tensors[i].size for i in idx)
            out[dev] = (idx, lo, hi)
        return out

    # ------------------------------------------------------------------ references (CPU)

    def _probe_references(self) -> None:
        """Learn whether gradients may be held by reference: the last copied step's .grad
        tensors must have been dropped by the loop (none is a parameter's .grad any more) and
        left unchanged (version counters) by the time the next record() comes."""
        tensors, versions = self._ref_probe
        current = [p.grad for _, p in self._params]
        if any(c is t for c, t in zip(current, tensors)):
            return  # not dropped yet (a record() of a skipped step before zero_grad): ask again
        self._ref_probe = None
        if all(t._version == v for t, v in zip(tensors, versions)):
            self._ref_clean += 1
            if self._ref_clean >= 2:
                self._by_ref = True
        else:
            self._by_ref_allowed = False  # the loop changes gradients after record(): copy

    def _inv_scale(self) -> torch.Tensor | None:
        """1 / loss scale (float32 tensor, as ``GradScaler.unscale_`` uses), or None."""
        sc = self.scaler
        if sc is None or getattr(sc, "_scale", None) is None:
            return None
        states = getattr(sc, "_per_optimizer_states", {})
        state = states.get(id(self.optimizer)) if id(self.optimizer) in states else None
        if state is not None and getattr(state.get("stage"), "name", None) == "UNSCALED":
            return None  # the user already called scaler.unscale_(optimizer) this step
        return sc._scale.double().reciprocal().float()

    # ------------------------------------------------------------------ writer thread

    def _writer_loop(self) -> None:
        writer = self.writer
        self._last_commit = time.perf_counter()
        cpu0 = time.thread_time()
        # a row of referenced gradients, written but not yet checked (_Held): it keeps its buffer
        # and no commit covers it until the training thread has dropped its gradients
        held: _Held | None = None
        while True:
            if held is not None and self._released(held.slot):
                held = self._settle(held)
            pending = self._error is None and writer.n_steps < writer.n_written
            gap = min(COMMIT_GAP, self.commit_interval)
            try:
                # caught up with rows not yet committed: commit when the gap has passed since the
                # last commit, or at once when flush asks (a _Commit job), whichever comes first;
                # while a held row waits for its check, look again after a gap
                if held is not None:
                    wait = max(gap, 0.01)  # a commit_interval of 0 must not spin
                elif pending:
                    wait = max(0.0, self._last_commit + gap - time.perf_counter())
                else:
                    wait = None
                job = self._jobs.get(timeout=wait)
            except queue.Empty:
                if held is not None:
                    # its check first (above); the rows before it are committed meanwhile, so
                    # that a pause of the loop leaves only the held row uncommitted
                    if self._error is None and writer.n_steps < writer.n_written - 1 \
                            and time.perf_counter() - self._last_commit >= gap:
                        try:
                            writer.commit(exclude_last=True)
                        except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                            self._writer_failed(err, f"commit the steps up to step {writer.last_step}")
                        self._last_commit = time.perf_counter()
                    continue
                job = _Commit()
            if held is not None:
                # a job (or close) comes after a record() call: the ids of the gradients it saw are
                # published, so the check does not wait unless the loop kept the same tensors
                held = self._settle(held)
            if job is None:
                return
            if isinstance(job, _Commit):
                t0 = time.perf_counter()
                try:
                    if self._error is None:
                        writer.commit()
                except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                    self._writer_failed(err, f"commit the steps up to step {writer.last_step}")
                finally:
                    job.done.set()
                self._last_commit = time.perf_counter()
                self._writer_s += self._last_commit - t0
                self._writer_cpu_s = time.thread_time() - cpu0
                continue
            step, slot, epoch, flags, skipped, lr_differ = job
            try:
                if self._error is not None:
                    continue  # drain after a failure; the slots go back below
                if lr_differ is not None and _host_value(lr_differ):
                    flags |= FLAG_LR_GROUPS_DIFFER
                t0 = time.perf_counter()
                # behind: commit every commit_interval; caught up: once the gap has passed (rows
                # before this one; the wait above commits a row that is left when no job comes)
                self._maybe_commit(gap)
                if slot is None:  # skipped by on_full="skip": step, loss, lr and flags only
                    writer.append(step, None, None, loss=_host_value(skipped[0]), lr=_host_value(skipped[1]),
                                  epoch=epoch, flags=flags, commit=False)
                else:
                    for ev in slot.events:
                        ev.synchronize()
                    grad = slot.grad_np
                    if slot.refs is not None and writer.reads_split():
                        # read in place by the writer's kernels: no copy of the whole row
                        grad = SplitRow([r.detach().reshape(-1).numpy() for r in slot.refs], self.tensors)
                    elif slot.refs is not None:
                        torch.cat([r.reshape(-1) for r in slot.refs], out=slot.grad)
                    loss, lr = float(slot.scalars_np[0]), float(slot.scalars_np[1])
                    weight = None if flags & FLAG_NO_WEIGHT else slot.weight_np
                    if slot.host_np is not None:  # encoded on the device
                        from capture.encode import writer_rows

                        host = {k: v for k, v in slot.host_np.items()
                                if not (k.startswith("weight") and flags & FLAG_NO_WEIGHT)}
                        scalars, encoded = writer_rows(host, self.tiers)
                        stored = writer.append(step, None, None, loss=loss, lr=lr, epoch=epoch, flags=flags,
                                               commit=False, scalars=scalars, encoded=encoded,
                                               lag_dots=host.get("lag_dots"))
                    else:
                        stored = writer.append(step, grad, weight, loss=loss, lr=lr, epoch=epoch,
                                               flags=flags, commit=False)
                    if slot.refs is not None:
                        # checked (and the buffer returned) once the training thread has dropped
                        # these gradients: at the next job, or a gap later (_settle)
                        held, slot = _Held(step, slot, weight, loss, lr, epoch, flags, stored), None
                    elif stored & fmt.FLAG_NONFINITE_GRAD:
                        self._nonfinite_steps.append(step)
                if held is None:
                    self._maybe_commit(gap)
                self._writer_s += time.perf_counter() - t0
                self._writer_cpu_s = time.thread_time() - cpu0
            except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
                if not isinstance(err, _CommitFailed):
                    self._writer_failed(err, f"write step {step}")
            finally:
                if slot is not None:
                    slot.refs = None
                    self._free.put(slot)

    def _maybe_commit(self, gap: float) -> None:
        """Commit the rows written so far when ``gap`` has passed since the last commit (the
        writer is caught up) or ``commit_interval`` (it is behind)."""
        writer = self.writer
        if writer.n_steps == writer.n_written:
            return
        if time.perf_counter() - self._last_commit < (gap if self._jobs.empty() else self.commit_interval):
            return
        try:
            writer.commit()
        except BaseException as err:  # the rows were written, their commit failed
            self._writer_failed(err, f"commit the steps up to step {writer.last_step}")
            raise _CommitFailed() from err
        self._last_commit = time.perf_counter()

    def _released(self, slot: _Slot) -> bool:
        """Whether the row read by reference from ``slot`` can be checked now: the training
        thread waits in flush/close, or a later record() call has come (its gradients are
        other tensors, or the loop kept these, which ``_references_unchanged`` then refuses)."""
        return self._quiet.is_set() or self._n_calls > slot.call_no

    def _kept(self, slot: _Slot) -> bool:
        """Whether the last record() call saw any of ``slot``'s gradient tensors as a .grad."""
        # never read p.grad here: backward assigns it without the GIL (a segfault when read
        # from this thread); the training thread publishes the ids of the current .grad
        # tensors at every record() call (ids of live objects are unique: we hold refs)
        return any(a == id(r) for a, r in zip(self._grad_ids, slot.refs))

    def _settle(self, held: "_Held") -> None:
        """Check a held row once its gradients are released (waiting for that if need be):
        a gradient changed in place while (or before) the writer read it may have been read
        wrong, so the row is written again without it (``FLAG_SKIPPED``) and the recorder
        copies gradients from then on. The buffer goes back to the pool."""
        slot = held.slot
        try:
            if self._error is None:
                stored = held.stored
                if not self._references_unchanged(slot):
                    self.writer.rewind()
                    stored = self.writer.append(held.step, None, held.weight, loss=held.loss, lr=held.lr,
                                                epoch=held.epoch, flags=held.flags | FLAG_SKIPPED, commit=False)
                    self._n_grad_changed += 1
                    self._by_ref = self._by_ref_allowed = False
                if stored & fmt.FLAG_NONFINITE_GRAD:
                    self._nonfinite_steps.append(held.step)
        except BaseException as err:  # noqa: BLE001 - re-raised in the training thread
            self._writer_failed(err, f"write step {held.step}")
        finally:
            slot.refs = None
            self._free.put(slot)
        return None

    def _writer_failed(self, err: BaseException, what: str) -> None:
        """Keep the writer's error for the training thread and stop the store where it is
        (``abort`` commits the rows written whole before the failure)."""
        self._error = (err, what)
        try:
            self.writer.abort()
        except BaseException:  # noqa: BLE001 - the store stays consistent either way
            pass

    def _warn_changed(self) -> None:
        self._warned_changed = True
        warnings.warn(
            f"gradtrace: a gradient was changed in place after record() (clipping, unscaling, "
            f"accumulating into .grad) while the writer held it by reference; that step is stored "
            f"without its gradient (FLAG_SKIPPED) and the recorder copies gradients from now on. Call "
            f"record() after any in-place change, or pass grads_by_reference=False.",
            RuntimeWarning,
            stacklevel=3,
        )

    def _references_unchanged(self, slot: _Slot) -> bool:
        """After the writer read the referenced gradients: wait until the training thread can
        no longer change them (each has been dropped from its parameter, or the training
        thread waits in flush/close), then compare their version counters."""
        while not self._released(slot):
            self._stepped.wait(0.05)
            self._stepped.clear()
        if not self._quiet.is_set() and self._kept(slot):
            # a later record() saw some of these very tensors: the loop keeps its gradients
            # (zero_grad(set_to_none=False) after reference mode began), so they may change at
            # any moment and what was read cannot be vouched for
            return False
        return all(r._version == v for r, v in zip(slot.refs, slot.versions))

    def _raise_writer_error(self):
        err, what = self._error
        n = self.writer.n_steps if self.writer is not None else 0
        # the writer's last step is that of its last row written, committed or not
        last = self.writer.last_step if self.writer is not None and self.writer.n_written == n else None
        hint = ""
        if isinstance(err, OSError) and self.writer is not None and self.writer.sink is not None:
            hint = (" Check the endpoint, credentials and bucket; a URL cannot be resumed: restart from a checkpoint "
                    "into a new URL or a local path.")
        elif isinstance(err, OSError):
            hint = " Free disk space or fix the path's permissions, then restart from a checkpoint with resume=True."
        raise RecorderWriteError(
            f"gradtrace could not {what} to {self.path}: {type(err).__name__}: {err}. "
            f"The store is consistent and holds the {n} steps committed before it"
            + (f" (last step {last})" if last is not None else "")
            + f"; recording has stopped.{hint}"
        ) from err

    # ------------------------------------------------------------------ closing

    def flush(self) -> None:
        """Wait until every queued step is committed (raises a pending writer error)."""
        if not self.active or self._closed:
            return
        self._quiet.set()  # the training thread changes no gradient while it waits here
        self._release_prefetched()
        try:
            if self._error is None:
                # commit now, not COMMIT_GAP after the last commit: the job runs after every job
                # queued before it, and the writer checks a row it holds first (_quiet is set)
                job = _Commit()
                self._jobs.put(job)
                while not job.done.wait(0.05):
                    if self._error is not None or not self._thread.is_alive():
                        break
        finally:
            self._quiet.clear()
        if self._error is not None:
            self._raise_writer_error()
        if self._n_grad_changed and not self._warned_changed:
            self._warn_changed()

    def close(self, record_final: bool = True) -> None:
        """Drain the queue, record the final iterate, trim and consolidate the store.

        Args:
            record_final: store the current weights as the final iterate, at one step past the
                last step seen by :meth:`record` (or past the store's last step).

        Raises:
            RecorderWriteError: a step failed to write; the store keeps the committed steps
                (not trimmed, resumable).
        """
        if self._closed or not self.active:
            self._closed = True
            return
        self._closed = True
        self._quiet.set()  # training is over: referenced gradients can no longer change
        if self._pf_hook is not None:
            self._pf_hook.remove()
            self._pf_go.set()
            self._pf_thread.join()
            self._release_prefetched()
        self._jobs.put(None)
        self._thread.join()
        if self._nonfinite_steps and not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"gradtrace: {len(self._nonfinite_steps)} recorded gradient(s) hold NaN or Inf (first at "
                f"step {self._nonfinite_steps[0]}); they are stored as they were and flagged.",
                RuntimeWarning,
                stacklevel=2,
            )
        if self._error is not None:
            self.writer.abort()
            self._raise_writer_error()
        final = None
        final_step = None
        if record_final:
            last = self._last_seen if self._last_seen is not None else self.writer.last_step
            if last is not None:
                final_step = int(last) + 1
                with torch.no_grad():
                    final = torch.cat(
                        [p.detach().reshape(-1).to("cpu", torch.float32) for _, p in self._params]
                    ).numpy()
        epoch = -1
        if final_step is not None and self._steps_per_epoch:
            epoch = final_step // self._steps_per_epoch
        try:
            self.writer.update_settings(recorder_summary=self._summary_core())
            self.writer.close(final, final_step, epoch=epoch)
        except BaseException as err:
            self._error = (err, "close the store" + (f" (final step {final_step})" if final_step is not None else ""))
            self._raise_writer_error()

    # ------------------------------------------------------------------ reporting

    def _summary_core(self) -> dict:
        return {
            "n_recorded": int(self._n_queued),
            "n_nonfinite_steps": len(self._nonfinite_steps),
            "nonfinite_steps": self._nonfinite_steps[:100],
            "n_missing_grad_steps": int(self._n_missing),
            "n_skipped_steps": int(self._n_skipped),
            "n_grad_changed_steps": int(self._n_grad_changed),
            "grads_by_reference": bool(self._by_ref),
            "n_weights_read_ahead": int(self._n_prefetched),
            "record_seconds": round(self._record_s, 6),
            "wait_seconds": round(self._wait_s, 6),
            "writer_seconds": round(self._writer_s, 6),
            "writer_cpu_seconds": round(self._writer_cpu_s, 6),
            "readahead_cpu_seconds": round(self._readahead_cpu_s, 6),
        }

    def summary(self) -> dict:
        """Run summary: steps recorded and committed, flagged steps, time spent.

        Returns:
            dict with ``path``, ``rank``, ``active`` (False off rank 0), ``n_recorded`` (queued
            by this recorder), ``n_committed`` (rows in the store, final iterate included),
            ``last_step``, ``n_nonfinite_steps`` and ``nonfinite_steps`` (first 100),
            ``n_missing_grad_steps``, ``n_skipped_steps`` (``on_full="skip"``),
            ``n_grad_changed_steps`` (gradients changed in place after ``record()``),
            ``grads_by_reference``, ``record_seconds`` (training-thread time in ``record``),
            ``wait_seconds`` (of it, blocked on a busy writer), ``writer_seconds`` (wall) and
            ``writer_cpu_seconds`` (CPU time of the writer thread), ``readahead_cpu_seconds``
            (CPU time of the helper thread that copies the weights ahead, on CPU), ``closed``
            and ``error`` (None or the message).
        """
        out = {"path": str(self.path), "rank": self.rank, "active": self.active}
        out.update(self._summary_core())
        out["n_committed"] = self.writer.n_steps if self.writer is not None else 0
        out["last_step"] = self.writer.last_step if self.writer is not None else None
        out["closed"] = self._closed
        out["error"] = None if self._error is None else f"{type(self._error[0]).__name__}: {self._error[0]}"
        return out

    def __repr__(self) -> str:
        return f"Recorder({str(self.path)!r}, d={self.d}, schedule={self.schedule.describe()!r})"


# --------------------------------------------------------------------------------------
# restore
# --------------------------------------------------------------------------------------


def restore_weights(model: torch.nn.Module, path: "str | os.PathLike", step: int) -> dict:
    """Copy the weights recorded at ``step`` into ``model``'s trainable parameters.

    Only parameters are restored: buffers (BatchNorm running statistics) are not part of the
    store and keep their values. For the final iterate pass its step (one past the last
    gradient step).

    Args:
        model: a model with the same parameter table (names and shapes) as the store.
        path: the run store.
        step: a recorded global step.

    Returns:
        ``{"store": str(path), "step": step}``, fit for ``Recorder(..., parent=...)`` of a
        branched run.

    Raises:
        gradtrace_format.format.StoreMismatchError: the parameter tables differ, or the weight tier is
            ``sketch`` (the weights cannot be rebuilt).
        KeyError: ``step`` is not recorded (the message lists the nearest recorded steps).
    """
    import zarr

    header = fmt.read_header(path)
    table = model_table(model)
    if [t.to_json() for t in table] != [t.to_json() for t in header.tensors]:
        old = {(t.name, t.shape) for t in header.tensors}
        new = {(t.name, t.shape) for t in table}
        raise StoreMismatchError(
            f"cannot restore from {path}: the model's parameter table differs from the store's "
            f"(only in the store: {sorted(old - new)[:4]}; only in the model: {sorted(new - old)[:4]}). "
            "Build the same model (and unfreeze the same parameters) first."
        )
    tier = header.tiers["weight"]
    if tier.is_sketch:
        raise StoreMismatchError(
            f"cannot restore from {path}: its weights are stored as a sketch (random projection + "
            "signs), from which the weights cannot be rebuilt. Record weights with the lossless or "
            "rounded tier to branch off a run."
        )
    from gradtrace_format import integrity

    group = zarr.open_group(str(path), mode="r", use_consolidated=False)
    n = header.n_steps
    try:  # checked reads: a damaged chunk is an error naming it, never weights
        steps = integrity.read_scalar(group["step"], n)
    except fmt.DamagedStoreError as err:
        raise err.with_steps(str(path)) from None
    idx = np.flatnonzero(steps == int(step))
    if idx.size == 0:
        pos = int(np.searchsorted(steps, int(step)))
        near = sorted(set(steps[max(0, pos - 2) : pos + 2].tolist()))
        raise KeyError(
            f"step {step} is not recorded in {path} ({n} rows, steps {steps[0] if n else '-'}.."
            f"{steps[-1] if n else '-'}); nearest recorded steps: {near}"
        )
    wrow = integrity.CheckedRows(group["weight"], str(path), steps)
    row = np.asarray(wrow[int(idx[0]), :], dtype=np.float32)
    if fmt.layout_of(header) is not None:  # a sharded store: its columns in natural order
        row = fmt.layout_of(header).natural(row, len(header.tensors))
    if not np.isfinite(row).all():
        warnings.warn(f"gradtrace: the weights recorded at step {step} hold NaN or Inf", RuntimeWarning, stacklevel=2)
    if tier.rounds:
        warnings.warn(
            f"gradtrace: {path} stores weights rounded to {tier.keepbits} mantissa bits (relative "
            f"error <= {tier.max_rel_error:.1e} per entry); the restored model is that close to w_{step}, "
            "not equal to it.",
            UserWarning,
            stacklevel=2,
        )
    flat = torch.from_numpy(row)
    with torch.no_grad():
        for (_, p), info in zip(_trainable(model), table):
            p.copy_(flat[info.offset : info.offset + info.size].view(info.shape))
    return {"store": str(path), "step": int(step)}
