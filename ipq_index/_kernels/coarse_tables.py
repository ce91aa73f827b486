"""Byte tables of the coarse 4-bit codes (two per byte): float32 tables for
the fast scan's rescoring, int16 navigation tables for the graph walk."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .._numba import kernel


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
