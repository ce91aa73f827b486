import numpy as np
import pytest

from conftest import load_asq_reference
from ipq_index import asq
from reference import brute_force_sum, dp_sum, grid_minimax, max_cost, sum_cost

CASES = load_asq_reference()


def _tol(case):
    return max(1e-9 * case["opt_sum_var"] + 1e-12 * case["norm_sq"], 1e-7 * case["opt_sum_var"])


def _check_levels(x, lv, s):
    assert lv.ndim == 1 and 1 <= lv.size <= s
    assert np.all(np.diff(lv) > 0), "levels must be strictly increasing"
    assert lv[0] == np.min(x) and lv[-1] == np.max(x)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_reference_optimum_solve(case):
    x = np.array(case["x"])
    lv = asq.solve(x, case["s"])
    _check_levels(x, lv, case["s"])
    got = asq.cost(x, lv)
    assert abs(got - case["opt_sum_var"]) <= _tol(case), (got, case["opt_sum_var"])


def test_reference_optimum_solve_columns():
    # every case as a column of its own (ragged lengths are padded by
    # repeating the column's first value, which does not change the optimum
    # since duplicates only add weight to an existing value... except it
    # does add weight: so pad with the min value, whose variance is 0).
    cases = [c for c in CASES if c["d"] <= 10000]
    n = max(c["d"] for c in cases)
    X = np.empty((n, len(cases)))
    for j, c in enumerate(cases):
        x = np.array(c["x"])
        X[: x.size, j] = x
        X[x.size :, j] = x.min()
    levels = asq.solve_columns(X, np.array([c["s"] for c in cases]))
    for j, c in enumerate(cases):
        got = asq.cost(np.array(c["x"]), levels[j])
        assert abs(got - c["opt_sum_var"]) <= _tol(c), (c["id"], got, c["opt_sum_var"])


def test_reference_largest_case_solve_columns():
    c = next(c for c in CASES if c["d"] == 100000)
    x = np.array(c["x"])
    (lv,) = asq.solve_columns(x[:, None], c["s"])
    assert abs(asq.cost(x, lv) - c["opt_sum_var"]) <= _tol(c)


@pytest.mark.parametrize("seed", range(12))
def test_exact_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 11))
    s = int(rng.integers(2, 6))
    x = rng.standard_normal(n) * rng.uniform(0.1, 10) + rng.uniform(-5, 5)
    if seed % 3 == 0:
        x = np.round(x, 0)  # duplicates
    w = rng.uniform(0, 3, n) if seed % 2 else None
    lv = asq.solve(x, s, weights=w)
    _check_levels(x, lv, s)
    got = asq.cost(x, lv, weights=w)
    assert got == pytest.approx(sum_cost(x, lv, w), rel=1e-9, abs=1e-12)
    assert got == pytest.approx(brute_force_sum(x, s, w), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_exact_matches_quadratic_dp(seed):
    rng = np.random.default_rng(100 + seed)
    n = 150
    x = [rng.standard_normal(n), rng.lognormal(size=n), rng.exponential(size=n)][seed % 3]
    if seed >= 3:
        x = np.round(x, 1)
    w = rng.uniform(0, 2, n) if seed % 2 else None
    for s in (3, 4, 7, 12):
        got = asq.cost(x, asq.solve(x, s, weights=w), weights=w)
        ref = dp_sum(x, s, w)
        assert got == pytest.approx(ref, rel=1e-9, abs=1e-12), s


def test_solve_all_curve_matches_single_solves():
    rng = np.random.default_rng(3)
    x = rng.lognormal(size=3000)
    w = rng.uniform(0.5, 2, x.size)
    curve = asq.solve_all(x, 33, weights=w)
    assert list(curve.budgets) == list(range(2, 34))
    for b, c in zip(curve.budgets, curve.costs):
        lv = curve.levels[int(b)]
        assert lv.size <= b
        single = asq.cost(x, asq.solve(x, int(b), weights=w), weights=w)
        assert c == pytest.approx(single, rel=1e-9)
        assert asq.cost(x, lv, weights=w) == pytest.approx(c, rel=1e-9)
    assert np.all(np.diff(curve.costs) <= 1e-12 * curve.costs[0]), "cost must not increase with s"


def test_solve_all_more_budgets_than_values():
    x = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    curve = asq.solve_all(x, 6)
    assert curve.costs[-1] == 0.0 and curve.costs[2] == 0.0  # s = 4 = distinct count
    assert curve.costs[0] == pytest.approx(brute_force_sum(x, 2))
    assert curve.costs[1] == pytest.approx(brute_force_sum(x, 3))
    np.testing.assert_array_equal(curve.levels[6], [1.0, 2.0, 3.0, 5.0])


@pytest.mark.parametrize("dist", ["normal", "lognormal", "exponential", "bf16"])
def test_approx_within_bound_and_above_optimum(dist):
    rng = np.random.default_rng(7)
    n = 60000
    x = {"normal": rng.standard_normal(n), "lognormal": rng.lognormal(size=n),
         "exponential": rng.exponential(size=n),
         "bf16": (rng.standard_normal(n).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)}[dist]
    for s in (4, 8, 16, 32):
        grid = 512
        lv = asq.solve(x, s, method="approx", grid=grid)
        _check_levels(x, lv, s)
        got = asq.cost(x, lv)
        opt = asq.cost(x, asq.solve(x, s))
        half = asq.cost(x, asq.solve(x, s // 2 + 1))
        width = (x.max() - x.min()) / grid
        assert got >= opt * (1 - 1e-12)
        assert got <= half + x.size * width**2 / 4
        # with the default grid the approximation is close to optimal
        got_default = asq.cost(x, asq.solve(x, s, method="approx"))
        assert got_default <= opt * 1.01


def test_approx_is_exact_when_cells_hold_single_values():
    rng = np.random.default_rng(8)
    x = rng.integers(0, 40, 50000).astype(np.float64)
    for s in (5, 9, 17):
        assert asq.cost(x, asq.solve(x, s, method="approx")) == pytest.approx(
            asq.cost(x, asq.solve(x, s)), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_minimax_against_grid_search(seed):
    rng = np.random.default_rng(200 + seed)
    n = int(rng.integers(5, 9))
    x = rng.standard_normal(n) * 3
    w = rng.uniform(0.2, 2, n) if seed % 2 else None
    s = 3 if seed < 3 else 4
    lv = asq.solve(x, s, weights=w, objective="max")
    _check_levels(x, lv, s)
    got = asq.cost(x, lv, weights=w, objective="max")
    assert got == pytest.approx(max_cost(x, lv, w), rel=1e-12)
    points = 4000 if s == 3 else 300
    ref = grid_minimax(x, s, w, points=points)
    assert got <= ref * (1 + 1e-9)
    # the grid optimum is an upper bound within the grid resolution
    h = (x.max() - x.min()) / (points - 1)
    wmax = 1.0 if w is None else w.max()
    assert got >= ref - 2 * wmax * h * (x.max() - x.min())


def test_minimax_tolerance_and_monotonicity():
    rng = np.random.default_rng(5)
    x = rng.lognormal(size=20000)
    prev = np.inf
    for s in (2, 3, 4, 8, 16, 64):
        lv = asq.solve(x, s, objective="max")
        _check_levels(x, lv, s)
        c = asq.cost(x, lv, objective="max")
        assert c <= prev
        prev = c
        # no level set with fewer allowed levels beats it: tightening the
        # threshold by more than the tolerance must need more levels.
        if s > 2:
            assert c < asq.cost(x, asq.solve(x, s - 1, objective="max"), objective="max") * (1 + 1e-9)


def test_minimax_beats_sum_solution_on_max_and_vice_versa():
    rng = np.random.default_rng(9)
    x = rng.standard_normal(5000)
    s = 8
    lv_sum = asq.solve(x, s)
    lv_max = asq.solve(x, s, objective="max")
    assert asq.cost(x, lv_max, objective="max") <= asq.cost(x, lv_sum, objective="max")
    assert asq.cost(x, lv_sum) <= asq.cost(x, lv_max)


def test_cost_non_increasing_in_s_for_every_method():
    rng = np.random.default_rng(11)
    x = rng.exponential(size=40000)
    for kw in ({}, {"method": "approx"}, {"objective": "max"}):
        obj = kw.get("objective", "sum")
        costs = [asq.cost(x, asq.solve(x, s, **kw), objective=obj) for s in (2, 3, 4, 6, 8, 16, 32)]
        assert all(b <= a * (1 + 1e-9) for a, b in zip(costs, costs[1:])), (kw, costs)


def test_duplicates_and_small_inputs():
    x = np.array([2.0, 2.0, 2.0])
    np.testing.assert_array_equal(asq.solve(x, 4), [2.0])
    np.testing.assert_array_equal(asq.solve(x, 4, method="approx"), [2.0])
    x = np.array([1, 5, 1, 5, 3], dtype=np.int32)
    np.testing.assert_array_equal(asq.solve(x, 3), [1.0, 3.0, 5.0])
    assert asq.cost(x, asq.solve(x, 2)) == pytest.approx(4.0)  # the two 3s... one 3: (5-3)(3-1)
    # float16 / float32 inputs are accepted
    y = np.random.default_rng(0).standard_normal(1000).astype(np.float16)
    lv = asq.solve(y, 8)
    assert lv.dtype == np.float64 and lv[0] == y.min() and lv[-1] == y.max()
    # unsorted and sorted inputs give the same optimum
    z = np.random.default_rng(1).standard_normal(5000)
    assert asq.cost(z, asq.solve(z, 10)) == pytest.approx(asq.cost(z, asq.solve(np.sort(z), 10)), rel=1e-12)


def test_duplicates_collapse_equals_weights():
    rng = np.random.default_rng(4)
    vals = rng.standard_normal(300)
    reps = rng.integers(1, 5, 300)
    x = np.repeat(vals, reps)
    rng.shuffle(x)
    for s in (4, 9):
        a = asq.cost(x, asq.solve(x, s))
        b = asq.cost(vals, asq.solve(vals, s, weights=reps), weights=reps)
        assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: asq.solve([1.0, np.nan, 2.0], 4), "NaN"),
        (lambda: asq.solve([1.0, np.inf], 4), "infinite"),
        (lambda: asq.solve([], 4), "empty"),
        (lambda: asq.solve([1.0, 2.0], 1), ">= 2"),
        (lambda: asq.solve([1.0, 2.0], 2.5), "integer"),
        (lambda: asq.solve([1.0, 2.0], 3, weights=[1.0]), "entries"),
        (lambda: asq.solve([1.0, 2.0], 3, weights=[1.0, -1.0]), "non-negative"),
        (lambda: asq.solve([1.0, 2.0], 3, weights=[1.0, np.nan]), "NaN"),
        (lambda: asq.solve([1.0, 2.0], 3, objective="mean"), "objective"),
        (lambda: asq.solve([1.0, 2.0], 3, method="fast"), "method"),
        (lambda: asq.solve([1.0, 2.0], 3, objective="max", method="approx"), "approx"),
        (lambda: asq.solve(["a", "b"], 3), "real numbers"),
        (lambda: asq.cost([1.0, 3.0], [1.0, 2.0]), "cover"),
        (lambda: asq.cost([1.0, 3.0], [3.0, 1.0]), "sorted"),
        (lambda: asq.solve_columns(np.ones(5), 3), "2-D"),
        (lambda: asq.solve_columns(np.ones((5, 2)), [3, 3, 3]), "budgets"),
        (lambda: asq.solve_all([1.0, 2.0, 3.0], 4, budgets=[5]), "exceeds"),
        (lambda: asq.round_unbiased([0.0, 5.0], [1.0, 2.0]), "cover"),
    ],
)
def test_bad_input_raises(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_round_unbiased_is_unbiased():
    rng = np.random.default_rng(12)
    x = rng.lognormal(size=2000)
    lv = asq.solve(x, 6)
    trials = 400
    acc = np.zeros_like(x)
    sq = np.zeros_like(x)
    for t in range(trials):
        r = asq.round_unbiased(x, lv, np.random.default_rng(t))
        assert np.all(np.isin(r, lv))
        acc += r
        sq += (r - x) ** 2
    mean_err = acc / trials - x
    # per-value variance (b - x)(x - a) gives the standard error of the mean
    idx = np.searchsorted(lv, x, side="right") - 1
    idx = np.clip(idx, 0, lv.size - 2)
    var = (lv[idx + 1] - x) * (x - lv[idx])
    # the mean error over all values, and within every level interval, is
    # within 4 standard errors of zero (Bernoulli variances (b - x)(x - a))
    z_all = mean_err.sum() / np.sqrt(var.sum() / trials)
    assert abs(z_all) < 4, z_all
    for g in range(lv.size - 1):
        sel = idx == g
        z = mean_err[sel].sum() / np.sqrt(var[sel].sum() / trials)
        assert abs(z) < 4, (g, z)
    # a biased rounding would fail: nearest rounding's mean error is far off
    near = asq.round_nearest(x, lv) - x
    assert abs(near.sum() / np.sqrt(var.sum() / trials)) > 10
    # the empirical mean squared error matches the ASQ objective
    assert sq.sum() / trials == pytest.approx(asq.cost(x, lv), rel=0.05)


def test_round_nearest_and_codes():
    lv = np.array([-1.0, 0.0, 2.0])
    x = np.array([[-1.0, -0.4, -0.6], [0.9, 1.1, 2.0]])
    np.testing.assert_array_equal(asq.round_nearest(x, lv), [[-1, 0, -1], [0, 2, 2]])
    np.testing.assert_array_equal(asq.round_nearest(x, lv, return_codes=True), [[0, 1, 0], [1, 2, 2]])
    codes = asq.round_unbiased(x, lv, 3, return_codes=True)
    assert codes.dtype == np.uint8 and codes.shape == x.shape
    # same seed, same result
    np.testing.assert_array_equal(codes, asq.round_unbiased(x, lv, 3, return_codes=True))
    np.testing.assert_array_equal(asq.round_unbiased([5.0], lv, clip=True), [2.0])


def test_solve_columns_matches_solve_and_threads():
    rng = np.random.default_rng(13)
    X = rng.standard_normal((4000, 37)).astype(np.float32)
    X[:, 3] *= 100
    X[:, 5] = np.round(X[:, 5])
    w = rng.uniform(0.1, 1, 4000)
    budgets = rng.integers(2, 20, 37)
    for kw in ({}, {"method": "approx", "grid": 1024}, {"objective": "max"}, {"weights": w}):
        obj = kw.get("objective", "sum")
        cols1 = asq.solve_columns(X, budgets, num_threads=1, **kw)
        cols2 = asq.solve_columns(X, budgets, num_threads=2, **kw)
        for j in range(X.shape[1]):
            np.testing.assert_array_equal(cols1[j], cols2[j])
            single = asq.solve(X[:, j], int(budgets[j]), **kw)
            wj = kw.get("weights")
            assert asq.cost(X[:, j], cols1[j], weights=wj, objective=obj) == pytest.approx(
                asq.cost(X[:, j], single, weights=wj, objective=obj), rel=1e-9)


def test_minimax_unit_weight_walk_matches_scanning_walk():
    """The O(s log n) greedy walk for equal weights agrees with the O(n) scan."""
    from ipq_index._kernels import asq_minimax

    rng = np.random.default_rng(21)
    checked = 0
    for _ in range(300):
        n = int(rng.integers(3, 300))
        v = np.unique(np.round(rng.standard_normal(n) * rng.uniform(0.1, 5), int(rng.integers(1, 4))))
        if v.size < 3:
            continue
        s = int(rng.integers(2, min(12, v.size) + 1))
        tau = rng.uniform(0, 1) * np.max((v[-1] - v) * (v - v[0]))
        o1, o2 = np.empty(s + 1), np.empty(s + 1)
        c1, g1 = asq_minimax._greedy_minimax(v, np.ones(v.size), tau, s, o1)
        c2, g2 = asq_minimax._greedy_minimax_unit(v, tau, s, o2)
        assert c1 == c2
        if c1 <= s:
            np.testing.assert_allclose(o1[:c1], o2[:c2], rtol=1e-12, atol=1e-12)
        assert (np.isinf(g1) and np.isinf(g2)) or abs(g1 - g2) <= 1e-9 * (1 + abs(g1))
        checked += 1
    assert checked > 200


@pytest.mark.parametrize("seed", range(4))
def test_sweep_budgets_match_brute_force(seed):
    """s = 3, 4, 5 use one O(n) sweep (closed-form middle levels for unit
    weights, pointer walks with weights): small inputs with duplicates, zero
    weights, offsets far from 0, sorted and unsorted, n just above s."""
    rng = np.random.default_rng(300 + seed)
    for it in range(150):
        n = int(rng.integers(1, 12))
        s = int(rng.integers(2, 6))
        x = rng.standard_normal(n) * rng.uniform(0.1, 10) + rng.uniform(-1e3, 1e3) * (it % 4 == 0)
        if it % 3 == 0:
            x = np.round(x, 0)
        if it % 5 == 0:
            x = np.sort(x)
        w = rng.uniform(0, 3, n) if it % 2 else None
        if w is not None and it % 7 == 0:
            w[rng.integers(0, n, 2)] = 0.0
        lv = asq.solve(x, s, weights=w)
        _check_levels(x, lv, s)
        ref = brute_force_sum(x, s, w)
        assert sum_cost(x, lv, w) == pytest.approx(ref, rel=1e-9, abs=1e-9 * (1 + abs(ref))), (it, n, s)


@pytest.mark.parametrize("s", [3, 4, 5])
def test_sweep_matches_layered_dp(s):
    """The sweep equals the layered DP (plane table) on larger inputs."""
    from ipq_index._kernels import asq_dp as dp

    rng = np.random.default_rng(40 + s)
    for x, w in [(rng.standard_normal(3000), None), (np.round(rng.lognormal(size=3000), 2), None),
                 (rng.exponential(size=2000), rng.uniform(0, 2, 2000))]:
        lv = asq.solve(x, s, weights=w)
        v, wv = asq._sorted_distinct(x, asq._weights(w, x.size), False)
        v, wv = v.copy(), (wv.copy() if wv.size else np.ones(v.size))
        n = v.size
        T = np.empty((n, dp.PLANE_COLS))
        dp.fill_plane_points(v, wv, dp.weighted_mean(v, wv), T)
        got = asq.cost(x, lv, weights=w)
        ref = asq.cost(x, v[dp.backtrack(*_layers_arg(dp, T, n, s), s, s, n)], weights=w)
        assert got == pytest.approx(ref, rel=1e-10)


def _layers_arg(dp, T, n, s):
    arg = np.empty((max(s - 3, 0), n), np.int32)
    _c, arg_last = dp.dp_layers(T, n, s, np.empty(n), arg, np.empty(n, np.int32), np.empty(n, np.int32), 0.0)
    return arg, arg_last


def test_approx_unit_weight_histogram_matches_weighted_path():
    """Unweighted approx uses a lighter histogram (count + sum, S2 terms
    telescoped, single-value cells tracked until two values differ); it
    must choose levels as good as the general weighted histogram."""
    rng = np.random.default_rng(17)
    ints = rng.integers(0, 50, 30000).astype(np.float64)
    late_mix = np.concatenate([ints, [10.5]])  # one cell gets a 2nd value at the very end
    for x in (rng.standard_normal(40000), rng.lognormal(size=40000), ints, late_mix):
        for s in (3, 5, 9, 17, 33):
            a = asq.solve(x, s, method="approx", grid=1024)
            b = asq.solve(x, s, method="approx", grid=1024, weights=np.ones(x.size))
            _check_levels(x, a, s)
            assert asq.cost(x, a) == pytest.approx(asq.cost(x, b), rel=1e-9, abs=1e-12), s
    # late_mix is not single-valued per cell: levels are grid edges, not all values
    lv = asq.solve(late_mix, 60, method="approx", grid=1024)
    assert lv.size <= 60 and asq.cost(late_mix, lv) >= asq.cost(late_mix, asq.solve(late_mix, 60)) * (1 - 1e-12)


def test_minimax_unweighted_with_repeats_matches_collapsed_path():
    """Unweighted max objective walks the sorted input with repeats (no
    collapsed copy); explicit unit weights take the collapsed path."""
    rng = np.random.default_rng(23)
    for x in (np.round(rng.standard_normal(20000), 1), rng.integers(0, 300, 5000).astype(np.float64),
              np.round(rng.lognormal(size=8000), 2), rng.standard_normal(3000)):
        for s in (2, 3, 5, 8, 17, 40):
            a = asq.solve(x, s, objective="max")
            b = asq.solve(x, s, objective="max", weights=np.ones(x.size))
            _check_levels(x, a, s)
            ca = asq.cost(x, a, objective="max")
            cb = asq.cost(x, b, objective="max")
            assert ca == pytest.approx(cb, rel=3e-6, abs=1e-12), (s, ca, cb)
