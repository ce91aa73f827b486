"""Benchmark runner (``ipq bench``): measure methods on a MIPS dataset (query-argument
sweeps), Pareto fronts, CSV output, recall-vs-QPS plots.

Every method is driven through the ann-benchmarks wrapper contract
(:class:`ipq_index.bench.ann_benchmarks.module.IpqIndex` for ipq,
:class:`ipq_index.bench.baselines.FaissIndex` / :class:`~ipq_index.bench.baselines.HnswlibIndex` /
:class:`~ipq_index.bench.baselines.ScannIndex` for the baselines; ScaNN is optional and
skipped with a note when it does not import): ``fit`` once, then for every query-argument setting
``set_query_arguments``, ``batch_query`` and a loop of ``query``.  Measured per
(method, query setting) row:

* ``compile_s``        ipq: seconds of ``ipq_index.warmup(spec)``, called just before the
                       timed ``fit``: compiles (or loads from numba's cache) every kernel the
                       spec uses; NaN for libraries without JIT compilation and with
                       ``warmup: false`` (compilation then falls inside ``build_s``);
* ``build_s``          ``fit`` wall time (train + add + derived search structures,
                       ``time.perf_counter``), ``threads`` threads, compilation excluded;
* ``recall_at_k``      fraction of the true top-k ids found in the returned top-k
                       (ground truth: the dataset's exact inner-product ``neighbors``);
* ``qps_single``       one ``query`` call per query vector, one thread; the whole loop
                       is timed, best of ``repeats`` runs;
* ``qps_batch``        all queries in one ``batch_query`` call with ``threads`` threads,
                       best of ``repeats`` runs;
* ``file_bytes_per_vector``  what the saved index holds per vector.  ipq:
                       ``index.stored_nbytes / len(index)`` (codes, scales, ids, re-rank
                       copy, structure arrays: what ``save`` writes, model excluded);
* ``ram_bytes_per_vector``   what the index holds in memory per vector.  ipq:
                       ``index.nbytes / len(index)`` (the above plus derived search
                       structures such as the fast-scan coarse codes);
                       FAISS (both columns): the code plus the 8-byte id where FAISS stores
                       ids (IVF lists), see :func:`~ipq_index.bench.baselines.faiss_bytes_per_vector`;
                       hnswlib, ScaNN (both columns): estimates;
* ``rel_ip_error``     mean over queries of  sum (s_hat - s)^2 / sum s^2  over the returned
                       top-k, s_hat the returned score, s the exact inner product (0 for
                       exact scorers: Flat, a Flat re-rank, hnswlib).

Outputs: :func:`write_csv` (all rows), :func:`write_pareto_csv` (each library's
Pareto-optimal rows in recall and single-thread / batch QPS, :func:`pareto_front`)
and :func:`plot` (two panels, single-thread and batch, fronts highlighted).

Datasets with metric ``angular`` are L2-normalised first (then searched by inner
product); ``euclidean`` is rejected.
"""

from __future__ import annotations

import csv
import math
import os
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import BenchConfig, MethodConfig
from .datasets import Dataset, ground_truth, load, subsample
from .params import unit

__all__ = [
    "COLUMNS",
    "Result",
    "available_threads",
    "expand_spec",
    "recall_at_k",
    "rel_ip_error",
    "best_time",
    "prepare_dataset",
    "ground_truth_ids",
    "make_algorithm",
    "available_methods",
    "check_method",
    "measure",
    "run_methods",
    "run_config",
    "format_table",
    "print_table",
    "write_csv",
    "write_pareto_csv",
    "read_csv",
    "pareto_front",
    "pareto_rows",
    "best_qps_at_recall",
    "plot",
    "safe_name",
]

COLUMNS = [
    "dataset",
    "library",
    "method",
    "params",
    "compile_s",
    "build_s",
    "recall_at_k",
    "qps_single",
    "qps_batch",
    "file_bytes_per_vector",
    "ram_bytes_per_vector",
    "rel_ip_error",
    "n_train",
    "n_test",
    "k",
]


@dataclass
class Result:
    """One row: one method (one build) at one query setting."""

    dataset: str
    library: str
    method: str
    params: str
    compile_s: float
    build_s: float
    recall_at_k: float
    qps_single: float
    qps_batch: float
    file_bytes_per_vector: float
    ram_bytes_per_vector: float
    rel_ip_error: float
    n_train: int
    n_test: int
    k: int


def available_threads() -> int:
    """Cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- metrics


def expand_spec(spec: str, d: int) -> str:
    """Substitute ``{d}`` and ``{d/2}`` (integer half) in a factory string."""
    out = spec.replace("{d/2}", str(d // 2)).replace("{d}", str(d))
    if re.search(r"[{}]", out):
        raise ValueError(f"unknown placeholder in spec {spec!r} (only {{d}} and {{d/2}})")
    return out


def recall_at_k(ids: np.ndarray, gt: np.ndarray, k: int) -> float:
    """Mean fraction of the true top-k ids present in the returned top-k (-1 never counts)."""
    ids = np.asarray(ids)[:, :k]
    gt = np.asarray(gt)[:, :k]
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
    """Shortest wall time of ``repeats`` calls of ``fn``."""
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


# --------------------------------------------------------------------------- data


def prepare_dataset(dataset, *, n_train=None, n_test=None, seed: int = 0,
                    train_queries: int = 0) -> tuple[Dataset, np.ndarray | None]:
    """Load ``dataset`` (HDF5 path or ``sample:<name>``), normalise ``angular``
    data (the problem becomes inner product), optionally hold ``train_queries``
    database rows out as sample queries, and subsample (ground truth recomputed).

    Returns ``(ds, held)`` with ``held`` the held-out rows or ``None``.
    """
    ds = dataset if isinstance(dataset, Dataset) else load(dataset)
    if ds.metric == "euclidean":
        raise ValueError(f"{ds.name}: metric 'euclidean' is not a MIPS problem; use a dot/angular dataset")
    if ds.metric == "angular":
        ds = Dataset(ds.name, unit(ds.train), unit(ds.test), ds.neighbors, ds.distances, "dot",
                     ds.provenance)
    held = None
    if train_queries:
        n_held = int(train_queries)
        if n_held >= ds.n_train:
            raise ValueError(f"train_queries={n_held} leaves no database rows (train has {ds.n_train})")
        perm = np.random.default_rng(seed + 1).permutation(ds.n_train)
        held = np.ascontiguousarray(ds.train[perm[:n_held]])
        keep = np.sort(perm[n_held:])
        ds = Dataset(f"{ds.name}_tq{n_held}", np.ascontiguousarray(ds.train[keep]), ds.test,
                     None, None, ds.metric, ds.provenance)
    if n_train is not None or n_test is not None or held is not None:
        ds = subsample(ds, n_train, n_test, seed=seed)
    return ds, held


def ground_truth_ids(ds: Dataset, k: int) -> np.ndarray:
    """The dataset's top-k neighbour ids, recomputed when it has fewer than k."""
    if k > ds.n_train:
        raise ValueError(f"k={k} exceeds the number of database vectors ({ds.n_train})")
    if ds.neighbors is None or ds.neighbors.shape[1] < k:
        gt, _ = ground_truth(ds.train, ds.test, k, ds.metric)
        return gt
    return ds.neighbors[:, :k]


# --------------------------------------------------------------------------- methods


def make_algorithm(method: MethodConfig, metric: str = "dot", threads: int | None = None,
                   warmup: bool = True):
    """The wrapper-contract object for one (resolved) method.  ``warmup=False``:
    an ipq ``fit`` does not compile the spec's kernels first (see :func:`measure`)."""
    if method.library == "ipq":
        from .ann_benchmarks.module import IpqIndex

        return IpqIndex(metric, method.spec, build_args=method.args,
                        threads=-1 if threads is None else threads, warmup=warmup)
    if method.library == "faiss":
        from .baselines import FaissIndex

        return FaissIndex(metric, method.spec, build_params=method.args, threads=threads)
    if method.library == "hnswlib":
        from .baselines import HnswlibIndex

        return HnswlibIndex(metric, M=method.args["M"],
                            ef_construction=method.args.get("ef_construction", 200), threads=threads)
    if method.library == "scann":
        from .baselines import ScannIndex

        return ScannIndex(metric, threads=threads, **method.args)
    raise ValueError(f"unknown library {method.library!r}")


#: Libraries that are skipped (with a note on stderr) when their module does not import.
OPTIONAL_LIBRARIES = {"scann": "scann"}


def available_methods(methods, note=None) -> list:
    """``methods`` without those of an :data:`OPTIONAL_LIBRARIES` library that is not
    installed; ``note(message)`` (default: print to stderr) is told once per library."""
    import importlib

    note = note or (lambda msg: print(msg, file=sys.stderr))
    missing: dict = {}
    out = []
    for m in methods:
        module = OPTIONAL_LIBRARIES.get(m.library)
        if module is not None and module not in missing:
            try:
                importlib.import_module(module)
            except ImportError:
                missing[module] = []
        if module in missing:
            missing[module].append(m.name)
        else:
            out.append(m)
    for module, names in missing.items():
        note(f"note: skipping {len(names)} {module} method(s) ({', '.join(names)}): "
             f"'import {module}' failed (not installed)")
    return out


def check_method(method: MethodConfig, d: int) -> None:
    """Fail fast on a bad spec or bad query-argument names (nothing is trained).

    ipq specs go to ``ipq_index.index_factory`` and query arguments are checked
    against the untrained index's ``search`` signature; FAISS specs go to
    ``faiss.index_factory``.  Raises ``ValueError`` naming the method.
    """
    try:
        if method.library == "ipq":
            import ipq_index

            from .ann_benchmarks.module import IpqIndex
            from .params import check_search_params

            index = ipq_index.index_factory(d, method.spec, **method.args)
            probe = IpqIndex("dot", method.spec)
            for combo in method.query_args:
                probe.set_query_arguments(*combo)
                check_search_params(index, probe.query_params)
        elif method.library == "faiss":
            import faiss

            try:
                faiss.index_factory(d, method.spec, faiss.METRIC_INNER_PRODUCT)
            except RuntimeError as e:
                raise ValueError(f"bad faiss factory string {method.spec!r}: "
                                 f"{str(e).strip().splitlines()[-1]}") from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"method {method.name!r} ({method.library}): {e}") from None


def measure(algo, *, dataset: str, library: str, method: str, X: np.ndarray, Q: np.ndarray,
            gt: np.ndarray, k: int, query_args=((),), repeats: int = 2,
            train_queries: np.ndarray | None = None, on_row=None, warmup: bool = True) -> list[Result]:
    """Build ``algo`` on ``X`` and measure it at every query-argument setting.

    ``algo`` follows the ann-benchmarks wrapper contract.  With ``warmup`` and an
    ``algo.warmup()`` (ipq: ``ipq_index.warmup(spec)``), that is called first and
    its seconds are ``compile_s``; the timed ``fit`` (``build_s``) then excludes
    compilation.  ``file_bytes_per_vector()`` / ``ram_bytes_per_vector()`` are used
    when present, else ``get_memory_usage()`` for RAM and NaN for the file.
    ``get_batch_arrays()`` (scores and ids) is used when present, otherwise scores
    are unknown and ``rel_ip_error`` is NaN.  ``on_row(result)`` is called after
    every row.  ``algo.done()`` is always called.
    """
    results = []
    try:
        compile_s = float("nan")
        if warmup and hasattr(algo, "warmup"):
            compile_s = float(algo.warmup())
        t0 = time.perf_counter()
        if train_queries is not None:
            algo.fit(X, queries=train_queries)
        else:
            algo.fit(X)
        build_s = time.perf_counter() - t0
        if hasattr(algo, "ram_bytes_per_vector"):
            file_bpv = float(algo.file_bytes_per_vector())
            ram_bpv = float(algo.ram_bytes_per_vector())
        else:
            file_bpv = float("nan")
            ram_bpv = float(algo.get_memory_usage()) * 1024.0 / max(1, X.shape[0])
        nq = Q.shape[0]
        for combo in query_args:
            if combo:
                algo.set_query_arguments(*combo)
            elif hasattr(algo, "set_query_arguments"):
                algo.set_query_arguments()
            algo.batch_query(Q[: min(8, nq)], k)  # warm-up of this setting
            t_batch = best_time(lambda: algo.batch_query(Q, k), repeats)
            if hasattr(algo, "get_batch_arrays"):
                scores, ids = algo.get_batch_arrays()
                err = rel_ip_error(Q, X, ids, scores)
            else:
                rows = algo.get_batch_results()
                ids = np.full((nq, k), -1, np.int64)
                for i, r in enumerate(rows):
                    r = np.asarray(r, np.int64)[:k]
                    ids[i, : r.size] = r
                err = float("nan")

            def single():
                for i in range(nq):
                    algo.query(Q[i], k)

            t_single = best_time(single, repeats)
            params = algo.query_params_str() if hasattr(algo, "query_params_str") else \
                ",".join(map(str, combo))
            r = Result(dataset=dataset, library=library, method=method, params=params,
                       compile_s=compile_s, build_s=build_s, recall_at_k=recall_at_k(ids, gt, k),
                       qps_single=nq / t_single, qps_batch=nq / t_batch,
                       file_bytes_per_vector=file_bpv, ram_bytes_per_vector=ram_bpv,
                       rel_ip_error=err, n_train=int(X.shape[0]), n_test=int(nq), k=int(k))
            results.append(r)
            if on_row is not None:
                on_row(r)
    finally:
        algo.done()
    return results


def run_methods(methods, ds: Dataset, gt: np.ndarray, *, k: int = 10, threads: int | None = None,
                repeats: int = 2, held: np.ndarray | None = None, warmup: bool = True,
                strict: bool = False, quiet: bool = False, dataset_label: str | None = None) -> list[Result]:
    """Measure every method (``MethodConfig``, ``{d}`` placeholders allowed).

    Specs and query-argument names are validated first (``ValueError``).  With
    ``warmup``, each ipq spec's kernels are compiled before its timed build
    (``compile_s``, see :func:`measure`).  A method that fails while running is
    reported on stderr and skipped, unless ``strict``.  Progress: a tqdm bar on stderr (hidden when ``quiet`` or when
    stderr is not a terminal); notes on stderr unless ``quiet``.
    """
    from tqdm import tqdm

    threads = threads or available_threads()
    methods = [m.resolved(ds.d) for m in available_methods(
        [m for m in methods if not m.disabled], note=None if not quiet else lambda msg: None)]
    for m in methods:
        check_method(m, ds.d)
    label = dataset_label or ds.name
    total = sum(len(m.query_args) for m in methods)
    results: list[Result] = []
    bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr,
               disable=True if quiet else None, dynamic_ncols=True)

    def note(msg):
        if not quiet:
            bar.write(msg, file=sys.stderr)

    try:
        for m in methods:
            bar.set_description(f"{m.library} {m.name}"[:40])
            note(f"  {m.library} {m.name} ({len(m.query_args)} setting(s)) ...")
            done_rows = []
            try:
                algo = make_algorithm(m, "dot", threads, warmup=warmup)

                def on_row(r):
                    done_rows.append(r)
                    bar.update(1)

                results.extend(measure(algo, dataset=label, library=m.library, method=m.name,
                                       X=ds.train, Q=ds.test, gt=gt, k=k, query_args=m.query_args,
                                       repeats=repeats, train_queries=held if m.library == "ipq" else None,
                                       on_row=on_row, warmup=warmup))
            except Exception as e:  # noqa: BLE001
                if strict:
                    raise
                bar.update(len(m.query_args) - len(done_rows))
                results.extend(done_rows)
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(f"WARNING: {m.library} {m.name} failed: {type(e).__name__}: {msg}", file=sys.stderr)
    finally:
        bar.close()
    return results


def run_config(cfg: BenchConfig, *, dataset=None, quiet: bool = False,
               strict: bool = False) -> tuple[Dataset, list[Result]]:
    """Prepare the config's dataset (``dataset`` overrides it) and run its methods."""
    ds, held = prepare_dataset(dataset or cfg.dataset, n_train=cfg.n_train, n_test=cfg.n_test,
                               seed=cfg.seed, train_queries=cfg.train_queries)
    gt = ground_truth_ids(ds, cfg.k)
    threads = cfg.threads or available_threads()
    methods = available_methods(cfg.enabled_methods)  # optional libraries: skipped with a note
    for m in methods:  # fail fast, before anything is printed or built
        check_method(m.resolved(ds.d), ds.d)
    if not quiet:
        extra = f", {len(held)} held-out sample queries" if held is not None else ""
        print(f"dataset {ds.name}: {ds.n_train} x {ds.d} database, {ds.n_test} queries, "
              f"inner product, k={cfg.k}, threads={threads}{extra}", file=sys.stderr)
    results = run_methods(methods, ds, gt, k=cfg.k, threads=threads, repeats=cfg.repeats,
                          held=held, warmup=cfg.warmup, strict=strict, quiet=quiet,
                          dataset_label=cfg.name or ds.name)
    return ds, results


# --------------------------------------------------------------------------- Pareto fronts


def _valid(r: Result, attr: str) -> bool:
    return not (math.isnan(r.recall_at_k) or math.isnan(getattr(r, attr)))


def pareto_front(results: list[Result], attr: str = "qps_single") -> list[Result]:
    """The rows no other row dominates in (``recall_at_k``, ``attr``), both maximised.

    A row is dominated by one at least as good in both and better in one; rows
    with identical values do not dominate each other (all are kept).  Rows
    with a NaN in either are ignored.  Sorted by recall, ascending.

    Sweep: in order of decreasing (recall, qps), a group of equal points is on
    the front iff its qps beats every qps seen in the groups before it.
    """
    rows = sorted((r for r in results if _valid(r, attr)),
                  key=lambda r: (r.recall_at_k, getattr(r, attr)), reverse=True)
    front: list[Result] = []
    best = -math.inf
    i = 0
    while i < len(rows):
        key = (rows[i].recall_at_k, getattr(rows[i], attr))
        j = i
        while j < len(rows) and (rows[j].recall_at_k, getattr(rows[j], attr)) == key:
            j += 1
        if key[1] > best:
            front.extend(rows[i:j])
            best = key[1]
        i = j
    return front[::-1]


def _groups(results: list[Result]) -> dict:
    groups: dict = {}
    for r in results:
        groups.setdefault((r.library, r.method), []).append(r)
    return groups


def _by_library(results: list[Result]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault(r.library, []).append(r)
    return out


def pareto_rows(results: list[Result]) -> list[tuple[str, Result]]:
    """``(mode, row)`` for every row on its library's Pareto front, ``mode``
    ``"single"`` (recall vs ``qps_single``) then ``"batch"`` (vs ``qps_batch``)."""
    out = []
    for mode, (attr, _) in QPS_MODES.items():
        for rows in _by_library(results).values():
            out.extend((mode, r) for r in pareto_front(rows, attr))
    return out


def best_qps_at_recall(results: list[Result], min_recall: float, attr: str = "qps_single") -> dict:
    """``library -> row`` with the highest ``attr`` among rows with recall >= ``min_recall``
    (libraries with no such row are absent)."""
    best: dict = {}
    for r in results:
        if _valid(r, attr) and r.recall_at_k >= min_recall:
            if r.library not in best or getattr(r, attr) > getattr(best[r.library], attr):
                best[r.library] = r
    return best


# --------------------------------------------------------------------------- output


def _fmt(v, spec, nan="nan"):
    if isinstance(v, float) and math.isnan(v):
        return format(nan, ">" + "".join(c for c in spec.split(".")[0] if c.isdigit()))
    return format(v, spec)


#: What the table's time and size columns mean (printed under it).
TABLE_FOOTNOTE = (
    "compile s: ipq_index.warmup(spec) before the build (numba compilation or cache load; "
    "'-': none or not separated); build s: fit (train + add), compilation excluded.\n"
    "file B/vec: what the saved index holds per vector (ipq: index.stored_nbytes / n = codes, "
    "scales, ids, re-rank copy, structure arrays).\n"
    "RAM B/vec: what the index holds in memory per vector (ipq: index.nbytes / n, adds derived "
    "search structures).  FAISS, both columns: code size (sa_code_size) plus 8-byte id where "
    "FAISS stores ids (IVF); hnswlib, ScaNN: estimates.")


def format_table(results: list[Result], k: int) -> str:
    """A fixed-width text table of the results."""
    wm = max([24] + [len(r.method) for r in results])
    wp = max([6] + [len(r.params) for r in results])
    head = (f"{'library':<7} {'method':<{wm}} {'params':<{wp}} {'compile s':>9} {'build s':>8} "
            f"{'recall@' + str(k):>9} {'qps_1t':>9} {'qps_batch':>10} {'file B/vec':>10} "
            f"{'RAM B/vec':>10} {'rel_ip_err':>10}")
    lines = [head, "-" * len(head)]
    for r in results:
        lines.append(
            f"{r.library:<7} {r.method:<{wm}} {r.params or '-':<{wp}} {_fmt(r.compile_s, '9.2f', '-')} "
            f"{_fmt(r.build_s, '8.2f')} {_fmt(r.recall_at_k, '9.4f')} {_fmt(r.qps_single, '9.0f')} "
            f"{_fmt(r.qps_batch, '10.0f')} {_fmt(r.file_bytes_per_vector, '10.1f')} "
            f"{_fmt(r.ram_bytes_per_vector, '10.1f')} {_fmt(r.rel_ip_error, '10.2e')}")
    lines.append(TABLE_FOOTNOTE)
    return "\n".join(lines)


def print_table(results: list[Result], k: int, file=None) -> None:
    print(format_table(results, k), file=file or sys.stdout)


def write_csv(results: list[Result], path) -> Path:
    """One row per (method, query setting), columns :data:`COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in results:
            w.writerow(_csv_row(r))
    return path


def _csv_row(r: Result) -> dict:
    row = asdict(r)
    return {c: (f"{row[c]:.6g}" if isinstance(row[c], float) else row[c]) for c in COLUMNS}


def write_pareto_csv(results: list[Result], path) -> Path:
    """The Pareto-optimal rows per library: column ``front`` (``single`` / ``batch``)
    followed by :data:`COLUMNS`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["front", *COLUMNS])
        w.writeheader()
        for mode, r in pareto_rows(results):
            w.writerow({"front": mode, **_csv_row(r)})
    return path


def read_csv(path) -> list[Result]:
    """Rows written by :func:`write_csv` (or :func:`write_pareto_csv`, ``front`` dropped).

    Numeric columns missing from the file read as NaN: ``compile_s`` and the two
    byte columns in files from before they existed (their single
    ``bytes_per_vector`` column had another definition and is not read).
    """
    types = {f: t for f, t in Result.__annotations__.items()}
    conv = {"float": float, "int": int, "str": str}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        bad = [c for c in missing if types[c] != "float"]
        if bad:
            raise ValueError(f"{path}: not a benchmark result CSV (missing column(s) {bad})")
        return [Result(**{c: float("nan") if c in missing else conv[types[c]](row[c]) for c in COLUMNS})
                for row in reader]


#: Colour of each library in the plots: its Pareto band (tab10) and the colour map
#: its methods' curves are shaded from; other libraries get the next free pair.
LIBRARY_COLORS = {"ipq": ("tab:blue", "Blues"), "faiss": ("tab:orange", "Oranges"),
                  "hnswlib": ("tab:green", "Greens"), "scann": ("tab:red", "Reds")}
_SPARE_COLORS = [("tab:purple", "Purples"), ("tab:gray", "Greys"), ("tab:brown", "YlOrBr")]

#: The two QPS measurements a Pareto front is computed for, and their axis labels.
QPS_MODES = {
    "single": ("qps_single", "QPS, 1 thread, 1 query per call"),
    "batch": ("qps_batch", "QPS, all queries in 1 call, {threads} thread(s)"),
}


def _method_colors(results: list[Result]) -> tuple[dict, dict]:
    """``(library -> band colour, (library, method) -> curve colour)``: the methods
    of a library are shades of its colour map."""
    import matplotlib

    libs = list(dict.fromkeys(r.library for r in results))
    spare = iter(_SPARE_COLORS * len(libs))
    scheme = {lib: LIBRARY_COLORS.get(lib) or next(spare) for lib in libs}
    curves = {}
    for lib in libs:
        names = list(dict.fromkeys(r.method for r in results if r.library == lib))
        cmap = matplotlib.colormaps[scheme[lib][1]]
        for i, name in enumerate(names):
            curves[(lib, name)] = cmap(0.45 + 0.5 * i / max(1, len(names) - 1))
    return {lib: c[0] for lib, c in scheme.items()}, curves


def _recall_xlim(results: list[Result]) -> tuple[float, float]:
    """Recall axis: from 0.5 when some method reaches 0.9 (the region that matters), else all."""
    rec = [r.recall_at_k for r in results if not math.isnan(r.recall_at_k)]
    lo = min(rec, default=0.0)
    if max(rec, default=0.0) >= 0.9:
        lo = max(lo, 0.5)
    return max(0.0, lo - 0.02), 1.005


def _plot_panel(ax, results: list[Result], attr: str, colors: tuple, *, label: bool) -> None:
    """One panel: every method's sweep in measured order (thin line, marker per
    method) and each library's Pareto front (wide translucent band underneath)."""
    markers = "os^Dv<>pP*Xhd8H"
    bands, curves = colors
    for i, ((lib, name), rows) in enumerate(_groups(results).items()):
        ax.plot([r.recall_at_k for r in rows], [getattr(r, attr) for r in rows],
                marker=markers[i % len(markers)], markersize=4, linewidth=0.9,
                color=curves[(lib, name)], linestyle="-" if lib == "ipq" else "--",
                label=f"{lib}: {name} ({rows[0].ram_bytes_per_vector:.0f} B/vec RAM)" if label else None)
    for lib, rows in _by_library(results).items():
        front = pareto_front(rows, attr)
        ax.plot([r.recall_at_k for r in front], [getattr(r, attr) for r in front], color=bands[lib],
                linewidth=7, alpha=0.25, solid_capstyle="round", zorder=0,
                label=f"{lib} Pareto front" if label else None)
    ax.set_yscale("log")
    ax.set_xlim(*_recall_xlim(results))
    ax.grid(True, which="both", alpha=0.3)


def plot(results: list[Result], path, title: str, k: int, threads: int | None = None) -> bool:
    """Two panels, recall@k vs single-thread QPS and vs batch QPS (log y): one thin
    curve per method, one highlighted Pareto front per library.

    matplotlib is imported here (the Agg canvas, no pyplot, no global backend
    change).  Returns ``False`` (and writes nothing) when matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    colors = _method_colors(results)
    fig = Figure(figsize=(16, 7))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for i, (ax, (attr, ylabel)) in enumerate(zip(axes, QPS_MODES.values())):
        _plot_panel(ax, results, attr, colors, label=i == 0)
        ax.set_xlabel(f"recall@{k}")
        ax.set_ylabel(ylabel.format(threads=threads or "all"))
    fig.suptitle(title)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="center left", bbox_to_anchor=(0.79, 0.5))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # layout warnings are cosmetic
        warnings.simplefilter("ignore")
        fig.tight_layout(rect=(0, 0, 0.79, 1))
        fig.savefig(path, dpi=110)
    return True


def safe_name(name: str) -> str:
    """A file-name-safe version of ``name``."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)
