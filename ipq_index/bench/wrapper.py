"""What every benchmark wrapper shares (:class:`ipq_index.bench.ann_benchmarks.module.IpqIndex`
and the baselines of :mod:`ipq_index.bench.baselines`): input preparation,
query-argument bookkeeping and naming, the last batch's results, and
``done()``, which drops the index and restores a library thread count
saved by ``fit``."""

from __future__ import annotations

import numpy as np

from .params import unit


def _fmt(v) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


class WrapperBase:
    """Shared plumbing of the wrappers.  A subclass sets ``metric`` (normalised),
    implements ``_name_args`` (the build settings in its name) and, when
    ``fit`` changes a library's thread count, saves the previous one in
    ``_saved_threads`` and implements ``_set_threads``."""

    metric: str
    index = None
    _batch = None
    _saved_threads = None
    _query_params: dict

    # -- naming ---------------------------------------------------------------
    def _name_args(self) -> str:
        raise NotImplementedError

    def query_params_str(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in self._query_params.items())

    def _make_name(self) -> str:
        """``ClassName(build settings, query arguments)``: the run's name."""
        q = self.query_params_str()
        return f"{type(self).__name__}({self._name_args()}{', ' + q if q else ''})"

    @property
    def query_params(self) -> dict:
        """Keyword arguments currently passed to the search."""
        return dict(self._query_params)

    def _set_query_params(self, params: dict) -> None:
        """Use ``params`` from the next query on (the last batch is dropped, the name follows)."""
        self._query_params = params
        self._batch = None
        self.name = self._make_name()

    # -- input and results ----------------------------------------------------
    def _prep(self, X) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[None, :]
        X = np.ascontiguousarray(X, dtype=np.float32)
        return unit(X) if self.metric == "angular" else X

    def get_batch_results(self):
        """One id array per query of the last ``batch_query``, -1 dropped."""
        if self._batch is None:
            raise RuntimeError("get_batch_results() called before batch_query()")
        return [row[row >= 0] for row in self._batch[1]]

    def get_batch_arrays(self):
        """(scores float32 (nq, k), ids int64 (nq, k), -1 padded) of the last batch
        (our extension, used by ``ipq bench`` for the score error)."""
        if self._batch is None:
            raise RuntimeError("get_batch_arrays() called before batch_query()")
        return self._batch

    # -- release --------------------------------------------------------------
    def _set_threads(self, n: int) -> None:
        """Set the wrapped library's thread count (only called with a count saved in ``_saved_threads``)."""
        raise NotImplementedError

    def done(self):
        """Release the index and restore the thread count ``fit`` changed, if any."""
        if self._saved_threads is not None:
            self._set_threads(self._saved_threads)
            self._saved_threads = None
        self.index = None
        self._batch = None
