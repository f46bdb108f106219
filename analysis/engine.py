"""Planning and running a pass: one read over parameter slabs that accumulates every requested
product at once.

A :class:`Pass` collects requests (typed records, :mod:`analysis.pass_requests`: Gram matrix
of a step selection, dot products of step pairs, sign counts, distances and dot products
against reference points), then reads the store once, slab by slab along the parameter axis,
and sums the per-slab partial results with a tree reduction. Each slab is one dask task: it
reads the rows it needs for its columns (aligned to the storage chunks, :mod:`analysis.slabs`),
computes every request's block operation (:mod:`analysis.blockops`), and returns a few small
arrays. Memory is bounded by a few slabs (``SLAB_BYTES`` each), never by T x d.

When all the rows of even one chunk-wide slab exceed ``SLAB_BYTES`` (many steps), a pass whose
requests are all row-wise keeps its slabs one chunk wide and cuts the rows into blocks
(:mod:`analysis.rowblocks`; every result is exactly the unblocked one). Gram-type requests need
all rows together: their slabs become a fraction of a chunk instead (each chunk decoded more
than once).

Exactness: see :mod:`analysis.blockops` (float64 accumulation everywhere except
``precision="float32"`` Gram matrices; exact integer sign counts).

The graph runs on the threaded scheduler by default and unchanged on a ``dask.distributed``
client (tasks carry :class:`analysis.store.ArrayRef` handles, which each worker opens itself).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
from dataclasses import dataclass

import numpy as np

from gradtrace_format import format as fmt
from analysis import pass_requests as rq
from analysis.blockops import ROW_WISE
from analysis.rowblocks import ref_vectors, row_blocks
from analysis.slabs import SlabData, SpaceSpec
from analysis.store import ParamGroup, Run

#: Target bytes of raw data read per slab task (several slabs are in flight at once).
SLAB_BYTES = 128 * 2**20
#: A pass that reads more than this shows a progress bar when ``progress=None`` and stderr is a TTY.
AUTO_PROGRESS_BYTES = 4 * 2**30
MAX_SLAB_COLS = 2**22
#: A slab one storage chunk wide may hold up to this many bytes (rows x chunk x arrays): a
#: narrower slab would decode every chunk more than once (2x the decode work at half a chunk).
CHUNK_SLAB_BYTES = 2**30
MIN_SLAB_COLS = 1024

SPACES = ("param", "sketch", "bits")


class Pass:
    """Collects requests, then runs them all in one pass over the store.

    Args:
        run: the opened store.
        group: the parameter group (whole tensors) the products are restricted to.
        per_tensor: return one result per tensor of the group (leading axis) instead of one
            over the whole group.

    Example:
        >>> p = Pass(run, run.params())                      # doctest: +SKIP
        >>> k = p.gram(run.rows_of([0, 1, 2]))              # doctest: +SKIP
        >>> p.compute()[k]                                   # 3 x 3 float64 Gram  # doctest: +SKIP
    """

    def __init__(self, run: Run, group: ParamGroup, *, per_tensor: bool = False):
        self.run = run
        self.group = group
        self.per_tensor = per_tensor
        self.requests: list[rq.Request] = []
        self.refs: list[tuple[str, np.ndarray]] = []  # (space, vector over that space)
        #: a slab one storage chunk wide may hold this many bytes (see CHUNK_SLAB_BYTES); the
        #: query index raises it a little so that T = 512 stacked [G; W] rows (1026 x 1 MiB
        #: chunks, 0.2% over 1 GiB) still decode each chunk once
        self.chunk_slab_bytes = CHUNK_SLAB_BYTES

    # -- request builders (rows are store row indices) -----------------------------------
    def _space(self, array: str = "grad") -> str:
        return "param" if self.run.dense(array) else "sketch"

    def _add(self, cls: type[rq.Request], space: str, grad_rows=(), weight_rows=(), **fields) -> str:
        """Append a request of type ``cls``; returns its result key."""
        key = f"{cls.kind}{len(self.requests)}"
        self.requests.append(cls(key, space, tuple(map(int, grad_rows)), tuple(map(int, weight_rows)), **fields))
        return key

    def _sign_space(self) -> str:
        return "param" if self.run.dense("grad") else "bits"

    def gram(self, rows, precision: str = "float64") -> str:
        """Gram matrix ``G_S G_S^T`` (float64, n x n) of the gradients at store rows ``rows``."""
        if precision not in ("float64", "float32"):
            raise ValueError(f"precision={precision!r}: use 'float64' (exact) or 'float32' (fast)")
        return self._add(rq.GramRequest, self._space(), rows, precision=precision)

    def pair_dots(self, rows_a, rows_b) -> str:
        """``<G_a, G_b>`` for each pair of store rows (float64, length P)."""
        return self._add(rq.PairDotsRequest, self._space(), list(rows_a) + list(rows_b), a=np.asarray(rows_a),
                         b=np.asarray(rows_b))

    def sign_gram(self, rows) -> str:
        """``[disagree, both_nonzero]`` coordinate counts for every pair of rows, (2, n, n)."""
        return self._add(rq.SignGramRequest, self._sign_space(), rows)

    def sign_pairs(self, rows_a, rows_b) -> str:
        """``[disagree, both_nonzero]`` counts for each pair of store rows, (2, P)."""
        return self._add(rq.SignPairsRequest, self._sign_space(), list(rows_a) + list(rows_b), a=np.asarray(rows_a),
                         b=np.asarray(rows_b))

    def ref_dist(self, rows, space: str, ref_vector=None, ref_rows=None, coef=None) -> str:
        """``[||w_t - r||^2, <G_t, w_t - r>]`` for store rows ``rows`` (2, n).

        The reference is ``ref_vector`` (float64 over the ``space``'s columns: length d for
        "param", the sketch dimension for "sketch") or ``coef @ weight[ref_rows]``.
        """
        fields = {}
        wrows = list(rows)
        if ref_vector is not None:
            fields["ref"] = sum(1 for s, _ in self.refs if s == space)  # position within the space's refs
            self.refs.append((space, ref_vector))
        else:
            fields.update(ref=-1, ref_rows=np.asarray(ref_rows), coef=np.asarray(coef, dtype=np.float64))
            wrows += list(ref_rows)
        return self._add(rq.RefDistRequest, space, rows, wrows, w=np.asarray(rows), **fields)

    def ref_dir(self, rows, *, ref_vector=None, ref_rows=None, coef=None, lam=None, next_rows=None) -> str:
        """``[||w_t - r||^2, <v_t, w_t - r>, ||v_t||^2]`` for store rows ``rows`` (3, n), dense
        tiers only, with ``v_t = G_t + lam * w_t`` (``lam``: float64 vector of length d) or,
        with ``next_rows``, ``v_t = w_t - w_next`` (the weights at ``next_rows``, row for row).
        The reference is ``ref_vector`` (float64, length d) or ``coef @ weight[ref_rows]``."""
        if (lam is None) == (next_rows is None):
            raise ValueError("ref_dir: give exactly one of lam= (gradient + weight decay) and next_rows= (update)")
        n_param_refs = sum(1 for sp, _ in self.refs if sp == "param")
        fields: dict = {"w": np.asarray(rows, dtype=np.int64)}
        wrows = list(rows)
        if ref_vector is not None:
            self.refs.append(("param", np.asarray(ref_vector, dtype=np.float64)))
            fields["ref"] = n_param_refs
            n_param_refs += 1
        else:
            fields.update(ref=-1, ref_rows=np.asarray(ref_rows), coef=np.asarray(coef, dtype=np.float64))
            wrows += list(ref_rows)
        grows = ()
        if lam is not None:
            self.refs.append(("param", np.asarray(lam, dtype=np.float64)))
            fields.update(lam=n_param_refs, g=np.asarray(rows, dtype=np.int64), w2=np.zeros(0, np.int64))
            grows = rows
        else:
            fields.update(lam=-1, g=np.zeros(0, np.int64), w2=np.asarray(next_rows, dtype=np.int64))
            wrows += list(next_rows)
        return self._add(rq.RefDirRequest, "param", grows, wrows, **fields)

    def _anchor(self, space: str, anchor) -> int:
        """Register an anchor vector; its position among the space's explicit references."""
        if anchor is None:
            return -1
        pos = sum(1 for s, _ in self.refs if s == space)
        self.refs.append((space, np.asarray(anchor, np.float64)))
        return pos

    def index_gram(self, space: str, grad_rows=(), weight_rows=(), cols=None, anchor=None) -> str:
        """Query-index products ``X X[cols]^T`` of the stacked rows ``X = [G_grad_rows;
        W_weight_rows - anchor]`` in ``space`` ("param" or "sketch"), float64 ``(n, n)`` or
        ``(n, len(cols))``; ``anchor``: a float64 vector over the space (None: 0)."""
        return self._add(rq.IndexGramRequest, space, grad_rows, weight_rows,
                         cols=None if cols is None else np.asarray(cols, np.int64),
                         anchor=self._anchor(space, anchor) if len(weight_rows) else -1)

    def index_signs(self, rows, cols=None) -> str:
        """Query-index sign counts ``[disagree, both_nonzero]`` of ``rows`` against ``rows[cols]``."""
        return self._add(rq.IndexSignsRequest, self._sign_space(), rows,
                         cols=None if cols is None else np.asarray(cols, np.int64))

    def index_band(self, space: str, rows, first: int, band: int, grad: bool = True, weight: bool = True,
                   anchor=None) -> str:
        """Banded index products of consecutive store ``rows`` (see :class:`analysis.blockops.IndexBand`)."""
        return self._add(rq.IndexBandRequest, space, rows if grad else (), rows if weight else (), rows=np.asarray(rows),
                         first=int(first), band=int(band), grad=bool(grad), weight=bool(weight),
                         anchor=self._anchor(space, anchor) if weight else -1)

    def index_sign_band(self, rows, first: int, band: int) -> str:
        """Banded sign counts of consecutive store ``rows`` (see :class:`analysis.blockops.IndexSignBand`)."""
        return self._add(rq.IndexSignBandRequest, self._sign_space(), rows, first=int(first), band=int(band))

    # -- planning ---------------------------------------------------------------------------
    def _columns(self, space: str) -> list[tuple[int, int, int]]:
        """``(segment, lo, hi)`` column pieces of the group in the space, in order."""
        run, group = self.run, self.group
        if space == "sketch":
            plan = run.sketch_plan("grad" if not run.dense("grad") else "weight")
            out = [(seg, plan.offsets[i], plan.offsets[i] + plan.sizes[i]) for seg, i in enumerate(group.indices)]
        else:  # several pieces per tensor in a sharded store, in column order
            out = sorted(((seg, lo, hi) for seg, i in enumerate(group.indices) for lo, hi in run.tensor_columns(i)),
                         key=lambda p: p[1])
        if not self.per_tensor:  # merge adjacent pieces: fewer, larger reads
            out = _merge_adjacent(out)
        return [p for p in out if p[2] > p[1]]

    def _slab_width(self, n_rows: int, chunk: int, col_bytes: float, whole_chunks: bool) -> int:
        """Columns per slab: a multiple of ``chunk`` within ``SLAB_BYTES``, one chunk when even
        that is over the budget (``whole_chunks``, or within ``chunk_slab_bytes``), else a
        power-of-two fraction of the chunk, so that pieces never straddle chunks."""
        per_col = max(1.0, n_rows * col_bytes)
        width = int(SLAB_BYTES // per_col)
        if width >= chunk:
            return min(MAX_SLAB_COLS, (width // chunk) * chunk)
        budget = max(self.chunk_slab_bytes, SLAB_BYTES)
        if whole_chunks or chunk * per_col <= budget:
            return chunk  # one chunk is over the budget: still decode each chunk once
        width = int(budget // per_col)
        return chunk // 2 ** math.ceil(math.log2(chunk / max(width, min(chunk, MIN_SLAB_COLS))))

    def _slabs(self, space: str, n_rows: int, chunk: int, col_bytes: float, whole_chunks: bool = False):
        """Split the space's pieces into slabs: windows aligned to ``chunk`` columns.

        With very many rows even one storage chunk per slab would exceed the memory budget;
        the slab is then a fraction of a chunk (each chunk is decoded more than once: slower,
        but memory stays bounded), unless ``whole_chunks``: a pass of row-wise requests keeps
        slabs one chunk wide and cuts its rows into blocks instead (:mod:`analysis.rowblocks`).
        """
        width = self._slab_width(n_rows, chunk, col_bytes, whole_chunks)
        slabs: dict[int, list] = {}
        for seg, lo, hi in self._columns(space):
            a = lo
            while a < hi:
                win = a // width
                b = min(hi, (win + 1) * width)
                slabs.setdefault(win, []).append((seg, a, b))
                a = b
        return [tuple(v) for _, v in sorted(slabs.items())]

    def _space_arrays(self, space: str, with_grad: bool, with_weight: bool):
        """``(grad, grad_nonzero, weight, chunk)``: the arrays a space reads (``ArrayRef`` or
        None) and its chunk width in columns of the space."""
        run = self.run
        if space == "param":
            return (run.array_ref("grad") if with_grad else None, None,
                    run.array_ref("weight") if with_weight else None,
                    run.chunk_width("grad" if with_grad else "weight"))
        if space == "sketch":
            return (run.array_ref(fmt.sketch_array("grad")) if with_grad else None, None,
                    run.array_ref(fmt.sketch_array("weight")) if with_weight else None,
                    run.chunk_width(fmt.sketch_array("grad" if with_grad else "weight")))
        return (run.array_ref(fmt.signbits_array("grad")), run.array_ref(fmt.nonzero_array("grad")), None,
                8 * run.chunk_width(fmt.signbits_array("grad")))

    def _space_spec(self, space: str, reqs: list[rq.Request]) -> tuple[SpaceSpec, int]:
        """The slab tasks' spec of one column space (row pools, arrays, block ops) and its chunk width."""
        grows = np.unique(np.array([r for q in reqs for r in q.grad_rows], dtype=np.int64))
        wrows = np.unique(np.array([r for q in reqs for r in q.weight_rows], dtype=np.int64))
        ops = tuple(q.op(grows, wrows) for q in reqs)
        g, gz, w, chunk = self._space_arrays(space, len(grows) > 0, len(wrows) > 0)
        spec = SpaceSpec(space, g, gz, w, grows, wrows, ops, len(self.group.indices) if self.per_tensor else 0)
        return spec, chunk

    def _plan_space(self, space: str, reqs: list[rq.Request]) -> _SpacePlan:
        """How one column space is read: its slabs, and one slab task spec or (row-wise ops
        over more rows than one chunk-wide slab holds) one per row block."""
        spec, chunk = self._space_spec(space, reqs)
        n_rows = len(spec.grad_rows) + len(spec.weight_rows)
        col_bytes = 2.0 if space == "bits" else 4.0
        refs = [v for s, v in self.refs if s == space]
        # Row-wise requests (pairs of rows, rows against a reference) need no two rows together
        # beyond their own pairs: when all the rows of one chunk-wide slab exceed SLAB_BYTES,
        # the slabs stay one chunk wide and the rows are cut into blocks, one task each,
        # instead of cutting the chunk (which decodes every chunk 2, 4, ... times).
        row_wise = all(isinstance(op, ROW_WISE) for op in spec.ops)
        slabs = self._slabs(space, n_rows, chunk, col_bytes, whole_chunks=row_wise)
        plan = _SpacePlan(space, [spec], slabs, refs)
        widest = max((sum(hi - lo for _, lo, hi in pieces) for pieces in slabs), default=0)
        max_rows = int(SLAB_BYTES // max(1.0, widest * col_bytes))
        if row_wise and widest and n_rows > max_rows:
            plan.specs, plan.ref_spec = row_blocks(spec, max(1, max_rows), len(refs))
            plan.blocked = True
        return plan

    def _partial_bytes(self) -> int:
        """Bytes of one slab's partial results (the Gram matrices dominate for large T)."""
        n = sum(q.result_size() for q in self.requests)
        return 8 * n * (len(self.group.indices) if self.per_tensor else 1)

    # -- the graph --------------------------------------------------------------------------
    def graph(self):
        """The dask Delayed object whose value is ``{key: float64 array}``, and bytes read."""
        parts, nbytes = [], 0
        for space in SPACES:
            reqs = [q for q in self.requests if q.space == space]
            if reqs:
                nbytes = _slab_tasks(self._plan_space(space, reqs), parts, nbytes)
        if not parts:
            raise ValueError("nothing to compute: the pass has no requests")
        # tree reduction: up to 8 partial results per node, fewer when partials are big (T x T)
        return _reduce(parts, int(max(2, min(8, SLAB_BYTES // max(1, self._partial_bytes()))))), int(nbytes)

    def compute(self, *, progress: bool | None = None, scheduler=None) -> dict[str, np.ndarray]:
        """Run the pass and return ``{key: float64 array}``.

        Args:
            progress: show a progress bar (dask's ``ProgressBar`` on local schedulers,
                ``distributed.progress`` on a client). ``None``: only for passes reading more
                than 4 GiB, when stderr is a terminal.
            scheduler: any dask ``scheduler=`` value; ``None`` uses the active
                ``dask.distributed`` client if there is one, else the threaded scheduler.
        """
        obj, nbytes = self.graph()
        if progress is None:
            progress = nbytes > AUTO_PROGRESS_BYTES and sys.stderr.isatty()
        try:
            return compute(obj, progress=progress, scheduler=scheduler)
        except fmt.DamagedStoreError as err:  # a slab hit a damaged chunk: name its steps
            raise err.with_steps(self.run.path, self.run.steps) from None


# ------------------------------------------------------------------------------ graph pieces


@dataclass
class _SpacePlan:
    """One column space's part of a pass: the slabs (tuples of pieces), the slab task specs
    (one, or one per row block), the explicit reference vectors over the space, and the spec
    that forms references made of store rows once per slab for the row blocks (or None)."""

    space: str
    specs: list[SpaceSpec]
    slabs: list
    refs: list
    ref_spec: SpaceSpec | None = None
    blocked: bool = False


def _merge_adjacent(pieces: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Pieces ``(segment, lo, hi)`` with adjacent ones joined, all as segment 0."""
    merged: list[tuple[int, int, int]] = []
    for _, lo, hi in pieces:
        if merged and merged[-1][2] == lo:
            merged[-1] = (0, merged[-1][1], hi)
        else:
            merged.append((0, lo, hi))
    return merged


def _slab_refs(refs: list, pieces) -> tuple:
    """The slab's slices of the explicit reference vectors, float64."""
    return tuple(np.concatenate([np.asarray(r[lo:hi], dtype=np.float64) for _, lo, hi in pieces]) for r in refs)


def _slab_tasks(plan: _SpacePlan, parts: list, nbytes: float) -> float:
    """Append one Delayed per slab of ``plan`` to ``parts``; returns ``nbytes`` plus the bytes
    those tasks read."""
    import dask
    from dask.base import tokenize

    # The spec travels inside every slab task (a few KB of row indices), not as one shared
    # key: a shared dependency made the distributed scheduler pile slab tasks onto the worker
    # that held it.
    tasks = [functools.partial(_slab_task, s) for s in plan.specs]
    # row blocks: keys from tokens computed once per block and once per slab (hashing the
    # slab's reference slices again for each of its blocks would cost more than a read)
    tokens = ([tokenize(s) for s in plan.specs], tokenize(plan.ref_spec) if plan.ref_spec is not None else None)
    row_bytes = 0.25 if plan.space == "bits" else 4
    for pieces in plan.slabs:
        slab_refs = _slab_refs(plan.refs, pieces)
        width = sum(hi - lo for _, lo, hi in pieces)
        for s in plan.specs:
            nbytes += width * (len(s.grad_rows) * row_bytes + 4 * len(s.weight_rows))
        if not plan.blocked:
            parts.append(dask.delayed(tasks[0], pure=True)(pieces, slab_refs))
            continue
        parts.append(_blocked_slab(plan, tasks, tokens, pieces, slab_refs))
        if plan.ref_spec is not None:
            nbytes += width * 4 * len(plan.ref_spec.weight_rows)
    return nbytes


def _blocked_slab(plan: _SpacePlan, tasks: list, tokens: tuple, pieces, slab_refs):
    """One slab cut into row blocks: a task per block, and one that puts their results
    together (``_gather``), so the reduction over slabs is the unblocked one."""
    import dask
    from dask.base import tokenize

    block_tokens, ref_token = tokens
    slab_token = tokenize(pieces, slab_refs)
    block_refs = slab_refs
    if plan.ref_spec is not None:  # formed once per slab, for all its blocks
        block_refs = dask.delayed(ref_vectors, pure=True)(
            plan.ref_spec, pieces, slab_refs, SLAB_BYTES, dask_key_name=f"_ref_vectors-{tokenize(ref_token, slab_token)}")
    blocks = [dask.delayed(task, pure=True)(pieces, block_refs, dask_key_name=f"_slab_task-{tokenize(bt, slab_token)}")
              for task, bt in zip(tasks, block_tokens)]
    return dask.delayed(_gather, pure=True)(*blocks)


def _reduce(parts: list, fan: int):
    """Tree reduction of the slabs' partial results, ``fan`` per node."""
    import dask

    while len(parts) > 1:
        parts = [dask.delayed(_combine, pure=True)(*parts[i: i + fan]) for i in range(0, len(parts), fan)]
    return parts[0]


def _slab_task(spec: SpaceSpec, pieces, refs) -> dict:
    """Read one slab and return every op's partial result (dict key -> float64 array)."""
    data = SlabData(spec, pieces, refs)
    return {op.key: _op_result(op, spec, data, pieces) for op in spec.ops}


def _op_result(op, spec: SpaceSpec, data: SlabData, pieces):
    """One op's partial result on the slab: over all its columns, or one per segment (tensor);
    a row block's op gives ``(positions in the whole result, its length, its items' values)``."""
    if spec.n_seg:
        res = np.zeros((spec.n_seg,) + op.shape())
        col = 0
        for seg, lo, hi in pieces:
            res[seg] += op.partial(data, col, col + hi - lo)
            col += hi - lo
    else:
        res = op.partial(data, 0, sum(hi - lo for _, lo, hi in pieces))
    return res if getattr(op, "out", None) is None else (op.out, op.n_out, res)


def _gather(*blocks: dict) -> dict:
    """The row blocks of one slab put together: each item's partial result comes from exactly
    one block, so the whole result equals an unblocked slab task's, bit for bit."""
    out: dict = {}
    for blk in blocks:
        for k, (idx, n, res) in blk.items():
            if k not in out:
                out[k] = np.zeros(res.shape[:-1] + (n,))
            out[k][..., idx] = res
    return out


def _combine(*parts: dict) -> dict:
    out: dict = {}
    for p in parts:  # keys of different column spaces come from different slabs
        for k, v in p.items():
            if k in out:
                out[k] += v
            else:
                out[k] = v.copy()
    return out


def _client():
    try:
        from distributed import default_client
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return default_client()
    except ValueError:
        return None


def compute(obj, *, progress: bool = False, scheduler=None):
    """Compute a dask object on the chosen scheduler (see :meth:`Pass.compute`)."""
    import dask

    from analysis.slabs import release_buffers

    client = _client() if scheduler is None else None
    if client is not None:
        fut = client.compute(obj)
        if progress:
            from distributed import progress as dprogress

            dprogress(fut)
        try:
            return fut.result()
        finally:  # the workers' slab buffers (analysis.slabs) live until the pass ends
            client.run(release_buffers)
    local_threads = scheduler in (None, "threads", "threading")
    try:
        with _blas_single_thread(local_threads), _progress_bar(progress):
            return dask.compute(obj, scheduler=scheduler)[0]
    finally:
        release_buffers()


@contextlib.contextmanager
def _progress_bar(on: bool):
    if not on:
        yield
        return
    from dask.diagnostics import ProgressBar

    with ProgressBar():
        yield


@contextlib.contextmanager
def _blas_single_thread(on: bool):
    """One BLAS thread per dask thread under the threaded scheduler (no oversubscription)."""
    if not on or (os.cpu_count() or 1) < 2:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield

