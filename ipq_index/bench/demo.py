"""The main job: build indexes on the shipped real sample, query them, and
print recall@k, QPS, compile and build time and bytes per vector next to FAISS.

    python -m ipq_index.bench.demo [--sample minilm|glove50] [--k 10]
    ipq demo [--sample minilm|glove50] [--k 10]

Each ipq spec's numba kernels are compiled (or loaded from the on-disk cache)
by ``ipq_index.warmup(spec)`` before its build is timed: "compile s" is that
call, "build s" is train + add + derived search structures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

IPQ_SPECS = ("PCA,ASQ4", "PCA,ASQ4s", "PCA,ASQ4,Rerank4", "PCA,ASQ2,Rerank4")
FAISS_SPECS = ("Flat", "SQ4", "EDEN4", "RaBitQ4", "PQ{d}x4fs", "PQ{d}x4fs,RFlat")

FOOTNOTE = """\
compile s: ipq_index.warmup(spec) before the build (numba compiles a kernel on first use and
  caches it on disk, so later runs only load it); '-': nothing is compiled.
build s: train + add (ipq: also the derived search structures), compilation excluded.
file bytes/vec: what the saved index holds per vector. ipq: index.stored_nbytes / n = packed
  codes, scales, int64 id, the float16 re-rank copy (Rerank) and structure arrays (what
  save() writes; the trained model is not counted).
RAM bytes/vec: what the index holds in memory per vector. ipq: index.nbytes / n = the above
  plus derived search structures (fast-scan coarse codes), rebuilt after loading.
FAISS, both columns: the code (sa_code_size); these flat indexes number vectors implicitly
  and store no ids."""


def _recall(ids, gt, k):
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, gt)]))


def _qps_single(search, Q):
    t = time.perf_counter()
    for i in range(Q.shape[0]):
        search(Q[i:i + 1])
    return Q.shape[0] / (time.perf_counter() - t)


def _ipq_row(spec, X, Q, gt, k):
    import ipq_index

    compile_s = float(ipq_index.warmup(spec))
    t = time.perf_counter()
    index = ipq_index.index_factory(X.shape[1], spec)
    index.train(X)
    index.add(X)
    index.warmup()  # derived search structures (and any kernel warmup(spec) did not reach)
    build = time.perf_counter() - t
    _, ids = index.search(Q, k)
    qps1 = _qps_single(lambda q: index.search(q, k, num_threads=1), Q)
    t = time.perf_counter()
    index.search(Q, k)
    qpsb = Q.shape[0] / (time.perf_counter() - t)
    n = len(index)
    return ("ipq_index", spec, _recall(ids, gt, k), qps1, qpsb, compile_s, build,
            index.stored_nbytes / n, index.nbytes / n)


def _faiss_row(spec, X, Q, gt, k):
    import faiss

    from .baselines import faiss_bytes_per_vector

    t = time.perf_counter()
    index = faiss.index_factory(X.shape[1], spec, faiss.METRIC_INNER_PRODUCT)
    if "RFlat" in spec:
        faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", 4)
    index.train(X)
    index.add(X)
    build = time.perf_counter() - t
    _, ids = index.search(Q, k)
    prev = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        qps1 = _qps_single(lambda q: index.search(q, k), Q)
    finally:
        faiss.omp_set_num_threads(prev)
    t = time.perf_counter()
    index.search(Q, k)
    qpsb = Q.shape[0] / (time.perf_counter() - t)
    bpv = faiss_bytes_per_vector(index)
    return ("faiss", spec, _recall(ids, gt, k), qps1, qpsb, float("nan"), build, bpv, bpv)


def format_rows(rows, k: int) -> str:
    """The result table followed by :data:`FOOTNOTE`."""
    lines = [f"{'library':10s} {'method':20s} {'recall@' + str(k):>9s} {'QPS 1 thr':>10s} "
             f"{'QPS batch':>10s} {'compile s':>9s} {'build s':>8s} {'file bytes/vec':>14s} "
             f"{'RAM bytes/vec':>13s}"]
    for lib, spec, r, q1, qb, c, b, fbpv, rbpv in rows:
        comp = "-" if np.isnan(c) else f"{c:.2f}"
        lines.append(f"{lib:10s} {spec:20s} {r:9.3f} {q1:10.0f} {qb:10.0f} {comp:>9s} {b:8.2f} "
                     f"{fbpv:14.1f} {rbpv:13.1f}")
    return "\n".join(lines) + "\n\n" + FOOTNOTE


def main(argv=None):
    from ipq_index.cli import set_thread_environment

    set_thread_environment()  # before faiss (or a numba OpenMP pool) loads, as in the ipq command

    from . import datasets

    ap = argparse.ArgumentParser(prog="python -m ipq_index.bench.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sample", default="minilm", choices=sorted(datasets.SAMPLES),
                    help="shipped sample to index and query (default %(default)s)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    args = ap.parse_args(argv)
    if args.k < 1:
        ap.error(f"--k must be >= 1, got {args.k}")
    ds = datasets.load_sample(args.sample)
    X, Q, gt, k = ds.train, ds.test, ds.neighbors, args.k
    if k > gt.shape[1]:
        ap.error(f"--k {k} exceeds the {gt.shape[1]} ground-truth neighbours of sample {args.sample}")
    d = X.shape[1]
    print(f"sample {args.sample}: {X.shape[0]} x {d} vectors, {Q.shape[0]} queries, inner product, k={k}")
    print("note: numba kernels compile on first use (cached on disk afterwards); "
          "that time is the 'compile s' column, not 'build s'", flush=True)
    rows = [_ipq_row(spec, X, Q, gt, k) for spec in IPQ_SPECS]
    rows += [_faiss_row(spec.replace("{d}", str(d)), X, Q, gt, k) for spec in FAISS_SPECS]
    print()
    print(format_rows(rows, k))


if __name__ == "__main__":
    main()
