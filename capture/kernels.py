"""Compiled encodings of the capture stage: per-tensor scalar sums, bit rounding, CountSketch,
sign planes and Blosc frames.

The writer's per-row work, each a fused sweep over the float32 row: ``tensor_sums`` forms the
per-step, per-tensor scalars (``||G||^2``, ``||w||^2``, ``<G, w>``) in one pass instead of
three einsums; ``bitround_into``, ``sketch_into`` (``sketch2_into`` for gradient and weights
in one sweep) and ``pack_signs_into`` are the rounded and sketch tiers' encodings, each equal
bit for bit to its numpy definition in :mod:`gradtrace_format.format` (``bitround``,
``Sketcher``, ``pack_signs``); ``shuffle_frame_into`` and ``plain_frame_into`` write the
rounded and lossless tiers' chunks as Blosc frames that decode to those values bit for bit.

``tensor_sums`` adds in a compiler-chosen order (``fastmath={"reassoc", "contract"}``), so
its float64 sums can differ from the numpy route in the last bits, as BLAS blocking does;
NaN and Inf propagate. The encodings use no fastmath and add in index order.

numba is optional: when it cannot be imported or ``GRADTRACE_NO_NUMBA=1`` is set, the same
functions run as numpy, slower and with the same results (to rounding for ``tensor_sums``,
bit for bit for the encodings). ``BACKEND`` says which is in use (after the first call). The
first call compiles the kernels unless numba's on-disk cache already holds them.
"""

from __future__ import annotations

import os
import threading

import numpy as np

_FASTMATH = {"reassoc", "contract"}


def _numba():
    if os.environ.get("GRADTRACE_NO_NUMBA", "") not in ("", "0"):
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


# ---------------------------------------------------------------------------- numpy versions


def _tensor_sums_np(g, w, starts, ends, idx, gg, ww, gw, has_g):
    if len(starts) > 1 and np.array_equal(ends[:-1], starts[1:]):
        # a run of adjoining small tensors: one float64 copy and np.add.reduceat (einsum calls
        # per tensor cost more than the arithmetic there)
        lo, hi, rel = starts[0], ends[-1], starts - starts[0]
        w64 = w[lo:hi].astype(np.float64)  # float32 products are exact in float64
        ww[idx] = np.add.reduceat(w64 * w64, rel)
        if has_g:
            g64 = g[lo:hi].astype(np.float64)
            gg[idx] = np.add.reduceat(g64 * g64, rel)
            gw[idx] = np.add.reduceat(g64 * w64, rel)
        return
    for j in range(len(starts)):
        # einsum with dtype=float64 casts in small buffers: float64 products and sums, no
        # d-sized temporaries and no BLAS threads
        ws = w[starts[j]:ends[j]]
        ww[idx[j]] = np.einsum("i,i->", ws, ws, dtype=np.float64)
        if has_g:
            gs = g[starts[j]:ends[j]]
            gg[idx[j]] = np.einsum("i,i->", gs, gs, dtype=np.float64)
            gw[idx[j]] = np.einsum("i,i->", gs, ws, dtype=np.float64)


def _bitround_np(x, drop, out):
    bits = x.view(np.uint32)
    half = np.uint32((1 << (drop - 1)) - 1)
    mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    lsb = (bits >> np.uint32(drop)) & np.uint32(1)
    np.bitwise_and(bits + half + lsb, mask, out=out.view(np.uint32))
    bad = (bits & np.uint32(0x7F800000)) == np.uint32(0x7F800000)
    if bad.any():
        out[bad] = x[bad]


def _sketch_np(x, starts, sizes, offsets, codes, code_starts, out):
    for t in range(len(starts)):
        seg = x[starts[t]:starts[t] + sizes[t]].astype(np.float64)
        o = offsets[t]
        if code_starts[t] < 0:
            out[o:o + sizes[t]] = seg
            continue
        c = codes[code_starts[t]:code_starts[t] + sizes[t]]
        k = int(out.shape[0] if t + 1 == len(starts) else offsets[t + 1]) - o
        # np.bincount adds in index order, as the compiled loop does: the same float64 sums
        out[o:o + k] += np.bincount(c >> 1, weights=np.where(c & 1, -seg, seg), minlength=k)


# Blosc frames of the rounded tier (see ``shuffle_frame_into``): the 16-byte Blosc 1 header,
# one int32 start per block, then per block its byte planes (split streams), each an int32 size
# and either the plane's raw bytes (size == plane length) or an LZ4 block of one repeated byte.
FRAME_BLOCK = 16384  # entries per block (64 KB of float32, c-blosc's own choice at clevel 1)
_FLAGS_SHUFFLE_LZ4 = 0x21  # BLOSC_DOSHUFFLE | LZ4 format << 5; bit 0x10 clear: blocks split
_FLAGS_LZ4 = 0x20  # LZ4 format << 5, no shuffle, blocks split


def _lz4_run_np(n: int, v: int) -> bytes:
    """An LZ4 block that decodes to ``n`` bytes of value ``v`` (n >= 13): one literal, a match
    of offset 1 over n - 6 bytes, then the 5 literals LZ4 requires at the end of a block."""
    extra = n - 10
    out = bytearray([(1 << 4) | min(extra, 15), v, 1, 0])
    if extra >= 15:
        r = extra - 15
        out += b"\xff" * (r // 255) + bytes([r % 255])
    out += bytes([0x50, v, v, v, v, v])
    return bytes(out)


BYTE_RUN = 16  # bytes of one value in a row that a split's LZ4 block stores as one match


def _lz4_len_np(r: int) -> bytes:
    return b"\xff" * (r // 255) + bytes([r % 255])


def _lz4_byte_runs_np(src: np.ndarray) -> bytes:
    """The LZ4 block of the kernel's ``lz4_byte_runs``: every maximal run of at least
    ``BYTE_RUN`` bytes of one value (cut at n - 5, starting before n - 12) is one literal and
    a match of offset 1 over the rest; everything else is literals."""
    n = src.shape[0]
    change = np.flatnonzero(src[1:] != src[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.minimum(np.concatenate((change, [n])), n - 5)
    keep = (ends - starts >= BYTE_RUN) & (starts + 1 <= n - 12)
    out = bytearray()
    anchor = 0
    for i, j in zip(starts[keep].tolist(), ends[keep].tolist()):
        lit, ml = i + 1 - anchor, j - i - 1
        out.append((min(lit, 15) << 4) | min(ml - 4, 15))
        if lit >= 15:
            out += _lz4_len_np(lit - 15)
        out += src[anchor:i + 1].tobytes() + b"\x01\x00"
        if ml - 4 >= 15:
            out += _lz4_len_np(ml - 19)
        anchor = j
    lit = n - anchor
    out.append(min(lit, 15) << 4)
    if lit >= 15:
        out += _lz4_len_np(lit - 15)
    return bytes(out + src[anchor:].tobytes())


def _rounded_bits_np(x, drop):
    bits = x.view(np.uint32)
    if drop == 0:
        return bits
    out = np.empty_like(x)
    _bitround_np(x, drop, out)
    return out.view(np.uint32)


def _frame_np(x, drop, shuffle, block, out):
    bits = _rounded_bits_np(x, drop)
    n = bits.shape[0]
    nfull, left = divmod(n, block)
    nblocks = nfull + (left > 0)
    parts, starts = [], []
    pos = 16 + 4 * nblocks
    for b in range(nblocks):
        starts.append(pos)
        w = bits[b * block:(b + 1) * block]
        raw = w.view(np.uint8)
        if shuffle:  # the byte shuffle: the block's four byte planes in a row
            raw = np.ascontiguousarray(raw.reshape(-1, 4).T).reshape(-1)
        if b == nfull:  # a leftover block: one stream, stored raw
            parts += [np.int32(raw.size).tobytes(), raw.tobytes()]
            pos += 4 + raw.size
            continue
        sparse = np.count_nonzero(w[1:] == w[:-1]) * 8 >= block  # entries equal to the one before
        for j in range(4):
            p = raw[j * block:(j + 1) * block]
            enc = p.tobytes()
            if shuffle and np.all(p == p[0]):
                enc = _lz4_run_np(block, int(p[0]))
            elif sparse:
                runs = _lz4_byte_runs_np(p)
                enc = runs if len(runs) < block else enc
            parts += [np.int32(len(enc)).tobytes(), enc]
            pos += 4 + len(enc)
    head = np.array([2, 1, _FLAGS_SHUFFLE_LZ4 if shuffle else _FLAGS_LZ4, 4], dtype=np.uint8).tobytes()
    head += np.array([4 * n, 4 * block, pos], dtype="<u4").tobytes() + np.array(starts, dtype="<i4").tobytes()
    out[:pos] = np.frombuffer(head + b"".join(parts), dtype=np.uint8)
    return pos


def _pack_signs_np(x, signbits, nonzero):
    nz = x != 0
    signbits[:] = np.packbits(np.signbit(x) & nz)
    nonzero[:] = np.packbits(nz)


def _pack_signs_at_np(x, pos, signbits, nonzero):
    r = pos % 8
    b = pos // 8
    xx = np.concatenate([np.zeros(r, np.float32), x])  # zeros: no sign bit, no non-zero bit
    nz = xx != 0
    for plane, bits in ((signbits, np.packbits(np.signbit(xx) & nz)), (nonzero, np.packbits(nz))):
        if r:  # the byte's first r bits are the previous tensor's (its padding below them is 0)
            bits[0] |= plane[b]
        plane[b:b + bits.shape[0]] = bits


def _sketch2_np(x, y, starts, sizes, offsets, codes, code_starts, out):
    for r, row in enumerate((x, y)):
        col = np.zeros(out.shape[0])
        _sketch_np(row, starts, sizes, offsets, codes, code_starts, col)
        out[:, r] = col


def _compile(numba):
    # helpers the frame kernels call are module globals: numba's disk cache keys a function
    # by its closure variables, and a dispatcher in a closure misses the cache in every process
    global _nb_put_u32, _nb_lz4_run, _nb_lz4_len, _nb_lz4_seq, _nb_lz4_ext, _nb_lz4_byte_runs, _nb_put_split
    global _nb_pack_signs, _nb_pack_at, _nb_scatter2
    jit = numba.njit(nogil=True, fastmath=_FASTMATH, cache=True)

    @jit
    def tensor_sums(g, w, starts, ends, idx, gg, ww, gw, has_g):  # pragma: no cover - compiled
        for j in range(starts.shape[0]):
            s_ww = 0.0
            s_gg = 0.0
            s_gw = 0.0
            # slices, then loops from 0: a loop over range(starts[j], ends[j]) indexing the
            # whole array does not vectorize
            ws = w[starts[j]:ends[j]]
            if has_g:
                gs = g[starts[j]:ends[j]]
                for i in range(ws.shape[0]):
                    x = np.float64(ws[i])
                    y = np.float64(gs[i])
                    s_ww += x * x
                    s_gg += y * y
                    s_gw += y * x
                gg[idx[j]] = s_gg
                gw[idx[j]] = s_gw
            else:
                for i in range(ws.shape[0]):
                    x = np.float64(ws[i])
                    s_ww += x * x
            ww[idx[j]] = s_ww

    # exact kernels (no fastmath): their results must equal the numpy versions bit for bit
    exact = numba.njit(nogil=True, cache=True)

    @exact
    def bitround(x, drop, out):  # pragma: no cover - compiled
        bits = x.view(np.uint32)
        o = out.view(np.uint32)
        half = np.uint32((1 << (drop - 1)) - 1)
        mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
        for i in range(bits.shape[0]):
            b = bits[i]
            if (b & np.uint32(0x7F800000)) == np.uint32(0x7F800000):  # NaN or Inf: kept
                o[i] = b
            else:
                o[i] = (b + half + ((b >> np.uint32(drop)) & np.uint32(1))) & mask

    @exact
    def sketch(x, starts, sizes, offsets, codes, code_starts, out):  # pragma: no cover - compiled
        for t in range(starts.shape[0]):
            seg = x[starts[t]:starts[t] + sizes[t]]
            o = offsets[t]
            if code_starts[t] < 0:  # copied exactly
                for i in range(seg.shape[0]):
                    out[o + i] = np.float64(seg[i])
                continue
            c = codes[code_starts[t]:code_starts[t] + sizes[t]]
            for i in range(seg.shape[0]):
                v = np.float64(seg[i])
                k = c[i]
                if k & 1:
                    out[o + (k >> 1)] -= v
                else:
                    out[o + (k >> 1)] += v

    @exact
    def _nb_scatter2(sx, sy, c, ot, at, copy):  # pragma: no cover - compiled
        # entries of one tensor of two rows into its buckets ot (dim_t, 2): bucket c[i] >> 1,
        # minus where c[i] is odd, in index order; copy: entry i into ot[at + i] (exact tensors)
        if copy:
            for i in range(sx.shape[0]):
                ot[at + i, 0] = np.float64(sx[i])
                ot[at + i, 1] = np.float64(sy[i])
            return
        for i in range(sx.shape[0]):
            k = c[i]
            j = k >> 1
            v = np.float64(sx[i])
            u = np.float64(sy[i])
            if k & 1:
                ot[j, 0] -= v
                ot[j, 1] -= u
            else:
                ot[j, 0] += v
                ot[j, 1] += u

    @exact
    def sketch2(x, y, starts, sizes, offsets, codes, code_starts, out):  # pragma: no cover - compiled
        # both rows in one sweep: the hash codes are read once, and the two sums of a bucket
        # share a cache line (out is (dim, 2)); each row's additions in index order, as sketch
        for t in range(starts.shape[0]):
            cs = max(code_starts[t], 0)
            _nb_scatter2(x[starts[t]:starts[t] + sizes[t]], y[starts[t]:starts[t] + sizes[t]],
                         codes[cs:cs + sizes[t]], out[offsets[t]:], 0, code_starts[t] < 0)

    @exact
    def _nb_put_u32(out, pos, v):  # pragma: no cover - compiled
        out[pos] = v & 0xFF
        out[pos + 1] = (v >> 8) & 0xFF
        out[pos + 2] = (v >> 16) & 0xFF
        out[pos + 3] = (v >> 24) & 0xFF

    @exact
    def _nb_lz4_run(out, pos, n, v):  # pragma: no cover - compiled
        extra = n - 10
        p = pos
        out[p] = 16 | (15 if extra >= 15 else extra)
        out[p + 1] = v
        out[p + 2] = 1
        out[p + 3] = 0
        p += 4
        if extra >= 15:
            r = extra - 15
            while r >= 255:
                out[p] = 255
                p += 1
                r -= 255
            out[p] = r
            p += 1
        out[p] = 0x50
        for k in range(5):
            out[p + 1 + k] = v
        return p + 6 - pos

    @exact
    def _nb_lz4_len(dst, o, r):  # pragma: no cover - compiled
        while r >= 255:
            dst[o] = 255
            o += 1
            r -= 255
        dst[o] = r
        return o + 1

    @exact
    def _nb_lz4_seq(dst, o, src, a, lit, ml):  # pragma: no cover - compiled
        """One LZ4 sequence: ``lit`` literals from src[a:], then (ml > 0) a match of offset 1."""
        tm = 0 if ml == 0 else (15 if ml - 4 >= 15 else ml - 4)
        dst[o] = ((15 if lit >= 15 else lit) << 4) | tm
        o += 1
        if lit >= 15:
            o = _nb_lz4_len(dst, o, lit - 15)
        d = dst[o:o + lit]  # a loop over two slices from 0 compiles to a vector copy; a
        s = src[a:a + lit]  # slice assignment copies element by element, 25x slower
        for k in range(lit):
            d[k] = s[k]
        o += lit
        if ml > 0:
            dst[o] = 1
            dst[o + 1] = 0
            o += 2
            if ml - 4 >= 15:
                o = _nb_lz4_len(dst, o, ml - 19)
        return o

    @exact
    def _nb_lz4_ext(r):  # pragma: no cover - compiled
        return 0 if r < 15 else (r - 15) // 255 + 1

    @exact
    def _nb_lz4_byte_runs(src, dst, minrun, runs):  # pragma: no cover - compiled
        """``_lz4_byte_runs_np`` into ``dst`` when shorter than ``src``; returns its length, or
        ``len(src)`` without writing when it would not be shorter. A run of >= minrun (>= 16)
        bytes of one value holds an 8-aligned 8-byte word of that byte, so the scan tests
        words and looks at bytes only around such a word. ``runs`` is an int64 scratch of at
        least ``2 * (len(src) // 16 + 1)``."""
        n = src.shape[0]
        nw = n // 8
        words = src[:8 * nw].view(np.uint64)
        ones = np.uint64(0x0101010101010101)
        anchor = 0
        last_start = n - 12
        last_end = n - 5
        size = 0
        nr = 0
        w = 0
        while w < nw:
            wv = words[w]
            v = wv & np.uint64(0xFF)
            if wv != v * ones:
                w += 1
                continue
            b = src[8 * w]
            i = 8 * w
            while i > anchor and src[i - 1] == b:
                i -= 1
            j = 8 * (w + 1)
            while j + 8 <= last_end and words[j // 8] == wv:
                j += 8
            while j < last_end and src[j] == b:
                j += 1
            if j > last_end:
                j = last_end
            if j - i >= minrun and i + 1 <= last_start:
                lit, ml = i + 1 - anchor, j - i - 1
                size += 3 + _nb_lz4_ext(lit) + lit + (_nb_lz4_ext(ml - 4) if ml - 4 >= 15 else 0)
                runs[2 * nr] = i
                runs[2 * nr + 1] = j
                nr += 1
                anchor = j
            w = max(w + 1, (j + 7) // 8)
        size += 1 + _nb_lz4_ext(n - anchor) + n - anchor
        if size >= n:
            return n
        o = 0
        anchor = 0
        for r in range(nr):
            i = runs[2 * r]
            j = runs[2 * r + 1]
            o = _nb_lz4_seq(dst, o, src, anchor, i + 1 - anchor, j - i - 1)
            anchor = j
        return _nb_lz4_seq(dst, o, src, anchor, n - anchor, 0)

    @exact
    def _nb_put_split(out, pos, src, try_runs, runs):  # pragma: no cover - compiled
        """One split of a block at ``pos``: its int32 size, then an LZ4 block of literals and
        byte runs when ``try_runs`` and that is shorter, else ``src``'s bytes; the next pos."""
        n = src.shape[0]
        k = _nb_lz4_byte_runs(src, out[pos + 4:], 16, runs) if try_runs else n
        if k >= n:  # no gain: the bytes as they are
            k = n
            dst = out[pos + 4:pos + 4 + n]
            for i in range(n):
                dst[i] = src[i]
        _nb_put_u32(out, pos, k)
        return pos + 4 + k

    @exact
    def frame(x, drop, shuffle, block, out):  # pragma: no cover - compiled
        # _frame_np. Every loop runs over slices from index 0: an index like pos + i keeps
        # numba's negative-index check in the loop, which then does not vectorize (7x slower)
        bits = x.view(np.uint32)
        n = bits.shape[0]
        nfull = n // block
        left = n - nfull * block
        nblocks = nfull + (1 if left > 0 else 0)
        half = np.uint32((1 << (drop - 1)) - 1) if drop > 0 else np.uint32(0)
        mask = np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
        sd = np.uint32(drop)
        special = np.uint32(0x7F800000)
        xb = x.view(np.uint8)
        tmp = np.empty(block, dtype=np.uint32)
        tbytes = tmp.view(np.uint8)
        plane = np.empty(block, dtype=np.uint8)
        copy = shuffle or drop > 0  # else the block is read where it is
        runs = np.empty(2 * (block // 16 + 1), dtype=np.int64)
        pos = 16 + 4 * nblocks
        for b in range(nblocks):
            _nb_put_u32(out, 16 + 4 * b, pos)
            m = block if b < nfull else left
            seg = bits[b * block:b * block + m]
            t = tmp[:m] if copy else seg
            tb = tbytes[:4 * m] if copy else xb[4 * b * block:4 * b * block + 4 * m]
            acc_or = np.uint32(0)
            acc_and = np.uint32(0xFFFFFFFF)
            if drop > 0:
                for i in range(m):
                    v = seg[i]
                    r = (v + half + ((v >> sd) & np.uint32(1))) & mask
                    v = v if (v & special) == special else r  # NaN and Inf kept
                    t[i] = v
                    acc_or |= v
                    acc_and &= v
            elif shuffle:
                for i in range(m):
                    v = seg[i]
                    t[i] = v
                    acc_or |= v
                    acc_and &= v
            if b == nfull:  # a leftover block: one stream, raw (shuffled: its planes in a row)
                _nb_put_u32(out, pos, 4 * m)
                pos += 4
                if shuffle:
                    for j in range(4):
                        sh = np.uint32(8 * j)
                        dst = out[pos:pos + m]
                        for i in range(m):
                            dst[i] = np.uint8((t[i] >> sh) & np.uint32(0xFF))
                        pos += m
                else:
                    dst = out[pos:pos + 4 * m]
                    for i in range(4 * m):
                        dst[i] = tb[i]
                    pos += 4 * m
                continue
            # entries equal to the one before (runs of exact zeros, of a fill value): where an
            # eighth of a block is, its splits are searched for runs of one byte value
            rep = 0
            t1 = t[1:]
            for i in range(m - 1):
                rep += t1[i] == t[i]
            try_runs = rep * 8 >= block
            for j in range(4):
                if not shuffle:  # split j: the block's j-th quarter of bytes
                    pos = _nb_put_split(out, pos, tb[j * block:(j + 1) * block], try_runs, runs)
                    continue
                sh = np.uint32(8 * j)  # split j: byte plane j
                hi = (acc_or >> sh) & np.uint32(0xFF)
                if hi == ((acc_and >> sh) & np.uint32(0xFF)):  # one byte value: an LZ4 run
                    k = _nb_lz4_run(out, pos + 4, block, hi)
                    _nb_put_u32(out, pos, k)
                    pos += 4 + k
                    continue
                for i in range(block):
                    plane[i] = np.uint8((t[i] >> sh) & np.uint32(0xFF))
                pos = _nb_put_split(out, pos, plane, try_runs, runs)
        out[0] = 2
        out[1] = 1
        out[2] = _FLAGS_SHUFFLE_LZ4 if shuffle else _FLAGS_LZ4
        out[3] = 4
        _nb_put_u32(out, 4, 4 * n)
        _nb_put_u32(out, 8, 4 * block)
        _nb_put_u32(out, 12, pos)
        return pos

    @exact
    def _nb_pack_signs(x, sb, nz):  # pragma: no cover - compiled
        # in blocks of 4096 entries: a vector loop makes one byte (0 or 1) per entry and bit
        # plane, then each 8 of them become one byte by a multiply (byte k -> bit 7 - k, the
        # order of np.packbits): one read of x, no row-sized temporaries
        bits = x.view(np.uint32)
        n = bits.shape[0]
        B = 4096
        tz = np.empty(B, dtype=np.uint8)
        ts = np.empty(B, dtype=np.uint8)
        low = np.uint32(0x7FFFFFFF)
        mul = np.uint64(0x8040201008040201)
        for a in range(0, n, B):
            m = min(B, n - a)
            seg = bits[a:a + m]
            for i in range(m):
                v = seg[i]
                z = np.uint8(1) if (v & low) != 0 else np.uint8(0)
                tz[i] = z
                ts[i] = np.uint8(v >> np.uint32(31)) & z
            full = m // 8
            wz = tz[:8 * full].view(np.uint64)
            ws = ts[:8 * full].view(np.uint64)
            oz = nz[a // 8:a // 8 + full]
            osb = sb[a // 8:a // 8 + full]
            for j in range(full):
                oz[j] = np.uint8((wz[j] * mul) >> np.uint64(56))
                osb[j] = np.uint8((ws[j] * mul) >> np.uint64(56))
            if m % 8:  # the row's last byte, zero padded
                zb = np.uint8(0)
                sbb = np.uint8(0)
                for k in range(m - 8 * full):
                    zb |= tz[8 * full + k] << np.uint8(7 - k)
                    sbb |= ts[8 * full + k] << np.uint8(7 - k)
                nz[a // 8 + full] = zb
                sb[a // 8 + full] = sbb

    @exact
    def pack_signs(x, sb, nz):  # pragma: no cover - compiled
        _nb_pack_signs(x, sb, nz)

    @exact
    def pack_signs_at(x, pos, sb, nz):  # pragma: no cover - compiled
        _nb_pack_at(x, pos, sb, nz)

    @exact
    def sketch2_signs(x, y, pos, size, offset, codes, code_start, out, sbx, nzx, sby, nzy):  # pragma: no cover
        # one tensor of two rows: its CountSketch (as sketch2: each bucket's additions in index
        # order) and both rows' sign planes, block by block, so that the planes read entries
        # the sketch has just brought into cache
        B = 4096
        ot = out[offset:]
        cs = max(code_start, 0)
        for a in range(0, size, B):
            m = min(B, size - a)
            sx = x[a:a + m]
            sy = y[a:a + m]
            _nb_scatter2(sx, sy, codes[cs + a:cs + a + m], ot, a, code_start < 0)
            _nb_pack_at(sx, pos + a, sbx, nzx)
            _nb_pack_at(sy, pos + a, sby, nzy)

    @exact
    def _nb_pack_at(x, pos, sb, nz):  # pragma: no cover - compiled
        # x's bits at bit positions pos.. of the planes: first the entries that complete the
        # byte the previous tensor ended in (its bits there are set, the rest zero padded)
        bits = x.view(np.uint32)
        n = bits.shape[0]
        head = min((8 - pos % 8) % 8, n)
        if head:
            b = pos // 8
            zb = nz[b]
            sbb = sb[b]
            for k in range(head):
                v = bits[k]
                z = np.uint8(1) if (v & np.uint32(0x7FFFFFFF)) != 0 else np.uint8(0)
                sh = np.uint8(7 - (pos + k) % 8)
                zb |= z << sh
                sbb |= (np.uint8(v >> np.uint32(31)) & z) << sh
            nz[b] = zb
            sb[b] = sbb
        if n > head:
            a = (pos + head) // 8
            _nb_pack_signs(x[head:], sb[a:], nz[a:])

    return tensor_sums, bitround, sketch, frame, sketch2, pack_signs, pack_signs_at, sketch2_signs


_NUMPY = (_tensor_sums_np, _bitround_np, _sketch_np, _frame_np, _sketch2_np, _pack_signs_np, _pack_signs_at_np, None)
_impl: tuple | None = None
_lock = threading.Lock()
BACKEND = ""  # "numba" or "numpy", set at the first call


def _get() -> tuple:
    """The kernels, compiled (or loaded from numba's cache) at the first call, so that
    ``import capture`` does not pay numba's import."""
    global _impl, BACKEND
    with _lock:
        if _impl is None:
            nb = _numba()
            if nb is not None:
                _impl, BACKEND = _compile(nb), "numba"
            else:
                _impl, BACKEND = _NUMPY, "numpy"
    return _impl


def _idx(i) -> np.ndarray:
    return np.ascontiguousarray(i, dtype=np.int64)


def tensor_sums(g: np.ndarray | None, w: np.ndarray, starts, ends, idx, gg: np.ndarray, ww: np.ndarray,
                gw: np.ndarray) -> None:
    """Per segment j (entries ``[starts[j], ends[j])`` of the flat vectors, tensor ``idx[j]``):
    ``ww[idx[j]] = ||w||^2`` and, when ``g`` is given, ``gg[idx[j]] = ||g||^2`` and
    ``gw[idx[j]] = <g, w>``, all float64 sums of float64 products of the float32 entries, in
    one sweep (the capture's per-step scalars)."""
    has_g = g is not None
    (_impl or _get())[0](g if has_g else w, w, _idx(starts), _idx(ends), _idx(idx), gg, ww, gw, has_g)


# ---------------------------------------------------------------------------- capture encodings
# The writer's per-row encodings, each equal bit for bit to its numpy definition in
# ``gradtrace_format.format`` (``bitround``, ``Sketcher``, ``pack_signs``): no fastmath, the same
# order of float64 additions.


def bitround_into(x: np.ndarray, keepbits: int, out: np.ndarray) -> np.ndarray:
    """``out[:] = format.bitround(x, keepbits)`` for a contiguous float32 ``x``; returns ``out``."""
    if keepbits >= 23:
        np.copyto(out, x)
        return out
    (_impl or _get())[1](x, 23 - int(keepbits), out)
    return out


def sketch_codes(bucket: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """A tensor's CountSketch hash in one int32 per entry: ``2 * bucket + (sign < 0)``."""
    if bucket.size and int(bucket.max()) >= 2**30:
        raise ValueError("a sketch of more than 2**30 buckets per tensor does not fit the int32 codes")
    return (bucket.astype(np.int32) << 1) | (sign < 0).astype(np.int32)


def sketch_into(x: np.ndarray, starts, sizes, offsets, codes: np.ndarray, code_starts, out: np.ndarray) -> np.ndarray:
    """CountSketch of the flat float32 ``x`` into the float64 ``out`` (length ``plan.dim``).

    Tensor t (entries ``[starts[t], starts[t] + sizes[t])``) adds ``sign(i) * x[i]`` to
    bucket ``offsets[t] + bucket(i)``, in index order (as ``np.bincount`` does, so the sums
    equal ``format.Sketcher``'s bit for bit); ``code_starts[t] < 0`` copies the tensor exactly.
    ``codes`` holds :func:`sketch_codes` of every sketched tensor, tensor t's from
    ``code_starts[t]``.
    """
    out[:] = 0.0
    (_impl or _get())[2](x, _idx(starts), _idx(sizes), _idx(offsets), codes, _idx(code_starts), out)
    return out


def sketch2_into(x: np.ndarray, y: np.ndarray, starts, sizes, offsets, codes: np.ndarray, code_starts,
                 out: np.ndarray) -> np.ndarray:
    """:func:`sketch_into` of two rows with the same plan at once: ``out[:, 0]`` the sketch of
    ``x``, ``out[:, 1]`` that of ``y`` (``out`` float64 of shape (plan.dim, 2), C order),
    each equal bit for bit to :func:`sketch_into` of its row. One sweep reads the hash codes
    once and keeps a bucket's two sums in one cache line (gradient and weights of a
    ``sketch`` tier on both)."""
    out[:] = 0.0
    (_impl or _get())[4](x, y, _idx(starts), _idx(sizes), _idx(offsets), codes, _idx(code_starts), out)
    return out


def pack_signs_into(x: np.ndarray, signbits: np.ndarray, nonzero: np.ndarray) -> None:
    """``format.pack_signs(x)`` into the uint8 arrays ``signbits`` and ``nonzero`` (length
    ``ceil(len(x) / 8)``, zero padded): sign bits of the non-zero entries, and non-zero bits,
    of the contiguous float32 ``x`` (the compiled kernel reads ``x`` once; numpy's route
    makes three row-sized temporaries, 3x slower)."""
    (_impl or _get())[5](np.ascontiguousarray(x, dtype=np.float32), signbits, nonzero)


def pack_signs_at(x: np.ndarray, pos: int, signbits: np.ndarray, nonzero: np.ndarray) -> None:
    """:func:`pack_signs_into` of one piece of a row: the contiguous float32 ``x`` holds the
    row's entries ``pos, pos + 1, ...`` and its bits go to those positions of ``signbits`` and
    ``nonzero``. The pieces of a row, packed in order from position 0, give the planes of the
    whole row bit for bit (a piece that starts inside a byte completes the byte the piece
    before it ended in, whose remaining bits that one left at 0)."""
    n, pos = x.shape[0], int(pos)
    if pos < 0 or (pos + n + 7) // 8 > min(signbits.shape[0], nonzero.shape[0]):
        raise ValueError(f"pack_signs_at: {n} entries at bit {pos} do not fit planes of "
                         f"{min(signbits.shape[0], nonzero.shape[0])} bytes")
    if n:
        (_impl or _get())[6](np.ascontiguousarray(x, dtype=np.float32), pos, signbits, nonzero)


def sketch_parts_into(xs, y: np.ndarray | None, starts, sizes, offsets, codes: np.ndarray, code_starts,
                      out: np.ndarray) -> np.ndarray:
    """:func:`sketch_into` (``y`` None; ``out`` of shape (dim,)) or :func:`sketch2_into` (``y``
    the flat second row; ``out`` of shape (dim, 2)) of a row given as one contiguous float32
    array per tensor (``xs[t]`` holds tensor t's ``sizes[t]`` entries): the same float64 sums,
    bit for bit (each tensor's additions in index order, tensor after tensor)."""
    impl = _impl or _get()
    if impl is _NUMPY:  # the numpy versions sketch whole rows: join the pieces
        x = np.concatenate(list(xs)) if len(xs) else np.zeros(0, np.float32)
        if y is None:
            return sketch_into(x, starts, sizes, offsets, codes, code_starts, out)
        return sketch2_into(x, y, starts, sizes, offsets, codes, code_starts, out)
    out[:] = 0.0
    starts, sizes, offsets, code_starts = _idx(starts), _idx(sizes), _idx(offsets), _idx(code_starts)
    zero = np.zeros(1, dtype=np.int64)
    for t, x in enumerate(xs):
        if not sizes[t]:
            continue
        args = (zero, sizes[t:t + 1], offsets[t:t + 1], codes, code_starts[t:t + 1], out)
        if y is None:
            impl[2](x, *args)
        else:
            impl[4](x, y[starts[t]:starts[t] + sizes[t]], *args)
    return out


def sketch2_signs_parts_into(xs, y: np.ndarray, starts, sizes, offsets, codes: np.ndarray, code_starts,
                             out: np.ndarray, x_bits: tuple, y_bits: tuple) -> np.ndarray:
    """:func:`sketch_parts_into` of two float32 rows (``out`` of shape (dim, 2)) and, in the same
    sweep, :func:`pack_signs_at` of both into ``x_bits`` and ``y_bits`` (``(signbits, nonzero)``
    each, of ``ceil(d / 8)`` bytes): the same sums and planes bit for bit, each tensor's entries
    read once from memory (a block's planes are packed right after its sketch)."""
    impl = _impl or _get()
    if impl[7] is None:  # the numpy versions: one after the other
        sketch_parts_into(xs, y, starts, sizes, offsets, codes, code_starts, out)
        pos = 0
        for x in xs:
            pack_signs_at(x, pos, *x_bits)
            pos += x.shape[0]
        pack_signs_into(y, *y_bits)
        return out
    starts, sizes, offsets, code_starts = _idx(starts), _idx(sizes), _idx(offsets), _idx(code_starts)
    y = np.ascontiguousarray(y, dtype=np.float32)  # the planes read the float32 bit patterns
    d = int((starts + sizes).max()) if sizes.size else 0
    if y.shape[0] < d or min(b.shape[0] for b in (*x_bits, *y_bits)) < (d + 7) // 8:
        raise ValueError(f"sketch2_signs_parts_into: rows of {d} entries need {d} weights and planes of "
                         f"{(d + 7) // 8} bytes")
    out[:] = 0.0
    for t, x in enumerate(xs):
        n = int(sizes[t])
        if n:
            s = int(starts[t])
            x = np.ascontiguousarray(x, dtype=np.float32)
            if x.shape[0] != n or y.shape[0] < s + n:
                raise ValueError(f"sketch2_signs_parts_into: tensor {t} has {n} entries, its piece {x.shape[0]}")
            impl[7](x, y[s:s + n], s, n, int(offsets[t]), codes, int(code_starts[t]), out, *x_bits, *y_bits)
    return out


def frame_capacity(n: int, block: int = FRAME_BLOCK) -> int:
    """Bytes :func:`shuffle_frame_into` or :func:`plain_frame_into` may write for ``n`` float32
    entries: every split raw (an LZ4 block is written only where it is shorter)."""
    block = max(1, min(block, n))
    nblocks = -(-n // block)
    return 16 + 4 * nblocks + 4 * 4 * nblocks + 4 * n


def shuffle_frame_into(x: np.ndarray, keepbits: int | None, out: np.ndarray, block: int = FRAME_BLOCK) -> int:
    """The Blosc chunk (lz4, byte shuffle, typesize 4) of ``format.bitround(x, keepbits)``
    (of ``x`` itself with ``keepbits=None``) written into the uint8 ``out``; returns its length.

    Any Blosc 1 or 2 decoder reads it as it reads ``numcodecs.Blosc("lz4", shuffle=SHUFFLE)``'s
    own chunk of the same values; the bytes differ. Blocks of ``block`` entries are split into
    their four byte planes as c-blosc splits them; a plane of one repeated byte value (the zero
    low halves of ``rounded:7``) is stored as one LZ4 run (~1 byte per 255), a plane with
    runs of 16+ bytes of one value (ReLU zeros, a fill) as an LZ4 block of literals and those
    runs when an eighth of the block's entries equal the one before and that is shorter, any
    other plane raw. Blosc's own encoder spends 1-2 ns per entry making LZ4 find the short
    repeats of the sign-and-exponent plane; here a plane costs a pass or two, for chunks
    15-30% larger on gradients (``rounded:K:small`` has the writer use c-blosc's encoder
    instead). A last block shorter than ``block`` is one raw stream, as Blosc stores a
    leftover block. ``x``: contiguous float32 with at least 128 entries (Blosc splits only
    blocks of 128 entries or more); ``block`` at least 128.
    """
    return _frame_into(x, keepbits, True, out, block)


def plain_frame_into(x: np.ndarray, out: np.ndarray, block: int = FRAME_BLOCK, keepbits: int | None = None) -> int:
    """The Blosc chunk (lz4, no shuffle, typesize 4) of the float32 ``x`` written into the
    uint8 ``out``; returns its length. The lossless tier's frames, as
    :func:`shuffle_frame_into` makes the rounded tier's: each block split in four byte ranges
    as c-blosc splits it; a split is an LZ4 block of literals and runs of 16+ bytes of one
    value (the exact zeros of ReLU gradients) when an eighth of its block's entries equal the
    one before and that is shorter, else its bytes as they are (a repeated non-zero float is
    a 4-byte pattern, not a byte run: stored as it is). Decoded: ``x`` bit for bit, or
    ``format.bitround(x, keepbits)``."""
    return _frame_into(x, keepbits, False, out, block)


def _frame_into(x: np.ndarray, keepbits: int | None, shuffle: bool, out: np.ndarray, block: int) -> int:
    if x.dtype != np.float32 or x.ndim != 1 or not x.flags.c_contiguous:
        raise ValueError(f"a Blosc frame is made of a contiguous 1-d float32 array, not {x.dtype} of shape {x.shape}"
                         f"{'' if x.flags.c_contiguous else ' (not contiguous)'}: pass np.ascontiguousarray(x, np.float32)")
    n = x.shape[0]
    if n < 128 or block < 128:  # Blosc splits only blocks of 128 entries or more
        raise ValueError(f"a Blosc frame of split blocks needs at least 128 entries and blocks of 128 (got {n}, {block})")
    block = min(int(block), n)  # a Blosc block is never longer than its chunk
    if out.shape[0] < frame_capacity(n, block):
        raise ValueError(f"the frame buffer holds {out.shape[0]} bytes, {frame_capacity(n, block)} needed")
    drop = 0 if keepbits is None or keepbits >= 23 else 23 - int(keepbits)
    return int((_impl or _get())[3](x, drop, shuffle, block, out))

