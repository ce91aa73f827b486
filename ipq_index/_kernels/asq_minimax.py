"""ASQ kernels: the minimax (worst-case) objective, solved by greedy walks
under a threshold located by a safeguarded false-position search."""

from __future__ import annotations

import numpy as np

from .._numba import kernel
from .asq_dp import INF


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
        count, slack, done = _close_gap(B, last, count, s, out)
        if done:
            return count, slack
        a = B


@kernel
def _close_gap(B, last, count, s, out):
    """End the current gap at bound B: the maximum ``last`` is the final
    level when B reaches it; otherwise B becomes level ``count`` unless that
    leaves no level for the maximum.  Returns ``(count, slack, done)``, with
    the walk's return values when ``done``."""
    if B >= last:
        out[count] = last
        return count + 1, 0.0, True
    if count + 1 >= s:
        # the s-th level must sit at the maximum but the bound is short
        return s + 1, B - last, True
    out[count] = B
    return count + 1, 0.0, False


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
        count, slack, done = _close_gap(B, last, count, s, out)
        if done:
            return count, slack
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
    # the two end levels meet tau_hi by construction; the walk at tau_hi can
    # still come out a hair short in floating point, so it only replaces them
    # when it reports itself feasible
    best[0] = lo_v
    best[1] = hi_v
    nbest = 2
    cnt, g = _greedy(v, w, tau_hi, s, out, unit, wmin)
    if cnt <= s and g >= 0.0:
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
