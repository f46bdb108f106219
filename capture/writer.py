"""Synchronous, crash-safe writer of run stores from numpy rows (no torch here).

The commit protocol (why a kill never tears a step):

1. Arrays are preallocated to ``capacity`` rows (grown by doubling), so writing a row does not
   change array metadata.
2. A row's data chunks and per-step values are written first; every key is written by zarr's
   ``LocalStore`` through a temporary file and an atomic rename, so a chunk is either the old
   or the new version, never a torn one.
3. Only then is the root attribute ``gradtrace.n_steps`` advanced (again an atomic rename).
   Readers ignore rows at index >= n_steps, so a kill between 2 and 3 loses only the step in
   flight.
4. On a clean close, arrays are trimmed to ``n_steps`` rows and the metadata is consolidated,
   so plain ``xarray.open_zarr`` sees exactly the committed rows.

:class:`StoreWriter` is used by :class:`capture.Recorder` from its writer thread, and by tests
and benchmarks that need stores without torch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zarr

from analysis import format as fmt
from analysis.format import (
    FLAG_FINAL,
    FLAG_NONFINITE_GRAD,
    FLAG_NONFINITE_WEIGHT,
    Header,
    StoreMismatchError,
    Tier,
    TensorInfo,
)

INITIAL_CAPACITY = 64
REDUCE_SLAB = 1 << 20  # entries converted to float64 at a time in the per-step scalars


def tensor_scalars(tensors: Sequence[TensorInfo], g: np.ndarray | None, w: np.ndarray):
    """Per-tensor ``||g||^2``, ``||w||^2`` and ``<g, w>``, reduced in float64.

    Returns three float64 arrays of length ``len(tensors)`` (NaN for g when g is None).
    """
    n = len(tensors)
    gg = np.full(n, np.nan)
    ww = np.zeros(n)
    gw = np.full(n, np.nan)
    if g is not None:
        gg[:] = 0.0
        gw[:] = 0.0
    for i, t in enumerate(tensors):
        for lo in range(t.offset, t.offset + t.size, REDUCE_SLAB):
            hi = min(lo + REDUCE_SLAB, t.offset + t.size)
            w64 = w[lo:hi].astype(np.float64)
            ww[i] += w64 @ w64
            if g is not None:
                g64 = g[lo:hi].astype(np.float64)
                gg[i] += g64 @ g64
                gw[i] += g64 @ w64
    return gg, ww, gw


class StoreWriter:
    """Writes rows ``(step, grad, weight, scalars)`` into a run store and commits each one.

    Args:
        path: directory of the store (a Zarr v3 group).
        tensors: the parameter table (flattening order).
        tiers: ``{"grad": Tier, "weight": Tier}`` (or tier strings like ``"rounded:7"``).
        mode: ``"create"`` refuses an existing path, ``"overwrite"`` replaces it,
            ``"resume"`` appends to it after checking that it matches.
        resume_step: with ``mode="resume"``, drop committed rows whose step is >= this step
            (training restarted from a checkpoint taken at that step).
        param_chunk: chunk width along ``param``.
        expected_steps: rows to preallocate (optional; capacity grows by doubling anyway).
        schedule, settings, parent: stored in the header.
    """

    def __init__(
        self,
        path: "str | os.PathLike",
        tensors: Sequence[TensorInfo],
        tiers: dict | None = None,
        *,
        mode: str = "create",
        resume_step: int | None = None,
        param_chunk: int = fmt.DEFAULT_PARAM_CHUNK,
        expected_steps: int | None = None,
        schedule=None,
        settings: dict | None = None,
        parent: dict | None = None,
    ):
        self.path = Path(path)
        tiers = tiers or {}
        self.tiers = {a: Tier.parse(tiers.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
        self.tensors = list(tensors)
        if not self.tensors or sum(t.size for t in self.tensors) == 0:
            raise ValueError(
                "the model has no trainable parameters to record: pass a model with at least one "
                "parameter whose requires_grad is True"
            )
        self.d = sum(t.size for t in self.tensors)
        if mode not in ("create", "overwrite", "resume"):
            raise ValueError(f"mode={mode!r}: use 'create', 'overwrite' or 'resume'")
        self._sketchers: dict[str, fmt.Sketcher] = {}
        if mode == "resume":
            if not self.path.exists():
                raise FileNotFoundError(
                    f"cannot resume: {self.path} does not exist. Start a new store with mode='create'."
                )
            self._open_existing(resume_step, schedule, settings)
        else:
            if self.path.exists():
                if mode == "create":
                    raise FileExistsError(
                        f"{self.path} already exists. Pass resume=True to append to it, "
                        "overwrite=True to replace it, or choose another path."
                    )
                _remove_store(self.path)
            self._create(param_chunk, expected_steps, schedule, settings, parent)
        for a, tier in self.tiers.items():
            if tier.name == "sketch":
                plan = fmt.sketch_plan(self.tensors, tier.sketch_dim, tier.seed)
                self._sketchers[a] = fmt.Sketcher(self.tensors, plan)
        self.n_nonfinite = int(self.header.extra.get("n_nonfinite_steps", 0))
        self._closed = False

    # ---------------------------------------------------------------- creation / reopening

    def _create(self, param_chunk, expected_steps, schedule, settings, parent):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cap = max(INITIAL_CAPACITY, int(expected_steps or 0) + 1)
        self.header = Header(
            tensors=self.tensors,
            tiers=self.tiers,
            n_steps=0,
            capacity=cap,
            param_chunk=int(param_chunk),
            schedule=schedule,
            settings=settings or {},
            parent=parent,
        )
        self.header.extra["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        g = zarr.open_group(str(self.path), mode="w", zarr_format=3)
        self.group = g
        n_t = len(self.tensors)
        names = g.create_array("tensor", shape=(n_t,), dtype=str, dimension_names=[fmt.TENSOR_DIM])
        names[:] = np.array([t.name for t in self.tensors])
        for key, vals in (
            ("tensor_offset", [t.offset for t in self.tensors]),
            ("tensor_size", [t.size for t in self.tensors]),
        ):
            a = g.create_array(key, shape=(n_t,), dtype="int64", dimension_names=[fmt.TENSOR_DIM])
            a[:] = np.asarray(vals, dtype=np.int64)
        shapes = g.create_array("tensor_shape", shape=(n_t,), dtype=str, dimension_names=[fmt.TENSOR_DIM])
        shapes[:] = np.array([json.dumps(list(t.shape)) for t in self.tensors])
        self.arrays = {}
        for spec in fmt.array_specs(self.tensors, self.tiers, self.header.param_chunk):
            shape = (cap,) if spec.width is None else (cap, spec.width)
            chunks = (fmt.SCALAR_CHUNK,) if spec.width is None else (
                (fmt.SCALAR_CHUNK, spec.chunk_width) if spec.codecs == "scalar" else (1, spec.chunk_width)
            )
            arr = g.create_array(
                spec.name,
                shape=shape,
                chunks=chunks,
                dtype=spec.dtype,
                fill_value=spec.fill_value,
                compressors=fmt.codecs_for(spec.codecs),
                dimension_names=list(spec.dims),
                attributes=spec.attrs,
            )
            self.arrays[spec.name] = arr
        self._write_header()

    def _open_existing(self, resume_step, schedule, settings):
        # use_consolidated=False: a cleanly closed store has consolidated metadata that would
        # go stale as soon as we append; opening without it drops it on the next attrs write.
        g = zarr.open_group(str(self.path), mode="r+", use_consolidated=False)
        header = fmt.header_of_group(g, self.path)
        if [t.to_json() for t in header.tensors] != [t.to_json() for t in self.tensors]:
            old = {t.name: t.shape for t in header.tensors}
            new = {t.name: t.shape for t in self.tensors}
            diff = sorted(set(old.items()) ^ set(new.items()))[:6]
            raise StoreMismatchError(
                f"cannot resume {self.path}: its parameter table differs from the model's "
                f"(first differences: {diff}). Resume with the same model, or record to a new path."
            )
        for a in fmt.DATA_ARRAYS:
            if header.tiers[a] != self.tiers[a]:
                raise StoreMismatchError(
                    f"cannot resume {self.path}: it stores '{a}' with tier {header.tiers[a].to_json()}, "
                    f"but this recorder asks for {self.tiers[a].to_json()}. Use the same tier, or a new path."
                )
        self.group = g
        self.arrays = {}
        for spec in fmt.array_specs(self.tensors, self.tiers, header.param_chunk):
            arr = g[spec.name]
            if str(arr.dtype) != spec.dtype:
                raise StoreMismatchError(
                    f"cannot resume {self.path}: array '{spec.name}' has dtype {arr.dtype}, expected "
                    f"{spec.dtype}. The store was written by an incompatible writer; use a new path."
                )
            self.arrays[spec.name] = arr
        self.header = header
        n = header.n_steps
        if header.has_final:
            n -= 1  # the final iterate is re-recorded at the next close
        if resume_step is not None and n > 0:
            steps = self.arrays["step"][:n]
            keep = int(np.searchsorted(steps, int(resume_step), side="left"))
            n = min(n, keep)
        header.n_steps = n
        header.has_final = False
        header.closed = False
        if schedule is not None:
            header.schedule = schedule
        if settings:
            header.settings = {**header.settings, **settings}
        header.capacity = min(a.shape[0] for a in self.arrays.values())
        self._write_header()

    # ---------------------------------------------------------------- writing

    @property
    def n_steps(self) -> int:
        """Committed rows."""
        return self.header.n_steps

    @property
    def last_step(self) -> int | None:
        n = self.header.n_steps
        return None if n == 0 else int(self.arrays["step"][n - 1])

    def _write_header(self):
        self.group.attrs.update({fmt.ATTR_KEY: self.header.to_json()})

    def _ensure_capacity(self, n: int):
        if n < self.header.capacity:
            return
        cap = max(self.header.capacity * 2, n + 1)
        for arr in self.arrays.values():
            arr.resize((cap,) + tuple(arr.shape[1:]))
        self.header.capacity = cap
        self._write_header()

    def append(
        self,
        step: int,
        grad: np.ndarray | None,
        weight: np.ndarray,
        *,
        loss: float = math.nan,
        lr: float = math.nan,
        epoch: int = -1,
        flags: int = 0,
    ) -> None:
        """Write one row and commit it.

        Args:
            step: global training step (strictly increasing).
            grad: float32 array of shape (d,), or None for the final iterate.
            weight: float32 array of shape (d,).
            loss, lr, epoch: per-step values.
            flags: extra flag bits (e.g. ``FLAG_MISSING_GRAD``); non-finite flags are added here.
        """
        if self._closed:
            raise RuntimeError(f"the store writer for {self.path} is closed")
        last = self.last_step
        if last is not None and int(step) <= last:
            raise ValueError(
                f"step {step} is not after the last recorded step {last}: steps must increase. "
                "When resuming from a checkpoint, pass resume_step=<checkpoint step>."
            )
        weight = np.ascontiguousarray(weight, dtype=np.float32).reshape(-1)
        if weight.shape[0] != self.d:
            raise ValueError(f"weight has {weight.shape[0]} entries, the parameter table {self.d}")
        if grad is not None:
            grad = np.ascontiguousarray(grad, dtype=np.float32).reshape(-1)
            if grad.shape[0] != self.d:
                raise ValueError(f"grad has {grad.shape[0]} entries, the parameter table {self.d}")
            if not np.isfinite(grad).all():
                flags |= FLAG_NONFINITE_GRAD
        else:
            flags |= FLAG_FINAL
        if not np.isfinite(weight).all():
            flags |= FLAG_NONFINITE_WEIGHT
        n = self.header.n_steps
        self._ensure_capacity(n)
        gg, ww, gw = tensor_scalars(self.tensors, grad, weight)
        A = self.arrays
        for name, vec in (("grad", grad), ("weight", weight)):
            if vec is None:
                continue  # unwritten chunks read as the fill value (NaN)
            tier = self.tiers[name]
            if tier.name == "lossless":
                A[name][n, :] = vec
            elif tier.name == "rounded":
                A[name][n, :] = fmt.bitround(vec, tier.keepbits)
            else:
                A[f"{name}_sketch"][n, :] = self._sketchers[name](vec).astype(np.float32)
                sb, nz = fmt.pack_signs(vec)
                A[f"{name}_signbits"][n, :] = sb
                A[f"{name}_nonzero"][n, :] = nz
        A["grad_sqnorm_tensor"][n, :] = gg
        A["weight_sqnorm_tensor"][n, :] = ww
        A["grad_dot_weight_tensor"][n, :] = gw
        for name, val in (
            ("step", int(step)),
            ("epoch", int(epoch)),
            ("loss", float(loss)),
            ("lr", float(lr)),
            ("flags", int(flags)),
            ("grad_sqnorm", float(gg.sum())),
            ("weight_sqnorm", float(ww.sum())),
            ("grad_dot_weight", float(gw.sum())),
        ):
            A[name][n] = val
        # commit marker last
        self.header.n_steps = n + 1
        if flags & FLAG_NONFINITE_GRAD:
            self.n_nonfinite += 1
            self.header.extra["n_nonfinite_steps"] = self.n_nonfinite
        if flags & FLAG_FINAL:
            self.header.has_final = True
        self._write_header()

    def update_settings(self, **settings) -> None:
        self.header.settings.update(settings)
        self._write_header()

    def close(self, final_weight: np.ndarray | None = None, final_step: int | None = None, *, epoch: int = -1) -> None:
        """Record the final iterate (if given), trim arrays to the committed rows, consolidate."""
        if self._closed:
            return
        if final_weight is not None:
            if final_step is None:
                last = self.last_step
                final_step = 0 if last is None else last + 1
            self.append(final_step, None, final_weight, epoch=epoch)
        n = self.header.n_steps
        for arr in self.arrays.values():
            arr.resize((n,) + tuple(arr.shape[1:]))
        self.header.capacity = n
        self.header.closed = True
        self._write_header()
        zarr.consolidate_metadata(str(self.path))
        self._closed = True


def _remove_store(path: Path):
    """Delete an existing store (only if it looks like a Zarr store or is empty)."""
    if path.is_dir():
        if any(path.iterdir()) and not (path / "zarr.json").exists():
            raise FileExistsError(
                f"refusing to overwrite {path}: it is a non-empty directory that is not a Zarr store"
            )
        shutil.rmtree(path)
    else:
        path.unlink()
