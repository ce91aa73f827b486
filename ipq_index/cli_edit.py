"""``ipq add`` and ``ipq remove``: commands that change a saved index in
place (loaded, changed, saved atomically), and the id lists they and
``ipq search --filter`` read."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .cli import _add_run_options, _command, _one_line, _read_npy, read_vectors


def read_ids(spec: str) -> np.ndarray:
    """Ids (int64) or a boolean id mask from ``spec``: a .npy file, a text
    file of integers (one per line or comma-separated) or a comma list."""
    p = Path(spec)
    if p.suffix.lower() == ".npy" and p.is_file():
        a = np.asarray(_read_npy(p, spec))
        if a.ndim != 1 or not (a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)):
            raise ValueError(f"{spec!r} must hold a 1-D array of integer ids or booleans, got {a.dtype} {a.shape}")
        return np.array(a)
    text = p.read_text() if p.is_file() else spec
    try:
        return np.array([int(t) for t in text.replace(",", " ").split()], np.int64)
    except ValueError as e:
        raise ValueError(f"{spec!r} is neither a file nor a list of integer ids ({_one_line(e)})") from None


def cmd_add(args, extra=None) -> int:
    import ipq_index

    index = ipq_index.load(args.index, mmap=False)
    X, metric = read_vectors(args.data, "train")
    if args.normalize or metric in ("angular", "cosine"):
        from .bench.params import unit

        X = unit(X)
    ids = None if args.ids is None else read_ids(args.ids)
    before = len(index)
    index.add(X, ids, num_threads=-1 if args.threads is None else args.threads)
    index.save(args.index)
    print(f"added {X.shape[0]} vectors to {args.index}: {before} -> {len(index)} "
          f"({X.shape[0] - (len(index) - before)} updated)")
    return 0


def cmd_remove(args, extra=None) -> int:
    import ipq_index

    index = ipq_index.load(args.index, mmap=False)
    ids = read_ids(args.ids)
    if ids.dtype == np.bool_:
        raise ValueError(f"{args.ids!r}: remove takes ids, not a mask")
    removed = index.remove_ids(ids)
    if removed:
        index.save(args.index)
    print(f"removed {removed} of {ids.size} ids from {args.index}: {len(index)} vectors remain")
    return 0


def add_add(sub, common) -> None:
    p = _command(sub, common, "add", cmd_add, help="add (or update) vectors in an index file",
                 description="Add vectors to a saved index and save it in place (atomically); "
                             "ids already in the index are updated.")
    p.add_argument("index", metavar="INDEX.ipq")
    p.add_argument("data", metavar="DATA", help="vectors: HDF5 (uses 'train'), .npy, .fvecs, .bvecs")
    p.add_argument("--ids", metavar="IDS", help="their ids (as --filter of search); default: after the largest")
    _add_run_options(p, "vectors")


def add_remove(sub, common) -> None:
    p = _command(sub, common, "remove", cmd_remove, help="remove vectors by id from an index file",
                 description="Remove the vectors with these ids and save the index in place (atomically).")
    p.add_argument("index", metavar="INDEX.ipq")
    p.add_argument("ids", metavar="IDS", help="ids: .npy, a text file of ids or a comma list")
