"""ASQ kernels: budgets s = 3, 4, 5 of the sum objective in one sweep over
sorted input (no plane table, no DP)."""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .asq_dp import INF

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
