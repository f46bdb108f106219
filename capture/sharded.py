"""Sharded capture: every rank of an FSDP2 / DTensor model writes its own columns.

``Recorder(model, path, ...)`` on a model whose parameters are DTensors (``fully_shard``), or
with ``sharded=True``, builds a :class:`ShardedRecorder` on every rank. Nothing is gathered:

* Layout (``gradtrace_format.format``, "Sharded stores"): rank r owns columns ``[r R, (r+1) R)`` of
  ``grad`` / ``weight`` (and bytes ``[r R / 8, (r+1) R / 8)`` of the sign bit planes), holding
  its local shards in table order, zeros after them. ``R`` is a whole number of chunks, so no
  chunk file is written by two ranks. The parameter table stays the natural one; the shard
  table (header ``sharded`` and the ``shard_*`` arrays) maps every shard to its columns.
* Per step, each rank flattens its local shards (``DTensor.to_local()``: the gradient after
  FSDP's reduce-scatter, the sharded weights), writes its chunks, and computes its partial
  per-tensor sums ``||G||^2``, ``||w||^2``, ``<G, w>`` (float64), and for a sketch tier its
  partial CountSketch (entries hashed by their natural coordinate). One float64 all-reduce
  (sum) per step, on a dedicated gloo group, combines them with the ranks' losses (the stored
  loss is their mean); rank 0 writes the per-step arrays and the sketch and advances the
  commit marker.
* Commit across ranks: each rank enters the all-reduce after its chunk writes return, so when
  it completes on rank 0 every rank's data of the row is on disk (in the kernel: with
  ``durable=True``, fsynced; at a URL: every chunk object's PUT has returned). That is the
  collective variant of the commit protocol; the alternative, one marker per rank with
  readers taking the minimum, costs every rank an atomic rename per step (measured here:
  README, "Sharded models") and every reader W files, while the all-reduce is needed for the
  scalars anyway, so the collective costs nothing extra. A kill of any rank stops the others
  in the all-reduce (gloo reports the lost peer) before rank 0 commits the row, so every
  committed row is whole; resume rewrites the torn one.
* Resume needs the same world size and shard layout (one-line ``StoreMismatchError`` else).
* To object storage (``path`` an fsspec URL such as ``s3://bucket/run.zarr``, with
  ``storage_options``): every rank opens its own :class:`capture.sink.RemoteSink` and puts its
  row's chunk objects (one object per chunk, only the chunks of its own columns) in one
  concurrent batch, which has returned before the rank enters the all-reduce; rank 0 then puts
  the changed per-step blocks and the sketch row, and the root ``zarr.json`` (the marker) last.
  A kill of any rank leaves every committed step whole, as on a local path. As for the
  unsharded remote writer, a URL store is created new (``resume`` / ``overwrite`` refused in
  one line on every rank) and its creation puts the root ``zarr.json`` last, after the shard
  table.

``record()`` is collective: call it on every rank with the same step. The training thread only
flattens the local shards (one copy of grad and weight); a writer thread per rank writes the
chunks and runs the all-reduce, in step order, on the recorder's own gloo group (so it never
interleaves with the training's collectives); at most ``queue_size`` steps wait for it
(backpressure). An error there (a full disk, a dead peer) is raised by the next ``record`` /
``flush`` / ``close`` on every rank as ``RecorderWriteError``. The per-rank cost is measured in
docs/scale.md.

``weight_schedule`` and ``lag_band`` work as unsharded (the lag dots are partial float64 sums
over each rank's entries, all-reduced with the scalars). Not supported sharded (a one-line
error): ``scaler``, ``on_full="skip"``, ``parent``; parameters sharded on another dim than 0 or
over a 2-D mesh (HSDP).
"""

from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np
import torch
import torch.distributed as dist
import zarr

from gradtrace_format import format as fmt
from gradtrace_format.format import (FLAG_FINAL, FLAG_MISSING_GRAD, FLAG_NO_WEIGHT, FLAG_NONFINITE_GRAD, FLAG_NONFINITE_WEIGHT,
                             StoreMismatchError)
from capture import sink as _sink
from capture.schedules import every_step, parse_schedule, schedule_to_json
from capture.writer import StoreWriter, _ArrayWriter, check_page_cache, tensor_scalars

__all__ = ["ShardedRecorder", "has_dtensors", "local_shards"]


def has_dtensors(model: torch.nn.Module) -> bool:
    """True when a trainable parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(p, DTensor) for _, p in model.named_parameters() if p.requires_grad)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_shards(params, rank: int) -> list[tuple[int, int, int]]:
    """``[(tensor index, start row, stop row), ...]`` of dim 0 this rank holds (table order).

    DTensors must be sharded on dim 0 of a 1-D mesh (FSDP2); a plain parameter of a sharded
    model (replicated) is stored once, by rank 0.
    """
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    out = []
    for i, (name, p) in enumerate(params):
        if isinstance(p, DTensor):
            pl = tuple(p.placements)
            if len(pl) != 1 or not (isinstance(pl[0], Shard) and pl[0].dim == 0) or p.ndim == 0:
                raise ValueError(
                    f"Recorder(sharded): parameter {name!r} has placements {pl} on a {p.device_mesh.ndim}-D mesh; "
                    "sharded recording supports parameters split on dim 0 over one mesh dimension (FSDP2 "
                    "fully_shard); record HSDP or tensor-parallel models per replica or unsharded"
                )
            shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, pl)
            out.append((i, int(offset[0]), int(offset[0]) + int(shape[0])))
        elif rank == 0:
            out.append((i, 0, int(p.shape[0]) if p.ndim else 1))
    return out


class _ShardedStoreWriter(StoreWriter):
    """Rank 0's :class:`StoreWriter` of a sharded store: the header carries the layout, the
    shard table is stored as arrays, resume checks the layout, and rows are appended as
    per-step values only (every rank writes its own data chunks)."""

    _split_ok = False

    def __init__(self, path, tensors, tiers, layout: fmt.ShardedLayout, **kw):
        self.layout = layout
        # one file per chunk: a multi-row shard file would be appended to by several ranks
        super().__init__(path, tensors, tiers, shard_files=False, **kw)

    def _write_header(self):
        if getattr(self, "_creating", False):
            return  # _create_in writes it once the shard table exists (the root marker last on a URL)
        self.header.extra["sharded"] = self.layout.to_json()
        super()._write_header()

    def _create_in(self, *args):
        self._creating = True
        try:
            super()._create_in(*args)
        finally:
            self._creating = False
        crc = fmt.codecs_for("scalar")
        sh = self.layout.shards
        cols = {
            "shard_tensor": [s.tensor for s in sh], "shard_rank": [s.rank for s in sh],
            "shard_start": [s.start for s in sh], "shard_stop": [s.stop for s in sh],
            "shard_column": [s.column for s in sh], "shard_size": [s.size for s in sh],
        }
        for key in fmt.SHARD_ARRAYS:
            a = self.group.create_array(key, shape=(len(sh),), dtype="int64", dimension_names=[fmt.SHARD_DIM],
                                        compressors=crc)
            a[:] = np.asarray(cols[key], dtype=np.int64)
        self._write_header()

    def _open_existing(self, resume_step, schedule, settings, source_dtype):
        g = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        old = fmt.layout_of(fmt.header_of_group(g, self.path))
        W = self.layout.world_size
        if old is None:
            raise StoreMismatchError(
                f"cannot resume {self.path}: it was recorded unsharded and this run is sharded over {W} ranks; "
                "resume it with the unsharded model, or record to a new path")
        if old.world_size != W:
            raise StoreMismatchError(
                f"cannot resume {self.path}: it was recorded by {old.world_size} ranks and this run has {W}; "
                f"resume with {old.world_size} ranks (resharding a store is not supported), or record to a new path")
        if old != self.layout:
            raise StoreMismatchError(
                f"cannot resume {self.path}: its shard layout (rows per rank, chunk width {old.chunk}) differs from "
                f"this run's (chunk width {self.layout.chunk}); resume with the same model, sharding and param_chunk")
        super()._open_existing(resume_step, schedule, settings, source_dtype)

    def append_values(self, values: dict, commit: bool = True) -> None:
        """Write one row's per-step values (the ranks wrote its data chunks) and commit it."""
        n = self._n
        self._ensure_capacity(n)
        for name in self._scalar_names:
            self._w[name].set(n, values[name])
        self._n = n + 1
        if values["flags"] & FLAG_NONFINITE_GRAD:
            self.n_nonfinite += 1
        self._has_final = bool(values["flags"] & FLAG_FINAL)
        self._last_step = int(values["step"])
        if commit:
            self.commit()


class _Sketch:
    """This rank's partial CountSketch of its local entries, hashed by natural coordinate:
    the sum over ranks is the sketch ``format.Sketcher`` makes of the natural vector."""

    def __init__(self, tensors, plan: fmt.SketchPlan, shards, inner):
        self.plan = plan
        self.parts = []  # (local lo, local hi, sketch offset, k, None | (bucket, sign))
        at = 0
        for i, a, b in shards:
            n = (b - a) * inner[i]
            o, k = plan.offsets[i], plan.sizes[i]
            if plan.exact[i]:
                self.parts.append((at, at + n, o + a * inner[i], n, None))
            else:
                bucket, sign = fmt.sketch_hashes(plan, i, tensors[i].size)
                sl = slice(a * inner[i], b * inner[i])
                self.parts.append((at, at + n, o, k, (bucket[sl].copy(), sign[sl].copy())))
            at += n

    def __call__(self, x: np.ndarray) -> np.ndarray:
        out = np.zeros(self.plan.dim, dtype=np.float64)
        for lo, hi, o, k, h in self.parts:
            seg = x[lo:hi].astype(np.float64)
            if h is None:
                out[o:o + k] = seg
            else:
                out[o:o + k] += np.bincount(h[0], weights=seg * h[1], minlength=k)
        return out


class ShardedRecorder:
    """The :class:`capture.Recorder` of one rank of a sharded model (see the module docstring).

    Built by ``Recorder(model, path, ...)`` when the model's parameters are DTensors or with
    ``sharded=True``; the arguments are the Recorder's. Extra:

    Args:
        process_group: the ranks that share the store (default: every rank); the recorder
            builds its own gloo group over them for its one all-reduce per step.
        storage_options: fsspec options for a URL ``path`` (``endpoint_url``, ``key``,
            ``secret``...), the same on every rank.

    ``writer_threads``, ``commit_interval``, ``grads_by_reference`` and ``page_cache`` ("auto",
    "keep") are accepted and have no effect here: one writer thread per rank, every row
    committed as soon as all ranks wrote it, gradients always copied (flattened) on the
    training thread, chunk files left to the page cache.
    """

    def __init__(self, model, path, optimizer=None, *, schedule=every_step, tiers="lossless", resume=False,
                 resume_step=None, overwrite=False, settings=None, expected_steps=None,
                 param_chunk=fmt.DEFAULT_PARAM_CHUNK, durable=False, grad_recorded=None, process_group=None,
                 scaler=None, weight_schedule=None, on_full="block", lag_band=0, parent=None,
                 queue_size=2, writer_threads=1, commit_interval=1.0, grads_by_reference="auto",
                 storage_options=None, page_cache="auto"):
        from capture.recorder import _run_settings, _trainable, _unwrap, parse_tiers

        unsupported = {"scaler": scaler is not None and scaler.is_enabled(), "on_full='skip'": on_full != "block",
                       "parent": parent is not None, "page_cache='drop'": page_cache == "drop"}
        check_page_cache(page_cache, "Recorder: ")
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"Recorder(sharded): {', '.join(bad)} not supported for sharded models yet; "
                             "drop it, or record the model unsharded")
        if resume and overwrite:
            raise ValueError("Recorder: resume=True and overwrite=True contradict each other; pick one")
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError("Recorder(sharded): torch.distributed is not initialized; call "
                             "dist.init_process_group(...) on every rank before building the recorder")
        # a URL: every rank puts its own chunk objects through its own sink (capture/sink.py);
        # checked on every rank before any collective, so that all raise the same one line
        self._sink = _sink.open_sink(path, storage_options)
        if self._sink is not None and (resume or overwrite):
            raise ValueError(
                f"{'resume' if resume else 'overwrite'}=True is for local paths only: {self._sink.url} is a URL, "
                "where no lock can keep a second writer out; record to a new URL, or to a local path and upload "
                "it when closed")
        self.path = _sink.split_location(path)[0] if self._sink is None else self._sink.url
        self.model = _unwrap(model)
        self.optimizer = optimizer
        self.schedule = parse_schedule(schedule)
        self.weight_schedule = None if weight_schedule is None else parse_schedule(weight_schedule)
        if int(lag_band) < 0:
            raise ValueError(f"Recorder: lag_band={lag_band} must be >= 0 (gradient rows back)")
        self.lag_band = int(lag_band)
        self._ring: list = []  # this rank's last lag_band local gradients (None: a row without one)
        self.tiers = parse_tiers(tiers)
        self._params = _trainable(model)
        if not self._params:
            raise ValueError("Recorder: the model has no trainable parameters (none with requires_grad=True)")
        self.tensors = fmt.tensor_table([(n, tuple(p.shape)) for n, p in self._params])
        self.d = sum(t.size for t in self.tensors)
        ranks = None if process_group is None else dist.get_process_group_ranks(process_group)
        # its own gloo group: the per-step all-reduce is on CPU float64 whatever the training's
        # backend, and never interleaves with the training's collectives
        self.group = dist.new_group(ranks=ranks, backend="gloo")
        self.rank, self.world_size = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.active = True
        self._steps_per_epoch = getattr(self.schedule, "steps_per_epoch", None)
        self._shards = local_shards(self._params, self.rank)
        held: list = [None] * self.world_size
        dist.all_gather_object(held, self._shards, group=self.group)
        self.layout = fmt.sharded_layout(self.tensors, held, param_chunk)
        inner = [math.prod(t.shape[1:]) if len(t.shape) > 1 else 1 for t in self.tensors]
        self._inner = inner
        self._n_local = sum((b - a) * inner[i] for i, a, b in self._shards)
        # this rank's shards as a local parameter table (for the partial per-tensor sums)
        self._local_table = fmt.tensor_table([(str(i), ((b - a) * inner[i],)) for i, a, b in self._shards])
        self._closed = False
        self._n_recorded = 0
        self._write_s = 0.0
        self._reduce_s = 0.0
        self._last_seen = None
        self.writer = None
        err = None
        if self.rank == 0:
            try:
                user = dict(settings or {})
                if grad_recorded is not None:
                    user["grad_recorded"] = grad_recorded
                user["sharded"] = {"world_size": self.world_size, "commit": "all-reduce before rank 0's marker"}
                if self.weight_schedule is not None:
                    user["weight_schedule"] = {**schedule_to_json(self.weight_schedule),
                                               "description": self.weight_schedule.describe()}
                self.writer = _ShardedStoreWriter(
                    self.path, self.tensors, self.tiers, self.layout,
                    mode="resume" if resume else ("overwrite" if overwrite else "create"),
                    resume_step=resume_step, param_chunk=param_chunk, expected_steps=expected_steps,
                    schedule={**schedule_to_json(self.schedule), "description": self.schedule.describe()},
                    settings=_run_settings(model, self._params, optimizer, None, self.schedule, user, self.world_size),
                    source_dtype=",".join(sorted({str(p.dtype).replace("torch.", "") for _, p in self._params})),
                    durable=durable, lag_band=self.lag_band, storage_options=storage_options,
                )
                state = ("ok", self.writer.n_written, self.writer.last_step)
            except Exception as e:  # noqa: BLE001 - every rank raises it below
                err = e
                state = ("error", type(e).__name__, str(e))
        else:
            state = None
        box = [state]
        dist.broadcast_object_list(box, src=dist.get_global_rank(self.group, 0), group=self.group)
        state = box[0]
        if state[0] == "error":
            if err is not None:
                raise err
            cls = {"StoreMismatchError": StoreMismatchError, "FileExistsError": FileExistsError,
                   "StoreLockedError": fmt.StoreLockedError, "FileNotFoundError": FileNotFoundError,
                   "ValueError": ValueError, "OSError": OSError, "ImportError": ImportError}
            raise cls.get(state[1], RuntimeError)(f"(rank 0) {state[2]}")
        self._n, self._last_queued = int(state[1]), state[2]
        g = (zarr.open_group(str(self.path), mode="r+", use_consolidated=False) if self._sink is None
             else self._sink.open_group("r+"))
        specs = {s.name: s for s in fmt.store_array_specs(fmt.header_of_group(g, self.path))}
        # with a sink, _put_chunk stages each chunk object in this rank's sink (_write_row puts them)
        self._data = {name: _ArrayWriter(g[name], self.path, spec, self._sink) for name, spec in specs.items()
                      if spec.row_chunked and name not in map(fmt.sketch_array, fmt.DATA_ARRAYS)}
        for aw in self._data.values():
            aw.durable = bool(durable)
            if aw.mode != "rows":  # every rank writes its own chunk files, never a shared shard file
                raise StoreMismatchError(f"{self.path}: array '{aw.spec.name}' is not stored one file per "
                                         "chunk, which sharded recording needs; record to a new path")
        lo, hi = self.layout.rank_columns(self.rank)
        cw = self.layout.chunk
        self._chunks = range(lo // cw, hi // cw)
        self._pad = np.zeros(self.layout.rank_width, dtype=np.float32)
        self._sketch = {}
        for a, tier in self.tiers.items():
            if tier.is_sketch:
                plan = fmt.sketch_plan(self.tensors, tier.sketch_dim, tier.seed)
                self._sketch[a] = _Sketch(self.tensors, plan, self._shards, inner)
        if int(queue_size) < 1:
            raise ValueError(f"Recorder: queue_size={queue_size} must be >= 1")
        self._error: BaseException | None = None
        self._record_s = 0.0
        self._wait_s = 0.0  # of it, blocked on a full queue (the writer thread is behind)
        self._jobs: queue.Queue = queue.Queue(maxsize=int(queue_size))
        self._thread = threading.Thread(target=self._writer_loop, daemon=True,
                                        name=f"gradtrace-sharded:{_sink.store_name(self.path)}")
        self._thread.start()

    # ------------------------------------------------------------------ context manager

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self._abort()

    # ------------------------------------------------------------------ recording

    def _flat(self, tensors) -> np.ndarray:
        if not tensors:
            return np.zeros(0, dtype=np.float32)
        with torch.no_grad():
            return torch.cat([t.reshape(-1).to("cpu", torch.float32) for t in tensors]).numpy()

    def record(self, step, loss=None, epoch: int | None = None, lr=None) -> bool:
        """Record ``step`` if the schedule says so; collective: call it on every rank.

        Returns True when the step was recorded (on every rank alike)."""
        from capture.recorder import _check_step, _scalar

        if self._error is not None:
            self._raise_error()
        if self._closed:
            raise RuntimeError(f"Recorder for {self.path} is closed; create a new one (resume=True to append)")
        t0 = time.perf_counter()
        step = _check_step(step)
        self._last_seen = step
        if not self.schedule(step):
            return False
        if self._last_queued is not None and step <= self._last_queued:
            raise ValueError(f"record(step={step}): steps must increase, and step {self._last_queued} was already "
                             "recorded. After a restart use Recorder(..., resume=True, resume_step=<checkpoint step>).")
        params = [self._params[i][1] for i, _, _ in self._shards]
        grads = [p.grad for p in params]
        missing = sum(g is None for g in grads)
        g = self._flat([torch.zeros_like(_local(p.detach())) if gr is None else _local(gr)
                        for p, gr in zip(params, grads)])
        with_weights = self.weight_schedule is None or bool(self.weight_schedule(step))
        w = self._flat([_local(p.detach()) for p in params]) if with_weights else None
        lr_value = lr if lr is not None else (self.optimizer.param_groups[0]["lr"] if self.optimizer else None)
        if epoch is None:
            epoch = step // self._steps_per_epoch if self._steps_per_epoch else -1
        # the copies above are this step's; the writer thread writes them while training goes
        # on (it blocks here when queue_size steps already wait: bounded memory)
        job = (step, g, w, dict(loss=_scalar(loss), lr=_scalar(lr_value), epoch=int(epoch), missing=missing))
        t1 = time.perf_counter()
        self._jobs.put(job)
        self._wait_s += time.perf_counter() - t1
        self._last_queued = step
        self._n_recorded += 1
        self._record_s += time.perf_counter() - t0
        return True

    def _writer_loop(self) -> None:
        """Writes queued rows in order (the all-reduce of each runs here, on the recorder's own
        gloo group, never concurrently with another of its collectives)."""
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    step, g, w, kw = job
                    try:
                        self._write_row(step, g, w, **kw)
                    except BaseException as err:  # noqa: BLE001 - raised on the training thread
                        self._error = err
            finally:
                self._jobs.task_done()

    def _raise_error(self):
        from capture.recorder import RecorderWriteError

        err = self._error
        if isinstance(err, RecorderWriteError):
            raise err
        raise RecorderWriteError(
            f"gradtrace could not record to {self.path} on rank {self.rank}: {type(err).__name__}: {err}. The store "
            "holds every step committed before it (another rank may have died); recording has stopped.") from err

    def _lag_partials(self, g) -> np.ndarray:
        """This rank's share of ``<G_r, G_(r-k)>``, k = 1..L (float64 sums of float64 products;
        NaN where there is no gradient k rows back), then ``g`` joins the ring."""
        out = np.full(self.lag_band, np.nan)
        if g is not None:
            g64 = g.astype(np.float64)
            for k, prev in enumerate(reversed(self._ring), start=1):
                if prev is not None:
                    out[k - 1] = float(g64 @ prev)
        self._ring.append(None if g is None else g.astype(np.float64))
        if len(self._ring) > self.lag_band:
            self._ring.pop(0)
        return out

    def _write_row(self, step, g, w, *, loss, lr, epoch, missing=0, final=False) -> None:
        t0 = time.perf_counter()
        n = self._n
        n_t = len(self.tensors)
        parts = np.zeros((3, n_t))
        sketches = [np.zeros(s.plan.dim) for a, s in self._sketch.items() if (g if a == "grad" else w) is not None]
        lags = np.zeros(self.lag_band)
        failed = None
        try:
            for name, vec in (("grad", g), ("weight", w)):
                self._write_data(name, n, vec)
            if self._sink is not None:  # this rank's chunk objects of the row, all landed before the all-reduce
                self._sink.put_staged()
            if w is not None:
                gg_l, ww_l, gw_l = tensor_scalars(self._local_table, g, w)
            else:  # ||G||^2 alone: the weights' place taken by the gradient (as StoreWriter does)
                _, gg_l, _ = tensor_scalars(self._local_table, None, g)
                ww_l = gw_l = np.zeros_like(gg_l)
            if g is None:
                gg_l, gw_l = np.zeros_like(ww_l), np.zeros_like(ww_l)  # rank 0 stores NaN
            idx = [i for i, _, _ in self._shards]
            for row, vals in zip(parts, (gg_l, ww_l, gw_l)):
                np.add.at(row, idx, vals)
            sketches = [self._sketch[a](v) for a, v in (("grad", g), ("weight", w)) if a in self._sketch and v is not None]
            if self.lag_band:
                lags = self._lag_partials(g)
        except Exception as err:  # noqa: BLE001 - every rank learns of it through the all-reduce
            failed = err
        msg = np.concatenate([parts.ravel(), [loss, float(missing), float(failed is not None)], *sketches, lags])
        t1 = time.perf_counter()
        buf = torch.from_numpy(msg)
        dist.all_reduce(buf, group=self.group)  # after this rank's chunk writes: the commit barrier
        t2 = time.perf_counter()
        self._write_s += t1 - t0
        self._reduce_s += t2 - t1
        tot = buf.numpy()
        if tot[3 * n_t + 2] > 0:  # a rank failed to write its part: the row is not committed anywhere
            if self.writer is not None:
                self.writer.abort()
            from capture.recorder import RecorderWriteError

            what = f"{type(failed).__name__}: {failed}" if failed is not None else "another rank failed to write its columns"
            raise RecorderWriteError(
                f"gradtrace could not write step {step} to {self.path} (rank {self.rank}: {what}). The store holds "
                "every step committed before it; recording has stopped on every rank.") from failed
        if self.rank == 0:
            gg, ww, gw = tot[:n_t], tot[n_t:2 * n_t], tot[2 * n_t:3 * n_t]
            if g is None:
                gg, gw = np.full(n_t, np.nan), np.full(n_t, np.nan)
            if w is None:
                ww, gw = np.full(n_t, np.nan), np.full(n_t, np.nan)
            at = 3 * n_t + 3
            for a, v in (("grad", g), ("weight", w)):
                if a in self._sketch:
                    aw = self.writer._w[fmt.sketch_array(a)]
                    if v is None:
                        aw.clear_row(n)
                    else:
                        k = self._sketch[a].plan.dim
                        aw.write_row(n, tot[at:at + k].astype(np.float32))
                        at += k
            flags = FLAG_FINAL if final else (FLAG_MISSING_GRAD if tot[3 * n_t + 1] > 0 else 0)
            if g is not None and not math.isfinite(float(gg.sum())):
                flags |= FLAG_NONFINITE_GRAD
            if w is None:
                flags |= FLAG_NO_WEIGHT
            elif not math.isfinite(float(ww.sum())):
                flags |= FLAG_NONFINITE_WEIGHT
            values = {
                "step": int(step), "epoch": int(epoch), "loss": float(tot[3 * n_t]) / self.world_size,
                "lr": float(lr), "flags": int(flags), fmt.GRAD_SQNORM: float(gg.sum()),
                fmt.WEIGHT_SQNORM: float(ww.sum()), fmt.GRAD_DOT_WEIGHT: float(gw.sum()),
                fmt.per_tensor_array(fmt.GRAD_SQNORM): gg, fmt.per_tensor_array(fmt.WEIGHT_SQNORM): ww,
                fmt.per_tensor_array(fmt.GRAD_DOT_WEIGHT): gw,
            }
            if self.lag_band:
                values[fmt.LAG_DOT_ARRAY] = tot[len(tot) - self.lag_band:].copy()
            self.writer.append_values(values)
        self._n = n + 1

    def _write_data(self, name: str, n: int, vec) -> None:
        """This rank's chunks of row n of ``name`` (its tier's arrays); None: remove them."""
        tier = self.tiers[name]
        targets = [fmt.signbits_array(name), fmt.nonzero_array(name)] if tier.is_sketch else [name]
        if vec is None:
            if self._sink is not None:  # a new remote store: row n's objects were never put (no resume)
                return
            for t in targets:
                for j in self._chunks:
                    try:
                        self._data[t]._key((n, j)).unlink()
                    except FileNotFoundError:
                        pass
            return
        pad = self._pad
        pad[: vec.shape[0]] = vec
        pad[vec.shape[0]:] = 0.0
        j0 = self._chunks.start
        if tier.is_sketch:
            sb, nz = fmt.pack_signs(pad)
            cb = self.layout.chunk // 8
            for t, bits in zip(targets, (sb, nz)):
                for j in self._chunks:
                    self._data[t]._put_chunk((n, j), bits[(j - j0) * cb:(j - j0 + 1) * cb])
            return
        cw = self.layout.chunk
        keep = int(tier.keepbits) if tier.rounds else None
        aw = self._data[name]
        for j in self._chunks:
            aw._put_chunk((n, j), pad[(j - j0) * cw:(j - j0 + 1) * cw], keep)

    # ------------------------------------------------------------------ closing

    def flush(self) -> None:
        """Wait until every queued step is written and committed (raises a writer error)."""
        self._jobs.join()
        if self._error is not None:
            self._raise_error()

    def close(self, record_final: bool = True) -> None:
        """Record the final iterate (collective), then rank 0 trims and consolidates the store."""
        if self._closed:
            return
        self._closed = True
        last = self._last_seen if self._last_seen is not None else self._last_queued
        if record_final and last is not None and self._error is None:
            params = [self._params[i][1] for i, _, _ in self._shards]
            w = self._flat([_local(p.detach()) for p in params])
            epoch = (last + 1) // self._steps_per_epoch if self._steps_per_epoch else -1
            self._jobs.put((int(last) + 1, None, w, dict(loss=math.nan, lr=math.nan, epoch=epoch, final=True)))
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            if self.writer is not None:
                self.writer.abort()
            self._raise_error()
        if self.rank == 0:
            self.writer.update_settings(recorder_summary=self._summary_core())
            self.writer.close()
        dist.barrier(group=self.group)  # no rank returns before the store is closed

    def _abort(self) -> None:
        """After a training error: keep what is committed; wait for the writer thread a little
        (it may be blocked in an all-reduce with a rank that died: gloo then raises there)."""
        self._closed = True
        try:
            self._jobs.put(None, timeout=10)
        except queue.Full:
            pass
        self._thread.join(timeout=30)
        if self.writer is not None and not self._thread.is_alive():
            self.writer.abort()

    # ------------------------------------------------------------------ reporting

    def _summary_core(self) -> dict:
        return {"n_recorded": int(self._n_recorded), "world_size": int(self.world_size),
                "write_seconds_rank0": round(self._write_s, 6), "allreduce_seconds_rank0": round(self._reduce_s, 6)}

    def summary(self) -> dict:
        """``path``, ``rank``, ``n_recorded``, ``n_committed`` (rows written by this rank's writer
        thread; on rank 0 the committed rows), ``record_seconds`` (training thread: flattening
        the local shards), ``wait_seconds`` (of it, blocked on a full queue), ``write_seconds`` and ``allreduce_seconds`` (writer thread), ``closed``."""
        return {"path": str(self.path), "rank": self.rank, "active": True, "n_recorded": int(self._n_recorded),
                "n_committed": int(self._n), "last_step": self._last_queued,
                "record_seconds": round(self._record_s, 6), "wait_seconds": round(self._wait_s, 6),
                "write_seconds": round(self._write_s, 6),
                "allreduce_seconds": round(self._reduce_s, 6), "closed": self._closed, "sharded": True}

    def __repr__(self) -> str:
        return (f"ShardedRecorder({str(self.path)!r}, rank {self.rank}/{self.world_size}, d={self.d}, "
                f"{self._n_local} local entries)")
