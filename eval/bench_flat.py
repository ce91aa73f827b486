"""Flat (exhaustive-scan) MIPS benchmark: ipq_index codecs vs FAISS baselines.

An ann-benchmarks-style harness.  For every method, in one process, it measures

* ``build_s``          train + add wall time (``time.perf_counter``), all threads;
* ``recall_at_k``      fraction of the true top-k ids found in the returned top-k
                       (ground truth = the dataset's ``neighbors``, exact inner product);
* ``qps_single``       one query per call, single thread (``faiss.omp_set_num_threads(1)``
                       / ``num_threads=1``); the whole loop over the queries is timed,
                       best of ``--repeats`` (default 2) runs;
* ``qps_batch``        all queries in one call with ``--threads`` threads, best of
                       ``--repeats`` runs;
* ``bytes_per_vector`` FAISS: ``sa_code_size()`` (the per-vector code; for ``RFlat``
                       this includes the refine store), falling back to
                       ``serialize_index(index).nbytes / ntotal``; ipq:
                       ``index.nbytes / len(index)``;
* ``rel_ip_error``     mean over queries of  sum_n (s_hat - s)^2 / sum_n s^2  over the
                       returned top-k, where s_hat is the score the method returned
                       and s the exact inner product of the query with that id
                       (0 for exact scorers such as Flat or a Flat re-rank).

FAISS indexes are built with ``faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)``;
``{d}`` and ``{d/2}`` in a spec are replaced by the dimension and half of it, and
specs containing ``RFlat``/``Refine`` get ``k_factor_rf = --k-factor`` (default 4).
Datasets with metric ``angular`` are L2-normalised first; ``euclidean`` is rejected.
A method that fails is reported on stderr and skipped (``--strict`` re-raises).
Before each ipq build a throw-away index is built and searched on a small slice,
so numba compilation / cache loading is not charged to the measured method.

Sample queries for ipq training: by default ``index.train(X, queries=None)``.
With ``--train-queries N``, N rows are drawn (``default_rng(--seed + 1)``) from the
train set and *held out of the database* (ground truth is recomputed without them);
they are passed as ``index.train(X, queries=held_out)``, i.e. query-like vectors
that never appear among the test queries or the database.

    python eval/bench_flat.py                                   # sample:minilm, defaults
    python eval/bench_flat.py --data sample:glove50 --plot
    python eval/bench_flat.py --data /path/x.hdf5 --n-train 20000 --n-test 500
    python eval/bench_flat.py --faiss Flat SQ4 --ipq            # FAISS only
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import re
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ipq_index.datasets import Dataset, ground_truth, load, subsample

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_IPQ = ["PCA,ASQ4", "PCA,ASQ4,Rerank4"]
DEFAULT_FAISS = [
    "Flat",
    "SQ4",
    "SQ8",
    "EDEN4",
    "RaBitQ4",
    "PQ{d}x4fs",
    "PQ{d}x4fs,RFlat",
    "PQ{d/2}x4fs",
]
COLUMNS = [
    "dataset",
    "method",
    "library",
    "build_s",
    "recall_at_k",
    "qps_single",
    "qps_batch",
    "bytes_per_vector",
    "rel_ip_error",
    "n_train",
    "n_test",
    "k",
]


@dataclass
class Result:
    dataset: str
    method: str
    library: str
    build_s: float
    recall_at_k: float
    qps_single: float
    qps_batch: float
    bytes_per_vector: float
    rel_ip_error: float
    n_train: int
    n_test: int
    k: int


# --------------------------------------------------------------------------- metrics


def expand_spec(spec: str, d: int) -> str:
    """Substitute ``{d}`` and ``{d/2}`` (integer half) in a factory string."""
    out = spec.replace("{d/2}", str(d // 2)).replace("{d}", str(d))
    if re.search(r"[{}]", out):
        raise ValueError(f"unknown placeholder in spec {spec!r} (only {{d}} and {{d/2}})")
    return out


def recall_at_k(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k ids present in the returned top-k."""
    ids = ids[:, :k]
    gt = gt[:, :k]
    hits = (ids[:, :, None] == gt[:, None, :]).any(axis=2) & (ids >= 0)
    return float(hits.sum() / (gt.shape[0] * k))


def rel_ip_error(Q: np.ndarray, X: np.ndarray, ids: np.ndarray, scores: np.ndarray) -> float:
    """Mean over queries of sum (s_hat - s)^2 / sum s^2 over the returned (valid) ids."""
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    exact = np.einsum("qd,qkd->qk", Q.astype(np.float64), X[safe].astype(np.float64))
    err = np.where(valid, (scores.astype(np.float64) - exact) ** 2, 0.0).sum(axis=1)
    ref = np.where(valid, exact**2, 0.0).sum(axis=1)
    ok = ref > 0
    return float(np.mean(err[ok] / ref[ok])) if ok.any() else float("nan")


def best_time(fn, repeats: int) -> float:
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- runners


def _faiss_bytes_per_vector(index) -> float:
    import faiss

    try:
        n = faiss.downcast_index(index).sa_code_size()
        if n > 0:
            return float(n)
    except Exception:  # noqa: BLE001 - not every index implements sa_code_size
        pass
    return float(faiss.serialize_index(index).nbytes / max(1, index.ntotal))


def run_faiss(spec: str, ds: Dataset, gt: np.ndarray, k: int, threads: int, repeats: int, k_factor: int) -> Result:
    import faiss

    X, Q = ds.train, ds.test
    faiss.omp_set_num_threads(threads)
    index = faiss.index_factory(ds.d, spec, faiss.METRIC_INNER_PRODUCT)
    if "RFlat" in spec or "Refine" in spec:
        faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", k_factor)
    t0 = time.perf_counter()
    index.train(X)
    index.add(X)
    build_s = time.perf_counter() - t0

    index.search(Q[: min(8, len(Q))], k)  # warm-up
    out = {}

    def batch():
        out["D"], out["I"] = index.search(Q, k)

    t_batch = best_time(batch, repeats)
    D, I = out["D"], out["I"]

    def single():
        for i in range(len(Q)):
            index.search(Q[i : i + 1], k)

    faiss.omp_set_num_threads(1)
    try:
        t_single = best_time(single, repeats)
    finally:
        faiss.omp_set_num_threads(threads)
    return Result(
        dataset=ds.name,
        method=spec,
        library="faiss",
        build_s=build_s,
        recall_at_k=recall_at_k(I, gt, k),
        qps_single=len(Q) / t_single,
        qps_batch=len(Q) / t_batch,
        bytes_per_vector=_faiss_bytes_per_vector(index),
        rel_ip_error=rel_ip_error(Q, X, I, D),
        n_train=ds.n_train,
        n_test=ds.n_test,
        k=k,
    )


def _ipq_build(factory, spec, X, queries):
    index = factory(X.shape[1], spec)
    index.train(X, queries=queries)
    index.add(X)
    return index


def run_ipq(
    factory, spec: str, ds: Dataset, gt: np.ndarray, k: int, threads: int, repeats: int,
    train_queries: np.ndarray | None, warmup: bool,
) -> Result:
    X, Q = ds.train, ds.test
    if warmup:  # compile / load numba kernels outside the measurement
        try:
            n = min(len(X), 2048)
            tq = None if train_queries is None else train_queries[: min(len(train_queries), 64)]
            w = _ipq_build(factory, spec, X[:n], tq)
            kw = min(k, n)
            w.search(Q[:1], kw, num_threads=1)
            w.search(Q[: min(len(Q), 16)], kw, num_threads=threads)
            del w
        except Exception as e:  # noqa: BLE001 - the real build reports real errors
            print(f"  (warm-up of ipq {spec!r} failed: {type(e).__name__}: {e})", file=sys.stderr)

    t0 = time.perf_counter()
    index = _ipq_build(factory, spec, X, train_queries)
    build_s = time.perf_counter() - t0

    index.search(Q[: min(8, len(Q))], k, num_threads=threads)  # warm-up
    out = {}

    def batch():
        out["D"], out["I"] = index.search(Q, k, num_threads=threads)

    t_batch = best_time(batch, repeats)
    D = np.asarray(out["D"], dtype=np.float32)
    I = np.asarray(out["I"], dtype=np.int64)

    def single():
        for i in range(len(Q)):
            index.search(Q[i : i + 1], k, num_threads=1)

    t_single = best_time(single, repeats)
    return Result(
        dataset=ds.name,
        method=spec,
        library="ipq",
        build_s=build_s,
        recall_at_k=recall_at_k(I, gt, k),
        qps_single=len(Q) / t_single,
        qps_batch=len(Q) / t_batch,
        bytes_per_vector=float(index.nbytes) / max(1, len(index)),
        rel_ip_error=rel_ip_error(Q, X, I, D),
        n_train=ds.n_train,
        n_test=ds.n_test,
        k=k,
    )


# --------------------------------------------------------------------------- data


def prepare(args) -> tuple[Dataset, np.ndarray | None]:
    ds = load(args.data)
    if ds.metric == "euclidean":
        raise SystemExit(f"{args.data}: metric 'euclidean' is not a MIPS problem; use a dot/angular dataset")
    if ds.metric == "angular":
        def unit(A):
            n = np.linalg.norm(A, axis=1, keepdims=True)
            n[n == 0] = 1
            return np.ascontiguousarray(A / n, dtype=np.float32)
        ds = Dataset(ds.name, unit(ds.train), unit(ds.test), ds.neighbors, ds.distances, "dot", ds.provenance)

    held = None
    if args.train_queries:
        n_held = int(args.train_queries)
        if n_held >= ds.n_train:
            raise SystemExit(f"--train-queries {n_held} leaves no database rows (train has {ds.n_train})")
        perm = np.random.default_rng(args.seed + 1).permutation(ds.n_train)
        held = np.ascontiguousarray(ds.train[perm[:n_held]])
        keep = np.sort(perm[n_held:])
        ds = Dataset(f"{ds.name}_tq{n_held}", np.ascontiguousarray(ds.train[keep]), ds.test,
                     None, None, ds.metric, ds.provenance)

    if args.n_train is not None or args.n_test is not None or held is not None:
        ds = subsample(ds, args.n_train, args.n_test, seed=args.seed)
    return ds, held


# --------------------------------------------------------------------------- output


def _fmt(v, spec):
    return "nan" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def print_table(results: list[Result], k: int) -> None:
    head = f"{'library':<6} {'method':<24} {'build_s':>8} {'recall@' + str(k):>9} {'qps_1t':>9} " \
           f"{'qps_batch':>10} {'B/vec':>8} {'rel_ip_err':>10}"
    print(head)
    print("-" * len(head))
    for r in results:
        print(
            f"{r.library:<6} {r.method:<24} {_fmt(r.build_s, '8.3f')} {_fmt(r.recall_at_k, '9.4f')} "
            f"{_fmt(r.qps_single, '9.0f')} {_fmt(r.qps_batch, '10.0f')} {_fmt(r.bytes_per_vector, '8.1f')} "
            f"{_fmt(r.rel_ip_error, '10.2e')}"
        )


def write_csv(results: list[Result], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            row = asdict(r)
            w.writerow({c: (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in COLUMNS})


def plot(results: list[Result], path: Path, title: str, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = "os^Dv<>pP*Xhd8H"
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, r in enumerate(results):
        color = "tab:red" if r.library == "ipq" else f"C{i % 10 if i % 10 != 3 else 9}"
        ax.scatter(r.recall_at_k, r.qps_single, marker=markers[i % len(markers)], s=60,
                   color=color, label=f"{r.library}: {r.method} ({r.bytes_per_vector:.0f} B)")
    ax.set_yscale("log")
    ax.set_xlabel(f"recall@{k}")
    ax.set_ylabel("queries per second (1 thread, 1 query per call)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def main(argv=None) -> list[Result]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="sample:minilm",
                    help="ann-benchmarks HDF5 path, or sample:minilm / sample:glove50 (default %(default)s)")
    ap.add_argument("--n-train", type=int, default=None, help="subsample the database to N rows (GT recomputed)")
    ap.add_argument("--n-test", type=int, default=None, help="subsample the queries to N rows (GT recomputed)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the subsampling (default %(default)s)")
    ap.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    ap.add_argument("--ipq", nargs="*", default=DEFAULT_IPQ, metavar="SPEC",
                    help="ipq_index factory strings; give the flag alone to skip ipq (default: %(default)s)")
    ap.add_argument("--faiss", nargs="*", default=DEFAULT_FAISS, metavar="SPEC",
                    help="FAISS factory strings, {d} and {d/2} substituted; flag alone skips FAISS")
    ap.add_argument("--threads", type=int, default=None, help="threads for batch search and builds (default: all)")
    ap.add_argument("--repeats", type=int, default=2, help="timing runs, best kept (default %(default)s)")
    ap.add_argument("--k-factor", type=int, default=4, help="k_factor_rf for FAISS RFlat specs (default %(default)s)")
    ap.add_argument("--train-queries", type=int, default=0, metavar="N",
                    help="hold N train rows out of the database and pass them as ipq sample queries")
    ap.add_argument("--no-warmup", action="store_true", help="skip the throw-away ipq warm-up build")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default eval/results/flat_<dataset>.csv)")
    ap.add_argument("--plot", type=Path, nargs="?", const=Path("auto"), default=None, metavar="PNG",
                    help="write a recall-vs-QPS plot (flag alone: eval/results/flat_<dataset>.png)")
    ap.add_argument("--strict", action="store_true", help="re-raise method failures instead of skipping")
    args = ap.parse_args(argv)

    threads = args.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    ds, held = prepare(args)
    k = args.k
    if ds.neighbors is None or ds.neighbors.shape[1] < k:
        gt, _ = ground_truth(ds.train, ds.test, k, ds.metric)
    else:
        gt = ds.neighbors[:, :k]

    print(f"dataset {ds.name}: {ds.n_train} x {ds.d} train, {ds.n_test} queries, metric {ds.metric}, "
          f"k={k}, threads={threads}" + (f", {len(held)} held-out train queries" if held is not None else ""))
    if ds.provenance:
        print(f"  provenance: {ds.provenance[:200]}")

    results: list[Result] = []

    def attempt(label, fn):
        print(f"  running {label} ...", file=sys.stderr, flush=True)
        try:
            results.append(fn())
        except Exception as e:  # noqa: BLE001
            if args.strict:
                raise
            print(f"WARNING: {label} failed: {type(e).__name__}: {e}", file=sys.stderr)
            traceback.print_exc(limit=3, file=sys.stderr)

    for raw in args.faiss:
        try:
            spec = expand_spec(raw, ds.d)
        except ValueError as e:
            print(f"WARNING: {e}", file=sys.stderr)
            continue
        attempt(f"faiss {spec}", lambda spec=spec: run_faiss(spec, ds, gt, k, threads, args.repeats, args.k_factor))

    if args.ipq:
        factory = None
        try:
            import ipq_index

            factory = getattr(ipq_index, "index_factory", None)
            set_threads = getattr(ipq_index, "set_num_threads", None)
            if set_threads is not None:
                set_threads(threads)
        except Exception as e:  # noqa: BLE001
            print(f"WARNING: importing ipq_index failed: {type(e).__name__}: {e}", file=sys.stderr)
        if factory is None:
            print("WARNING: ipq_index.index_factory is not available; skipping the ipq methods "
                  f"{args.ipq}", file=sys.stderr)
        else:
            for spec in args.ipq:
                attempt(f"ipq {spec}", lambda spec=spec: run_ipq(
                    factory, spec, ds, gt, k, threads, args.repeats, held, not args.no_warmup))

    print()
    print_table(results, k)
    out = args.out or RESULTS / f"flat_{_safe(ds.name)}.csv"
    write_csv(results, out)
    print(f"\nwrote {out}")
    if args.plot is not None:
        png = RESULTS / f"flat_{_safe(ds.name)}.png" if str(args.plot) == "auto" else args.plot
        plot(results, png, f"{ds.name}: {ds.n_train} x {ds.d}, {ds.n_test} queries (flat scan)", k)
        print(f"wrote {png}")
    return results


if __name__ == "__main__":
    main()
