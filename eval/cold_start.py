"""Cold start: CPU seconds of numba compilation a new user pays, per stage.

Builds an index of SPEC on the shipped 10k MiniLM sample (train + add), runs
one single-query search and one batch search, then saves, loads and searches
again, and prints the process CPU time of each stage and the kernels that
compiled the longest (numba compile events; nested compilations are counted
inside their callers too).  Run it with an empty numba cache, e.g.

    rm -rf /tmp/nc && NUMBA_CACHE_DIR=/tmp/nc python eval/cold_start.py "PCA,ASQ4"
"""

from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time

from numba.core import event


class _CompileTimes(event.Listener):
    def __init__(self):
        self.start = {}
        self.total = collections.Counter()

    def on_start(self, ev):
        self.start.setdefault(id(ev.data["dispatcher"]), []).append(time.process_time())

    def on_end(self, ev):
        d = ev.data["dispatcher"]
        name = f"{d.py_func.__module__.split('.')[-1]}.{d.py_func.__name__}"
        self.total[name] += time.process_time() - self.start[id(d)].pop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", nargs="?", default="PCA,ASQ4")
    ap.add_argument("--top", type=int, default=12, help="kernels to list")
    a = ap.parse_args(argv)
    times = _CompileTimes()
    event.register("numba:compile", times)
    t0 = time.process_time()
    import ipq_index
    from ipq_index.bench import datasets

    ds = datasets.load_sample("minilm")
    X, Q = ds.train, ds.test
    stages = [("import", time.process_time() - t0)]

    def stage(name, fn):
        t = time.process_time()
        fn()
        stages.append((name, time.process_time() - t))

    index = ipq_index.index_factory(X.shape[1], a.spec)
    stage("train + add", lambda: index.train(X).add(X))
    stage("one single-query search", lambda: index.search(Q[:1], 10))
    stage("one batch search", lambda: index.search(Q, 10))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "index.ipq")
        index.save(path)
        stage("load + search again", lambda: ipq_index.load(path).search(Q, 10))
    print(f"{a.spec} on the {X.shape[0]} x {X.shape[1]} sample, NUMBA_CACHE_DIR={os.environ.get('NUMBA_CACHE_DIR')}")
    for name, sec in stages:
        print(f"  {name:<26s} {sec:7.1f} s CPU")
    print(f"  {'total':<26s} {sum(s for _, s in stages):7.1f} s CPU")
    print("longest compilations (s CPU, callees included):")
    for name, sec in times.total.most_common(a.top):
        print(f"  {sec:6.1f}  {name}")


if __name__ == "__main__":
    main()
