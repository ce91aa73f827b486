"""Table-free ADC: a candidate row's score summed field by field from the
levels (cheaper than building 256-entry tables for a few candidates), 16
fields at a time with an x86 byte shuffle and one gather (LLVM intrinsics),
else one lane at a time."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._numba import kernel, prefetch, target_has, vector_gep
from .tables import _offer4, _touch_rows, _valid_rows
from .topk import heap_offer, heap_to_sorted

#: lanes of a field block (table-free ADC, ``fields_dot``)
FIELD_LANES = 16
#: table-free ADC 16 fields at a time: x86 byte shuffle (SSSE3 ``pshufb``)
#: of a 16-byte window of the code row, then one 16-lane gather of levels;
#: elsewhere (no SSSE3: e.g. ARM) one field at a time
FIELD_SIMD = target_has("ssse3")


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
