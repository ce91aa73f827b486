"""Failures leave an index as it was; edge inputs give answers or clear
errors; a fork pool serves an index trained in the parent."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ipq_index

SPECS = ["PCA,ASQ4n", "IVF16,ASQ4n", "HNSW8,ASQ4n"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(7)
    return rng.standard_normal((2500, 24)).astype(np.float32), rng.standard_normal((12, 24)).astype(np.float32)


def _recall(I, X, Q, k=5):
    gt = np.argsort(-(Q.astype(np.float64) @ X.T.astype(np.float64)), axis=1)[:, :k]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(I, gt)])


def test_fork_pool_searches_an_index_trained_in_the_parent(tmp_path):
    """A multiprocessing fork pool (what gunicorn / Celery do) searches flat,
    IVF and graph indexes trained and searched in the parent: the parent's
    results, no warning, no hang."""
    script = textwrap.dedent("""
        import multiprocessing as mp, numpy as np, ipq_index
        X = np.random.default_rng(0).standard_normal((3000, 32)).astype(np.float32)
        idx = {s: ipq_index.index_factory(32, s).train(X).add(X) for s in %r}
        ref = {s: i.search(X[:8], 5)[1] for s, i in idx.items()}
        def work(s):
            return idx[s].search(X[:8], 5)[1]
        if __name__ == "__main__":
            with mp.get_context("fork").Pool(2) as pool:
                got = pool.map_async(work, list(idx) * 2).get(timeout=300)
            for s, r in zip(list(idx) * 2, got):
                assert (r == ref[s]).all(), s
            print("ok")
    """ % (SPECS,))
    path = tmp_path / "fork.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
    assert "fork" not in res.stderr.lower() and "warning" not in res.stderr.lower(), res.stderr[-2000:]


def test_failed_ivf_train_leaves_the_index_untouched(data):
    X, Q = data
    idx = ipq_index.index_factory(24, "IVF64,ASQ4n")
    with pytest.raises(ValueError, match="IVF64 needs at least 64 training vectors"):
        idx.train(X[:30])
    assert not idx.is_trained and idx.centroids is None
    with pytest.raises(RuntimeError, match="not trained"):
        idx.add(X)
    trained = ipq_index.index_factory(24, "IVF16,ASQ4n").train(X)
    before = trained.encoder, trained.centroids
    with pytest.raises(ValueError):
        trained.train(X[:10])  # too few rows for the lists: nothing changes
    with pytest.raises(ValueError):
        trained.train(X, weights=np.zeros(len(X)))
    assert (trained.encoder, trained.centroids) == before
    trained.add(X)
    assert _recall(trained.search(Q, 5, nprobe=16)[1], X, Q) > 0.5


@pytest.mark.parametrize("spec", ["ASQ4mn", "PCA,ASQ3mn", "IVF16,ASQ4mn", "HNSW8,ASQ4mn,Rerank2"])
def test_minimax_flag_builds_on_every_structure(data, spec):
    """The documented ``m`` flag (worst-case objective, solved exactly) works
    on every structure and finds the neighbours."""
    X, Q = data
    idx = ipq_index.index_factory(24, spec).train(X).add(X)
    assert idx.encoder.config.objective == "max" and idx.encoder.config.method == "exact"
    assert _recall(idx.search(Q, 5)[1], X, Q) > 0.5
    with pytest.raises(ValueError, match="solved exactly"):
        ipq_index.index_factory(24, spec, method="approx")


def test_bad_training_weights_are_refused(data):
    X, _ = data
    for w, msg in ((np.zeros(len(X)), "all zero"), (-np.ones(len(X)), "non-negative"),
                   (np.full(len(X), np.nan), "finite")):
        with pytest.raises(ValueError, match=msg):
            ipq_index.index_factory(24, "ASQ4n").train(X, weights=w)


def test_default_ids_never_overflow(data):
    X, _ = data
    idx = ipq_index.index_factory(24, "ASQ4n").train(X)
    idx.add(X[:2], ids=[5, np.iinfo(np.int64).max])
    with pytest.raises(ValueError, match="overflow"):
        idx.add(X[2:4])
    assert idx.ntotal == 2


@pytest.mark.parametrize("spec", SPECS)
def test_trained_empty_index_saves_and_loads(tmp_path, data, spec):
    """A trained index without vectors saves, loads, refuses to search with
    a clear error, and takes vectors after loading."""
    X, Q = data
    ipq_index.index_factory(24, spec).train(X).save(tmp_path / "e.ipq")
    idx = ipq_index.load(tmp_path / "e.ipq", mmap=False)
    assert idx.is_trained and idx.ntotal == 0
    with pytest.raises(RuntimeError, match="empty"):
        idx.search(Q, 5)
    idx.add(X)
    assert _recall(idx.search(Q, 5)[1], X, Q) > 0.5


def test_large_magnitude_data_probes_searches_and_loads(tmp_path, data):
    """Vectors of norm ~1e6 (centroid coordinates beyond float16) are probed
    in float32, found as at unit scale, and their saved index loads."""
    X, Q = data
    s = np.float32(1e5)
    for spec in ("IVF16,ASQ4n", "PCA,IVF16,ASQ6n"):
        idx = ipq_index.index_factory(24, spec).train(X * s).add(X * s)
        D, I = idx.search(Q * s, 5, nprobe=8)
        assert np.isfinite(D).all() and _recall(I, X, Q) > 0.5
        idx.save(tmp_path / "big.ipq")
        np.testing.assert_array_equal(ipq_index.load(tmp_path / "big.ipq").search(Q * s, 5, nprobe=8)[1], I)


def test_huge_beam_and_probe_counts_are_capped(data):
    X, Q = data
    g = ipq_index.index_factory(24, "HNSW8,ASQ4n").train(X).add(X)
    D, I = g.search(Q, 5, ef=10 ** 12)
    np.testing.assert_array_equal(I, g.search(Q, 5, ef=len(X))[1])
    v = ipq_index.index_factory(24, "IVF16,ASQ4n").train(X).add(X)
    np.testing.assert_array_equal(v.search(Q, 5, nprobe=10 ** 12)[1], v.search(Q, 5, nprobe=16)[1])


def test_pca_on_fewer_rows_than_dimensions_warns(data):
    X, _ = data
    with pytest.warns(UserWarning, match="PCA fitted on 5 training rows of 24 dimensions"):
        ipq_index.index_factory(24, "PCA,ASQ4n").train(X[:5])
