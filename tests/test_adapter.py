"""The ann-benchmarks wrapper IpqIndex (and the baseline wrappers), driven the way
ann-benchmarks' runner drives an algorithm."""

from __future__ import annotations

from importlib import resources

import numpy as np
import pytest
import yaml

import ipq_index
from ipq_index.bench.ann_benchmarks.module import IpqIndex
from ipq_index.bench.baselines import FaissIndex, HnswlibIndex
from ipq_index.bench.config import expand_args
from ipq_index.bench.datasets import ground_truth, load_sample
from ipq_index.bench.params import QUERY_ARG_NAMES

K = 10


@pytest.fixture(scope="module")
def data():
    ds = load_sample("glove50")  # d=50, natural norms: a real MIPS problem, cheap to train
    X = np.ascontiguousarray(ds.train[:2000])
    Q = np.ascontiguousarray(ds.test[:40])
    gt, _ = ground_truth(X, Q, K, "dot")
    return X, Q, gt


def _recall(results, gt):
    return float(np.mean([len(set(map(int, r)) & set(map(int, g))) / K for r, g in zip(results, gt)]))


def test_fake_ann_benchmarks_loop(data):
    X, Q, gt = data
    before = ipq_index.get_num_threads()
    algo = IpqIndex("dot", "PCA,ASQ4s,Rerank4")  # constructor(*base_args, *args)
    assert "PCA,ASQ4s,Rerank4" in str(algo)
    assert algo.get_memory_usage() == 0
    algo.fit(X)
    assert ipq_index.get_num_threads() == 1  # single-query mode pins one thread
    mem = algo.get_memory_usage()
    assert mem > 0 and mem == pytest.approx(algo.index.nbytes / 1024)

    recalls, names = {}, {}
    for setting in ([{"rerank": 0}], [4]):  # a dict, then a bare positional (-> rerank)
        algo.set_query_arguments(*setting)
        names[str(setting)] = str(algo)
        single = [algo.query(q, K) for q in Q]
        for r in single:
            assert len(r) == K and (np.asarray(r) >= 0).all() and len(set(map(int, r))) == K
        algo.batch_query(Q, K)
        batch = algo.get_batch_results()
        assert len(batch) == len(Q)
        for a, b in zip(single, batch):
            assert (np.asarray(b) >= 0).all()
            np.testing.assert_array_equal(a, b)
        recalls[str(setting)] = _recall(batch, gt)
    assert names["[{'rerank': 0}]"] != names["[4]"]
    assert "rerank=0" in names["[{'rerank': 0}]"] and "rerank=4" in names["[4]"]
    assert recalls["[4]"] >= 0.95
    assert recalls["[4]"] >= recalls["[{'rerank': 0}]"] - 1e-9
    algo.done()
    assert ipq_index.get_num_threads() == before


def test_angular_metric_normalises(data):
    X, Q, _ = data
    gt, _ = ground_truth(X, Q, K, "angular")
    algo = IpqIndex("angular", "ASQ4,Rerank8", threads=1)
    try:
        algo.fit(X)
        algo.set_query_arguments("rerank=8")
        assert _recall([algo.query(q, K) for q in Q], gt) >= 0.95
    finally:
        algo.done()


def test_minus_one_slots_are_dropped(data):
    X, Q, _ = data
    algo = IpqIndex("ip", "ASQ4", threads=1)
    try:
        algo.fit(X[:300])
        real_search = algo.index.search

        def padded(Qm, k, **kw):  # what an IVF index returns when a probe finds too few
            s, i = real_search(Qm, k, **kw)
            i = i.copy()
            i[:, k // 2:] = -1
            return s, i

        algo.index.search = padded
        out = algo.query(Q[0], K)
        assert len(out) == K // 2 and (out >= 0).all()
        algo.batch_query(Q[:3], K)
        assert all(len(r) == K // 2 and (r >= 0).all() for r in algo.get_batch_results())
    finally:
        algo.done()


def test_query_argument_errors(data):
    X, _, _ = data
    algo = IpqIndex("dot", "ASQ4")
    with pytest.raises(ValueError, match="positional"):
        algo.set_query_arguments(*range(len(QUERY_ARG_NAMES) + 1))
    with pytest.raises(ValueError, match="euclidean"):
        IpqIndex("euclidean", "ASQ4")
    algo.fit(X[:300])
    try:
        with pytest.raises(ValueError, match="bogus"):
            algo.set_query_arguments({"bogus": 3})
        algo.set_query_arguments(None)  # None keeps the index default
        assert algo.query_params == {}
    finally:
        algo.done()


def test_fit_compiles_the_spec_once_before_training(data, monkeypatch):
    X = data[0][:300]
    calls = []
    real = ipq_index.warmup
    monkeypatch.setattr(ipq_index, "warmup", lambda spec: calls.append(spec) or real(spec))
    algo = IpqIndex("dot", "ASQ4", threads=1)
    assert algo.get_additional() == {}
    try:
        algo.fit(X)
        assert calls == ["ASQ4"] and algo.compile_s >= 0
        assert algo.get_additional() == {"compile_s": algo.compile_s}
        assert algo.file_bytes_per_vector() == algo.index.stored_nbytes / 300
        assert algo.ram_bytes_per_vector() == algo.index.nbytes / 300
        assert algo.file_bytes_per_vector() <= algo.ram_bytes_per_vector()
    finally:
        algo.done()
    early = IpqIndex("dot", "ASQ4", threads=1)
    seconds = early.warmup()  # what ipq bench does outside the timed fit
    try:
        early.fit(X)
        assert calls == ["ASQ4", "ASQ4"] and early.compile_s == seconds
    finally:
        early.done()
    lazy = IpqIndex("dot", "ASQ4", threads=1, warmup=False)
    try:
        lazy.fit(X)
        assert calls == ["ASQ4", "ASQ4"] and lazy.compile_s is None
    finally:
        lazy.done()


def test_packaged_ann_benchmarks_config_instantiates():
    """Expand config.yml like ann-benchmarks does and build every constructor call."""
    text = resources.files("ipq_index.bench.ann_benchmarks").joinpath("config.yml").read_text()
    doc = yaml.safe_load(text)
    assert "angular" in doc["float"] and "euclidean" not in doc["float"]
    n_calls = 0
    for definition in doc["float"]["angular"]:
        assert definition["module"] == "ipq_index.bench.ann_benchmarks"
        assert definition["constructor"] == "IpqIndex"
        for group in definition["run_groups"].values():
            for combo in expand_args(group.get("args")):
                args = [{"@metric": "angular"}.get(a, a) for a in definition["base_args"]] + list(combo)
                algo = IpqIndex(*args)
                for q in expand_args(group.get("query_args")):
                    algo.set_query_arguments(*q)
                    assert str(algo).startswith("IpqIndex(")
                n_calls += 1
    assert n_calls >= 2


def test_baseline_wrappers(data):
    X, Q, gt = data
    X, Q = X[:1000], Q[:20]
    gt, _ = ground_truth(X, Q, K, "dot")
    h = HnswlibIndex("dot", M=16, ef_construction=100, threads=1)
    try:
        h.fit(X)
        h.set_query_arguments(200)
        assert "ef=200" in str(h)
        h.batch_query(Q, K)
        scores, ids = h.get_batch_arrays()
        exact = np.einsum("qd,qkd->qk", Q.astype(np.float64), X[ids].astype(np.float64))
        np.testing.assert_allclose(scores, exact, rtol=1e-4, atol=1e-4)  # 1 - distance = ip
        assert (np.diff(scores, axis=1) <= 1e-6).all()
        np.testing.assert_array_equal(h.query(Q[0], K), ids[0])
        assert h.get_memory_usage() > 0
    finally:
        h.done()
    f = FaissIndex("dot", "SQ8,RFlat", threads=1)
    try:
        f.fit(X)
        f.set_query_arguments({"k_factor_rf": 8})
        f.batch_query(Q, K)
        assert _recall(f.get_batch_results(), gt) == 1.0
        with pytest.raises(ValueError, match="nprobe"):
            f.set_query_arguments("nprobe=4")
    finally:
        f.done()
