"""The living index on real sets: removals, re-adds, growth and filters.

For each HDF5 set (ann-benchmarks format, inner product) and each structure
(flat, IVF, graph), at default search parameters, single thread:

1. remove a random 50% of the rows and add them back: recall@10 against a
   fresh build of the same data;
2. graph only: grown in 10 rounds of +10% against built at once (recall at
   the same ef, and vectors/s of insertion against the one-shot build);
3. filtered search with random allowed ids at 50%, 10% and 1% selectivity:
   recall@10 against brute force over the allowed rows, next to the
   unfiltered recall; single-query QPS against the unfiltered QPS (one
   ``AllowIds`` object per filter, reused across the queries);
4. ``remove_ids`` of 1% of a 10^6-row flat index (seconds).

    python eval/bench_living.py ../shared/data/*.hdf5 --queries 300 > eval/results/living_index_<date>.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import h5py
import numpy as np

import ipq_index

SPECS = {"default": ["PCA,ASQ4", "PCA,IVF256,ASQ4", "PCA,HNSW32,ASQ6"],
         "scaled": ["PCA,ASQ4s", "PCA,IVF1024,ASQ4s", "PCA,HNSW32,ASQ6s"]}


def recall(I, G):
    return float(np.mean([len(set(a[a >= 0]) & set(b)) / len(b) for a, b in zip(I, G)]))


def brute(X, Q, allowed, k=10):
    S = Q.astype(np.float64) @ X[allowed].T.astype(np.float64)
    return allowed[np.argsort(-S, axis=1)[:, :k]]


def qps(idx, Q, **params):
    best = np.inf
    for _ in range(2):
        t = time.perf_counter()
        for i in range(Q.shape[0]):
            idx.search(Q[i:i + 1], 10, num_threads=1, **params)
        best = min(best, time.perf_counter() - t)
    return Q.shape[0] / best


def one_set(path, nq, rng, only=None):
    with h5py.File(path, "r") as f:
        X = np.asarray(f["train"], np.float32)
        Q = np.asarray(f["test"][:nq], np.float32)
    name = os.path.basename(path)
    n = X.shape[0]
    gt = brute(X, Q, np.arange(n))
    specs = SPECS["scaled" if "glove" in name else "default"]
    if only:
        specs = [s for s in specs if any(part in s for part in only)]
    print(f"\n## {name}: {n} x {X.shape[1]}, {nq} queries")
    for spec in specs:
        t = time.perf_counter()
        idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
        build_s = time.perf_counter() - t
        idx.warmup()
        fresh = recall(idx.search(Q, 10, num_threads=1)[1], gt)
        gone = rng.choice(n, n // 2, replace=False)
        t = time.perf_counter()
        idx.remove_ids(gone)
        rm_s = time.perf_counter() - t
        idx.add(X[gone], ids=gone)
        back = recall(idx.search(Q, 10, num_threads=1)[1], gt)
        print(f"{spec:20s} fresh recall {fresh:.4f}  removed 50% ({rm_s * 1e3:.0f} ms) and added back: "
              f"{back:.4f} (diff {back - fresh:+.4f})")
        idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)  # filters on a fresh build
        idx.warmup()
        base_qps = qps(idx, Q)
        parts = []
        for share in (0.5, 0.1, 0.01):
            allowed = np.sort(rng.choice(n, max(10, int(n * share)), replace=False))
            f = ipq_index.AllowIds(allowed)  # built once, reused by every search (ipq_index.filters)
            I = idx.search(Q, 10, filter=f, num_threads=1)[1]
            assert np.isin(I[I >= 0], allowed).all()
            r = recall(I, brute(X, Q, allowed))
            q = qps(idx, Q, filter=f)
            parts.append(f"{share:.0%}: recall {r:.4f} QPS {q:.0f} ({q / base_qps:.2f}x)")
        print(f"{'':20s} filtered (unfiltered recall {fresh:.4f}, QPS {base_qps:.0f}): " + "; ".join(parts))
        if "HNSW" in spec:
            grown = ipq_index.index_factory(X.shape[1], spec).train(X)
            t = time.perf_counter()
            for r in range(10):
                grown.add(X[r * n // 10:(r + 1) * n // 10])
            grow_s = time.perf_counter() - t
            g = recall(grown.search(Q, 10, num_threads=1)[1], gt)
            print(f"{'':20s} grown in 10 rounds: recall {g:.4f} vs at once {fresh:.4f} (diff {g - fresh:+.4f}); "
                  f"insertion {n / grow_s:.0f} vec/s vs one-shot build {n / build_s:.0f} vec/s (incl. training)")


def removal_at_scale(rng, n=1_000_000, d=64):
    X = rng.standard_normal((n, d)).astype(np.float32)
    idx = ipq_index.index_factory(d, "ASQ4").train(X[:100_000]).add(X)
    ids = rng.choice(n, n // 100, replace=False)
    t = time.perf_counter()
    removed = idx.remove_ids(ids)
    s = time.perf_counter() - t
    print(f"\n## remove_ids of {removed} ids (1%) from a {n}-row flat index: {s:.3f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("datasets", nargs="+")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", metavar="PART", help="only specs containing one of these (e.g. IVF)")
    ap.add_argument("--no-scale", action="store_true", help="skip the 10^6-row removal timing")
    a = ap.parse_args(argv)
    print(f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"single-thread search; command: python eval/bench_living.py {' '.join(sys.argv[1:] if argv is None else argv)}")
    rng = np.random.default_rng(a.seed)
    for path in a.datasets:
        one_set(path, a.queries, rng, a.only)
    if not a.no_scale:
        removal_at_scale(rng)


if __name__ == "__main__":
    main()
