"""The candidate-growth multiplier across k: ``flat.depth_for_k`` against the
fixed multiplier 4 at every k, and the exhaustive ADC.

For each ann-benchmarks HDF5 set (inner product) and k in 1, 10, 30, 100:
recall@k of the exhaustive ADC (``fs=0``), of the default search (the setting
``depth`` = 4 scaled by ln 11 / ln(k + 1)) and of the same index with the
setting chosen so that the multiplier is 4 at that k; time per query of the
queries as one batch on one thread (median of three).  ``depth`` was chosen
on npm MiniLM-L6 at k = 10: read the other sets as held out.

    python eval/bench_depth_k.py ../shared/data/pypi-paraphrase-minilm-l3-384-raw-dot.hdf5 --spec PCA,ASQ4n
"""

from __future__ import annotations

import argparse
import math
import time

from ipq_index.cli import set_thread_environment

set_thread_environment()

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import ipq_index  # noqa: E402

KS = (1, 10, 30, 100)


def exact_order(X, Q, depth):
    out = np.empty((len(Q), depth), np.int64)
    for s in range(0, len(Q), 100):
        S = Q[s:s + 100] @ X.T
        part = np.argpartition(-S, depth - 1, axis=1)[:, :depth]
        o = np.argsort(-np.take_along_axis(S, part, 1), axis=1)
        out[s:s + 100] = np.take_along_axis(part, o, 1)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--spec", default="PCA,ASQ4n")
    ap.add_argument("--queries", type=int, default=500)
    a = ap.parse_args(argv)
    for path in a.files:
        with h5py.File(path, "r") as f:
            X = np.asarray(f["train"], np.float32)
            Q = np.asarray(f["test"], np.float32)[:a.queries]
        order = exact_order(X, Q, max(KS))

        def recall(I, k):
            return float(np.mean([len(set(r[:k]) & set(t[:k])) / k for r, t in zip(I, order)]))

        idx = ipq_index.index_factory(X.shape[1], a.spec).train(X).add(X)
        base = float(idx.settings.depth)

        def timed(k):
            idx.search(Q[:10], k, num_threads=1)
            ts, I = [], None
            for _ in range(3):
                t = time.perf_counter()
                I = idx.search(Q, k, num_threads=1)[1]
                ts.append(time.perf_counter() - t)
            return recall(I, k), 1e6 * float(np.median(ts)) / len(Q)

        print(f"{path.rsplit('/', 1)[-1]}: {X.shape[0]} x {X.shape[1]}, {len(Q)} queries, {a.spec}, one thread, "
              f"setting depth {base:g}", flush=True)
        for k in KS:
            ex = recall(idx.search(Q, k, fs=0)[1], k)
            idx.configure(depth=base)
            r_new, t_new = timed(k)
            idx.configure(depth=base * math.log(k + 1) / math.log(11))  # the multiplier `base` at this k
            r_fix, t_fix = timed(k)
            idx.configure(depth=base)
            print(f"  k={k:3d}: exhaustive ADC {ex:.4f} | depth_for_k: {r_new - ex:+.4f} at {t_new:5.0f} us | "
                  f"fixed multiplier {base:g}: {r_fix - ex:+.4f} at {t_fix:5.0f} us", flush=True)


if __name__ == "__main__":
    main()
