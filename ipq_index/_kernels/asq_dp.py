"""Pure numba kernels for Adaptive Stochastic Quantization (ASQ) solvers.

Everything here works on contiguous float64 arrays and scalars only; the
validated public API lives in :mod:`ipq_index.asq`.

Notation: candidates l = 0..n-1 (the sorted distinct values, or grid edges)
at centred positions p_l, with W_l, S1_l, S2_l the weighted count, sum and
sum of squares of the (centred) points at or before candidate l.  With k < j
adjacent levels, the points in (k, j] cost

    C(k, j) = -p_j p_k (W_j - W_k) + (p_j + p_k)(S1_j - S1_k) - (S2_j - S2_k)

that is C(k, j) = a_j - a_k - p_j c_k + c_j p_k with
a_j = p_j S1_j - S2_j and c_j = S1_j - p_j W_j.  The a terms telescope along
a level set, so the DPs keep shifted values D'(j) = D(j) - a_j + a_0:

    D'(j) = min_k D'(k) - p_j c_k + c_j p_k      (the *plane form*)

and one entry costs two multiply-adds; a cost is D'(N) + a_N - a_0 (the
"span", returned by the table fills).  The *plane table* T (n x 3 float64,
24 bytes per candidate) holds T[:, 0] = p, 1 = c, 2 = gamma (the row's
D'(k), plus the level price in the Lagrangian passes, set per pass).
"""

from __future__ import annotations

import numpy as np

from .._numba import kernel

INF = np.inf
PLANE_COLS = 3
#: budgets up to this use the layered DP; larger ones the Lagrangian search
LAYERED_MAX_S = 5
#: bisection steps on each end of the sub-instance's price interval
SUB_REFINE = 4
#: penalised passes before the Lagrangian search falls back to layers
LAGRANGE_MAX_ITER = 40


@kernel
def is_sorted(x):
    for i in range(1, x.shape[0]):
        if x[i] < x[i - 1]:
            return False
    return True


@kernel
def collapse_sorted(xs, ws, use_max, vals, wts):
    """Run-length encode sorted ``xs`` into ``vals``/``wts``; returns the count.

    ``ws`` may be empty (unit weights).  ``use_max`` combines the weights of
    equal values with ``max`` (minimax objective) instead of ``sum``.
    """
    n = xs.shape[0]
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
    return u


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
def _two_sum_add(S, e, t):
    """S + t, with the rounding error of that addition added to the
    compensation e (Knuth's TwoSum): returns (new sum, new compensation)."""
    s = S + t
    b = s - S
    return s, e + ((S - (s - b)) + (t - b))


@kernel
def _plane_row(T, l, p, W, S1):
    T[l, 0] = p
    T[l, 1] = S1 - p * W


@kernel
def fill_plane_points(v, w, center, T):
    """Plane table for candidates = the points themselves (``w`` empty = unit
    weights); returns the span a_N - a_0.  S1 and S2 are compensated
    (TwoSum: the running sums keep a one-add dependency chain, the error
    terms are accumulated aside)."""
    has_w = w.shape[0] > 0
    W = 0.0
    S1 = 0.0
    S2 = 0.0
    e1 = 0.0
    e2 = 0.0
    for i in range(v.shape[0]):
        y = v[i] - center
        wi = w[i] if has_w else 1.0
        W += wi
        t1 = wi * y
        t2 = t1 * y
        S1, e1 = _two_sum_add(S1, e1, t1)
        S2, e2 = _two_sum_add(S2, e2, t2)
        _plane_row(T, i, y, W, S1 + e1)
    # a_0 = y_0 (w_0 y_0) - (w_0 y_0) y_0 = 0
    n = v.shape[0]
    return (v[n - 1] - center) * (S1 + e1) - (S2 + e2)


@kernel
def fill_plane_increasing(x, center, T):
    """:func:`fill_plane_points` with unit weights for x that should be
    strictly increasing; returns the span, or NaN (T partly written) at the
    first pair that is not, so sorted distinct input needs no separate
    check."""
    S1 = 0.0
    S2 = 0.0
    e1 = 0.0
    e2 = 0.0
    prev = -INF
    for i in range(x.shape[0]):
        xi = x[i]
        if not (xi > prev):
            return np.nan
        prev = xi
        y = xi - center
        t2 = y * y
        S1, e1 = _two_sum_add(S1, e1, y)
        S2, e2 = _two_sum_add(S2, e2, t2)
        _plane_row(T, i, y, i + 1.0, S1 + e1)
    # a_0 = y_0 S1_0 - S2_0 = 0 exactly for unit weights
    return (x[x.shape[0] - 1] - center) * (S1 + e1) - (S2 + e2)


@kernel
def sorted_count(x):
    """``(sorted, distinct)``: whether x is non-decreasing, and if so its
    number of distinct values (one branch-free pass)."""
    n = x.shape[0]
    srt = True
    distinct = 1
    for i0 in range(1, n, 4096):
        for i in range(i0, min(i0 + 4096, n)):
            srt = srt & (x[i] >= x[i - 1])
            distinct += x[i] != x[i - 1]
        if not srt:
            return False, 0  # unsorted: stop early
    return srt, distinct


@kernel
def fill_plane_prefix(P, T):
    """Plane table from a prefix table P (n x 4: position, W, S1, S2);
    returns the span a_N - a_0."""
    n = P.shape[0]
    for l in range(n):
        _plane_row(T, l, P[l, 0], P[l, 1], P[l, 2])
    aN = P[n - 1, 0] * P[n - 1, 2] - P[n - 1, 3]
    a0 = P[0, 0] * P[0, 2] - P[0, 3]
    return aN - a0


# --------------------------------------------------------------------------
# the layered DP; each layer is a row-minima search in a Monge matrix
# --------------------------------------------------------------------------


@kernel
def _queue_insert(F, n, k, j, q, qs, h, tl, d):
    """Insert row k (valid from column j) into the queue q[h..tl]; returns
    the new tl and the take-over distance to predict the next one with.

    Because C is Monge, a later row that is strictly better than an earlier
    one at some column stays strictly better at every later column, so the
    rows that win the remaining columns form a queue ordered both by row and
    by the column ``qs`` where each takes over.  Rows at the back are
    dropped when k beats them from their take-over column on; otherwise k's
    take-over column is searched around the predicted distance ``d`` (the
    last one found: consecutive rows take over at similar distances, long
    ones on skewed data) by galloping back or forward, then bisection (or k
    never wins).  Ties go to the smaller row.  Row values use the plane form
    with gamma = T[:, 2]; ``F`` is the plane table flattened (constant row
    stride, cheaper addressing on the critical path).
    """
    known = -1  # a column where k is known to beat the current back row
    while True:
        if tl < h:
            tl += 1
            q[tl] = k
            qs[tl] = j
            return tl, d
        b = q[tl]
        # k beats b at column c iff da p_c + db c_c + dg < 0
        da = F[b * PLANE_COLS + 1] - F[k * PLANE_COLS + 1]
        db = F[k * PLANE_COLS] - F[b * PLANE_COLS]
        dg = F[k * PLANE_COLS + 2] - F[b * PLANE_COLS + 2]
        sb = qs[tl] if qs[tl] > j else j
        at_sb = da * F[sb * PLANE_COLS] + db * F[sb * PLANE_COLS + 1] + dg < 0.0
        if known > sb:
            # after a pop: k beats this row where the popped one took over
            c = known
            at_c = True
        else:
            c = min(sb + d, n - 1)
            at_c = da * F[c * PLANE_COLS] + db * F[c * PLANE_COLS + 1] + dg < 0.0
        if c > sb and at_c:
            if at_sb:
                known = sb
                tl -= 1  # k wins every column b would have won
                continue
            # take-over in (sb, c]: gallop back from c
            lo = sb
            hi = c
            step = 1
            while hi - step > lo:
                t = hi - step
                if da * F[t * PLANE_COLS] + db * F[t * PLANE_COLS + 1] + dg < 0.0:
                    hi = t
                    step <<= 1
                else:
                    lo = t
                    break
        else:
            if at_sb:
                known = sb
                tl -= 1
                continue
            lo = c
            step = 1
            hi = lo + 1
            found = False
            while hi < n:
                if da * F[hi * PLANE_COLS] + db * F[hi * PLANE_COLS + 1] + dg < 0.0:
                    found = True
                    break
                lo = hi
                step <<= 1
                hi = lo + step
            if not found:
                if lo >= n - 1:
                    return tl, d  # k never wins
                hi = n - 1
                if not (da * F[hi * PLANE_COLS] + db * F[hi * PLANE_COLS + 1] + dg < 0.0):
                    return tl, d
        while hi - lo > 1:
            mid = (lo + hi) >> 1
            if da * F[mid * PLANE_COLS] + db * F[mid * PLANE_COLS + 1] + dg < 0.0:
                hi = mid
            else:
                lo = mid
        tl += 1
        q[tl] = k
        qs[tl] = hi
        return tl, hi - sb


@kernel
def envelope_layer(T, n, D, argcur, q, qs):
    """One DP layer in place: D[j] <- min_{k<j} D[k] + C(k, j), j = 1..n-1.

    Row-minima search in a Monge matrix with a queue of candidate rows (see
    ``_queue_insert``): O(n) probes when take-over distances are short (the
    usual case on sorted data), O(n log n) worst case.  Writes T[:, 2].
    """
    F = T.reshape(T.shape[0] * PLANE_COLS)
    h = 0
    d = 1
    tl = -1
    F[2] = D[0]
    D[0] = INF
    argcur[0] = 0
    for j in range(1, n):
        rj = j * PLANE_COLS
        # row j's gamma uses the previous layer's D[j], overwritten below
        F[rj + 2] = D[j]
        tl, d = _queue_insert(F, n, j - 1, j, q, qs, h, tl, d)
        while tl > h and qs[h + 1] <= j:
            h += 1
        kb = q[h]
        argcur[j] = kb
        rk = kb * PLANE_COLS
        D[j] = F[rk + 2] - F[rj] * F[rk + 1] + F[rj + 1] * F[rk]


@kernel
def penalized_levels(T, n, lam, E, arg, cnt, q, qs):
    """Unconstrained ASQ with a price ``lam`` per level (concave LWS, online).

    E[j] = min_{k<j} E[k] + C(k, j) + lam with E[0] = 0; ``arg`` the chosen
    previous level.  Returns the level count of the solution ending at
    n - 1 (counted along ``arg``).  A solution with exactly s levels is an
    optimal s-level solution (Lagrangian duality).  E[j] only lives in row
    j's gamma (set as soon as E[j] is known); ``E`` and ``cnt`` are unused.
    """
    F = T.reshape(T.shape[0] * PLANE_COLS)
    h = 0
    d = 1
    tl = -1
    arg[0] = 0
    F[2] = lam
    for j in range(1, n):
        tl, d = _queue_insert(F, n, j - 1, j, q, qs, h, tl, d)
        while tl > h and qs[h + 1] <= j:
            h += 1
        kb = q[h]
        arg[j] = kb
        rj = j * PLANE_COLS
        rk = kb * PLANE_COLS
        F[rj + 2] = F[rk + 2] - F[rj] * F[rk + 1] + F[rj + 1] * F[rk] + lam
    count = 1
    j = n - 1
    while j > 0:
        j = arg[j]
        count += 1
    return count


@kernel
def lagrangian_levels(T, n, s, lam0, max_iter, E, arg, cnt, q, qs):
    """Exact s-level solution by searching the level price lam.

    Starts at ``lam0`` (an estimate of the marginal cost of the s-th level),
    moves geometrically until the count brackets s, then interpolates in
    log(lam).  Returns the candidate indices (length s) or an empty array
    when ties kept every price from giving exactly s levels (the caller then
    runs the layered DP), the last price tried and the bracket (lo, hi):
    prices known to give more / fewer than s levels (0 / inf if none).
    """
    lam = lam0 if lam0 > 0.0 else 1.0
    lo = 0.0  # price giving more than s levels
    k_lo = n
    hi = INF  # price giving fewer than s levels
    k_hi = 2
    for it in range(max_iter):
        k = penalized_levels(T, n, lam, E, arg, cnt, q, qs)
        if k == s:
            idx = np.empty(s, np.int64)
            j = n - 1
            for i in range(s - 1, -1, -1):
                idx[i] = j
                j = arg[j]
            return idx, lam, lo, hi
        if k > s:
            lo = lam
            k_lo = k
        else:
            hi = lam
            k_hi = k
        if hi < INF and lo > 0.0:
            if hi / lo - 1.0 < 1e-13:
                break
            # k ~ lam^(-1/3) for smooth data: interpolate in log space
            f = (np.log(k_lo) - np.log(s)) / (np.log(k_lo) - np.log(k_hi))
            f = min(max(f, 0.05), 0.95)
            lam = np.exp(np.log(lo) + f * (np.log(hi) - np.log(lo)))
        elif hi == INF:
            lam = lam * max((k / s) ** 3, 1.5)
        else:
            lam = lam * min((k / s) ** 3, 1.0 / 1.5)
    return np.empty(0, np.int64), lam, lo, hi


@kernel
def dp_layers(T, n, s_max, D, arg, q, qs, span):
    """Layered ASQ DP over the first n candidates of plane table T.

    Requires n > s_max >= 2.  Returns ``(costs, arg_last)``: ``costs[t]`` is
    the optimal cost with t levels (t = 2..s_max; entries 0, 1 are +inf);
    on return ``arg[t-3, j]`` is the previous level of the best t-level
    solution ending at j (t = 3..s_max-1) and ``arg_last`` the previous level
    of the best s_max-level solution.  ``D``, ``q``, ``qs`` are scratch (>= n);
    ``span`` = a_N - a_0 of the table (only shifts the costs).
    """
    costs = np.full(s_max + 1, INF)
    # two levels: 0 and j
    for j in range(1, n):
        D[j] = T[j, 1] * T[0, 0] - T[j, 0] * T[0, 1]
    D[0] = INF
    costs[2] = D[n - 1] + span
    arg_last = 0
    if s_max >= 3:
        for t in range(3, s_max):
            envelope_layer(T, n, D, arg[t - 3], q, qs)
            costs[t] = D[n - 1] + span
        # last layer: only the final column is needed
        j = n - 1
        best = INF
        for k in range(1, j):
            val = D[k] - T[j, 0] * T[k, 1] + T[j, 1] * T[k, 0]
            if val < best:
                best = val
                arg_last = k
        costs[s_max] = best + span
    return costs, arg_last


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
    occupied = np.empty(m, np.bool_)
    for b in range(m):
        occupied[b] = stats[b, 3] <= stats[b, 4]
    P, pos = _edge_table(stats[:, 0], stats[:, 1], stats[:, 2], occupied, lo, hi, center)
    return P, pos, False


@kernel
def _edge_table(cw, cs1, cs2, occupied, lo, hi, center):
    """Prefix table over the m + 1 grid edges (cell sums cw, cs1, cs2 of
    w, w y, w y^2); edges with empty cells on both sides are dropped, the
    end edges are always kept.  Returns ``(P, pos)``."""
    m = cw.shape[0]
    width = (hi - lo) / m
    keep = 0
    for l in range(m + 1):
        keep += l == 0 or l == m or occupied[l - 1] or occupied[l]
    P = np.empty((keep, 4), np.float64)
    pos = np.empty(keep, np.float64)
    W = 0.0
    S1 = 0.0
    S2 = 0.0
    r = 0
    for l in range(m + 1):
        if l > 0:
            W += cw[l - 1]
            S1 += cs1[l - 1]
            S2 += cs2[l - 1]
        if l == 0 or l == m or occupied[l - 1] or occupied[l]:
            g = lo if l == 0 else (hi if l == m else lo + l * width)
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
    nonempty = 0
    for b in range(m):
        nonempty += st[b, 0] > 0.0
    if not mixed:
        P = np.empty((nonempty, 4), np.float64)
        pos = np.empty(nonempty, np.float64)
        W = 0.0
        S1 = 0.0
        S2 = 0.0
        r = 0
        for b in range(m):
            if st[b, 0] > 0.0:
                y = first[b] - center
                W += st[b, 0]
                S1 += st[b, 1]
                S2 += st[b, 0] * y * y
                pos[r] = first[b]
                P[r, 0] = y
                P[r, 1] = W
                P[r, 2] = S1
                P[r, 3] = S2
                r += 1
        return P, pos, True
    occupied = np.empty(m, np.bool_)
    cs2 = np.zeros(m, np.float64)
    for b in range(m):
        occupied[b] = st[b, 0] > 0.0
        if occupied[b]:
            cs2[b] = st[b, 1] * st[b, 1] / st[b, 0]
    P, pos = _edge_table(st[:, 0], st[:, 1], cs2, occupied, lo, hi, center)
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
def _first_greater(v, lo, t):
    """Smallest index i >= lo with v[i] > t (v.shape[0] if none)."""
    hi = v.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if v[mid] <= t:
            lo = mid + 1
        else:
            hi = mid
    return lo


@kernel
def _greedy_minimax_unit(v, tau, s, out):
    """``_greedy_minimax`` for equal weights in O(s log n).

    In a gap starting at level a, point x allows the next level up to
    g(x) = x + tau / (x - a), a convex function of x with its minimum at
    a + sqrt(tau); the binding point is therefore one of the two data points
    around a + sqrt(tau) (a point beyond the resulting bound is not in the
    gap).  Same return values as ``_greedy_minimax``.
    """
    n = v.shape[0]
    last = v[n - 1]
    a = v[0]
    out[0] = a
    count = 1
    i = 1  # first point strictly after a
    r = np.sqrt(tau)
    while True:
        # candidates: points in (a, max), i.e. indices i..n-2 (the maximum is a
        # level); the binding one is next to a + r
        j = _first_greater(v, i, a + r)  # v[j] > a + r >= v[j-1]
        if j > n - 1:
            j = n - 1
        B = INF
        if j - 1 >= i:
            x = v[j - 1]
            if x > a:
                B = x + tau / (x - a)
        if j < n - 1:
            x = v[j]
            if x < B:
                gx = x + tau / (x - a)
                if gx < B:
                    B = gx
        # every point in (a, B) is now covered; is the maximum among them?
        if last < B:
            out[count] = last
            return count + 1, (B - last) if B < INF else INF
        if B >= last:
            out[count] = last
            return count + 1, 0.0
        if count + 1 >= s:
            return s + 1, B - last
        out[count] = B
        count += 1
        a = B
        i = _first_greater(v, i, a)  # points equal to the new level carry no variance


@kernel
def _greedy(v, w, tau, s, out, unit, wconst):
    if unit:
        return _greedy_minimax_unit(v, tau / wconst, s, out)
    return _greedy_minimax(v, w, tau, s, out)


@kernel
def minimax_levels(v, w, s, rtol):
    """Levels minimising max_i w_i (b_i - v_i)(v_i - a_i), at most s of them.

    ``v`` sorted distinct, ``n > s``; or ``w`` empty (unit weights) and ``v``
    sorted with repeats allowed (O(s log n) per walk, nothing O(n)).  The
    optimal threshold is bracketed and
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
    if w.shape[0] == 0:
        # unit weights: (hi - x)(x - lo) peaks at the midpoint, so the worst
        # point is one of the two around it
        j = _first_greater(v, 0, 0.5 * (lo_v + hi_v))
        for i in range(max(j - 1, 0), min(j + 1, n)):
            tau_hi = max(tau_hi, (hi_v - v[i]) * (v[i] - lo_v))
        wmin = 1.0
        wmax = 1.0
    else:
        for i in range(n):
            c = w[i] * (hi_v - v[i]) * (v[i] - lo_v)
            if c > tau_hi:
                tau_hi = c
        wmin = w[0]
        wmax = w[0]
        for i in range(n):
            wmin = min(wmin, w[i])
            wmax = max(wmax, w[i])
    if tau_hi <= 0.0:
        best[0] = lo_v
        best[1] = hi_v
        return best[:2].copy()
    unit = wmin == wmax and wmin > 0.0
    cnt, _ = _greedy(v, w, tau_hi, s, out, unit, wmin)
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
        cnt, g = _greedy(v, w, r * r, s, out, unit, wmin)
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
# one complete solve per column
# --------------------------------------------------------------------------


@kernel
def sub_instance(T, n, m):
    """Rows of T for about m candidates: m/2 evenly spaced in rank and the
    ones next to m/2 evenly spaced positions (the tails of skewed data get
    candidates too).  A subset of candidates is an exact instance of the
    problem restricted to those levels (every point still counts)."""
    half = max(m // 2, 2)
    a = np.empty(half, np.int64)
    b = np.empty(half, np.int64)
    p0 = T[0, 0]
    pN = T[n - 1, 0]
    for i in range(half):
        a[i] = (i * (n - 1)) // (half - 1)
        t = p0 + (pN - p0) * (i / (half - 1))
        lo = 0
        hi = n - 1
        while lo < hi:  # first candidate at or above t
            mid = (lo + hi) >> 1
            if T[mid, 0] < t:
                lo = mid + 1
            else:
                hi = mid
        b[i] = lo
    sel = np.empty(2 * half, np.int64)
    r = 0
    i = 0
    j = 0
    while i < half or j < half:
        if j >= half or (i < half and a[i] <= b[j]):
            v = a[i]
            i += 1
        else:
            v = b[j]
            j += 1
        if r == 0 or sel[r - 1] != v:
            sel[r] = v
            r += 1
    Tc = np.empty((r, PLANE_COLS), np.float64)
    for i in range(r):
        for c in range(PLANE_COLS):
            Tc[i, c] = T[sel[i], c]
    return Tc


@kernel
def sub_instance_price(T, n, s, span, per_level=64):
    """A price per level that gives s levels on a sub-instance of about
    min(max(min(4096, n / 8), per_level s), n / 4) candidates (cheap passes), used to start the full
    search: it nearly always gives exactly s levels on the full instance."""
    m = min(max(min(4096, n // 8), per_level * s), n // 4)
    # the marginal cost of a level for smooth data, from the 2-level cost:
    # OPT(s) ~ OPT(2) / (s - 1)^2, so lam ~ 2 OPT(2) / (s - 1)^3
    j = n - 1
    c2 = T[j, 1] * T[0, 0] - T[j, 0] * T[0, 1] + span
    lam0 = 2.0 * max(c2, 1e-300) / ((s - 1.0) ** 3)
    if n <= 2 * m:
        return lam0
    Tc = sub_instance(T, n, m)
    mc = Tc.shape[0]
    if mc <= 4 * (s + 1):
        return lam0
    E = np.empty(mc, np.float64)
    arg = np.empty(mc, np.int32)
    cnt = np.empty(mc, np.int32)
    q = np.empty(mc, np.int32)
    qs = np.empty(mc, np.int32)
    idx, lam, lo, hi = lagrangian_levels(Tc, mc, s, lam0, 60, E, arg, cnt, q, qs)
    if idx.shape[0] != s:
        return lam
    # the prices giving s levels form an interval; aim at its (geometric)
    # middle, which is the most likely to give s on the full instance too
    a = lam  # lowest price known to give s
    lo = lo if lo > 0.0 else lam / 8.0
    b = lam  # highest price known to give s
    hi = hi if hi < INF else lam * 8.0
    # (a miss costs one more full pass: refine less when that is cheap)
    for it in range(SUB_REFINE if n >= 16 * mc else 1):
        mid = np.sqrt(lo * a)
        if penalized_levels(Tc, mc, mid, E, arg, cnt, q, qs) == s:
            a = mid
        else:
            lo = mid
        mid = np.sqrt(b * hi)
        if penalized_levels(Tc, mc, mid, E, arg, cnt, q, qs) == s:
            b = mid
        else:
            hi = mid
    return np.sqrt(a * b)


@kernel
def table_levels(T, n, s, D, arg, q, qs, cnt, arg1, span):
    """Indices of the optimal s levels among the n candidates of T (n > s).

    Small budgets (s <= LAYERED_MAX_S): the layered DP, s - 3 queue layers.
    Larger budgets: the Lagrangian search (a few O(n) online passes,
    independent of s) started from a coarse-instance price estimate, with
    the layered DP as the fallback when ties block an exact hit.  ``arg``
    (>= (s-3) x n) is only touched by the layered DP; ``cnt``/``arg1`` (>= n)
    only by the Lagrangian search.
    """
    if s > LAYERED_MAX_S and n > 4 * (s + 1) and cnt.shape[0] >= n and arg1.shape[0] >= n:
        lam0 = sub_instance_price(T, n, s, span)
        idx, _lam, _lo, _hi = lagrangian_levels(T, n, s, lam0, LAGRANGE_MAX_ITER, D, arg1, cnt, q, qs)
        if idx.shape[0] == s:
            return idx
    if arg.shape[0] < s - 3:
        return np.empty(0, np.int64)  # the caller must provide the layered scratch
    costs, arg_last = dp_layers(T, n, s, D, arg, q, qs, span)
    return backtrack(arg, arg_last, s, s, n)


@kernel
def exact_sum_levels(v, w, s, T, D, arg, q, qs, cnt, arg1, filled=False, span=0.0):
    """Optimal (weighted) ASQ levels of sorted distinct values v (n > s);
    empty when the layered fallback is needed but ``arg`` is too small.
    ``filled``: T already holds the plane table of v (centred at v[n // 2])
    and ``span`` its span."""
    n = v.shape[0]
    if not filled:
        span = fill_plane_points(v, w, v[n // 2], T)
    idx = table_levels(T, n, s, D, arg, q, qs, cnt, arg1, span)
    out = np.empty(idx.shape[0], np.float64)
    for i in range(idx.shape[0]):
        out[i] = v[idx[i]]
    return out


@kernel
def approx_sum_levels(x, w, s, m):
    """Grid-restricted ASQ levels of unsorted x; O(n + s m), no sort."""
    if w.shape[0] == 0:
        lo, hi = minmax(x)
    else:
        lo, hi, center = moments(x, w)
    if hi == lo:
        out = np.empty(1, np.float64)
        out[0] = lo
        return out
    if w.shape[0] == 0:
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
    return np.full((j_hi - j_lo, smax), np.nan), np.zeros(j_hi - j_lo, np.int64)


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
            counts[j - j_lo] = lv.shape[0]
            levels[j - j_lo, :lv.shape[0]] = lv
    return levels, counts


@kernel
def solve_columns_approx(X, W, budgets, m, block, j_lo, j_hi):
    """``solve_columns_exact`` with the grid-restricted sum solver
    (``approx_sum_levels``, grid of m points; needs N > m)."""
    levels, counts = _level_rows(budgets, j_lo, j_hi)
    for j0 in range(j_lo, j_hi, block):
        j1 = min(j_hi, j0 + block)
        buf = _column_block(X, j0, j1)
        for j in range(j0, j1):
            lv = approx_sum_levels(buf[j - j0], W, budgets[j], m)
            counts[j - j_lo] = lv.shape[0]
            levels[j - j_lo, :lv.shape[0]] = lv
    return levels, counts


# --------------------------------------------------------------------------
# s = 3, 4, 5 in one sweep: no plane table, no DP
# --------------------------------------------------------------------------
#
# With outer levels k < j fixed, the cost of one extra level between them is
# convex and piecewise linear in its position, so its best position is the
# first point b (k <= b <= j) with
#     g(b) = (S1_j - S1_k) - (W_b - W_k) p_k - (W_j - W_b) p_j >= 0,
# i.e. W_b >= tau(k, j) = (W_j p_j - W_k p_k - (S1_j - S1_k)) / (p_j - p_k);
# with unit weights W_b = b + 1 gives b in closed form (one division), with
# weights a pointer walk finds it (b*(k, j) is non-decreasing in k and j).
# The S2 terms of a level set telescope to S2_N - S2_0 (a constant), so the
# comparisons only need prefix sums of w and w x: a sorted input (duplicates
# allowed: a copy of a level costs 0 whichever copy the index names) is
# scanned once for its prefix sums and swept once.


#: the sweep keeps sum(w p^2) at every Q_STEP-th point (for its bounds)
Q_STEP = 32
#: ranges of interior levels this short are evaluated point by point
SWEEP_LEAF = 64


@kernel
def prefix_scan(x, w, center, P, PW, Q):
    """One pass over x: P[i] = sum_{l<=i} w_l (x_l - center) (compensated,
    TwoSum), PW[i] = sum_{l<=i} w_l when weighted (w, PW may be empty), and
    Q[t] = sum_{l < t Q_STEP} w_l (x_l - center)^2 (len >= n // Q_STEP + 1).
    Returns ``(sorted, distinct)``: whether x is non-decreasing, and if so
    its number of distinct values."""
    n = x.shape[0]
    has_w = w.shape[0] > 0
    srt = True
    distinct = 1
    W = 0.0
    S = 0.0
    c = 0.0
    S2 = 0.0
    prev = x[0]
    for i in range(n):
        xi = x[i]
        srt = srt & (xi >= prev)
        distinct += xi != prev
        prev = xi
        y = xi - center
        if has_w:
            wi = w[i]
            W += wi
            PW[i] = W
            t = wi * y
        else:
            t = y
        if i % Q_STEP == 0:
            Q[i // Q_STEP] = S2
        S2 += t * y
        sn = S + t
        bb = sn - S
        c += (S - (sn - bb)) + (t - bb)
        S = sn
        P[i] = S + c
    return srt, distinct


@kernel
def _seg(pk, pj, Wk, Wj, Sk, Sj):
    """Cost of the points in (k, j] up to the telescoping S2 terms."""
    return (pj + pk) * (Sj - Sk) - pj * pk * (Wj - Wk)


@kernel
def _wt(PW, i):
    return i + 1.0 if PW.shape[0] == 0 else PW[i]


@kernel
def _mid(x, center, P, PW, k, j):
    """Best middle level index in [k, j] between levels k < j: the first b
    with W_b (p_j - p_k) >= W_j p_j - W_k p_k - (S1_j - S1_k); closed form
    for unit weights (W_b = b + 1), bisection on PW otherwise."""
    pk = x[k] - center
    pj = x[j] - center
    if pj <= pk:
        return j
    tau = (_wt(PW, j) * pj - _wt(PW, k) * pk - (P[j] - P[k])) / (pj - pk)
    if PW.shape[0] == 0:
        tau = min(max(tau, k + 1.0), j + 1.0)
        b = np.int64(tau)  # ceil(tau) - 1 without a libm call (tau >= 1)
        b += b < tau
        return b - 1
    lo = k
    hi = j
    while lo < hi:
        mid = (lo + hi) >> 1
        if PW[mid] >= tau:
            hi = mid
        else:
            lo = mid + 1
    return lo


@kernel
def _c2(x, center, P, PW, k, j):
    """(cost up to S2 terms, middle index) of the best 3 levels k, b, j."""
    b = _mid(x, center, P, PW, k, j)
    pk = x[k] - center
    pj = x[j] - center
    pb = x[b] - center
    Wb = _wt(PW, b)
    val = _seg(pk, pb, _wt(PW, k), Wb, P[k], P[b]) + _seg(pb, pj, Wb, _wt(PW, j), P[b], P[j])
    return val, b


@kernel
def _left(x, center, P, PW, s, m):
    """Best cost of the levels up to m (0, m for s = 4; 0, b, m for s = 5)."""
    if s == 4:
        return _seg(x[0] - center, x[m] - center, _wt(PW, 0), _wt(PW, m), P[0], P[m]), 0
    return _c2(x, center, P, PW, 0, m)


@kernel
def _s2_upto(x, w, center, Q, i):
    """sum_{l <= i} w_l (x_l - center)^2 from the every-Q_STEP table."""
    t = i // Q_STEP
    acc = Q[t]
    has_w = w.shape[0] > 0
    for l in range(t * Q_STEP, i + 1):
        y = x[l] - center
        acc += (w[l] if has_w else 1.0) * y * y
    return acc


@kernel
def small_sum_levels(x, w, s, center, P, PW, Q):
    """Indices of optimal levels (s in 3, 4, 5) of sorted x, from the
    prefix sums of :func:`prefix_scan` (``w``, ``PW`` empty = unit weights).

    s = 3 is one closed-form middle level.  For s = 4, 5 the cost is
    F(m) = left(m) + right(m) over the level m before the last middle one,
    left(m) = C(0, m) or C2(0, m) is non-decreasing in m and
    right(m) = C2(m, N) non-increasing, so over a range [a, b] of m,
    F >= left(a) + right(b): a branch and bound over halved ranges skips
    every range whose bound is not below the best F found, and evaluates
    the remaining short ranges point by point (O(1) per point with unit
    weights).  Returns s non-decreasing indices (a wasted level may repeat
    a value).
    """
    n = x.shape[0]
    N = n - 1
    idx = np.zeros(s, np.int64)
    idx[s - 1] = N
    if s == 3:
        idx[1] = _mid(x, center, P, PW, 0, N)
        return idx
    # costs are compared without the S2 terms (they telescope); a range
    # bound in the same units adds sum(w p^2) over the range
    scale = abs(Q[N // Q_STEP]) + 1e-300
    best = INF
    stack = np.empty((128, 2), np.int64)
    stack[0, 0] = 1
    stack[0, 1] = N - 1
    top = 1
    while top > 0:
        top -= 1
        a = stack[top, 0]
        b = stack[top, 1]
        if b - a >= SWEEP_LEAF:
            la, _ = _left(x, center, P, PW, s, a)
            rb, _ = _c2(x, center, P, PW, b, N)
            bound = la + rb + (_s2_upto(x, w, center, Q, b) - _s2_upto(x, w, center, Q, a))
            if bound - best >= 1e-12 * (abs(best) + scale):
                continue
            mid = (a + b) >> 1
            # visit the half with the better end first (its F tightens best)
            fa = la + _c2(x, center, P, PW, a, N)[0]
            fb = _left(x, center, P, PW, s, b)[0] + rb
            if fa <= fb:
                stack[top, 0] = mid + 1
                stack[top, 1] = b
                stack[top + 1, 0] = a
                stack[top + 1, 1] = mid
            else:
                stack[top, 0] = a
                stack[top, 1] = mid
                stack[top + 1, 0] = mid + 1
                stack[top + 1, 1] = b
            top += 2
            continue
        for m in range(a, b + 1):
            lv, b1 = _left(x, center, P, PW, s, m)
            rv, b2 = _c2(x, center, P, PW, m, N)
            val = lv + rv
            if val < best:
                best = val
                if s == 4:
                    idx[1] = m
                    idx[2] = b2
                else:
                    idx[1] = b1
                    idx[2] = m
                    idx[3] = b2
    return idx
