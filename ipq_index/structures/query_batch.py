"""One chunk of a search's queries (``QueryBatch``: rotated queries, lookup
tables on demand, the rescoring of candidate rows by the planned method)
and the exact re-rank of candidates with the stored copy."""

from __future__ import annotations

import numpy as np

from .. import cost_model
from .._kernels import cand_adc as _cand
from .._kernels import fields as _field_adc
from .._kernels import rerank as _rr
from .._kernels import tables as _tables
from .._kernels import topk as _topk


class QueryBatch:
    """One chunk of queries: rotated once; lookup tables built only when a
    search path asks for them (rescoring a short candidate list computes the
    ADC field by field instead, which is cheaper than building the tables).
    ``exact_ns``: the per-dimension cost of the exact re-rank that follows
    (0: the search does not re-rank)."""

    def __init__(self, encoder, Q, exact_ns=0.0, part=0, preference=1.0):
        self.encoder = encoder
        self.Q = Q
        self.Y = encoder.rotate_queries(Q, num_threads=1)
        self._tables = None
        self.exact_ns = exact_ns
        self.part = part  # which of the search's threads runs this batch
        self.preference = preference  # setting exact_preference (``cost_model.rescore_plan``)

    def tables(self):
        if self._tables is None:
            self._tables = self.encoder.rotated_tables(self.Y, num_threads=1)
        return self._tables

    def scores(self, V):
        """ADC scores V (nq, k) of the centred codes plus <q, mean>: inner
        products, float32 (float64 sums)."""
        return _topk.add_offsets(V, self.Q, np.asarray(self.encoder.mean, np.float64))

    def rescore(self, cand, kk, codes, scales, cl=None):
        """Full-ADC top-kk of candidate rows (nq, c) (-1 = none), on the
        calling thread (``IndexBase._search`` splits the queries).  Field by field when that is cheaper
        than building the tables and summing table lookups (costs above).
        When the search re-ranks exactly afterwards and exact dot products
        of all c candidates cost at most ``exact_preference`` times this ADC pass
        plus kk exact dot products, the candidates are returned as they are
        (scores None) and go straight to the exact re-rank: at 50k MiniLM
        rows, 40 coarse candidates, 19 vs 35 us per query at the same recall.
        The exact path ranks a superset of the ADC path's candidates
        exactly, so near a tie it is the better choice (setting ``exact_preference``)."""
        enc = self.encoder
        plan = cost_model.rescore_plan(enc, cand.shape[1], kk, self.exact_ns, self.preference, self._tables is not None, cl)
        if plan == "exact":
            return None, cand
        if plan == "cand":
            return _cand.candidate_topk(self.Y, enc.levels32(), cl, codes, scales, cand, kk)
        if plan == "fields":
            return _field_adc.rescore_fields(self.Y, enc.levels32(), enc.field_layout(), codes, scales, cand, kk)
        return _tables.rescore_topk(self.tables(), codes, scales, cand, kk)


def copy_rows(vectors):
    """The stored copy as the re-rank kernels read it: float32 rows, or the
    bit patterns (uint16) of float16 rows."""
    vectors = np.asarray(vectors)
    return vectors.view(np.uint16) if vectors.dtype == np.float16 else vectors


def rerank_exact(Q, vectors, cand, k):
    """Exact inner products of each query with its candidate rows (-1 = none),
    accumulated in float64; top-k (scores float32 descending, rows -1 padded)."""
    V = copy_rows(vectors)
    return _rr.rerank(np.ascontiguousarray(Q, np.float32), V, np.ascontiguousarray(cand, np.int64), k)
