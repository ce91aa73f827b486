import copy
import dataclasses
import os

import faiss
import numpy as np
import pytest

import ipq_index
from ipq_index import cost_model, fast_scanner
from ipq_index.bench import datasets
from ipq_index._kernels import rerank
from ipq_index.structures.base import copy_rows
from ipq_index.encoder import allocate_bits, pack_fields

import reference


@pytest.fixture(scope="module")
def sample():
    ds = datasets.load_sample("minilm")
    return ds.train[:4000].copy(), ds.test[:60].copy()


def exact_topk(X, Q, k):
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    return index.search(Q, k)


def recall(I, gt):
    k = gt.shape[1]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(I, gt)])


@pytest.fixture(scope="module")
def built(sample):
    X, Q = sample
    out = {}
    for spec in ("PCA,ASQ4n", "PCA,ASQ4un", "PCA,ASQ4s", "ASQ4n", "PCA,ASQ4n,Rerank4"):
        idx = ipq_index.index_factory(X.shape[1], spec)
        idx.train(X)
        idx.add(X)
        out[spec] = idx
    return out


def test_recall_against_faiss_exact_and_sq4(sample, built):
    X, Q = sample
    _, gt = exact_topk(X, Q, 10)
    sq4 = faiss.index_factory(X.shape[1], "SQ4", faiss.METRIC_INNER_PRODUCT)
    sq4.train(X)
    sq4.add(X)
    r_sq4 = recall(sq4.search(Q, 10)[1], gt)
    r = {spec: recall(idx.search(Q, 10)[1], gt) for spec, idx in built.items()}
    assert r["PCA,ASQ4n"] >= r_sq4, (r, r_sq4)
    assert r["PCA,ASQ4n"] >= 0.93
    assert r["PCA,ASQ4n,Rerank4"] >= 0.99


def test_scores_match_reconstruction_and_are_sorted(sample, built):
    X, Q = sample
    idx = built["PCA,ASQ4n"]
    D, I = idx.search(Q, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == (len(Q), 10)
    assert np.all(np.diff(D, axis=1) <= 1e-6)
    R = idx.reconstruct(I.ravel()).reshape(len(Q), 10, -1)
    ref = np.einsum("qkd,qd->qk", R.astype(np.float64), Q.astype(np.float64))
    np.testing.assert_allclose(D, ref, rtol=1e-4, atol=1e-4)
    # re-ranked scores are exact inner products
    D2, I2 = built["PCA,ASQ4n,Rerank4"].search(Q, 10)
    np.testing.assert_allclose(D2, np.einsum("qkd,qd->qk", X[I2], Q), rtol=1e-3, atol=1e-3)


def test_adc_equals_brute_force_top_k_of_reconstruction(sample, built):
    X, Q = sample
    idx = built["PCA,ASQ4s"]
    R = idx.reconstruct()
    Dref, Iref = exact_topk(R, Q, 5)
    D, _I = idx.search(Q, 5)
    np.testing.assert_allclose(D, Dref, rtol=1e-4, atol=1e-4)  # compare scores (ties)


def test_unbiased_scores_average_out(sample):
    X, Q = sample
    X, Q = X[:1500], Q[:8]
    errs = []
    for seed in range(12):
        idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ2un", seed=seed)
        idx.train(X)
        idx.add(X)
        est = Q.astype(np.float64) @ idx.reconstruct().astype(np.float64).T
        errs.append(est - Q.astype(np.float64) @ X.astype(np.float64).T)
    errs = np.array(errs)  # (seeds, nq, n)
    # the levels differ per seed only through the rotation-free training, so
    # the spread across seeds is the rounding noise: the mean error over
    # seeds must sit within a few standard errors of zero
    mean = errs.mean(axis=0)
    se = errs.std(axis=0, ddof=1) / np.sqrt(errs.shape[0]) + 1e-12
    z = mean.sum() / np.sqrt((se**2).sum())
    assert abs(z) < 4, z
    # nearest rounding is biased: same check fails on a dataset-wide scale
    idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ2n")
    idx.train(X)
    idx.add(X)
    near_err = Q.astype(np.float64) @ idx.reconstruct().astype(np.float64).T - Q.astype(np.float64) @ X.T
    assert np.mean(near_err**2) < np.mean(errs**2)  # lower error, as documented


def test_unbiased_encoding_reproducible_and_independent_of_batching(sample):
    X, _ = sample
    X = X[:800]
    a = ipq_index.index_factory(X.shape[1], "PCA,ASQ4un", seed=3).train(X).add(X)
    b = ipq_index.index_factory(X.shape[1], "PCA,ASQ4un", seed=3).train(X)
    b.add(X[:300])
    b.add(X[300:])
    np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))


def test_save_load_roundtrip(tmp_path, sample, built):
    X, Q = sample
    for spec in ("PCA,ASQ4s", "PCA,ASQ4n,Rerank4"):
        idx = built[spec]
        path = tmp_path / "x.ipq"
        idx.save(path)
        for mmap in (True, False):
            back = ipq_index.load(path, mmap=mmap)
            assert back.spec == idx.spec and len(back) == len(idx) and back.nbytes == idx.nbytes
            D1, I1 = idx.search(Q, 10)
            D2, I2 = back.search(Q, 10)
            np.testing.assert_array_equal(I1, I2)
            np.testing.assert_array_equal(D1, D2)
        # a loaded (memory-mapped) index accepts more vectors
        back = ipq_index.load(path)
        back.add(X[:10], ids=np.arange(10_000, 10_010))
        assert len(back) == len(idx) + 10
        assert back.search(X[:1], 1)[1][0, 0] in (0, 10_000)


def test_corrupt_truncated_foreign_newer_files(tmp_path, built):
    idx = built["PCA,ASQ4n"]
    path = tmp_path / "a.ipq"
    idx.save(path)
    raw = path.read_bytes()
    (tmp_path / "trunc.ipq").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ipq_index.FormatError, match="truncated"):
        ipq_index.load(tmp_path / "trunc.ipq")
    (tmp_path / "foreign.ipq").write_bytes(b"\x89PNG\r\n\x1a\n" + raw[8:200])
    with pytest.raises(ipq_index.FormatError, match="not an ipq_index file"):
        ipq_index.load(tmp_path / "foreign.ipq")
    newer = bytearray(raw)
    newer[8:12] = (99).to_bytes(4, "little")
    (tmp_path / "newer.ipq").write_bytes(bytes(newer))
    with pytest.raises(ipq_index.FormatError, match="version 99"):
        ipq_index.load(tmp_path / "newer.ipq")
    flipped = bytearray(raw)
    flipped[30] ^= 0xFF  # inside the JSON header
    (tmp_path / "hdr.ipq").write_bytes(bytes(flipped))
    with pytest.raises(ipq_index.FormatError, match="corrupt"):
        ipq_index.load(tmp_path / "hdr.ipq")
    body = bytearray(raw)
    body[-5] ^= 0xFF  # inside the last array
    (tmp_path / "body.ipq").write_bytes(bytes(body))
    with pytest.raises(ipq_index.FormatError, match="checksum"):
        ipq_index.load(tmp_path / "body.ipq", mmap=False)
    with pytest.raises(FileNotFoundError):
        ipq_index.load(tmp_path / "missing.ipq")


def test_failed_save_leaves_nothing(tmp_path, built, monkeypatch):
    idx = built["PCA,ASQ4n"]
    path = tmp_path / "fail.ipq"
    import ipq_index.storage as st

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(st.os, "fsync", boom)
    with pytest.raises(OSError):
        idx.save(path)
    assert os.listdir(tmp_path) == []


def test_bad_input(sample, built):
    X, Q = sample
    idx = built["PCA,ASQ4n"]
    with pytest.raises(ValueError, match="NaN"):
        idx.search(np.full((1, X.shape[1]), np.nan, np.float32), 5)
    with pytest.raises(ValueError, match="dimension"):
        idx.search(Q[:, :10], 5)
    with pytest.raises(ValueError, match="real numbers"):
        idx.search(Q.astype(str), 5)
    with pytest.raises(ValueError, match="exceeds"):
        idx.search(Q, len(idx) + 1)
    with pytest.raises(ValueError, match="positive"):
        idx.search(Q, 0)
    with pytest.raises(ValueError, match="re-rank"):
        idx.search(Q, 5, rerank=4)
    fresh = ipq_index.index_factory(X.shape[1], "ASQ4n")
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.add(X)
    with pytest.raises(RuntimeError, match="not trained"):
        fresh.search(Q, 5)
    with pytest.raises(ValueError, match="empty"):
        fresh.train(X[:0])
    fresh.train(X[:500])
    with pytest.raises(RuntimeError, match="empty"):
        fresh.search(Q, 5)
    with pytest.raises(ValueError, match="ids"):
        fresh.add(X[:5], ids=[1, 2])
    assert len(fresh) == 0  # nothing half-added
    for spec in ("", "IVF,ASQ4n", "ASQ", "ASQ4x", "Rerank,ASQ4n", "PCA,ASQ9n", 5):
        with pytest.raises(ValueError):
            ipq_index.index_factory(X.shape[1], spec)


def test_k_larger_than_rerank_pool_pads(sample):
    X, Q = sample
    idx = ipq_index.index_factory(X.shape[1], "ASQ2n,Rerank2").train(X[:50]).add(X[:7])
    D, I = idx.search(Q[:3], 7)
    assert set(I[0]) == set(range(7))
    np.testing.assert_allclose(D, np.sort(Q[:3] @ X[:7].T, axis=1)[:, ::-1], rtol=1e-3, atol=1e-3)


def test_allocation_respects_budget_and_energy():
    rng = np.random.default_rng(0)
    d = 40
    base = rng.uniform(1, 10, d)
    costs = np.stack([base * 4.0 ** (-b) for b in range(9)], axis=1)
    energy = np.linspace(10, 0.1, d)
    for budget in (40, 80, 100, 160):
        bits, byte_of, shift_of, nbytes = allocate_bits(energy, costs, budget)
        assert bits.sum() <= budget and set(bits) <= set(range(9))
        assert nbytes <= max(1, -(-budget // 8))
        # fields are disjoint inside each byte
        for g in range(nbytes):
            used = 0
            for j in np.nonzero((byte_of == g) & (bits > 0))[0]:
                mask = ((1 << bits[j]) - 1) << shift_of[j]
                assert used & mask == 0 and shift_of[j] + bits[j] <= 8
                used |= mask
        # no single feasible change of one width improves the objective by
        # more than the demotions needed for packing can explain: check that
        # no *increase* that still packs into the byte budget is left unused
        obj = (energy * costs[np.arange(d), bits]).sum()
        for j in range(d):
            for b in range(bits[j] + 1, 9):
                alt_bits = bits.copy()
                alt_bits[j] = b
                if alt_bits.sum() <= budget and pack_fields(alt_bits)[2] <= max(1, -(-budget // 8)):
                    gain = energy[j] * (costs[j, bits[j]] - costs[j, b])
                    assert gain <= 1e-9 * obj, (j, b)
    # high-energy dimensions get at least as many bits
    bits = allocate_bits(energy, np.tile(costs[:1], (d, 1)), 100)[0]
    assert np.all(np.diff(bits) <= 0)


def test_pack_fields_exact():
    bits = np.array([8, 4, 4, 2, 2, 2, 1, 1, 0, 4])
    byte_of, shift_of, nbytes = pack_fields(bits)
    assert nbytes == 4


def test_fast_scan_stage_matches_full_adc():
    """Above ``fastscan_min_rows`` the SIMD coarse stage picks candidates that
    the full ADC rescores: with a generous factor it returns the full-ADC
    results, and at the default factor it loses (almost) nothing."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:80]
    assert X.shape[0] >= ipq_index.settings.FlatSettings().fastscan_min_rows
    _, gt = exact_topk(X, Q, 10)
    for spec in ("PCA,ASQ4n", "PCA,ASQ4s"):
        idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
        D_full, I_full = idx.search(Q, 10, fs=0)
        D_wide, I_wide = idx.search(Q, 10, fs=100)
        np.testing.assert_allclose(D_wide, D_full, rtol=1e-5, atol=1e-5)
        D_def, I_def = idx.search(Q, 10)
        assert recall(I_def, gt) >= recall(I_full, gt) - 0.01
        # the fast path's scores are full-precision ADC scores of its ids
        R = idx.reconstruct(I_def.ravel()).reshape(len(Q), 10, -1)
        np.testing.assert_allclose(D_def, np.einsum("qkd,qd->qk", R, Q), rtol=1e-4, atol=1e-4)
        # single-thread and multi-thread agree
        D1, I1 = idx.search(Q, 10, num_threads=1)
        np.testing.assert_array_equal(I1, I_def)


@pytest.mark.parametrize("spec", ["PCA,ASQ4n", "PCA,ASQ4s,Rerank2", "PCA,IVF32,ASQ4n,Rerank4F32", "IVF32,ASQ6n"])
def test_scan_search_matches_the_stepwise_reference(monkeypatch, spec):
    """The whole scan search runs in one kernel per query chunk
    (``FlatIndex._scan_search``): same ids and scores as the search composed
    step by step from the component kernels (``reference.staged_search``:
    rotation or none, scaled codes, IVF probes, every list probed, every
    rescoring plan including the exact re-rank of all candidates with the
    rotation cut to its leading columns, the scan of every row (fs=0),
    float16 and float32 copies; without ``fs`` the candidates grow per
    query until deep enough: setting ``depth``, scaled by k)."""
    from ipq_index.structures import base

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:10]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    assert idx.ntotal >= idx.settings.fastscan_min_rows
    if spec.startswith("PCA"):
        # the exact-re-rank plan rotates only the leading dimensions the
        # coarse tables and probes read (a prefix after PCA)
        sc = idx._fast_scanner()
        lead = idx._lead_dims(sc)
        assert idx._coarse_dims(sc).max() < lead < X.shape[1]
    plans = []
    real = cost_model.rescore_plan
    monkeypatch.setattr(cost_model, "rescore_plan", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    monkeypatch.setattr(base.IndexBase, "_prepared_call", lambda *a: None)  # every call plans
    params = [dict(fs=2), dict(fs=20), dict(fs=0), dict()]  # default: the pool grows by depth
    if idx.rerank:
        params += [dict(rerank=1), dict(fs=3, rerank=1), dict(fs=2, rerank=0), dict(fs=30, rerank=4), dict(fs=0, rerank=1),
                   dict(fs=0, rerank=0)]
    if "IVF" in spec:
        params = [dict(p, nprobe=n) for p in params for n in (3, 32)]
    for p in params:
        # the growth rule's multiplier depends on k (``flat.depth_for_k``): the default pool at other k too
        for k in (10,) if "fs" in p else (10, 1, 40):
            one = [idx.search(Q[i:i + 1], k, num_threads=1, **p) for i in range(len(Q))]
            ref = [reference.staged_search(idx, Q[i:i + 1], k, **p) for i in range(len(Q))]
            for (d1, i1), (d2, i2) in zip(one, ref):
                np.testing.assert_array_equal(i1, i2)
                np.testing.assert_allclose(d1, d2, rtol=1e-6, atol=1e-6)
    assert {"fields", "tables"} <= set(plans) and (not idx.rerank or "exact" in plans)


@pytest.mark.parametrize("spec", ["PCA,ASQ4n", "PCA,IVF16,ASQ4n,Rerank2"])
def test_candidates_grow_by_depth_to_the_exhaustive_adc(spec):
    """Without ``fs`` the candidate pool grows per query until it is
    ``depth`` times deeper than the coarse rank of the deepest result: from a
    pool of k rows (setting fs=1), depth 8 finds the exhaustive ADC's top-10
    (fs=0) that the fixed pool misses, and a depth beyond the rows rescores
    every row; per-call ``fs`` keeps the pool fixed."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:40]
    idx = ipq_index.index_factory(X.shape[1], spec, fs=1).train(X).add(X)
    p = dict(nprobe=4) if "IVF" in spec else {}
    _, every = idx.search(Q, 10, fs=0, rerank=0, **p)

    def found(I):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, every)])

    fixed = found(idx.search(Q, 10, fs=1, rerank=0, **p)[1])
    idx.configure(depth=0.0)
    assert found(idx.search(Q, 10, rerank=0, **p)[1]) == fixed
    idx.configure(depth=8.0)
    deep = found(idx.search(Q, 10, rerank=0, **p)[1])
    assert fixed < 0.9 and deep >= 0.99, (fixed, deep)
    idx.configure(depth=1e300)  # the pool: every row of the lists
    assert found(idx.search(Q, 10, rerank=0, **p)[1]) == 1.0


def test_fused_scan_sees_vectors_added_after_a_search(monkeypatch):
    """The search kernels' per-index arguments are kept between searches and
    rebuilt after ``add``: single-query searches after an add equal the
    stepwise reference and return rows added last."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:8]
    n0 = ipq_index.settings.FlatSettings().fastscan_min_rows
    idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n,Rerank2").train(X).add(X[:n0])
    before = [idx.search(Q[i:i + 1], 10, num_threads=1)[1] for i in range(len(Q))]
    idx.add(X[n0:])
    after = np.concatenate([idx.search(Q[i:i + 1], 10, num_threads=1)[1] for i in range(len(Q))])
    staged = np.concatenate([reference.staged_search(idx, Q[i:i + 1], 10)[1] for i in range(len(Q))])
    np.testing.assert_array_equal(after, staged)
    assert (after >= n0).any() and (np.concatenate(before) < n0).all()


def test_single_query_searches_follow_settings_and_rows_and_still_validate(monkeypatch):
    """Single-query searches (the fused kernel) see the index as it is now:
    changed settings (nprobe, coverage), a changed default rerank and added
    rows give the results of explicit parameters and of the stepwise
    reference; bad queries and parameters still raise."""

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:6]
    n0 = ipq_index.settings.FlatSettings().fastscan_min_rows
    idx = ipq_index.index_factory(X.shape[1], "PCA,IVF16,ASQ4n,Rerank2").train(X).add(X[:n0])

    def run(**p):
        return np.concatenate([idx.search(Q[i:i + 1], 10, num_threads=1, **p)[1] for i in range(len(Q))])

    def staged(**p):  # the stepwise reference
        return np.concatenate([reference.staged_search(idx, Q[i:i + 1], 10, **p)[1] for i in range(len(Q))])

    first = run(nprobe=3)
    np.testing.assert_array_equal(first, run(nprobe=3))
    np.testing.assert_array_equal(first, staged(nprobe=3))
    idx.configure(nprobe=3)
    d3 = run()
    np.testing.assert_array_equal(d3, first)  # the new default
    idx.nprobe = 16
    np.testing.assert_array_equal(run(), run(nprobe=16))
    assert not np.array_equal(d3, run())
    idx.rerank = 0
    np.testing.assert_array_equal(run(nprobe=3), run(nprobe=3, rerank=0))
    np.testing.assert_array_equal(run(nprobe=3), staged(nprobe=3))
    idx.rerank = 2
    idx.add(X[n0:])
    after = run(nprobe=16)
    np.testing.assert_array_equal(after, staged(nprobe=16))
    assert (after >= n0).any()
    bits = idx._fast_scanner().coarse_bits.sum()
    idx.coverage = 0.8
    assert idx.settings.coverage == 0.8
    np.testing.assert_array_equal(run(nprobe=16), staged(nprobe=16))
    assert idx._fast_scanner().coarse_bits.sum() < bits  # coarser codes, rebuilt for the new coverage
    bad = Q[:1].copy()
    for v in (np.nan, np.inf, -np.inf):
        bad[0, 3] = v
        with pytest.raises(ValueError, match="finite|NaN"):
            idx.search(bad, 10, nprobe=16, num_threads=1)
    # other dtypes and layouts take the validating conversion: the same results
    want = idx.search(Q[:2], 10, nprobe=16, num_threads=1)
    for q in (Q[:2].astype(np.float64), np.asfortranarray(Q[:2]), np.repeat(Q[:2], 2, axis=1)[:, ::2]):
        got = idx.search(q, 10, nprobe=16, num_threads=1)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    with pytest.raises(ValueError):
        idx.search(Q[:1, :5], 10, nprobe=16, num_threads=1)
    with pytest.raises((ValueError, TypeError)):
        idx.search(Q[:1], True, nprobe=16, num_threads=1)
    idx.search(Q[:1], 1, nprobe=16, num_threads=1)
    with pytest.raises((ValueError, TypeError)):
        idx.search(Q[:1], True, nprobe=16, num_threads=1)


def test_ivf_full_probe_reproduces_flat_and_roundtrips(tmp_path, sample):
    X, Q = sample
    flat = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n").train(X).add(X)
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF32,ASQ4n").train(X).add(X)
    assert type(ivf).__name__ == "IVFIndex" and ivf.nlist == 32
    D_flat, I_flat = flat.search(Q, 10, fs=0)
    D_ivf, I_ivf = ivf.search(Q, 10, nprobe=32)
    np.testing.assert_allclose(D_ivf, D_flat, rtol=1e-5, atol=1e-5)
    _, gt = exact_topk(X, Q, 10)
    recalls = [recall(ivf.search(Q, 10, nprobe=p)[1], gt) for p in (1, 4, 16, 32)]
    assert all(b >= a - 1e-9 for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[0] < recalls[-1]
    path = tmp_path / "ivf.ipq"
    ivf.save(path)
    back = ipq_index.load(path)
    assert type(back).__name__ == "IVFIndex" and back.nprobe == ivf.nprobe
    for p in (2, 32):
        np.testing.assert_array_equal(back.search(Q, 10, nprobe=p)[1], ivf.search(Q, 10, nprobe=p)[1])
    # threads give the same answer
    np.testing.assert_array_equal(ivf.search(Q, 10, nprobe=4, num_threads=1)[1],
                                  ivf.search(Q, 10, nprobe=4, num_threads=2)[1])
    with pytest.raises(ValueError, match="nprobe"):
        ivf.search(Q, 10, nprobe=-1)
    with pytest.raises(TypeError):
        ivf.search(Q, 10, ef=3)  # a graph-index parameter
    with pytest.raises(ValueError, match="training vectors"):
        ipq_index.index_factory(X.shape[1], "IVF5000,ASQ4n").train(X[:100])


def test_ivf_fast_scan_lists_match_full_adc(tmp_path):
    """Above ``fastscan_min_rows`` the probed lists are scanned by the 4-bit
    fast-scan kernels over the coarse codes, then rescored: with a generous
    factor this equals the full-ADC scan of the same lists, for direct and
    scaled codes, and with every list probed it equals the flat index."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:60]
    for spec in ("PCA,IVF64,ASQ4n", "PCA,IVF64,ASQ4s"):
        ivf = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
        assert ivf.ntotal >= ivf.settings.fastscan_min_rows
        for nprobe in (3, 16):
            D_full, I_full = ivf.search(Q, 10, nprobe=nprobe, fs=0)
            D_fast, I_fast = ivf.search(Q, 10, nprobe=nprobe, fs=200)
            np.testing.assert_allclose(D_fast, D_full, rtol=1e-5, atol=1e-5)
            # candidates only come from the probed lists (the probe kernel is
            # checked against a float64 reference elsewhere)
            probes = ivf._probes(ivf.encoder.rotate_queries(Q), nprobe)
            pos = np.searchsorted(ivf.ids, I_fast)
            assert np.all(np.isin(ivf.assign[pos], probes).reshape(len(Q), -1).all(axis=1))
        flat = ipq_index.index_factory(X.shape[1], spec.replace("IVF64,", "")).train(X).add(X)
        D_all, _ = ivf.search(Q, 10, nprobe=64, fs=200)
        np.testing.assert_allclose(D_all, flat.search(Q, 10, fs=0)[0], rtol=1e-5, atol=1e-5)
        # the default factor loses (almost) nothing against the full scan
        _, gt = exact_topk(X, Q, 10)
        assert recall(ivf.search(Q, 10, nprobe=16)[1], gt) >= recall(ivf.search(Q, 10, nprobe=16, fs=0)[1], gt) - 0.01
        np.testing.assert_array_equal(ivf.search(Q, 10, nprobe=8, num_threads=1)[1],
                                      ivf.search(Q, 10, nprobe=8, num_threads=2)[1])
    path = tmp_path / "ivf_fs.ipq"
    ivf.save(path)
    back = ipq_index.load(path)
    np.testing.assert_array_equal(back.search(Q, 10, nprobe=8)[1], ivf.search(Q, 10, nprobe=8)[1])


def test_table_free_rescoring_equals_table_adc(sample, built):
    """Short candidate lists are rescored field by field from the levels (16
    fields at a time in blocks, and one at a time without blocks); both
    equal the lookup-table ADC (and the reconstruction's inner product),
    scaled codes included, with -1 candidates ignored."""
    from ipq_index._kernels import fields
    from ipq_index._kernels import tables as table_adc

    X, Q = sample
    rng = np.random.default_rng(3)
    for spec in ("PCA,ASQ4n", "PCA,ASQ4s", "ASQ4n"):
        idx = built[spec]
        enc = idx.encoder
        Y = enc.rotate_queries(Q[:9])
        tables, _ = enc.query_tables(Q[:9], Y)
        cand = rng.integers(0, idx.ntotal, (9, 40))
        cand[:, ::7] = -1
        scales = np.asarray(idx.scales) if enc.config.scale else np.zeros(0, np.float32)
        f_fields, f_tables = fields.rescore_fields, table_adc.rescore_topk
        layout = enc.field_layout()
        assert layout[1].shape[0] > 0 or not fields.FIELD_SIMD  # 96+ byte codes: blocks on x86
        unblocked = (layout[0], layout[1][:0], layout[2][:0], layout[3][:0])
        v1, r1 = f_fields(Y, enc.levels32(), layout, idx.codes, scales, cand, 12)
        v0, _ = f_fields(Y, enc.levels32(), unblocked, idx.codes, scales, cand, 12)
        v2, r2 = f_tables(tables, idx.codes, scales, cand, 12)
        np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v0, v2, rtol=1e-5, atol=1e-5)
        assert (r1 >= 0).all() and np.isin(r1, cand).all()
        R = idx.reconstruct(r1.ravel()).reshape(9, 12, -1)
        ip = np.einsum("qkd,qd->qk", R.astype(np.float64), Q[:9].astype(np.float64))
        np.testing.assert_allclose(v1 + Q[:9].astype(np.float64) @ enc.mean[:, None], ip, rtol=1e-4, atol=1e-4)


def test_graph_search_reuses_visited_tags_safely(sample):
    """Visited marks are kept between searches: hundreds of consecutive
    single-query calls (more than the tags before they wrap), a batch call
    and concurrent calls from Python threads all return the same results."""
    from concurrent.futures import ThreadPoolExecutor

    X, Q = sample
    g = ipq_index.index_factory(X.shape[1], "PCA,HNSW16,ASQ4n").train(X[:1500]).add(X[:1500])
    D_b, I_b = g.search(Q, 10, ef=32)
    for _ in range(4):
        singles = [g.search(Q[i:i + 1], 10, ef=32)[1][0] for i in range(len(Q))]
        np.testing.assert_array_equal(np.array(singles), I_b)
    assert (g._visit_tag < 5 * len(Q)).all()  # the one-byte tags wrapped (rows zeroed) on the way
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda i: g.search(Q, 10, ef=32, num_threads=1)[1], range(8)))
    for out in outs:
        np.testing.assert_array_equal(out, I_b)


@pytest.mark.parametrize("spec", ["PCA,HNSW16,ASQ4n", "HNSW16,ASQ6n", "PCA,HNSW16,ASQ4s,Rerank2"])
def test_graph_walk_scores_and_full_beam_match_brute_force(monkeypatch, sample, spec):
    """The whole walk runs in one kernel per query chunk: its scores are the
    ADC scores (reconstruction) or, re-ranked, the exact inner products of
    the returned ids; one query at a time equals a batch; a beam as wide as
    the index (coarse and full-ADC navigation) returns the brute-force ADC
    top-k; every rescoring plan runs (ADC of the beam, lookup tables, the
    exact re-rank of it all); -1 / -inf padding on a tiny index."""
    from ipq_index.structures import base

    X, Q = sample
    n = 1200
    g = ipq_index.index_factory(X.shape[1], spec).train(X[:n]).add(X[:n])
    plans = []
    real = cost_model.rescore_plan
    monkeypatch.setattr(cost_model, "rescore_plan", lambda *a, **kw: plans.append(real(*a, **kw)) or plans[-1])
    monkeypatch.setattr(base.IndexBase, "_prepared_call", lambda *a: None)  # every call plans
    params = [dict(ef=24), dict(ef=64), dict(ef=64, nav="full"), dict(ef=1000)]
    if g.rerank:
        params += [dict(ef=64, rerank=0), dict(ef=24, rerank=1), dict(ef=48, rerank=4), dict(ef=48, nav="full"),
                   dict(ef=1000, rerank=0)]
    for p in params:
        one = [g.search(Q[i:i + 1], 10, num_threads=1, **p) for i in range(12)]
        D, I = np.concatenate([d for d, _ in one]), np.concatenate([i for _, i in one])
        Db, Ib = g.search(np.repeat(Q[:12], 3, axis=0), 10, num_threads=2, **p)  # a batch on the pool
        np.testing.assert_array_equal(Ib[::3], I)
        np.testing.assert_allclose(Db[::3], D, rtol=1e-6, atol=1e-6)
        if (g.rerank if p.get("rerank") is None else p["rerank"]):
            np.testing.assert_allclose(D, np.einsum("qkd,qd->qk", X[I].astype(np.float64), Q[:12]), rtol=1e-2, atol=1e-2)
        else:
            R = g.reconstruct(np.searchsorted(np.asarray(g.ids), I.ravel())).reshape(12, 10, -1)
            np.testing.assert_allclose(D, np.einsum("qkd,qd->qk", R, Q[:12]), rtol=1e-4, atol=1e-4)
    assert {"fields", "tables"} <= set(plans) and (not g.rerank or "exact" in plans)
    # a beam over the whole index: the brute-force ADC top-10
    ref = np.einsum("nd,qd->qn", g.reconstruct().astype(np.float64), Q[:12].astype(np.float64))
    want = np.sort(ref, axis=1)[:, ::-1][:, :10]
    for nav in ("coarse", "full"):
        D, I = g.search(Q[:12], 10, ef=n, nav=nav, rerank=0, num_threads=1)
        np.testing.assert_allclose(D, want, rtol=1e-4, atol=1e-4)
    tiny = ipq_index.index_factory(X.shape[1], spec.replace("HNSW16", "HNSW4")).train(X[:1200]).add(X[:12])
    d, i = tiny.search(Q[:2], 12, ef=4, num_threads=1)
    assert np.array_equal(i >= 0, np.isfinite(d)) and np.isin(i[i >= 0], np.arange(12)).all()
    d2, i2 = tiny.search(np.repeat(Q[:2], 20, axis=0), 12, ef=4)
    np.testing.assert_array_equal(i2[::20], i)


def test_graph_large_ef_reproduces_flat_and_roundtrips(tmp_path, sample):
    X, Q = sample
    X = X[:2000]
    flat = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n").train(X).add(X)
    g = ipq_index.index_factory(X.shape[1], "PCA,HNSW16,ASQ4n").train(X).add(X)
    assert type(g).__name__ == "GraphIndex" and repr(g).startswith("GraphIndex(d=")
    D_flat, _ = flat.search(Q, 10, fs=0)
    for nav in ("coarse", "full"):
        D_g, _ = g.search(Q, 10, ef=2000, nav=nav)  # the beam covers the whole graph
        np.testing.assert_allclose(D_g, D_flat, rtol=1e-5, atol=1e-5)
    # coarse navigation returns full-ADC scores of its ids and loses little
    _, gt = exact_topk(X, Q, 10)
    D_c, I_c = g.search(Q, 10, ef=64, nav="coarse")
    R = g.reconstruct(np.searchsorted(g.ids, I_c.ravel())).reshape(len(Q), 10, -1)
    np.testing.assert_allclose(D_c, np.einsum("qkd,qd->qk", R, Q), rtol=1e-4, atol=1e-4)
    assert recall(I_c, gt) >= recall(g.search(Q, 10, ef=64, nav="full")[1], gt) - 0.03
    with pytest.raises(ValueError, match="nav"):
        g.search(Q, 10, nav="fast")
    r_small = recall(g.search(Q, 10, ef=10)[1], gt)
    r_big = recall(g.search(Q, 10, ef=200)[1], gt)
    assert r_big >= r_small and r_big >= 0.9
    path = tmp_path / "g.ipq"
    g.save(path)
    back = ipq_index.load(path)
    np.testing.assert_array_equal(back.search(Q, 10, ef=40)[1], g.search(Q, 10, ef=40)[1])
    np.testing.assert_array_equal(g.search(Q, 10, ef=40, num_threads=1)[1], g.search(Q, 10, ef=40, num_threads=2)[1])
    g.add(X[:5], ids=np.arange(10 ** 6, 10 ** 6 + 5))  # later adds insert into the graph
    assert g.ntotal == back.ntotal + 5
    np.testing.assert_array_equal(g.search(X[:5], 1, ef=40, rerank=0)[1][:, 0] >= 0, True)
    with pytest.raises(ValueError, match="ef"):
        g.search(Q, 10, ef=0)


def test_unbiased_std_bound_covers_the_observed_error(sample):
    """The per-score std bound dominates the empirical spread of ADC scores
    over re-encodings with different seeds (same levels)."""
    X, Q = sample
    X, Q = X[:1500], Q[:10]
    base = ipq_index.index_factory(X.shape[1], "PCA,ASQ4un").train(X).add(X)
    _, ids, std = base.search(Q, 10, return_std=True, fs=0)
    assert std.shape == (10, 10) and np.all(std > 0)
    exact = np.einsum("qkd,qd->qk", X[ids].astype(np.float64), Q.astype(np.float64))
    scores = []
    for seed in range(1, 41):  # same trained quantizer, fresh rounding noise
        enc = copy.copy(base.encoder)
        enc.config = dataclasses.replace(base.encoder.config, seed=seed)
        codes, scales = enc.encode(X[ids.ravel()])
        R = enc.decode(codes, scales).reshape(10, 10, -1).astype(np.float64)
        scores.append(np.einsum("qkd,qd->qk", R, Q.astype(np.float64)))
    scores = np.array(scores)
    emp_std = scores.std(axis=0, ddof=1)
    assert np.mean(emp_std <= std * 1.2) > 0.95  # bound holds (sampling slack 20%)
    assert np.abs(scores.mean(axis=0) - exact).max() < 6 * std.max() / np.sqrt(len(scores)) + 1e-6
    with pytest.raises(ValueError, match="unbiased"):
        ipq_index.index_factory(X.shape[1], "ASQ4n").train(X).add(X).search(Q, 5, return_std=True)


def test_failed_retrain_keeps_the_trained_state(sample):
    X, Q = sample
    X = X[:1200]
    idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n", sample_size=1000).train(X)
    levels = idx.encoder.levels.copy()
    with pytest.raises(ValueError, match="non-negative"):
        idx.train(X * 2, weights=-np.ones(len(X)))
    with pytest.raises(ValueError, match="one entry per training row"):
        idx.train(X, weights=np.ones(3))
    np.testing.assert_array_equal(idx.encoder.levels, levels)  # the old quantizer survives
    idx.add(X)
    ref = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n", sample_size=1000).train(X).add(X)
    np.testing.assert_array_equal(idx.search(Q, 5)[1], ref.search(Q, 5)[1])
    with pytest.raises(RuntimeError, match="retrain"):
        idx.train(X)
    # weights are subsampled together with the rows (sample_size < n)
    w = np.linspace(0.5, 2.0, len(X))
    ipq_index.index_factory(X.shape[1], "PCA,ASQ2n", sample_size=700).train(X, weights=w)


def test_exact_rerank_kernels_match_float64_reference():
    """float16 (widened from the bit patterns) and float32 copies, serial
    and parallel paths, -1 candidates skipped, a width that is not a
    multiple of the vector lanes, zeros, subnormals and the largest halves."""
    rng = np.random.default_rng(5)
    for dt in (np.float16, np.float32):
        V = rng.standard_normal((3000, 45)).astype(dt)
        V[:40, :4] = np.array([0.0, -0.0, 6e-8, -3e-5, 1e-4, 65504.0, -65504.0, 0.5], dt).reshape(2, 4).repeat(20, 0)
        Q = rng.standard_normal((20, 45)).astype(np.float32)
        cand = rng.integers(-1, 3000, (20, 25))
        for nq in (3, 20):
            v, r = rerank.rerank(Q[:nq], copy_rows(V), cand[:nq], 7)
            S = np.einsum("qcd,qd->qc", V[np.maximum(cand[:nq], 0)].astype(np.float64), Q[:nq].astype(np.float64))
            S[cand[:nq] < 0] = -np.inf
            order = np.argsort(-S, axis=1, kind="stable")[:, :7]
            np.testing.assert_allclose(v, np.take_along_axis(S, order, 1), rtol=1e-6)
            np.testing.assert_array_equal(r, np.take_along_axis(cand[:nq], order, 1))


def test_float16_rerank_widens_every_finite_half_exactly():
    """One-hot queries read single components back: every finite float16 bit
    pattern comes out as its exact value."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)]
    d = 32
    V = np.ascontiguousarray(halves[:halves.size // d * d].reshape(-1, d))
    n = V.shape[0]
    Q = np.eye(d, dtype=np.float32)
    cand = np.tile(np.arange(n, dtype=np.int64), (d, 1))
    for nq in (3, d):  # serial and parallel kernels
        v, r = rerank.rerank(Q[:nq], copy_rows(V), cand[:nq], n)
        for j in range(nq):
            np.testing.assert_array_equal(v[j], V[r[j], j].astype(np.float32))
            assert np.array_equal(np.sort(r[j]), np.arange(n))


def test_float16_rerank_copy_rejects_out_of_range_vectors(sample):
    X, _ = sample
    idx = ipq_index.index_factory(X.shape[1], "ASQ4n,Rerank2").train(X)
    big = X[:10] * 1e5
    with pytest.raises(ValueError, match="float16 range"):
        idx.add(big)
    assert idx.ntotal == 0
    idx32 = ipq_index.index_factory(X.shape[1], "ASQ4n,Rerank2F32").train(X)
    idx32.add(big)
    assert idx32.ntotal == 10


def test_coarse_codes_keep_the_score_variance(sample, built):
    """Unscaled codes: the coarse widths (<= min(b, 4) bits) keep COVERAGE
    of the score variance -- a float64 reference of the estimated error
    (cell means of the decoded values) is within budget, and on real queries
    the coarse scores (byte tables of the packed coarse codes) differ from
    the full ADC scores by about that share of their variance; coverage=1
    gives every dimension all its coarse bits.  Scaled codes keep the
    dimensions with the top variance shares at min(b, 4) bits.  Bad values
    are refused."""
    from ipq_index._kernels import codes as code_kernels

    X, Q = sample
    idx = built["PCA,ASQ4n"]
    enc, codes = idx.encoder, np.asarray(idx.codes)
    maxb = np.minimum(enc.bits, 4)
    full = fast_scanner.FastScanner(enc, codes, coverage=1.0, lists="codes")
    np.testing.assert_array_equal(full.coarse_bits, maxb)
    part = fast_scanner.FastScanner(enc, codes, lists="codes")
    cb = part.coarse_bits
    assert (cb <= maxb).all() and part.M < full.M and 0 < part.kept.sum()
    assert np.isin(cb[cb > 0], [1, 2, 3]).mean() > 0.5  # mostly narrow fields sharing sub-quantizers
    Z = code_kernels.decode(codes, enc.levels, enc.level_off, enc.bits, enc.byte_of, enc.shift_of,
                            enc.d).astype(np.float64)
    w = np.asarray(enc.energy, np.float64)
    err = 0.0
    for j in range(enc.d):
        if cb[j] == 0:
            err += w[j] * np.mean(Z[:, j] ** 2)
            continue
        c = (codes[:, enc.byte_of[j]].astype(np.int64) >> enc.shift_of[j]) & ((1 << int(enc.bits[j])) - 1)
        t = c >> (int(enc.bits[j]) - int(cb[j]))
        means = np.array([Z[t == v, j].mean() if (t == v).any() else 0.0 for v in range(1 << int(cb[j]))])
        err += w[j] * np.mean((Z[:, j] - means[t]) ** 2)
    total = float((w * (Z ** 2).mean(axis=0)).sum())
    assert err <= (1 - fast_scanner.COVERAGE) * total * 1.02, (err / total, fast_scanner.COVERAGE)
    # on real queries: coarse vs full ADC scores
    Y = enc.rotate_queries(Q[:20])
    rows = np.random.default_rng(5).integers(0, idx.ntotal, 500)
    T = part.byte_tables(Y)
    coarse = np.stack([T[q][np.arange(part.M // 2)[None, :], part.codes[rows]].sum(1) for q in range(20)])
    exact = Y.astype(np.float64) @ Z[rows].T
    rel = np.mean((coarse - exact) ** 2) / np.mean((exact - exact.mean(axis=1, keepdims=True)) ** 2)
    assert rel <= 1.6 * (1 - fast_scanner.COVERAGE), rel
    # scaled codes: the top dimensions by variance share, min(b, 4) bits each
    sidx = built["PCA,ASQ4s"]
    senc, scodes, scales = sidx.encoder, np.asarray(sidx.codes), np.asarray(sidx.scales)
    sp = fast_scanner.FastScanner(senc, scodes, scales, lists="codes", coverage=0.9)
    Zs = code_kernels.decode(scodes, senc.levels, senc.level_off, senc.bits, senc.byte_of, senc.shift_of,
                             senc.d).astype(np.float64) * scales[:, None]
    share = np.where(senc.bits > 0, senc.energy * Zs.var(axis=0), 0.0)
    kept = sp.kept
    assert share[kept].sum() >= 0.9 * share.sum() * (1 - 1e-6)
    assert share[kept].min() >= share[~kept].max() * (1 - 1e-6)
    np.testing.assert_array_equal(sp.coarse_bits[kept], np.minimum(senc.bits, 4)[kept])
    for bad in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="coverage"):
            fast_scanner.FastScanner(enc, codes, coverage=bad)


def test_ivf_concurrent_searches_with_different_nprobe():
    """Searches from several Python threads with different nprobe on one
    IVF index (fast-scan lists) return what each returns alone."""
    from concurrent.futures import ThreadPoolExecutor

    ds = datasets.load_sample("minilm")
    X, Q = ds.train[:6000], ds.test[:40]
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF32,ASQ4n").train(X).add(X)
    assert ivf.ntotal >= ipq_index.FlatSettings().fastscan_min_rows
    alone = {p: ivf.search(Q, 10, nprobe=p, num_threads=1)[1] for p in (2, 16)}
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: (p, ivf.search(Q, 10, nprobe=p, num_threads=1)[1]), [2, 16] * 6))
    for p, ids in outs:
        np.testing.assert_array_equal(ids, alone[p])


def test_ivf_probes_are_the_top_inner_product_lists(monkeypatch):
    """The probe kernel (transformed space, float16 centroids, float32 sums,
    histogram selection) picks the lists with the largest <q, c_l> of a
    float64 reference, serial and parallel, with and without PCA; keeping
    only the dimensions that order the lists (setting probe_coverage)
    changes almost nothing."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train[:4000], ds.test[:20]
    for spec in ("IVF40,ASQ4n", "PCA,IVF40,ASQ4n"):
        ivf = ipq_index.index_factory(X.shape[1], spec, probe_spread=0.0).train(X)
        ref = Q.astype(np.float64) @ ivf.centroids.astype(np.float64).T
        Y = ivf.encoder.rotate_queries(Q)
        ivf.configure(probe_coverage=1.0)
        assert ivf._probe_space()[0].size == X.shape[1]
        # float16 centroids: each score within 2^-11 sum_t |y_t c_lt| of the float64 one
        slack = 2.0 ** -11 * (np.abs(Y.astype(np.float64)) @ np.abs(ivf._transformed_centroids()).T).max(axis=1)
        for nq in (3, 20):  # serial kernel below 8 queries, parallel above
            for nprobe in (1, 7, 40):
                P = ivf._probes(Y[:nq], nprobe)
                assert P.shape == (nq, nprobe)
                for q in range(nq):
                    assert len(set(P[q])) == nprobe
                    kth = np.sort(ref[q])[::-1][nprobe - 1]
                    # every probed list scores at least the nprobe-th best (float16 + float32 slack)
                    assert (ref[q, P[q]] >= kth - 2 * slack[q] - 1e-4 * np.abs(ref[q]).max()).all()
        ivf.configure(probe_coverage=0.999)
        kept = ivf._probe_space()[0].size
        P = ivf._probes(Y, 8)
        top = np.argsort(-ref, axis=1)[:, :8]
        overlap = np.mean([len(set(a) & set(b)) / 8 for a, b in zip(P, top)])
        assert overlap >= 0.97, (spec, kept, overlap)


def test_top_sorted_selects_like_a_stable_sort():
    """The probes' selection (histogram bound, then ranking by counting, or a
    stable sort past TOP_RANKED survivors) returns the k largest values and their
    indices, descending, equal values lower index first: a stable argsort
    of -vals; for spread, clustered, tied and all-equal values and k from 1
    to len(vals)."""
    from ipq_index._kernels import probe

    rng = np.random.default_rng(5)
    cases = [rng.standard_normal(1024), rng.standard_normal(300) ** 3, np.round(rng.standard_normal(500), 1),
             np.full(70, 2.5), np.r_[np.zeros(600), rng.standard_normal(20) + 10], rng.random(37)]
    for vals in cases:
        vals = vals.astype(np.float32)
        for k in sorted({1, 5, 44, min(len(vals), 600), len(vals)}):
            if k > len(vals):
                continue
            hv = np.empty(k, np.float32)
            hi = np.empty(k, np.int64)
            probe.top_sorted(vals, hv, hi)
            want = np.argsort(-vals, kind="stable")[:k]
            np.testing.assert_array_equal(hv, vals[want])
            np.testing.assert_array_equal(hi, want)


def test_ivf_spread_aware_probes_match_a_float64_reference(monkeypatch):
    """With the setting probe_spread z > 0 a list scores <q, c_l> + z |q| s_l, s_l the
    query-energy-weighted RMS spread of its members around the centroid:
    the cached spreads equal a float64 reference from the decoded codes
    (scaled codes included), the probes are the top lists of the
    reference score, and on real data they hold more of the true top-10 than
    the centroid-only probes at the same nprobe."""
    from ipq_index._kernels import codes as code_kernels

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:60]
    z = ipq_index.IVFSettings().probe_spread
    assert z > 0
    for spec in ("PCA,IVF64,ASQ4n", "IVF64,ASQ4s"):
        ivf = ipq_index.index_factory(X.shape[1], spec, probe_coverage=1.0).train(X).add(X)
        enc = ivf.encoder
        R = np.eye(X.shape[1]) if enc.rotation is None else np.asarray(enc.rotation, np.float64)
        # the decoded codes in the transformed space (scaled codes: times their scales)
        Z = code_kernels.decode(np.asarray(ivf.codes), enc.levels, enc.level_off, enc.bits, enc.byte_of,
                                enc.shift_of, enc.d).astype(np.float64)
        if enc.config.scale:
            Z *= np.asarray(ivf.scales, np.float64)[:, None]
        Cr = (ivf.centroids.astype(np.float64) - enc.mean) @ R
        a = np.asarray(ivf.assign)
        w = np.asarray(enc.energy, np.float64) / np.asarray(enc.energy, np.float64).sum()
        per_row = ((Z - Cr[a]) ** 2 * w).sum(1)
        s_ref = np.sqrt(np.bincount(a, per_row, 64) / np.maximum(np.bincount(a, minlength=64), 1))
        np.testing.assert_allclose(ivf._list_spread(), z * s_ref, rtol=1e-4, atol=1e-6)
        ref = Q.astype(np.float64) @ ivf.centroids.astype(np.float64).T
        ucb = ref + z * np.linalg.norm(Q.astype(np.float64), axis=1)[:, None] * s_ref[None, :]
        Y = enc.rotate_queries(Q)
        # probe centroids are rounded to float16: each score within 2^-11 sum_t |y_t c_lt|
        Cr = np.abs(ivf._transformed_centroids())
        slack = 2.0 ** -11 * (np.abs(Y.astype(np.float64)) @ Cr.T).max(axis=1)
        for nq in (3, 60):
            P = ivf._probes(Y[:nq], 6)
            for q in range(nq):
                kth = np.sort(ucb[q])[::-1][5]
                assert (ucb[q, P[q]] >= kth - 2 * slack[q] - 1e-4 * np.abs(ucb[q]).max()).all()
    # real data: the spread term finds more of the true top-10 per probe
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF64,ASQ4n").train(X).add(X)
    Qa = ds.test
    true = np.argsort(-(Qa.astype(np.float64) @ X.astype(np.float64).T), axis=1)[:, :10]
    a = np.asarray(ivf.assign)
    Ya = ivf.encoder.rotate_queries(Qa)
    share = {}
    for zz in (0.0, z):
        ivf.configure(probe_spread=zz)
        P = ivf._probes(Ya, 4)
        share[zz] = np.mean([np.isin(a[t], p).mean() for t, p in zip(true, P)])
    assert share[z] > share[0.0], share


def test_index_coverage_setting_is_used_saved_and_checked(tmp_path):
    """``index.coverage`` sets the share of score variance the coarse codes
    keep: fewer sub-quantizers at a lower value, recall with a generous
    factor unchanged (rescoring restores every dimension), kept by
    save/load, bad values refused."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:50]
    idx = ipq_index.index_factory(X.shape[1], "PCA,IVF16,ASQ4n").train(X).add(X)
    _, gt = exact_topk(X, Q, 10)
    idx.search(Q, 10, nprobe=16)
    m_default = idx._fast_scanner().M
    r_default = recall(idx.search(Q, 10, nprobe=16, fs=50)[1], gt)
    idx.coverage = 0.8
    assert idx.coverage == 0.8
    assert idx._fast_scanner().M < m_default
    assert recall(idx.search(Q, 10, nprobe=16, fs=50)[1], gt) >= r_default - 0.03
    path = tmp_path / "cov.ipq"
    idx.save(path)
    back = ipq_index.load(path)
    assert back.coverage == 0.8
    np.testing.assert_array_equal(back.search(Q, 10, nprobe=4)[1], idx.search(Q, 10, nprobe=4)[1])
    for bad in (0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ValueError, match="coverage"):
            idx.coverage = bad
        with pytest.raises(ValueError, match="coverage"):
            ipq_index.index_factory(X.shape[1], "PCA,ASQ4n", coverage=bad)
    assert ipq_index.index_factory(X.shape[1], "PCA,ASQ4n", coverage=0.9).coverage == 0.9
    idx.coverage = None
    assert idx.coverage == fast_scanner.COVERAGE and idx._fast_scanner().M == m_default
    # defaults by structure and code type: graph navigation, scaled codes
    assert ipq_index.index_factory(X.shape[1], "PCA,HNSW16,ASQ4n").coverage == fast_scanner.NAV_COVERAGE
    assert ipq_index.index_factory(X.shape[1], "PCA,IVF16,ASQ4n").coverage == fast_scanner.COVERAGE
    for spec in ("PCA,ASQ4s", "PCA,HNSW16,ASQ4s"):
        assert ipq_index.index_factory(X.shape[1], spec).coverage == fast_scanner.COVERAGE_SCALED


def test_coarse_byte_tables_score_the_packed_nibbles(sample, built):
    """The graph walk's coarse tables: a row's sum of byte lookups equals
    the sum over its 4-bit sub-codes of <centroid, query slice> (float64
    reference from the packed codes)."""
    idx = built["PCA,ASQ4n"]
    sc = fast_scanner.FastScanner(idx.encoder, np.asarray(idx.codes), lists="codes")
    X, Q = sample
    Y = idx.encoder.rotate_queries(Q[:5])
    T = sc.byte_tables(Y)
    assert T.shape == (5, sc.M // 2, 256) and T.dtype == np.float32
    Yv = np.where(sc.slot_dim >= 0, Y.astype(np.float64)[:, sc.slot_dim], 0.0)  # (5, M, DSUB)
    rows = np.random.default_rng(4).integers(0, idx.ntotal, 30)
    codes = sc.codes[rows]
    nib = np.empty((rows.size, sc.M), np.int64)
    nib[:, 0::2] = codes & 15
    nib[:, 1::2] = codes >> 4
    for q in range(5):
        got = T[q, np.arange(sc.M // 2)[None, :], codes].astype(np.float64).sum(axis=1)
        ref = np.einsum("rms,ms->r", sc.cent.astype(np.float64)[np.arange(sc.M)[None, :], nib], Yv[q])
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_rotation_kernels_match_float64(sample, built):
    """Q @ R by the serial and parallel rotation kernels (eight rows of R per
    pass, then the remainder) against float64 matmul, for sizes that are and
    are not multiples of eight, and the encoder's rotate_queries on real data."""
    from ipq_index._kernels import rotation
    rng = np.random.default_rng(8)
    for n, m, nq in ((384, 384, 1), (50, 50, 3), (7, 5, 2), (13, 20, 9), (1, 4, 1), (24, 40, 37)):
        R = rng.standard_normal((n, m)).astype(np.float32)
        Qr = rng.standard_normal((nq, n)).astype(np.float32)
        ref = Qr.astype(np.float64) @ R.astype(np.float64)
        for fn in (rotation.rotate_rows,):
            got = fn(Qr, R)
            assert got.shape == (nq, m) and got.dtype == np.float32
            np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6 * np.sqrt(n) * np.abs(ref).max())
        # float16 matrices (uint16 bits): the same sums as float32 of the same values
        R16 = R.astype(np.float16)
        for fn in (rotation.rotate_rows,):
            assert np.array_equal(fn(Qr, R16.view(np.uint16)), fn(Qr, R16.astype(np.float32)))
        # the leading columns alone (R (n, m) into rows longer than m): the rest stay 0
        for Rk in (R16.astype(np.float32), R16.view(np.uint16)):
            Y = np.zeros((1, m + 9), np.float32)
            rotation.rotate_query(Qr, 0, Rk, Y)
            assert np.array_equal(Y[0, :m], rotation.rotate_rows(Qr[:1], Rk)[0]) and not Y[0, m:].any()
            # a tile of rows at once (R read once for the tile): each row bit for bit that of
            # the one-row kernel (rotate_query), the rest untouched
            if nq > 1:
                Yt = np.full((nq + 2, m + 9), 7.0, np.float32)
                rotation.rotate_tile(Qr, 1, nq - 1, Rk, Yt)
                for i in range(1, nq):
                    Y = np.zeros((1, m), np.float32)
                    rotation.rotate_query(Qr, i, Rk, Y)
                    assert np.array_equal(Yt[i - 1, :m], Y[0])
                assert (Yt[:nq - 1, m:] == 7).all() and (Yt[nq - 1:] == 7).all()
    X, Q = sample
    enc = built["PCA,ASQ4n"].encoder
    # queries are rotated with the rotation rounded to float16: within float32
    # sums of that, and within the rounding bound (2^-11 relative per entry) of the trained one
    R = np.asarray(enc.rotation, np.float64)
    R16 = R.astype(np.float16).astype(np.float64)
    assert np.array_equal(enc.rotation32(), R16.astype(np.float32))
    assert np.array_equal(enc.rotation16().view(np.float16).astype(np.float64), R16)
    got = enc.rotate_queries(Q).astype(np.float64)
    ref16 = Q.astype(np.float64) @ R16
    np.testing.assert_allclose(got, ref16, rtol=0, atol=1e-5 * np.abs(ref16).max())
    bound = 2.0 ** -11 * (np.abs(Q.astype(np.float64)) @ np.abs(R)) + 1e-5 * np.abs(ref16).max()
    assert (np.abs(got - Q.astype(np.float64) @ R) <= bound).all()
    assert np.abs(R16 - R).max() > 0  # the rounding is real: the bound above is what is tested


def test_nav_tables_are_the_coarse_tables_in_int16_steps(sample, built):
    """The graph walk's int16 tables: per query, a row's sum of lookups is
    (its float64 coarse score - sum of the byte tables' minima) / step
    + G * NAV_LOW to within G/2 + 1 (one rounding per byte table), step =
    the largest byte-table span / NAV_SPAN, all computed here from the
    float tables; so the walk ranks rows as the coarse scores do."""
    from ipq_index._kernels import coarse_tables
    idx = built["PCA,ASQ4n"]
    sc = fast_scanner.FastScanner(idx.encoder, np.asarray(idx.codes), lists="codes")
    X, Q = sample
    Y = idx.encoder.rotate_queries(Q[:8])
    T = sc.byte_tables(Y).astype(np.float64)
    N = sc.nav_tables(Y)
    G = sc.M // 2
    assert N.shape == (8, G, 256) and N.dtype == np.int16
    rows = np.random.default_rng(6).integers(0, idx.ntotal, 300)
    codes = sc.codes[rows]
    for q in range(8):
        low = T[q].min(axis=1)
        step = (T[q].max(axis=1) - low).max() / coarse_tables.NAV_SPAN
        ref = (T[q, np.arange(G)[None, :], codes].sum(axis=1) - low.sum()) / step + G * coarse_tables.NAV_LOW
        got = N[q, np.arange(G)[None, :], codes].astype(np.int64).sum(axis=1)
        assert np.abs(got - ref).max() <= G / 2 + 1, np.abs(got - ref).max()
        assert N[q].min() == coarse_tables.NAV_LOW and N[q].max() == coarse_tables.NAV_LOW + coarse_tables.NAV_SPAN


def test_results_are_padded_when_fewer_than_k_are_found(sample):
    """An IVF search with nprobe=1 and k above the probed list's size: the
    list's rows come first (the exact ADC order of the flat index restricted
    to them), then ids -1 with scores -inf."""
    X, Q = sample
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF64,ASQ4n").train(X).add(X)
    sizes = np.bincount(np.asarray(ivf.assign), minlength=64)
    k = int(sizes.max()) + 3
    D, I = ivf.search(Q[:20], k, nprobe=1)
    Dall, Iall = ivf.search(Q[:20], ivf.ntotal, nprobe=64)
    assign = np.asarray(ivf.assign)
    for q in range(20):
        found = I[q] >= 0
        n = int(found.sum())
        assert found[:n].all() and not found[n:].any() and n < k
        lst = assign[I[q, 0]]
        assert n == sizes[lst] and (assign[I[q, :n]] == lst).all()
        assert np.isneginf(D[q, n:]).all() and np.isfinite(D[q, :n]).all()
        keep = assign[Iall[q]] == lst  # the full ranking restricted to that list
        np.testing.assert_array_equal(I[q, :n], Iall[q][keep])
        np.testing.assert_allclose(D[q, :n], Dall[q][keep], rtol=1e-6, atol=1e-6)


def test_direct_exact_rerank_of_coarse_candidates(monkeypatch):
    """When exact dot products are cheaper than the ADC pass, re-ranking
    indexes send the coarse candidates straight to the exact re-rank: the
    results are then the exact top-k of those candidates (float64 reference),
    and recall is at least the ADC-filtered path's."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:60]
    idx = ipq_index.index_factory(X.shape[1], "PCA,ASQ4n,Rerank2").train(X).add(X)
    assert idx.ntotal >= idx.settings.fastscan_min_rows
    _, gt = exact_topk(X, Q, 10)
    monkeypatch.setattr(cost_model, "EXACT_NS_PER_DIM", 1e9)  # never direct
    D_adc, I_adc = idx.search(Q, 10, fs=2)
    monkeypatch.setattr(cost_model, "EXACT_NS_PER_DIM", 1e-9)  # always direct
    D_dir, I_dir = idx.search(Q, 10, fs=2)
    for nt in (1, 2):  # serial (few queries) and parallel kernels
        np.testing.assert_array_equal(idx.search(Q[:3], 10, fs=2, num_threads=nt)[1], I_dir[:3])
    # the direct results are the exact top-10 of the fast-scan candidates
    cand = idx._fast_scanner().candidates(idx.encoder.rotate_queries(Q), idx._coarse_count(2, 20), 1)
    for q in range(len(Q)):
        ip = X[cand[q]].astype(np.float64) @ Q[q].astype(np.float64)
        top = cand[q][np.argsort(-ip, kind="stable")[:10]]
        assert set(top) == set(I_dir[q]) or np.allclose(np.sort(ip)[::-1][:10], D_dir[q], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(D_dir, np.einsum("qkd,qd->qk", X[I_dir].astype(np.float64), Q.astype(np.float64)),
                               rtol=1e-2, atol=1e-2)  # float16 copy
    assert recall(I_dir, gt) >= recall(I_adc, gt) - 1e-9
    # the choice itself: candidates pass through untouched only when re-ranking
    assert cost_model.rescore_plan(idx.encoder, cand.shape[1], 20, 1e-9, 1.3) == "exact"
    assert cost_model.rescore_plan(idx.encoder, cand.shape[1], 20, 0.0, 1.3) in ("fields", "tables")


_WARM_SCRIPT = """
import sys, numpy as np, ipq_index
from ipq_index._kernels import (coarse_tables, codes, fastscan, fields, graph_search, probe, rerank, rotation,
                                tables, topk)
def signatures():
    out = {}
    for mod in (codes, coarse_tables, fastscan, fields, graph_search, probe, rerank, rotation, tables, topk):
        for name in dir(mod):
            f = getattr(mod, name)
            if hasattr(f, "signatures"):
                out[mod.__name__ + "." + name] = len(f.signatures)
    return out
idx = ipq_index.load(sys.argv[1], mmap=sys.argv[4] == "1").warmup()
Q = np.load(sys.argv[2])
before = signatures()
for i in range(3):
    idx.search(Q[i:i + 1], 10, num_threads=1)
    idx.search(Q[i:i + 1], 10, num_threads=1, **eval(sys.argv[3]))
idx.search(Q, 10)
after = signatures()
print(sorted(k for k in after if after[k] != before.get(k, 0)))
"""


@pytest.mark.parametrize("spec,params,mmap", [("PCA,ASQ4n,Rerank2", "dict(fs=20, rerank=8)", True),
                                              ("PCA,IVF16,ASQ4n", "dict(fs=30, nprobe=4)", False),
                                              ("PCA,HNSW16,ASQ4n", "dict(ef=200)", False)])
def test_warmup_compiles_every_search_path(tmp_path, spec, params, mmap):
    """After ``warmup()`` single-query searches (few and many candidates:
    the fused and the staged kernels) and a batch compile nothing: in a
    fresh process, no kernel gains a signature (JIT stays out of timed
    searches).  Memory-mapped (read-only arrays: kernel builds of their
    own, compiled here) and in-memory loads."""
    import subprocess
    import sys

    ds = datasets.load_sample("minilm")
    X, Q = ds.train[:5000], ds.test[:20]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    idx.save(tmp_path / "i.ipq")
    np.save(tmp_path / "q.npy", Q)
    res = subprocess.run([sys.executable, "-c", _WARM_SCRIPT, str(tmp_path / "i.ipq"), str(tmp_path / "q.npy"), params,
                          "1" if mmap else "0"],
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]", res.stdout


@pytest.mark.parametrize("spec", ["PCA,ASQ4n", "PCA,IVF32,ASQ4n,Rerank2", "PCA,HNSW16,ASQ4s,Rerank2"])
def test_batches_on_the_pool_equal_single_queries_and_the_reference(spec):
    """Many queries run the per-query kernels in chunks on the thread pool:
    the same ids and scores on one and two threads, as one query at a time,
    and (flat, IVF) as the stepwise reference."""
    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test[:70]
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    D_s, I_s = idx.search(Q, 10, num_threads=2)
    D_1, I_1 = idx.search(Q, 10, num_threads=1)
    np.testing.assert_array_equal(I_1, I_s)
    np.testing.assert_allclose(D_1, D_s, rtol=1e-6, atol=1e-6)
    singles = [idx.search(Q[i:i + 1], 10, num_threads=1) for i in range(len(Q))]
    np.testing.assert_array_equal(np.concatenate([s[1] for s in singles]), I_s)
    if "HNSW" not in spec:
        D_r, I_r = reference.staged_search(idx, Q, 10)
        np.testing.assert_array_equal(I_r, I_s)
        np.testing.assert_allclose(D_r, D_s, rtol=1e-6, atol=1e-6)


def test_prepared_single_query_calls_still_reject_bad_queries(sample):
    """A repeated single-query search takes the prepared call (parameters
    validated when it was prepared): NaN / inf queries still raise, on every
    structure, and other dtypes give the same results."""
    X, Q = sample
    for spec in ("PCA,ASQ4n", "PCA,IVF16,ASQ4n", "PCA,HNSW8,ASQ4n"):
        idx = ipq_index.index_factory(X.shape[1], spec, fastscan_min_rows=1000).train(X).add(X)
        want = idx.search(Q[:1], 5, num_threads=1)
        np.testing.assert_array_equal(idx.search(Q[:1], 5, num_threads=1)[1], want[1])  # prepared
        assert idx._prepared_calls
        np.testing.assert_array_equal(idx.search(Q[:1].astype(np.float64), 5, num_threads=1)[1], want[1])
        for v in (np.nan, np.inf):
            bad = Q[:1].copy()
            bad[0, 2] = v
            with pytest.raises(ValueError, match="NaN|finite"):
                idx.search(bad, 5, num_threads=1)


def test_settings_are_validated_saved_and_loaded(tmp_path, sample):
    """Per-index settings: set at index_factory (unknown names and bad values
    refused with the known names), changed with configure, written with the
    automatic coverage resolved, read back by load; a file whose settings
    this version does not know raises FormatError."""
    from ipq_index import storage

    X, Q = sample
    with pytest.raises(ValueError, match="nprobe"):
        ipq_index.index_factory(X.shape[1], "PCA,ASQ4n", nprobe=4)  # not a flat setting
    with pytest.raises(ValueError, match="probe_spread"):
        ipq_index.index_factory(X.shape[1], "PCA,IVF8,ASQ4n", probe_spread=-1.0)
    ivf = ipq_index.index_factory(X.shape[1], "PCA,IVF8,ASQ4n", nprobe=3, probe_spread=1.5, seed=2)
    assert ivf.nprobe == 3 and ivf.settings.probe_spread == 1.5 and ivf.encoder.config.seed == 2
    with pytest.raises(ValueError, match="ef"):
        ivf.configure(ef=10)
    ivf.train(X).add(X)
    ivf.configure(nprobe=5, fs=4)
    want = ivf.search(Q, 10)
    path = tmp_path / "s.ipq"
    ivf.save(path)
    meta, _, _ = storage.read_header(path)
    assert meta["settings"]["coverage"] == ivf.coverage == 0.95  # resolved, not None
    assert meta["settings"]["nprobe"] == 5 and meta["settings"]["fs"] == 4
    back = ipq_index.load(path)
    assert back.settings == ivf.settings.replace(coverage=0.95)
    got = back.search(Q, 10)
    np.testing.assert_array_equal(got[1], want[1])
    # a file (valid checksums) whose settings hold a name this version does not know
    arrays = storage.load_arrays(path, mmap=False)[1]
    meta["settings"]["from_the_future"] = 1
    storage.save_arrays(tmp_path / "f.ipq", meta, arrays)
    with pytest.raises(ipq_index.FormatError, match="settings"):
        ipq_index.load(tmp_path / "f.ipq")


def test_a_plain_spec_decides_the_scale_on_the_data(tmp_path):
    """``ASQ4`` (no ``s`` / ``n``) trains both encoders and keeps the
    per-vector scale when it finds significantly more of the top-10 on a
    held-out sample: on GloVe word vectors (norms 0.05-14) it does, and the
    index then finds as many of the exact top-10 (brute force) as the forced
    ``ASQ4s`` and more than ``ASQ4n``; the record is saved, loaded and shown
    by ``ipq info``; ``s`` with ``n`` is refused."""
    from ipq_index.cli import main as cli_main

    ds = datasets.load_sample("glove50")
    X, Q = ds.train, ds.test[:200]
    gt = np.argsort(-(Q.astype(np.float64) @ X.T.astype(np.float64)), axis=1)[:, :10]

    def recall(idx):
        _, I = idx.search(Q, 10, fs=0)
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)])

    auto = ipq_index.index_factory(X.shape[1], "PCA,ASQ4").train(X).add(X)
    choice = auto.encoder.scale_choice
    assert choice["scale"] is True and auto.encoder.config.scale is True
    assert choice["recall_scaled"] > choice["recall_plain"] and choice["rows"] > 0 and choice["k"] == 10
    forced = {f: ipq_index.index_factory(X.shape[1], f"PCA,ASQ4{f}").train(X).add(X) for f in "sn"}
    assert forced["s"].encoder.scale_choice is None and forced["n"].encoder.config.scale is False
    assert recall(auto) == recall(forced["s"]) > recall(forced["n"]) + 0.05
    path = tmp_path / "auto.ipq"
    auto.save(path)
    back = ipq_index.load(path)
    assert back.encoder.scale_choice == choice and back.spec == "PCA,ASQ4"
    np.testing.assert_array_equal(back.search(Q, 10)[1], auto.search(Q, 10)[1])
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_main(["info", str(path)])
    assert "scale_choice" in out.getvalue() and str(choice["recall_plain"]) in out.getvalue()
    with pytest.raises(ValueError, match="exclude each other"):
        ipq_index.index_factory(X.shape[1], "PCA,ASQ4sn")
