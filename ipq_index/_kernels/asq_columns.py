"""ASQ kernels: one complete solve per column (exact: sum objective by the DP,
max objective by the minimax search; approximate: the grid solver), columns
copied a block at a time."""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .asq_dp import PLANE_COLS, collapse_sorted, exact_sum_levels
from .asq_grid import approx_sum_levels
from .asq_minimax import minimax_levels


@kernel
def solve_exact(x, w, s, objective_max, rtol, T, D, arg, q, qs, cnt, arg1, vals, wts):
    """Exact solve of one unsorted array (x float64, w float64 or empty):
    sum objective by the DP, max objective by ``minimax_levels``.

    Scratch: T (>= n x 8), D, q, qs, cnt, arg1, vals, wts (>= n) and
    arg (>= (s-3) x n).
    """
    if w.shape[0] > 0:
        order = np.argsort(x, kind="mergesort")
        u = collapse_sorted(x[order], w[order], objective_max, vals, wts)
    else:
        u = collapse_sorted(np.sort(x), w, objective_max, vals, wts)
    if u <= s:
        return vals[:u].copy()
    if objective_max:
        return minimax_levels(vals[:u], wts[:u], s, rtol)
    return exact_sum_levels(vals[:u], wts[:u], s, T, D, arg, q, qs, cnt, arg1)


@kernel
def _column_block(X, j0, j1):
    """Columns j0..j1-1 of X as contiguous float64 rows (each cache line of X read once)."""
    N = X.shape[0]
    buf = np.empty((j1 - j0, N), np.float64)
    for i in range(N):
        for j in range(j0, j1):
            buf[j - j0, i] = X[i, j]
    return buf


@kernel
def _level_rows(budgets, j_lo, j_hi):
    """(levels NaN (j_hi - j_lo, max budget), counts) for columns j_lo..j_hi-1."""
    smax = 0
    for j in range(budgets.shape[0]):
        smax = max(smax, budgets[j])
    levels = np.empty((j_hi - j_lo, smax), np.float64)
    levels[:] = np.nan
    return levels, np.zeros(j_hi - j_lo, np.int64)


@kernel
def _store(levels, counts, row, lv):
    """Column row's level set lv into the padded result (element by element:
    no generic slice assignment to compile)."""
    counts[row] = lv.shape[0]
    for t in range(lv.shape[0]):
        levels[row, t] = lv[t]


@kernel
def solve_columns_exact(X, W, budgets, objective_max, rtol, block, j_lo, j_hi):
    """Exact per-column solves of columns j_lo..j_hi-1 of X (N x d).

    ``W`` holds per-row weights (N,) shared by every column, or is empty.
    Columns are copied ``block`` at a time into contiguous buffers; scratch
    arrays are shared by the columns.  Returns (levels padded with NaN
    (j_hi - j_lo, max budget), counts)."""
    N = X.shape[0]
    levels, counts = _level_rows(budgets, j_lo, j_hi)
    T = np.empty((N, PLANE_COLS), np.float64)
    D = np.empty(N, np.float64)
    q = np.empty(N, np.int32)
    qs = np.empty(N, np.int32)
    vals = np.empty(N, np.float64)
    wts = np.empty(N, np.float64)
    cnt = np.empty(N, np.int32)
    arg1 = np.empty(N, np.int32)
    arg = np.empty((max(levels.shape[1] - 3, 0), N), np.int32)
    for j0 in range(j_lo, j_hi, block):
        j1 = min(j_hi, j0 + block)
        buf = _column_block(X, j0, j1)
        for j in range(j0, j1):
            lv = solve_exact(buf[j - j0], W, budgets[j], objective_max, rtol, T, D, arg, q, qs, cnt, arg1,
                             vals, wts)
            _store(levels, counts, j - j_lo, lv)
    return levels, counts


@kernel
def solve_columns_approx(X, W, budgets, m, block, j_lo, j_hi):
    """``solve_columns_exact`` with the grid-restricted sum solver
    (``approx_sum_levels``, grid of m points; needs N > m; ``W`` None for
    unit weights)."""
    levels, counts = _level_rows(budgets, j_lo, j_hi)
    for j0 in range(j_lo, j_hi, block):
        j1 = min(j_hi, j0 + block)
        buf = _column_block(X, j0, j1)
        for j in range(j0, j1):
            lv = approx_sum_levels(buf[j - j0], W, budgets[j], m)
            _store(levels, counts, j - j_lo, lv)
    return levels, counts
