"""Slow, independent reference implementations (numpy / itertools only).

They share no code with ipq_index and serve as oracles in the tests.
"""

from __future__ import annotations

import itertools

import numpy as np


def sum_cost(x, levels, w=None):
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    lv = np.asarray(levels, np.float64)
    total = 0.0
    for xi, wi in zip(x, w):
        b = lv[lv >= xi].min()
        a = lv[lv <= xi].max()
        total += wi * (b - xi) * (xi - a)
    return total


def max_cost(x, levels, w=None):
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    lv = np.sort(np.asarray(levels, np.float64))
    idx = np.clip(np.searchsorted(lv, x, side="right") - 1, 0, len(lv) - 1)
    a = lv[idx]
    b = lv[np.minimum(idx + 1, len(lv) - 1)]
    return float(np.max(w * (b - x) * (x - a)))


def brute_force_sum(x, s, w=None):
    """Exhaustive search over level subsets of the distinct values."""
    u = np.unique(np.asarray(x, np.float64))
    if len(u) <= s:
        return 0.0
    inner = u[1:-1]
    best = np.inf
    for r in range(0, s - 1):
        for comb in itertools.combinations(inner, r):
            lv = np.concatenate(([u[0]], comb, [u[-1]]))
            best = min(best, sum_cost(x, lv, w))
    return best


def dp_sum(x, s, w=None):
    """Plain O(s n^2) dynamic program over the sorted distinct values."""
    x = np.asarray(x, np.float64)
    w = np.ones_like(x) if w is None else np.asarray(w, np.float64)
    u, inv = np.unique(x, return_inverse=True)
    wu = np.bincount(inv, weights=w, minlength=len(u))
    n = len(u)
    if n <= s:
        return 0.0
    # C[k, j]: cost of points strictly between u_k and u_j (direct sums)
    C = np.full((n, n), np.inf)
    for k in range(n):
        for j in range(k + 1, n):
            mid = slice(k + 1, j)
            C[k, j] = float(np.sum(wu[mid] * (u[j] - u[mid]) * (u[mid] - u[k])))
    D = C[0].copy()  # two levels: 0 and j
    for _ in range(3, s + 1):
        D = np.minimum(D, np.min(D[:, None] + C, axis=0))
    return float(D[n - 1])


def grid_minimax(x, s, w=None, points=400):
    """Minimax cost by exhaustive search of s-2 interior levels on a fine grid.

    Returns an upper bound on the optimum that converges as the grid refines.
    """
    x = np.asarray(x, np.float64)
    lo, hi = x.min(), x.max()
    grid = np.linspace(lo, hi, points)
    best = np.inf
    for comb in itertools.combinations(grid[1:-1], s - 2):
        best = min(best, max_cost(x, np.concatenate(([lo], comb, [hi])), w))
    return best
