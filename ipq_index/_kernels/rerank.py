"""Exact re-ranking of candidate rows with the stored float copy.

The copy is float32 or float16; numba has no float16 arithmetic, so float16
rows are read as their uint16 bit patterns and widened through a 65,536-entry
table (exact: every half value is a float32 value).  ``_value`` picks the
right read at compile time from the array's dtype.  Dot products accumulate
in float64.  Each kernel exists in a parallel (queries in ``prange``) and a
serial build (cheaper for a few queries).
"""

from __future__ import annotations

import numpy as np
from numba import prange, types
from numba.extending import overload

from .._numba import inline_kernel, kernel, parallel_kernel
from .adc import heap_offer, heap_to_sorted


def half_table() -> np.ndarray:
    """float32 value of every float16 bit pattern (index = the uint16 bits)."""
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def _value(V, r, j, lut):
    """V[r, j] as a float (uint16 rows: float16 bit patterns through ``lut``)."""


@overload(_value, inline="always")
def _value_impl(V, r, j, lut):
    if isinstance(V.dtype, types.Integer):
        return lambda V, r, j, lut: lut[V[r, j]]
    return lambda V, r, j, lut: V[r, j]


@inline_kernel
def _rerank_one(Q, qi, V, lut, cand, hv, hi):
    for t in range(cand.shape[1]):
        r = cand[qi, t]
        if r >= 0:
            s = 0.0
            for j in range(Q.shape[1]):
                s += np.float64(_value(V, r, j, lut)) * Q[qi, j]
            heap_offer(hv, hi, s, r)
    heap_to_sorted(hv, hi)


@parallel_kernel
def rerank(Q, V, lut, cand, k):
    """Top-k rows by exact inner product <Q[q], V[r]> over each query's
    candidate rows (-1 = none): (scores float32 descending, rows -1 padded).
    ``V``: float32 rows, or uint16 bit patterns of float16 rows with
    ``lut = half_table()`` (ignored for float32)."""
    nq = cand.shape[0]
    out_v = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for qi in prange(nq):
        _rerank_one(Q, qi, V, lut, cand, out_v[qi], out_i[qi])
    return out_v, out_i


@kernel
def rerank_serial(Q, V, lut, cand, k):
    """``rerank`` without a parallel region."""
    nq = cand.shape[0]
    out_v = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    for qi in range(nq):
        _rerank_one(Q, qi, V, lut, cand, out_v[qi], out_i[qi])
    return out_v, out_i
