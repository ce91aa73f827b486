"""A/B search speed of two versions of ipq_index on the same saved indexes.

Each version is a directory holding an ``ipq_index`` package (e.g. ``git
archive REV ipq_index | tar -x -C DIR``).  The indexes are built once by the
first version (``--build``: MiniLM raw, npm and GloVe from ``--data``, flat,
IVF and graph specs) and saved; then the versions run in turn, ``--rounds``
times, each in a fresh process: every index, a few parameter sets, the test
queries one at a time (single), as one batch on one thread (batch1) and on
two (batch2), best of three.  Prints each run's QPS and recall, then the
new/old median ratios (these machines are noisy: compare medians of
alternated runs, never one run).

    python eval/ab_search.py --old /tmp/old --new /tmp/new --data ../shared/data --work /tmp/ab --build
"""

from __future__ import annotations

import argparse
import glob
import os
import subprocess
import sys

import numpy as np

SETS = {"minilm": "pypi-paraphrase-minilm-l3-384-raw-dot.hdf5", "npm": "npm-minilm-l6-384-normed-dot.hdf5",
        "glove": "glove-6b-50-raw-dot.hdf5"}
SPECS = {"minilm": ["PCA,ASQ4", "PCA,IVF256,ASQ4,Rerank2", "PCA,HNSW32,ASQ6"], "npm": ["PCA,ASQ4"],
         "glove": ["PCA,ASQ4s", "PCA,IVF1024,ASQ4s,Rerank4", "PCA,HNSW32,ASQ6s"]}
PARAMS = {"flat": [{}, {"fs": 0}], "ivf": [{}, {"nprobe": 64}, {"fs": 0, "nprobe": 8}],
          "hnsw": [{}, {"ef": 256}, {"nav": "full", "ef": 64}]}

_BUILD = """
import sys, h5py, numpy as np, ipq_index
data, work, name, spec = sys.argv[1:5]
with h5py.File(data, "r") as h:
    X = np.asarray(h["train"], np.float32)
ipq_index.index_factory(X.shape[1], spec).train(X).add(X).save(work)
"""

_MEASURE = """
import sys, time, h5py, numpy as np, ipq_index
path, data, nq, params = sys.argv[1], sys.argv[2], int(sys.argv[3]), eval(sys.argv[4])
with h5py.File(data, "r") as h:
    Q = np.asarray(h["test"][:nq], np.float32)
    gt = np.asarray(h["neighbors"][:nq, :10])
idx = ipq_index.load(path, mmap=False).warmup()
for p in params[idx.kind]:
    t1 = tb = t2 = np.inf
    for _ in range(3):
        t = time.perf_counter(); I = np.concatenate([idx.search(Q[i:i + 1], 10, num_threads=1, **p)[1] for i in range(nq)]); t1 = min(t1, time.perf_counter() - t)
        t = time.perf_counter(); idx.search(Q, 10, num_threads=1, **p); tb = min(tb, time.perf_counter() - t)
        t = time.perf_counter(); idx.search(Q, 10, num_threads=2, **p); t2 = min(t2, time.perf_counter() - t)
    rec = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I, gt)])
    print(f"{p}|{rec:.4f}|{nq / t1:.0f}|{nq / tb:.0f}|{nq / t2:.0f}", flush=True)
"""


def run(code, script, *args):
    """``script`` in a fresh interpreter importing ``ipq_index`` from ``code``
    alone: started in ``code`` itself, since ``python -c`` puts the working
    directory ahead of PYTHONPATH (run from a checkout, both versions would
    import the checkout's package)."""
    env = dict(os.environ, PYTHONPATH=code, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                         cwd=code)
    if res.returncode:
        raise SystemExit(res.stderr[-2000:])
    return res.stdout


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--data", required=True, help="directory of the HDF5 files")
    ap.add_argument("--work", required=True, help="directory of the saved indexes")
    ap.add_argument("--build", action="store_true", help="build the indexes (with --old) first")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300)
    a = ap.parse_args(argv)
    for key in ("old", "new", "data", "work"):  # the runs start in --old / --new
        setattr(a, key, os.path.abspath(getattr(a, key)))
    os.makedirs(a.work, exist_ok=True)
    if a.build:
        for name, f in SETS.items():
            for spec in SPECS[name]:
                run(a.old, _BUILD, os.path.join(a.data, f), os.path.join(a.work, f"{name}_{spec.replace(',', '_')}.ipq"),
                    name, spec)
    got = {"old": [], "new": []}
    for r in range(a.rounds):
        for which in ("new", "old"):
            rows = {}
            for path in sorted(glob.glob(os.path.join(a.work, "*.ipq"))):
                name = os.path.basename(path).split("_")[0]
                out = run(getattr(a, which), _MEASURE, path, os.path.join(a.data, SETS[name]), a.queries, repr(PARAMS))
                for line in out.splitlines():
                    p, rec, *qps = line.split("|")
                    key = (os.path.basename(path)[:-4], p)
                    rows[key] = (float(rec), *map(float, qps))
                    print(f"round {r} {which:3s} {key[0]:32s} {p:26s} recall {rec} single {qps[0]:>6s} "
                          f"batch1 {qps[1]:>6s} batch2 {qps[2]:>6s}", flush=True)
            got[which].append(rows)
    print("\nmedian QPS ratio new/old (single, batch1, batch2), recall new / old")
    for key in got["old"][0]:
        old = np.median([g[key][1:] for g in got["old"]], axis=0)
        new = np.median([g[key][1:] for g in got["new"]], axis=0)
        ratio = " ".join(f"{x:.2f}" for x in new / old)
        print(f"{key[0]:32s} {key[1]:26s} {ratio}   recall {got['new'][0][key][0]:.4f} / {got['old'][0][key][0]:.4f}")


if __name__ == "__main__":
    main()
