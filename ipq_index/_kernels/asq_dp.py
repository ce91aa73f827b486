"""ASQ kernels: the exact solver of the sum objective (plane table, layered
DP, Lagrangian search).

The ASQ kernels work on contiguous float64 arrays and scalars only; the
validated public API lives in :mod:`ipq_index.asq`.  The grid solver
(``asq_grid``), the minimax objective (``asq_minimax``), the sweep for
s = 3, 4, 5 (``asq_sweep``) and the per-column solves (``asq_columns``)
are in their own modules.

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

    One function on purpose: it is the inner step of every DP pass, and the
    pop loop, the gallop and the bisection share the comparison (da, db, dg)
    and the bounds; split into calls, those would be passed back and forth
    on the critical path.
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
def _queue_front(q, qs, h, tl, j):
    """Move the queue's front h past the rows whose columns end before j;
    returns ``(h, row)``, row the best one for column j."""
    while tl > h and qs[h + 1] <= j:
        h += 1
    return h, q[h]


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
        h, kb = _queue_front(q, qs, h, tl, j)
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
        h, kb = _queue_front(q, qs, h, tl, j)
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
# the Lagrangian search's starting price; the exact solve of one sorted array
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
