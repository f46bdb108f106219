"""Small random run stores with known numpy arrays (numpy only, no torch).

Used by the analysis tests and by anyone who needs a store whose content is known exactly::

    from tests.helpers_stores import make_store
    data = make_store(tmp_path / "run.zarr", steps=12, tiers="lossless")
    data.grads      # (T, d) float32, exactly what the store holds for the gradient steps
    data.weights    # (T, d) float32
    data.final_weight, data.final_step

The trajectory is gradient descent on a random quadratic with an oscillating component, so
correlations are neither all positive nor all negative, plus some exact zeros in the
gradients (sign-shift zero shares are not trivially 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradtrace_format import format as fmt
from capture.writer import StoreWriter

DEFAULT_SHAPES = (
    ("conv.weight", (4, 2, 3, 3)),
    ("conv.bias", (4,)),
    ("fc1.weight", (6, 9)),
    ("fc1.bias", (6,)),
    ("fc2.weight", (3, 6)),
)


@dataclass
class StoreData:
    """What :func:`make_store` wrote.

    Attributes:
        path: the store directory.
        tensors: the parameter table.
        steps: (T,) int64 gradient steps.
        grads: (T, d) float32 gradients as stored (after the tier's rounding).
        weights: (T, d) float32 weights as stored.
        raw_grads, raw_weights: (T, d) float32 before the tier's encoding.
        final_weight: (d,) float32 final iterate as stored (None without one).
        final_step: its step (None without one).
        epochs, losses, lrs: (T,) per-step values.
        tiers: the :class:`gradtrace_format.format.Tier` of grad and weight.
        grad_sketch, weight_sketch: (T, k) float32 stored sketches (sketch tier), else None;
            ``weight_sketch`` includes the final iterate as its last row.
    """

    path: Path
    tensors: list
    steps: np.ndarray
    grads: np.ndarray
    weights: np.ndarray
    raw_grads: np.ndarray
    raw_weights: np.ndarray
    final_weight: np.ndarray | None
    final_step: int | None
    epochs: np.ndarray
    losses: np.ndarray
    lrs: np.ndarray
    tiers: dict
    grad_sketch: np.ndarray | None = None
    weight_sketch: np.ndarray | None = None

    @property
    def d(self) -> int:
        return int(self.grads.shape[1])

    def tensor_slice(self, name: str) -> slice:
        t = next(t for t in self.tensors if t.name == name)
        return slice(t.offset, t.offset + t.size)


def _stored(x: np.ndarray, tier: fmt.Tier) -> np.ndarray:
    if tier.name == "rounded":
        return fmt.bitround(x, tier.keepbits)
    return x.copy()


def make_store(
    path,
    *,
    steps: int | Sequence[int] = 12,
    shapes: Sequence[tuple[str, Sequence[int]]] = DEFAULT_SHAPES,
    tiers: str | dict = "lossless",
    seed: int = 0,
    grads: np.ndarray | None = None,
    weights: np.ndarray | None = None,
    final: bool = True,
    final_weight: np.ndarray | None = None,
    epochs: Sequence[int] | None = None,
    steps_per_epoch: int = 4,
    zero_fraction: float = 0.2,
    param_chunk: int = 16,
) -> StoreData:
    """Write a small store with StoreWriter and return exactly what it holds.

    Args:
        path: store directory (overwritten).
        steps: number of gradient steps (0..T-1), or the explicit step numbers (sparse
            schedules: e.g. ``range(0, 100, 10)``).
        shapes: the parameter table as ``(name, shape)`` pairs.
        tiers: ``"lossless"``, ``"rounded:7"``, ``"sketch:64"``... for both arrays, or a dict
            ``{"grad": ..., "weight": ...}``.
        grads, weights: explicit (T, d) arrays to store instead of the random trajectory.
        final: record the final iterate (``final_weight``, default the last weights minus
            lr times the last gradient).
        epochs: per-step epoch numbers (default ``step // steps_per_epoch``).
        zero_fraction: share of gradient entries set to exactly 0.
        param_chunk: chunk width along ``param`` (small, so tests cross chunk boundaries).
    """
    path = Path(path)
    step_list = np.arange(steps, dtype=np.int64) if isinstance(steps, int) else np.asarray(list(steps), dtype=np.int64)
    T = len(step_list)
    tensors = fmt.tensor_table(shapes)
    d = sum(t.size for t in tensors)
    rng = np.random.default_rng(seed)
    tier_spec = tiers if isinstance(tiers, dict) else {"grad": tiers, "weight": tiers}
    tier = {a: fmt.Tier.parse(tier_spec.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
    lrs = np.full(T, 0.1)
    if weights is None or grads is None:
        A = rng.standard_normal((d, d)) / np.sqrt(d)
        H = A @ A.T + 0.1 * np.eye(d)
        osc = rng.standard_normal(d)
        w = rng.standard_normal(d)
        gs, ws = [], []
        for k in range(T):
            g = H @ w + 3.0 * (-1) ** k * osc * np.exp(-k / (T + 1)) + 0.3 * rng.standard_normal(d)
            g[rng.random(d) < zero_fraction] = 0.0
            gs.append(g)
            ws.append(w.copy())
            w = w - lrs[k] * g
        raw_grads = np.asarray(gs, dtype=np.float32) if grads is None else np.asarray(grads, dtype=np.float32)
        raw_weights = np.asarray(ws, dtype=np.float32) if weights is None else np.asarray(weights, dtype=np.float32)
        last_w = w.astype(np.float32)
    else:
        raw_grads = np.asarray(grads, dtype=np.float32)
        raw_weights = np.asarray(weights, dtype=np.float32)
        last_w = (raw_weights[-1] - np.float32(0.1) * raw_grads[-1]).astype(np.float32)
    if raw_grads.shape != (T, d) or raw_weights.shape != (T, d):
        raise ValueError(f"grads/weights must be ({T}, {d}); got {raw_grads.shape} and {raw_weights.shape}")
    ep = np.asarray(epochs if epochs is not None else step_list // steps_per_epoch, dtype=np.int64)
    losses = 1.0 / (1.0 + np.arange(T)) + 0.05 * np.cos(np.arange(T))
    writer = StoreWriter(path, tensors, tier, mode="overwrite", param_chunk=param_chunk)
    for k in range(T):
        writer.append(int(step_list[k]), raw_grads[k], raw_weights[k], loss=float(losses[k]), lr=float(lrs[k]),
                      epoch=int(ep[k]))
    fw = None
    fstep = None
    if final:
        fw = np.asarray(final_weight if final_weight is not None else last_w, dtype=np.float32)
        fstep = int(step_list[-1]) + 1
        writer.close(final_weight=fw, epoch=int(ep[-1]))
    else:
        writer.close()
    sketches = {}
    for a, raw in (("grad", raw_grads), ("weight", raw_weights if fw is None else np.vstack([raw_weights, fw]))):
        if tier[a].name == "sketch":
            sk = fmt.Sketcher(tensors, fmt.sketch_plan(tensors, tier[a].sketch_dim, tier[a].seed))
            sketches[a] = np.stack([sk(x).astype(np.float32) for x in raw])
    return StoreData(
        path=path,
        tensors=tensors,
        steps=step_list,
        grads=_stored(raw_grads, tier["grad"]),
        weights=_stored(raw_weights, tier["weight"]),
        raw_grads=raw_grads,
        raw_weights=raw_weights,
        final_weight=None if fw is None else _stored(fw[None], tier["weight"])[0],
        final_step=fstep,
        epochs=ep,
        losses=losses,
        lrs=lrs,
        tiers=tier,
        grad_sketch=sketches.get("grad"),
        weight_sketch=sketches.get("weight"),
    )


# ------------------------------------------------------------------------------------------
# Slow, obviously correct reference metrics (float64; math.fsum of products of float32
# values, which are exact in float64, gives correctly rounded dot products).
# ------------------------------------------------------------------------------------------


def dot(a: np.ndarray, b: np.ndarray) -> float:
    """Correctly rounded <a, b> of two vectors (float32 or float64 entries)."""
    return math.fsum((np.asarray(a, np.float64) * np.asarray(b, np.float64)).tolist())


def slow_corr(x: np.ndarray, y: np.ndarray) -> float:
    """mu = <x, y> / (||x|| ||y||), NaN for a zero vector."""
    nx, ny = math.sqrt(dot(x, x)), math.sqrt(dot(y, y))
    if nx == 0 or ny == 0:
        return float("nan")
    return dot(x, y) / (nx * ny)


def slow_corr_matrix(X: np.ndarray) -> np.ndarray:
    n = len(X)
    out = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            out[i, j] = slow_corr(X[i], X[j])
    return out


def slow_sign_shift(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(percent of coordinates with opposite signs among both non-zero, percent either zero)."""
    both = 0
    flip = 0
    either_zero = 0
    for a, b in zip(np.asarray(x).tolist(), np.asarray(y).tolist()):
        if a == 0 or b == 0:
            either_zero += 1
        else:
            both += 1
            flip += (a < 0) != (b < 0)
    shift = 100.0 * flip / both if both else float("nan")
    return shift, 100.0 * either_zero / len(x)


def slow_rsi(g: np.ndarray, w: np.ndarray, ref: np.ndarray) -> dict:
    """RSI, EB, gamma, eta*, distance of one step (docs/methods.md definitions), float64."""
    diff = np.asarray(w, np.float64) - np.asarray(ref, np.float64)
    d2 = dot(diff, diff)
    gd = dot(g, diff)
    gg = dot(g, g)
    dist = math.sqrt(d2)
    if d2 == 0:
        nan = float("nan")
        return {"rsi": nan, "eb": nan, "gamma": nan, "eta_star": nan, "distance": 0.0}
    return {
        "rsi": gd / d2,
        "eb": math.sqrt(gg) / dist,
        "gamma": gd / (math.sqrt(gg) * dist) if gg > 0 else float("nan"),
        "eta_star": gd / gg if gg > 0 else float("nan"),
        "distance": dist,
    }


def count_decodes(monkeypatch):
    """Count the chunk decodes of the analysis engine's reads (``analysis.slabs.read_rows``).

    Returns ``(decodes, reads)``: a Counter of ``(array name, row, column chunk)`` -> times
    read, and a list of ``(array name, n_rows, lo, hi)``, one per read call.
    """
    import threading
    from collections import Counter

    from analysis import slabs

    decodes: Counter = Counter()
    reads: list = []
    lock = threading.Lock()
    real = slabs.read_rows

    def read_rows(arr, rows, a, b, **kw):
        cw, hi = int(arr.chunks[1]), min(b, arr.shape[1])
        rr = np.arange(arr.shape[0])[slabs.as_index(rows)]
        name = str(arr.store_path).rstrip("/").rsplit("/", 1)[-1]  # opened at <store>/<name>
        with lock:
            reads.append((name, len(rr), a, hi))
            for r in rr.tolist():
                for c in range(a // cw, -(-hi // cw)):
                    decodes[(name, r, c)] += 1
        return real(arr, rows, a, b, **kw)

    monkeypatch.setattr(slabs, "read_rows", read_rows)
    return decodes, reads


def chunk_key(store, array: str, *coords: int) -> str:
    """The key of chunk ``coords`` of ``array`` inside ``store`` (a local store path), from the
    array's own chunk key encoding (``c/2/3`` or ``c.2.3``), relative to the store."""
    import json
    from pathlib import Path

    meta = json.loads((Path(store) / array / "zarr.json").read_text())
    enc = meta.get("chunk_key_encoding", {"name": "default"})
    sep = (enc.get("configuration") or {}).get("separator", "/")
    return f"{array}/c{sep}" + sep.join(str(int(c)) for c in coords)


def chunk_path(store, array: str, *coords: int):
    """The file of chunk ``coords`` of ``array`` in the local store ``store``."""
    from pathlib import Path

    return Path(store) / chunk_key(store, array, *coords)


def chunk_span(store, array: str, *coords: int):
    """``(file, offset, nbytes)`` of chunk ``coords`` of ``array`` in the local store ``store``:
    the chunk file itself, or the shard file holding it and the chunk's bytes in it."""
    from pathlib import Path

    import zarr

    from gradtrace_format import integrity

    arr = zarr.open_array(str(Path(store) / array), mode="r")
    if integrity.shard_of(arr, coords) is None:
        p = chunk_path(store, array, *coords)
        return p, 0, p.stat().st_size
    key, off, nb = integrity._shard_entry(arr, coords)
    assert off != 2**64 - 1, f"chunk {coords} of {array} is not stored"
    return Path(integrity._file(arr, key)), off, nb


def flip_chunk_byte(store, array: str, row: int, col: int, pos: int, mask: int = 0x10) -> None:
    """Flip bits ``mask`` of byte ``pos`` (modulo the chunk's size) of one stored chunk."""
    path, off, nb = chunk_span(store, array, row, col)
    with open(path, "r+b") as f:
        f.seek(off + pos % nb)
        b = f.read(1)[0]
        f.seek(off + pos % nb)
        f.write(bytes([b ^ mask]))


def _shard_index_entry(store, array: str, row: int, col: int):
    from pathlib import Path

    import zarr

    from gradtrace_format import integrity

    arr = zarr.open_array(str(Path(store) / array), mode="r")
    sh = integrity.shard_of(arr, (row, col))
    if sh is None:
        return None
    return Path(integrity._file(arr, integrity._store_key(arr, sh[0]))), 16 * sh[1]


def delete_chunk(store, array: str, row: int, col: int) -> None:
    """Remove one chunk: its file, or its entry in its shard's index (it then reads as absent)."""
    found = _shard_index_entry(store, array, row, col)
    if found is None:
        chunk_path(store, array, row, col).unlink()
        return
    path, at = found
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 16)


def truncate_chunk(store, array: str, row: int, col: int, keep: int) -> None:
    """Cut one chunk to its first ``keep`` bytes (its file, or its length in its shard's index)."""
    found = _shard_index_entry(store, array, row, col)
    if found is None:
        p = chunk_path(store, array, row, col)
        p.write_bytes(p.read_bytes()[:keep])
        return
    path, at = found
    import struct

    with open(path, "r+b") as f:
        f.seek(at)
        off, _ = struct.unpack("<QQ", f.read(16))
        f.seek(at)
        f.write(struct.pack("<QQ", off, keep))
