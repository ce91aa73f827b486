"""Batch search with the default thread count against one query at a time,
on an idle machine and on a busy one.

For each index (flat ``PCA,ASQ4n`` and ``PCA,IVF256,ASQ4n`` on the given set):
QPS of the queries one per call on one thread ("single"), as one batch on
one thread ("batch 1") and as one batch with the default thread count
("batch default": ``num_threads=-1``); first with nothing else running, then
with ``--hogs`` processes spinning on the CPU (default: one per core).  The
default must never be slower than "single".

    python eval/bench_threads.py ../shared/data/pypi-paraphrase-minilm-l3-384-raw-dot.hdf5
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from ipq_index.cli import set_thread_environment

set_thread_environment()

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import ipq_index  # noqa: E402

SPECS = ("PCA,ASQ4n", "PCA,IVF256,ASQ4n")


def qps(fn, nq, repeats):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return nq / best


def measure(idx, Q, repeats):
    single = qps(lambda: [idx.search(Q[i:i + 1], 10, num_threads=1) for i in range(len(Q))], len(Q), repeats)
    batch1 = qps(lambda: idx.search(Q, 10, num_threads=1), len(Q), repeats)
    batch = qps(lambda: idx.search(Q, 10), len(Q), repeats)
    return single, batch1, batch


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--hogs", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    with h5py.File(args.data, "r") as f:
        X = np.asarray(f["train"], np.float32)
        Q = np.asarray(f["test"][:args.queries], np.float32)
    print(f"ipq_index {ipq_index.__version__} from {os.path.dirname(ipq_index.__file__)}; "
          f"default threads {ipq_index.get_num_threads()}; {os.cpu_count()} cores; {len(Q)} queries")
    indexes = {s: ipq_index.index_factory(X.shape[1], s).train(X).add(X).warmup() for s in SPECS}
    for state in ("idle", "busy"):
        hogs = []
        if state == "busy":
            hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hogs)]
            time.sleep(1.0)
        try:
            for spec, idx in indexes.items():
                s, b1, b = measure(idx, Q, args.repeats)
                print(f"{state:<5} {spec:<18} single {s:8.0f}  batch 1 thread {b1:8.0f}  batch default {b:8.0f}"
                      f"  default / single {b / s:5.2f}x", flush=True)
        finally:
            for h in hogs:
                h.kill()
                h.wait()


if __name__ == "__main__":
    main()
