"""ASQ solver benchmark: thread-CPU time of each method vs ``np.sort`` of the same array.

For every n, s and input distribution it times, single-threaded and
interleaved round-robin in one process (median over ``--repeats`` rounds):

* ``sort``         np.sort of the unsorted array (the baseline of every ratio);
* ``exact``        asq.solve(sorted x, s)                 (solver only, like QUIVER's timings);
* ``exact_e2e``    asq.solve(unsorted x, s)               (sort included);
* ``approx``       asq.solve(unsorted x, s, method="approx") end to end, no sort;
* ``max``          asq.solve(sorted x, s, objective="max");
* ``solve_all``    asq.solve_all(sorted x, s) (whole curve 2..s; s <= 64 only);

and the relative excess of ``approx`` over ``exact``.  Writes a CSV.

    python eval/bench_asq.py                       # full grid (several minutes)
    python eval/bench_asq.py --n 16 --s 4 8 --quick
    python eval/bench_asq.py --columns             # solve_columns vs np.sort(X, axis=0)
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import time
from pathlib import Path

import numba
import numpy as np

from ipq_index import asq

DISTS = ("normal", "lognormal", "exponential", "truncnormal", "bf16normal")


def make(dist: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dist == "normal":
        return rng.standard_normal(n)
    if dist == "lognormal":
        return rng.lognormal(size=n)
    if dist == "exponential":
        return rng.exponential(size=n)
    if dist == "truncnormal":  # standard normal truncated to [-2, 2]
        x = rng.standard_normal(int(n * 1.1) + 100)
        x = x[np.abs(x) <= 2]
        while x.size < n:
            y = rng.standard_normal(n)
            x = np.concatenate([x, y[np.abs(y) <= 2]])
        return x[:n].copy()
    if dist == "bf16normal":
        f = rng.standard_normal(n).astype(np.float32)
        return (f.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32).astype(np.float64)
    raise ValueError(dist)


def cpu(fn, *args, **kw):
    t = time.thread_time()
    out = fn(*args, **kw)
    return time.thread_time() - t, out


def bench_vectors(ns, ss, dists, repeats, methods, out_rows):
    for n in ns:
        for dist in dists:
            x = make(dist, n, seed=n + len(dist))
            xs = np.sort(x)
            warm = x[:4096].copy()
            for s in ss:
                asq.solve(warm, s)
                asq.solve(warm, s, method="approx")
                asq.solve(warm, s, objective="max")
                times = {m: [] for m in ["sort", *methods]}
                results = {}
                for _ in range(repeats):
                    times["sort"].append(cpu(np.sort, x)[0])
                    for m in methods:
                        if m == "solve_all" and s > 64:
                            continue  # the full curve keeps an (s-3) x n table: capped at 64
                        if m == "exact":
                            t, results[m] = cpu(asq.solve, xs, s)
                        elif m == "exact_e2e":
                            t, _r = cpu(asq.solve, x, s)
                        elif m == "approx":
                            t, results[m] = cpu(asq.solve, x, s, method="approx")
                        elif m == "max":
                            t, _r = cpu(asq.solve, xs, s, objective="max")
                        elif m == "solve_all":
                            t, _r = cpu(asq.solve_all, xs, s, budgets=[s])
                        times[m].append(t)
                asq.release_workspace()
                med = {m: statistics.median(v) for m, v in times.items() if v}
                row = {"n": n, "log2n": int(np.log2(n)), "s": s, "dist": dist}
                for m, v in med.items():
                    row[f"{m}_ms"] = round(v * 1e3, 3)
                    if m != "sort":
                        row[f"{m}_over_sort"] = round(v / med["sort"], 3)
                if "exact" in results and "approx" in results:
                    c_ex = asq.cost(x, results["exact"])
                    c_ap = asq.cost(x, results["approx"])
                    row["approx_rel_excess"] = (c_ap - c_ex) / c_ex if c_ex > 0 else 0.0
                    row["vnmse_exact"] = c_ex / float(np.dot(x, x))
                out_rows.append(row)
                print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                      flush=True)


def bench_columns(N, d, s, repeats, out_rows):
    rng = np.random.default_rng(0)
    # real-embedding-like columns: correlated Gaussian mixture with varying scales
    X = (rng.standard_normal((N, d)) * rng.uniform(0.2, 2.0, d)).astype(np.float32)
    X += (rng.standard_normal((N, 8)) @ rng.standard_normal((8, d)) * 0.3).astype(np.float32)
    asq.solve_columns(X[:3000, :8], s, method="approx")
    t_sort, t_cols = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        np.sort(X, axis=0)
        t_sort.append(time.perf_counter() - t)
        t = time.perf_counter()
        asq.solve_columns(X, s, method="approx", num_threads=-1)
        t_cols.append(time.perf_counter() - t)
    row = {"N": N, "d": d, "s": s, "threads": numba.get_num_threads(),
           "sort_axis0_ms": round(statistics.median(t_sort) * 1e3, 1),
           "solve_columns_approx_ms": round(statistics.median(t_cols) * 1e3, 1)}
    row["ratio"] = round(row["solve_columns_approx_ms"] / row["sort_axis0_ms"], 3)
    out_rows.append(row)
    print(row, flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[16, 20, 22], help="log2 of the sizes")
    ap.add_argument("--s", type=int, nargs="+", default=[4, 8, 16, 32, 64, 256])
    ap.add_argument("--dists", nargs="+", default=list(DISTS), choices=DISTS)
    ap.add_argument("--methods", nargs="+", default=["exact", "exact_e2e", "approx", "max", "solve_all"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one repeat")
    ap.add_argument("--columns", action="store_true", help="solve_columns benchmark (100000 x 384, s=16)")
    ap.add_argument("--out", default="eval/results/bench_asq.csv")
    args = ap.parse_args(argv)
    reps = 1 if args.quick else args.repeats
    rows = []
    if args.columns:
        bench_columns(100_000, 384, 16, reps, rows)
    else:
        numba.set_num_threads(1)
        bench_vectors([1 << k for k in args.n], args.s, args.dists, reps, args.methods, rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {out} ({len(rows)} rows); cpu count {os.cpu_count()}")


if __name__ == "__main__":
    main()
