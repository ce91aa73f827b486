"""SIMD ADC of a short list of candidate rows with 16-bit lookup tables.

Picking the best kk of a few hundred coarse candidates before the exact
re-rank needs the full ADC of each candidate row (every field of its code
row).  Row by row, that is a gather of levels per 16 fields (~200 ns per
384-dimension row: as slow as the exact dot product it saves).  Here 64
candidates are scored at once, one byte lane per row:

Transposition.  Eight bytes of 8 rows come in one 8-lane qword gather; a
byte shuffle groups them byte by byte and shuffles join eight gathers, so
``T[g]`` (64 bytes) holds byte g of the 64 rows (``used / 8`` x 8 gathers
per group, written to a scratch buffer that stays in L1; the layout may
hold some fields only, then only the leading ``used`` bytes of a row that
hold them are read).  Against 16-lane dword gathers (4 bytes of 16 rows):
18.5 -> 15.7 ns per row of 192 bytes, half the gathered elements.

Tables.  Per query, field f (code c, dimension j, level offset o) has the
float entries y_j L[o + c]; they are quantized to 16 bits (minus the
field's minimum, times one scale for all fields: the widest span maps to
65535), split into a low and a high byte plane.  A field of w bits has 64
(w <= 6), 128 (w = 7) or 256 (w = 8) bytes per plane.

Lookups.  A field's codes for 64 rows are (T[g] >> shift) & mask; the table
entries come from ``vpermb`` (w <= 6: one 64-byte table), ``vpermi2b``
(w = 7: two) or two ``vpermi2b`` and a blend on the code's top bit (w = 8),
once per plane.  Bytes are summed as uint16 lanes (FAISS's fast-scan trick:
even + 256 odd into one accumulator, the odd bytes into another) and widened
to uint32 every ``SEGMENT`` fields (255 x 256 < 2^16).  A row's integer sum
S = 256 S_hi + S_lo gives the estimate S / scale + sum of the field minima,
within (number of fields) / (2 scale) of the float ADC (16-bit tables: the
ranking of the float ADC; 8-bit tables lost 0.007 recall@10 at 10^6).

Needs AVX-512 VBMI (``CAND_SIMD``); elsewhere the search plans do not pick
this path (``candidate_block_scalar``, the same integers one row at a time,
is the tests' reference)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .._numba import kernel, prefetch, splat, target_has, vector_gep
from .topk import heap_offer, heap_to_sorted

#: rows scored together (one byte lane each)
GROUP = 64
#: fields summed in uint16 lanes before widening (each entry <= 255 per plane)
SEGMENT = 256
#: table bytes per plane of a field of width class 0 (<= 6 bits), 1 (7), 2 (8)
CLASS_BYTES = (64, 128, 256)
#: AVX-512 byte permutes available: the SIMD kernel can run
CAND_SIMD = target_has("avx512vbmi") and target_has("avx512bw")


def candidate_layout(field_table: np.ndarray, level_off: np.ndarray, nbytes: int):
    """The candidate ADC's view of ``Encoder.field_table()`` rows (dim, byte,
    shift, mask, level offset; all fields, or some) of code rows of
    ``nbytes`` (>= 8) bytes: fields ordered by width class (<= 6, 7, 8
    bits).  Returns (``tab_meta`` int64 (nf, 3): dim, level offset, number
    of levels; ``fb`` int32 (nf, 4): byte, shift, mask, table offset in a
    plane; ``segs`` int64 (ns, 3): class, first field, end field, at most
    ``SEGMENT`` fields each; ``plane`` bytes per table plane; ``used``: the
    leading bytes of a row the fields lie in, at least 8, transposed)."""
    table = np.asarray(field_table, np.int64)
    width = np.zeros(table.shape[0], np.int64)
    if table.shape[0]:
        width = np.log2(table[:, 3] + 1).round().astype(np.int64)
    if np.any(width > 8) or np.any(width < 1):
        raise ValueError("fields must be 1 to 8 bits wide")
    cls = np.where(width <= 6, 0, width - 6)
    order = np.argsort(cls, kind="stable")
    table, cls = table[order], cls[order]
    size = np.asarray(CLASS_BYTES, np.int64)[cls]
    toff = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64) if size.size else size
    plane = int(size.sum())
    nlev = np.asarray(level_off, np.int64)[table[:, 0] + 1] - table[:, 4]
    tab_meta = np.ascontiguousarray(np.stack([table[:, 0], table[:, 4], nlev], axis=1).astype(np.int64))
    fb = np.ascontiguousarray(np.stack([table[:, 1], table[:, 2], table[:, 3], toff], axis=1).astype(np.int32))
    segs = []
    for c in range(3):
        idx = np.nonzero(cls == c)[0]
        for s in range(0, idx.size, SEGMENT):
            part = idx[s:s + SEGMENT]
            segs.append((c, int(part[0]), int(part[-1]) + 1))
    segs = np.asarray(segs, np.int64).reshape(-1, 3)
    if nbytes < 8:
        raise ValueError("code rows of the candidate ADC need at least 8 bytes")
    used = min(int(nbytes), max(8, int(table[:, 1].max()) + 1 if table.shape[0] else 8))
    return tab_meta, fb, segs, plane, used


@kernel
def candidate_tables(Y, qi, tab_meta, fb, plane, levels, mins, u16, tab):
    """Query qi's 16-bit tables (two byte planes in ``tab``, 2 * plane bytes;
    scratch ``mins`` float32 (nf,), ``u16`` uint16 (plane,)); returns (1 /
    scale, sum of the field minima) (float64): a row's estimate is S / scale
    + that sum.  Each field's levels are increasing (``candidate_layout``
    checks), so its extremes are its end entries.  The 16-bit entries go to
    ``u16`` field by field (one short loop each), then one pass over the
    whole plane splits them into the byte planes (per field, three loops
    cost 11.7 us per query for 188 fields / 23,552 entries; this 5)."""
    nf = tab_meta.shape[0]
    span = np.float32(0.0)
    bias = 0.0
    for f in range(nf):
        y = Y[qi, tab_meta[f, 0]]
        o = tab_meta[f, 1]
        a = y * levels[o]
        b = y * levels[o + tab_meta[f, 2] - 1]
        lo = min(a, b)
        mins[f] = lo
        span = max(span, max(a, b) - lo)
        bias += lo
    scale = np.float32(65535.0) / span if span > 0 else np.float32(0.0)
    for f in range(nf):
        y = Y[qi, tab_meta[f, 0]]
        n = tab_meta[f, 2]
        lv = levels[tab_meta[f, 1]:tab_meta[f, 1] + n]
        m = mins[f]
        out = u16[fb[f, 3]:fb[f, 3] + n]
        # (v - m) scale <= 65535 (+ rounding): the sum stays below 65536
        for c in range(n):
            out[c] = np.uint16(np.int32((y * lv[c] - m) * scale + np.float32(0.5)))
    # entries between fields (alignment) are never looked up: whatever they hold
    lo_plane = tab[:plane]
    hi_plane = tab[plane:2 * plane]
    for e in range(plane):
        lo_plane[e] = np.uint8(u16[e] & np.uint16(255))
    for e in range(plane):
        hi_plane[e] = np.uint8(u16[e] >> np.uint16(8))
    return (1.0 / np.float64(scale) if scale > 0 else 0.0), bias


@kernel
def candidate_block_scalar(codes, rows, r0, tab, fb, plane, out):
    """The integer sums S (uint32) of rows[r0:r0 + 64] one row and field at a
    time: the SIMD kernel's reference."""
    for v in range(GROUP):
        r = rows[r0 + v]
        lo = np.uint32(0)
        hi = np.uint32(0)
        for f in range(fb.shape[0]):
            c = (np.int64(codes[r, fb[f, 0]]) >> fb[f, 1]) & fb[f, 2]
            lo += np.uint32(tab[fb[f, 3] + c])
            hi += np.uint32(tab[plane + fb[f, 3] + c])
        out[v] = (hi << np.uint32(8)) + lo


def _candidate_block_codegen(context, builder, signature, args):
    """LLVM IR of ``_candidate_block_simd`` for one block of 64 rows: (1) the
    transposition of the rows' first ``used`` code bytes into T (qword
    gathers, byte shuffles), (2) the table lookups segment by segment
    (vpermb / vpermi2b by table size class) into 16-bit accumulators,
    widened to 32 bits after each segment, (3) the interleaved store of
    the sums.  Long but kept whole: every stage emits into the same builder
    and uses the same values (the LLVM types, the array pointers, the
    intrinsics declared on the module), which split functions would all
    take as arguments."""
    codes_t, rows_t, _, T_t, tab_t, fb_t, segs_t, _, _, out_t = signature.args
    codes = context.make_array(codes_t)(context, builder, args[0])
    rows = context.make_array(rows_t)(context, builder, args[1])
    T = context.make_array(T_t)(context, builder, args[3])
    tab = context.make_array(tab_t)(context, builder, args[4])
    fb = context.make_array(fb_t)(context, builder, args[5])
    segs = context.make_array(segs_t)(context, builder, args[6])
    out = context.make_array(out_t)(context, builder, args[9])
    r0, plane, used = args[2], args[7], args[8]
    i1, i8, i16, i32, i64 = (ir.IntType(w) for w in (1, 8, 16, 32, 64))
    v64b, v32w, v32d, v8q = (ir.VectorType(t, n) for t, n in ((i8, 64), (i16, 32), (i32, 32), (i64, 8)))
    mod = builder.module
    permb = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b]),
                                           "llvm.x86.avx512.permvar.qi.512")
    perm2b = cgutils.get_or_insert_function(mod, ir.FunctionType(v64b, [v64b, v64b, v64b]),
                                            "llvm.x86.avx512.vpermi2var.qi.512")
    nbytes = builder.extract_value(codes.shape, 1)
    base = codes.data
    rows_ptr = builder.gep(rows.data, [r0])
    tp = T.data

    def c64(v):
        return ir.Constant(i64, v)

    def load(ptr, off, vt, align=1):
        return builder.load(builder.bitcast(builder.gep(ptr, [off]), vt.as_pointer()), align=align)

    # 1. transposition (qword gathers): T[g * 64 + v] = codes[rows[r0 + v], g], g < used
    # (8 <= used <= nbytes: the last qword, at used - 8, overlaps the one before)
    gather8 = cgutils.get_or_insert_function(
        mod, ir.FunctionType(v8q, [ir.VectorType(i64.as_pointer(), 8), i32, ir.VectorType(i1, 8), v8q]),
        "llvm.masked.gather.v8i64.v8p0i64")
    nqw = builder.udiv(builder.add(used, c64(7)), c64(8))
    nb_splat8 = splat(builder, v8q, nbytes)
    lanes8 = ir.Constant(ir.VectorType(i1, 8), [1] * 8)
    by_byte = ir.Constant(ir.VectorType(i32, 64), [8 * (m % 8) + m // 8 for m in range(64)])
    with cgutils.for_range(builder, nqw) as loop:
        o = builder.select(builder.icmp_unsigned("<", builder.mul(loop.index, c64(8)), builder.sub(used, c64(8))),
                           builder.mul(loop.index, c64(8)), builder.sub(used, c64(8)))
        o_splat = splat(builder, v8q, o)
        Z = []
        for s in range(8):
            rv = load(rows_ptr, c64(8 * s), v8q, align=8)
            idx = builder.add(builder.mul(rv, nb_splat8), o_splat)
            ptrs = builder.bitcast(vector_gep(builder, base, idx, i8), ir.VectorType(i64.as_pointer(), 8))
            g = builder.call(gather8, [ptrs, ir.Constant(i32, 1), lanes8, ir.Constant(v8q, ir.Undefined)])
            b = builder.bitcast(g, v64b)  # byte 8 v + i: byte o + i of row 8 s + v
            Z.append(builder.shuffle_vector(b, b, by_byte))  # byte 8 i + v
        for i in range(8):
            # qword i of each Z, in row order: pairs, then halves, then the whole
            sel = ir.Constant(ir.VectorType(i32, 16), list(range(8 * i, 8 * i + 8)) +
                              list(range(64 + 8 * i, 64 + 8 * i + 8)))
            A = [builder.shuffle_vector(Z[2 * p], Z[2 * p + 1], sel) for p in range(4)]
            B0 = builder.shuffle_vector(A[0], A[1], ir.Constant(ir.VectorType(i32, 32), list(range(32))))
            B1 = builder.shuffle_vector(A[2], A[3], ir.Constant(ir.VectorType(i32, 32), list(range(32))))
            w = builder.shuffle_vector(B0, B1, ir.Constant(ir.VectorType(i32, 64), list(range(64))))
            dst = builder.gep(tp, [builder.mul(builder.add(o, c64(i)), c64(GROUP))])
            builder.store(w, builder.bitcast(dst, v64b.as_pointer()), align=1)

    # 2. lookups, segment by segment
    zero_w = ir.Constant(v32w, None)
    zero_d = ir.Constant(v32d, None)
    acc = [cgutils.alloca_once_value(builder, zero_w) for _ in range(4)]  # all lo, odd lo, all hi, odd hi
    wide = [cgutils.alloca_once_value(builder, zero_d) for _ in range(4)]  # even lo, odd lo, even hi, odd hi
    eight_w = ir.Constant(v32w, [8] * 32)
    tab_hi = builder.gep(tab.data, [plane])
    nseg = builder.extract_value(segs.shape, 0)

    def accumulate(p, val):
        w = builder.bitcast(val, v32w)
        builder.store(builder.add(builder.load(acc[2 * p]), w), acc[2 * p])
        builder.store(builder.add(builder.load(acc[2 * p + 1]), builder.lshr(w, eight_w)), acc[2 * p + 1])

    def field_loop(cls, f0, f1):
        with cgutils.for_range_slice(builder, f0, f1, c64(1)) as (f, _):
            meta = builder.mul(f, c64(4))
            byte, shift, mask, toff = (
                builder.sext(builder.load(builder.gep(fb.data, [builder.add(meta, c64(k))])), i64) for k in range(4))
            t = load(tp, builder.mul(byte, c64(GROUP)), v64b)
            x = builder.lshr(t, splat(builder, v64b, builder.trunc(shift, i8)))
            x = builder.and_(x, splat(builder, v64b, builder.trunc(mask, i8)))
            for p, tbase in enumerate((tab.data, tab_hi)):
                tptr = builder.gep(tbase, [toff])
                if cls == 0:
                    val = builder.call(permb, [load(tptr, c64(0), v64b), x])
                elif cls == 1:
                    val = builder.call(perm2b, [load(tptr, c64(0), v64b), x, load(tptr, c64(64), v64b)])
                else:
                    low = builder.call(perm2b, [load(tptr, c64(0), v64b), x, load(tptr, c64(64), v64b)])
                    high = builder.call(perm2b, [load(tptr, c64(128), v64b), x, load(tptr, c64(192), v64b)])
                    val = builder.select(builder.icmp_signed("<", x, ir.Constant(v64b, None)), high, low)
                accumulate(p, val)

    with cgutils.for_range(builder, nseg) as loop:
        sp = builder.mul(loop.index, c64(3))
        cls, f0, f1 = (builder.load(builder.gep(segs.data, [builder.add(sp, c64(k))])) for k in range(3))
        for c in range(3):
            with builder.if_then(builder.icmp_signed("==", cls, c64(c))):
                field_loop(c, f0, f1)
        for p in range(2):  # widen: even bytes = all - 256 odd (mod 2^16)
            odd = builder.load(acc[2 * p + 1])
            even = builder.sub(builder.load(acc[2 * p]), builder.shl(odd, eight_w))
            builder.store(builder.add(builder.load(wide[2 * p]), builder.zext(even, v32d)), wide[2 * p])
            builder.store(builder.add(builder.load(wide[2 * p + 1]), builder.zext(odd, v32d)), wide[2 * p + 1])
            builder.store(zero_w, acc[2 * p])
            builder.store(zero_w, acc[2 * p + 1])
    eight_d = ir.Constant(v32d, [8] * 32)
    even = builder.add(builder.shl(builder.load(wide[2]), eight_d), builder.load(wide[0]))
    odd = builder.add(builder.shl(builder.load(wide[3]), eight_d), builder.load(wide[1]))
    total = builder.shuffle_vector(even, odd, ir.Constant(ir.VectorType(i32, 64),
                                                          [i // 2 + 32 * (i % 2) for i in range(64)]))
    builder.store(total, builder.bitcast(out.data, total.type.as_pointer()), align=4)
    return context.get_dummy_value()


@intrinsic
def _candidate_block_simd(typingctx, codes, rows, r0, T, tab, fb, segs, plane, used, out):
    def c_array(a, dtype, ndim):
        return isinstance(a, types.Array) and a.dtype == dtype and a.ndim == ndim and a.layout == "C"

    ok = (CAND_SIMD and c_array(codes, types.uint8, 2) and c_array(rows, types.int64, 1)
          and c_array(T, types.uint8, 1) and c_array(tab, types.uint8, 1) and c_array(fb, types.int32, 2)
          and c_array(segs, types.int64, 2) and c_array(out, types.uint32, 1))
    if not ok:
        return None
    sig = types.void(codes, rows, types.int64, T, tab, fb, segs, types.int64, types.int64, out)
    return sig, _candidate_block_codegen


@kernel
def candidate_block(codes, rows, r0, T, tab, fb, segs, plane, used, out):
    """out[v] (uint32) = the integer sum S of row rows[r0 + v], v < 64 (rows
    must be valid; T: uint8 scratch of codes.shape[1] * 64 bytes; the
    fields lie in the first ``used`` bytes, 8 <= used <= codes.shape[1]).
    Needs ``CAND_SIMD``."""
    _candidate_block_simd(codes, rows, r0, T, tab, fb, segs, np.int64(plane), np.int64(used), out)


@kernel
def candidate_sums(codes, rows, tab, fb, segs, plane, used, simd):
    """Integer sums S of ``rows`` (a multiple of 64 valid rows) by the SIMD
    kernel (simd=True, needs ``CAND_SIMD``) or the scalar one (tests)."""
    n = rows.shape[0]
    out = np.empty(n, np.uint32)
    T = np.empty(codes.shape[1] * GROUP, np.uint8)
    buf = np.empty(GROUP, np.uint32)
    for r0 in range(0, n, GROUP):
        if simd:
            candidate_block(codes, rows, r0, T, tab, fb, segs, plane, used, buf)
        else:
            candidate_block_scalar(codes, rows, r0, tab, fb, plane, buf)
        out[r0:r0 + GROUP] = buf
    return out


@kernel
def query_tables(Y, qi, tab_meta, fb, plane, levels):
    """(tables uint8 (2 * plane,), 1 / scale, bias) of query qi (tests)."""
    tab = np.zeros(2 * plane, np.uint8)
    mins = np.empty(tab_meta.shape[0], np.float32)
    inv, bias = candidate_tables(Y, qi, tab_meta, fb, plane, levels, mins, np.empty(plane, np.uint16), tab)
    return tab, inv, bias


@kernel
def _prefetch_rows(codes, rows, r0, r1, used):
    for t in range(r0, r1):
        for g in range(0, used, 64):
            prefetch(codes, rows[t], g)
        prefetch(codes, rows[t], used - 1)


@kernel
def candidate_topk_one(Y, qi, levels, cl, codes, scales, cand, hv, hr):
    """Top-len(hv) of query qi's candidate rows ``cand`` (1-D, -1 = none) by
    the 16-bit-table ADC (SIMD, 64 rows at a time) into (hv, hr) (filled
    with -inf / -1 by the caller), sorted descending.  ``cl``:
    ``candidate_layout``.  Scores: estimates of <y, code> (times the row's
    scale when ``scales`` has entries), without <q, mean>."""
    tab_meta, fb, segs, plane, used = cl
    has_scale = scales.shape[0] > 0
    n = 0
    for t in range(cand.shape[0]):
        if cand[t] >= 0:
            n += 1
    if n == 0:
        return
    rows = np.empty(((n + GROUP - 1) // GROUP) * GROUP, np.int64)
    n = 0
    for t in range(cand.shape[0]):
        if cand[t] >= 0:
            rows[n] = cand[t]
            n += 1
    rows[n:] = rows[0]  # padding: scored, never offered
    _prefetch_rows(codes, rows, 0, min(n, GROUP), used)
    tab = np.empty(2 * plane, np.uint8)
    mins = np.empty(tab_meta.shape[0], np.float32)
    inv, bias = candidate_tables(Y, qi, tab_meta, fb, plane, levels, mins, np.empty(plane, np.uint16), tab)
    T = np.empty(codes.shape[1] * GROUP, np.uint8)
    out = np.empty(GROUP, np.uint32)
    for r0 in range(0, n, GROUP):
        _prefetch_rows(codes, rows, min(r0 + GROUP, n), min(r0 + 2 * GROUP, n), used)
        candidate_block(codes, rows, r0, T, tab, fb, segs, plane, used, out)
        for v in range(min(GROUP, n - r0)):
            r = rows[r0 + v]
            s = np.float64(out[v]) * inv + bias
            if has_scale:
                s *= scales[r]
            heap_offer(hv, hr, np.float32(s), r)
    heap_to_sorted(hv, hr)


@kernel
def candidate_topk(Y, levels, cl, codes, scales, cand, kk):
    """Top-kk of each query's candidate rows (nq, c) (-1 = none) by the SIMD
    candidate ADC (``candidate_topk_one``): (estimates float32 descending,
    rows -1 padded)."""
    nq = cand.shape[0]
    out_v = np.full((nq, kk), -np.inf, np.float32)
    out_r = np.full((nq, kk), -1, np.int64)
    for qi in range(nq):
        candidate_topk_one(Y, qi, levels, cl, codes, scales, cand[qi], out_v[qi], out_r[qi])
    return out_v, out_r
