"""The SIMD candidate ADC (``ipq_index/_kernels/cand_adc.py``) against float64
numpy references computed from the field layout, and inside the searches."""

import numpy as np
import pytest

import ipq_index
from ipq_index.bench import datasets
from ipq_index._kernels import cand_adc as ca
from ipq_index.encoder import pack_fields

needs_simd = pytest.mark.skipif(not ca.CAND_SIMD, reason="the SIMD candidate ADC needs AVX-512 VBMI (this CPU lacks it)")


def _random_code_set(rng, bits):
    """Codes, levels and layout of dimensions with the given bit widths:
    (codes (n, nbytes) uint8, levels float32, level_off, field table)."""
    bits = np.asarray(bits)
    byte_of, shift_of, nbytes = pack_fields(bits)
    counts = (1 << bits).astype(np.int64)
    level_off = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    levels = np.concatenate([np.sort(rng.standard_normal(c)) + rng.standard_normal() for c in counts]).astype(np.float32)
    js = np.arange(bits.size)
    table = np.stack([js, byte_of, shift_of, counts - 1, level_off[:-1]], axis=1).astype(np.int64)
    codes = rng.integers(0, 256, (700, nbytes), dtype=np.uint8)
    return codes, levels, level_off, table


def _float_adc(codes, rows, levels, table, y):
    """float64 sum over fields of y_j * level[(byte >> shift) & mask]."""
    c = (codes[rows][:, table[:, 1]].astype(np.int64) >> table[:, 2]) & table[:, 3]
    return (levels.astype(np.float64)[table[:, 4] + c] * y.astype(np.float64)[table[:, 0]]).sum(axis=1)


# widths 1-8 (all three table classes), more fields than one uint16 segment,
# and code rows whose length is not a multiple of 8
_BITS = [np.arange(1, 9).repeat(5), np.r_[np.full(300, 2), np.full(7, 8), np.full(5, 7), [3]], np.full(22, 3)]


@pytest.mark.parametrize("bits", _BITS, ids=["all-widths", "many-fields", "short-rows"])
def test_tables_and_scalar_sums_match_the_float_adc(bits):
    rng = np.random.default_rng(3)
    codes, levels, level_off, table = _random_code_set(rng, bits)
    tab_meta, fb, segs, plane, used = ca.candidate_layout(table, level_off, codes.shape[1])
    assert np.all(segs[:, 2] - segs[:, 1] <= ca.SEGMENT) and np.all(np.diff(segs[:, 0]) >= 0)
    assert segs[:, 2].max() == table.shape[0] and (segs[1:, 1] == segs[:-1, 2]).all()
    Y = rng.standard_normal((2, bits.size)).astype(np.float32)
    rows = rng.integers(0, codes.shape[0], 128)
    for q in range(2):
        tab, inv, bias = ca.query_tables(Y, q, tab_meta, fb, plane, levels)
        S = ca.candidate_sums(codes, rows, tab, fb, segs, plane, used, False)
        ref = _float_adc(codes, rows, levels, table, Y[q])
        # each field's entry is rounded to 1 / scale: at most nf / 2 of them
        bound = table.shape[0] * inv / 2 + 1e-5 * np.abs(ref).max()
        err = np.abs(S * inv + bias - ref)
        assert err.max() <= bound
        assert err.max() > 0  # quantized: not the float values themselves
        # 16-bit tables: far below the spread of the scores
        assert err.max() < 1e-3 * ref.std()


@needs_simd
@pytest.mark.parametrize("bits", _BITS, ids=["all-widths", "many-fields", "short-rows"])
def test_simd_sums_equal_the_scalar_sums(bits):
    rng = np.random.default_rng(4)
    codes, levels, level_off, table = _random_code_set(rng, bits)
    tab_meta, fb, segs, plane, used = ca.candidate_layout(table, level_off, codes.shape[1])
    Y = rng.standard_normal((1, bits.size)).astype(np.float32) * 100
    tab, _, _ = ca.query_tables(Y, 0, tab_meta, fb, plane, levels)
    rows = np.r_[rng.integers(0, codes.shape[0], 190), codes.shape[0] - 1, 0]  # the last row: no read past the end
    rows = np.r_[rows, rows[:256 - rows.size]]
    simd = ca.candidate_sums(codes, rows, tab, fb, segs, plane, used, True)
    np.testing.assert_array_equal(simd, ca.candidate_sums(codes, rows, tab, fb, segs, plane, used, False))
    # some fields only (the candidate ADC's leading dimensions): the bytes they lie in are transposed
    sub = table[table[:, 1] < max(9, codes.shape[1] // 2)]
    tab_meta, fb, segs, plane, used = ca.candidate_layout(sub, level_off, codes.shape[1])
    assert used == min(codes.shape[1], max(8, sub[:, 1].max() + 1))
    tab, _, _ = ca.query_tables(Y, 0, tab_meta, fb, plane, levels)
    simd = ca.candidate_sums(codes, rows, tab, fb, segs, plane, used, True)
    np.testing.assert_array_equal(simd, ca.candidate_sums(codes, rows, tab, fb, segs, plane, used, False))


@needs_simd
def test_candidate_topk_ranks_by_the_estimates():
    """Top-kk of candidate lists with -1 holes and sizes not a multiple of 64:
    the float ADC's best rows, up to ties within the quantization bound."""
    rng = np.random.default_rng(5)
    bits = np.arange(1, 9).repeat(6)
    codes, levels, level_off, table = _random_code_set(rng, bits)
    cl = ca.candidate_layout(table, level_off, codes.shape[1])
    Y = rng.standard_normal((3, bits.size)).astype(np.float32)
    cand = rng.integers(0, codes.shape[0], (3, 150))
    cand[:, ::7] = -1
    cand[2, 5:] = -1  # 4 valid rows for 10 slots
    scales = np.zeros(0, np.float32)
    for fn in (ca.candidate_topk,):
        v, r = fn(Y, levels, cl, codes, scales, cand, 10)
        for q in range(3):
            valid = cand[q][cand[q] >= 0]
            ref = _float_adc(codes, valid, levels, table, Y[q])
            n = min(10, valid.size)
            assert np.all(r[q, n:] == -1) and np.all(np.isneginf(v[q, n:]))
            assert set(r[q, :n]) <= set(valid) and np.all(np.diff(v[q, :n]) <= 0)
            tab, inv, _ = ca.query_tables(Y, q, *cl[:2], cl[3], levels)
            tol = table.shape[0] * inv
            kth = np.sort(ref)[::-1][n - 1]
            got = _float_adc(codes, r[q, :n], levels, table, Y[q])
            assert got.min() >= kth - tol  # nothing kept that the float ADC ranks clearly lower
            np.testing.assert_allclose(v[q, :n], got, atol=tol, rtol=1e-5)


@needs_simd
@pytest.mark.parametrize("spec", ["PCA,IVF32,ASQ4n,Rerank2", "PCA,ASQ4s,Rerank2", "PCA,HNSW16,ASQ4n,Rerank2"])
def test_candidate_plan_matches_the_reference_and_keeps_recall(monkeypatch, spec):
    """The candidate-ADC plan (forced) in the search kernels: the same ids
    and scores as the stepwise reference (flat, IVF) and as a batch;
    recall@10 against brute force within 0.01 of the exact re-rank of all
    candidates."""
    import reference
    from ipq_index import cost_model
    from ipq_index.structures import base

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:20]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    sc = idx._fast_scanner()
    cl = idx._cand_layout(sc)
    assert cl is not None
    # the candidate ADC reads the dimensions of the largest variance shares, not all coded ones
    kept = np.unique(cl[0][:, 0])
    coded = np.nonzero(idx.encoder.bits > 0)[0]
    assert 0 < kept.size < coded.size
    assert sc.share[kept].min() >= sc.share[np.setdiff1d(coded, kept)].max()
    gt = np.argsort(-(Q @ X.T), axis=1)[:, :10]
    p = dict(nprobe=16, fs=20) if "IVF" in spec else dict(ef=200) if "HNSW" in spec else dict(fs=20)
    plans = []
    real = cost_model.rescore_plan
    monkeypatch.setattr(base.IndexBase, "_prepared_call", lambda *a: None)  # every call plans

    def recall(I):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)])

    def force(plan):
        monkeypatch.setattr(cost_model, "rescore_plan", lambda enc, nc, kk, ex, *a, **kw: plans.append(
            plan if ex > 0 else real(enc, nc, kk, ex, *a, **kw)) or plans[-1])

    def run(plan):
        force(plan)
        return [idx.search(Q[i:i + 1], 10, num_threads=1, **p) for i in range(len(Q))]

    one = run("cand")
    assert plans.count("cand") == len(Q)
    batch = idx.search(Q, 10, num_threads=2, **p)
    np.testing.assert_array_equal(np.concatenate([i for _, i in one]), batch[1])
    if "HNSW" not in spec:
        for (d1, i1), q in zip(one, Q):
            d2, i2 = reference.staged_search(idx, q[None], 10, **p)
            np.testing.assert_array_equal(i1, i2)
            np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-6)
    exact = run("exact")
    r_cand = recall(np.concatenate([i for _, i in one]))
    r_exact = recall(np.concatenate([i for _, i in exact]))
    assert r_cand >= r_exact - 0.01 and r_exact > 0.8
    # results are exact inner products of the returned ids
    for (d, i), q in zip(one, Q):
        np.testing.assert_allclose(d[0], X[i[0]] @ q, rtol=2e-3, atol=2e-3)
