"""Sweep search settings (and the coarse-code coverage) of a saved index.

Loads an index written by ``index.save`` into memory, then for each coverage
(the fast-scan coarse codes are derived at load time, so changing it needs no
rebuild) and each combination of the given search parameters runs the test
queries one at a time on one thread and prints recall@k and wall-clock QPS
(best of ``--repeats``).

Example (a 10^6 IVF index of the synthetic corpus of eval/make_synthetic.py):
    ipq build syn1m.hdf5 --index PCA,IVF1024,ASQ4,Rerank4 -o ivf1024.ipq
    python eval/sweep_saved.py ivf1024.ipq syn1m.hdf5 --coverage 0.95 0.98 \\
        --nprobe 40 48 --fs 5 10 20 --rerank 2
"""

from __future__ import annotations

import argparse
import itertools
import time

import h5py
import numpy as np

import ipq_index


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", help="index file written by save()")
    ap.add_argument("dataset", help="HDF5 file with 'test' and 'neighbors'")
    ap.add_argument("--coverage", type=float, nargs="*", default=[None],
                    help="coarse-code coverages to try (default: the index's)")
    for name in ("nprobe", "fs", "rerank", "ef"):
        ap.add_argument(f"--{name}", type=int, nargs="*", default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args(argv)

    with h5py.File(a.dataset, "r") as f:
        Q = np.ascontiguousarray(f["test"][:a.queries], np.float32)
        gt = f["neighbors"][:a.queries, :a.k]
    idx = ipq_index.load(a.index, mmap=False)
    grid = {n: getattr(a, n) for n in ("nprobe", "fs", "rerank", "ef") if getattr(a, n)}
    print(f"{a.index}: {idx!r}, {idx.ntotal} vectors; {Q.shape[0]} queries of {a.dataset}")
    for cov in a.coverage:
        if cov is not None:
            idx.coverage = cov
        t0 = time.perf_counter()
        idx.warmup()
        print(f"coverage {idx.coverage}: coarse codes derived in {time.perf_counter() - t0:.1f} s", flush=True)
        for values in itertools.product(*grid.values()):
            params = dict(zip(grid, values))
            best = np.inf
            for _ in range(a.repeats):
                found = []
                t = time.perf_counter()
                for i in range(Q.shape[0]):
                    found.append(idx.search(Q[i:i + 1], a.k, num_threads=1, **params)[1][0])
                best = min(best, time.perf_counter() - t)
            rec = np.mean([len(set(x) & set(y)) / a.k for x, y in zip(found, gt)])
            print(f"  coverage {idx.coverage} {params} recall@{a.k} {rec:.4f} "
                  f"QPS1 {Q.shape[0] / best:8.1f} ({best / Q.shape[0] * 1e6:.0f} us/query)", flush=True)


if __name__ == "__main__":
    main()
