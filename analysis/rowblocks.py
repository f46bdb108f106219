"""Row blocks: a pass of row-wise ops cut along its rows instead of along a storage chunk.

When all the rows of even one chunk-wide slab exceed the engine's ``SLAB_BYTES`` (many steps),
a pass whose ops are all row-wise (:data:`analysis.blockops.ROW_WISE`: pair dots, sign pairs,
distances to a reference; each item combines one row with one partner row or the reference)
keeps its slabs one chunk wide and cuts the rows into blocks, one task each: every chunk is
decoded once, the partner rows past a block's end twice. The blocks of a slab are put together
before the reduction over slabs (``_gather`` in :mod:`analysis.engine`), so every result is
exactly the unblocked one.

Rows are named by *pool keys* here: grad position p (in the pass's grad rows) is key p, weight
position q is key ``ng + q`` with ``ng`` the number of grad rows.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from analysis.blockops import RefDir, RefDist, _as64, ref_chunks
from analysis.slabs import SlabData, SpaceSpec


def row_blocks(spec: SpaceSpec, max_rows: int, n_refs: int) -> tuple[list[SpaceSpec], SpaceSpec | None]:
    """Cut a pass of row-wise ops into row blocks of about ``max_rows`` rows (grad + weight).

    Every item (a pair of rows, or a step against the reference) goes to the block of its
    first store row, in order; a block holds the union of the rows its items need (partner
    rows past the block's end are read by two blocks). Each block's ops keep their items in
    the original order, with their positions in the whole result (``out``), so the engine's
    ``_gather`` rebuilds it. A reference made of store rows (``coef @ weight[ref_rows]``) is
    formed once per slab by :func:`ref_vectors` (the second value: its spec, or None) and
    reaches the blocks as explicit reference ``n_refs + j`` (j counts such ops), not re-read
    by each block.
    """
    ng = len(spec.grad_rows)
    formed = _formed_refs(spec.ops, n_refs)
    keys = [op.pool_keys(ng) for op in spec.ops]
    op_id, item, anchor, k1, k2 = _items(spec, keys)
    block_of = _assign_blocks(anchor, k1, k2, max(1, max_rows))
    groups = _group_items(block_of, op_id, item, len(spec.ops))
    blocks = [_block_spec(spec, g, keys, formed) for g in groups]
    return blocks, _ref_spec(spec, formed)


def _formed_refs(ops, n_refs: int) -> dict[int, int]:
    """``{op index: explicit reference index}`` for the ops whose reference is made of store
    rows: in a row block they read it as explicit reference ``n_refs + j``, in op order."""
    formed: dict[int, int] = {}
    for i, op in enumerate(ops):
        if isinstance(op, RefDist | RefDir) and op.ref < 0:
            formed[i] = n_refs + len(formed)
    return formed


def _items(spec: SpaceSpec, keys: list[tuple[np.ndarray, np.ndarray]]):
    """Every item of every op, flattened: ``(op index, item index, anchor, key 1, key 2)``
    arrays; the anchor is the item's first store row, the keys (each op's ``pool_keys``) its
    two rows."""
    pool_rows = np.concatenate([np.asarray(spec.grad_rows, np.int64), np.asarray(spec.weight_rows, np.int64)])
    op_id, item, anchor, k1, k2 = [], [], [], [], []
    for i, (a, b) in enumerate(keys):
        op_id.append(np.full(len(a), i, np.int64))
        item.append(np.arange(len(a), dtype=np.int64))
        anchor.append(np.minimum(pool_rows[a], pool_rows[b]))
        k1.append(a)
        k2.append(b)
    return tuple(np.concatenate(x) for x in (op_id, item, anchor, k1, k2))


def _assign_blocks(anchor: np.ndarray, k1: np.ndarray, k2: np.ndarray, budget: int) -> np.ndarray:
    """The block of each item: greedy over the anchors in order, a block takes every item of
    the next anchor while the union of the rows its items need stays within ``budget``."""
    order = np.argsort(anchor, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(anchor[order]) != 0])
    ends = np.r_[starts[1:], len(order)]
    block_of = np.empty(len(order), np.int64)
    held: set = set()
    blk = 0
    for s0, s1 in zip(starts.tolist(), ends.tolist()):
        sel = order[s0:s1]
        need = set(k1[sel].tolist()) | set(k2[sel].tolist())
        new = need - held
        if held and len(held) + len(new) > budget:
            blk += 1
            held = need
        else:
            held |= new
        block_of[sel] = blk
    return block_of


def _group_items(block_of: np.ndarray, op_id: np.ndarray, item: np.ndarray, n_ops: int) -> list[dict[int, np.ndarray]]:
    """For each block, ``{op index: its items in the block, in their original order}``; an op
    without items lands in the first block (it still gives its empty result)."""
    n_blocks = int(block_of.max()) + 1 if len(block_of) else 1
    srt = np.lexsort((item, op_id, block_of))
    cut = np.flatnonzero(np.r_[True, (np.diff(block_of[srt]) != 0) | (np.diff(op_id[srt]) != 0)])
    groups: list[dict[int, np.ndarray]] = [{} for _ in range(n_blocks)]
    for c0, c1 in zip(cut.tolist(), np.r_[cut[1:], len(srt)].tolist()):
        if c1 > c0:
            groups[int(block_of[srt[c0]])][int(op_id[srt[c0]])] = item[srt[c0:c1]]
    for i in range(n_ops):
        if not any(i in g for g in groups):
            groups[0][i] = np.zeros(0, np.int64)
    return groups


def _block_spec(spec: SpaceSpec, group: dict[int, np.ndarray], keys: list[tuple[np.ndarray, np.ndarray]],
                formed: dict[int, int]) -> SpaceSpec:
    """The spec of one row block: the rows its items need, and each op restricted to its items."""
    ng = len(spec.grad_rows)
    need = np.unique(np.concatenate([np.zeros(0, np.int64)]
                                    + [k[idx] for i, idx in group.items() for k in keys[i]]))
    gpos, wpos = need[need < ng], need[need >= ng] - ng
    no_rows = {"ref_w": np.zeros(0, np.int64), "coef": np.zeros(0)}
    ops = tuple(spec.ops[i].in_block(group[i], gpos, wpos, ng, {"ref": formed[i], **no_rows} if i in formed else {})
                for i in sorted(group))
    return dataclasses.replace(spec, grad_rows=np.asarray(spec.grad_rows)[gpos],
                               weight_rows=np.asarray(spec.weight_rows)[wpos], ops=ops)


def _ref_spec(spec: SpaceSpec, formed: dict[int, int]) -> SpaceSpec | None:
    """The reference rows alone, with the ops that need them, for :func:`ref_vectors`."""
    if not formed:
        return None
    ref_ops = [spec.ops[i] for i in formed]
    wpos = np.unique(np.concatenate([np.asarray(op.ref_w, np.int64) for op in ref_ops]))
    ref_ops = tuple(dataclasses.replace(op, ref_w=np.searchsorted(wpos, op.ref_w)) for op in ref_ops)
    return dataclasses.replace(spec, grad=None, grad_nz=None, grad_rows=np.zeros(0, np.int64),
                               weight_rows=np.asarray(spec.weight_rows)[wpos], ops=ref_ops)


def ref_vectors(spec: SpaceSpec, pieces, refs, slab_bytes: int) -> tuple:
    """``refs`` plus, for each op of ``spec`` (a reference made of store rows), its reference
    ``coef @ weight[ref_w]`` over the slab's columns, in float64: exactly what the op forms
    itself when unblocked (same column chunks, one product over all the rows), except that
    more reference rows than ``slab_bytes`` holds are read and summed in row blocks."""
    width = sum(hi - lo for _, lo, hi in pieces)
    spans, col = [], 0
    for _, lo, hi in (pieces if spec.n_seg else ((0, 0, width),)):  # as the slab task calls partial
        spans.append((col, col + hi - lo))
        col += hi - lo
    per_block = max(1, int(slab_bytes // max(1, 4 * width)))
    out = [np.zeros(width) for _ in spec.ops]
    wrows = np.asarray(spec.weight_rows)
    for r0 in range(0, len(wrows), per_block):
        sub = np.arange(r0, min(len(wrows), r0 + per_block))
        data = SlabData(dataclasses.replace(spec, weight_rows=wrows[sub]), pieces, ())
        for op, r in zip(spec.ops, out):
            mine = (op.ref_w >= sub[0]) & (op.ref_w <= sub[-1])
            if not mine.any():
                continue
            rows, coef = op.ref_w[mine] - sub[0], op.coef[mine]
            for a, b in spans:
                for c0, c1 in ref_chunks(a, b):
                    r[c0:c1] += coef @ _as64(data.weight[rows, c0:c1], "ref_rows")
    return tuple(refs) + tuple(out)
