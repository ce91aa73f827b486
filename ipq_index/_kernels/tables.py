"""Encoding, lookup-table construction and asymmetric distance computation.

Code layout: every vector's code is ``nbytes`` bytes; dimension j with
``bits[j] > 0`` occupies ``bits[j]`` bits of byte ``byte_of[j]`` starting at
bit ``shift_of[j]`` (fields never straddle bytes).  Levels of dimension j are
``levels[level_off[j]:level_off[j+1]]`` (sorted).  A query gets one
256-entry table per code byte: T[g, c] = sum over dims j packed in byte g of
y_j * L_j[(c >> shift_j) & mask_j], so a vector's score is a sum of nbytes
table lookups.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._numba import kernel, prefetch, splat, target_has, vector_gep

#: lanes of a field block (table-free ADC, ``fields_dot``)
FIELD_LANES = 16
#: table-free ADC 16 fields at a time: x86 byte shuffle (SSSE3 ``pshufb``)
#: of a 16-byte window of the code row, then one 16-lane gather of levels;
#: elsewhere (no SSSE3: e.g. ARM) one field at a time
FIELD_SIMD = target_has("ssse3")


@kernel
def _uniform(seed, i, j):
    """Counter-based uniform in [0, 1) from (seed, i, j): splitmix64 finaliser."""
    z = np.uint64(seed) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(j) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@kernel
def encode(Z, levels, level_off, bits, byte_of, shift_of, nbytes, unbiased, seed, row0):
    """Codes (n, nbytes) uint8 of the rows of Z (already transformed).

    ``unbiased``: stochastic rounding with counter-based uniforms keyed by
    (seed, row0 + i, j), so results do not depend on threads or batching.
    Values outside a dimension's level range are clipped to its end levels.
    """
    n, d = Z.shape
    codes = np.zeros((n, nbytes), np.uint8)
    for i in range(n):
        for j in range(d):
            b = bits[j]
            if b == 0:
                continue
            lo = level_off[j]
            L = level_off[j + 1] - lo
            z = Z[i, j]
            if z <= levels[lo]:
                c = 0
            elif z >= levels[lo + L - 1]:
                c = L - 1
            else:
                a = 0
                h = L - 1
                while h - a > 1:
                    mid = (a + h) >> 1
                    if levels[lo + mid] <= z:
                        a = mid
                    else:
                        h = mid
                la = levels[lo + a]
                lb = levels[lo + a + 1]
                if unbiased:
                    c = a + 1 if _uniform(seed, row0 + i, j) * (lb - la) < z - la else a
                else:
                    c = a + 1 if lb - z < z - la else a
            codes[i, byte_of[j]] |= np.uint8(c << shift_of[j])
    return codes


@kernel
def decode(codes, levels, level_off, bits, byte_of, shift_of, d):
    """Reconstruct (n, d) float32 values (0 for dimensions with 0 bits)."""
    n = codes.shape[0]
    out = np.zeros((n, d), np.float32)
    for i in range(n):
        for j in range(d):
            b = bits[j]
            if b == 0:
                continue
            c = (codes[i, byte_of[j]] >> shift_of[j]) & ((1 << b) - 1)
            out[i, j] = levels[level_off[j] + c]
    return out


@kernel
def _build_table(Y, qi, T2, levels, level_off, bits, field_ptr, field_dim, nbytes, prev):
    """Query qi's tables into T2 (nbytes, 256) from float32 ``levels``.

    A byte's first field fills T[c] = y_j L_j[c]; each further field of b
    bits extends the 2^s filled entries to 2^(s+b) as T[c_hi << s | c_lo] =
    prev[c_lo] + y_j L_j[c_hi] (``prev``: a 256-float scratch copy of the
    previous stage, so the expansion loop vectorises: 44 -> 18 us for 192
    bytes at 10^6).  Entries above the byte's used bits are 0 (codes never
    set those bits); a byte without fields scores 0."""
    for g in range(nbytes):
        T = T2[g]
        f0 = field_ptr[g]
        f1 = field_ptr[g + 1]
        size = 1
        if f1 == f0:
            T[0] = 0.0
        else:
            j = field_dim[f0]
            y = np.float32(Y[qi, j])
            lo = level_off[j]
            size = 1 << bits[j]
            for c in range(size):
                T[c] = y * levels[lo + c]
            for f in range(f0 + 1, f1):
                j = field_dim[f]
                y = np.float32(Y[qi, j])
                lo = level_off[j]
                nb = 1 << bits[j]
                prev[:size] = T[:size]
                for c_hi in range(nb):
                    add = y * levels[lo + c_hi]
                    base = c_hi * size
                    for c_lo in range(size):
                        T[base + c_lo] = prev[c_lo] + add
                size *= nb
        T[size:] = 0.0


@kernel
def build_tables(Y, levels, level_off, bits, field_ptr, field_dim, nbytes):
    """Per-query lookup tables (nq, nbytes, 256) float32 for transformed
    queries Y and float32 ``levels``.

    ``field_ptr``/``field_dim`` (CSR) list each byte's fields in increasing
    shift order; a byte's table is built by expansion (``_build_table``).
    Entries above the byte's used bits are 0 (the unused bits are always 0
    in codes).
    """
    tables = np.empty((Y.shape[0], nbytes, 256), np.float32)
    prev = np.empty(256, np.float32)
    for qi in range(Y.shape[0]):
        _build_table(Y, qi, tables[qi], levels, level_off, bits, field_ptr, field_dim, nbytes, prev)
    return tables


@kernel
def _heap_sift_down(vals, ids, pos, k):
    """Restore the min-heap property of (vals, ids)[:k] below ``pos``."""
    while True:
        left = 2 * pos + 1
        if left >= k:
            return
        small = left
        right = left + 1
        if right < k and vals[right] < vals[left]:
            small = right
        if vals[small] < vals[pos]:
            tv = vals[pos]
            vals[pos] = vals[small]
            vals[small] = tv
            ti = ids[pos]
            ids[pos] = ids[small]
            ids[small] = ti
            pos = small
        else:
            return


@kernel
def row_score(tables_q, codes, scales, has_scale, r):
    """ADC score of code row r with one query's tables (times its scale)."""
    s = 0.0
    for g in range(codes.shape[1]):
        s += tables_q[g, codes[r, g]]
    if has_scale:
        s *= scales[r]
    return s


@kernel
def heap_offer(hv, hi, s, r):
    """Keep (s, r) in the min-heap (hv, hi) of the best scores if it beats the worst."""
    if s > hv[0]:
        hv[0] = s
        hi[0] = r
        _heap_sift_down(hv, hi, 0, hv.shape[0])


@kernel
def heap_to_sorted(vals, ids):
    """Sort a filled min-heap in place into descending order of vals."""
    k = vals.shape[0]
    for end in range(k - 1, 0, -1):
        tv = vals[0]
        vals[0] = vals[end]
        vals[end] = tv
        ti = ids[0]
        ids[0] = ids[end]
        ids[end] = ti
        _heap_sift_down(vals, ids, 0, end)


@kernel
def _scan_rows(tables_q, codes, scales, r0, r1, heap_v, heap_i):
    """Score rows r0..r1 with one query's tables and keep the best in the heap."""
    has_scale = scales.shape[0] > 0
    for i in range(r0, r1):
        heap_offer(heap_v, heap_i, row_score(tables_q, codes, scales, has_scale, i), i)


@kernel
def scan_topk_batch(tables, codes, scales, kk):
    """Top-kk rows per query by full ADC over every row: (nq, kk) scores and rows,
    descending; unfilled slots have row -1 and score -inf."""
    nq = tables.shape[0]
    out_v = np.empty((nq, kk), np.float32)
    out_i = np.empty((nq, kk), np.int64)
    n = codes.shape[0]
    for qi in range(nq):
        hv = np.full(kk, -np.inf, np.float32)
        hi = np.full(kk, -1, np.int64)
        _scan_rows(tables[qi], codes, scales, 0, n, hv, hi)
        heap_to_sorted(hv, hi)
        out_v[qi] = hv
        out_i[qi] = hi
    return out_v, out_i


@kernel
def coarse_nibbles(codes, bits, byte_of, shift_of, rshift, nib_of, nib_shift, M):
    """Coarse 4-bit codes packed two per byte (faiss PQ layout, nibble m in
    byte m // 2, low half for even m): field j contributes its code's top
    bits ``code >> rshift[j]`` at bit ``nib_shift[j]`` of nibble ``nib_of[j]``."""
    n = codes.shape[0]
    d = bits.shape[0]
    out = np.zeros((n, M // 2), np.uint8)
    for i in range(n):
        for j in range(d):
            b = bits[j]
            if b == 0:
                continue
            c = (codes[i, byte_of[j]] >> shift_of[j]) & ((1 << b) - 1)
            v = (c >> rshift[j]) << nib_shift[j]
            m = nib_of[j]
            out[i, m >> 1] |= np.uint8(v << (4 * (m & 1)))
    return out


@kernel
def _touch_rows(codes, cand, qi):
    """Read one byte per cache line of every candidate row before scoring, so
    the (random, mostly uncached) row loads overlap instead of stalling the
    scoring loop one row at a time; returns the number of valid rows."""
    nc = 0
    touch = 0
    for t in range(cand.shape[1]):
        r = cand[qi, t]
        if r >= 0:
            nc += 1
            for g in range(0, codes.shape[1], 64):
                touch += codes[r, g]
    return nc if touch >= 0 else 0


def sum_zero(T):
    """Zero of the type that sums entries of table T: int64 for integer
    tables (exact), float64 for float tables."""
    return 0.0


@overload(sum_zero)
def _sum_zero(T):
    if isinstance(T.dtype, types.Integer):
        return lambda T: np.int64(0)
    return lambda T: 0.0


@kernel
def rows4_sums(T, codes, r0, r1, r2, r3):
    """Table-ADC sums of four rows with four independent accumulators (one
    row's adds form a dependency chain: one row at a time ran at the add
    latency); integer sums for integer tables."""
    s0 = sum_zero(T)
    s1 = sum_zero(T)
    s2 = sum_zero(T)
    s3 = sum_zero(T)
    for g in range(codes.shape[1]):
        s0 += T[g, codes[r0, g]]
        s1 += T[g, codes[r1, g]]
        s2 += T[g, codes[r2, g]]
        s3 += T[g, codes[r3, g]]
    return s0, s1, s2, s3


@kernel
def scale4(s0, s1, s2, s3, r0, r1, r2, r3, scales, has_scale):
    """Four scores times their rows' scales (unchanged without scales)."""
    if has_scale:
        return s0 * scales[r0], s1 * scales[r1], s2 * scales[r2], s3 * scales[r3]
    return s0, s1, s2, s3


@kernel
def _offer4(hv, hi, s0, s1, s2, s3, r0, r1, r2, r3, n, scales, has_scale):
    """Offer the first n (1..4) of four scored rows to the heap."""
    s0, s1, s2, s3 = scale4(s0, s1, s2, s3, r0, r1, r2, r3, scales, has_scale)
    heap_offer(hv, hi, s0, r0)
    if n > 1:
        heap_offer(hv, hi, s1, r1)
    if n > 2:
        heap_offer(hv, hi, s2, r2)
    if n > 3:
        heap_offer(hv, hi, s3, r3)


@kernel
def _valid_rows(cand, qi, nc):
    rows = np.empty(nc, np.int64)
    j = 0
    for t in range(cand.shape[1]):
        if cand[qi, t] >= 0:
            rows[j] = cand[qi, t]
            j += 1
    return rows


@kernel
def _rescore_one(tables, codes, scales, cand, qi, hv, hi):
    """Table ADC of query qi's candidate rows, four rows at a time."""
    has_scale = scales.shape[0] > 0
    nc = _touch_rows(codes, cand, qi)
    rows = _valid_rows(cand, qi, nc)
    T = tables[qi]
    for t in range(0, nc, 4):
        r0 = rows[t]
        r1 = rows[min(t + 1, nc - 1)]
        r2 = rows[min(t + 2, nc - 1)]
        r3 = rows[min(t + 3, nc - 1)]
        s0, s1, s2, s3 = rows4_sums(T, codes, r0, r1, r2, r3)
        _offer4(hv, hi, s0, s1, s2, s3, r0, r1, r2, r3, nc - t, scales, has_scale)
    heap_to_sorted(hv, hi)


@kernel
def rescore_topk(tables, codes, scales, cand, kk):
    """Full-precision ADC of each query's candidate rows (-1 = none); top-kk
    (scores descending, rows, -1 padded)."""
    nq = cand.shape[0]
    out_v = np.full((nq, kk), -np.inf, np.float32)
    out_i = np.full((nq, kk), -1, np.int64)
    for qi in range(nq):
        _rescore_one(tables, codes, scales, cand, qi, out_v[qi], out_i[qi])
    return out_v, out_i


def _fields_dot_codegen(context, builder, signature, args):
    """float32 sum over the field blocks b of y * levels[((row bytes) >> shift
    & mask) + level offset], 16 lanes per block: the block's 16 code bytes
    come from one 16-byte load of the row at ``starts[b]`` and a ``pshufb``
    by the block's lane offsets (F[b, 0]: 16 bytes), shifts / masks / level
    offsets from F[b, 1..3] (int32 x 16), the levels from one gather, then
    fused multiply-adds with yb[16 b:16 b + 16] into one 16-lane float32
    accumulator, summed across lanes at the end."""
    codes_t, _, starts_t, F_t, y_t, lv_t = signature.args
    codes = context.make_array(codes_t)(context, builder, args[0])
    starts = context.make_array(starts_t)(context, builder, args[2])
    F = context.make_array(F_t)(context, builder, args[3])
    yb = context.make_array(y_t)(context, builder, args[4])
    lv = context.make_array(lv_t)(context, builder, args[5])
    L = FIELD_LANES
    i1, i8, i32, i64, flt = ir.IntType(1), ir.IntType(8), ir.IntType(32), ir.IntType(64), ir.FloatType()
    v32, vf, v8 = ir.VectorType(i32, L), ir.VectorType(flt, L), ir.VectorType(i8, L)
    mask_t = ir.VectorType(i1, L)
    mod = builder.module
    gather = cgutils.get_or_insert_function(
        mod, ir.FunctionType(vf, [ir.VectorType(flt.as_pointer(), L), i32, mask_t, vf]),
        f"llvm.masked.gather.v{L}f32.v{L}p0f32")
    fmuladd = cgutils.get_or_insert_function(mod, ir.FunctionType(vf, [vf, vf, vf]), f"llvm.fmuladd.v{L}f32")
    pshufb = cgutils.get_or_insert_function(mod, ir.FunctionType(v8, [v8, v8]), "llvm.x86.ssse3.pshuf.b.128")
    row = cgutils.get_item_pointer(context, builder, codes_t, codes, [args[1], ir.Constant(i64, 0)],
                                   wraparound=False)
    nblk = builder.extract_value(starts.shape, 0)
    all_lanes = ir.Constant(mask_t, [1] * L)
    acc = cgutils.alloca_once_value(builder, ir.Constant(vf, None))
    with cgutils.for_range(builder, nblk) as loop:
        b = loop.index
        base = builder.mul(b, ir.Constant(i64, 4 * L))

        def load_lanes(k, vt):
            p = builder.gep(F.data, [builder.add(base, ir.Constant(i64, k * L))])
            return builder.load(builder.bitcast(p, vt.as_pointer()), align=4)

        start = builder.load(builder.gep(starts.data, [b]))
        window = builder.load(builder.bitcast(builder.gep(row, [start]), v8.as_pointer()), align=1)
        byte = builder.zext(builder.call(pshufb, [window, load_lanes(0, v8)]), v32)
        c = builder.and_(builder.lshr(byte, load_lanes(1, v32)), load_lanes(2, v32))
        c = builder.add(c, load_lanes(3, v32))
        vals = builder.call(gather, [vector_gep(builder, lv.data, c, flt), ir.Constant(i32, 4), all_lanes,
                                     ir.Constant(vf, ir.Undefined)])
        yp = builder.gep(yb.data, [builder.mul(b, ir.Constant(i64, L))])
        y = builder.load(builder.bitcast(yp, vf.as_pointer()), align=4)
        builder.store(builder.call(fmuladd, [vals, y, builder.load(acc)]), acc)
    tot = builder.load(acc)
    s = builder.extract_element(tot, ir.Constant(i32, 0))
    for t in range(1, L):
        s = builder.fadd(s, builder.extract_element(tot, ir.Constant(i32, t)))
    return s


@intrinsic
def _fields_dot_simd(typingctx, codes, r, starts, F, yb, levels):
    ok = (isinstance(codes, types.Array) and codes.ndim == 2 and codes.dtype == types.uint8
          and codes.layout == "C" and isinstance(F, types.Array) and F.ndim == 3 and F.dtype == types.int32
          and F.layout == "C" and isinstance(starts, types.Array) and starts.dtype == types.int64
          and starts.layout == "C" and isinstance(yb, types.Array) and yb.dtype == types.float32
          and yb.layout == "C" and isinstance(levels, types.Array) and levels.dtype == types.float32
          and levels.layout == "C")
    if not ok:
        return None
    return types.float32(codes, types.int64, starts, F, yb, levels), _fields_dot_codegen


def fields_dot(codes, r, starts, F, yb, levels):
    """Table-free ADC of code row r over the field blocks (``Encoder.field_layout``):
    float32 sum of yb[16 b + l] * levels[lane l's code + offset]."""


@overload(fields_dot)
def _fields_dot_impl(codes, r, starts, F, yb, levels):
    if FIELD_SIMD and all(a.layout == "C" for a in (codes, starts, F, yb, levels)):
        def dot_simd(codes, r, starts, F, yb, levels):
            return _fields_dot_simd(codes, r, starts, F, yb, levels)
        return dot_simd

    def dot_lanes(codes, r, starts, F, yb, levels):
        return fields_dot_lanes(codes, r, starts, F, yb, levels)
    return dot_lanes


@kernel
def fields_dot_lanes(codes, r, starts, F, yb, levels):
    """``fields_dot`` one lane at a time (targets without the byte shuffle)."""
    s = np.float32(0.0)
    for b in range(starts.shape[0]):
        for lane in range(FIELD_LANES):
            g = starts[b] + ((np.int64(F[b, 0, lane >> 2]) >> (8 * (lane & 3))) & 0xFF)
            c = ((np.int64(codes[r, g]) >> F[b, 1, lane]) & F[b, 2, lane]) + F[b, 3, lane]
            s += yb[b * FIELD_LANES + lane] * levels[c]
    return s


@kernel
def rescore_fields_one(Y, qi, levels, fields, codes, scales, cand, hv, hi):
    """Direct ADC (no tables) of query qi's candidate rows: sum over fields of
    y_j * L_j[code_j] (float32 levels and sums: ~1e-6 relative error, far
    below the quantization error; float64 sums took 15% longer).
    ``fields``: ``Encoder.field_layout()`` = (rows (dim, byte, shift, mask,
    level offset) sorted by byte, block starts, block lanes, lane dims).
    With blocks: 16 fields at a time (``fields_dot``; 381 fields of 288
    bytes, rows in cache: ~170 vs ~480 ns per row one field at a time),
    else four rows at a time, one field after another, each field's row
    packed into one int64 (one load per field)."""
    table, starts, F, lane_dim = fields
    has_scale = scales.shape[0] > 0
    if starts.shape[0] > 0:
        yb = np.empty(lane_dim.shape[0], np.float32)
        for t in range(lane_dim.shape[0]):
            j = lane_dim[t]
            yb[t] = Y[qi, j] if j >= 0 else np.float32(0.0)
        for t in range(cand.shape[1]):  # the rows load while the first ones are scored
            r = cand[qi, t]
            if r >= 0:
                for g in range(0, codes.shape[1], 64):
                    prefetch(codes, r, g)
                prefetch(codes, r, codes.shape[1] - 1)  # a row's last line when it straddles one more
        for t in range(cand.shape[1]):
            r = cand[qi, t]
            if r >= 0:
                s = fields_dot(codes, r, starts, F, yb, levels)
                if has_scale:
                    s *= scales[r]
                heap_offer(hv, hi, s, r)
        heap_to_sorted(hv, hi)
        return
    fields = table
    nf = fields.shape[0]
    yf = np.empty(nf, np.float32)
    meta = np.empty(nf, np.int64)  # byte | shift << 16 | mask << 24 | offset << 32
    for f in range(nf):
        yf[f] = Y[qi, fields[f, 0]]
        meta[f] = fields[f, 1] | (fields[f, 2] << 16) | (fields[f, 3] << 24) | (fields[f, 4] << 32)
    nc = _touch_rows(codes, cand, qi)
    rows = _valid_rows(cand, qi, nc)
    for t in range(0, nc, 4):
        r0 = rows[t]
        r1 = rows[min(t + 1, nc - 1)]
        r2 = rows[min(t + 2, nc - 1)]
        r3 = rows[min(t + 3, nc - 1)]
        c0 = codes[r0]
        c1 = codes[r1]
        c2 = codes[r2]
        c3 = codes[r3]
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        for f in range(nf):
            mt = meta[f]
            g = mt & 0xFFFF
            sh = (mt >> 16) & 0xFF
            m = (mt >> 24) & 0xFF
            o = mt >> 32
            y = yf[f]
            s0 += y * levels[o + ((np.int64(c0[g]) >> sh) & m)]
            s1 += y * levels[o + ((np.int64(c1[g]) >> sh) & m)]
            s2 += y * levels[o + ((np.int64(c2[g]) >> sh) & m)]
            s3 += y * levels[o + ((np.int64(c3[g]) >> sh) & m)]
        _offer4(hv, hi, s0, s1, s2, s3, r0, r1, r2, r3, nc - t, scales, has_scale)
    heap_to_sorted(hv, hi)


@kernel
def rescore_offset_one(Y, Q, qi, mean, levels, fields, codes, scales, cand, kk, out_v, out_r):
    """Fused searches: table-free ADC of the candidate rows cand (1, c) of
    rotated query Y[0] (``rescore_fields_one``), top-kk into out_v / out_r,
    plus <Q[qi], mean> (float64): inner-product estimates."""
    rescore_fields_one(Y, 0, levels, fields, codes, scales, cand, out_v, out_r)
    off = 0.0
    for j in range(Q.shape[1]):
        off += np.float64(Q[qi, j]) * mean[j]
    for t in range(kk):
        if out_r[t] >= 0:
            out_v[t] = np.float32(np.float64(out_v[t]) + off)


@kernel
def ids_of_rows_one(out_v, out_r, out_ids, ids):
    """out_ids = ids[out_r] for one query's result row (-1 rows: id -1, score -inf)."""
    for t in range(out_r.shape[0]):
        r = out_r[t]
        if r >= 0:
            out_ids[t] = ids[r]
        else:
            out_v[t] = -np.inf


@kernel
def rescore_fields(Y, levels, fields, codes, scales, cand, kk):
    """Full-precision ADC of each query's candidate rows (-1 = none) computed
    field by field from the levels, without lookup tables (cheaper than
    building 256-entry tables when there are few candidates); top-kk
    (scores descending, rows, -1 padded)."""
    nq = cand.shape[0]
    out_v = np.full((nq, kk), -np.inf, np.float32)
    out_i = np.full((nq, kk), -1, np.int64)
    for qi in range(nq):
        rescore_fields_one(Y, qi, levels, fields, codes, scales, cand, out_v[qi], out_i[qi])
    return out_v, out_i


@kernel
def scan_lists_topk(tables, codes, scales, list_ptr, list_rows, probes, kk):
    """IVF scan: for each query, full-precision ADC over the rows of its probed
    lists (``probes`` (nq, nprobe) list ids, -1 = none); top-kk per query."""
    nq = probes.shape[0]
    has_scale = scales.shape[0] > 0
    out_v = np.full((nq, kk), -np.inf, np.float32)
    out_i = np.full((nq, kk), -1, np.int64)
    for qi in range(nq):
        hv = out_v[qi]
        hi = out_i[qi]
        for p in range(probes.shape[1]):
            lst = probes[qi, p]
            if lst < 0:
                continue
            for t in range(list_ptr[lst], list_ptr[lst + 1]):
                r = list_rows[t]
                heap_offer(hv, hi, row_score(tables[qi], codes, scales, has_scale, r), r)
        heap_to_sorted(hv, hi)
    return out_v, out_i


#: float16 matrices (uint16 bit patterns) widened by the CPU (F16C
#: ``vcvtph2ps``) in 16-lane vectors; elsewhere row by row with integer
#: operations (``_widen_half``), the same values
HALF_SIMD = target_has("f16c") and target_has("avx2")


def _half_to_float(val):
    """float32 value of the float16 bit pattern ``val`` (uint16, finite): exact."""


@overload(_half_to_float)
def _half_to_float_impl(val):
    def impl(val):
        h = np.uint32(val)
        u = np.empty(1, np.uint32)
        u[0] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))
        return u.view(np.float32)[0] * np.float32(5.192296858534828e+33)  # 2^112: exact
    return impl


def weighted_row_sum(qv, R, o):
    """o[j] = sum_t qv[t] R[t, j] (float32; ``R`` float32, or float16 bit
    patterns as uint16: half the bytes, the same sums as the float32 matrix
    of the same values).  Eight rows of R per pass over o, each pass adding
    ((q0 r0 + q1 r1) + (q2 r2 + q3 r3)) + ((q4 r4 + q5 r5) + (q6 r6 + q7 r7))
    to o[j] (an eighth of the loads and stores of o: 13.5 -> 9.5 us at 384
    x 384 with R in L2), then one row at a time."""


@overload(weighted_row_sum)
def _weighted_row_sum_impl(qv, R, o):
    if R.dtype == types.uint16 and HALF_SIMD and qv.layout == "C" and R.layout == "C" and o.layout == "C":
        def half_simd(qv, R, o):
            _half_row_sum(qv, R, o)
        return half_simd
    if R.dtype == types.uint16:
        def half_rows(qv, R, o):  # widened row by row: the same float32 values
            n, m = R.shape
            W = np.empty((min(n, 8), m), np.float32)
            for j in range(m):
                o[j] = 0.0
            t = 0
            while t < n:
                c = min(8, n - t)
                for i in range(c):
                    for j in range(m):
                        W[i, j] = _half_to_float(R[t + i, j])
                _row_sum_pass(qv[t:], W, 0, c, o)
                t += c
        return half_rows

    def float_rows(qv, R, o):
        n, m = R.shape
        for j in range(m):
            o[j] = 0.0
        t = 0
        while t < n:
            c = min(8, n - t)
            _row_sum_pass(qv, R, t, c, o)
            t += c
    return float_rows


@kernel
def _row_sum_pass(qv, R, t, c, o):
    """o[j] += the sum over rows t..t+c of R (c <= 8) weighted by qv[t..t+c]:
    for c = 8 the tree of ``weighted_row_sum``, else row by row."""
    m = o.shape[0]
    if c == 8:
        q0, q1, q2, q3 = qv[t], qv[t + 1], qv[t + 2], qv[t + 3]
        q4, q5, q6, q7 = qv[t + 4], qv[t + 5], qv[t + 6], qv[t + 7]
        r0, r1, r2, r3 = R[t], R[t + 1], R[t + 2], R[t + 3]
        r4, r5, r6, r7 = R[t + 4], R[t + 5], R[t + 6], R[t + 7]
        for j in range(m):
            o[j] += ((q0 * r0[j] + q1 * r1[j]) + (q2 * r2[j] + q3 * r3[j])) + \
                ((q4 * r4[j] + q5 * r5[j]) + (q6 * r6[j] + q7 * r7[j]))
    else:
        for i in range(c):
            q = qv[t + i]
            r = R[t + i]
            for j in range(m):
                o[j] += q * r[j]


def _half_row_sum_codegen(context, builder, signature, args):
    """``weighted_row_sum`` of a float16 matrix (uint16 bits), 16 columns per
    vector (``fpext`` of <16 x half>: ``vcvtph2ps``), the float32 operations
    of the float32 build in the same order (so the same sums); the last m %
    16 columns one at a time."""
    qv_t, R_t, o_t = signature.args
    qv, R, o = (context.make_array(t)(context, builder, a) for t, a in zip(signature.args, args))
    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    half, flt = ir.HalfType(), ir.FloatType()
    L = 16
    vi, vh, vf = ir.VectorType(i16, L), ir.VectorType(half, L), ir.VectorType(flt, L)
    n = builder.extract_value(R.shape, 0)
    m = builder.extract_value(R.shape, 1)
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    qp, rp, op = qv.data, R.data, o.data
    with cgutils.for_range(builder, m) as loop:
        builder.store(ir.Constant(flt, 0.0), builder.gep(op, [loop.index]))
    nvec = builder.mul(builder.udiv(m, c(L)), c(L))

    def widen(ptr, lanes):
        if lanes == 1:
            return builder.fpext(builder.bitcast(builder.load(ptr), half), flt)
        h = builder.load(builder.bitcast(ptr, vi.as_pointer()), align=2)
        return builder.fpext(builder.bitcast(h, vh), vf)

    def qsplat(t, lanes):
        q = builder.load(builder.gep(qp, [t]))
        return q if lanes == 1 else splat(builder, vf, q)

    def column_loops(body):
        # body(j, lanes): vector steps over the first nvec columns, then the rest
        with cgutils.for_range_slice(builder, c(0), nvec, c(L)) as (j, _):
            body(j, L)
        with cgutils.for_range_slice(builder, nvec, m, c(1)) as (j, _):
            body(j, 1)

    def oref(j, lanes):
        ptr = builder.gep(op, [j])
        return ptr if lanes == 1 else builder.bitcast(ptr, vf.as_pointer())

    ngroups = builder.udiv(n, c(8))
    with cgutils.for_range(builder, ngroups) as g:
        t0 = builder.mul(g.index, c(8))
        rows = [builder.gep(rp, [builder.mul(builder.add(t0, c(i)), m)]) for i in range(8)]

        def group(j, lanes):
            p = [builder.fmul(qsplat(builder.add(t0, c(i)), lanes), widen(builder.gep(rows[i], [j]), lanes))
                 for i in range(8)]
            s = builder.fadd(builder.fadd(builder.fadd(p[0], p[1]), builder.fadd(p[2], p[3])),
                             builder.fadd(builder.fadd(p[4], p[5]), builder.fadd(p[6], p[7])))
            ptr = oref(j, lanes)
            builder.store(builder.fadd(builder.load(ptr, align=4), s), ptr, align=4)
        column_loops(group)
    with cgutils.for_range_slice(builder, builder.mul(ngroups, c(8)), n, c(1)) as (t, _):
        row = builder.gep(rp, [builder.mul(t, m)])

        def single(j, lanes):
            x = builder.fmul(qsplat(t, lanes), widen(builder.gep(row, [j]), lanes))
            ptr = oref(j, lanes)
            builder.store(builder.fadd(builder.load(ptr, align=4), x), ptr, align=4)
        column_loops(single)
    return context.get_dummy_value()


@intrinsic
def _half_row_sum(typingctx, qv, R, o):
    ok = (isinstance(R, types.Array) and R.ndim == 2 and R.dtype == types.uint16 and R.layout == "C"
          and all(isinstance(a, types.Array) and a.ndim == 1 and a.dtype == types.float32 and a.layout == "C"
                  for a in (qv, o)))
    if not ok:
        return None
    return types.void(qv, R, o), _half_row_sum_codegen


@kernel
def _rotate_row(Q, R, i, out):
    """out[i] = Q[i] @ R (float32 sums: relative error ~1e-6 at d = 384, far
    below the quantization error; float64 sums took twice as long)."""
    weighted_row_sum(Q[i], R, out[i])


@kernel
def _coarse_luts(Y, q, slot_dim, centT, lut):
    """lut[m, c] = sum_s centT[m, s, c] * Y[q, slot_dim[m, s]] (slot -1: none):
    query q's scores of the 16 centroids of each 4-bit sub-quantizer m."""
    M, dsub, ncent = centT.shape
    for m in range(M):
        for c in range(ncent):
            lut[m, c] = 0.0
        for s in range(dsub):
            j = slot_dim[m, s]
            if j >= 0:
                y = Y[q, j]
                for c in range(ncent):
                    lut[m, c] += centT[m, s, c] * y


@kernel
def coarse_byte_tables(Y, slot_dim, centT):
    """(nq, M/2, 256) float32 tables of 4-bit PQ codes packed two per byte:
    T[q, g, hi << 4 | lo] = lut[2g + 1, hi] + lut[2g, lo] (lut: ``_coarse_luts``)."""
    M = centT.shape[0]
    nq = Y.shape[0]
    out = np.empty((nq, M // 2, 256), np.float32)
    lut = np.empty((M, 16), np.float32)
    for q in range(nq):
        _coarse_luts(Y, q, slot_dim, centT, lut)
        for g in range(M // 2):
            T = out[q, g]
            for hi in range(16):
                h = lut[2 * g + 1, hi]
                for lo in range(16):
                    T[hi * 16 + lo] = h + lut[2 * g, lo]
    return out


#: int16 navigation tables: entries span [NAV_LOW, NAV_LOW + NAV_SPAN]
NAV_LOW, NAV_SPAN = -32768, 65535


def _nav_fill_codegen(context, builder, signature, args):
    """Tg[16 hi + lo] = int16(min(int32(hs[hi] + ls[lo]), NAV_SPAN) + NAV_LOW)
    for hi, lo < 16: one 16-lane float add, truncation, clamp and narrowing
    store per hi (the scalar loops paid a vectorised loop's set-up and
    overlap checks for every 16 entries)."""
    T_t, h_t, l_t = signature.args
    T = context.make_array(T_t)(context, builder, args[0])
    hs = context.make_array(h_t)(context, builder, args[1])
    ls = context.make_array(l_t)(context, builder, args[2])
    i16, i32, i64, flt = ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
    vf, v32, v16 = ir.VectorType(flt, 16), ir.VectorType(i32, 16), ir.VectorType(i16, 16)
    lo = builder.load(builder.bitcast(ls.data, vf.as_pointer()), align=4)
    span = ir.Constant(v32, [NAV_SPAN] * 16)
    shift = ir.Constant(v32, [NAV_LOW] * 16)
    splat = ir.Constant(ir.VectorType(i32, 16), [0] * 16)
    for hi in range(16):
        h = builder.load(builder.gep(hs.data, [ir.Constant(i64, hi)]))
        hv = builder.insert_element(ir.Constant(vf, ir.Undefined), h, ir.Constant(i32, 0))
        hv = builder.shuffle_vector(hv, hv, splat)
        v = builder.fptosi(builder.fadd(hv, lo), v32)
        v = builder.select(builder.icmp_signed(">", v, span), span, v)
        out = builder.trunc(builder.add(v, shift), v16)
        dst = builder.gep(T.data, [ir.Constant(i64, 16 * hi)])
        builder.store(out, builder.bitcast(dst, v16.as_pointer()), align=2)
    return context.get_dummy_value()


@intrinsic
def _nav_fill16(typingctx, Tg, hs, ls):
    ok = (isinstance(Tg, types.Array) and Tg.ndim == 1 and Tg.dtype == types.int16 and Tg.layout == "C"
          and all(isinstance(a, types.Array) and a.dtype == types.float32 and a.layout == "C" for a in (hs, ls)))
    if not ok:
        return None
    return types.void(Tg, hs, ls), _nav_fill_codegen


@kernel
def nav_table_one(Y, q, slot_dim, centT, lut, low, T):
    """Query q's int16 navigation tables into T (M/2, 256) (see
    ``coarse_byte_tables_i16``); lut (M, 16) and low (M/2,) float32 scratch."""
    M = centT.shape[0]
    G = M // 2
    _coarse_luts(Y, q, slot_dim, centT, lut)
    span = np.float32(0.0)
    for g in range(G):
        lo_min = lut[2 * g, 0]
        lo_max = lo_min
        hi_min = lut[2 * g + 1, 0]
        hi_max = hi_min
        for c in range(1, 16):
            lo_min = min(lo_min, lut[2 * g, c])
            lo_max = max(lo_max, lut[2 * g, c])
            hi_min = min(hi_min, lut[2 * g + 1, c])
            hi_max = max(hi_max, lut[2 * g + 1, c])
        low[g] = lo_min + hi_min
        span = max(span, (lo_max + hi_max) - low[g])
    inv = np.float32(NAV_SPAN) / span if span > 0 else np.float32(0.0)
    ls = np.empty(16, np.float32)  # 16 centroids per 4-bit sub-quantizer (FastScanner)
    hs = np.empty(16, np.float32)
    for g in range(G):
        for c in range(16):
            ls[c] = lut[2 * g, c] * inv
            hs[c] = (lut[2 * g + 1, c] - low[g]) * inv + np.float32(0.5)
        _nav_fill16(T[g], hs, ls)  # entries are >= 0.5 before truncation: rounded half up


@kernel
def coarse_byte_tables_i16(Y, slot_dim, centT):
    """(nq, M/2, 256) int16 tables of 4-bit PQ codes packed two per byte, for
    ranking rows of one query (graph navigation): entry [q, g, hi << 4 | lo]
    = round((lut[2g + 1, hi] + lut[2g, lo] - min_g) / step) + NAV_LOW (lut:
    ``_coarse_luts``, as in ``coarse_byte_tables``), min_g the smallest
    entry of byte table g and step = (largest entry span over g) / NAV_SPAN.
    A row's sum of lookups (int64) is then its coarse score / step plus a
    per-query constant, to within M/4 steps; half the bytes of float32
    tables (they stay in L1 during the walk)."""
    M = centT.shape[0]
    G = M // 2
    nq = Y.shape[0]
    out = np.empty((nq, G, 256), np.int16)
    lut = np.empty((M, 16), np.float32)
    low = np.empty(G, np.float32)
    for q in range(nq):
        nav_table_one(Y, q, slot_dim, centT, lut, low, out[q])
    return out


@kernel
def rotate_rows(Q, R):
    """Q @ R (float32 rows; R float32, or the bit patterns of a float16 matrix)."""
    out = np.empty((Q.shape[0], R.shape[1]), np.float32)
    for i in range(Q.shape[0]):
        _rotate_row(Q, R, i, out)
    return out


@kernel
def _probe_one(Y, dims, Ct, spread, i, nprobe, acc, hv, hi, qv, raw):
    """Lists of the ``nprobe`` largest <y_i[dims], Ct[:, l]> + |qv| spread[l],
    best first (float32 accumulation, vectorised over the lists: the scores
    only order the lists).  Only the ``dims`` entries of Y's row i are read;
    ``qv`` is the query itself (|q| = |y|: the rotation is orthogonal).
    ``raw`` (nprobe or 0 entries): the chosen lists' <y_i[dims], Ct[:, l]>
    (without the spread term; residual coarse codes add it per list)."""
    m = Ct.shape[1]
    qd = np.empty(dims.shape[0], np.float32)
    for t in range(dims.shape[0]):
        qd[t] = Y[i, dims[t]]
    weighted_row_sum(qd, Ct, acc)
    pre = acc.copy() if raw.shape[0] > 0 else acc[:0]
    if spread.shape[0] > 0:
        nrm = 0.0
        for t in range(qv.shape[0]):
            nrm += np.float64(qv[t]) * qv[t]
        qn = np.float32(np.sqrt(nrm))
        for j in range(m):
            acc[j] += qn * spread[j]
    # best list first: the fast-scan collector's threshold then rises early,
    # fewer rows pass it (with its faster radix select, 10^6 IVF1024
    # nprobe=40 keeping 400 candidates: scan 153 -> 97 us)
    top_sorted(acc[:m], hv, hi)
    for t in range(raw.shape[0]):
        raw[t] = pre[hi[t]]


#: ``top_sorted``: value bins of the histogram that bounds the survivors,
#: and the most survivors ranked by counting (more: a stable sort)
TOP_BINS = 64
TOP_RANKED = 512


@kernel
def top_sorted(vals, hv, hi):
    """(hv, hi) <- the len(hv) largest of the finite ``vals`` and their
    indices, descending, equal values lower index first (a stable sort's
    order; len(hv) <= len(vals)).  A histogram of TOP_BINS equal-width value
    bins gives the lowest bin holding the k-th largest; only values in it
    or above survive (10^6 IVF1024 probes, 44 of 1,024: ~60), ranked by
    counting the larger ones (branch-free: a heap's unpredictable
    sift-downs cost 6 us per 1,024 values, this ~3), or sorted when more
    than TOP_RANKED survive."""
    m = vals.shape[0]
    k = hv.shape[0]
    lo = vals[0]
    top = vals[0]
    for j in range(m):
        lo = min(lo, vals[j])
        top = max(top, vals[j])
    width = (top - lo) / TOP_BINS
    inv = np.float32(1.0) / width if width > 0 else np.float32(0.0)
    bin_of = np.empty(m, np.int32)
    for j in range(m):
        bin_of[j] = min(np.int32((vals[j] - lo) * inv), np.int32(TOP_BINS - 1))
    bins = np.zeros(TOP_BINS, np.int64)
    for j in range(m):
        bins[bin_of[j]] += 1
    cut = TOP_BINS - 1
    above = bins[cut]
    while above < k:
        cut -= 1
        above += bins[cut]
    sv = np.empty(above + 1, vals.dtype)
    si = np.empty(above + 1, np.int64)
    s = 0
    for j in range(m):  # branch-free: every value written, the survivors kept
        sv[s] = vals[j]
        si[s] = j
        s += bin_of[j] >= cut
    if s > TOP_RANKED:  # many survivors: a stable sort of them
        order = np.argsort(-sv[:s], kind="mergesort")
        for t in range(k):
            hv[t] = sv[order[t]]
            hi[t] = si[order[t]]
        return
    for t in range(s):
        v = sv[t]
        r = 0
        for u in range(s):
            r += sv[u] > v
        for u in range(t):
            r += sv[u] == v
        if r < k:
            hv[r] = v
            hi[r] = si[t]


@kernel
def probe_lists(Y, dims, Ct, spread, nprobe, Q):
    """(nq, nprobe) ids of the lists with the largest probe scores (best
    first): <y[dims], c_l> over the kept dimensions ``dims`` of each
    transformed query row (centroids: columns of Ct, len(dims) x nlist) plus
    |q| spread[l], q the row of Q (the untransformed queries; ``spread``
    empty: no such term); and (nq, nprobe) float32 their <y[dims], c_l>."""
    out = np.empty((Y.shape[0], nprobe), np.int64)
    raw = np.empty((Y.shape[0], nprobe), np.float32)
    acc = np.empty(Ct.shape[1], np.float32)
    hv = np.empty(nprobe, np.float32)
    for i in range(Y.shape[0]):
        _probe_one(Y, dims, Ct, spread, i, nprobe, acc, hv, out[i], Q[i], raw[i])
    return out, raw


@kernel
def residual_energy(codes, scales, levels, level_off, bits, byte_of, shift_of, assign, Cr, w):
    """Per row i: sum_j w_j (z_ij - Cr[assign[i], j])^2, z the decoded row
    (times its scale when ``scales`` is not empty) and Cr the (nlist, d)
    centroids in the same (transformed) space; float64."""
    n = codes.shape[0]
    d = Cr.shape[1]
    out = np.empty(n, np.float64)
    has_scale = scales.shape[0] > 0
    for i in range(n):
        lst = assign[i]
        sc = scales[i] if has_scale else np.float32(1.0)
        s = 0.0
        for j in range(d):
            z = 0.0
            b = bits[j]
            if b > 0:
                c = (codes[i, byte_of[j]] >> shift_of[j]) & ((1 << b) - 1)
                z = levels[level_off[j] + c] * sc
            r = z - Cr[lst, j]
            s += w[j] * r * r
        out[i] = s
    return out


@kernel
def table_sums(tables, codes, scales, rows):
    """sum_g tables[q, g, codes[row, g]] (* scales[row]) for rows (nq, k); 0 for -1."""
    nq, k = rows.shape
    out = np.zeros((nq, k), np.float64)
    has_scale = scales.shape[0] > 0
    for qi in range(nq):
        for t in range(k):
            if rows[qi, t] >= 0:
                out[qi, t] = row_score(tables[qi], codes, scales, has_scale, rows[qi, t])
    return out


@kernel
def add_offsets(V, Q, mean):
    """float32 V[i, t] + <Q[i], mean> (the dot product accumulated in float64;
    -inf entries stay -inf): ADC scores of centred codes -> inner products."""
    out = np.empty(V.shape, np.float32)
    for i in range(V.shape[0]):
        off = 0.0
        for j in range(Q.shape[1]):
            off += np.float64(Q[i, j]) * mean[j]
        for t in range(V.shape[1]):
            out[i, t] = np.float32(np.float64(V[i, t]) + off)
    return out


@kernel
def rows_to_ids(scores, rows, ids):
    """(scores float32, ids int64) of result rows (nq, k): ids[rows], and
    -inf / -1 where a row is -1 (fewer than k found)."""
    nq, k = rows.shape
    out_s = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    for i in range(nq):
        for t in range(k):
            r = rows[i, t]
            if r >= 0:
                out_s[i, t] = scores[i, t]
                out_i[i, t] = ids[r]
            else:
                out_s[i, t] = -np.inf
                out_i[i, t] = -1
    return out_s, out_i
