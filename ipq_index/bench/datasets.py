"""Dataset I/O for benchmarks and examples.

* :func:`read_hdf5` reads an `ann-benchmarks <https://github.com/erikbern/ann-benchmarks>`_
  style HDF5 file (datasets ``train``, ``test``, ``neighbors``, ``distances``;
  attribute ``distance``).
* :func:`read_fvecs`, :func:`read_bvecs`, :func:`read_ivecs`, :func:`write_fvecs`,
  :func:`write_ivecs` handle the TEXMEX ``*vecs`` formats (every row is a
  little-endian ``int32`` dimension followed by that many values).
* :func:`ground_truth` computes exact top-k neighbours with a FAISS flat index.
* :func:`load_sample` loads one of the small real samples shipped inside the
  package (``ipq_index/data/<name>.npz``); :func:`subsample` cuts a dataset
  down and recomputes its ground truth; :func:`load` accepts either an HDF5
  path or ``"sample:<name>"``.

Conventions.  For ``metric="dot"`` the neighbours are the largest inner
products and ``distances`` holds those inner products (descending).  For
``"angular"`` both sides are L2-normalised and ``distances`` holds the cosine
similarity (descending) when computed by :func:`ground_truth`; files read by
:func:`read_hdf5` keep whatever convention the file used (ann-benchmarks
stores ``1 - cos`` there).  For ``"euclidean"`` the neighbours are the
nearest points and ``distances`` holds the Euclidean distance (ascending).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .params import unit

__all__ = [
    "Dataset",
    "METRICS",
    "SAMPLES",
    "read_hdf5",
    "read_fvecs",
    "read_bvecs",
    "read_ivecs",
    "write_fvecs",
    "write_ivecs",
    "ground_truth",
    "load_sample",
    "subsample",
    "load",
]

#: Metrics understood by this module.
METRICS = ("dot", "angular", "euclidean")

_METRIC_ALIASES = {
    "dot": "dot",
    "ip": "dot",
    "inner_product": "dot",
    "innerproduct": "dot",
    "mips": "dot",
    "angular": "angular",
    "cosine": "angular",
    "euclidean": "euclidean",
    "l2": "euclidean",
}

_DATA_DIR = Path(__file__).resolve().parent.parent / "data"  # ipq_index/data

#: Names of the samples shipped in ``ipq_index/data``.
SAMPLES = ("minilm", "glove50")

#: Number of neighbours stored by :func:`subsample` and in the shipped samples.
GT_K = 100


@dataclass(frozen=True, eq=False)
class Dataset:
    """A MIPS / ANN benchmark dataset.

    Attributes
    ----------
    name : str
        Short name (used in result file names).
    train : ndarray, float32 (N, d), C-contiguous
        The database vectors.
    test : ndarray, float32 (Q, d), C-contiguous
        The query vectors.
    neighbors : ndarray, int64 (Q, K) or None
        Exact top-K ids into ``train`` per query, best first.
    distances : ndarray, float32 (Q, K) or None
        The scores of ``neighbors`` (see the module docstring for conventions).
    metric : str
        ``"dot"``, ``"angular"`` or ``"euclidean"``.
    provenance : str
        Free-text description of where the data came from (may be empty).
    """

    name: str
    train: np.ndarray
    test: np.ndarray
    neighbors: np.ndarray | None
    distances: np.ndarray | None
    metric: str
    provenance: str = ""

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self.train.shape[1])

    @property
    def n_train(self) -> int:
        return int(self.train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.test.shape[0])

    def __repr__(self) -> str:
        k = None if self.neighbors is None else self.neighbors.shape[1]
        return (
            f"Dataset(name={self.name!r}, train={self.train.shape}, test={self.test.shape}, "
            f"gt_k={k}, metric={self.metric!r})"
        )


# --------------------------------------------------------------------------- helpers


def _normalize_metric(metric) -> str:
    if isinstance(metric, bytes):
        metric = metric.decode("utf-8", "replace")
    if isinstance(metric, np.ndarray) and metric.shape == ():
        metric = metric.item()
        if isinstance(metric, bytes):
            metric = metric.decode("utf-8", "replace")
    key = str(metric).strip().lower()
    if key not in _METRIC_ALIASES:
        raise ValueError(f"unsupported metric {metric!r}; expected one of {METRICS}")
    return _METRIC_ALIASES[key]


def _as_matrix(X, name: str) -> np.ndarray:
    """Float32, C-contiguous, 2-D copy-if-needed of ``X``."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array, got shape {X.shape}")
    if not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"{name} must be numeric, got dtype {X.dtype}")
    return np.ascontiguousarray(X, dtype=np.float32)


def _check_exists(path) -> Path:
    p = Path(os.fspath(path))
    if not p.exists():
        raise FileNotFoundError(f"no such file: {str(p)!r}")
    if p.is_dir():
        raise ValueError(f"{str(p)!r} is a directory, not a file")
    return p


def _check_gt(neighbors, distances, n_test: int, n_train: int, where: str):
    if neighbors is not None:
        neighbors = np.asarray(neighbors)
        if neighbors.ndim != 2 or neighbors.shape[0] != n_test:
            raise ValueError(
                f"{where}: 'neighbors' has shape {neighbors.shape}, expected ({n_test}, k) "
                f"to match {n_test} test vectors"
            )
        if not np.issubdtype(neighbors.dtype, np.integer):
            raise ValueError(f"{where}: 'neighbors' must hold integers, got {neighbors.dtype}")
        neighbors = np.ascontiguousarray(neighbors, dtype=np.int64)
        if neighbors.size and (neighbors.max() >= n_train or neighbors.min() < -1):
            raise ValueError(
                f"{where}: 'neighbors' holds ids outside [0, {n_train}) (train has {n_train} rows)"
            )
    if distances is not None:
        distances = np.asarray(distances)
        if distances.ndim != 2 or distances.shape[0] != n_test:
            raise ValueError(
                f"{where}: 'distances' has shape {distances.shape}, expected ({n_test}, k)"
            )
        if neighbors is not None and distances.shape != neighbors.shape:
            raise ValueError(
                f"{where}: 'distances' shape {distances.shape} differs from "
                f"'neighbors' shape {neighbors.shape}"
            )
        distances = np.ascontiguousarray(distances, dtype=np.float32)
    return neighbors, distances


# --------------------------------------------------------------------------- HDF5


def read_hdf5(path, *, metric: str | None = None, name: str | None = None) -> Dataset:
    """Read an ann-benchmarks HDF5 file.

    Parameters
    ----------
    path : str or Path
        The ``.hdf5`` file.  It must contain ``train`` and ``test`` datasets
        with the same number of columns; ``neighbors`` and ``distances`` are
        optional.
    metric : str, optional
        Override (or supply, if the file has none) the ``distance`` attribute.
    name : str, optional
        Dataset name; defaults to the file name without its extension.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not HDF5, lacks ``train``/``test``, has inconsistent
        shapes, or has no / an unsupported ``distance`` attribute.
    """
    import h5py

    p = _check_exists(path)
    if not h5py.is_hdf5(p):
        raise ValueError(f"{str(p)!r} is not an HDF5 file")
    where = str(p)
    with h5py.File(p, "r") as f:
        missing = [key for key in ("train", "test") if key not in f]
        if missing:
            raise ValueError(
                f"{where}: missing required dataset(s) {missing}; found {sorted(f.keys())}"
            )
        for key in ("train", "test"):
            if not isinstance(f[key], h5py.Dataset):
                raise ValueError(f"{where}: {key!r} is a group, not a dataset")
        train = f["train"][()]
        test = f["test"][()]
        neighbors = f["neighbors"][()] if "neighbors" in f else None
        distances = f["distances"][()] if "distances" in f else None
        file_metric = f.attrs.get("distance")
        source = f.attrs.get("source", "")
        if isinstance(source, bytes):
            source = source.decode("utf-8", "replace")

    if metric is None:
        if file_metric is None:
            raise ValueError(
                f"{where}: no 'distance' attribute; pass metric='dot'|'angular'|'euclidean'"
            )
        metric = file_metric
    metric = _normalize_metric(metric)

    if train.ndim != 2 or test.ndim != 2:
        raise ValueError(
            f"{where}: 'train' and 'test' must be 2-D, got shapes {train.shape} and {test.shape}"
        )
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            f"{where}: dimension mismatch: train has d={train.shape[1]}, test has d={test.shape[1]}"
        )
    train = _as_matrix(train, "train")
    test = _as_matrix(test, "test")
    neighbors, distances = _check_gt(neighbors, distances, test.shape[0], train.shape[0], where)
    return Dataset(
        name=name if name is not None else p.name.split(".")[0],
        train=train,
        test=test,
        neighbors=neighbors,
        distances=distances,
        metric=metric,
        provenance=f"{p.name}: {source}" if source else p.name,
    )


# --------------------------------------------------------------------------- *vecs


def _read_vecs(path, value_dtype: np.dtype) -> np.ndarray:
    p = _check_exists(path)
    value_dtype = np.dtype(value_dtype)
    raw = np.fromfile(p, dtype=np.uint8)
    where = str(p)
    if raw.size == 0:
        return np.empty((0, 0), dtype=value_dtype)
    if raw.size < 4:
        raise ValueError(f"{where}: truncated file ({raw.size} bytes, no complete dimension header)")
    d = int(raw[:4].view("<i4")[0])
    if d <= 0:
        raise ValueError(f"{where}: invalid dimension header {d} in the first row")
    row_bytes = 4 + d * value_dtype.itemsize
    if raw.size % row_bytes:
        n_full = raw.size // row_bytes
        raise ValueError(
            f"{where}: truncated or inconsistent file: {raw.size} bytes is not a whole number "
            f"of rows of {row_bytes} bytes (d={d}); {n_full} complete rows"
        )
    rows = raw.reshape(-1, row_bytes)
    dims = np.ascontiguousarray(rows[:, :4]).view("<i4")[:, 0]
    bad = np.flatnonzero(dims != d)
    if bad.size:
        raise ValueError(
            f"{where}: inconsistent dimensions: row 0 has d={d} but row {int(bad[0])} "
            f"has d={int(dims[bad[0]])}"
        )
    values = np.ascontiguousarray(rows[:, 4:]).view(value_dtype.newbyteorder("<"))
    return np.ascontiguousarray(values, dtype=value_dtype)


def read_fvecs(path) -> np.ndarray:
    """Read a ``.fvecs`` file as a float32 (n, d) array."""
    return _read_vecs(path, np.float32)


def read_ivecs(path) -> np.ndarray:
    """Read an ``.ivecs`` file as an int32 (n, d) array."""
    return _read_vecs(path, np.int32)


def read_bvecs(path) -> np.ndarray:
    """Read a ``.bvecs`` file as a uint8 (n, d) array."""
    return _read_vecs(path, np.uint8)


def _write_vecs(path, X, dtype) -> None:
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {X.shape}")
    n, d = X.shape
    if d == 0 and n > 0:
        raise ValueError("cannot write rows of dimension 0")
    out = np.empty((n, d + 1), dtype=np.dtype(dtype).newbyteorder("<"))
    out.view("<i4")[:, 0] = d
    out[:, 1:] = X
    out.tofile(os.fspath(path))


def write_fvecs(path, X) -> None:
    """Write a 2-D array as ``.fvecs`` (values cast to float32)."""
    X = np.asarray(X)
    if X.ndim == 2 and not np.issubdtype(X.dtype, np.number):
        raise ValueError(f"X must be numeric, got dtype {X.dtype}")
    _write_vecs(path, X, np.float32)


def write_ivecs(path, X) -> None:
    """Write a 2-D integer array as ``.ivecs`` (values cast to int32)."""
    X = np.asarray(X)
    if X.ndim == 2 and not np.issubdtype(X.dtype, np.integer):
        raise ValueError(f"X must be an integer array, got dtype {X.dtype}")
    _write_vecs(path, X, np.int32)


# --------------------------------------------------------------------------- ground truth


def ground_truth(train, test, k: int = GT_K, metric: str = "dot"):
    """Exact top-``k`` neighbours of every ``test`` row among the ``train`` rows.

    Uses a FAISS flat index (``IndexFlatIP``; ``IndexFlatL2`` for
    ``"euclidean"``).  Ties are broken arbitrarily.

    Returns
    -------
    neighbors : ndarray, int64 (Q, k)
        Ids into ``train``, best first.
    distances : ndarray, float32 (Q, k)
        Inner products (``"dot"``), cosine similarities (``"angular"``), both
        descending, or Euclidean distances (``"euclidean"``), ascending.
    """
    import faiss

    metric = _normalize_metric(metric)
    X = _as_matrix(train, "train")
    Q = _as_matrix(test, "test")
    if X.shape[1] != Q.shape[1]:
        raise ValueError(f"dimension mismatch: train has d={X.shape[1]}, test has d={Q.shape[1]}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > X.shape[0]:
        raise ValueError(f"k={k} exceeds the number of train vectors ({X.shape[0]})")
    d = X.shape[1]
    if metric == "angular":
        X, Q = unit(X), unit(Q)
    if metric == "euclidean":
        index = faiss.IndexFlatL2(d)
    else:
        index = faiss.IndexFlatIP(d)
    index.add(X)
    D, I = index.search(Q, k)
    if metric == "euclidean":
        D = np.sqrt(np.maximum(D, 0.0))
    return np.ascontiguousarray(I, dtype=np.int64), np.ascontiguousarray(D, dtype=np.float32)


# --------------------------------------------------------------------------- samples


def sample_path(name: str) -> Path:
    """Path of the shipped sample ``name`` (``ipq_index/data/<name>.npz``)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown sample {name!r}; available: {list(SAMPLES)}")
    return _DATA_DIR / f"{name}.npz"


def load_sample(name: str = "minilm") -> Dataset:
    """Load a small real sample shipped with the package.

    ``"minilm"``: raw (un-normalised) paraphrase-MiniLM-L3-v2 sentence
    embeddings of PyPI package summaries, d=384; ``"glove50"``: GloVe 6B
    50-d word vectors with their natural norms.  Both are inner-product
    (``"dot"``) problems with exact top-100 ground truth.  The vectors are
    stored as float16 and returned as float32; the ground truth was computed
    on exactly those (float16-rounded) values.
    """
    p = sample_path(name)
    if not p.exists():
        raise FileNotFoundError(
            f"sample file {str(p)!r} is missing; rebuild it with eval/make_samples.py"
        )
    with np.load(p, allow_pickle=False) as z:
        train = np.ascontiguousarray(z["train"], dtype=np.float32)
        test = np.ascontiguousarray(z["test"], dtype=np.float32)
        neighbors = np.ascontiguousarray(z["neighbors"], dtype=np.int64)
        distances = np.ascontiguousarray(z["distances"], dtype=np.float32)
        metric = _normalize_metric(str(z["metric"]))
        provenance = str(z["provenance"]) if "provenance" in z.files else ""
    return Dataset(
        name=name,
        train=train,
        test=test,
        neighbors=neighbors,
        distances=distances,
        metric=metric,
        provenance=provenance,
    )


def _pick(n_total: int, n: int | None, rng: np.random.Generator | None, what: str) -> np.ndarray | None:
    if n is None or n == n_total:
        return None  # keep everything, original order
    n = int(n)
    if n < 1:
        raise ValueError(f"{what}: need at least 1 row, got {n}")
    if n > n_total:
        raise ValueError(f"{what}: asked for {n} rows but the dataset has only {n_total}")
    if rng is None:
        return np.arange(n)
    return rng.permutation(n_total)[:n]


def subsample(
    ds: Dataset,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int | None = 0,
    k: int = GT_K,
) -> Dataset:
    """A smaller copy of ``ds`` with freshly computed ground truth.

    Rows are drawn as ``default_rng(seed).permutation(N)[:n_train]`` for the
    train set and then (same generator) ``permutation(Q)[:n_test]`` for the
    test set; ``seed=None`` takes the first rows instead.  ``None`` (or the
    full size) keeps a side whole and in its original order.  Ground truth
    (``min(k, n_train)`` neighbours) is always recomputed with
    :func:`ground_truth`.
    """
    rng = None if seed is None else np.random.default_rng(seed)
    tr = _pick(ds.n_train, n_train, rng, "n_train")
    te = _pick(ds.n_test, n_test, rng, "n_test")
    train = ds.train if tr is None else np.ascontiguousarray(ds.train[tr])
    test = ds.test if te is None else np.ascontiguousarray(ds.test[te])
    neighbors, distances = ground_truth(train, test, min(k, train.shape[0]), ds.metric)
    parts = [ds.name]
    if tr is not None:
        parts.append(f"n{train.shape[0]}")
    if te is not None:
        parts.append(f"q{test.shape[0]}")
    how = "first rows" if seed is None else f"default_rng({seed}) permutation"
    prov = f"subsample of {ds.name} ({train.shape[0]} train / {test.shape[0]} test, {how})"
    if ds.provenance:
        prov += f"; {ds.provenance}"
    return Dataset(
        name="_".join(parts),
        train=train,
        test=test,
        neighbors=neighbors,
        distances=distances,
        metric=ds.metric,
        provenance=prov,
    )


def load(spec) -> Dataset:
    """Load ``"sample:<name>"`` via :func:`load_sample`, anything else via :func:`read_hdf5`."""
    s = os.fspath(spec)
    if isinstance(s, str) and s.startswith("sample:"):
        return load_sample(s[len("sample:"):])
    return read_hdf5(s)
