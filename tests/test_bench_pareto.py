"""Pareto fronts, the Pareto CSV, best-QPS summaries, the two-panel plot, and
the optional-library (ScaNN) handling of ipq_index.bench.runner."""

from __future__ import annotations

import csv
import itertools
import math
import sys
import types

import numpy as np
import pytest

from ipq_index.bench import runner
from ipq_index.bench.config import ConfigError, MethodConfig
from ipq_index.bench.runner import Result


def row(recall, qps_single, qps_batch=None, library="ipq", method="m", params=""):
    return Result(dataset="d", library=library, method=method, params=params, compile_s=0.0,
                  build_s=0.0, recall_at_k=recall, qps_single=qps_single,
                  qps_batch=qps_single if qps_batch is None else qps_batch,
                  file_bytes_per_vector=8.0, ram_bytes_per_vector=8.0, rel_ip_error=0.0,
                  n_train=100, n_test=10, k=10)


def brute_force_front(rows, attr):
    """Rows no other row dominates (>= in both, > in one), by the definition."""
    def dominates(a, b):
        ra, qa, rb, qb = a.recall_at_k, getattr(a, attr), b.recall_at_k, getattr(b, attr)
        return ra >= rb and qa >= qb and (ra > rb or qa > qb)

    ok = [r for r in rows if not (math.isnan(r.recall_at_k) or math.isnan(getattr(r, attr)))]
    return [r for r in ok if not any(dominates(s, r) for s in ok)]


def ids(rows):
    return sorted(id(r) for r in rows)


@pytest.mark.parametrize("seed", range(40))
def test_front_equals_brute_force_on_random_sets(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 40))
    # coarse grids make ties (equal recall, equal qps, exact duplicates) frequent
    rec = rng.integers(0, 8, n) / 8
    q1 = rng.integers(1, 6, n) * 100.0
    q2 = rng.integers(1, 6, n) * 100.0
    rows = [row(float(a), float(b), float(c), params=str(i)) for i, (a, b, c) in enumerate(zip(rec, q1, q2))]
    for attr in ("qps_single", "qps_batch"):
        front = runner.pareto_front(rows, attr)
        assert ids(front) == ids(brute_force_front(rows, attr))
        assert [r.recall_at_k for r in front] == sorted(r.recall_at_k for r in front)


def test_front_small_cases():
    a, b, c, d = row(0.9, 1000), row(0.95, 500), row(0.99, 100), row(0.9, 400)
    assert runner.pareto_front([a, b, c, d]) == [a, b, c]          # d dominated by a
    e = row(0.95, 500)                                           # duplicate of b: both kept
    assert ids(runner.pareto_front([a, b, c, e])) == ids([a, b, c, e])
    f = row(0.95, 501)                                           # same recall, faster: b drops
    assert runner.pareto_front([a, b, c, f]) == [a, f, c]
    nan = row(float("nan"), 10_000)
    assert runner.pareto_front([nan, c]) == [c]
    assert runner.pareto_front([]) == []


def test_pareto_rows_are_per_library_and_per_mode():
    rows = [row(0.9, 1000, 10, "ipq"), row(0.99, 100, 500, "ipq"),
            row(0.8, 50, 50, "faiss"), row(0.7, 40, 60, "faiss")]
    out = runner.pareto_rows(rows)
    single = {(r.library, r.recall_at_k) for mode, r in out if mode == "single"}
    batch = {(r.library, r.recall_at_k) for mode, r in out if mode == "batch"}
    # faiss 0.8 is on faiss' own front even though ipq dominates it
    assert single == {("ipq", 0.9), ("ipq", 0.99), ("faiss", 0.8)}
    assert batch == {("ipq", 0.99), ("faiss", 0.8), ("faiss", 0.7)}


def test_best_qps_at_recall():
    rows = [row(0.96, 900, 100, "ipq"), row(0.991, 300, 2000, "ipq"), row(0.94, 5000, 5000, "faiss")]
    best = runner.best_qps_at_recall(rows, 0.95)
    assert set(best) == {"ipq"} and best["ipq"].qps_single == 900
    assert runner.best_qps_at_recall(rows, 0.95, "qps_batch")["ipq"].qps_batch == 2000
    assert runner.best_qps_at_recall(rows, 0.999) == {}


def test_structures_table_compressed_only_split(tmp_path):
    """eval/structures_table.py: settings with a full-precision copy (ipq
    Rerank, FAISS RFlat / HNSW flat / Flat, hnswlib) leave the compressed-only
    table, so its best row per library is the best without one."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "structures_table", Path(__file__).resolve().parents[1] / "eval" / "structures_table.py")
    st = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(st)
    rows = [row(0.97, 900.0, method="PCA,HNSW32,ASQ6"), row(0.99, 2000.0, method="PCA,ASQ4,Rerank2"),
            row(0.96, 800.0, library="faiss", method="HNSW32,SQ8"),
            row(0.99, 3000.0, library="faiss", method="PQ192x4fs,RFlat"),
            row(0.99, 2500.0, library="faiss", method="HNSW32"),
            row(0.99, 2400.0, library="faiss", method="IVF256,Flat"),
            row(0.99, 4000.0, library="hnswlib", method="HNSW32,efC200")]
    assert [st.keeps_float_copy(r) for r in rows] == [False, True, False, True, True, True, True]
    assert st.keeps_float_copy(row(0.9, 1.0, library="scann", params="leaves_to_search=10,reorder=50"))
    assert not st.keeps_float_copy(row(0.9, 1.0, library="scann", params="leaves_to_search=10,reorder=0"))
    assert st.keeps_float_copy(row(0.9, 1.0, library="scann", params="leaves_to_search=10"))
    path = runner.write_csv(rows, tmp_path / "s.csv")
    full = st.table([path])
    comp = st.table([path], thresholds=(0.95,), compressed_only=True)
    assert "**2,000** `PCA,ASQ4,Rerank2" in full and "**4,000**" in full
    assert "**900** `PCA,HNSW32,ASQ6" in comp and "**800** `HNSW32,SQ8" in comp
    assert "Rerank" not in comp and "RFlat" not in comp and "hnswlib" not in comp


def test_pareto_csv_roundtrip_and_plot(tmp_path):
    rows = [row(r / 10, q, q * 2, lib, f"{lib}-{m}", f"p={r}")
            for (lib, m), r, q in zip(itertools.product(["ipq", "faiss", "hnswlib"], [0, 1]) , range(3, 9),
                                      [100.0, 300.0, 200.0, 900.0, 50.0, 60.0])]
    runner.write_csv(rows, tmp_path / "x.csv")
    assert runner.read_csv(tmp_path / "x.csv") == rows
    path = runner.write_pareto_csv(rows, tmp_path / "x_pareto.csv")
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert list(got[0]) == ["front", *runner.COLUMNS]
    assert len(got) == len(runner.pareto_rows(rows))
    assert {g["front"] for g in got} == {"single", "batch"}
    assert runner.read_csv(path) == [r for _, r in runner.pareto_rows(rows)]
    png = tmp_path / "x.png"  # matplotlib is in the test extra: the plot is tested, not skipped
    assert runner.plot(rows, png, "title", 10, threads=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- ScaNN (optional)


def scann_method(**query):
    return MethodConfig.from_dict({"library": "scann", "args": {"num_leaves": 4, "reorder": 20},
                                   "query_args": query or {"leaves_to_search": [2, 4]}})[0]


def test_scann_config_validation():
    m = scann_method()
    assert m.library == "scann" and m.name.startswith("ScaNN") and len(m.query_args) == 2
    bad = [({"library": "scann", "spec": "x"}, "takes no spec"),
           ({"library": "scann", "args": {"leaves": 3}}, "unknown scann setting"),
           ({"library": "scann", "args": {"num_leaves": 0}}, r"num_leaves: must be >= 1"),
           ({"library": "scann", "args": {"avq_threshold": "x"}}, "avq_threshold"),
           ({"library": "scann", "query_args": {"nprobe": [1]}}, "unknown scann query argument"),
           ({"library": "scann", "query_args": [[1, 2]]}, "must be a mapping")]
    for raw, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            MethodConfig.from_dict(raw)


def test_missing_scann_is_skipped_with_a_note(monkeypatch):
    monkeypatch.setitem(sys.modules, "scann", None)  # makes 'import scann' raise ImportError
    keep = MethodConfig.from_dict({"library": "faiss", "spec": "Flat"})[0]
    notes = []
    assert runner.available_methods([scann_method(), keep], note=notes.append) == [keep]
    assert len(notes) == 1 and "scann" in notes[0] and "not installed" in notes[0]


class _FakeSearcher:
    """Exact inner-product search with ScaNN's call signatures."""

    def __init__(self, X):
        self.X = X
        self.calls = []

    def search(self, q, final_num_neighbors, leaves_to_search=None, pre_reorder_num_neighbors=None):
        ids, scores = self.search_batched_parallel(q[None, :], final_num_neighbors,
                                                   leaves_to_search, pre_reorder_num_neighbors)
        return ids[0], scores[0]

    def search_batched_parallel(self, Q, final_num_neighbors, leaves_to_search=None,
                                pre_reorder_num_neighbors=None):
        self.calls.append((leaves_to_search, pre_reorder_num_neighbors))
        s = Q @ self.X.T
        ids = np.argsort(-s, axis=1)[:, :final_num_neighbors].astype(np.uint32)
        return ids, np.take_along_axis(s, ids.astype(np.int64), axis=1)


class _FakeBuilder:
    def __init__(self, X, k, metric):
        assert metric == "dot_product"
        self.X = X

    def tree(self, **kw):
        assert kw["num_leaves"] >= 1
        return self

    def score_ah(self, dims, anisotropic_quantization_threshold):
        return self

    def reorder(self, n):
        return self

    def build(self):
        return _FakeSearcher(self.X)


def test_scann_wrapper_against_a_fake_module(monkeypatch):
    fake = types.ModuleType("scann")
    fake.scann_ops_pybind = types.SimpleNamespace(builder=_FakeBuilder)
    monkeypatch.setitem(sys.modules, "scann", fake)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 8)).astype(np.float32)
    Q = rng.standard_normal((5, 8)).astype(np.float32)
    gt = np.argsort(-(Q @ X.T), axis=1)[:, :10]
    m = scann_method()
    res = runner.measure(runner.make_algorithm(m, "dot", 1), dataset="d", library="scann", method=m.name,
                        X=X, Q=Q, gt=gt, k=10, query_args=m.query_args, repeats=1)
    assert [r.params for r in res] == ["leaves_to_search=2", "leaves_to_search=4"]
    assert all(r.recall_at_k == 1.0 and r.rel_ip_error < 1e-10 for r in res)
    assert res[0].ram_bytes_per_vector == 2 + 32 + 4
