"""Query rotation: rows times a float32 matrix or a float16 one (bit
patterns as uint16, widened by F16C where the CPU has it, else by integer
operations: the same float32 values and sums)."""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .._numba import kernel, splat, target_has

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
    """o[j] += the sum over rows t..t+c of R (c <= 8) weighted by qv[t..t+c]
    (j below the shorter of o and R's rows): for c = 8 the tree of
    ``weighted_row_sum``, else row by row."""
    m = min(o.shape[0], R.shape[1])
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


def _emit_half_rows_sum(builder, qp, q_stride, nt, rp, n, m, op, o_stride):
    """IR of o_t[j] = sum_i q_t[i] R[i, j] for queries t < nt (row t of the
    float32 queries at ``qp`` + t ``q_stride``, of the outputs at ``op`` + t
    ``o_stride``; j < m) over a float16 matrix R (uint16 bits, n x m at
    ``rp``): 16 columns per vector (``fpext`` of <16 x half>:
    ``vcvtph2ps``), the float32 operations of ``weighted_row_sum``'s float32
    build in the same order for every query (so the same sums), the last m
    % 16 columns one at a time.  Each group of 8 rows is widened once for
    all the queries: their centroid or rotation matrix is read once."""
    i16, i64 = ir.IntType(16), ir.IntType(64)
    half, flt = ir.HalfType(), ir.FloatType()
    L = 16
    vi, vh, vf = ir.VectorType(i16, L), ir.VectorType(half, L), ir.VectorType(flt, L)
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    with cgutils.for_range(builder, nt) as qt:
        orow = builder.gep(op, [builder.mul(qt.index, o_stride)])
        with cgutils.for_range(builder, m) as loop:
            builder.store(ir.Constant(flt, 0.0), builder.gep(orow, [loop.index]))
    nvec = builder.mul(builder.udiv(m, c(L)), c(L))

    def widen(ptr, lanes):
        if lanes == 1:
            return builder.fpext(builder.bitcast(builder.load(ptr), half), flt)
        h = builder.load(builder.bitcast(ptr, vi.as_pointer()), align=2)
        return builder.fpext(builder.bitcast(h, vh), vf)

    def qsplat(t, i, lanes):
        q = builder.load(builder.gep(qp, [builder.add(builder.mul(t, q_stride), i)]))
        return q if lanes == 1 else splat(builder, vf, q)

    def column_loops(body):
        # body(j, lanes): vector steps over the first nvec columns, then the rest
        with cgutils.for_range_slice(builder, c(0), nvec, c(L)) as (j, _):
            body(j, L)
        with cgutils.for_range_slice(builder, nvec, m, c(1)) as (j, _):
            body(j, 1)

    def accumulate(t, j, lanes, value):
        ptr = builder.gep(op, [builder.add(builder.mul(t, o_stride), j)])
        if lanes > 1:
            ptr = builder.bitcast(ptr, vf.as_pointer())
        builder.store(builder.fadd(builder.load(ptr, align=4), value), ptr, align=4)

    ngroups = builder.udiv(n, c(8))
    with cgutils.for_range(builder, ngroups) as g:
        t0 = builder.mul(g.index, c(8))
        rows = [builder.gep(rp, [builder.mul(builder.add(t0, c(i)), m)]) for i in range(8)]

        def group(j, lanes):
            w = [widen(builder.gep(rows[i], [j]), lanes) for i in range(8)]
            with cgutils.for_range(builder, nt) as qt:
                p = [builder.fmul(qsplat(qt.index, builder.add(t0, c(i)), lanes), w[i]) for i in range(8)]
                s = builder.fadd(builder.fadd(builder.fadd(p[0], p[1]), builder.fadd(p[2], p[3])),
                                 builder.fadd(builder.fadd(p[4], p[5]), builder.fadd(p[6], p[7])))
                accumulate(qt.index, j, lanes, s)
        column_loops(group)
    with cgutils.for_range_slice(builder, builder.mul(ngroups, c(8)), n, c(1)) as (t, _):
        row = builder.gep(rp, [builder.mul(t, m)])

        def single(j, lanes):
            w = widen(builder.gep(row, [j]), lanes)
            with cgutils.for_range(builder, nt) as qt:
                accumulate(qt.index, j, lanes, builder.fmul(qsplat(qt.index, t, lanes), w))
        column_loops(single)


def _half_rows_sum_codegen(context, builder, signature, args):
    Q_t, _, _, R_t, O_t = signature.args
    Qa, Ra, Oa = (context.make_array(t)(context, builder, a) for t, a in ((Q_t, args[0]), (R_t, args[3]),
                                                                        (O_t, args[4])))
    q_stride = builder.extract_value(Qa.shape, 1)
    qp = builder.gep(Qa.data, [builder.mul(args[1], q_stride)])
    _emit_half_rows_sum(builder, qp, q_stride, args[2], Ra.data, builder.extract_value(Ra.shape, 0),
                        builder.extract_value(Ra.shape, 1), Oa.data, builder.extract_value(Oa.shape, 1))
    return context.get_dummy_value()


@intrinsic
def _half_rows_sum(typingctx, Q, q0, nt, R, O):
    """O[t, :m] = Q[q0 + t] @ R for t < nt (float16 R (n, m) as uint16 bits;
    Q rows of at least n, O rows of at least m floats)."""
    ok = (isinstance(R, types.Array) and R.ndim == 2 and R.dtype == types.uint16 and R.layout == "C"
          and all(isinstance(a, types.Array) and a.ndim == 2 and a.dtype == types.float32 and a.layout == "C"
                  for a in (Q, O)))
    if not ok:
        return None
    return types.void(Q, types.int64, types.int64, R, O), _half_rows_sum_codegen


#: rows rotated together by ``rotate_rows`` (the matrix read once per tile)
ROTATE_TILE = 16


@kernel
def rotate_rows(Q, R):
    """Q @ R (float32 rows; R float32, or the bit patterns of a float16
    matrix), ``rotate_tile`` by tiles of ROTATE_TILE rows (float32 sums:
    relative error ~1e-6 at d = 384, far below the quantization error;
    float64 sums took twice as long)."""
    out = np.empty((Q.shape[0], R.shape[1]), np.float32)
    for q0 in range(0, Q.shape[0], ROTATE_TILE):
        q1 = min(Q.shape[0], q0 + ROTATE_TILE)
        rotate_tile(Q, q0, q1 - q0, R, out[q0:q1])
    return out


@kernel
def rotate_query(Q, qi, R, Y):
    """Y[0] = R^T Q[qi] (``R`` (d, m): the first m transformed dimensions),
    or Q[qi] itself when ``R`` is (0, 0) (no rotation): a search kernel's
    first step, ``rotate_tile`` of one row."""
    rotate_tile(Q, qi, 1, R, Y)


def weighted_rows_sum(Q, q0, nt, R, O):
    """O[t, :m] = Q[q0 + t] @ R for t < nt (R (n, m) float32, or float16 bit
    patterns as uint16): each row the sums of ``weighted_row_sum`` (bit for
    bit), the float16 matrix read once for all the rows."""


@overload(weighted_rows_sum)
def _weighted_rows_sum_impl(Q, q0, nt, R, O):
    if R.dtype == types.uint16 and HALF_SIMD and Q.layout == "C" and R.layout == "C" and O.layout == "C":
        def half_simd(Q, q0, nt, R, O):
            _half_rows_sum(Q, q0, nt, R, O)
        return half_simd

    def rows(Q, q0, nt, R, O):
        for t in range(nt):
            weighted_row_sum(Q[q0 + t], R, O[t])
    return rows


@kernel
def rotate_tile(Q, q0, nt, R, Y):
    """Y[t] = R^T Q[q0 + t] for t < nt (``rotate_query`` of each, the same
    values; ``R`` (d, m): the first m columns, the rest of Y untouched; (0,
    0): the rows themselves)."""
    if R.shape[0] > 0:
        weighted_rows_sum(Q, q0, nt, R, Y)
    else:
        for t in range(nt):
            for j in range(Q.shape[1]):
                Y[t, j] = Q[q0 + t, j]
