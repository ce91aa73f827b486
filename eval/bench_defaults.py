"""Default search parameters against the exhaustive ADC and FAISS's 4-bit codecs.

For every ann-benchmarks HDF5 set given (inner product): the plain specs
``PCA,ASQ4`` (flat) and ``PCA,IVF<nlist>,ASQ4`` (nlist ~ 4 sqrt(n), rounded to a
power of two) built with defaults, searched

* with no search parameters (the defaults: candidates grown per query by the
  setting ``depth``);
* with ``fs=0`` (every row of the scanned lists scored by the full ADC: the
  recall the defaults aim at, within 0.005);
* with a fixed pool of the setting ``fs`` (``fs=<setting>``: no growth);

and FAISS ``SQ4``, ``EDEN4``, ``RaBitQ4`` and ``PQ{d}x4fs`` (flat, no re-rank).
Recall@10 against the file's exact neighbours; QPS of the queries as one batch
on one thread (best of three).  Also the scale ``train`` chose and its
measured sample recalls.

Which set a default was chosen on is stated in the output: never read a
default's figure off the set it was tuned on.

    python eval/bench_defaults.py ../shared/data/*.hdf5 --tuned-on npm-minilm-l6-384-normed-dot
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ipq_index.cli import set_thread_environment

set_thread_environment()

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import ipq_index  # noqa: E402

FAISS_4BIT = ("SQ4", "EDEN4", "RaBitQ4", "PQ{d}x4fs")


def recall(I, gt):
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / gt.shape[1] for a, b in zip(I, gt)]))


def timed(fn, repeats=3):
    best, out = np.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def ipq_rows(X, Q, gt, spec, extra=None):
    t = time.perf_counter()
    idx = ipq_index.index_factory(X.shape[1], spec).train(X).add(X)
    build = time.perf_counter() - t
    idx.warmup()
    rows = []
    fixed = idx._fs_factor(None, _scanned(idx))  # the first pool of the defaults, not grown
    runs = [("defaults", {}), ("exhaustive ADC (fs=0)", {"fs": 0}), (f"fixed pool (fs={fixed})", {"fs": fixed})]
    for label, p in runs + (extra or []):
        secs, (_, I) = timed(lambda: idx.search(Q, 10, num_threads=1, **p))
        rows.append((label, recall(I, gt), len(Q) / secs))
    return idx, build, rows


def _scanned(idx):
    if hasattr(idx, "nlist"):
        return idx.ntotal * min(idx.nprobe, idx.nlist) / idx.nlist
    return idx.ntotal


def faiss_rows(X, Q, gt):
    from ipq_index.bench.baselines import FaissIndex
    from ipq_index.bench.runner import expand_spec

    out = []
    for spec in FAISS_4BIT:
        s = expand_spec(spec, X.shape[1])
        try:
            algo = FaissIndex("dot", s, threads=1)
            algo.fit(X)
            secs, I = timed(lambda: (algo.batch_query(Q, 10), algo._batch[1])[1])
        except Exception as e:  # a codec missing from this FAISS build
            out.append((s, float("nan"), float("nan"), f"failed: {e}"))
            continue
        out.append((s, recall(np.asarray(I), gt), len(Q) / secs, ""))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="ann-benchmarks HDF5 files (inner product)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--tuned-on", default="npm-minilm-l6-384-normed-dot",
                    help="the set the defaults were chosen on (marked in the output)")
    ap.add_argument("--no-faiss", action="store_true")
    args = ap.parse_args()
    print(f"ipq_index {ipq_index.__version__}; defaults chosen on: {args.tuned_on}")
    for path in args.data:
        name = Path(path).stem
        with h5py.File(path, "r") as f:
            X = np.asarray(f["train"], np.float32)
            Q = np.asarray(f["test"][:args.queries], np.float32)
            gt = np.asarray(f["neighbors"][:args.queries, :10])
        role = "TUNING SET" if name == args.tuned_on else "held out"
        print(f"\n== {name} ({role}): {X.shape[0]} x {X.shape[1]}, {len(Q)} queries, recall@10, "
              "QPS = one batch on one thread")
        nlist = 2 ** round(math.log2(4 * math.sqrt(X.shape[0])))
        best_ipq = None
        for spec in ("PCA,ASQ4", f"PCA,IVF{nlist},ASQ4"):
            idx, build, rows = ipq_rows(X, Q, gt, spec)
            print(f"  {spec}: build {build:.1f} s, scale chosen: {idx.encoder.scale_choice}")
            for label, r, qps in rows:
                print(f"    {label:<26} recall {r:.4f}  QPS {qps:8.0f}")
            print(f"    defaults - exhaustive ADC: {rows[0][1] - rows[1][1]:+.4f}")
            if spec == "PCA,ASQ4":
                best_ipq = rows[0][1]
        if not args.no_faiss:
            fr = faiss_rows(X, Q, gt)
            for s, r, qps, err in fr:
                print(f"  FAISS {s:<22} recall {r:.4f}  QPS {qps:8.0f} {err}")
            best = max((r for _, r, _, _ in fr if r == r), default=float("nan"))
            print(f"  flat PCA,ASQ4 defaults - best FAISS 4-bit: {best_ipq - best:+.4f}")


if __name__ == "__main__":
    main()
