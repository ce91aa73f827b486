"""FAISS, hnswlib and ScaNN baselines behind the same wrapper contract as
:class:`ipq_index.bench.ann_benchmarks.module.IpqIndex` (``fit``,
``set_query_arguments``, ``query``, ``batch_query``, ``get_batch_results``,
``get_memory_usage``, ``done``, ``__str__``), so ``ipq bench`` times every
library the same way.  All search by raw inner product; ``"angular"``
normalises data and queries first.

Bytes per vector: every wrapper has ``file_bytes_per_vector()`` and
``ram_bytes_per_vector()``.  The baselines hold no derived search structures
besides what they store, so both return the same number (FAISS: see
:func:`faiss_bytes_per_vector`; hnswlib and ScaNN: estimates).

* :class:`FaissIndex`: ``faiss.index_factory(d, spec, METRIC_INNER_PRODUCT)``;
  query arguments are ``faiss.ParameterSpace`` settings (``"k_factor_rf=4"``,
  ``"nprobe=16"`` or a dict).  Refine indexes (``RFlat``) default to
  ``k_factor_rf=4`` (faiss' own default of 1 gives no gain).
* :class:`HnswlibIndex`: ``hnswlib.Index(space="ip")`` with ``M`` and
  ``ef_construction``; query argument ``ef``.  hnswlib reports ``1 - ip``; it is
  converted back to inner products.
* :class:`ScannIndex`: ScaNN (optional, not a dependency) with ``dot_product``
  scoring; build ``num_leaves``, ``avq_threshold``, ``dims_per_block``,
  ``reorder``; query arguments ``leaves_to_search`` and ``reorder``.
"""

from __future__ import annotations

import numpy as np

from .params import collect_query_args, normalize_metric
from .wrapper import WrapperBase

__all__ = ["FaissIndex", "HnswlibIndex", "ScannIndex", "DEFAULT_K_FACTOR_RF", "faiss_bytes_per_vector"]

#: k_factor_rf given to FAISS refine indexes when the config sets none.
DEFAULT_K_FACTOR_RF = 4


def _faiss_held_bytes(index) -> float | None:
    """Per-vector bytes of the data a FAISS index keeps for each vector, or
    ``None`` for structures this does not model (graphs and others)."""
    import faiss

    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexRefine):  # base codes + refine codes
        base, refine = _faiss_held_bytes(idx.base_index), _faiss_held_bytes(idx.refine_index)
        return None if base is None or refine is None else base + refine
    if isinstance(idx, faiss.IndexPreTransform):  # the transform (PCA, OPQ) is trained state
        return _faiss_held_bytes(idx.index)
    if isinstance(idx, faiss.IndexIDMap):  # explicit int64 ids
        inner = _faiss_held_bytes(idx.index)
        return None if inner is None else inner + 8
    if isinstance(idx, faiss.IndexIVF):  # inverted lists: code + int64 id per vector
        return float(idx.code_size + 8)
    if isinstance(idx, (faiss.IndexFlatCodes, faiss.IndexFastScan)):  # codes only, ids implicit
        return float(idx.sa_code_size())
    return None


def faiss_bytes_per_vector(index) -> float:
    """Bytes a FAISS index holds per vector, in memory and in its file alike.

    * flat codes (``Flat``, ``SQ``, ``PQ``, fast-scan, ``RaBitQ``, ...): the code,
      ``sa_code_size()``; vectors are numbered implicitly, no ids are stored;
    * IVF: the list code plus the 8-byte id stored next to it;
    * refine (``RFlat``): base codes plus refine codes; a pre-transform (PCA,
      OPQ): what the transformed index holds;
    * anything else (e.g. HNSW, whose graph is not modelled here): the
      serialised index size divided by ``ntotal`` (it includes the trained
      parameters, so it overstates a little).

    NaN for an empty index.
    """
    import faiss

    n = int(index.ntotal)
    if n == 0:
        return float("nan")
    held = _faiss_held_bytes(index)
    if held is not None:
        return held
    return float(faiss.serialize_index(index).nbytes / n)


class _Wrapper(WrapperBase):
    """Baseline plumbing: metric and thread settings, bytes per vector."""

    def __init__(self, metric, threads=None):
        self.metric = normalize_metric(metric)
        self.threads = threads if threads not in (None, -1) else None
        self._batch = None
        self._query_params: dict = {}
        self.name = str(self)

    def __str__(self):
        return self._make_name()

    def get_memory_usage(self):
        """Index size in kB: ``ram_bytes_per_vector() * ntotal / 1024`` (0 before ``fit``)."""
        n = self._ntotal()
        return 0.0 if n == 0 else self.ram_bytes_per_vector() * n / 1024.0

    def file_bytes_per_vector(self) -> float:
        """Per-vector bytes the library writes when saving the index (= :meth:`ram_bytes_per_vector`)."""
        return self._vector_bytes()

    def ram_bytes_per_vector(self) -> float:
        """Per-vector bytes the index holds in memory (= :meth:`file_bytes_per_vector`)."""
        return self._vector_bytes()

    def get_additional(self):
        return {}


class FaissIndex(_Wrapper):
    """A FAISS index from a factory string, inner-product metric."""

    def __init__(self, metric, spec, build_params=None, threads=None):
        self.spec = spec
        self.build_params = dict(build_params or {})
        super().__init__(metric, threads)

    def _name_args(self) -> str:
        return self.spec

    def _ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _is_refine(self) -> bool:
        import faiss

        return isinstance(faiss.downcast_index(self.index), faiss.IndexRefine)

    def _apply(self, params: dict) -> None:
        import faiss

        ps = faiss.ParameterSpace()
        for key, value in params.items():
            try:
                ps.set_index_parameter(self.index, key, float(value))
            except (RuntimeError, TypeError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ValueError(f"faiss {self.spec!r}: cannot set parameter {key}={value!r} "
                                 f"({first})") from None

    def _defaults(self) -> dict:
        base = {}
        if self._is_refine():
            base["k_factor_rf"] = DEFAULT_K_FACTOR_RF
        base.update(self.build_params)
        return base

    def fit(self, X, queries=None):
        import faiss

        X = self._prep(X)
        if self._saved_threads is None:
            self._saved_threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.threads or self._saved_threads)
        try:
            self.index = faiss.index_factory(X.shape[1], self.spec, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            raise ValueError(f"bad faiss factory string {self.spec!r}: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        self._apply({**self._defaults(), **self._query_params})
        self.index.train(X)
        self.index.add(X)
        self.index.search(X[:1], 1)  # warm-up
        faiss.omp_set_num_threads(1)
        self.name = str(self)
        return self

    def set_query_arguments(self, *args):
        params = collect_query_args(args, (), "faiss query argument")
        if self.index is not None:
            self._apply({**self._defaults(), **params})
        self._set_query_params(params)

    def query(self, v, n):
        _, I = self.index.search(self._prep(v), min(int(n), self._ntotal()))
        row = I[0]
        return row[row >= 0]

    def batch_query(self, X, n):
        import faiss

        faiss.omp_set_num_threads(self.threads or self._saved_threads)
        try:
            D, I = self.index.search(self._prep(X), min(int(n), self._ntotal()))
        finally:
            faiss.omp_set_num_threads(1)
        self._batch = (np.asarray(D, np.float32), np.asarray(I, np.int64))

    def _vector_bytes(self) -> float:
        """See :func:`faiss_bytes_per_vector`."""
        return faiss_bytes_per_vector(self.index)

    def _set_threads(self, n: int) -> None:
        import faiss

        faiss.omp_set_num_threads(n)


class HnswlibIndex(_Wrapper):
    """hnswlib HNSW graph over float32 vectors, inner product (scores = 1 - distance)."""

    def __init__(self, metric, M=16, ef_construction=200, threads=None, seed=100):
        self.M = int(M)
        self.ef_construction = int(ef_construction)
        self.seed = int(seed)
        self.d = None
        super().__init__(metric, threads)

    def _name_args(self) -> str:
        return f"M={self.M}, ef_construction={self.ef_construction}"

    def _ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.get_current_count())

    def fit(self, X, queries=None):
        import hnswlib

        X = self._prep(X)
        self.d = X.shape[1]
        p = hnswlib.Index(space="ip", dim=self.d)
        p.init_index(max_elements=X.shape[0], M=self.M, ef_construction=self.ef_construction,
                     random_seed=self.seed)
        p.add_items(X, np.arange(X.shape[0]), num_threads=self.threads or -1)
        p.set_num_threads(1)
        self.index = p
        ef = self._query_params.get("ef")
        if ef is not None:
            p.set_ef(int(ef))
        self.index.knn_query(X[:1], k=1, num_threads=1)  # warm-up
        self.name = str(self)
        return self

    def set_query_arguments(self, *args):
        params = collect_query_args(args, ("ef",), "hnswlib query argument")
        bad = sorted(set(params) - {"ef"})
        if bad:
            raise ValueError(f"hnswlib takes only the query argument 'ef', got {bad}")
        if "ef" in params:
            ef = params["ef"]
            if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1:
                raise ValueError(f"hnswlib ef must be a positive int, got {ef!r}")
            if self.index is not None:
                self.index.set_ef(int(ef))
        self._set_query_params(params)

    def _search(self, Q, n, threads):
        k = min(int(n), self._ntotal())
        labels, dist = self.index.knn_query(Q, k=k, num_threads=threads)
        return (1.0 - np.asarray(dist, np.float32)).astype(np.float32), np.asarray(labels, np.int64)

    def query(self, v, n):
        return self._search(self._prep(v), n, 1)[1][0]

    def batch_query(self, X, n):
        self._batch = self._search(self._prep(X), n, self.threads or -1)

    def _vector_bytes(self) -> float:
        """Estimate: float32 vector + level-0 links (2M + 1 int32) + 8-byte label
        (upper graph levels, about 1/M of the nodes, are ignored)."""
        return float(4 * self.d + 4 * (2 * self.M + 1) + 8) if self.d else float("nan")


class ScannIndex(_Wrapper):
    """Google ScaNN (optional; ``import scann``): a partitioning tree, anisotropic
    4-bit asymmetric hashing (``score_ah``) and an exact re-ordering of the best
    ``reorder`` candidates, scored by dot product.

    Build settings: ``num_leaves`` (default ``round(sqrt(n))``), ``avq_threshold``
    (anisotropic quantization threshold, default 0.2), ``dims_per_block`` (default
    2), ``reorder`` (re-order pool, 0 = none; default 100), ``training_sample_size``
    (default: all rows, at most 250,000).  Query arguments: ``leaves_to_search``,
    ``reorder`` (``pre_reorder_num_neighbors``).  ``batch_query`` uses ScaNN's own
    thread pool (``search_batched_parallel``); ``query`` is one ``search`` call.
    """

    QUERY_NAMES = ("leaves_to_search", "reorder")

    def __init__(self, metric, num_leaves=None, avq_threshold=0.2, dims_per_block=2, reorder=100,
                 training_sample_size=None, threads=None):
        self.num_leaves = None if num_leaves is None else int(num_leaves)
        self.avq_threshold = float(avq_threshold)
        self.dims_per_block = int(dims_per_block)
        self.reorder = int(reorder)
        self.training_sample_size = training_sample_size
        self.d = None
        self._n = 0
        super().__init__(metric, threads)

    def _name_args(self) -> str:
        return f"leaves={self.num_leaves}, AH{self.dims_per_block}, reorder={self.reorder}"

    def _ntotal(self) -> int:
        return self._n

    def fit(self, X, queries=None):
        import scann

        X = self._prep(X)
        self.d, self._n = X.shape[1], X.shape[0]
        leaves = self.num_leaves or max(1, int(round(np.sqrt(self._n))))
        sample = min(self._n, int(self.training_sample_size or 250_000))
        b = scann.scann_ops_pybind.builder(X, 10, "dot_product")
        b = b.tree(num_leaves=leaves, num_leaves_to_search=min(leaves, 16), training_sample_size=sample)
        b = b.score_ah(self.dims_per_block, anisotropic_quantization_threshold=self.avq_threshold)
        if self.reorder > 0:
            b = b.reorder(self.reorder)
        self.index = b.build()
        self.name = str(self)
        return self

    def set_query_arguments(self, *args):
        params = collect_query_args(args, self.QUERY_NAMES, "scann query argument")
        bad = sorted(set(params) - set(self.QUERY_NAMES))
        if bad:
            raise ValueError(f"scann takes the query arguments {list(self.QUERY_NAMES)}, got {bad}")
        for key, v in params.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"scann {key} must be a positive int, got {v!r}")
        self._set_query_params(params)

    def _kwargs(self, k: int) -> dict:
        kw = {"final_num_neighbors": k}
        if "leaves_to_search" in self._query_params:
            kw["leaves_to_search"] = int(self._query_params["leaves_to_search"])
        if "reorder" in self._query_params:
            kw["pre_reorder_num_neighbors"] = max(k, int(self._query_params["reorder"]))
        return kw

    def query(self, v, n):
        ids, _ = self.index.search(self._prep(v)[0], **self._kwargs(min(int(n), self._n)))
        return np.asarray(ids, np.int64)

    def batch_query(self, X, n):
        ids, scores = self.index.search_batched_parallel(self._prep(X), **self._kwargs(min(int(n), self._n)))
        self._batch = (np.asarray(scores, np.float32), np.asarray(ids, np.int64))

    def _vector_bytes(self) -> float:
        """Estimate: 4-bit code per ``dims_per_block`` dimensions, the float32
        re-order copy (when ``reorder``) and a 4-byte id."""
        if not self.d:
            return float("nan")
        code = np.ceil(self.d / self.dims_per_block) / 2
        return float(code + (4 * self.d if self.reorder > 0 else 0) + 4)
