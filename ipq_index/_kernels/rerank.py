"""Exact re-ranking of candidate rows with the stored float copy.

The copy is float32 or float16; numba has no float16 arithmetic, so float16
rows are read as their uint16 bit patterns and widened exactly: by the CPU
(F16C ``vcvtph2ps``, LLVM IR of 16-lane half vectors, ``_dot_rows_simd``;
400 random rows of 50k x 384: 146 -> 121 ns per row) when the target has
it, else with integer operations (``_widen_half``).  Dot products
accumulate in float64; the
kernels allow LLVM to reassociate those sums (``fastmath`` reassoc /
contract / nsz only: no finite-math assumptions), which lets it vectorise
them: 200 random rows of 50k x 384 float16, in cache, 300 -> 96 ns per row
(the former build, a 65,536-entry float table and one sequential float64
chain, waited on the add latency).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._numba import kernel, prefetch
from .cand_adc import candidate_topk_one
from .checks import all_finite
from .fields import rescore_fields_one
from .rotation import HALF_SIMD
from .tables import _build_table, _rescore_one
from .topk import heap_offer, heap_to_sorted

#: LLVM may reorder the float64 sums (and fuse multiply-adds) but assumes
#: nothing about NaN / inf (inputs are validated finite anyway)
_REASSOC = {"reassoc", "contract", "nsz"}
_kernel = kernel(fastmath=_REASSOC)

#: 2^112: a half's 15 magnitude bits shifted left by 13 read as a float32
#: are the half's magnitude times 2^-112, exactly (subnormals included)
_HALF_SCALE = 5.192296858534828e+33


@_kernel
def _widen_half(v, u):
    """u (uint32 scratch) <- the float32 bit patterns of half row v (uint16
    bits) scaled by 2^-112: sign to bit 31, the other 15 bits shifted by 13.
    Integer-only and vectorisable; exact for every finite half."""
    for j in range(v.shape[0]):
        h = np.uint32(v[j])
        u[j] = ((h & np.uint32(0x7FFF)) << np.uint32(13)) | ((h & np.uint32(0x8000)) << np.uint32(16))


#: lanes per step of the vector dot product
_LANES = 16


def _dot_rows_codegen(context, builder, signature, args):
    """float64 sum over j of float(V[r, j]) * q[j] (q float64): 16 lanes per
    step (uint16 rows: half bit patterns, half -> float32; float32 rows as
    they are; then float64 multiply-adds into two accumulators), the
    remainder one element at a time.  A float16 or float32 value times a
    float32 query component is exact in float64, so fusing the multiply-add
    (``llvm.fmuladd``: where the target has FMA) changes no result.
    Explicit vectors: no fastmath needed, so kernels without it (the fused
    scan) get the same sums as the re-rank kernels."""
    V_t, _, q_t = signature.args
    is_half = V_t.dtype == types.uint16
    V = context.make_array(V_t)(context, builder, args[0])
    q = context.make_array(q_t)(context, builder, args[2])
    r = args[1]
    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    half, flt, dbl = ir.HalfType(), ir.FloatType(), ir.DoubleType()
    L = _LANES
    vh, vi, vf = (ir.VectorType(t, L) for t in (half, i16, flt))
    zero = ir.Constant(i64, 0)
    d = builder.extract_value(q.shape, 0)
    row = cgutils.get_item_pointer(context, builder, V_t, V, [r, zero], wraparound=False)
    qp = q.data
    steps = builder.udiv(d, ir.Constant(i64, L))
    lo_idx = ir.Constant(ir.VectorType(i32, L // 2), list(range(L // 2)))
    hi_idx = ir.Constant(ir.VectorType(i32, L // 2), list(range(L // 2, L)))
    vd2 = ir.VectorType(dbl, L // 2)
    fmuladd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vd2, [vd2, vd2, vd2]),
                                             f"llvm.fmuladd.v{L // 2}f64")
    acc0 = cgutils.alloca_once_value(builder, ir.Constant(vd2, None))
    acc1 = cgutils.alloca_once_value(builder, ir.Constant(vd2, None))
    with cgutils.for_range(builder, steps) as loop:
        off = builder.mul(loop.index, ir.Constant(i64, L))
        if is_half:
            h = builder.load(builder.bitcast(builder.gep(row, [off]), vi.as_pointer()), align=2)
            x = builder.fpext(builder.bitcast(h, vh), vf)
        else:
            x = builder.load(builder.bitcast(builder.gep(row, [off]), vf.as_pointer()), align=4)
        for half_i, (idx, acc) in enumerate(((lo_idx, acc0), (hi_idx, acc1))):
            qoff = builder.add(off, ir.Constant(i64, half_i * (L // 2)))
            y = builder.load(builder.bitcast(builder.gep(qp, [qoff]), vd2.as_pointer()), align=8)
            xd = builder.fpext(builder.shuffle_vector(x, x, idx), vd2)
            builder.store(builder.call(fmuladd, [xd, y, builder.load(acc)]), acc)
    tot = builder.fadd(builder.load(acc0), builder.load(acc1))
    s = builder.extract_element(tot, ir.Constant(i32, 0))
    for t in range(1, L // 2):
        s = builder.fadd(s, builder.extract_element(tot, ir.Constant(i32, t)))
    res = cgutils.alloca_once_value(builder, s)
    with cgutils.for_range_slice(builder, builder.mul(steps, ir.Constant(i64, L)), d, ir.Constant(i64, 1)) as (j, _):
        hv = builder.load(builder.gep(row, [j]))
        x = builder.fpext(builder.bitcast(hv, half) if is_half else hv, dbl)
        y = builder.load(builder.gep(qp, [j]))
        builder.store(builder.fadd(builder.load(res), builder.fmul(x, y)), res)
    return builder.load(res)


@intrinsic
def _dot_rows_simd(typingctx, V, r, q):
    ok = (isinstance(V, types.Array) and V.ndim == 2 and V.dtype in (types.uint16, types.float32)
          and V.layout == "C" and isinstance(q, types.Array) and q.ndim == 1 and q.dtype == types.float64
          and q.layout == "C")
    if not ok:
        return None
    return types.float64(V, types.int64, q), _dot_rows_codegen


def _row_dot(V, r, q, u):
    """float64 <V[r], q> (q float64; uint16 rows: float16 bit patterns, via
    scratch u)."""


@overload(_row_dot)
def _row_dot_impl(V, r, q, u):
    if (V.dtype == types.float32 or HALF_SIMD) and V.layout == "C" and q.layout == "C":
        def dot_simd(V, r, q, u):
            return _dot_rows_simd(V, r, q)
        return dot_simd
    if isinstance(V.dtype, types.Integer):
        def dot_half(V, r, q, u):
            _widen_half(V[r], u)
            f = u.view(np.float32)
            s = 0.0
            for j in range(q.shape[0]):
                s += np.float64(f[j]) * q[j]
            return s * _HALF_SCALE  # a power of two: exact
        return dot_half

    def dot_float(V, r, q, u):
        v = V[r]
        s = 0.0
        for j in range(q.shape[0]):
            s += np.float64(v[j]) * q[j]
        return s
    return dot_float


#: rows prefetched ahead of the one being scored: the random, mostly
#: uncached rows load while earlier ones are scored (prefetching every row
#: first left the loads of the last rows to the L2 and gave no overlap)
PREFETCH_ROWS = 4


@_kernel
def _prefetch_row(V, r):
    """Hint every cache line of row r (if >= 0) into the cache."""
    if r >= 0:
        for j in range(0, V.shape[1], 64 // V.itemsize):
            prefetch(V, r, j)


@_kernel
def rerank_rows(q, V, rows, hv, hi):
    """Top-len(hv) of candidate ``rows`` (-1 = none) by exact <q, V[r]> into
    (hv, hi) (filled with -inf / -1 by the caller): sorted descending."""
    u = np.empty(q.shape[0], np.uint32)
    q64 = q.astype(np.float64)
    n = rows.shape[0]
    for t in range(min(PREFETCH_ROWS, n)):
        _prefetch_row(V, rows[t])
    for t in range(n):
        if t + PREFETCH_ROWS < n:
            _prefetch_row(V, rows[t + PREFETCH_ROWS])
        r = rows[t]
        if r >= 0:
            heap_offer(hv, hi, _row_dot(V, r, q64, u), r)
    heap_to_sorted(hv, hi)


#: how ``rescore_rerank_one`` narrows the candidates: not at all (all go to
#: the exact re-rank, or are returned as they are), the table-free ADC
#: (``fields.rescore_fields_one``), the SIMD candidate ADC
#: (``cand_adc.candidate_topk_one``; only before an exact re-rank), or the
#: lookup-table ADC (``tables``; many candidates, e.g. every row)
PLAN_NONE, PLAN_FIELDS, PLAN_CAND, PLAN_TABLES = 0, 1, 2, 3


@_kernel
def search_outputs(Q, V, adc, k, kk, kept):
    """A search kernel's start: raises ValueError when the queries Q hold
    NaN or inf, else returns its outputs (scores float32 -inf, rows -1, ids
    -1), each (nq, width): width k when it re-ranks exactly (``V`` has
    rows), else kk after an ADC (``adc``), else ``kept`` (candidates kept as
    they are); and whether it re-ranks."""
    if not all_finite(Q):
        raise ValueError("queries contains NaN or infinite values")
    exact = False
    if V is not None:  # None: an index without a stored copy
        exact = V.shape[0] > 0
    width = k if exact else (kk if adc else kept)
    nq = Q.shape[0]
    return (np.full((nq, width), -np.inf, np.float32), np.full((nq, width), -1, np.int64),
            np.full((nq, width), -1, np.int64), exact)


@_kernel
def add_mean_one(Q, qi, mean, out_v, out_r):
    """ADC scores of centred codes plus <Q[qi], mean> (float64): inner-product estimates."""
    off = 0.0
    for j in range(Q.shape[1]):
        off += np.float64(Q[qi, j]) * mean[j]
    for t in range(out_v.shape[0]):
        if out_r[t] >= 0:
            out_v[t] = np.float32(np.float64(out_v[t]) + off)


@_kernel
def rescore_rerank_one(Y, Q, qi, mean, levels, fields, cl, tabs, T, codes, scales, cand, plan, V, hv, hr,
                       out_v, out_r):
    """The search kernels' last step for query qi and its candidate rows cand
    (1, c): ``rescore_more`` of them as one band.  Returns False (out
    untouched) when the plan neither rescores nor re-ranks (PLAN_NONE or
    PLAN_CAND without rows in ``V``): the caller keeps the candidates as
    they are."""
    exact = False
    if V is not None:
        exact = V.shape[0] > 0
    if not (exact or plan == PLAN_FIELDS or plan == PLAN_TABLES):
        return False
    first = qi >= 0  # True, typed as a plain bool: one build of rescore_more with _rescore_candidates' calls
    rescore_more(Y, Q, qi, mean, levels, fields, cl, tabs, T, codes, scales, cand, plan, V, hv, hr, out_v, out_r,
                 first)
    return True


@_kernel
def rescore_more(Y, Q, qi, mean, levels, fields, cl, tabs, T, codes, scales, band, plan, V, hv, hr, out_v, out_r,
                 first):
    """Query qi's results from a candidate set that grows by bands of new
    rows ``band`` (1, c) (-1 = none): the ADC top-kk (hv / hr, size kk;
    ``plan``: PLAN_FIELDS field by field, PLAN_TABLES through lookup tables
    built into the scratch T (1, nbytes, 256) from ``tabs``, PLAN_CAND the
    SIMD candidate ADC with the layout ``cl``; ``_offer_adc``), then the
    exact top-len(out_v) of those when ``V`` has rows, else their ADC
    scores plus <q, mean>; PLAN_NONE (with rows in ``V``): every candidate
    re-ranked exactly.  out_v / out_r hold the results of every band so far
    (those of one call with their union, up to the order of equal scores).
    ``first``: the first band (the heaps start empty, the tables are built).
    ``V`` None (an index without a copy): the re-rank and the candidate ADC
    are not compiled."""
    if V is None:
        _offer_adc(Y, levels, fields, tabs, T, codes, scales, band, plan, hv, hr, first)
        _copy_top(hv, hr, out_v, out_r)
        add_mean_one(Q, qi, mean, out_v, out_r)
        return
    exact = V.shape[0] > 0
    if exact and plan == PLAN_NONE:  # every candidate re-ranked exactly: the results are the heap
        _resume_heap(out_v, out_r, first)
        rerank_rows(Q[qi], V, band[0], out_v, out_r)
        return
    if plan == PLAN_CAND:
        _resume_heap(hv, hr, first)
        candidate_topk_one(Y, 0, levels, cl, codes, scales, band[0], hv, hr)
    else:
        _offer_adc(Y, levels, fields, tabs, T, codes, scales, band, plan, hv, hr, first)
    if exact:
        _resume_heap(out_v, out_r, True)
        rerank_rows(Q[qi], V, hr, out_v, out_r)
    else:
        _copy_top(hv, hr, out_v, out_r)
        add_mean_one(Q, qi, mean, out_v, out_r)


@_kernel
def _offer_adc(Y, levels, fields, tabs, T, codes, scales, band, plan, hv, hr, first):
    """The full-ADC top-len(hv) of the rows offered so far into (hv, hr),
    sorted descending: field by field (PLAN_FIELDS, ``fields``:
    ``Encoder.field_layout``) or through lookup tables (PLAN_TABLES, built
    into T with the first band from ``tabs`` = (level offsets, bits,
    byte-field pointers, byte-field dims): ``Encoder.table_layout``)."""
    _resume_heap(hv, hr, first)
    if plan == PLAN_TABLES:
        if first:
            level_off, bits, field_ptr, field_dim = tabs
            prev = np.empty(256, np.float32)
            _build_table(Y, 0, T[0], levels, level_off, bits, field_ptr, field_dim, codes.shape[1], prev)
        _rescore_one(T, codes, scales, band, 0, hv, hr)
    else:
        rescore_fields_one(Y, 0, levels, fields, codes, scales, band, hv, hr)


@_kernel
def _copy_top(hv, hr, out_v, out_r):
    for t in range(hv.shape[0]):
        out_v[t] = hv[t]
        out_r[t] = hr[t]


@_kernel
def _resume_heap(v, r, first):
    """A top-k kept sorted descending in (v, r) as a min-heap again (ascending
    order), or emptied for the ``first`` offers."""
    n = v.shape[0]
    if first:
        for t in range(n):
            v[t] = -np.inf
            r[t] = -1
        return
    for t in range(n // 2):
        v[t], v[n - 1 - t] = v[n - 1 - t], v[t]
        r[t], r[n - 1 - t] = r[n - 1 - t], r[t]


@_kernel
def _rerank_one(Q, qi, V, cand, hv, hi):
    rerank_rows(Q[qi], V, cand[qi], hv, hi)


@_kernel
def rerank(Q, V, cand, k):
    """Top-k rows by exact inner product <Q[q], V[r]> over each query's
    candidate rows (-1 = none): (scores float32 descending, rows -1 padded).
    ``V``: float32 rows, or the uint16 bit patterns of float16 rows."""
    nq = cand.shape[0]
    out_v = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for qi in range(nq):
        _rerank_one(Q, qi, V, cand, out_v[qi], out_i[qi])
    return out_v, out_i
