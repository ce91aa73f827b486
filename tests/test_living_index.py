"""A living index: remove, update, add again, compact, filtered search and
concurrent searches, on every structure, against brute force over the rows
that remain or pass."""

import threading

import numpy as np
import pytest

import ipq_index

SPECS = ["PCA,ASQ6n", "PCA,IVF16,ASQ6n", "PCA,HNSW16,ASQ6n", "PCA,ASQ4n,Rerank4"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    centers = rng.standard_normal((30, 24)) * 2
    X = (centers[rng.integers(0, 30, 6000)] + rng.standard_normal((6000, 24))).astype(np.float32)
    Q = (centers[rng.integers(0, 30, 40)] + rng.standard_normal((40, 24))).astype(np.float32)
    return X, Q


def _topk(X, Q, allowed, k=10):
    allowed = np.asarray(allowed)
    S = Q.astype(np.float64) @ X[allowed].T.astype(np.float64)
    return allowed[np.argsort(-S, axis=1, kind="stable")[:, :k]]


def _recall(I, G):
    return np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(I, G)])


def _build(spec, X, **settings):
    return ipq_index.index_factory(X.shape[1], spec, **settings).train(X).add(X)


@pytest.mark.parametrize("spec", SPECS)
def test_remove_half_then_add_back(tmp_path, data, spec):
    """Removed rows never come back; recall over the remaining rows holds;
    adding them back gives the recall of a fresh build; save/load and
    compact keep the results."""
    X, Q = data
    n = len(X)
    rng = np.random.default_rng(1)
    idx = _build(spec, X, compact_share=1.0)
    fresh = _recall(idx.search(Q, 10)[1], _topk(X, Q, np.arange(n)))
    gone = rng.choice(n, n // 2, replace=False)
    assert idx.remove_ids(np.concatenate([gone, [10 ** 9, 7 * 10 ** 9]])) == gone.size  # unknown ids ignored
    assert idx.remove_ids(gone[:10]) == 0  # already removed
    assert idx.ntotal == n - gone.size and len(idx) == idx.ntotal and idx.nrows == n
    live = np.setdiff1d(np.arange(n), gone)
    D, I = idx.search(Q, 10)
    assert not np.isin(I, gone).any() and (I >= 0).all()
    assert _recall(I, _topk(X, Q, live)) >= fresh - 0.05
    idx.save(tmp_path / "r.ipq")
    back = ipq_index.load(tmp_path / "r.ipq")
    assert back.ntotal == idx.ntotal
    np.testing.assert_array_equal(back.search(Q, 10)[1], I)
    idx.add(X[gone], ids=gone)
    assert idx.ntotal == n
    again = _recall(idx.search(Q, 10)[1], _topk(X, Q, np.arange(n)))
    assert again >= fresh - 0.02
    # the coarse codes are re-derived from the rows held and removals widen
    # the probe: compare the full ADC of every list
    every_list = {"nprobe": 16, "fs": 0} if "IVF" in spec else {} if "HNSW" in spec else {"fs": 0}
    before = idx.search(Q, 10, **every_list)
    idx.compact()
    assert idx.nrows == n and idx.removed is None
    after = idx.search(Q, 10, **every_list)
    if "HNSW" in spec:  # relinked: the same rows reachable, a close recall
        assert _recall(after[1], _topk(X, Q, np.arange(n))) >= again - 0.03
    else:
        np.testing.assert_array_equal(np.sort(after[1], axis=1), np.sort(before[1], axis=1))


def test_removal_past_the_share_compacts(data):
    X, Q = data
    idx = _build("PCA,IVF16,ASQ6n", X, compact_share=0.3)
    idx.remove_ids(np.arange(1000))
    assert idx.nrows == len(X)  # 1000 of 6000: below the share
    idx.remove_ids(np.arange(1000, 2000))
    assert idx.nrows == idx.ntotal == len(X) - 2000 and idx.removed is None
    assert not np.isin(idx.search(Q, 10)[1], np.arange(2000)).any()


@pytest.mark.parametrize("spec", SPECS)
def test_update_replaces_the_vector(data, spec):
    X, Q = data
    idx = _build(spec, X)
    target = np.array([5, 17, 42])
    new = Q[:3] * 3  # far out: each is its own query's best match
    idx.add(new, ids=target)
    assert idx.ntotal == len(X)
    D, I = idx.search(Q[:3] * 3, 1)
    np.testing.assert_array_equal(I[:, 0], target)
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(X[:2], ids=[5, 99999], on_duplicate="error")
    assert idx.ntotal == len(X) and not np.isin(99999, idx.ids)
    with pytest.raises(ValueError, match="repeat"):
        idx.add(X[:2], ids=[123456, 123456])


@pytest.mark.parametrize("spec", SPECS)
def test_filtered_search_returns_exactly_the_allowed(data, spec):
    """Filters of 0, 1, k-1, k and all rows, as id arrays, boolean id masks
    and deny lists: only allowed ids, exactly min(k, allowed) results, and
    recall against brute force over the allowed rows near the unfiltered
    recall at 50%, 10% and 1% selectivity."""
    X, Q = data
    n, k = len(X), 10
    idx = _build(spec, X)
    rng = np.random.default_rng(3)
    base = _recall(idx.search(Q, k)[1], _topk(X, Q, np.arange(n)))
    for size in (0, 1, k - 1, k, n):
        allowed = np.sort(rng.choice(n, size, replace=False))
        for f in (allowed, np.isin(np.arange(n), allowed), ipq_index.DenyIds(np.setdiff1d(np.arange(n), allowed))):
            D, I = idx.search(Q, k, filter=f)
            assert np.isin(I[I >= 0], allowed).all()
            assert ((I >= 0).sum(axis=1) == min(k, size)).all(), (size, type(f))
            assert np.array_equal(I >= 0, np.isfinite(D))
    for share in (0.5, 0.1, 0.01):
        allowed = np.sort(rng.choice(n, int(n * share), replace=False))
        I = idx.search(Q, k, filter=allowed)[1]
        assert np.isin(I[I >= 0], allowed).all()
        assert _recall(I, _topk(X, Q, allowed)) >= base - 0.05, share
        single = np.concatenate([idx.search(Q[i:i + 1], k, filter=allowed, num_threads=1)[1] for i in range(5)])
        np.testing.assert_array_equal(single, I[:5])


def test_filter_combines_with_removals_and_rejects_bad_values(data):
    X, Q = data
    idx = _build("PCA,ASQ6n", X)
    idx.remove_ids(np.arange(0, 6000, 2))
    allowed = np.arange(0, 200)
    I = idx.search(Q, 10, filter=allowed)[1]
    assert np.isin(I, np.arange(1, 200, 2)).all()
    for bad in (np.array([0.5, 1.5]), np.zeros((2, 2), np.int64), "ids"):
        with pytest.raises(ValueError, match="filter|ids"):
            idx.search(Q, 10, filter=bad)


@pytest.mark.parametrize("spec", ["PCA,ASQ6n", "PCA,IVF16,ASQ6n", "PCA,HNSW16,ASQ6n"])
def test_a_filter_object_reused_follows_the_index(data, spec):
    """A filter object keeps its resolved rows and prepared search for the
    index it serves: reused across single-query calls it gives the results
    of a fresh array filter, and after removals, updates and adds (and on a
    second index) it answers for the index as it is now."""
    X, Q = data
    n = len(X)
    idx = _build(spec, X[:5000])
    other = _build(spec, X[:3000])
    allowed = np.arange(0, n, 3)
    for f in (ipq_index.AllowIds(allowed), ipq_index.IdMask(np.isin(np.arange(n), allowed)),
              ipq_index.DenyIds(np.setdiff1d(np.arange(n), allowed))):
        def check(index, live):
            for i in range(4):  # single queries: the prepared call of this filter object
                q = Q[i:i + 1]
                got = index.search(q, 10, filter=f)
                want = index.search(q, 10, filter=np.intersect1d(allowed, live))
                np.testing.assert_array_equal(got[1], want[1])
                assert np.isin(got[1], np.intersect1d(allowed, live)).all()

        check(idx, np.arange(5000))
        check(other, np.arange(3000))
        check(idx, np.arange(5000))
        gone = np.arange(0, 5000, 2)
        idx.remove_ids(gone)
        check(idx, np.setdiff1d(np.arange(5000), gone))
        idx.add(X[5000:], ids=np.arange(5000, n))
        check(idx, np.setdiff1d(np.arange(n), gone))
        idx.add(X[gone], ids=gone)  # back again
        check(idx, np.arange(n))
        idx = _build(spec, X[:5000])


def test_graph_grows_by_inserting(data):
    """Ten rounds of +10% insert into the graph: recall close to a graph
    built at once, at the same ef."""
    X, Q = data
    n = len(X)
    once = _build("PCA,HNSW16,ASQ6n", X)
    grown = ipq_index.index_factory(X.shape[1], "PCA,HNSW16,ASQ6n").train(X)
    for r in range(10):
        grown.add(X[r * n // 10:(r + 1) * n // 10])
    assert grown.ntotal == n and grown.graph["offsets"].shape == (n + 1,)
    gt = _topk(X, Q, np.arange(n))
    assert _recall(grown.search(Q, 10, ef=64)[1], gt) >= _recall(once.search(Q, 10, ef=64)[1], gt) - 0.02


@pytest.mark.parametrize("spec", ["PCA,ASQ6n", "PCA,HNSW16,ASQ6n"])
def test_search_during_changes_sees_before_or_after(data, spec):
    """Searches running while another thread removes and adds see the index
    before or after each change, never a mix."""
    X, Q = data
    idx = _build(spec, X[:4000])
    states = [idx.search(Q, 10, num_threads=1)[1]]
    seen, stop = [], threading.Event()

    def searcher():
        while not stop.is_set():
            seen.append(idx.search(Q, 10, num_threads=1)[1])

    t = threading.Thread(target=searcher)
    t.start()
    try:
        idx.remove_ids(np.arange(0, 4000, 3))
        states.append(idx.search(Q, 10, num_threads=1)[1])
        idx.add(X[4000:], ids=np.arange(4000, 6000))
        states.append(idx.search(Q, 10, num_threads=1)[1])
    finally:
        stop.set()
        t.join()
    assert seen
    for got in seen:
        assert any(np.array_equal(got, s) for s in states)
