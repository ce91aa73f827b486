"""ann-benchmarks wrapper for ipq_index (also used by ``ipq bench`` for ipq methods).

The ann-benchmarks runner imports ``<module>.module`` and calls, in order::

    algo = IpqIndex(metric, spec)            # constructor: stores parameters only
    algo.fit(X_train)                        # timed build
    for group in query_args:                 # same index, several search settings
        algo.set_query_arguments(*group)
        algo.query(q, n) for q in X_test     # single mode, one CPU
        # or: algo.batch_query(X_test, n); algo.get_batch_results()
    algo.done()

Contract details honoured here:

* ``metric``: ``"angular"`` (or ``"cosine"``) L2-normalises the data in ``fit``
  and every query; ``"dot"`` / ``"ip"`` / ``"inner_product"`` / ``"mips"``
  use raw inner products (ann-benchmarks itself has no ``dot`` metric; our
  own runner ``ipq bench`` has).  ``"euclidean"`` is rejected.
* ``fit`` first calls :meth:`IpqIndex.warmup` (``ipq_index.warmup(spec)``:
  compiles, or loads from numba's on-disk cache, every kernel the spec uses to
  build and search; its seconds are ``compile_s`` and in ``get_additional()``)
  unless it already ran for this object, then trains and adds (ids = row
  numbers of ``X``), calls ``index.warmup()`` (derived search structures, so
  none of that falls inside a timed query), then forces one thread
  (``ipq_index.set_num_threads(1)``) for single-query mode.  ``done()``
  restores the previous thread count.  ann-benchmarks times the whole ``fit``
  as build time, so warm the numba cache first (``ipq warmup SPEC ...``) to
  keep compilation out of it; ``ipq bench`` calls ``warmup()`` itself, outside
  the timed ``fit``.
* ``query`` returns at most ``n`` unique row ids, ``-1`` (empty slots) dropped.
* ``batch_query`` uses ``threads`` threads (default: all cores);
  ``get_batch_results`` returns one id array per query, ``-1`` dropped.
* ``get_memory_usage`` is ``index.nbytes`` in kB (not the process RSS);
  ``file_bytes_per_vector`` / ``ram_bytes_per_vector`` are
  ``index.stored_nbytes`` / ``index.nbytes`` divided by the number of vectors.
* ``set_query_arguments`` accepts a dict (``{"rerank": 4}``), ``"name=value"``
  strings, or bare positional values mapped to ``query_arg_names`` (default
  :data:`ipq_index.bench.params.QUERY_ARG_NAMES`: ``rerank``, then ``nprobe``, then ``ef``; ``None``
  leaves a setting at the index default).  The values are passed as keyword
  arguments to ``index.search``; names the index does not accept raise
  ``ValueError``.
* ``str(algo)`` (the run's name in ann-benchmarks) encodes the spec and the
  current query arguments.
"""

from __future__ import annotations

from ..params import QUERY_ARG_NAMES, check_search_params, collect_query_args, normalize_metric
from ..wrapper import WrapperBase

try:  # inside an ann-benchmarks checkout: subclass its BaseANN (duck typing works too)
    from ann_benchmarks.algorithms.base.module import BaseANN as _Base
except Exception:  # noqa: BLE001 - ann-benchmarks is optional and not pip-installable
    _Base = object

__all__ = ["IpqIndex"]


class IpqIndex(WrapperBase, _Base):
    """ann-benchmarks style wrapper around ``ipq_index.index_factory(d, spec)``.

    Parameters
    ----------
    metric : str
        ``"angular"`` or ``"dot"`` (see the module docstring).
    spec : str
        ipq_index factory string, e.g. ``"PCA,ASQ4,Rerank4"``.
    build_args : dict, optional
        Extra keyword arguments for ``index_factory`` (encoder overrides such as
        ``seed`` or ``sample_size``, or the fast-scan ``coverage``).
    query_arg_names : sequence of str or comma-separated str, optional
        Names given to bare positional query arguments (default
        :data:`QUERY_ARG_NAMES`).
    threads : int, optional
        Threads for ``fit`` and ``batch_query`` (-1 or None: all cores).
        ``query`` always uses one.
    warmup : bool, optional
        ``fit`` calls :meth:`warmup` first unless it already ran (default True);
        False leaves compilation to the first use, inside ``fit``.
    """

    def __init__(self, metric, spec, build_args=None, query_arg_names=None, threads=-1, warmup=True):
        self.metric = normalize_metric(metric)
        if not isinstance(spec, str) or not spec.strip():
            raise ValueError(f"spec must be a non-empty ipq_index factory string, got {spec!r}")
        self.spec = spec.strip()
        self.build_args = dict(build_args or {})
        if isinstance(query_arg_names, str):
            query_arg_names = [n.strip() for n in query_arg_names.split(",") if n.strip()]
        self.query_arg_names = tuple(query_arg_names or QUERY_ARG_NAMES)
        self.threads = -1 if threads is None else int(threads)
        self.warmup_in_fit = bool(warmup)
        self.compile_s: float | None = None  #: seconds of the last warmup() call
        self.index = None
        self._query_params: dict = {}
        self._saved_threads = None
        self._batch = None
        self.name = self._make_name()

    # -- naming (query_params: the keyword arguments passed to ``index.search``)
    def _name_args(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"<{self.name} metric={self.metric}>"

    def query_params_str(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self._query_params.items())

    # -- build ----------------------------------------------------------------
    def warmup(self) -> float:
        """Compile (or load from the numba cache) every kernel an index of this
        spec uses to build and search: ``ipq_index.warmup(spec)``.  Returns and
        stores (``compile_s``) its seconds."""
        import ipq_index

        self.compile_s = float(ipq_index.warmup(self.spec))
        return self.compile_s

    def fit(self, X, queries=None):
        """Compile the spec's kernels (:meth:`warmup`, unless it already ran),
        train on ``X``, add ``X`` (ids = row numbers), build the derived search
        structures (``index.warmup()``), then pin one thread.

        ``queries`` (our extension, not part of ann-benchmarks): sample queries
        for the bit allocation, passed to ``index.train(X, queries=...)``.
        """
        import ipq_index

        if self.warmup_in_fit and self.compile_s is None:
            self.warmup()
        X = self._prep(X)
        if queries is not None:
            queries = self._prep(queries)
        index = ipq_index.index_factory(X.shape[1], self.spec, **self.build_args)
        check_search_params(index, self._query_params)
        index.train(X, queries=queries, num_threads=self.threads)
        index.add(X, num_threads=self.threads)
        index.warmup()
        self.index = index
        if self._saved_threads is None:
            self._saved_threads = ipq_index.get_num_threads()
        ipq_index.set_num_threads(1)
        return self

    # -- query settings -------------------------------------------------------
    def set_query_arguments(self, *args):
        """Set the search keyword arguments for the following queries (see class doc)."""
        params = collect_query_args(args, tuple(self.query_arg_names))
        if self.index is not None:
            check_search_params(self.index, params)
        self._set_query_params(params)

    # -- search ---------------------------------------------------------------
    def _k(self, n: int) -> int:
        return max(1, min(int(n), len(self.index)))

    def query(self, v, n):
        """Ids (int64) of the top ``n`` inner products of one vector, -1 dropped."""
        _, ids = self.index.search(self._prep(v), self._k(n), num_threads=1, **self._query_params)
        row = ids[0]
        return row[row >= 0]

    def batch_query(self, X, n):
        """Search all rows of ``X`` at once with ``threads`` threads."""
        self._batch = self.index.search(self._prep(X), self._k(n), num_threads=self.threads,
                                        **self._query_params)

    # -- accounting -----------------------------------------------------------
    def get_memory_usage(self):
        """Index size in kB (``index.nbytes / 1024``; 0 before ``fit``)."""
        return 0.0 if self.index is None else self.index.nbytes / 1024.0

    def file_bytes_per_vector(self) -> float:
        """What ``save`` writes per vector (codes, scales, ids, re-rank copy,
        structure arrays): ``index.stored_nbytes / len(index)``."""
        return float(self.index.stored_nbytes) / max(1, len(self.index))

    def ram_bytes_per_vector(self) -> float:
        """What the index holds in memory per vector, including derived search
        structures (built by ``fit``): ``index.nbytes / len(index)``."""
        return float(self.index.nbytes) / max(1, len(self.index))

    def get_additional(self):
        """Extra result attributes for ann-benchmarks: ``compile_s`` once :meth:`warmup` ran."""
        return {} if self.compile_s is None else {"compile_s": self.compile_s}

    def _set_threads(self, n: int) -> None:
        """ipq_index's default thread count (``done`` restores the one ``fit`` changed)."""
        import ipq_index

        ipq_index.set_num_threads(n)
