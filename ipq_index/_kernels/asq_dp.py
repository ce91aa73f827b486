"""Pure numba kernels for Adaptive Stochastic Quantization (ASQ) solvers.

Everything here works on contiguous float64 arrays and scalars only; the
validated public API lives in :mod:`ipq_index.asq`.

Notation: ``v`` sorted distinct values (centred), ``w`` their weights.
A *prefix table* ``P`` (n x 4, float64) holds per candidate level ``l``:
``(position, W, S1, S2)`` where W/S1/S2 are the weighted count, sum and sum
of squares of the (centred) points lying at or before that candidate.  The
variance of all points strictly after candidate ``k`` and up to candidate
``j`` when ``k`` and ``j`` are adjacent levels is then

    C(k, j) = -p_j p_k (W_j - W_k) + (p_j + p_k)(S1_j - S1_k) - (S2_j - S2_k)

in O(1).  The same table describes an exact problem (candidates = the input
points) and the histogram-grid approximation (candidates = grid edges, with
bin statistics), so one DP serves both.
"""

from __future__ import annotations

import numpy as np

from numba import prange

from .._numba import kernel, parallel_kernel

INF = np.inf


# --------------------------------------------------------------------------
# input preparation
# --------------------------------------------------------------------------


@kernel
def is_sorted(x):
    for i in range(1, x.shape[0]):
        if x[i] < x[i - 1]:
            return False
    return True


@kernel
def collapse_sorted(xs, ws, use_max):
    """Run-length encode sorted ``xs``: distinct values and their weights.

    ``ws`` may be empty (unit weights).  ``use_max`` combines the weights of
    equal values with ``max`` (minimax objective) instead of ``sum``.
    """
    n = xs.shape[0]
    vals = np.empty(n, np.float64)
    wts = np.empty(n, np.float64)
    has_w = ws.shape[0] > 0
    u = 0
    for i in range(n):
        wi = ws[i] if has_w else 1.0
        if u > 0 and xs[i] == vals[u - 1]:
            if use_max:
                if wi > wts[u - 1]:
                    wts[u - 1] = wi
            else:
                wts[u - 1] += wi
        else:
            vals[u] = xs[i]
            wts[u] = wi
            u += 1
    return vals[:u].copy(), wts[:u].copy()


@kernel
def weighted_mean(v, w):
    sw = 0.0
    sx = 0.0
    for i in range(v.shape[0]):
        sw += w[i]
        sx += w[i] * v[i]
    if sw > 0:
        return sx / sw
    return 0.5 * (v[0] + v[v.shape[0] - 1])


@kernel
def prefix_table(v, w, center):
    """Prefix table for candidates = the points themselves (compensated sums)."""
    n = v.shape[0]
    P = np.empty((n, 4), np.float64)
    W = 0.0
    S1 = 0.0
    S2 = 0.0
    c1 = 0.0  # Kahan compensation terms for S1 and S2
    c2 = 0.0
    for i in range(n):
        y = v[i] - center
        W += w[i]
        t1 = w[i] * y - c1
        s1n = S1 + t1
        c1 = (s1n - S1) - t1
        S1 = s1n
        t2 = w[i] * y * y - c2
        s2n = S2 + t2
        c2 = (s2n - S2) - t2
        S2 = s2n
        P[i, 0] = y
        P[i, 1] = W
        P[i, 2] = S1
        P[i, 3] = S2
    return P


# --------------------------------------------------------------------------
# the layered DP with an iterative SMAWK per layer
# --------------------------------------------------------------------------


@kernel
def gap_cost(P, k, j):
    """Cost of the points in (k, j] when candidates k < j are adjacent levels."""
    pj = P[j, 0]
    pk = P[k, 0]
    return -pj * pk * (P[j, 1] - P[k, 1]) + (pj + pk) * (P[j, 2] - P[k, 2]) - (P[j, 3] - P[k, 3])


@kernel
def _entry(P, Dprev, k, j):
    if k >= j:
        return INF
    pj = P[j, 0]
    pk = P[k, 0]
    return Dprev[k] + (
        -pj * pk * (P[j, 1] - P[k, 1]) + (pj + pk) * (P[j, 2] - P[k, 2]) - (P[j, 3] - P[k, 3])
    )


@kernel
def smawk_layer(P, Dprev, Dcur, argcur, rows_buf, vals_buf, ans_buf, ansv_buf):
    """One DP layer: Dcur[j] = min_{k<j} Dprev[k] + C(k, j) for j = 1..n-1.

    Row-minima search in a totally monotone matrix (the cost is Monge and
    the k >= j entries are +inf in the lower-left corner) by an iterative
    SMAWK.  Ties go to the smallest k.  Buffers must hold >= 2n entries.
    """
    n = P.shape[0]
    ncols0 = n - 1
    # level geometry: columns of level L are 1 + (2^L - 1) + i 2^L
    nlev = 1
    nc = ncols0
    while nc > 2:
        nc >>= 1
        nlev += 1
    ncols = np.empty(nlev, np.int64)
    offs = np.empty(nlev + 1, np.int64)
    msz = np.empty(nlev, np.int64)
    nc = ncols0
    offs[0] = 0
    for L in range(nlev):
        ncols[L] = nc
        offs[L + 1] = offs[L] + nc
        nc >>= 1

    # ---- down pass: REDUCE at every level ----
    for L in range(nlev):
        step = 1 << L
        c0 = step  # 1 + (step - 1)
        nc = ncols[L]
        out = offs[L]
        top = -1
        if L == 0:
            m_in = n - 1
        else:
            m_in = msz[L - 1]
        src = offs[L - 1] if L > 0 else 0
        for idx in range(m_in):
            r = idx if L == 0 else rows_buf[src + idx]
            while top >= 0:
                c = c0 + top * step
                if vals_buf[out + top] <= _entry(P, Dprev, r, c):
                    break
                top -= 1
            if top + 1 < nc:
                top += 1
                rows_buf[out + top] = r
                vals_buf[out + top] = _entry(P, Dprev, r, c0 + top * step)
        msz[L] = top + 1

    # ---- base level: brute force ----
    L = nlev - 1
    step = 1 << L
    c0 = step
    base = offs[L]
    for i in range(ncols[L]):
        c = c0 + i * step
        best = INF
        bestk = rows_buf[base]
        for q in range(msz[L]):
            k = rows_buf[base + q]
            val = _entry(P, Dprev, k, c)
            if val < best:
                best = val
                bestk = k
        ans_buf[base + i] = bestk
        ansv_buf[base + i] = best

    # ---- up pass: fill the even columns of each level ----
    for L in range(nlev - 2, -1, -1):
        step = 1 << L
        c0 = step
        nc = ncols[L]
        o = offs[L]
        od = offs[L + 1]
        for ii in range(ncols[L + 1]):
            ans_buf[o + 2 * ii + 1] = ans_buf[od + ii]
            ansv_buf[o + 2 * ii + 1] = ansv_buf[od + ii]
        m = msz[L]
        p = 0
        for i in range(0, nc, 2):
            lo_row = ans_buf[o + i - 1] if i > 0 else rows_buf[o]
            hi_row = ans_buf[o + i + 1] if i + 1 < nc else rows_buf[o + m - 1]
            while rows_buf[o + p] < lo_row:
                p += 1
            c = c0 + i * step
            best = INF
            bestk = rows_buf[o + p]
            q = p
            while q < m and rows_buf[o + q] <= hi_row:
                k = rows_buf[o + q]
                val = _entry(P, Dprev, k, c)
                if val < best:
                    best = val
                    bestk = k
                q += 1
            ans_buf[o + i] = bestk
            ansv_buf[o + i] = best

    Dcur[0] = INF
    argcur[0] = 0
    for i in range(ncols0):
        argcur[i + 1] = ans_buf[i]
        Dcur[i + 1] = ansv_buf[i]


@kernel
def dp_layers(P, s_max):
    """Layered ASQ DP over the candidates of ``P`` for budgets 2..s_max.

    Requires n = P.shape[0] > s_max >= 2 (the caller handles the small cases).
    Returns ``(costs, arg, arg_last)``: ``costs[t]`` is the optimal cost with
    t levels (t = 2..s_max; entries 0 and 1 are +inf), ``arg[t-3, j]`` the
    previous level of the best t-level solution ending at j (t = 3..s_max-1)
    and ``arg_last`` the previous level of the best s_max-level solution.
    """
    n = P.shape[0]
    costs = np.full(s_max + 1, INF)
    Dprev = np.empty(n, np.float64)
    Dprev[0] = INF
    for j in range(1, n):
        Dprev[j] = gap_cost(P, 0, j)
    costs[2] = Dprev[n - 1]
    nfull = max(s_max - 3, 0)  # layers 3..s_max-1 need every column
    arg = np.empty((nfull, n), np.int32)
    arg_last = 0
    if s_max >= 3:
        Dcur = np.empty(n, np.float64)
        rows_buf = np.empty(2 * n + 8, np.int32)
        vals_buf = np.empty(2 * n + 8, np.float64)
        ans_buf = np.empty(2 * n + 8, np.int32)
        ansv_buf = np.empty(2 * n + 8, np.float64)
        for t in range(3, s_max):
            smawk_layer(P, Dprev, Dcur, arg[t - 3], rows_buf, vals_buf, ans_buf, ansv_buf)
            costs[t] = Dcur[n - 1]
            tmp = Dprev
            Dprev = Dcur
            Dcur = tmp
        # last layer: only the final column is needed
        best = INF
        bestk = 0
        j = n - 1
        for k in range(1, j):
            val = Dprev[k] + gap_cost(P, k, j)
            if val < best:
                best = val
                bestk = k
        costs[s_max] = best
        arg_last = bestk
    return costs, arg, arg_last


@kernel
def backtrack(arg, arg_last, s_max, t, n):
    """Candidate indices of the optimal t-level solution from ``dp_layers``."""
    idx = np.empty(t, np.int64)
    j = n - 1
    idx[t - 1] = j
    pos = t - 2
    layer = t
    if t == s_max and t >= 3:
        j = arg_last
        idx[pos] = j
        pos -= 1
        layer -= 1
    while layer >= 3:
        j = arg[layer - 3, j]
        idx[pos] = j
        pos -= 1
        layer -= 1
    idx[0] = 0
    return idx


# --------------------------------------------------------------------------
# histogram grid (approximate solver, no sort)
# --------------------------------------------------------------------------


@kernel
def moments(x, w):
    """min, max and weighted mean of x in one pass (w may be empty)."""
    lo = x[0]
    hi = x[0]
    sx = 0.0
    sw = 0.0
    has_w = w.shape[0] > 0
    if has_w:
        for i in range(x.shape[0]):
            xi = x[i]
            if xi < lo:
                lo = xi
            if xi > hi:
                hi = xi
            sx += w[i] * xi
            sw += w[i]
    else:
        for i in range(x.shape[0]):
            xi = x[i]
            if xi < lo:
                lo = xi
            if xi > hi:
                hi = xi
            sx += xi
        sw = x.shape[0]
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
    # single-valued bins everywhere -> exact compressed problem
    exact = True
    nonempty = 0
    for b in range(m):
        if stats[b, 3] <= stats[b, 4]:
            nonempty += 1
            if stats[b, 3] != stats[b, 4]:
                exact = False
    if exact:
        P = np.empty((nonempty, 4), np.float64)
        pos = np.empty(nonempty, np.float64)
        W = 0.0
        S1 = 0.0
        S2 = 0.0
        r = 0
        for b in range(m):
            if stats[b, 3] <= stats[b, 4]:
                W += stats[b, 0]
                S1 += stats[b, 1]
                S2 += stats[b, 2]
                pos[r] = stats[b, 3]
                P[r, 0] = stats[b, 3] - center
                P[r, 1] = W
                P[r, 2] = S1
                P[r, 3] = S2
                r += 1
        return P, pos, True
    width = (hi - lo) / m
    keep = 0
    for l in range(m + 1):
        left = l > 0 and stats[l - 1, 3] <= stats[l - 1, 4]
        right = l < m and stats[l, 3] <= stats[l, 4]
        if l == 0 or l == m or left or right:
            keep += 1
    P = np.empty((keep, 4), np.float64)
    pos = np.empty(keep, np.float64)
    W = 0.0
    S1 = 0.0
    S2 = 0.0
    r = 0
    for l in range(m + 1):
        if l > 0:
            W += stats[l - 1, 0]
            S1 += stats[l - 1, 1]
            S2 += stats[l - 1, 2]
        left = l > 0 and stats[l - 1, 3] <= stats[l - 1, 4]
        right = l < m and stats[l, 3] <= stats[l, 4]
        if l == 0 or l == m or left or right:
            if l == 0:
                g = lo
            elif l == m:
                g = hi
            else:
                g = lo + l * width
            pos[r] = g
            P[r, 0] = g - center
            P[r, 1] = W
            P[r, 2] = S1
            P[r, 3] = S2
            r += 1
    return P, pos, False


# --------------------------------------------------------------------------
# minimax (worst-case) objective
# --------------------------------------------------------------------------


@kernel
def _greedy_minimax(v, w, tau, s, out):
    """Greedy walk for threshold tau with at most s levels.

    Places each next level as far right as the threshold allows.  Returns
    ``(count, slack)``: ``count`` levels used (s + 1 when infeasible) and a
    continuous measure of feasibility, ``slack`` = (bound of the last gap) -
    max(v), which is >= 0 exactly when s levels suffice.
    """
    n = v.shape[0]
    last = v[n - 1]
    a = v[0]
    out[0] = a
    count = 1
    i = 1
    while True:
        B = INF
        while i < n:
            x = v[i]
            if x >= B:
                break
            if i == n - 1:
                # the maximum is itself a level: this gap closes the walk
                out[count] = last
                return count + 1, (B - last) if B < INF else INF
            d = x - a
            if d > 0.0 and w[i] > 0.0:
                if w[i] * d * (B - x) > tau:
                    B = x + tau / (w[i] * d)
            i += 1
        if B >= last:
            out[count] = last
            return count + 1, 0.0
        if count + 1 >= s:
            # the s-th level must sit at the maximum but the bound is short
            return s + 1, B - last
        out[count] = B
        count += 1
        a = B


@kernel
def minimax_levels(v, w, s, rtol):
    """Levels minimising max_i w_i (b_i - v_i)(v_i - a_i), at most s of them.

    ``v`` sorted distinct, ``n > s``.  The optimal threshold is bracketed and
    located by a safeguarded false-position search on sqrt(tau) until the
    bracket is within ``rtol``; the returned levels are feasible for the
    upper end, so their cost is within ``rtol`` (relative) of the optimum.
    """
    n = v.shape[0]
    out = np.empty(s + 1, np.float64)
    best = np.empty(s + 1, np.float64)
    lo_v = v[0]
    hi_v = v[n - 1]
    # upper bracket: two levels
    tau_hi = 0.0
    for i in range(n):
        c = w[i] * (hi_v - v[i]) * (v[i] - lo_v)
        if c > tau_hi:
            tau_hi = c
    if tau_hi <= 0.0:
        best[0] = lo_v
        best[1] = hi_v
        return best[:2].copy()
    cnt, _ = _greedy_minimax(v, w, tau_hi, s, out)
    nbest = cnt
    for q in range(cnt):
        best[q] = out[q]
    r_lo = 0.0  # sqrt(tau) bracket
    r_hi = np.sqrt(tau_hi)
    g_lo = -(hi_v - lo_v)
    g_hi = INF
    side = 0
    for it in range(200):
        if r_hi - r_lo <= 0.5 * rtol * r_hi:
            break
        if g_hi < INF and g_lo > -INF:
            r = (r_lo * g_hi - r_hi * g_lo) / (g_hi - g_lo)
        else:
            r = 0.5 * (r_lo + r_hi)
        # keep the step well inside the bracket
        span = r_hi - r_lo
        if not (r > r_lo + 0.01 * span and r < r_hi - 0.01 * span):
            r = 0.5 * (r_lo + r_hi)
        cnt, g = _greedy_minimax(v, w, r * r, s, out)
        if cnt <= s and g >= 0.0:
            r_hi = r
            g_hi = g
            nbest = cnt
            for q in range(cnt):
                best[q] = out[q]
            if side == 1:
                g_lo *= 0.5  # Illinois step
            side = 1
        else:
            r_lo = r
            g_lo = g
            if side == -1 and g_hi < INF:
                g_hi *= 0.5
            side = -1
    return best[:nbest].copy()


# --------------------------------------------------------------------------
# one complete solve (used per column in parallel)
# --------------------------------------------------------------------------


@kernel
def exact_sum_levels(v, w, s):
    """Optimal (weighted) ASQ levels of sorted distinct values v (n > s)."""
    center = weighted_mean(v, w)
    P = prefix_table(v, w, center)
    costs, arg, arg_last = dp_layers(P, s)
    idx = backtrack(arg, arg_last, s, s, v.shape[0])
    out = np.empty(s, np.float64)
    for q in range(s):
        out[q] = v[idx[q]]
    return out


@kernel
def approx_sum_levels(x, w, s, m):
    """Grid-restricted ASQ levels of unsorted x; O(n + s m), no sort."""
    lo, hi, center = moments(x, w)
    if hi == lo:
        out = np.empty(1, np.float64)
        out[0] = lo
        return out
    P, pos, exact = grid_table(x, w, lo, hi, center, m)
    nc = P.shape[0]
    if nc <= s:
        return pos
    costs, arg, arg_last = dp_layers(P, s)
    idx = backtrack(arg, arg_last, s, s, nc)
    return pos[idx]


@kernel
def solve_one(x, w, s, objective_max, approx, m, rtol):
    """Full solve of one unsorted array (x float64, w float64 or empty)."""
    if approx and not objective_max and x.shape[0] > m:
        return approx_sum_levels(x, w, s, m)
    order = np.argsort(x, kind="mergesort") if w.shape[0] > 0 else np.empty(0, np.int64)
    if w.shape[0] > 0:
        xs = x[order]
        ws = w[order]
    else:
        xs = np.sort(x)
        ws = w
    v, wv = collapse_sorted(xs, ws, objective_max)
    if v.shape[0] <= s:
        return v
    if objective_max:
        return minimax_levels(v, wv, s, rtol)
    return exact_sum_levels(v, wv, s)


@parallel_kernel
def solve_columns_kernel(X, W, budgets, objective_max, approx, m, rtol, block):
    """Per-column solves of X (N x d), parallel over blocks of columns.

    ``W`` holds per-row weights (N,) shared by every column, or is empty.

    Columns are copied block-wise into contiguous buffers so each cache line
    of X is read once.  Returns (levels padded with NaN (d x max budget),
    counts (d,)).
    """
    N, d = X.shape
    smax = 0
    for j in range(d):
        if budgets[j] > smax:
            smax = budgets[j]
    levels = np.full((d, smax), np.nan)
    counts = np.zeros(d, np.int64)
    nblocks = (d + block - 1) // block
    for bi in prange(nblocks):
        j0 = bi * block
        j1 = min(d, j0 + block)
        buf = np.empty((j1 - j0, N), np.float64)
        for i in range(N):
            for j in range(j0, j1):
                buf[j - j0, i] = X[i, j]
        for j in range(j0, j1):
            lv = solve_one(buf[j - j0], W, budgets[j], objective_max, approx, m, rtol)
            counts[j] = lv.shape[0]
            for q in range(lv.shape[0]):
                levels[j, q] = lv[q]
    return levels, counts

