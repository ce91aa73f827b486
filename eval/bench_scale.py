"""Build time, memory and single-thread QPS at scale (e.g. 10^5 and 10^6 vectors).

    python eval/make_synthetic.py --src REAL.hdf5 --n 1000000 --out syn1m.hdf5
    python eval/bench_scale.py syn1m.hdf5 --ipq "PCA,ASQ4" "PCA,IVF1024,ASQ4" --faiss PQ384x4fs "IVF1024,SQ8"
    python eval/bench_scale.py syn1m.hdf5 --ipq --faiss --hnswlib 32 --hnswlib-ef 64 128 256 512 1024

For each method: compile seconds (ipq: ``ipq_index.warmup(spec)``, before the
timed build), build seconds (train + add, all threads, compilation excluded),
RAM bytes per vector (ipq: ``index.nbytes / n``; FAISS: the code plus the 8-byte
id where FAISS stores ids, ``ipq_index.bench.baselines.faiss_bytes_per_vector``;
hnswlib: vector + level-0 links, an estimate), and for each search setting: recall@10 and single-thread QPS over --queries
queries.  IVF settings sweep nprobe, graph settings sweep ef; ipq rows after
the first flat row also print their QPS as a multiple of that flat scan's.
"""

from __future__ import annotations

import argparse
import os
import time

from ipq_index.cli import set_thread_environment

set_thread_environment()  # the ipq command's thread settings, before faiss loads

import faiss  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402

import ipq_index  # noqa: E402
from ipq_index.bench.baselines import faiss_bytes_per_vector  # noqa: E402


def recall(I, gt):
    return float(np.mean([len(set(a) & set(b)) / gt.shape[1] for a, b in zip(I, gt)]))


def qps(fn, Q):
    t = time.perf_counter()
    for i in range(Q.shape[0]):
        fn(Q[i:i + 1])
    return Q.shape[0] / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--ipq", nargs="*", default=["PCA,ASQ4", "PCA,IVF1024,ASQ4"])
    ap.add_argument("--faiss", nargs="*", default=["PQ384x4fs", "IVF1024,SQ8"])
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--nprobe", type=int, nargs="*", default=[16, 32, 64, 128], help="IVF sweep")
    ap.add_argument("--ef", type=int, nargs="*", default=[32, 64, 128], help="graph sweep")
    ap.add_argument("--fs", type=int, nargs="*", default=[10], help="flat fast-scan factor sweep")
    ap.add_argument("--ivf-fs", type=int, nargs="*", default=[None],
                    help="fast-scan factor sweep on IVF indexes (default: the index's rule)")
    ap.add_argument("--coverage", type=float, nargs="*", default=[None],
                    help="fast-scan coverage sweep on every ipq index (default: fast_scanner.COVERAGE)")
    ap.add_argument("--rerank", type=int, nargs="*", default=[None],
                    help="re-rank factors to sweep on indexes built with ',Rerank' (0 = codes only)")
    ap.add_argument("--hnswlib", type=int, nargs="*", default=[],
                    help="hnswlib 'ip' graphs with these M (ef_construction 200, all threads to build)")
    ap.add_argument("--hnswlib-ef", type=int, nargs="*", default=[64, 128, 256, 512], help="hnswlib ef sweep")
    args = ap.parse_args(argv)
    with h5py.File(args.data, "r") as f:
        X = f["train"][:]
        Q = f["test"][: args.queries]
        gt = f["neighbors"][: args.queries, : args.k]
    d = X.shape[1]
    print(f"{args.data}: {X.shape[0]} x {d}, {len(Q)} queries")
    flat_qps = None  # QPS of the first flat ipq setting: the ratio's base
    for spec in args.ipq:
        compile_s = ipq_index.warmup(spec)
        t = time.perf_counter()
        index = ipq_index.index_factory(d, spec).train(X)
        index.add(X)
        index.warmup()
        build = time.perf_counter() - t
        sweeps = ([dict({"nprobe": p}, **({"fs": f} if f is not None else {}))
                   for f in args.ivf_fs for p in args.nprobe] if "IVF" in spec else
                  [{"ef": e} for e in args.ef] if "HNSW" in spec else [{"fs": f} for f in args.fs])
        if index.rerank:
            sweeps = [dict(p, rerank=r) for r in args.rerank for p in sweeps if r is not None] or sweeps
        for cov in args.coverage:
            index.coverage = cov
            index.warmup()  # rebuilds the fast-scan structure for this coverage
            label = "" if cov is None else f" cov={cov:g}"
            for params in sweeps:
                _, I = index.search(Q, args.k, **params)
                q1 = qps(lambda q: index.search(q, args.k, num_threads=1, **params), Q)
                if flat_qps is None and "IVF" not in spec and "HNSW" not in spec:
                    flat_qps = q1
                ratio = f"  x{q1 / flat_qps:5.1f} flat" if flat_qps else ""
                print(f"ipq   {spec + label:22s} {str(params):16s} compile {compile_s:5.1f}s  "
                      f"build {build:7.1f}s  {index.nbytes / len(index):7.1f} RAM B/vec  recall {recall(I, gt):.3f}  QPS1 {q1:8.1f}{ratio}",
                      flush=True)
        del index
    for spec in args.faiss:
        t = time.perf_counter()
        index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
        index.train(X[: min(len(X), 262144)])
        index.add(X)
        build = time.perf_counter() - t
        settings = [16, 32, 64, 128] if "IVF" in spec else [None]
        for p in settings:
            if p is not None:
                faiss.ParameterSpace().set_index_parameter(index, "nprobe", p)
            _, I = index.search(Q, args.k)
            prev = faiss.omp_get_max_threads()
            faiss.omp_set_num_threads(1)
            q1 = qps(lambda q: index.search(q, args.k), Q)
            faiss.omp_set_num_threads(prev)
            print(f"faiss {spec:22s} {'nprobe=' + str(p) if p else '-':16s} {'':16s}build {build:7.1f}s  "
                  f"{faiss_bytes_per_vector(index):7.1f} RAM B/vec  recall {recall(I, gt):.3f}  QPS1 {q1:8.1f}", flush=True)
        del index
    for m in args.hnswlib:
        import hnswlib

        t = time.perf_counter()
        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=X.shape[0], ef_construction=200, M=m)
        index.set_num_threads(os.cpu_count() or 1)
        index.add_items(X, np.arange(X.shape[0]))
        build = time.perf_counter() - t
        index.set_num_threads(1)
        for ef in args.hnswlib_ef:
            index.set_ef(max(ef, args.k))
            I = index.knn_query(Q, args.k)[0]
            q1 = qps(lambda q: index.knn_query(q, args.k), Q)
            print(f"hnswlib {'HNSW' + str(m) + ',efC200':20s} {'ef=' + str(ef):16s} {'':16s}build {build:7.1f}s  "
                  f"{4 * d + 8 * m:7.1f} RAM B/vec  recall {recall(I, gt):.3f}  QPS1 {q1:8.1f}", flush=True)
        del index


if __name__ == "__main__":
    main()
