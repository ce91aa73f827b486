"""Tests of ipq_index.bench.datasets (file formats, ground truth, shipped samples)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from ipq_index.bench import datasets as dsm
from ipq_index.bench.datasets import (
    Dataset,
    ground_truth,
    load_sample,
    read_bvecs,
    read_fvecs,
    read_hdf5,
    read_ivecs,
    subsample,
    write_fvecs,
    write_ivecs,
)


# --------------------------------------------------------------------------- *vecs


def test_fvecs_round_trip(tmp_path):
    X = np.random.default_rng(0).standard_normal((37, 13)).astype(np.float32)
    p = tmp_path / "x.fvecs"
    write_fvecs(p, X)
    assert p.stat().st_size == 37 * (4 + 13 * 4)
    Y = read_fvecs(p)
    assert Y.dtype == np.float32 and Y.flags.c_contiguous
    np.testing.assert_array_equal(Y, X)


def test_ivecs_round_trip(tmp_path):
    X = np.random.default_rng(1).integers(-1000, 1000, size=(5, 7)).astype(np.int32)
    p = tmp_path / "x.ivecs"
    write_ivecs(p, X)
    Y = read_ivecs(p)
    assert Y.dtype == np.int32
    np.testing.assert_array_equal(Y, X)


def test_bvecs_read(tmp_path):
    X = np.random.default_rng(2).integers(0, 256, size=(4, 6)).astype(np.uint8)
    rows = [np.concatenate([np.array([6], "<i4").view(np.uint8), x]) for x in X]
    p = tmp_path / "x.bvecs"
    np.concatenate(rows).tofile(p)
    Y = read_bvecs(p)
    assert Y.dtype == np.uint8
    np.testing.assert_array_equal(Y, X)


def test_fvecs_truncated_raises(tmp_path):
    p = tmp_path / "x.fvecs"
    write_fvecs(p, np.ones((3, 8), np.float32))
    data = p.read_bytes()
    p.write_bytes(data[:-5])
    with pytest.raises(ValueError, match="truncated"):
        read_fvecs(p)


def test_fvecs_inconsistent_dims_raise(tmp_path):
    p = tmp_path / "x.fvecs"
    # row 0: d=2 (12 bytes); row 1 claims d=5 but has 2 values (same byte length)
    rows = np.array([2, 1.0, 2.0, 5, 3.0, 4.0], dtype=object)
    buf = b"".join(
        np.array([v], "<i4").tobytes() if i % 3 == 0 else np.array([v], "<f4").tobytes()
        for i, v in enumerate(rows)
    )
    p.write_bytes(buf)
    with pytest.raises(ValueError, match="inconsistent dimensions"):
        read_fvecs(p)


def test_fvecs_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.fvecs"):
        read_fvecs(tmp_path / "nope.fvecs")


# --------------------------------------------------------------------------- HDF5


def _write_h5(path, train, test, neighbors=None, distances=None, distance="dot"):
    with h5py.File(path, "w") as f:
        if train is not None:
            f.create_dataset("train", data=train)
        if test is not None:
            f.create_dataset("test", data=test)
        if neighbors is not None:
            f.create_dataset("neighbors", data=neighbors)
        if distances is not None:
            f.create_dataset("distances", data=distances)
        if distance is not None:
            f.attrs["distance"] = distance


def test_read_hdf5_dot(tmp_path):
    rng = np.random.default_rng(3)
    X = rng.standard_normal((200, 8)).astype(np.float64)  # float64 in the file: cast on read
    Q = rng.standard_normal((10, 8)).astype(np.float32)
    ids, scores = ground_truth(X, Q, k=5)
    p = tmp_path / "toy-8-dot.hdf5"
    _write_h5(p, X, Q, ids.astype(np.int32), scores)
    ds = read_hdf5(p)
    assert isinstance(ds, Dataset)
    assert ds.name == "toy-8-dot" and ds.metric == "dot"
    assert ds.train.dtype == np.float32 and ds.train.flags.c_contiguous
    assert ds.test.dtype == np.float32
    assert ds.neighbors.dtype == np.int64 and ds.neighbors.shape == (10, 5)
    assert ds.distances.dtype == np.float32
    np.testing.assert_array_equal(ds.neighbors, ids)
    np.testing.assert_allclose(ds.train, X.astype(np.float32))
    with pytest.raises(Exception):  # frozen
        ds.metric = "angular"


def test_read_hdf5_optional_gt_and_metric(tmp_path):
    p = tmp_path / "a.hdf5"
    _write_h5(p, np.ones((4, 3)), np.ones((2, 3)), distance="angular")
    ds = read_hdf5(p)
    assert ds.metric == "angular" and ds.neighbors is None and ds.distances is None
    p2 = tmp_path / "b.hdf5"
    _write_h5(p2, np.ones((4, 3)), np.ones((2, 3)), distance="hamming")
    with pytest.raises(ValueError, match="unsupported metric"):
        read_hdf5(p2)
    p3 = tmp_path / "c.hdf5"
    _write_h5(p3, np.ones((4, 3)), np.ones((2, 3)), distance=None)
    with pytest.raises(ValueError, match="distance"):
        read_hdf5(p3)
    assert read_hdf5(p3, metric="dot").metric == "dot"


def test_read_hdf5_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.hdf5"):
        read_hdf5(tmp_path / "missing.hdf5")


def test_read_hdf5_foreign_file(tmp_path):
    p = tmp_path / "not.hdf5"
    p.write_text("this is not an HDF5 file\n" * 20)
    with pytest.raises(ValueError, match="not an HDF5 file"):
        read_hdf5(p)


def test_read_hdf5_missing_datasets(tmp_path):
    p = tmp_path / "x.hdf5"
    _write_h5(p, np.ones((4, 3)), None)
    with pytest.raises(ValueError, match="test"):
        read_hdf5(p)


def test_read_hdf5_dim_mismatch(tmp_path):
    p = tmp_path / "x.hdf5"
    _write_h5(p, np.ones((4, 3)), np.ones((2, 5)))
    with pytest.raises(ValueError, match="dimension mismatch"):
        read_hdf5(p)


def test_read_hdf5_bad_neighbors(tmp_path):
    p = tmp_path / "x.hdf5"
    _write_h5(p, np.ones((4, 3)), np.ones((2, 3)), neighbors=np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match="neighbors"):
        read_hdf5(p)


# --------------------------------------------------------------------------- ground truth


def test_ground_truth_matches_numpy():
    rng = np.random.default_rng(4)
    X = (rng.standard_normal((500, 16)) * rng.lognormal(size=(500, 1))).astype(np.float32)
    Q = rng.standard_normal((25, 16)).astype(np.float32)
    ids, scores = ground_truth(X, Q, k=10)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == (25, 10)
    S = Q.astype(np.float64) @ X.astype(np.float64).T
    ref = -np.sort(-S, axis=1)[:, :10]
    np.testing.assert_allclose(scores, ref, rtol=1e-5, atol=1e-5)
    # the returned ids carry the returned scores
    np.testing.assert_allclose(np.take_along_axis(S, ids, 1), scores, rtol=1e-5, atol=1e-5)


def test_ground_truth_angular_and_euclidean():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 8)).astype(np.float32)
    Q = rng.standard_normal((7, 8)).astype(np.float32)
    _, cos = ground_truth(X, Q, k=5, metric="angular")
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    np.testing.assert_allclose(cos, -np.sort(-(Qn @ Xn.T), axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    _, dist = ground_truth(X, Q, k=5, metric="euclidean")
    D = np.sqrt(((Q[:, None, :] - X[None]) ** 2).sum(-1))
    np.testing.assert_allclose(dist, np.sort(D, axis=1)[:, :5], rtol=1e-4, atol=1e-4)


def test_ground_truth_validation():
    X = np.ones((5, 4), np.float32)
    with pytest.raises(ValueError, match="exceeds"):
        ground_truth(X, X, k=6)
    with pytest.raises(ValueError, match="dimension mismatch"):
        ground_truth(X, np.ones((2, 3), np.float32))


# --------------------------------------------------------------------------- samples


def _check_sample(ds: Dataset, n_train: int, d: int):
    assert ds.train.shape == (n_train, d) and ds.test.shape == (300, d)
    assert ds.train.dtype == np.float32 and ds.test.dtype == np.float32
    assert ds.train.flags.c_contiguous and ds.test.flags.c_contiguous
    assert ds.neighbors.shape == (300, 100) and ds.neighbors.dtype == np.int64
    assert ds.distances.shape == (300, 100) and ds.distances.dtype == np.float32
    assert ds.metric == "dot"
    assert "default_rng(0)" in ds.provenance
    # stored ground truth agrees with a recomputation (scores, not ids: ties)
    qs = np.arange(0, 300, 15)[:20]
    ids, scores = ground_truth(ds.train, ds.test[qs], k=100)
    np.testing.assert_allclose(ds.distances[qs], scores, rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    exact = np.einsum("qd,qkd->qk", ds.test[qs].astype(np.float64), ds.train[ds.neighbors[qs]].astype(np.float64))
    np.testing.assert_allclose(exact, ds.distances[qs], rtol=1e-4, atol=1e-4 * np.abs(scores).max())
    assert np.all(np.diff(ds.distances, axis=1) <= 0)


def test_load_sample_minilm():
    ds = load_sample("minilm")
    _check_sample(ds, ds.n_train, 384)
    assert ds.n_train in (8_000, 10_000)
    # raw (un-normalised) embeddings: a genuine MIPS problem
    norms = np.linalg.norm(ds.train, axis=1)
    assert norms.max() / norms.min() > 1.5


def test_load_sample_glove50():
    ds = load_sample("glove50")
    _check_sample(ds, 30_000, 50)


def test_load_sample_unknown():
    with pytest.raises(ValueError, match="unknown sample"):
        load_sample("nope")
    assert dsm.load("sample:glove50").name == "glove50"


def test_subsample():
    ds = load_sample("glove50")
    sub = subsample(ds, 2_000, 30, seed=0)
    assert sub.train.shape == (2_000, 50) and sub.test.shape == (30, 50)
    assert sub.neighbors.shape == (30, 100)
    S = sub.test.astype(np.float64) @ sub.train.astype(np.float64).T
    np.testing.assert_allclose(sub.distances, -np.sort(-S, axis=1)[:, :100], rtol=1e-4, atol=1e-4)
    # rows come from the parent, and the same seed gives the same subset
    assert np.isin(sub.train[:5, 0], ds.train[:, 0]).all()
    again = subsample(ds, 2_000, 30, seed=0)
    np.testing.assert_array_equal(again.train, sub.train)
    first = subsample(ds, 100, 5, seed=None)
    np.testing.assert_array_equal(first.train, ds.train[:100])
    np.testing.assert_array_equal(first.test, ds.test[:5])
    assert first.neighbors.shape == (5, 100)
    with pytest.raises(ValueError, match="only"):
        subsample(ds, 10**6, 5)
