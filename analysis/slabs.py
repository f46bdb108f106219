"""Reading one slab: the rows a pass needs, for the columns of one slab, each chunk decoded once.

A slab is a tuple of pieces ``(segment, lo, hi)``: column ranges of one window of the
parameter axis (or sketch axis, or bit axis), aligned to the storage chunks by the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from analysis.store import ArrayRef


def as_index(pos: np.ndarray):
    """``slice`` when ``pos`` is a contiguous run (no copy when indexing), else the array."""
    pos = np.asarray(pos, dtype=np.int64)
    if len(pos) == 0:
        return slice(0, 0)
    if pos[-1] - pos[0] == len(pos) - 1 and (len(pos) == 1 or (np.diff(pos) == 1).all()):
        return slice(int(pos[0]), int(pos[-1]) + 1)
    return pos


@dataclass(frozen=True)
class SpaceSpec:
    """What every slab task of one column space needs (one graph key, shared by tasks)."""

    space: str
    grad: ArrayRef | None  # "param": grad; "sketch": grad_sketch; "bits": grad_signbits
    grad_nz: ArrayRef | None  # "bits": grad_nonzero
    weight: ArrayRef | None
    grad_rows: np.ndarray
    weight_rows: np.ndarray
    ops: tuple
    n_seg: int  # 0: one result over the whole group; else one per segment (tensor)


class SlabData:
    """The rows of one slab, read once: ``grad`` / ``weight`` float32 (rows x columns) or,
    in the ``bits`` space, ``neg`` / ``nz`` uint8 bit matrices, plus slab slices of explicit
    reference vectors."""

    def __init__(self, spec: SpaceSpec, pieces, refs):
        self.space = spec.space
        self.refs = refs
        self.n_grad = len(spec.grad_rows)
        self.n_weight = len(spec.weight_rows)
        self.grad = self.weight = self.neg = self.nz = None
        if spec.space == "bits":
            if self.n_grad:
                self.neg = read_bits(spec.grad.open(), spec.grad_rows, pieces)
                self.nz = read_bits(spec.grad_nz.open(), spec.grad_rows, pieces)
        else:
            if self.n_grad:
                self.grad = read(spec.grad.open(), spec.grad_rows, pieces)
            if self.n_weight:
                self.weight = read(spec.weight.open(), spec.weight_rows, pieces)


def covers(pieces, chunk: int) -> list[tuple[int, int]]:
    """Chunk-aligned intervals covering the pieces, merged (each chunk decoded once)."""
    out: list[list[int]] = []
    for _, lo, hi in pieces:
        a, b = (lo // chunk) * chunk, -(-hi // chunk) * chunk
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def read_rows(arr, rows: np.ndarray, a: int, b: int) -> np.ndarray:
    b = min(b, arr.shape[1])
    sel = as_index(rows)
    if isinstance(sel, slice):
        return arr[sel, a:b]
    return arr.oindex[sel, a:b]


def read(arr, rows: np.ndarray, pieces) -> np.ndarray:
    """Rows x (concatenated piece columns) of a 2-D zarr array."""
    covers_ = covers(pieces, int(arr.chunks[1]))
    blocks = [(a, read_rows(arr, rows, a, b)) for a, b in covers_]
    if len(pieces) == 1 and len(blocks) == 1:
        (_, lo, hi), (a, blk) = pieces[0], blocks[0]
        return blk[:, lo - a: hi - a]
    parts = []
    for _, lo, hi in pieces:
        for a, blk in blocks:
            if a <= lo and hi <= a + blk.shape[1]:
                parts.append(blk[:, lo - a: hi - a])
                break
    return np.concatenate(parts, axis=1)


def read_bits(arr, rows: np.ndarray, pieces) -> np.ndarray:
    """Rows x (concatenated piece columns) of packed bits, unpacked to uint8 0/1."""
    byte_pieces = [(s, lo // 8, -(-hi // 8)) for s, lo, hi in pieces]
    covers_ = covers(byte_pieces, int(arr.chunks[1]))
    blocks = [(a, read_rows(arr, rows, a, b)) for a, b in covers_]
    parts = []
    for _, lo, hi in pieces:
        for a, blk in blocks:
            if a * 8 <= lo and hi <= (a + blk.shape[1]) * 8:
                b0 = lo // 8 - a
                bits = np.unpackbits(blk[:, b0: -(-hi // 8) - a], axis=1)
                parts.append(bits[:, lo - (a + b0) * 8: hi - (a + b0) * 8])
                break
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
