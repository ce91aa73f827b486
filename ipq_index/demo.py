"""The main job: build indexes on the shipped real sample, query them, and
print recall@10, QPS, build time and bytes per vector next to FAISS.

    python -m ipq_index.demo [--sample minilm|glove50] [--k 10]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np

import ipq_index
from ipq_index import datasets


def _recall(ids, gt, k):
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, gt)]))


def _qps_single(search, Q):
    t = time.perf_counter()
    for i in range(Q.shape[0]):
        search(Q[i:i + 1])
    return Q.shape[0] / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", default="minilm", choices=sorted(datasets.SAMPLES))
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    ds = datasets.load_sample(args.sample)
    X, Q, gt, k = ds.train, ds.test, ds.neighbors, args.k
    d = X.shape[1]
    print(f"sample {args.sample}: {X.shape[0]} x {d} vectors, {Q.shape[0]} queries, inner product, k={k}")
    print("(first run compiles numba kernels into the cache; later runs start faster)")
    rows = []
    for spec in ("PCA,ASQ4", "PCA,ASQ4s", "PCA,ASQ4,Rerank4", "PCA,ASQ2,Rerank4"):
        t = time.perf_counter()
        index = ipq_index.index_factory(d, spec)
        index.train(X)
        index.add(X)
        index.warmup()
        build = time.perf_counter() - t
        _, ids = index.search(Q, k)
        qps1 = _qps_single(lambda q: index.search(q, k, num_threads=1), Q)
        t = time.perf_counter()
        index.search(Q, k)
        qpsb = Q.shape[0] / (time.perf_counter() - t)
        rows.append(("ipq_index", spec, _recall(ids, gt, k), qps1, qpsb, build, index.nbytes / len(index)))
    for spec in ("Flat", "SQ4", "EDEN4", "RaBitQ4", f"PQ{d}x4fs", f"PQ{d}x4fs,RFlat"):
        t = time.perf_counter()
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        if "RFlat" in spec:
            faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", 4)
        index.train(X)
        index.add(X)
        build = time.perf_counter() - t
        _, ids = index.search(Q, k)
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        qps1 = _qps_single(lambda q: index.search(q, k), Q)
        faiss.omp_set_num_threads(prev)
        t = time.perf_counter()
        index.search(Q, k)
        qpsb = Q.shape[0] / (time.perf_counter() - t)
        bpv = index.sa_code_size() if hasattr(index, "sa_code_size") else float("nan")
        rows.append(("faiss", spec, _recall(ids, gt, k), qps1, qpsb, build, bpv))
    print(f"\n{'library':10s} {'method':20s} {'recall@' + str(k):>9s} {'QPS 1 thr':>10s} {'QPS batch':>10s} "
          f"{'build s':>8s} {'bytes/vec':>9s}")
    for lib, spec, r, q1, qb, b, bpv in rows:
        print(f"{lib:10s} {spec:20s} {r:9.3f} {q1:10.0f} {qb:10.0f} {b:8.2f} {bpv:9.1f}")
    print("\nipq bytes/vec = packed codes + int64 id (8 B) + the in-memory fast-scan coarse codes"
          "\n(derived, not saved) and, with Rerank, the float16 copy; FAISS: code size.")


if __name__ == "__main__":
    main()
