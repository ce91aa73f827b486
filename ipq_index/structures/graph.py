"""The graph index: an HNSW graph (built by faiss) walked with ADC scores
on the codes."""

from __future__ import annotations

import threading

import numpy as np

from .. import cost_model
from .._kernels import fastscan as _fs
from .._kernels import graph_search as _gs
from .._numba import readonly, resolve_threads
from ..encoder import EncoderConfig
from ..settings import NAVS, GraphSettings, setting_property
from .base import _NO_CAND, PLAN_CODES, positive_int
from .flat import FlatIndex, _cut

_TAG_DTYPE = np.uint8
_TAG_MAX = int(np.iinfo(_TAG_DTYPE).max)  # visited tags wrap before this


class GraphIndex(FlatIndex):
    """HNSW-style graph walked with ADC scores on the codes.

    The graph is built by faiss ``IndexHNSWFlat`` with the inner-product metric
    on the float vectors (measured 0.975 vs 0.90 recall@10 at ef=256 for an
    L2 graph over the MIPS-to-NN augmentation x' = [x, sqrt(Phi^2 - |x|^2)]),
    so it serves vectors of any norm.  The
    walk scores nodes on the coarse fast-scan codes (or the full ADC, ``nav``)
    and the full ADC rescores the beam.  The float vectors are used only
    during ``add``; search reads the graph arrays and the codes (+ the re-rank
    copy).  Later ``add`` calls insert their vectors into the graph (the
    existing nodes scored by their float copy, else their decoded codes).
    """

    kind = "hnsw"
    settings_class = GraphSettings
    _coverage_name = "NAV_COVERAGE"  # default coverage of the navigation codes

    def __init__(self, d: int, M: int, config: EncoderConfig | None = None, *, rerank: int = 0,
                 rerank_dtype: str = "float16", spec: str | None = None, settings: GraphSettings | None = None):
        super().__init__(d, config, rerank=rerank, rerank_dtype=rerank_dtype, spec=spec, settings=settings)
        self.M = int(M)
        self.graph = None  # dict of arrays
        self._visit_buf = None  # visited tags reused across searches (see _take_visited)
        self._visit_tag = None  # next tag per row
        self._visit_lock = threading.Lock()

    ef = setting_property("Beam width by default (setting ``ef``).")
    ef_construction = setting_property("Beam width of the graph build (setting ``ef_construction``).")

    def _append_rows(self, X, codes, scales, new_ids, extra, num_threads):
        graph = self._grown_graph(X, num_threads)
        super()._append_rows(X, codes, scales, new_ids, extra, num_threads)
        self.graph = graph

    def _grown_graph(self, X, num_threads, old=None):
        """The graph with new vectors X inserted in the HNSW manner (faiss
        ``IndexHNSWFlat``, inner product: each new node searches its
        neighbours from the entry point, links to them and prunes their
        lists); the existing nodes keep their links and are scored by their
        float copy, or their decoded codes without one (``old``: the rows to
        start from instead of the index's graph, for ``compact``)."""
        import faiss

        hnsw = faiss.IndexHNSWFlat(self.d, self.M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.settings.ef_construction
        if old is not None:
            X = np.concatenate([old, X])
        elif self.nrows:
            g, n = self.graph, self.nrows
            hnsw.storage.add(self._float_rows())
            faiss.copy_array_to_vector(np.ascontiguousarray(g["neighbors"], np.int32), hnsw.hnsw.neighbors)
            faiss.copy_array_to_vector(np.ascontiguousarray(g["offsets"], np.uint64), hnsw.hnsw.offsets)
            faiss.copy_array_to_vector(_node_levels(g).astype(np.int32), hnsw.hnsw.levels)
            hnsw.hnsw.entry_point, hnsw.hnsw.max_level = int(g["entry"][0]), int(g["entry"][1])
            hnsw.ntotal = n
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(resolve_threads(num_threads))
        try:
            hnsw.add(np.ascontiguousarray(X, np.float32))
        finally:
            faiss.omp_set_num_threads(prev)
        g = hnsw.hnsw
        return {k: readonly(v) for k, v in {
            "neighbors": faiss.vector_to_array(g.neighbors).astype(np.int32),
            "offsets": faiss.vector_to_array(g.offsets).astype(np.int64),
            "cum": faiss.vector_to_array(g.cum_nneighbor_per_level).astype(np.int64),
            "entry": np.array([g.entry_point, g.max_level], np.int64)}.items()}

    def _float_rows(self, rows=None):
        """Float32 vectors of rows (all by default): the stored copy, else the decoded codes."""
        if self.vectors is not None:
            v = np.asarray(self.vectors)
            return (v if rows is None else v[rows]).astype(np.float32)
        return self.reconstruct(rows)

    def _keep_rows(self, keep):
        # the remaining nodes are linked anew (removed ones may have carried their links)
        graph = self._grown_graph(np.zeros((0, self.d), np.float32), -1, old=self._float_rows(keep))
        super()._keep_rows(keep)
        self.graph = graph

    def search(self, Q, k: int, *, rerank: int | None = None, ef: int | None = None,
               nav: str | None = None, filter=None, num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products with a beam of width ``ef`` (default: the
        index's; raised to the candidate count when smaller).

        ``nav``: the scores that steer the walk.  ``"coarse"`` (default)
        scores nodes on the fast-scan coarse codes (~M/2 lookups per node in
        int16 tables, ``FastScanner.nav_tables``, instead of one float
        lookup per code byte) and rescores the ``ef`` best with the full ADC;
        ``"full"`` walks on the full ADC.  Codes of 6-8 bits rescore the
        beam more precisely than 4-bit ones at the same walk cost, so they
        reach a recall at a smaller ``ef``.  ``ef`` and ``nav`` default to
        the index's settings.  ``filter``: as in ``FlatIndex.search``; the
        walk goes through filtered-out (and removed) nodes but keeps only
        allowed ones, and runs until its beam holds ``ef`` of them; when
        few rows pass (``cost_model.scan_beats_walk``), the allowed rows
        alone are fast-scanned on the navigation codes instead.
        """
        key = self._call_key(return_std, filter, k, rerank, ef, nav, num_threads)
        out = self._prepared_call(key, Q)
        if out is not None:
            return out
        efv = self.ef if ef is None else positive_int(ef, "ef")
        nav = self.settings.nav if nav is None else nav
        if nav not in NAVS:
            raise ValueError(f"nav must be one of {NAVS}, got {nav!r}")

        def prepare(k, rr, kk, exact_ns, allow, m):
            e = min(max(efv, kk), self.nrows)
            if allow is not None and cost_model.scan_beats_walk(
                    self.encoder, m, self.ntotal, e, self._fast_scanner().coarse_bytes, self._coarse_count(
                        self._fs_factor(None, m), kk)):
                return self._scan_calls(k, rr, kk, exact_ns, allow, m, None, None)  # the allowed rows alone
            return self._walk_calls(k, rr, kk, e, exact_ns, nav, allow)

        return self._search_with(Q, k, rerank, num_threads, return_std, key, prepare, filter)

    def _scan_lists(self):
        return "codes"  # plain coarse codes for navigation, no FAISS index

    def _lead_dims(self, sc):
        return self.d  # the walk rescores on every dimension: no narrowed rotation (nor its copy)

    def _walk_calls(self, k, rr, kk, e, exact_ns, nav, allow):
        """(single, batch) calls of the whole walk in one kernel
        (``_gs.graph_query_serial``), exact re-rank included, for
        ``_search_with``: a few queries on the calling thread, more
        QUERY_CHUNK at a time on the thread pool, each thread with its own
        visited row.  The beam (width e) is rescored by the plan the cost
        model picks; ``nav="full"`` walks on the full ADC instead and keeps
        its best kk.  ``allow``: the rows the walk may keep (None: all)."""
        sc = self._fast_scanner()
        n = self.nrows
        R, mean, levels, fields, tabs, codes, scales, ids, V, no_V = self._search_arrays()
        _, _, cl, walk = self._scan_arrays(sc)
        plan = "fields"
        if nav == "coarse":
            plan = cost_model.rescore_plan(self.encoder, e, kk, exact_ns, self.settings.exact_preference,
                                           cl=None if cl is _NO_CAND else cl)
        else:
            walk = (*walk[:2], None, *walk[3:])  # no navigation codes: walk on the full ADC
        cap, code, copy = self._beam_cap(e), PLAN_CODES[plan], V if rr else no_V

        def call(Qc, visited, tags, part):
            tag0 = self._next_tag(visited, tags, part, Qc.shape[0])
            return _gs.graph_query_serial(Qc, R, mean, *walk, e, cap, visited[part:part + 1], tag0, allow, levels,
                                          fields, cl, tabs, codes, scales, kk, code, ids, copy, k)

        def single(Qc):
            visited, tags, held = self._take_visited(1, n)
            try:
                return call(Qc, visited, tags, 0)
            finally:
                if held:
                    self._visit_lock.release()

        def batch(Q, nthreads):
            visited, tags, held = self._take_visited(nthreads, n)
            try:
                return self._over_chunks(Q, nthreads, lambda Qc, part: _cut(call(Qc, visited, tags, part), k))
            finally:
                if held:
                    self._visit_lock.release()

        return single, batch

    @staticmethod
    def _allowed_layout(sc, ok):
        """A filtered scan's block layout (``FlatIndex._allowed_layout``) from
        the navigation codes: one list of the rows ``ok`` keeps."""
        rows = np.flatnonzero(ok).astype(np.int64)
        blocks, local, ptr, fill = _fs.layout_blocks(sc.codes, np.array([0, rows.size], np.int64), rows)
        return blocks, local, ptr, fill

    def _candidate_args(self, sc):
        """The walk's arguments of the search kernel: navigation layout and
        codes, graph arrays, entry point and its level (the graph changes
        with the rows only, which rebuilds the scanner these are kept on)."""
        gr = self.graph
        return (sc.slot_dim, sc._centT, sc.codes, gr["neighbors"], gr["offsets"], gr["cum"],
                int(gr["entry"][0]), int(gr["entry"][1]))

    def _beam_cap(self, e):
        """Bound of the walk's candidate heap for beam width e (pushes beyond it are dropped)."""
        return min(self.nrows + 1, 64 * e + 4096)

    def _take_visited(self, slots, n):
        """(visited-tag rows (slots, n) uint8, their next tags (slots,), held)
        for a walk over n rows (the search's snapshot of the index):
        rows kept between searches, one per thread of a search (row p for
        part p), zeroed when their tags wrap (``_next_tag``; zeroing an
        n-byte array per query costs more than the walk at 10^6 vectors; one
        byte per row keeps them in the L2 cache: GloVe 399k, ef=256, 7,300
        rows scored per query: 435 -> 420 us against int32 tags).  ``held``:
        the caller holds the rows' lock and releases it after the walk; a
        concurrent search from another Python thread gets fresh rows instead
        (held False)."""
        if not self._visit_lock.acquire(blocking=False):
            return np.zeros((slots, n), _TAG_DTYPE), np.zeros(slots, np.int64), False
        try:
            buf = self._visit_buf
            if buf is None or buf.shape[0] < slots or buf.shape[1] != n:
                buf = self._visit_buf = np.zeros((max(slots, 1), n), _TAG_DTYPE)
                self._visit_tag = np.zeros(buf.shape[0], np.int64)
            return buf[:slots], self._visit_tag, True
        except BaseException:
            self._visit_lock.release()
            raise

    @staticmethod
    def _next_tag(visited, tags, p, nq):
        """First tag of nq queries walking with row p (the walk marks rows with
        tag + 1 .. tag + nq); the row is zeroed when they would wrap."""
        if nq >= _TAG_MAX:
            raise ValueError(f"{nq} queries per walk exceed the visited tags ({_TAG_MAX - 1})")
        if tags[p] + nq >= _TAG_MAX:
            visited[p].fill(0)
            tags[p] = 0
        t = int(tags[p])
        tags[p] += nq  # before the walk: a failed call leaves no reusable tags
        return t

    def _warmup_params(self):
        # a wide beam is rescored with lookup tables (they beat the 16-field
        # blocks above ~200-600 rows: cost_model.rescore_plan); the full-ADC
        # walk is a kernel build of its own
        return ({}, {"ef": 1024}, {"nav": "full"})

    def _extra_state(self):
        meta = {"M": self.M}
        graph = self.graph
        if graph is None:  # trained, nothing added yet: a graph of no nodes (level 0 as faiss lays it out)
            graph = {"neighbors": np.zeros(0, np.int32), "offsets": np.zeros(1, np.int64),
                     "cum": np.array([0, 2 * self.M], np.int64), "entry": np.array([-1, -1], np.int64)}
        return meta, {f"graph.{k}": v for k, v in graph.items()}

    def _load_extra(self, meta, arrays):
        self.graph = {k: arrays[f"graph.{k}"] for k in ("neighbors", "offsets", "cum", "entry")}

    @classmethod
    def _size_args(cls, header):
        return (int(header.get("M", 0)),)


def _node_levels(graph):
    """Levels per node (faiss ``HNSW.levels``: 1 = level 0 only) from the offsets and ``cum``."""
    span = np.diff(np.asarray(graph["offsets"]))
    return np.searchsorted(np.asarray(graph["cum"]), span)
