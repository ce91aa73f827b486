"""Lookup-table ADC: per-query tables and the scans that sum them.

A query gets one 256-entry table per code byte (code layout: ``codes``):
T[g, c] = sum over dims j packed in byte g of y_j * L_j[(c >> shift_j) &
mask_j], so a vector's score is a sum of nbytes table lookups: the rescoring of
candidate rows (up to every row of an index), graph walks on the full ADC,
and the variance tables of ``return_std``.
"""

from __future__ import annotations

import numpy as np
from numba import types
from numba.extending import overload

from .._numba import kernel
from .topk import heap_offer, heap_to_sorted


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
                for c in range(size):  # element by element: a slice copy compiles numba's
                    prev[c] = T[c]     # shape-check messages (string code) into every caller
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
def row_score(tables_q, codes, scales, has_scale, r):
    """ADC score of code row r with one query's tables (times its scale)."""
    s = 0.0
    for g in range(codes.shape[1]):
        s += tables_q[g, codes[r, g]]
    if has_scale:
        s *= scales[r]
    return s


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
