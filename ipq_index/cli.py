"""The ``ipq`` command line: build, search, inspect and benchmark indexes.

    ipq build DATA --index SPEC -o OUT.ipq [--n-train N] [--train-queries N] [--seed S] [--threads T]
    ipq build DATA --index SPEC -o OUT_DIR --workers N | --scheduler ADDRESS [--shards S]   (sharded, Dask)
    ipq search INDEX.ipq|DIR QUERIES --k 10 -o OUT.npy|OUT.csv [--param key=value ...] [--filter IDS]
    ipq add INDEX.ipq DATA [--ids IDS]
    ipq remove INDEX.ipq IDS
    ipq info INDEX.ipq|DIR [--json]
    ipq warmup SPEC [SPEC ...]
    ipq bench --config configs/NAME.yaml [--out DIR] [--dataset PATH] [--strict]
    ipq datasets list [--dir DIR]
    ipq datasets fetch NAME [--dir DIR]
    ipq demo [--sample minilm|glove50] [--k 10]

DATA / QUERIES: an ann-benchmarks HDF5 file (``train`` for build, ``test`` for
search), ``.npy``, ``.fvecs`` / ``.bvecs``, or ``sample:<name>`` (a sample shipped
in the package).  Global options (before or after the subcommand): ``--quiet``
hides progress bars and notes, ``--debug`` shows tracebacks.  Progress bars go
to stderr and are also hidden when stderr is not a terminal.

Every user-facing failure (missing file, bad spec or parameter, wrong
dimension, corrupt index file, unreachable network) prints one line
``ipq: error: ...`` on stderr and exits with status 2; unexpected errors exit
with status 1.  See docs/cli.md.

Only the standard library and numpy are imported at module level; the
benchmark harness (``ipq_index.bench``), h5py, yaml, tqdm and FAISS are
imported inside the commands that use them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

PROG = "ipq"
ADD_CHUNK = 65536
SEARCH_CHUNK = 4096
class _UsageError(Exception):
    """A command-line usage error (reported like every other user error)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        raise _UsageError(f"{message} (see '{self.prog} --help')")


# --------------------------------------------------------------------------- helpers


def _progress_disabled(args) -> bool | None:
    """tqdm ``disable``: True with --quiet, else None (= hidden when not a terminal)."""
    return True if getattr(args, "quiet", False) else None


def _progress(args, total, desc: str, unit: str, **options):
    """A tqdm progress bar on stderr (hidden with --quiet or when stderr is not a terminal)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=_progress_disabled(args), **options)


def _note(args, msg: str) -> None:
    if not getattr(args, "quiet", False):
        print(msg, file=sys.stderr, flush=True)


def set_thread_environment() -> None:
    """Thread settings of the ``ipq`` command (also used by ``ipq_index.bench.demo``);
    call before FAISS loads.  Variables already set are left alone.

    ``OMP_WAIT_POLICY=PASSIVE``: FAISS' OpenMP threads otherwise spin while idle;
    when cores are shared (numba + FAISS, or a busy machine) that slows
    multi-threaded calls down badly.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(nbytes) < 1024 or unit == "TiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024.0
    return f"{nbytes:.1f} TiB"


def read_vectors(spec: str, split: str) -> tuple[np.ndarray, str | None]:
    """Load a (n, d) float32 matrix and the file's metric (``None`` if unknown).

    ``spec``: ``sample:<name>`` (the sample's ``split``), an HDF5 file (dataset
    ``split``), ``.npy`` (a 1-D array is one vector), ``.fvecs`` or ``.bvecs``.
    """
    from .bench import datasets

    if spec.startswith("sample:"):
        ds = datasets.load_sample(spec[len("sample:"):])
        return getattr(ds, split), ds.metric
    p = Path(spec)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {spec!r}")
    if p.is_dir():
        raise ValueError(f"{spec!r} is a directory, not a data file")
    suffix = p.suffix.lower()
    metric = None
    if suffix in (".hdf5", ".h5", ".hdf"):
        import h5py

        if not h5py.is_hdf5(p):
            raise ValueError(f"{spec!r} is not an HDF5 file")
        with h5py.File(p, "r") as f:
            if split not in f or not isinstance(f[split], h5py.Dataset):
                raise ValueError(f"{spec!r} has no {split!r} dataset (found {sorted(f.keys())})")
            X = f[split][()]
            m = f.attrs.get("distance")
        if m is not None:
            metric = (m.decode() if isinstance(m, bytes) else str(m)).strip().lower()
    elif suffix == ".npy":
        X = _read_npy(p, spec)
        if X.ndim == 1:
            X = X[None, :]
    elif suffix == ".fvecs":
        X = datasets.read_fvecs(p)
    elif suffix == ".bvecs":
        X = datasets.read_bvecs(p)
    else:
        raise ValueError(f"{spec!r}: unsupported data file type {suffix or '(none)'!r}; expected "
                         f".hdf5/.h5 (ann-benchmarks layout), .npy, .fvecs, .bvecs or sample:<name>")
    X = np.asarray(X)
    if X.ndim != 2 or X.shape[0] == 0 or X.shape[1] == 0:
        raise ValueError(f"{spec!r}: expected a non-empty 2-D (n, d) array, got shape {X.shape}")
    if not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise ValueError(f"{spec!r}: expected real numbers, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32), metric


def _read_npy(p: Path, spec: str) -> np.ndarray:
    """The array of a .npy file, memory-mapped.  The magic is checked first:
    np.load would take anything else for a pickle or an .npz archive."""
    with open(p, "rb") as f:
        magic = f.read(len(np.lib.format.MAGIC_PREFIX))
    if not magic:
        raise ValueError(f"{spec!r} is empty (0 bytes), not a .npy array")
    if magic != np.lib.format.MAGIC_PREFIX:
        raise ValueError(f"{spec!r} is not a .npy file (it does not start with the .npy magic)")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, EOFError, OSError) as e:  # truncated or damaged header or data
        raise ValueError(f"{spec!r} is not a readable .npy array ({_one_line(e)})") from None


def _check_output(path: Path, suffixes=None) -> Path:
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise ValueError(f"output {str(path)!r}: expected a file ending in {' or '.join(suffixes)}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"output directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"output {str(path)!r} is a directory")
    return path


# --------------------------------------------------------------------------- build


def cmd_build(args, extra=None) -> int:
    import ipq_index

    from .bench.params import unit
    from .cli_distributed import check_cluster_options

    check_cluster_options(args)
    sharded = bool(args.workers or args.scheduler)
    out = Path(args.output) if sharded else _check_output(Path(args.output))
    X, metric = read_vectors(args.data, "train")
    n_all = X.shape[0]
    if args.n_train is not None:
        if args.n_train < 1:
            raise ValueError(f"--n-train must be >= 1, got {args.n_train}")
        if args.n_train > n_all:
            raise ValueError(f"--n-train {args.n_train} exceeds the {n_all} rows of {args.data}")
        X = X[: args.n_train]
    if args.normalize or metric in ("angular", "cosine"):
        if not args.normalize:
            _note(args, f"note: {args.data} has metric {metric!r}: vectors are L2-normalised")
        X = unit(X)
    ids = None
    queries = None
    if args.train_queries:
        n_held = int(args.train_queries)
        if n_held < 1 or n_held >= X.shape[0]:
            raise ValueError(f"--train-queries {n_held} must be in 1..{X.shape[0] - 1} "
                             f"(rows held out of the {X.shape[0]} database rows)")
        perm = np.random.default_rng(0 if args.seed is None else args.seed).permutation(X.shape[0])
        queries = np.ascontiguousarray(X[perm[:n_held]])
        ids = np.sort(perm[n_held:])
        X = np.ascontiguousarray(X[ids])
    if sharded:
        from .cli_distributed import build

        return build(args, X, ids, queries)
    overrides = {} if args.seed is None else {"seed": args.seed}
    index = ipq_index.index_factory(X.shape[1], args.index, **overrides)
    threads = -1 if args.threads is None else args.threads

    t0 = time.perf_counter()
    _note(args, f"training {args.index} on {X.shape[0]} x {X.shape[1]}"
                + (f" with {len(queries)} held-out sample queries" if queries is not None else "") + " ...")
    index.train(X, queries=queries, num_threads=threads)
    t_train = time.perf_counter() - t0
    with _progress(args, X.shape[0], "add", "vec") as bar:
        for s in range(0, X.shape[0], ADD_CHUNK):
            chunk = X[s:s + ADD_CHUNK]
            index.add(chunk, ids=None if ids is None else ids[s:s + ADD_CHUNK], num_threads=threads)
            bar.update(chunk.shape[0])
    build_s = time.perf_counter() - t0
    index.save(out)
    n = len(index)
    print(f"wrote {out}: {index.spec}, {n} vectors, d={X.shape[1]}, file {_human(out.stat().st_size)}, "
          f"{index.stored_nbytes / max(1, n):.1f} file bytes/vec (codes, scales, ids, re-rank copy, "
          f"structure arrays), train {t_train:.1f} s, build {build_s:.1f} s")
    return 0


# --------------------------------------------------------------------------- search


def cmd_search(args, extra=None) -> int:
    import ipq_index

    from .bench.params import parse_params
    from .cli_distributed import check_cluster_options, is_sharded, open_for_search

    out = _check_output(Path(args.output), (".npy", ".csv"))
    params = parse_params(args.param)
    for reserved, instead in (("k", "use --k"), ("num_threads", "use --threads"),
                              ("return_std", "ipq search writes ids and scores only")):
        if reserved in params:
            raise ValueError(f"--param {reserved}=... is not allowed; {instead}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    check_cluster_options(args)
    cluster = contextlib.ExitStack()
    with cluster:
        index = open_for_search(args, cluster) if is_sharded(args.index) else ipq_index.load(args.index, mmap=True)
        return _search(args, index, params, out)


def _search(args, index, params, out) -> int:
    import ipq_index

    from .bench.params import check_search_params, unit

    Q, metric = read_vectors(args.queries, "test")
    d = getattr(index, "d", None)
    if d is not None and Q.shape[1] != d:
        raise ValueError(f"queries {args.queries!r} have dimension {Q.shape[1]}, but the index "
                         f"{args.index!r} has d={d}")
    if args.normalize or metric in ("angular", "cosine"):
        Q = unit(Q)
    check_search_params(index, params)
    if args.k > len(index):
        raise ValueError(f"--k {args.k} exceeds the number of indexed vectors ({len(index)})")
    if args.filter:
        from .cli_edit import read_ids
        from .filters import as_filter

        ids = read_ids(args.filter)
        # one filter object for every chunk: its rows are resolved once
        params["filter"] = ipq_index.DenyIds(ids) if args.deny else as_filter(ids)
    threads = args.threads if args.threads is not None else (None if hasattr(index, "n_shards") else -1)
    nq = Q.shape[0]
    scores = np.empty((nq, args.k), np.float32)
    ids = np.empty((nq, args.k), np.int64)
    with _progress(args, nq, "search", "q") as bar:
        for s in range(0, nq, SEARCH_CHUNK):
            sc, ii = index.search(Q[s:s + SEARCH_CHUNK], args.k, num_threads=threads, **params)
            scores[s:s + sc.shape[0]] = sc
            ids[s:s + ii.shape[0]] = ii
            bar.update(sc.shape[0])
    if out.suffix.lower() == ".npy":
        np.save(out, ids)
        score_path = out.with_name(out.stem + ".scores.npy")
        np.save(score_path, scores)
        print(f"wrote {out} (ids, int64 {nq} x {args.k}) and {score_path} (scores, float32)")
    else:
        import csv

        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["query", "rank", "id", "score"])
            for qi in range(nq):
                for r in range(args.k):
                    if ids[qi, r] >= 0:
                        w.writerow([qi, r, int(ids[qi, r]), f"{float(scores[qi, r]):.7g}"])
        print(f"wrote {out} ({nq} queries x top {args.k}: query,rank,id,score)")
    return 0


# --------------------------------------------------------------------------- info


def index_info(path) -> dict:
    """Header facts of an index file, without reading its arrays."""
    import struct

    from . import storage

    meta, entries, size = storage.read_header(path)
    with open(path, "rb") as f:
        version = struct.unpack("<I", f.read(12)[8:12])[0]
    if meta.get("library") != "ipq_index":
        raise storage.FormatError(f"{path} does not hold an ipq_index index")
    model = {k: e for k, e in entries.items() if k.startswith("enc.")}
    data = {k: e for k, e in entries.items() if k not in model}
    ntotal = int(meta.get("ntotal", 0))
    data_bytes = sum(int(e["nbytes"]) for e in data.values())
    return {
        "path": str(path),
        "file_bytes": int(size),
        "format_version": int(version),
        "reader_format_version": int(storage.FORMAT_VERSION),
        "meta": meta,
        "arrays": {k: {"dtype": e["dtype"], "shape": e["shape"], "nbytes": e["nbytes"]}
                   for k, e in entries.items()},
        "data_bytes": data_bytes,
        "model_bytes": sum(int(e["nbytes"]) for e in model.values()),
        "file_bytes_per_vector": data_bytes / ntotal if ntotal else None,
    }


def cmd_info(args, extra=None) -> int:
    from . import cli_distributed

    sharded = cli_distributed.is_sharded(args.index)
    info = cli_distributed.info(args.index) if sharded else index_info(args.index)
    if args.json or sharded:
        print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json
              else "\n".join(cli_distributed.info_lines(info)))
        return 0
    meta = info["meta"]
    lines = [
        f"file            {info['path']} ({_human(info['file_bytes'])})",
        f"format version  {info['format_version']} (this ipq_index reads <= {info['reader_format_version']})",
        f"kind            {meta.get('kind')}",
        f"spec            {meta.get('spec')}",
        f"d               {meta.get('d')}",
        f"ntotal          {meta.get('ntotal')}" + (f" rows, {meta['removed']} removed" if meta.get("removed") else ""),
        f"bytes           {info['data_bytes']} data (codes, ids, scales, re-rank copy, structure arrays)"
        + (f" = {info['file_bytes_per_vector']:.1f} file bytes/vec"
           if info["file_bytes_per_vector"] is not None else "")
        + f"; {info['model_bytes']} model",
        f"search defaults {json.dumps(meta.get('search_defaults', {}), sort_keys=True)}",
    ]
    enc = meta.get("encoder")
    if isinstance(enc, dict):
        cfg = enc.get("config", {})
        lines.append("encoder         " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
        if "nbytes" in enc:
            lines.append(f"code bytes      {enc['nbytes']} per vector (packed codes)")
        ch = enc.get("scale_choice")
        if isinstance(ch, dict):
            lines.append(f"scale_choice    {'on' if ch.get('scale') else 'off'} (decided by train: top-{ch.get('k')} "
                         f"recall {ch.get('recall_plain')} unscaled vs {ch.get('recall_scaled')} scaled, "
                         f"{ch.get('queries')} queries over {ch.get('rows')} held-out rows)")
    shown = {"kind", "spec", "d", "ntotal", "search_defaults", "encoder", "library"}
    for key, value in meta.items():
        if key not in shown:
            lines.append(f"{key:<15} {json.dumps(value, sort_keys=True, default=str)}")
    lines.append("arrays")
    for name, e in info["arrays"].items():
        shape = "x".join(map(str, e["shape"])) or "scalar"
        lines.append(f"  {name:<14} {np.dtype(e['dtype']).name:<8} {shape:<14} {_human(e['nbytes'])}")
    print("\n".join(lines))
    return 0


# --------------------------------------------------------------------------- warmup


def cmd_warmup(args, extra=None) -> int:
    import ipq_index

    for spec in args.specs:  # every spec is checked before anything is compiled
        ipq_index.parse_spec(spec)
    total = 0.0
    for spec in args.specs:
        _note(args, f"compiling the kernels of {spec} ...")
        seconds = float(ipq_index.warmup(spec))
        total += seconds
        print(f"{spec}: {seconds:.2f} s")
    if len(args.specs) > 1:
        print(f"total: {total:.2f} s")
    return 0


# --------------------------------------------------------------------------- bench


def cmd_bench(args, extra=None) -> int:
    from .bench import runner
    from .bench.config import load_config

    cfg = load_config(args.config)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {str(out_dir)!r} exists and is not a directory")
    ds, results = runner.run_config(cfg, dataset=args.dataset, quiet=args.quiet, strict=args.strict)
    if not results:
        raise RuntimeError("no method produced results (see the warnings above)")
    stem = runner.safe_name(Path(args.config).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = runner.write_csv(results, out_dir / f"{stem}.csv")
    pareto_path = runner.write_pareto_csv(results, out_dir / f"{stem}_pareto.csv")
    png_path = out_dir / f"{stem}.png"
    threads = cfg.threads or runner.available_threads()
    title = f"{cfg.name or ds.name}: {ds.n_train} x {ds.d}, {ds.n_test} queries, k={cfg.k}"
    plotted = runner.plot(results, png_path, title, cfg.k, threads=threads)
    print(runner.format_table(results, cfg.k))
    print(f"\nwrote {csv_path}, {pareto_path}" + (f" and {png_path}" if plotted else
          " (no plot: matplotlib is not installed; pip install 'ipq_index[bench]')"))
    return 0


# --------------------------------------------------------------------------- demo


def cmd_demo(args, extra=None) -> int:
    from .bench import demo

    demo.main(list(extra or []))
    return 0


# --------------------------------------------------------------------------- parser


def _command(sub, common, name: str, func, **options):
    """The parser of subcommand ``name`` (global options from ``common``,
    ``options`` for ``add_parser``), running ``func``."""
    p = sub.add_parser(name, parents=[common], **options)
    p.set_defaults(func=func)
    return p


def _thread_count(text: str) -> int:
    """--threads: -1 (all cores) or a positive count."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected -1 (all cores) or a positive count, got {text!r}") from None
    if n != -1 and n < 1:
        raise argparse.ArgumentTypeError(f"expected -1 (all cores) or a positive count, got {n}")
    return n


def _add_run_options(p, rows: str) -> None:
    """--threads and --normalize, shared by ``build`` and ``search`` (``rows``: what is normalised)."""
    p.add_argument("--threads", type=_thread_count, default=None, metavar="T",
                   help="threads: -1 or absent = all cores, else that many")
    p.add_argument("--normalize", action="store_true",
                   help=f"L2-normalise the {rows} (automatic for HDF5 files with distance=angular)")


def _add_build(sub, common) -> None:
    p = _command(sub, common, "build", cmd_build, help="train an index on vectors and save it",
                 description="Train and fill an index, save it as one file.")
    p.add_argument("data", metavar="DATA",
                   help="vectors: HDF5 (uses 'train'), .npy, .fvecs, .bvecs or sample:<name>")
    p.add_argument("--index", required=True, metavar="SPEC", help="factory string, e.g. 'PCA,ASQ4,Rerank4'")
    p.add_argument("-o", "--output", required=True, metavar="OUT.ipq", help="index file to write")
    p.add_argument("--n-train", type=int, default=None, metavar="N", help="index only the first N rows")
    p.add_argument("--train-queries", type=int, default=0, metavar="N",
                   help="hold N random rows out of the index and pass them to train() as sample "
                        "queries (the other rows keep their row numbers as ids)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="encoder seed and seed of the --train-queries draw (default: index default / 0)")
    _add_run_options(p, "vectors")
    from .cli_distributed import add_cluster_options

    add_cluster_options(p)
    p.add_argument("--shards", type=int, default=None, metavar="S", help="with a cluster: shards (default: workers)")


def _add_search(sub, common) -> None:
    p = _command(sub, common, "search", cmd_search, help="search an index with query vectors",
                 description="Top-k inner-product search; writes ids (+ scores).")
    p.add_argument("index", metavar="INDEX.ipq")
    p.add_argument("queries", metavar="QUERIES",
                   help="queries: HDF5 (uses 'test'), .npy, .fvecs, .bvecs or sample:<name>")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.npy|OUT.csv",
                   help=".npy: (nq, k) int64 ids plus <stem>.scores.npy; .csv: query,rank,id,score")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="search keyword argument, e.g. rerank=2 (repeatable; passed to index.search)")
    p.add_argument("--filter", metavar="IDS", help="only these ids: .npy (ids or id mask), text file or a,b,c")
    p.add_argument("--deny", action="store_true", help="with --filter: return every id except those")
    _add_run_options(p, "queries")
    from .cli_distributed import add_cluster_options

    add_cluster_options(p)


def _add_info(sub, common) -> None:
    p = _command(sub, common, "info", cmd_info, help="describe an index file (header only)",
                 description="Print format version, spec, d, size and search defaults.")
    p.add_argument("index", metavar="INDEX.ipq")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _add_warmup(sub, common) -> None:
    p = _command(sub, common, "warmup", cmd_warmup, help="compile the numba kernels of index specs",
                 description="Call ipq_index.warmup(SPEC) for each spec: compile (or load from "
                             "numba's on-disk cache) every kernel an index of that spec uses to "
                             "build and search; print the seconds each took.")
    p.add_argument("specs", nargs="+", metavar="SPEC", help="factory string, e.g. 'PCA,ASQ4,Rerank4'")


def _add_bench(sub, common) -> None:
    p = _command(sub, common, "bench", cmd_bench, help="run a benchmark sweep from a YAML config",
                 description="Run the methods of a config; write CSV + PNG, print a table.")
    p.add_argument("--config", required=True, metavar="CONFIG.yaml")
    p.add_argument("--out", default="bench-results", metavar="DIR",
                   help="output directory for <config>.csv and <config>.png (default %(default)s)")
    p.add_argument("--dataset", default=None, metavar="PATH",
                   help="use this dataset instead of the config's (HDF5 path or sample:<name>)")
    p.add_argument("--strict", action="store_true", help="stop at the first failing method")


def _add_demo(sub, common) -> None:
    _command(sub, common, "demo", cmd_demo, add_help=False,  # --help goes to the demo itself
             help="the main job (python -m ipq_index.bench.demo)",
             description="Runs ipq_index.bench.demo.main; extra arguments are passed on "
                         "(e.g. --sample glove50 --k 10).")


def _add_global_options(p, default) -> None:
    """--quiet and --debug: on the main parser (default False) and on every
    subcommand (``argparse.SUPPRESS``, so one given before the subcommand
    is not reset), as the module docstring says."""
    p.add_argument("--quiet", action="store_true", default=default, help="no progress bars or notes")
    p.add_argument("--debug", action="store_true", default=default, help="show tracebacks on errors")


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    _add_global_options(common, argparse.SUPPRESS)
    ap = _Parser(prog=PROG, description="ipq_index: maximum inner product search on ASQ codes.",
                 epilog="See docs/cli.md. Errors print one line 'ipq: error: ...' and exit 2.")
    _add_global_options(ap, False)
    ap.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    from .cli_datasets import add_datasets
    from .cli_edit import add_add, add_remove

    for add in (_add_build, _add_search, add_add, add_remove, _add_info, _add_warmup, _add_bench, add_datasets, _add_demo):
        add(sub, common)
    return ap


def _version() -> str:
    try:
        from . import __version__

        return __version__
    except Exception:  # noqa: BLE001
        return "?"


# --------------------------------------------------------------------------- main


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and getattr(e, "strerror", None) and getattr(e, "filename", None):
        msg = f"{e.strerror}: {e.filename!r}"
    else:
        msg = str(e).strip()
        if isinstance(e, KeyError) and len(e.args) == 1:
            msg = str(e.args[0])
    msg = " ".join(msg.split())
    return msg or type(e).__name__


def _detach_stdout() -> None:
    """Point stdout's file descriptor at the null device, so that the
    interpreter's final flush of what is still buffered does not fail again."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object without a descriptor
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, fd)
    finally:
        os.close(null)


def _fail(msg: str, code: int):
    print(f"{PROG}: error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def main(argv=None) -> int:
    """Entry point of the ``ipq`` console script.

    Returns 0 on success; failures raise ``SystemExit`` (2 for user errors,
    1 for unexpected ones) after printing one line on stderr.
    """
    set_thread_environment()
    from .storage import FormatError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        debug = bool(getattr(args, "debug", False)) or debug
        if extra and args.command != "demo":
            raise _UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{PROG} {args.command} --help')")
        code = int(args.func(args, extra) or 0)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # stdout's reader stopped reading (ipq info --json | head -1): that
        # is the reader's choice, not a failure; end quietly like cat or grep
        _detach_stdout()
        return 0
    except _UsageError as e:
        _fail(str(e), 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except SystemExit:
        raise
    except (FormatError, ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        if debug:
            raise
        _fail(_one_line(e), 2)
    except Exception as e:  # noqa: BLE001
        if debug:
            raise
        _fail(f"unexpected {type(e).__name__}: {_one_line(e)} (run with --debug for a traceback)", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
