"""Device-side encoding of a recorded step: what the writer stores, computed where the tensors live.

Every function here takes flat float32 torch tensors (length d, the parameter table's
flattening order) on any device and returns torch tensors on that same device, without a
host synchronisation (no ``.item()``, no data-dependent shapes). The same code runs on CPU
tensors, which is how the tests prove it against the numpy definitions in
:mod:`gradtrace_format.format` and :mod:`capture.writer`. What the recorder then copies to the host,
per entry of the flat vector:

=================  ===========================================  ==================================
tier               device result                                shipped per entry
=================  ===========================================  ==================================
(every tier)       :class:`ScalarReducer`: (3, n_tensors) f64   24 bytes per *tensor*
lossless           the float32 vector itself                     4 bytes
rounded:7          :func:`to_bf16_bits`: int16 (bf16 bits)       2 bytes
rounded:k, k < 7   :func:`round_upper16`: int16                  2 bytes
rounded:k, k > 7   :func:`bitround`: float32                     4 bytes
sketch:K           :class:`DeviceSketcher`: (plan.dim,) f32       4 bytes per *bucket*
                   :func:`sign_planes`: (2, ceil(d/8)) uint8     2 bits
=================  ===========================================  ==================================

Exactness against today's CPU writer (``StoreWriter.append``), each tested in
``tests/test_capture_encode.py``:

* :func:`bitround`: bit for bit for every float32 bit pattern (NaN payloads included).
* :func:`to_bf16_bits` (the bfloat16 cast, keepbits 7) and :func:`round_upper16` (integer
  ops, keepbits 1..7), widened on the host by :func:`gradtrace_format.format.widen_bf16`: bit for bit
  for every non-NaN pattern (finite, +-Inf, -0.0, subnormals, ties, values that round up to
  Inf). A NaN stays a NaN, but 2 bytes cannot hold a float32 NaN's low 16 payload bits,
  which ``format.bitround`` keeps: :func:`round_upper16` keeps the NaN's sign and upper 16
  bits (quiet bit set), so the NaNs CPUs make (``0xFFC00000``, ``0x7FC00000``) come back
  identical; the cast returns its own canonical NaN (CPU ``0xFFFF``, CUDA ``0x7FFF``).
* :class:`ScalarReducer`: float64 sums of the exact float64 products of the float32 entries,
  as the writer's; only the order of the additions differs. For a tensor of n entries both
  results lie within ``(n - 1) * 2**-53 * sum_i |term_i|`` of the exact sum (the bound of
  any summation order), so they differ by at most twice that; typically ~``sqrt(n) * 2**-53``
  relative. NaN/Inf propagate identically (finite float32 products cannot overflow a float64
  sum, so non-finiteness does not depend on the order).
* :class:`DeviceSketcher`: on CPU the float64 bucket sums are added in the order
  ``np.bincount`` adds them, so the float32 sketch is bit for bit today's (tested). On CUDA
  ``index_add_`` adds with float64 atomics in an unspecified order: each float64 bucket sum is
  within ``(m - 1) * 2**-53 * sum |terms|`` of the exact one (m = entries in the bucket), and
  the stored float32 differs from the CPU one only where that float64 value sits within this
  distance of a float32 rounding boundary (then by one float32 ulp). Exactly copied tensors are
  bit for bit on every device (including ``-0.0``).
* :func:`sign_planes` / :func:`pack_signs`: bit for bit (integer ops on the bit pattern: no
  flush-to-zero effect on subnormals).

Signed-integer arithmetic is arranged so that no int32 operation overflows (NaN patterns are
clamped before the rounding add); only :func:`sign_planes` relies on int64 multiplication
wrapping modulo 2**64, which it does on CPU and CUDA.

Cost on a GPU. Each function is a handful of eager
elementwise kernels, so its price is device-memory traffic, counted from the kernels, per
entry of the flat vector: :func:`to_bf16_bits` 6 bytes (one cast); :class:`ScalarReducer`
~40 bytes for g and w together (two float32 -> float64 casts, one batched GEMM);
:class:`DeviceSketcher` ~50 bytes plus one float64 atomic add; :func:`sign_planes` ~30
bytes; :func:`bitround` and :func:`round_upper16` ~120 bytes (13 integer passes). At an
effective 4 TB/s, 10M entries cost 0.1 ms per 40 bytes. A fused kernel (Triton or
``torch.compile``) would bring each to its read-once floor (4-8 bytes); that is the next
step if ``benchmarks/device/`` shows these passes in the step time.

``python -m capture.encode`` prints the CPU time per entry of each function (one torch thread),
as a sanity check of the CPU path; measured figures belong in the README.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradtrace_format import format as fmt

_ABS = 0x7FFFFFFF  # int32 mask of everything but the sign bit
_EXP = 0x7F800000  # bit pattern of +Inf (smallest |pattern| that is not finite)
_QUIET = 0x00400000  # quiet-NaN bit (top mantissa bit)
DEFAULT_CHUNK = 1 << 22  # entries per float64 working buffer (16 bytes each for the scalars, 8 for a sketch)
#: The DeviceEncoder's chunk on CUDA: each chunk costs ~10 kernel launches from record()'s
#: thread (~5 us each), so 185M parameters take 11 chunks (256 + 128 MB of working buffers)
#: instead of 44 (64 + 32 MB). The chunk changes no result: blocks and addition order do not
#: depend on it.
CUDA_CHUNK = 1 << 24
DEFAULT_BLOCK = 1 << 11  # entries per Gram block of the scalars


def _flat32(x: torch.Tensor, what: str = "x") -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise ValueError(f"{what} has dtype {x.dtype}; pass the flat float32 vector (x.to(torch.float32))")
    if x.dim() != 1:
        raise ValueError(f"{what} has shape {tuple(x.shape)}; pass the flat vector (x.reshape(-1))")
    return x.contiguous()


# --------------------------------------------------------------------------------------
# Per-tensor scalars
# --------------------------------------------------------------------------------------


class ScalarReducer:
    """Per-tensor ``||g||^2``, ``||w||^2``, ``<g, w>`` of flat vectors, in float64, on the device.

    The flat vector is cut into blocks of ``block`` entries. Per block of ``chunk`` entries,
    g and w are cast into one float64 buffer of shape (blocks, 2, block), and one batched
    matrix product ``X @ X^T`` gives every block's 2 x 2 Gram matrix (``sum g^2``,
    ``sum g w``, ``sum w^2``): the float64 products are never stored, so the device reads
    about 40 bytes per entry (two casts, one GEMM) instead of ~120 for casts, three product
    vectors and a reduction. Blocks that hold a tensor boundary are summed again piece by
    piece from a gathered copy of their entries (at most ``n_tensors x block`` entries, one
    ``segment_reduce``); a final ``segment_reduce`` adds each tensor's blocks and pieces in
    flat order. About 20 kernel launches per call for a model under ``chunk`` entries,
    whatever the number of tensors; deterministic on a given device; no host sync.

    Args:
        offsets, sizes: the parameter table (``TensorInfo.offset``/``.size``); tensors must
            tile ``[0, d)`` in order, as :func:`gradtrace_format.format.tensor_table` builds them.
        device: where the vectors will live.
        chunk: entries per float64 working buffer (16 bytes x chunk of device memory).
        block: entries per Gram block (a power of two dividing ``chunk``).

    Calling it with ``(g, w)`` returns a float64 tensor of shape (3, n_tensors) on the
    device: rows ``gg, ww, gw`` as ``capture.writer.tensor_scalars`` returns them (size-0
    tensors 0; with ``g=None``, the final iterate, rows gg and gw are NaN). Products are exact
    (float32 x float32 fits float64); only the order of the float64 additions differs from the
    writer's: see the module docstring for the bound. One call at a time per instance (the
    working buffer is reused).
    """

    def __init__(self, offsets: Sequence[int], sizes: Sequence[int], device="cpu", *,
                 chunk: int = DEFAULT_CHUNK, block: int = DEFAULT_BLOCK):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1)
        sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
        if offsets.shape != sizes.shape or len(sizes) == 0:
            raise ValueError(f"offsets ({len(offsets)}) and sizes ({len(sizes)}) must be equally long and non-empty")
        if (sizes < 0).any() or offsets[0] != 0 or (offsets[1:] != offsets[:-1] + sizes[:-1]).any():
            raise ValueError("the tensors must tile the flat vector in order (offset[i+1] = offset[i] + size[i], "
                             "offset[0] = 0): build them with gradtrace_format.format.tensor_table")
        P, chunk = int(block), int(chunk)
        if P < 1 or P & (P - 1) or chunk < P or chunk % P:
            raise ValueError(f"block={P} must be a power of two dividing chunk={chunk}")
        self.device = torch.device(device)
        self.n = len(sizes)
        self.d = d = int(sizes.sum())
        self.block, self.chunk = P, chunk
        self.n_blocks = nb = -(-d // P)
        dev = {"device": self.device}

        def owner(pos):  # tensor holding flat position pos (empty tensors hold none)
            return np.searchsorted(offsets, pos, side="right") - 1

        starts = offsets[(sizes > 0) & (offsets % P != 0)]  # tensor starts strictly inside a block
        cut_blocks = np.unique(starts // P)
        clean = np.setdiff1d(np.arange(nb, dtype=np.int64), cut_blocks)
        # pieces of the cut blocks: [block start, tensor starts inside..., block end)
        cuts = np.union1d(np.concatenate([cut_blocks * P, np.minimum((cut_blocks + 1) * P, d)]), starts)
        p_start = cuts[:-1]
        p_len = np.diff(cuts)
        keep = np.isin(p_start // P, cut_blocks) & (p_len > 0)  # drop the gaps between cut blocks
        p_start, p_len = p_start[keep], p_len[keep]
        gather = (np.concatenate([np.arange(a, a + n) for a, n in zip(p_start, p_len)])
                  if len(p_start) else np.zeros(0, np.int64))
        # every partial sum (clean blocks, then pieces) in flat order, grouped by tensor
        key = np.concatenate([clean * P, p_start])
        own = owner(key)
        order = np.argsort(key, kind="stable")
        self._clean = torch.as_tensor(clean, **dev)
        self._gather = torch.as_tensor(gather, **dev)
        self._p_len3 = torch.as_tensor(np.tile(p_len, 3), **dev)
        self._order = torch.as_tensor(order, **dev)
        self._per_tensor3 = torch.as_tensor(np.tile(np.bincount(own, minlength=self.n), 3).astype(np.int64), **dev)
        self._rows = torch.as_tensor([0, 3, 1], **dev)  # gg, ww, gw in a flattened 2 x 2 Gram
        # the working buffer, made once here and reused by every call (CPU pages, CUDA pool)
        self._buf = torch.empty(min(self.chunk // P, nb), 2, P, dtype=torch.float64, device=self.device)

    def _blocks_gram(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """(n_blocks, 2, 2) float64 Gram matrices of the blocks (zero padded at the end)."""
        P = self.block
        gram = torch.empty(self.n_blocks, 2, 2, dtype=torch.float64, device=self.device)
        for a in range(0, self.d, self.chunk):
            b = min(a + self.chunk, self.d)
            m = b - a
            full, rest = divmod(m, P)
            X = self._buf[: full + (rest > 0)]
            for r, v in ((0, g), (1, w)):
                if full:
                    X[:full, r].copy_(v[a : a + full * P].view(full, P))  # float32 -> float64: exact
                if rest:
                    X[full, r, :rest].copy_(v[a + full * P : b])
                    X[full, r, rest:].zero_()
            torch.bmm(X, X.transpose(1, 2), out=gram[a // P : a // P + X.shape[0]])
        return gram

    def __call__(self, g: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
        w = _flat32(w, "w")
        has_g = g is not None
        g = _flat32(g, "g") if has_g else w
        if w.shape[0] != self.d or g.shape[0] != self.d:
            raise ValueError(f"g/w have {g.shape[0]}/{w.shape[0]} entries, the parameter table {self.d}")
        f64 = {"dtype": torch.float64, "device": self.device}
        if self.d == 0:
            out = torch.zeros(3, self.n, **f64)
        else:
            parts = []
            if len(self._clean):
                gram = self._blocks_gram(g, w).view(self.n_blocks, 4)
                parts.append(gram.index_select(0, self._clean).index_select(1, self._rows).t())  # (3, n_clean)
            if len(self._gather):
                gs = g.index_select(0, self._gather).to(torch.float64)
                ws = w.index_select(0, self._gather).to(torch.float64)
                prod = torch.cat([gs * gs, ws * ws, gs * ws])
                # unsafe=True skips the lengths check (two .item() calls: a device sync); the
                # lengths were checked against the table when the plan was built
                parts.append(torch.segment_reduce(prod, "sum", lengths=self._p_len3, unsafe=True).view(3, -1))
            parts = torch.cat(parts, dim=1).index_select(1, self._order)
            out = torch.segment_reduce(parts.reshape(-1), "sum", lengths=self._per_tensor3, unsafe=True)
            out = out.view(3, self.n)
        if not has_g:
            out[0] = float("nan")
            out[2] = float("nan")
        return out


@functools.lru_cache(maxsize=16)
def _reducer(offsets: tuple, sizes: tuple, device: torch.device) -> ScalarReducer:
    return ScalarReducer(offsets, sizes, device)


def tensor_scalars(g: torch.Tensor | None, w: torch.Tensor, offsets: Sequence[int], sizes: Sequence[int]
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor and total ``||g||^2``, ``||w||^2``, ``<g, w>`` in float64, on ``w``'s device.

    A cached :class:`ScalarReducer` per (table, device). No host synchronisation.

    Args:
        g: flat float32 gradient (d,), or None (final iterate: gg and gw NaN).
        w: flat float32 weights (d,), same device.
        offsets, sizes: the parameter table.

    Returns:
        ``(per_tensor, totals)``: float64 tensors of shape (3, n_tensors) (rows gg, ww, gw) and
        (3,) (their sums over tensors). Ship ``per_tensor`` (24 bytes per tensor) and form the
        stored totals on the host as the writer does (``float(gg.sum())`` in numpy): the
        device's ``totals`` add the same values in another order (equal to float64 rounding).
    """
    per = _reducer(tuple(int(o) for o in offsets), tuple(int(s) for s in sizes), torch.device(w.device))(g, w)
    return per, per.sum(dim=1)


# --------------------------------------------------------------------------------------
# Rounded tiers
# --------------------------------------------------------------------------------------


def _round_bits(x: torch.Tensor, keepbits: int, nan_or: int = 0) -> torch.Tensor:
    """x's int32 bit pattern rounded to nearest-even at ``keepbits`` mantissa bits, as
    ``format.bitround`` computes it on uint32; NaN entries keep their pattern OR ``nan_or``.

    Twelve elementwise integer ops and no ``torch.where``/``isnan`` (each of those costs
    more than the whole rest on CPU); nothing overflows int32."""
    drop = 23 - int(keepbits)
    bits = x.view(torch.int32)
    t = torch.bitwise_right_shift(bits, drop)
    t.bitwise_and_(1)
    t.add_((1 << (drop - 1)) - 1)  # lsb + half - 1: ties go to the even neighbour
    # |NaN| patterns are clamped to +Inf's so that the add cannot overflow int32 (the sign
    # bit never takes part: a carry out of the magnitude stops at the exponent's top)
    r = torch.clamp(bits, max=_EXP)
    r.add_(t)
    r.bitwise_and_(-(1 << drop))  # int32 two's complement of ~((1 << drop) - 1)
    # NaN mask without a bool tensor: _EXP - |bits| < 0 exactly for NaN, and the arithmetic
    # shift spreads its sign over the word (no overflow: |bits| <= 0x7FFFFFFF)
    m = torch.bitwise_and(bits, _ABS, out=t)
    m.neg_().add_(_EXP)
    m = torch.bitwise_right_shift(m, 31, out=m)
    keep = bits | nan_or if nan_or else bits
    keep = torch.bitwise_xor(keep, r)
    keep.bitwise_and_(m)
    return r.bitwise_xor_(keep)  # r where m == 0, bits | nan_or where m == -1


def bitround(x: torch.Tensor, keepbits: int) -> torch.Tensor:
    """The ``rounded`` tier on the device: bit for bit ``gradtrace_format.format.bitround(x, keepbits)``.

    Round-to-nearest-even of the float32 mantissa to ``keepbits`` bits by integer ops on the
    bit pattern; signs, zeros and +-Inf exact, NaN returned as it was (payload included),
    finite values that round past the largest float become +-Inf (as in numpy's version).

    Args:
        x: flat float32 tensor (d,), any device.
        keepbits: 1..23 (23: a copy).

    Returns:
        float32 tensor (d,) on x's device: 4 bytes per entry to ship. For ``keepbits <= 7``
        ship :func:`encode_rounded`'s 2 bytes instead (the same values but for NaN payloads).
    """
    x = _flat32(x)
    if not 1 <= int(keepbits) <= 23:
        raise ValueError(f"keepbits={keepbits} is out of range: the rounded tier keeps 1..23 mantissa bits")
    if keepbits >= 23:
        return x.clone()
    return _round_bits(x, keepbits).view(torch.float32)


def round_upper16(x: torch.Tensor, keepbits: int = 7) -> torch.Tensor:
    """The ``rounded`` tier for ``keepbits <= 7`` in 2 bytes: the upper half of the rounded bits.

    For keepbits <= 7 rounding clears the low 16 bits, so the upper 16 bits hold the whole
    value; for keepbits == 7 they are the bfloat16 round-to-nearest-even of x (what
    :func:`to_bf16_bits` gets from one cast, but for NaNs: here a NaN keeps its sign and upper
    bits). ``gradtrace_format.format.widen_bf16`` turns them back into float32 on the host.

    Args:
        x: flat float32 tensor (d,), any device.
        keepbits: 1..7.

    Returns:
        int16 tensor (d,) on x's device (view it as ``np.uint16`` on the host, or as
        ``torch.bfloat16`` when keepbits == 7): 2 bytes per entry. Widened, it equals
        ``format.bitround(x, keepbits)`` bit for bit except NaN payloads: a NaN keeps its sign
        and upper 16 bits with the quiet bit set, its low 16 bits are dropped.
    """
    x = _flat32(x)
    if not 1 <= int(keepbits) <= 7:
        raise ValueError(f"keepbits={keepbits}: round_upper16 holds 1..7 mantissa bits; use bitround for more")
    r = _round_bits(x, keepbits, nan_or=_QUIET)
    return torch.bitwise_right_shift(r, 16, out=r).to(torch.int16)


def to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """``rounded:7`` in 2 bytes per entry: the bfloat16 cast, one elementwise pass.

    For every non-NaN float32 (finite, +-Inf, -0.0, subnormals, ties, values that round past
    the largest bfloat16 to Inf) the cast's bits are those of ``round_upper16(x, 7)``, so the
    widened row is ``format.bitround(x, 7)`` bit for bit (tested on every upper half with
    several lower halves). A NaN comes back as a NaN whose sign and payload are the cast's own
    (CPU ``0xFFFF``, CUDA ``0x7FFF``): use :func:`round_upper16` when its sign and upper bits
    must survive (13 integer passes instead of one).

    Returns:
        int16 tensor (d,) on x's device (bfloat16 bit patterns; ``.view(torch.bfloat16)``).
    """
    return _flat32(x).to(torch.bfloat16).view(torch.int16)


def encode_rounded(x: torch.Tensor, keepbits: int) -> torch.Tensor:
    """What to ship for the ``rounded`` tier: int16 (2 bytes/entry) when ``keepbits <= 7``
    (:func:`to_bf16_bits` for 7, :func:`round_upper16` below), else float32 (4 bytes/entry,
    :func:`bitround`). The host turns it into the stored float32 row with
    :func:`decode_rounded`: bit for bit ``format.bitround(x, keepbits)`` but NaN payloads
    when 2 bytes are shipped (a NaN stays a NaN)."""
    keepbits = int(keepbits)
    if keepbits == 7:
        return to_bf16_bits(x)
    return round_upper16(x, keepbits) if keepbits < 7 else bitround(x, keepbits)


def decode_rounded(row: np.ndarray) -> np.ndarray:
    """Host side of :func:`encode_rounded` (numpy only): the float32 row the store holds."""
    row = np.asarray(row)
    if row.dtype.itemsize == 2:
        return fmt.widen_bf16(row)
    return np.ascontiguousarray(row, dtype=np.float32)


# --------------------------------------------------------------------------------------
# Sketch tier
# --------------------------------------------------------------------------------------


class DeviceSketcher:
    """The CountSketch of a :class:`gradtrace_format.format.SketchPlan`, computed on the device.

    Holds, on ``device``, each entry's destination bucket (int32, ``plan.offsets[t] +
    bucket``, from :func:`gradtrace_format.format.sketch_hashes`) and sign (int8): 5 bytes per
    parameter, built once. A call adds ``x_i * s_i`` in float64 into its bucket with one
    ``index_add_`` per block of ``chunk`` entries (the order in which ``np.bincount`` adds on
    CPU), casts to float32 as the writer does, and copies exactly stored tensors' entries
    straight from x (so ``-0.0`` stays ``-0.0``).

    Args:
        tensors: the parameter table.
        plan: the sketch plan (``format.sketch_plan(tensors, k, seed)``); a plan shared by
            grad and weight can share one DeviceSketcher.
        device: where the vectors will live.
        chunk: entries per float64 working block (8 bytes x chunk of device memory).
        subset: indices of the tensors that x holds, in x's order (default: all, in table
            order). For parameters spread over devices: one DeviceSketcher per device, each
            over its own tensors; the host puts each output at ``bucket_index``.

    Calling it with x (flat float32, the subset's tensors concatenated) returns the float32
    sketch of those tensors, shape (dim,), on the device: 4 bytes per bucket to ship. With
    the default subset it is the whole sketch, ``plan.dim`` buckets, what ``StoreWriter``
    stores as ``{a}_sketch`` (bit for bit on CPU; on CUDA see the module docstring for the
    bound); otherwise the buckets of the subset's tensors, which go to ``row[bucket_index]``
    of the stored row.

    Attributes:
        dim: buckets in the output.
        bucket_index: int64 numpy array (dim,): position of each output bucket in the
            stored sketch row (``arange(plan.dim)`` for the default subset).
    """

    def __init__(self, tensors: Sequence[fmt.TensorInfo], plan: fmt.SketchPlan, device="cpu", *,
                 chunk: int = DEFAULT_CHUNK, subset: Sequence[int] | None = None):
        tensors = list(tensors)
        if len(tensors) != len(plan.sizes):
            raise ValueError(f"the plan has {len(plan.sizes)} tensors, the table {len(tensors)}: "
                             "build the plan with format.sketch_plan(tensors, k, seed)")
        subset = list(range(len(tensors))) if subset is None else [int(i) for i in subset]
        if len(set(subset)) != len(subset) or any(not 0 <= i < len(tensors) for i in subset):
            raise ValueError(f"subset must list distinct tensor indices in [0, {len(tensors)}), got {subset[:8]}")
        self.device = torch.device(device)
        self.plan = plan
        self.d = sum(tensors[i].size for i in subset)
        self.dim = sum(plan.sizes[i] for i in subset)
        if self.dim >= 2**31:
            raise ValueError(f"a sketch of {self.dim} buckets does not fit int32 indices; use fewer buckets")
        self.chunk = int(chunk)
        self.bucket_index = (np.concatenate([np.arange(plan.offsets[i], plan.offsets[i] + plan.sizes[i])
                                             for i in subset]) if subset else np.zeros(0, np.int64))
        dest = np.empty(self.d, dtype=np.int32)
        sign = np.ones(self.d, dtype=np.int8)
        src_exact, dst_exact = [], []
        off = o = 0  # where tensor i starts in x, and its buckets in the output
        for i in subset:
            k, n = plan.sizes[i], tensors[i].size
            if plan.exact[i]:
                dest[off : off + n] = o + np.arange(n)
                src_exact.append(np.arange(off, off + n))
                dst_exact.append(np.arange(o, o + n))
            else:
                bucket, s = fmt.sketch_hashes(plan, i, n)
                dest[off : off + n] = o + bucket
                sign[off : off + n] = s.astype(np.int8)
            off += n
            o += k
        self.dest = torch.as_tensor(dest, device=self.device)
        self.sign = torch.as_tensor(sign, device=self.device)
        src = np.concatenate(src_exact) if src_exact else np.zeros(0, np.int64)
        self._exact = None
        if len(src):
            self._exact = (torch.as_tensor(src, device=self.device),
                           torch.as_tensor(np.concatenate(dst_exact), device=self.device))
        # the working block, made once here (CUDA: with the Recorder, not in its first record())
        self._buf = torch.empty(min(self.chunk, max(self.d, 1)), dtype=torch.float64, device=self.device)

    def _sums(self, x: torch.Tensor) -> torch.Tensor:
        """float64 (plan.dim,): every entry times its sign added into its bucket (exact
        tensors' buckets then hold 0.0 + x_i, which turns -0.0 into +0.0: callers overwrite)."""
        if x.shape[0] != self.d:
            raise ValueError(f"x has {x.shape[0]} entries, the parameter table {self.d}")
        out = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for a in range(0, self.d, self.chunk):
            b = min(a + self.chunk, self.d)
            xb = self._buf[: b - a]
            xb.copy_(x[a:b])
            xb.mul_(self.sign[a:b])  # exact: a sign flip
            out.index_add_(0, self.dest[a:b], xb)
        return out

    def sketch64(self, x: torch.Tensor) -> torch.Tensor:
        """The float64 sketch (plan.dim,) on the device, before the float32 cast: the
        writer's ``Sketcher(x)`` (exact tensors' buckets hold their entries)."""
        x = _flat32(x)
        out = self._sums(x)
        if self._exact is not None:
            src, dst = self._exact
            out.index_copy_(0, dst, x.index_select(0, src).to(torch.float64))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = _flat32(x)
        out = self._sums(x).to(torch.float32)
        if self._exact is not None:
            src, dst = self._exact
            out.index_copy_(0, dst, x.index_select(0, src))
        return out


# --------------------------------------------------------------------------------------
# Sign and nonzero bit planes
# --------------------------------------------------------------------------------------

# Gathers the low bit of each of the 8 bytes of an int64 into its top byte, byte j (memory
# order, little endian) to bit 7 - j: the product's terms b_j * 2**(8 j + 9 k) land on
# distinct bits, and those with j + k = 7 fill bits 56..63. As int64 (two's complement).
_GATHER = 0x8040201008040201 - (1 << 64)


def sign_planes(x: torch.Tensor) -> torch.Tensor:
    """Packed sign and nonzero bits of a flat vector, on the device.

    Returns:
        uint8 tensor of shape (2, ceil(d / 8)) on x's device: row 0 ``np.packbits(x < 0)``
        (``-0.0`` counts as not negative, a NaN with the sign bit set as negative), row 1
        ``np.packbits(x != 0)`` (NaN is nonzero), big-endian bit order, last byte zero padded;
        bit for bit ``gradtrace_format.format.pack_signs(x)``. 2 bits per entry to ship (one copy).
    """
    x = _flat32(x)
    d = x.shape[0]
    nb = (d + 7) // 8
    if nb == 0:
        return torch.zeros(2, 0, dtype=torch.uint8, device=x.device)
    buf = torch.empty(2, nb * 8, dtype=torch.uint8, device=x.device)
    if nb * 8 > d:
        buf[:, d:] = 0
    planes = buf.view(torch.bool)
    bits = x.view(torch.int32)
    torch.ne(bits & _ABS, 0, out=planes[1, :d])  # integer test: subnormals count even under DAZ
    torch.lt(bits, 0, out=planes[0, :d])
    planes[0, :d].logical_and_(planes[1, :d])
    if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little endian
        weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=x.device)
        return (buf.view(2, nb, 8) * weights).sum(dim=2, dtype=torch.uint8)
    words = buf.view(torch.int64)  # (2, nb): 8 flags per word
    packed = torch.bitwise_right_shift(words * _GATHER, 56)
    return packed.bitwise_and_(0xFF).to(torch.uint8)


def pack_signs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(signbits, nonzero)``: the two rows of :func:`sign_planes` (uint8, ceil(d/8) each),
    bit for bit ``gradtrace_format.format.pack_signs``. Ship :func:`sign_planes`' one tensor instead
    of the two views when copying."""
    planes = sign_planes(x)
    return planes[0], planes[1]


# --------------------------------------------------------------------------------------
# All of a step
# --------------------------------------------------------------------------------------


class DeviceEncoder:
    """Everything the writer stores for one step, computed on the device in one call.

    Args:
        tensors: the parameter table.
        tiers: ``{"grad": Tier, "weight": Tier}`` (strings are parsed).
        device: where the flat vectors live.

    :meth:`encode` returns a dict of device tensors (no host synchronisation), whose names,
    dtypes and shapes :meth:`payload` lists (to allocate pinned host buffers once):

    * ``scalars``: float64 (3, n_tensors), rows gg, ww, gw (gg and gw NaN without a gradient);
    * per array ``a`` in grad, weight: ``lossless`` -> ``a``: the float32 vector (d,) itself;
      ``rounded`` -> ``a``: int16 (d,) for keepbits <= 7 else float32 (d,)
      (:func:`decode_rounded` on the host); ``sketch`` -> ``a_sketch``: float32 (plan.dim,) and
      ``a_bits``: uint8 (2, ceil(d/8)), rows ``a_signbits``, ``a_nonzero``.
    """

    def __init__(self, tensors: Sequence[fmt.TensorInfo], tiers: Mapping, device="cpu"):
        self.tensors = list(tensors)
        self.tiers = {a: fmt.Tier.parse(tiers.get(a, "lossless")) for a in fmt.DATA_ARRAYS}
        self.device = torch.device(device)
        self.d = sum(t.size for t in self.tensors)
        chunk = CUDA_CHUNK if self.device.type == "cuda" else DEFAULT_CHUNK
        self.scalars = ScalarReducer([t.offset for t in self.tensors], [t.size for t in self.tensors], self.device,
                                     chunk=chunk)
        self.sketchers: dict[str, DeviceSketcher] = {}
        shared: dict[tuple, DeviceSketcher] = {}
        for a, tier in self.tiers.items():
            if tier.is_sketch:
                key = (tier.sketch_dim, tier.seed)
                if key not in shared:
                    shared[key] = DeviceSketcher(self.tensors, fmt.sketch_plan(self.tensors, *key), self.device,
                                                 chunk=chunk)
                self.sketchers[a] = shared[key]

    def payload(self, with_grad: bool = True) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
        """Name -> (dtype, shape) of what :meth:`encode` returns."""
        out = {"scalars": (torch.float64, (3, len(self.tensors)))}
        nb = (self.d + 7) // 8
        for a, tier in self.tiers.items():
            if a == "grad" and not with_grad:
                continue
            if tier.is_lossless:
                out[a] = (torch.float32, (self.d,))
            elif tier.rounds:
                out[a] = (torch.int16 if tier.keepbits <= 7 else torch.float32, (self.d,))
            else:
                out[fmt.sketch_array(a)] = (torch.float32, (self.sketchers[a].dim,))
                out[f"{a}_bits"] = (torch.uint8, (2, nb))
        return out

    def encode(self, g: torch.Tensor | None, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The step's device tensors (see the class docstring); ``g=None`` for the final iterate."""
        out = {"scalars": self.scalars(g, w)}
        for a, x in (("grad", g), ("weight", w)):
            if x is None:
                continue
            tier = self.tiers[a]
            if tier.is_lossless:
                out[a] = x
            elif tier.rounds:
                out[a] = encode_rounded(x, tier.keepbits)
            else:
                out[fmt.sketch_array(a)] = self.sketchers[a](x)
                out[f"{a}_bits"] = sign_planes(x)
        return out


def _bench(d: int = 1 << 20, repeat: int = 7) -> dict[str, float]:  # pragma: no cover - timing
    """Median CPU ns per entry of each function (one torch thread; the calling thread's CPU
    time, so that other processes on a shared machine do not count), d entries in 40 tensors."""
    import time

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    sizes = [d // 40] * 39 + [d - 39 * (d // 40)]
    table = fmt.tensor_table([(f"t{i}", (n,)) for i, n in enumerate(sizes)])
    g = torch.randn(d, generator=gen)
    w = torch.randn(d, generator=gen)
    red = ScalarReducer([t.offset for t in table], [t.size for t in table])
    sk = DeviceSketcher(table, fmt.sketch_plan(table, 1 << 14, 0))
    cases = {
        "tensor_scalars (g and w)": lambda: red(g, w),
        "bitround keepbits=10 (float32)": lambda: bitround(g, 10),
        "to_bf16_bits (int16, the cast)": lambda: to_bf16_bits(g),
        "round_upper16 keepbits=7 (int ops)": lambda: round_upper16(g, 7),
        "DeviceSketcher k=16384": lambda: sk(g),
        "sign_planes": lambda: sign_planes(g),
    }
    res = {}
    for name, fn in cases.items():
        fn()
        ts = []
        for _ in range(repeat):
            t0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - t0)
        res[name] = float(np.median(ts)) / d * 1e9
    return res


if __name__ == "__main__":  # pragma: no cover
    for k, v in _bench().items():
        print(f"{k:34s} {v:6.2f} ns/entry")


def writer_rows(host: Mapping[str, np.ndarray], tiers: Mapping) -> tuple[tuple, dict]:
    """``(scalars, encoded)`` for ``StoreWriter.append`` from the host copies of
    :meth:`DeviceEncoder.encode`'s output (numpy arrays under the same names).

    Rounded rows shipped in 2 bytes are widened here (:func:`decode_rounded`); the sign planes
    are split into their two arrays. Arrays absent from ``host`` (the final iterate's
    gradient, weights a weight schedule skipped) are left out.
    """
    sc = np.asarray(host["scalars"], dtype=np.float64)
    encoded: dict[str, dict[str, np.ndarray]] = {}
    for a in fmt.DATA_ARRAYS:
        tier = fmt.Tier.parse(tiers.get(a, "lossless"))
        if tier.is_sketch:
            if fmt.sketch_array(a) not in host:
                continue
            bits = np.asarray(host[f"{a}_bits"])
            encoded[a] = {fmt.sketch_array(a): np.asarray(host[fmt.sketch_array(a)]), fmt.signbits_array(a): bits[0],
                          fmt.nonzero_array(a): bits[1]}
        elif a in host:
            row = np.asarray(host[a])
            encoded[a] = {a: decode_rounded(row) if tier.rounds else row}
    return (sc[0], sc[1], sc[2]), encoded
