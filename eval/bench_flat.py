"""Flat (exhaustive-scan) MIPS benchmark: ipq_index codecs vs FAISS baselines.

A thin command-line wrapper over :mod:`ipq_index.bench.runner` (which documents the
measurements: compile and build time, recall@k, single-thread and batch QPS, file
and RAM bytes per vector, relative inner-product error).  ``ipq bench --config configs/NAME.yaml``
runs the same measurements from a YAML config with query-argument sweeps.

FAISS specs may use ``{d}`` and ``{d/2}``; specs containing ``RFlat``/``Refine``
get ``k_factor_rf = --k-factor`` (default 4).  Datasets with metric ``angular``
are L2-normalised first; ``euclidean`` is rejected.  A method that fails is
reported on stderr and skipped (``--strict`` re-raises).

With ``--train-queries N``, N rows are drawn (``default_rng(--seed + 1)``) from the
train set and *held out of the database* (ground truth is recomputed without them);
they are passed as ``index.train(X, queries=held_out)``.

    python eval/bench_flat.py                                   # sample:minilm, defaults
    python eval/bench_flat.py --data sample:glove50 --plot
    python eval/bench_flat.py --data /path/x.hdf5 --n-train 20000 --n-test 500
    python eval/bench_flat.py --faiss Flat SQ4 --ipq            # FAISS only
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ipq_index.cli import set_thread_environment

# the ``ipq`` command's thread settings (OMP_WAIT_POLICY=PASSIVE: FAISS' idle OpenMP
# threads otherwise spin and distort every timing on shared / few cores); before faiss loads
set_thread_environment()

from ipq_index.bench import runner  # noqa: E402
from ipq_index.bench.config import MethodConfig  # noqa: E402

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

# re-exported for scripts that imported them from here
Result = runner.Result
COLUMNS = runner.COLUMNS
expand_spec = runner.expand_spec
recall_at_k = runner.recall_at_k
rel_ip_error = runner.rel_ip_error
print_table = runner.print_table
write_csv = runner.write_csv
plot = runner.plot


def methods_from_args(args) -> list[MethodConfig]:
    methods = []
    for spec in args.faiss:
        refine = "RFlat" in spec or "Refine" in spec
        methods.append(MethodConfig("faiss", spec, spec, {"k_factor_rf": args.k_factor} if refine else {}))
    for spec in args.ipq:
        methods.append(MethodConfig("ipq", spec, spec))
    return methods


def main(argv=None) -> list[runner.Result]:
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
    ap.add_argument("--no-warmup", action="store_true",
                    help="do not compile ipq kernels before the timed build (compilation then counts in build_s)")
    ap.add_argument("--out", type=Path, default=None, help="CSV path (default eval/results/flat_<dataset>.csv)")
    ap.add_argument("--plot", type=Path, nargs="?", const=Path("auto"), default=None, metavar="PNG",
                    help="write a recall-vs-QPS plot (flag alone: eval/results/flat_<dataset>.png)")
    ap.add_argument("--strict", action="store_true", help="re-raise method failures instead of skipping")
    args = ap.parse_args(argv)

    try:
        ds, held = runner.prepare_dataset(args.data, n_train=args.n_train, n_test=args.n_test,
                                         seed=args.seed, train_queries=args.train_queries)
        gt = runner.ground_truth_ids(ds, args.k)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"{args.data}: {e}") from None
    threads = args.threads or runner.available_threads()
    print(f"dataset {ds.name}: {ds.n_train} x {ds.d} train, {ds.n_test} queries, metric {ds.metric}, "
          f"k={args.k}, threads={threads}" + (f", {len(held)} held-out train queries" if held is not None else ""))
    if ds.provenance:
        print(f"  provenance: {ds.provenance[:200]}")

    try:
        results = runner.run_methods(methods_from_args(args), ds, gt, k=args.k, threads=threads,
                                    repeats=args.repeats, held=held, warmup=not args.no_warmup,
                                    strict=args.strict)
    except ValueError as e:
        if args.strict:
            raise
        raise SystemExit(str(e)) from None

    print()
    runner.print_table(results, args.k)
    out = args.out or RESULTS / f"flat_{runner.safe_name(ds.name)}.csv"
    runner.write_csv(results, out)
    print(f"\nwrote {out}")
    if args.plot is not None:
        png = RESULTS / f"flat_{runner.safe_name(ds.name)}.png" if str(args.plot) == "auto" else args.plot
        title = f"{ds.name}: {ds.n_train} x {ds.d}, {ds.n_test} queries (flat scan)"
        if runner.plot(results, png, title, args.k):
            print(f"wrote {png}")
        else:
            print("matplotlib is not installed: no plot (pip install 'ipq_index[bench]')")
    return results


if __name__ == "__main__":
    main()
