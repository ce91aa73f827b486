"""Sharded build and search on Dask against the single-node index, same run.

For each corpus size n: synthetic clustered data (d=384 by default; a
seeded Gaussian mixture with per-cluster axis scales, the shape of
eval/make_synthetic.py's corpora, generated here so no source file is
needed), written as .npy files of 50,000 rows.  One encoder is trained on the
client and shared by every configuration:

- single node, in this process: ``add`` of the NumPy rows with 1 and 2
  threads; batch search of all queries with 1 and 2 threads; single-query
  latency (one query per call, 1 thread);
- ``LocalCluster`` of 1 worker x 1 thread holding 1 shard, and of 2 workers
  x 1 thread holding 2 shards: ``add`` of the file list (read by the
  workers), the same batch search and single-query latency.

Prints build time, batch QPS, single-query latency (median and p90) and
recall@k against the exact inner-product top-k, Dask's own round trip (a
call to every worker's search actor that searches nothing: the floor of a
sharded query's latency on this host), then the ratios the issue
sets targets for (2 workers / 1 worker: build >= 1.6x, batch search >= 1.5x;
single-query overhead over the single node <= 2 ms).

    python eval/bench_distributed.py --n 100000 1000000 \\
        --out eval/results/distributed_build_search_1e5_1e6.txt
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import redirect_stdout

import numpy as np

import ipq_index

ROWS_PER_FILE = 50_000


def make_data(n, nq, d, seed, components=256):
    """Corpus and queries from one Gaussian mixture (component means, per-axis
    scales and weights drawn from ``seed``)."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((components, d)).astype(np.float32) * 0.6
    scales = (rng.uniform(0.2, 1.0, (components, d)) * np.linspace(1.5, 0.3, d)).astype(np.float32)
    weights = rng.dirichlet(np.full(components, 2.0))

    def draw(m):
        out = np.empty((m, d), np.float32)
        for s in range(0, m, 100_000):
            e = min(m, s + 100_000)
            c = rng.choice(components, e - s, p=weights)
            out[s:e] = means[c] + rng.standard_normal((e - s, d)).astype(np.float32) * scales[c]
        return out

    return draw(n), draw(nq)


def exact_topk(X, Q, k):
    best_s = np.full((len(Q), k), -np.inf, np.float32)
    best_i = np.zeros((len(Q), k), np.int64)
    for s in range(0, len(X), 200_000):
        S = Q @ X[s:s + 200_000].T
        part = np.argpartition(-S, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(S, part, 1)], axis=1)
        cand_i = np.concatenate([best_i, part + s], axis=1)
        o = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, o, 1), np.take_along_axis(cand_i, o, 1)
    return best_i


def recall(ids, truth):
    k = truth.shape[1]
    return float(np.mean([len(set(a[:k]) & set(b)) / k for a, b in zip(ids, truth)]))


def timed(fn, reps=1):
    """(median seconds, last result) of ``reps`` calls."""
    times, out = [], None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def latency(search, Q, n):
    """Median and p90 milliseconds of one-query searches over the first n queries."""
    for q in Q[:5]:
        search(q[None])
    ts = []
    for q in Q[:n]:
        t = time.perf_counter()
        search(q[None])
        ts.append(time.perf_counter() - t)
    return 1e3 * float(np.median(ts)), 1e3 * float(np.percentile(ts, 90))


def run_size(n, args, workdir):
    d, k = args.d, args.k
    params = dict(args.params)
    row = {}
    t = time.perf_counter()
    X, Q = make_data(n, args.queries, d, args.seed)
    files = []
    for i, s in enumerate(range(0, n, ROWS_PER_FILE)):
        files.append(os.path.join(workdir, f"x{n}_{i:04d}.npy"))
        np.save(files[-1], X[s:s + ROWS_PER_FILE])
    truth = exact_topk(X, Q, k)
    print(f"\n## n = {n:,} x {d}: data, files and exact top-{k} in {time.perf_counter() - t:.1f} s; "
          f"spec {args.spec}, search {params}", flush=True)

    t = time.perf_counter()
    trained = ipq_index.index_factory(d, args.spec)
    trained.train(X)
    print(f"train (client, once for all configurations): {time.perf_counter() - t:.1f} s", flush=True)
    trained_bytes = _bytes(trained)

    # -- single node ----------------------------------------------------------------
    warm = _from_bytes(trained_bytes)  # kernels compiled / loaded outside the timings
    warm.add(X[:ROWS_PER_FILE])
    warm.warmup()
    del warm
    for nt in (1, 2):
        idx = _from_bytes(trained_bytes)
        row[f"single_build_{nt}t"], _ = timed(lambda: idx.add(X, num_threads=nt))
    idx.warmup()
    row["stored_bpv"] = idx.stored_nbytes / idx.ntotal
    row["ram_bpv"] = idx.nbytes / idx.ntotal
    for nt in (1, 2):
        row[f"single_batch_{nt}t"], (_, ids) = timed(lambda: idx.search(Q, k, num_threads=nt, **params), args.reps)
    row["single_recall"] = recall(ids, truth)
    row["single_lat"] = latency(lambda q: idx.search(q, k, num_threads=1, **params), Q, args.latency_queries)
    del idx

    # -- clusters ---------------------------------------------------------------------
    from distributed import Client, LocalCluster

    from ipq_index.distributed import ShardedIndex

    for workers in (1, 2):
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                          worker_dashboard_address=None) as cluster, Client(cluster) as client:
            # workers load the compiled kernels from the disk cache once, outside the timings
            warm = ShardedIndex.from_trained(_from_bytes(trained_bytes), workers, client)
            warm.add(files[:1])
            warm.search(Q[:20], k, **params)
            warm.close()
            sh = ShardedIndex.from_trained(_from_bytes(trained_bytes), workers, client)
            row[f"w{workers}_build"], _ = timed(lambda: sh.add(files))
            sh.warmup()
            row[f"w{workers}_batch"], (_, ids) = timed(lambda: sh.search(Q, k, **params), args.reps)
            row[f"w{workers}_recall"] = recall(ids, truth)
            row[f"w{workers}_lat"] = latency(lambda q: sh.search(q, k, **params), Q, args.latency_queries)
            row[f"w{workers}_floor"] = latency(lambda q: round_trip(sh, q), Q, args.latency_queries)
            sh.direct_search = False
            row[f"w{workers}_lat_tasks"] = latency(lambda q: sh.search(q, k, **params), Q, args.latency_queries // 4)
            sh.close()
    for f in files:
        os.unlink(f)
    _report(n, args, row)
    return row


def round_trip(sh, q):
    """One call to every worker's search actor that searches nothing: the
    same path as a search (``ShardedIndex._ask_actors``), what Dask's
    messaging alone costs per query."""
    return sh._ask_actors({w: [] for w in set(sh._where) if w is not None}, q, {}, 1)


def _bytes(index):
    from ipq_index.distributed._worker import index_bytes

    return index_bytes(index)


def _from_bytes(data):
    from ipq_index.distributed._worker import index_from_bytes

    return index_from_bytes(data)


def _report(n, args, r):
    nq = args.queries
    print(f"{'configuration':<34} {'build s':>8} {'build vec/s':>12} {'batch QPS':>10} {'1-query ms (p50/p90)':>21} "
          f"{'recall@' + str(args.k):>9}")
    lines = [("single node, 1 thread", r["single_build_1t"], r["single_batch_1t"], r["single_lat"], r["single_recall"]),
             ("single node, 2 threads", r["single_build_2t"], r["single_batch_2t"], None, r["single_recall"]),
             ("Dask 1 worker x 1 thread, 1 shard", r["w1_build"], r["w1_batch"], r["w1_lat"], r["w1_recall"]),
             ("Dask 2 workers x 1 thread, 2 shards", r["w2_build"], r["w2_batch"], r["w2_lat"], r["w2_recall"])]
    for name, b, s, lat, rec in lines:
        lat_s = f"{lat[0]:.2f} / {lat[1]:.2f}" if lat else "-"
        print(f"{name:<34} {b:>8.2f} {n / b:>12,.0f} {nq / s:>10,.0f} {lat_s:>21} {rec:>9.4f}")
    print(f"Dask round trip to every worker's actor, searching nothing (p50/p90): 1 worker "
          f"{r['w1_floor'][0]:.2f} / {r['w1_floor'][1]:.2f} ms, 2 workers {r['w2_floor'][0]:.2f} / {r['w2_floor'][1]:.2f} ms")
    print(f"single-query latency through scheduler tasks only (direct_search=False): 1 worker "
          f"{r['w1_lat_tasks'][0]:.2f} ms, 2 workers {r['w2_lat_tasks'][0]:.2f} ms (p50)")
    print(f"bytes/vector: file {r['stored_bpv']:.0f}, RAM {r['ram_bpv']:.0f} (single node; a shard holds the same per vector)")
    print("ratios:")
    print(f"  build, 2 workers / 1 worker:            {r['w1_build'] / r['w2_build']:.2f}x  (target >= 1.6x)")
    print(f"  batch search, 2 workers / 1 worker:     {r['w1_batch'] / r['w2_batch']:.2f}x  (target >= 1.5x)")
    print(f"  single-query overhead, 2 workers vs single node (p50): {r['w2_lat'][0] - r['single_lat'][0]:+.2f} ms  "
          f"(target <= 2 ms); 1 worker: {r['w1_lat'][0] - r['single_lat'][0]:+.2f} ms; "
          f"above the round trip: {r['w2_lat'][0] - r['w2_floor'][0]:+.2f} / {r['w1_lat'][0] - r['w1_floor'][0]:+.2f} ms")
    print(f"  build, 1 worker / single node 1 thread: {r['single_build_1t'] / r['w1_build']:.2f}x;  "
          f"2 workers / single node 2 threads: {r['single_build_2t'] / r['w2_build']:.2f}x")
    print(f"  batch search, 1 worker / single node 1 thread: {r['single_batch_1t'] / r['w1_batch']:.2f}x;  "
          f"2 workers / single node 2 threads: {r['single_batch_2t'] / r['w2_batch']:.2f}x", flush=True)


def _machine():
    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return f"{os.cpu_count()} cores ({cpu}), load average at start {load}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--d", type=int, default=384)
    ap.add_argument("--spec", default="PCA,IVF1024,ASQ4,Rerank2")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=INT",
                    help="search parameter (default nprobe=44 fs=10 rerank=2 for IVF specs)")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--latency-queries", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the output here")
    args = ap.parse_args(argv)
    if args.param:
        args.params = [(kv.split("=", 1)[0], int(kv.split("=", 1)[1])) for kv in args.param]
    else:
        args.params = [("nprobe", 44), ("fs", 10), ("rerank", 2)] if "IVF" in args.spec else []
    buf = io.StringIO()

    class Tee(io.TextIOBase):
        def write(self, s):
            sys.__stdout__.write(s)
            buf.write(s)
            return len(s)

        def flush(self):
            sys.__stdout__.flush()

    import dask

    with redirect_stdout(Tee()):
        print(f"# bench_distributed, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
        print(f"# command: python {' '.join(sys.argv)}")
        print(f"# machine: {_machine()}; shared with other developers' jobs")
        print(f"# python {platform.python_version()}, numpy {np.__version__}, dask {dask.__version__}, "
              f"ipq_index {ipq_index.__version__}")
        ipq_index.set_num_threads(2)
        workdir = tempfile.mkdtemp(prefix="ipq_bench_dist_")
        try:
            for n in args.n:
                run_size(n, args, workdir)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
