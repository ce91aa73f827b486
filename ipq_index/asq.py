"""Adaptive Stochastic Quantization (ASQ) solvers.

Given values ``x`` (any shape, flattened), optional non-negative weights and a
budget of ``s`` levels, find a sorted level set ``q_1 < ... < q_k`` (``k <= s``)
that contains ``min(x)`` and ``max(x)`` and minimises, with ``a_i <= x_i <= b_i``
the neighbouring levels of ``x_i``,

* ``objective="sum"`` (weighted ASQ): ``sum_i w_i (b_i - x_i)(x_i - a_i)``, the
  expected squared error of unbiased stochastic rounding;
* ``objective="max"`` (minimax / worst case): ``max_i w_i (b_i - x_i)(x_i - a_i)``.

Methods
-------
``method="exact"`` (sum): the optimum.  Input is sorted (skipped when already
sorted).  Budgets s <= 5 need no DP: one pass builds prefix sums of the
sorted input (duplicates need no collapsing: a copy of a level costs 0),
the best middle level between two fixed levels is a closed form (one
division; a bisection with weights), s = 3 is one such evaluation and s = 4,
5 minimise F(m) = left(m) + right(m) over the shared level m, where left is
non-decreasing and right non-increasing in m: a branch and bound over ranges
of m evaluates only a few percent of them.  Larger budgets collapse equal
values into weights and search a price per level (Lagrangian relaxation):
each price is one O(n) online pass of a queue of candidate rows over a
Monge matrix (take-over columns searched around the last take-over
distance), a price taken from a small sub-instance (a few thousand rank- and
value-spaced candidates, solved with cheap passes) nearly always gives
exactly s levels in one full pass, and a solution with exactly s levels is
provably optimal; when ties prevent hitting s exactly the layered DP runs.

``method="approx"`` (sum): no sort.  One pass builds a histogram over a uniform
grid of ``grid`` cells (default :func:`default_grid`, growing with n and s), the same DP runs over
the grid edges, and the levels are grid edges plus ``min(x)`` and ``max(x)``:
O(n + s m).  Its cost is the exact cost of the returned levels and obeys

    OPT(s) <= cost <= OPT(floor(s / 2) + 1) + W_cells * width**2 / 4

where ``width = (max - min) / grid`` and ``W_cells`` is the total weight of the
points in the (at most ``s - 2``) cells that contain an interior level of the
``floor(s/2)+1``-level optimum (at most the total weight).  Each such level is
replaced by the two grid edges around it (QUIVER's Lemma 6.1).  When every
non-empty cell holds one distinct value the grid problem is exact.

``objective="max"``: greedy feasibility walks (each next level placed as far
right as a threshold allows) inside a safeguarded false-position search on
the threshold; levels may lie between input values.  With equal weights a
walk costs O(s log n) (the binding point of a gap starting at a is next to
a + sqrt(threshold)), otherwise O(n).  The returned cost is
within ``tol`` (relative, default 1e-6) of the optimum.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from ._kernels import asq_columns as _columns
from ._kernels import asq_dp as _dp
from ._kernels import asq_grid as _approx
from ._kernels import asq_minimax as _minimax
from ._kernels import asq_sweep as _sweep
from ._kernels import rounding as _rk
from ._numba import concat_rows, map_chunks

__all__ = [
    "solve",
    "solve_all",
    "solve_columns",
    "cost",
    "round_unbiased",
    "round_nearest",
    "default_grid",
    "release_workspace",
    "CostCurve",
]

OBJECTIVES = ("sum", "max")
#: scratch buffers larger than this (bytes) are not kept between calls
WORKSPACE_KEEP_BYTES = 256 << 20
METHODS = ("exact", "approx")
MINIMAX_TOL = 1e-6


class CostCurve(NamedTuple):
    """Optimal cost for every budget ``2..s_max`` and levels for chosen budgets."""

    budgets: np.ndarray  #: int64, 2..s_max
    costs: np.ndarray  #: float64, cost with at most ``budgets[i]`` levels
    levels: dict  #: {budget: sorted float64 levels}


def default_grid(n: int, s: int = 16) -> int:
    """Default number of grid cells for ``method="approx"`` on ``n`` values
    with budget ``s``: ``clip(max(8 sqrt(n), 256 s), 4096, 65536)``.

    The additive loss bound shrinks as 1/grid^2; the DP costs O(grid) per
    Lagrangian pass (s > 5) or per layer (s <= 5), and the histogram holds
    grid cells of 24 bytes (40 with weights).
    """
    return int(min(65536, max(4096, 8 * np.sqrt(max(n, 1)), 256 * s)))


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _values(x, name="x") -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one value")
    if not np.isfinite(arr).all():
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} contains {bad} NaN or infinite value(s)")
    return arr


def _weights(weights, n: int) -> np.ndarray:
    if weights is None:
        return np.empty(0, np.float64)
    w = np.asarray(weights)
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"weights must hold real numbers, got dtype {w.dtype}")
    w = np.ascontiguousarray(w, dtype=np.float64).reshape(-1)
    if w.size != n:
        raise ValueError(f"weights has {w.size} entries but x has {n}")
    if not np.isfinite(w).all():
        raise ValueError("weights contain NaN or infinite values")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    return w


def _budget(s, name="s") -> int:
    if isinstance(s, (bool, np.bool_)) or not isinstance(s, (int, np.integer)):
        raise ValueError(f"{name} must be an integer number of levels, got {s!r}")
    if s < 2:
        raise ValueError(f"{name} must be >= 2 (min and max are always levels), got {s}")
    return int(s)


def _choice(value, allowed, name):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _grid(grid, n, s):
    if grid is None:
        return default_grid(n, s)
    if isinstance(grid, (bool, np.bool_)) or not isinstance(grid, (int, np.integer)) or grid < 2:
        raise ValueError(f"grid must be an integer >= 2, got {grid!r}")
    return int(grid)


class _Workspace(threading.local):
    """Per-thread scratch arrays reused across calls.

    Fresh large arrays cost a page fault per 4 KiB on first touch, which on
    virtualised machines rivals the solve itself; buffers up to
    ``WORKSPACE_KEEP_BYTES`` are kept and reused (views, never returned).
    """

    def __init__(self):
        self.bufs = {}

    def get(self, name, shape, dtype):
        size = int(np.prod(shape))
        buf = self.bufs.get(name)
        if buf is None or buf.size < size or buf.dtype != np.dtype(dtype):
            buf = np.empty(max(size, 1), dtype)
            if buf.nbytes <= WORKSPACE_KEEP_BYTES:
                self.bufs[name] = buf
        return buf[:size].reshape(shape)


_ws = _Workspace()


def release_workspace() -> None:
    """Free the scratch buffers kept by the solvers of the calling thread."""
    _ws.bufs.clear()


def _sorted_distinct(x, w, use_max):
    """Sorted distinct values with collapsed weights (sum, or max): workspace
    views.  For the sum objective, sorted distinct unweighted input is
    returned as is with empty (unit) weights."""
    if w.size == 0 and not use_max:
        srt, distinct = _dp.sorted_count(x)
        if not srt:
            x = np.sort(x)
            srt, distinct = _dp.sorted_count(x)
        if distinct == x.size:
            return x, w  # sorted distinct values, unit weights (w empty)
    vals = _ws.get("vals", x.size, np.float64)
    wts = _ws.get("wts", x.size, np.float64)
    if w.size == 0:
        xs = x if _dp.is_sorted(x) else np.sort(x)
        u = _dp.collapse_sorted(xs, w, use_max, vals, wts)
    elif _dp.is_sorted(x):
        u = _dp.collapse_sorted(x, w, use_max, vals, wts)
    else:
        order = np.argsort(x, kind="stable")
        u = _dp.collapse_sorted(x[order], w[order], use_max, vals, wts)
    return vals[:u], wts[:u]


def _exact_scratch(n, s):
    return (
        _ws.get("T", (n, _dp.PLANE_COLS), np.float64),
        _ws.get("D", n, np.float64),
        _ws.get("arg", (max(s - 3, 0), n), np.int32),
        _ws.get("q", n, np.int32),
        _ws.get("qs", n, np.int32),
    )


#: exact budgets up to this are solved by one sweep over the sorted input
SWEEP_MAX_S = 5


def _sweep_exact_sum(x, w, s):
    """Exact levels for s <= SWEEP_MAX_S: one prefix pass and one O(n) sweep
    over sorted x (duplicates are not collapsed: a copy of a level costs 0)."""
    n = x.size
    P = _ws.get("P", n, np.float64)
    PW = _ws.get("PW", n if w.size else 0, np.float64)
    Q = _ws.get("Q", n // _sweep.Q_STEP + 1, np.float64)
    center = x[n // 2]
    srt, distinct = _sweep.prefix_scan(x, w, center, P, PW, Q)
    if not srt:
        if w.size:
            order = np.argsort(x, kind="stable")
            x, w = x[order], w[order]
        else:
            x = np.sort(x)
        center = x[n // 2]
        _srt, distinct = _sweep.prefix_scan(x, w, center, P, PW, Q)
    if distinct <= s:
        return np.unique(x)
    if s == 2:
        return np.array([x[0], x[-1]])
    return np.unique(x[_sweep.small_sum_levels(x, w, s, center, P, PW, Q)])


def _exact_sum(v, wv, s, filled=False, span=0.0):
    """Optimal levels of sorted distinct v (n > s); layered scratch only if
    needed.  ``filled``: the workspace plane table already holds v's (with
    ``span``)."""
    n = v.size
    cnt = _ws.get("cnt", n, np.int32)
    arg1 = _ws.get("arg1", n, np.int32)
    T = _ws.get("T", (n, _dp.PLANE_COLS), np.float64)
    D = _ws.get("D", n, np.float64)
    q = _ws.get("q", n, np.int32)
    qs = _ws.get("qs", n, np.int32)
    if s > _dp.LAYERED_MAX_S:
        lv = _dp.exact_sum_levels(v, wv, s, T, D, np.empty((0, n), np.int32), q, qs, cnt, arg1, filled, span)
        if lv.size:
            return lv
    arg = _ws.get("arg", (max(s - 3, 0), n), np.int32)
    return _dp.exact_sum_levels(v, wv, s, T, D, arg, q, qs, cnt[:0], arg1[:0], filled, span)


# ---------------------------------------------------------------------------
# public solvers
# ---------------------------------------------------------------------------


def _far_exponent(m) -> int:
    """The binary exponent of ``m`` > 0 when it lies outside 2^-100..2^100, else 0."""
    e = int(np.frexp(m)[1]) if m > 0 else 0
    return e if abs(e) > 100 else 0


def solve(x, s, *, weights=None, objective="sum", method="exact", grid=None, tol=MINIMAX_TOL):
    """Levels minimising the (weighted) ASQ objective with at most ``s`` levels.

    Parameters
    ----------
    x : array_like of real numbers (any shape; flattened), finite, non-empty.
    s : int >= 2, the level budget.
    weights : optional non-negative array, one weight per value.
    objective : ``"sum"`` (expected squared error) or ``"max"`` (worst case).
    method : ``"exact"`` or ``"approx"`` (``"approx"`` only for ``"sum"``).
    grid : number of grid cells for ``"approx"`` (default :func:`default_grid`).
    tol : relative tolerance on the optimal threshold for ``objective="max"``.

    Returns
    -------
    levels : sorted float64 array, ``2 <= len <= s`` (1 if x is constant),
        starting with ``min(x)`` and ending with ``max(x)``.  When ``s`` is at
        least the number of distinct values, the distinct values (cost 0).
    """
    x = _values(x)
    s = _budget(s)
    w = _weights(weights, x.size)
    _choice(objective, OBJECTIVES, "objective")
    _choice(method, METHODS, "method")
    e = _far_exponent(max(-x.min(), x.max()))
    if e or (w.size and _far_exponent(w.max())):
        # the costs are products of up to three values (or a weight and two):
        # they under- or overflow far from 1, so solve at magnitude ~1 (a
        # power-of-two scaling is exact; levels scale back, weights do not matter)
        w = np.ldexp(w, -int(np.frexp(w.max())[1])) if w.size else None
        return np.ldexp(solve(np.ldexp(x, -e), s, weights=w, objective=objective, method=method,
                              grid=grid, tol=tol), e)
    if objective == "max" and method == "approx":
        raise ValueError('method="approx" is only available for objective="sum"')
    if method == "approx":
        m = _grid(grid, x.size, s)
        if x.size > m:
            return _approx.approx_sum_levels(x, w if w.size else None, s, m)
    if objective == "sum" and s <= SWEEP_MAX_S:
        return _sweep_exact_sum(x, w, s)
    if objective == "max" and w.size == 0:
        # equal weights: the walks need no collapsed copy (repeats are fine)
        if not (0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        srt, distinct = _dp.sorted_count(x)
        if not srt:
            x = np.sort(x)
            srt, distinct = _dp.sorted_count(x)
        if distinct <= s:
            return np.unique(x)
        return _minimax.minimax_levels(x, w, s, float(tol))
    if objective == "sum" and w.size == 0 and x.size > 4 * (s + 1):
        # sorted distinct input (the common case for continuous data): the
        # plane table is filled while checking, no separate pass
        T = _ws.get("T", (x.size, _dp.PLANE_COLS), np.float64)
        span = _dp.fill_plane_increasing(x, x[x.size // 2], T)
        if span == span:  # not NaN: x was strictly increasing
            return _exact_sum(x, w, s, filled=True, span=span)
    v, wv = _sorted_distinct(x, w, objective == "max")
    if v.size <= s:
        return v.copy()
    if objective == "max":
        if not (0 < tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {tol!r}")
        return _minimax.minimax_levels(v, wv, s, float(tol))
    return _exact_sum(v, wv, s)


def solve_all(x, s_max, *, weights=None, objective="sum", method="exact", grid=None,
              budgets=None, tol=MINIMAX_TOL) -> CostCurve:
    """Optimal cost for every budget ``2..s_max`` from one run, and levels.

    For ``objective="sum"`` one layered DP with ``s_max`` levels yields the
    whole curve (layer t's last column is the t-level optimum) at the cost
    of a single ``s_max`` solve.  ``budgets`` lists the budgets whose levels
    are returned (default: all).  For ``objective="max"`` each budget is a
    separate threshold search.
    """
    x = _values(x)
    s_max = _budget(s_max, "s_max")
    w = _weights(weights, x.size)
    _choice(objective, OBJECTIVES, "objective")
    _choice(method, METHODS, "method")
    if objective == "max" and method == "approx":
        raise ValueError('method="approx" is only available for objective="sum"')
    all_budgets = np.arange(2, s_max + 1, dtype=np.int64)
    wanted = all_budgets if budgets is None else [_budget(b, "budgets entry") for b in budgets]
    for b in wanted:
        if b > s_max:
            raise ValueError(f"budget {b} exceeds s_max={s_max}")
    costs = np.zeros(all_budgets.size)
    levels = {}
    if objective == "max":
        for i, b in enumerate(all_budgets):
            lv = solve(x, int(b), weights=weights, objective="max", tol=tol)
            costs[i] = cost(x, lv, weights=weights, objective="max")
            if int(b) in set(int(q) for q in wanted):
                levels[int(b)] = lv
        return CostCurve(all_budgets, costs, levels)

    if method == "approx" and x.size > _grid(grid, x.size, s_max):
        lo, hi, center = _approx.moments(x, w)
        if hi == lo:
            return CostCurve(all_budgets, costs, {int(b): np.array([lo]) for b in wanted})
        P, pos, _exact = _approx.grid_table(x, w, lo, hi, center, _grid(grid, x.size, s_max))
        n = P.shape[0]
        T, D, arg, q, qs = _exact_scratch(n, s_max)
        span = _dp.fill_plane_prefix(P, T)
    else:
        v, wv = _sorted_distinct(x, w, False)
        pos = v.copy()
        n = pos.size
        T, D, arg, q, qs = _exact_scratch(n, s_max)
        span = _dp.fill_plane_points(v, wv, v[n // 2], T)
    top = min(s_max, n - 1)  # budgets >= n use every candidate
    if top >= 2:
        dp_costs, arg_last = _dp.dp_layers(T, n, top, D, arg, q, qs, span)
    every = cost(x, pos, weights=weights) if n > 1 else 0.0  # 0 unless grid cells are coarse
    for i, b in enumerate(all_budgets):
        costs[i] = max(dp_costs[b], 0.0) if b <= top else every
    for b in wanted:
        b = int(b)
        levels[b] = pos[_dp.backtrack(arg, arg_last, top, b, n)] if b <= top else pos.copy()
    return CostCurve(all_budgets, costs, levels)


def solve_columns(X, s, *, weights=None, objective="sum", method="exact", grid=None,
                  tol=MINIMAX_TOL, num_threads=-1, block=16):
    """One solve per column of an (N, d) matrix, columns split across ``num_threads`` threads.

    ``s`` is one budget for every column or an array of d budgets;
    ``weights`` (optional, length N) weighs the rows (shared by every
    column).  Returns a list of d sorted level arrays.
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"X must be a 2-D (N, d) matrix, got shape {X.shape}")
    if X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"X is empty: shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"X must hold real numbers, got dtype {X.dtype}")
    if not np.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    X = np.ascontiguousarray(X)
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64)
    N, d = X.shape
    if np.ndim(s) == 0:
        budgets = np.full(d, _budget(s), np.int64)
    else:
        budgets = np.asarray(s)
        if budgets.shape != (d,):
            raise ValueError(f"s must be an int or an array of {d} budgets, got shape {budgets.shape}")
        budgets = np.array([_budget(b, "s entry") for b in budgets], np.int64)
    w = _weights(weights, N)
    _choice(objective, OBJECTIVES, "objective")
    _choice(method, METHODS, "method")
    if objective == "max" and method == "approx":
        raise ValueError('method="approx" is only available for objective="sum"')
    if not (0 < tol < 1):
        raise ValueError(f"tol must be in (0, 1), got {tol!r}")
    m = _grid(grid, N, int(budgets.max()))
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    block = int(block)
    if method == "approx" and N > m:
        def call(j0, j1, _part):
            return _columns.solve_columns_approx(X, w if w.size else None, budgets, m, block, j0, j1)
    else:
        def call(j0, j1, _part):
            return _columns.solve_columns_exact(X, w, budgets, objective == "max", float(tol), block, j0, j1)
    levels, counts = concat_rows(map_chunks(call, d, num_threads, min_chunk=block))
    return [levels[j, : counts[j]].copy() for j in range(d)]


def cost(x, levels, *, weights=None, objective="sum") -> float:
    """Objective value of ``levels`` on ``x`` (sum or max of w (b - x)(x - a))."""
    x = _values(x)
    w = _weights(weights, x.size)
    _choice(objective, OBJECTIVES, "objective")
    lv = _check_levels(levels, x)
    return float(_rk.rounding_cost(x, w, lv, objective == "max"))


def _check_levels(levels, x=None) -> np.ndarray:
    lv = _values(levels, "levels")
    if lv.size > 1 and np.any(np.diff(lv) < 0):
        raise ValueError("levels must be sorted ascending")
    if x is not None and (x.min() < lv[0] or x.max() > lv[-1]):
        raise ValueError(
            f"levels [{lv[0]!r}, {lv[-1]!r}] do not cover the values "
            f"[{x.min()!r}, {x.max()!r}]: unbiased rounding is impossible outside them"
        )
    return lv


def _rounding_input(x, levels, clip):
    arr = np.asarray(x)
    xf = _values(arr)
    lv = _check_levels(levels, None if clip else xf)
    dtype = np.uint8 if lv.size <= 256 else (np.uint16 if lv.size <= 65536 else np.int64)
    return arr.shape, xf, lv, dtype


def round_unbiased(x, levels, rng=None, *, return_codes=False, clip=False):
    """Stochastic rounding of ``x`` to ``levels``: E[result] = x.

    Each value between adjacent levels a <= x <= b goes to b with probability
    (x - a)/(b - a), else to a.  ``rng`` is a ``numpy.random.Generator`` or a
    seed (default seed 0, so results reproduce).  Values outside the level
    range raise ``ValueError`` unless ``clip=True`` (then they are clipped,
    which is biased).  Returns the rounded values (shape of ``x``) or, with
    ``return_codes=True``, the level indices.
    """
    shape, xf, lv, dtype = _rounding_input(x, levels, clip)
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
    u = gen.random(xf.size)
    codes = np.empty(xf.size, dtype)
    _rk.round_codes(xf, lv, u, codes)
    codes = codes.reshape(shape)
    return codes if return_codes else lv[codes]


def round_nearest(x, levels, *, return_codes=False, clip=False):
    """Nearest rounding of ``x`` to ``levels`` (biased, lower squared error)."""
    shape, xf, lv, dtype = _rounding_input(x, levels, clip)
    codes = np.empty(xf.size, dtype)
    _rk.round_codes(xf, lv, np.zeros(0), codes)
    codes = codes.reshape(shape)
    return codes if return_codes else lv[codes]
