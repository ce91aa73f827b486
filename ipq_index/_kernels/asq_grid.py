"""ASQ kernels: the approximate solver of the sum objective, restricted to the
edges of a histogram grid over the value range (no sort, O(n + s m)); the
grid's prefix table feeds the exact search of ``asq_dp`` over those
candidates."""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .asq_dp import INF, PLANE_COLS, fill_plane_prefix, table_levels


@kernel
def moments(x, w):
    """min, max and weighted mean of x in one pass (w may be empty)."""
    lo = x[0]
    hi = x[0]
    sx = 0.0
    sw = 0.0
    has_w = w.shape[0] > 0
    for i in range(x.shape[0]):
        xi = x[i]
        wi = w[i] if has_w else 1.0
        if xi < lo:
            lo = xi
        if xi > hi:
            hi = xi
        sx += wi * xi
        sw += wi
    mean = sx / sw if sw > 0 else 0.5 * (lo + hi)
    return lo, hi, mean


@kernel
def grid_table(x, w, lo, hi, center, m):
    """Prefix table whose candidates are the edges of an m-cell uniform grid.

    Bin b holds the points in [g_b, g_{b+1}) (the last bin also holds hi).
    Edges with empty bins on both sides are dropped (a level there is never
    better than at the end of the empty stretch).  Returns ``(P, pos, exact)``
    with ``pos`` the raw (uncentred) candidate positions; ``exact`` is True
    when every non-empty bin holds a single value (then those values are
    the candidates and the problem is represented exactly).
    """
    n = x.shape[0]
    stats = np.zeros((m, 5), np.float64)  # W, S1, S2, raw min, raw max
    for b in range(m):
        stats[b, 3] = INF
        stats[b, 4] = -INF
    scale = m / (hi - lo)
    has_w = w.shape[0] > 0
    for i in range(n):
        xi = x[i]
        b = int((xi - lo) * scale)
        if b >= m:
            b = m - 1
        y = xi - center
        wi = w[i] if has_w else 1.0
        stats[b, 0] += wi
        stats[b, 1] += wi * y
        stats[b, 2] += wi * y * y
        if xi < stats[b, 3]:
            stats[b, 3] = xi
        if xi > stats[b, 4]:
            stats[b, 4] = xi
    occupied = np.empty(m, np.bool_)
    exact = True  # single-valued bins everywhere -> exact compressed problem
    for b in range(m):
        occupied[b] = stats[b, 3] <= stats[b, 4]
        if occupied[b] and stats[b, 3] != stats[b, 4]:
            exact = False
    P, pos = _prefix_table(stats[:, 0], stats[:, 1], stats[:, 2], occupied, stats[:, 3], lo, hi, center,
                           not exact)
    return P, pos, exact


@kernel
def _prefix_table(cw, cs1, cs2, occupied, val, lo, hi, center, edges):
    """Prefix table from the cell sums cw, cs1, cs2 (of w, w y, w y^2) of an
    m-cell grid over [lo, hi].  Candidates: with ``edges`` the m + 1 grid
    edges, dropping those with empty cells on both sides (the end edges are
    always kept); otherwise the values ``val`` of the occupied cells, each
    cell holding that single value.  Returns ``(P, pos)``."""
    m = cw.shape[0]
    width = (hi - lo) / m
    keep = 0
    for l in range(m + 1):
        keep += (l > 0 and occupied[l - 1]) or (edges and (l == 0 or l == m or occupied[l]))
    P = np.empty((keep, 4), np.float64)
    pos = np.empty(keep, np.float64)
    W = 0.0
    S1 = 0.0
    S2 = 0.0
    r = 0
    for l in range(m + 1):  # edge l follows cell l - 1
        if l > 0:
            W += cw[l - 1]
            S1 += cs1[l - 1]
            S2 += cs2[l - 1]
        if (l > 0 and occupied[l - 1]) or (edges and (l == 0 or l == m or occupied[l])):
            if edges:
                g = lo if l == 0 else (hi if l == m else lo + l * width)
            else:
                g = val[l - 1]
            pos[r] = g
            P[r, 0] = g - center
            P[r, 1] = W
            P[r, 2] = S1
            P[r, 3] = S2
            r += 1
    return P, pos


@kernel
def minmax(x):
    """min and max of x (eight independent lanes: no loop-carried chain)."""
    n = x.shape[0]
    lo = np.full(8, x[0])
    hi = np.full(8, x[0])
    n8 = n // 8 * 8
    for i in range(0, n8, 8):
        for u in range(8):
            v = x[i + u]
            lo[u] = v if v < lo[u] else lo[u]
            hi[u] = v if v > hi[u] else hi[u]
    a = lo.min()
    b = hi.max()
    for i in range(n8, n):
        a = min(a, x[i])
        b = max(b, x[i])
    return a, b


@kernel
def grid_table_unit(x, lo, hi, m):
    """:func:`grid_table` for unit weights with a lighter pass: per cell
    only the count and the sum (the S2 terms of a level set telescope, so
    the DP's choices do not depend on them; the table's S2 column holds
    sum_cells S1_b^2 / W_b, which shifts every cost by one constant).
    Whether every cell holds one value is tracked by each cell's first
    value only until two differ somewhere.  Returns ``(P, pos, exact)``.
    """
    n = x.shape[0]
    center = 0.5 * (lo + hi)
    st = np.zeros((m, 2), np.float64)  # count, sum of x - center
    first = np.full(m, np.nan)
    scale = m / (hi - lo)
    i = 0
    mixed = False
    while i < n and not mixed:
        xi = x[i]
        b = min(int((xi - lo) * scale), m - 1)
        f = first[b]
        if f != f:
            first[b] = xi
        elif f != xi:
            mixed = True
        st[b, 0] += 1.0
        st[b, 1] += xi - center
        i += 1
    for i2 in range(i, n):
        xi = x[i2]
        b = min(int((xi - lo) * scale), m - 1)
        st[b, 0] += 1.0
        st[b, 1] += xi - center
    occupied = np.empty(m, np.bool_)
    cs2 = np.zeros(m, np.float64)
    for b in range(m):
        occupied[b] = st[b, 0] > 0.0
    if not mixed:
        for b in range(m):
            if occupied[b]:
                y = first[b] - center
                cs2[b] = st[b, 0] * y * y
    else:
        for b in range(m):
            if occupied[b]:
                cs2[b] = st[b, 1] * st[b, 1] / st[b, 0]
    P, pos = _prefix_table(st[:, 0], st[:, 1], cs2, occupied, first, lo, hi, center, mixed)
    return P, pos, not mixed


@kernel
def approx_sum_levels(x, w, s, m):
    """Grid-restricted ASQ levels of unsorted x (weights w, or None for unit
    weights: then the weighted grid is not even compiled); O(n + s m), no sort."""
    if w is None:
        lo, hi = minmax(x)
    else:
        lo, hi, center = moments(x, w)
    if hi == lo:
        out = np.empty(1, np.float64)
        out[0] = lo
        return out
    if w is None:
        P, pos, exact = grid_table_unit(x, lo, hi, m)
    else:
        P, pos, exact = grid_table(x, w, lo, hi, center, m)
    nc = P.shape[0]
    if nc <= s:
        return pos
    T = np.empty((nc, PLANE_COLS), np.float64)
    span = fill_plane_prefix(P, T)
    D = np.empty(nc, np.float64)
    q = np.empty(nc, np.int32)
    qs = np.empty(nc, np.int32)
    cnt = np.empty(nc, np.int32)
    arg1 = np.empty(nc, np.int32)
    idx = table_levels(T, nc, s, D, np.empty((0, nc), np.int32), q, qs, cnt, arg1, span)
    if idx.shape[0] == 0:
        idx = table_levels(T, nc, s, D, np.empty((max(s - 3, 0), nc), np.int32), q, qs, cnt[:0], arg1,
                           span)
    return pos[idx]
