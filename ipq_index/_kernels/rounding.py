"""Rounding kernels: unbiased (stochastic) and nearest, to a sorted level set."""

from __future__ import annotations

import numpy as np

from .._numba import kernel


@kernel
def _bracket(levels, xi):
    """Index i with levels[i] <= xi <= levels[i+1] (xi clipped to the range)."""
    L = levels.shape[0]
    lo = 0
    hi = L - 1
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if levels[mid] <= xi:
            lo = mid
        else:
            hi = mid
    return lo


@kernel
def round_codes(x, levels, u, codes):
    """codes[i] = index of the level x[i] is rounded to: with uniforms u in
    [0, 1) (one per value) up with probability (x - a) / (b - a), unbiased;
    with u empty the nearest level (ties go down).  Values outside the level
    range are clipped (biased) to the end levels."""
    L = levels.shape[0]
    unbiased = u.shape[0] > 0
    for i in range(x.shape[0]):
        xi = x[i]
        if L == 1 or xi <= levels[0]:
            codes[i] = 0
            continue
        if xi >= levels[L - 1]:
            codes[i] = L - 1
            continue
        lo = _bracket(levels, xi)
        a = levels[lo]
        b = levels[lo + 1]
        up = u[i] * (b - a) < xi - a if unbiased else b - xi < xi - a
        codes[i] = lo + 1 if up else lo


@kernel
def rounding_cost(x, w, levels, objective_max):
    """Sum (or max) of w_i (b_i - x_i)(x_i - a_i); levels must cover x."""
    total = 0.0
    worst = 0.0
    L = levels.shape[0]
    has_w = w.shape[0] > 0
    for i in range(x.shape[0]):
        xi = x[i]
        if L == 1:
            continue
        lo = _bracket(levels, xi)
        v = (levels[lo + 1] - xi) * (xi - levels[lo])
        if v < 0.0:
            v = 0.0
        if has_w:
            v *= w[i]
        total += v
        if v > worst:
            worst = v
    return worst if objective_max else total


@kernel
def _lloyd_sorted(xs, W, S1, levels, iters):
    """Lloyd iterations for nearest rounding on sorted values with prefix sums
    W (weights) and S1 (weighted values), both of length n + 1.  Points at
    a midpoint go to the lower level, as in nearest encoding."""
    n = xs.shape[0]
    L = levels.shape[0]
    pos = np.empty(L + 1, np.int64)
    pos[0] = 0
    pos[L] = n
    for it in range(iters):
        for i in range(L - 1):
            t = 0.5 * (levels[i] + levels[i + 1])
            lo = pos[i]
            hi = n
            while lo < hi:  # first index with xs > t
                mid = (lo + hi) >> 1
                if xs[mid] <= t:
                    lo = mid + 1
                else:
                    hi = mid
            pos[i + 1] = lo
        moved = 0.0
        for i in range(L):
            wsum = W[pos[i + 1]] - W[pos[i]]
            if wsum > 0.0:
                new = (S1[pos[i + 1]] - S1[pos[i]]) / wsum
                moved = max(moved, abs(new - levels[i]))
                levels[i] = new
        # keep strictly sorted (empty cells keep their level)
        for i in range(1, L):
            if levels[i] < levels[i - 1]:
                levels[i] = levels[i - 1]
        if moved == 0.0:
            break


@kernel
def _cell_bounds(xs, levels, pos, nearest):
    """pos[i]..pos[i+1]: sorted positions served by cell i.  Nearest: cells
    between level midpoints (a point at a midpoint goes down); unbiased:
    the points in [levels[i], levels[i+1]) (the last cell includes the max)."""
    n = xs.shape[0]
    L = levels.shape[0]
    pos[0] = 0
    ncell = L if nearest else L - 1
    for i in range(ncell - 1):
        t = 0.5 * (levels[i] + levels[i + 1]) if nearest else levels[i + 1]
        lo = pos[i]
        hi = n
        while lo < hi:
            mid = (lo + hi) >> 1
            if (xs[mid] <= t) if nearest else (xs[mid] < t):
                lo = mid + 1
            else:
                hi = mid
        pos[i + 1] = lo
    pos[ncell] = n
    return ncell


@kernel
def column_costs(Z, w, levels, level_off, set_ptr, refine_iters, nearest, objective_max, j_lo, j_hi):
    """For every column j and each of its level sets (``set_ptr[j]`` ..
    ``set_ptr[j+1]`` index into ``level_off``): optionally Lloyd-refine the
    set in place (``refine_iters`` > 0, nearest rounding), then return its
    rounding error: sum (or max) of w * squared error for nearest rounding,
    of w * (b - x)(x - a) for unbiased.  Each column is sorted once; sums use
    prefix sums of w, w x, w x^2 over the sorted column (O(L log n) per set).
    Only the columns j_lo..j_hi-1 are done.  Returns costs (n_sets,), 0 for
    the sets of the other columns."""
    n = Z.shape[0]
    has_w = w.shape[0] > 0
    costs = np.zeros(level_off.shape[0] - 1, np.float64)
    for j in range(j_lo, j_hi):
        col = np.empty(n, np.float64)
        for i in range(n):
            col[i] = Z[i, j]
        order = np.argsort(col)
        xs = col[order]
        W = np.zeros(n + 1, np.float64)
        S1 = np.zeros(n + 1, np.float64)
        S2 = np.zeros(n + 1, np.float64)
        ws = np.ones(n, np.float64)
        for i in range(n):
            wi = w[order[i]] if has_w else 1.0
            ws[i] = wi
            W[i + 1] = W[i] + wi
            S1[i + 1] = S1[i] + wi * xs[i]
            S2[i + 1] = S2[i] + wi * xs[i] * xs[i]
        for si in range(set_ptr[j], set_ptr[j + 1]):
            a0 = level_off[si]
            L = level_off[si + 1] - a0
            if L == 0:
                continue
            lv = levels[a0:a0 + L]
            if refine_iters > 0 and nearest and L >= 2:
                _lloyd_sorted(xs, W, S1, lv, refine_iters)
            pos = np.empty(L + 1, np.int64)
            if L == 1:
                pos[0] = 0
                pos[1] = n
                ncell = 1
            else:
                ncell = _cell_bounds(xs, lv, pos, nearest)
            total = 0.0
            worst = 0.0
            for c in range(ncell):
                p0 = pos[c]
                p1 = pos[c + 1]
                if p1 <= p0:
                    continue
                if nearest or L == 1:
                    q = lv[c]
                    if objective_max:
                        for i in range(p0, p1):
                            e = ws[i] * (xs[i] - q) * (xs[i] - q)
                            worst = max(worst, e)
                    else:
                        total += (S2[p1] - S2[p0]) - 2.0 * q * (S1[p1] - S1[p0]) + q * q * (W[p1] - W[p0])
                else:
                    a = lv[c]
                    b = lv[c + 1]
                    if objective_max:
                        for i in range(p0, p1):
                            worst = max(worst, ws[i] * (b - xs[i]) * (xs[i] - a))
                    else:
                        total += -a * b * (W[p1] - W[p0]) + (a + b) * (S1[p1] - S1[p0]) - (S2[p1] - S2[p0])
            costs[si] = worst if objective_max else max(total, 0.0)
    return costs
