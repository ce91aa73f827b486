"""The ``ipq`` commands on sharded indexes (``ipq_index.distributed``, Dask).

``ipq build --workers N`` (a local cluster of N worker processes) or
``--scheduler ADDRESS`` (an existing cluster) writes a sharded index: a
directory of one ipq file per shard plus ``manifest.json``.  ``ipq search``
and ``ipq info`` recognise such a directory by its manifest.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np

from .cli import _human, _note


def is_sharded(path) -> bool:
    """True when ``path`` is a directory holding a sharded index's manifest."""
    return Path(path).is_dir() and (Path(path) / "manifest.json").is_file()


def _distributed():
    try:
        from . import distributed
    except ImportError as e:
        raise RuntimeError(f"{e} (sharded indexes run on Dask)") from None
    return distributed


@contextlib.contextmanager
def dask_client(args, default_workers: int):
    """A ``dask.distributed.Client``: on ``--scheduler ADDRESS`` if given, else
    on a local cluster of ``--workers`` (default ``default_workers``) worker
    processes, each with ``--threads`` threads (default: the cores shared out)."""
    _distributed()
    from distributed import Client, LocalCluster

    if args.scheduler:
        with Client(args.scheduler, timeout="30s") as client:
            yield client
        return
    workers = args.workers or default_workers
    threads = args.threads if args.threads not in (None, -1) else max(1, (os.cpu_count() or 1) // workers)
    _note(args, f"starting a local Dask cluster: {workers} worker processes x {threads} threads ...")
    with LocalCluster(n_workers=workers, threads_per_worker=threads, processes=True,
                      dashboard_address=":0", worker_dashboard_address=None) as cluster, Client(cluster) as client:
        yield client


def build(args, X, ids, queries) -> int:
    """``ipq build`` with ``--workers`` / ``--scheduler``: train one encoder
    here, add the rows on the workers (shard s gets the s-th slice), save."""
    import time

    distributed = _distributed()
    out = Path(args.output)
    if out.exists() and not is_sharded(out) and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"--output {str(out)!r} exists and is not a sharded index: give a new or empty directory")
    with dask_client(args, args.workers or 2) as client:
        n_workers = len(client.scheduler_info()["workers"])
        shards = args.shards or n_workers
        t0 = time.perf_counter()
        sh = distributed.ShardedIndex(X.shape[1], args.index, shards, client,
                                      **({} if args.seed is None else {"seed": args.seed}))
        _note(args, f"training {args.index} on {X.shape[0]} x {X.shape[1]} ...")
        sh.train(X, queries)
        t_train = time.perf_counter() - t0
        sh.add(X, ids)
        build_s = time.perf_counter() - t0
        sh.save(out)
        print(f"wrote {out}/: {sh.spec}, {sh.ntotal} vectors in {shards} shards on {n_workers} workers, "
              f"d={X.shape[1]}, {sh.stored_nbytes / max(1, sh.ntotal):.1f} file bytes/vec, "
              f"train {t_train:.1f} s, build {build_s:.1f} s")
    return 0


def open_for_search(args, stack: contextlib.ExitStack):
    """The sharded index at ``args.index``, opened on a cluster entered on ``stack``."""
    distributed = _distributed()
    from .distributed import _manifest

    n_shards = int(_manifest.read(args.index)["n_shards"])
    client = stack.enter_context(dask_client(args, min(n_shards, os.cpu_count() or 1)))
    return distributed.load(args.index, client)


def info(path) -> dict:
    """What ``ipq info`` shows of a sharded index: its manifest (checked), no worker needed."""
    _distributed()
    from .distributed import _manifest

    rec = _manifest.read(path)
    data_bytes = sum(int(s["size"]) for s in rec["shards"])
    return {"path": str(path), "kind": "sharded", "spec": rec["spec"], "d": rec["d"],
            "n_shards": rec["n_shards"], "ntotal": rec["ntotal"], "next_id": rec["next_id"],
            "shard_sizes": [int(s["ntotal"]) for s in rec["shards"]],
            "shard_files": [s["file"] for s in rec["shards"]], "encoder_file": rec["encoder"]["file"],
            "file_bytes": data_bytes + int(rec["encoder"]["size"]),
            "file_bytes_per_vector": data_bytes / rec["ntotal"] if rec["ntotal"] else None}


def info_lines(info: dict) -> list[str]:
    sizes = np.asarray(info["shard_sizes"])
    return [
        f"directory       {info['path']} ({_human(info['file_bytes'])} in {info['n_shards'] + 1} files)",
        "kind            sharded (ipq_index.distributed; open with ipq_index.distributed.load)",
        f"spec            {info['spec']}",
        f"d               {info['d']}",
        f"ntotal          {info['ntotal']} in {info['n_shards']} shards "
        f"(rows per shard {sizes.min()}..{sizes.max()})",
        f"next id         {info['next_id']}",
        f"encoder         {info['encoder_file']}",
    ] + [f"  shard {s:<8} {f} ({n} rows)" for s, (f, n) in enumerate(zip(info["shard_files"], info["shard_sizes"]))]


def add_cluster_options(p) -> None:
    """--workers / --scheduler (build and search)."""
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="sharded index on a local Dask cluster of N worker processes")
    p.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="sharded index on an existing Dask cluster (e.g. tcp://host:8786)")


def check_cluster_options(args) -> None:
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.workers is not None and args.scheduler:
        raise ValueError("give --workers (a local cluster) or --scheduler (an existing one), not both")
    if getattr(args, "shards", None) is not None and args.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
