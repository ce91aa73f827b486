"""Rounding kernels: unbiased (stochastic) and nearest, to a sorted level set."""

from __future__ import annotations

import numpy as np

from .._numba import kernel, parallel_kernel
from numba import prange


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


@parallel_kernel
def round_unbiased_codes(x, levels, u, codes):
    """codes[i] = index of the level x[i] is rounded to, up with probability
    (x - a) / (b - a) given uniforms u in [0, 1).  Values outside the level
    range are clipped (biased) to the end levels."""
    L = levels.shape[0]
    for i in prange(x.shape[0]):
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
        if u[i] * (b - a) < xi - a:
            codes[i] = lo + 1
        else:
            codes[i] = lo


@parallel_kernel
def round_nearest_codes(x, levels, codes):
    """codes[i] = index of the level nearest to x[i] (ties go down)."""
    L = levels.shape[0]
    for i in prange(x.shape[0]):
        xi = x[i]
        if L == 1 or xi <= levels[0]:
            codes[i] = 0
            continue
        if xi >= levels[L - 1]:
            codes[i] = L - 1
            continue
        lo = _bracket(levels, xi)
        if levels[lo + 1] - xi < xi - levels[lo]:
            codes[i] = lo + 1
        else:
            codes[i] = lo


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
def rounding_error(x, w, levels, objective_max, nearest):
    """Sum (or max) over x of w times the squared error of nearest rounding
    (``nearest``) or the variance (b - x)(x - a) of unbiased rounding."""
    if not nearest:
        return rounding_cost(x, w, levels, objective_max)
    total = 0.0
    worst = 0.0
    L = levels.shape[0]
    has_w = w.shape[0] > 0
    for i in range(x.shape[0]):
        xi = x[i]
        if L == 1:
            e = xi - levels[0]
            v = e * e
        else:
            lo = _bracket(levels, xi)
            e = min(abs(levels[lo + 1] - xi), abs(xi - levels[lo]))
            v = e * e
        if has_w:
            v *= w[i]
        total += v
        if v > worst:
            worst = v
    return worst if objective_max else total
