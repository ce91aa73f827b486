"""Property tests of the ASQ solvers (hypothesis): on small inputs with
duplicates and magnitudes from 1e-300 to 1e300, ``asq.solve`` reaches the
brute-force optimum, its levels have the promised shape, scaling the input
by a power of two scales the levels exactly, and ``asq.cost`` equals a
direct evaluation."""

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from ipq_index import asq

import reference

SETTINGS = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: values: a few distinct numbers in [-1, 1] (so duplicates are common), then scaled
_base = st.lists(st.sampled_from([-1.0, -0.75, -0.3, -0.1, 0.0, 0.05, 0.2, 0.5, 0.9, 1.0])
                 | st.floats(-1, 1, allow_nan=False, width=32), min_size=1, max_size=9)


def _scaled(values, exp):
    return np.asarray(values, np.float64) * np.ldexp(1.0, exp)


@SETTINGS
@given(values=_base, s=st.integers(2, 5), exp=st.sampled_from([-60, 0, 60, 300]),
       weighted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_exact_solve_reaches_the_brute_force_optimum(values, s, exp, weighted, seed):
    x = _scaled(values, exp)
    w = np.random.default_rng(seed).uniform(0.1, 2.0, x.size) if weighted else None
    lv = asq.solve(x, s, weights=w)
    best = reference.brute_force_sum(x, s, w)
    got = asq.cost(x, lv, weights=w)
    scale = np.ldexp(1.0, 2 * exp)
    assert got <= best + 1e-9 * scale * max(1.0, x.size)
    assert got >= best - 1e-9 * scale * max(1.0, x.size)  # the optimum cannot be beaten
    _check_shape(x, lv, s)


@SETTINGS
@given(values=_base, s=st.integers(2, 6), exp=st.sampled_from([-1000, -500, -200, 0, 200, 500, 1000]),
       method=st.sampled_from(["exact", "approx"]), objective=st.sampled_from(["sum", "max"]))
@example(values=[-1.0, -0.75, -0.3, -0.1], s=3, exp=-1000, method="exact", objective="max")  # tau underflows
def test_levels_scale_with_the_input_at_any_magnitude(values, s, exp, method, objective):
    """Scaling x by 2^exp (|x| from ~1e-301 to ~1e301) scales the levels by
    2^exp: no overflow or underflow of the costs changes the answer."""
    if objective == "max" and method == "approx":
        return
    x = np.asarray(values, np.float64)
    assume((np.ldexp(_scaled(values, exp), -exp) == x).all())  # the scaled input itself lost no bits
    lv = asq.solve(x, s, method=method, objective=objective)
    lv_scaled = asq.solve(_scaled(values, exp), s, method=method, objective=objective)
    np.testing.assert_allclose(lv_scaled, np.ldexp(lv, exp), rtol=1e-9, atol=0)
    _check_shape(_scaled(values, exp), lv_scaled, s)


@SETTINGS
@given(values=_base, s=st.integers(2, 4))
@example(values=[-1.0, -0.3, 0.9], s=2)  # the walk at the two-level bound rounds short
@example(values=[-1.0, -0.75, 0.2], s=2)
def test_minimax_solve_beats_a_grid_search(values, s):
    x = np.asarray(values, np.float64)
    lv = asq.solve(x, s, objective="max")
    got = asq.cost(x, lv, objective="max")
    if np.unique(x).size > s:
        assert got <= reference.grid_minimax(x, s, points=40) * (1 + 1e-6) + 1e-12
    _check_shape(x, lv, s)


@SETTINGS
@given(values=_base, levels=st.lists(st.floats(-1, 1, allow_nan=False), min_size=0, max_size=4),
       objective=st.sampled_from(["sum", "max"]), weighted=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_cost_equals_a_direct_evaluation(values, levels, objective, weighted, seed):
    x = np.asarray(values, np.float64)
    lv = np.unique(np.concatenate([[x.min(), x.max()], np.clip(levels, x.min(), x.max())]))
    w = np.random.default_rng(seed).uniform(0.0, 3.0, x.size) if weighted else None
    want = (reference.sum_cost if objective == "sum" else reference.max_cost)(x, lv, w)
    assert asq.cost(x, lv, weights=w, objective=objective) == pytest.approx(want, rel=1e-9, abs=1e-12)


def test_solve_columns_refuses_an_empty_block():
    with pytest.raises(ValueError, match="block"):
        asq.solve_columns(np.ones((10, 3)), 4, block=0)


def _check_shape(x, lv, s):
    """Sorted, within [min, max], from min(x) to max(x), at most s levels;
    the distinct values themselves when there are at most s."""
    u = np.unique(x)
    assert np.all(np.diff(lv) > 0) and 1 <= lv.size <= s
    assert lv[0] == u[0] and lv[-1] == u[-1]
    if u.size <= s:
        np.testing.assert_array_equal(lv, u)
