"""The machinery every index shares (``IndexBase``): encoder, codes, ids and
the re-rank copy; train / add; the one search path (validation, the
structure's kernel call on the calling thread or over query chunks on the
thread pool, prepared single-query calls, score error bars) and the search
kernels' per-index arguments; warm-up, save and rebuild from a file's header.

Scores are raw inner products (float32, descending), not ``1 - ip``.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import asdict

import numpy as np

from .. import cost_model, storage
from .._kernels import rerank as _rr
from .._kernels import rotation as _rotation
from .._kernels import tables as _tables
from .._numba import SERIAL_QUERIES, concat_rows, map_chunks, readonly, resolve_threads
from ..encoder import ASQEncoder, EncoderConfig, check_matrix
from ..fast_scanner import FastScanner
from ..filters import _IdFilter, as_filter
from ..settings import FlatSettings

#: queries processed together (bounds the lookup-table memory)
QUERY_CHUNK = 32


class IndexBase:
    """What every index structure shares; a structure (``FlatIndex``,
    ``IVFIndex``, ``GraphIndex``) adds ``search``, its candidate stage and
    its own state (``_extra_state`` / ``_load_extra``, ``_size_args``)."""

    #: the structure's name in file headers and specs (``structures.KINDS``)
    kind: str
    #: its per-index settings record
    settings_class: type
    _coverage_name = "COVERAGE"  # fast_scanner constant holding the default coverage (unscaled codes)

    def __init__(self, d: int, config: EncoderConfig | None = None, *, rerank: int = 0,
                 rerank_dtype: str = "float16", spec: str | None = None, settings: FlatSettings | None = None):
        self.d = int(d)
        if settings is not None and not isinstance(settings, self.settings_class):
            raise TypeError(f"settings of a {type(self).__name__} must be a {self.settings_class.__name__}")
        self.settings = settings if settings is not None else self.settings_class()
        self.encoder = ASQEncoder(self.d, config or EncoderConfig())
        if rerank_dtype not in ("float16", "float32"):
            raise ValueError(f"rerank_dtype must be float16 or float32, got {rerank_dtype!r}")
        self.rerank = int(rerank)
        self.rerank_dtype = rerank_dtype
        self.spec = spec or self._default_spec()
        self.codes = np.zeros((0, 0), np.uint8)
        self.scales = np.zeros(0, np.float32)
        self.ids = np.zeros(0, np.int64)
        self.vectors = None  # re-rank copy
        self.removed = None  # tombstones: uint8 (nrows,), 1 = removed by remove_ids (None: none)
        self._n_removed = 0
        self._lock = threading.RLock()  # a search snapshots the rows under it; add/remove/compact change them under it
        self._live_allow = None  # uint8 (nrows,) of the rows not removed (derived from ``removed``)
        self._live_token = object()  # replaced whenever the rows or removals change
        self._scanner = None  # fast-scan candidate generator (derived, rebuilt lazily)
        self._scanner_rows = -1
        self._search_state = None  # per-index arguments of the search kernels (see _search_arrays)
        self._prepared_calls = {}  # prepared single-query calls per parameter set (see _prepared_call)
        self._rows_layout = None  # scan layout without coarse codes (FlatIndex._row_layout)

    def _default_spec(self):
        c = self.encoder.config
        t = {"none": "", "pca": "PCA,", "random": "ROT,"}[c.transform]
        flags = ("u" if c.rounding == "unbiased" else "") + {True: "s", False: "n", None: ""}[c.scale] + \
            ("m" if c.objective == "max" else "")
        bits = f"{c.bits:g}"
        rr = f",Rerank{self.rerank}{'F32' if self.rerank_dtype == 'float32' else ''}" if self.rerank else ""
        return f"{t}ASQ{bits}{flags}{rr}"

    # -- properties ---------------------------------------------------------
    @property
    def is_trained(self) -> bool:
        return self.encoder.is_trained

    @property
    def ntotal(self) -> int:
        """Vectors the index holds (removed ones not counted)."""
        return int(self.ids.shape[0]) - self._n_removed

    @property
    def nrows(self) -> int:
        """Rows held, removed ones included until ``compact``."""
        return int(self.ids.shape[0])

    def __len__(self) -> int:
        return self.ntotal

    @property
    def nbytes(self) -> int:
        """Bytes of data held: codes, scales, ids, the re-rank copy and derived
        search structures once built (the fast-scan coarse codes, the graph
        or the list index; see ``stored_nbytes`` for what ``save`` writes)."""
        total = self.stored_nbytes
        if self._scanner is not None:
            total += self._scanner.nbytes
        return int(total)

    @property
    def stored_nbytes(self) -> int:
        """Bytes of the per-vector data that ``save`` writes (codes, scales,
        ids, re-rank copy, graph/IVF arrays)."""
        total = self.codes.nbytes + self.ids.nbytes + (self.scales.nbytes if self.encoder.config.scale else 0)
        if self.vectors is not None:
            total += self.vectors.nbytes
        if self.removed is not None:
            total += self.removed.nbytes
        total += sum(int(np.asarray(a).nbytes) for a in self._extra_state()[1].values())
        return int(total)

    def configure(self, **settings) -> "IndexBase":
        """Change per-index settings (see ``settings_class``; validated, saved
        with the index); derived search structures are rebuilt on the next
        search.  Returns the index."""
        new = self.settings.replace(**settings)
        with self._lock:
            self.settings = new
            self._reset_derived()
        return self

    def _reset_derived(self):
        """Drop what is derived from the codes and settings (rebuilt lazily)."""
        self._scanner = None
        self._search_state = None
        self._prepared_calls = {}
        self.encoder._plans = {}

    def resolved_settings(self) -> dict:
        """The settings with automatic values resolved (what ``ipq info``
        shows and ``save`` writes)."""
        return {**self.settings.to_dict(), "coverage": self.coverage}

    @property
    def coverage(self) -> float:
        """Share of the estimated score variance the fast-scan coarse scores
        keep (setting ``coverage``; automatic: ``fast_scanner.COVERAGE``,
        ``fast_scanner.COVERAGE_SCALED`` for scaled codes, ``fast_scanner.NAV_COVERAGE``
        for a graph's navigation codes).  Lower values scan fewer bytes per
        row but rank candidates more coarsely (raise ``fs`` to compensate)."""
        if self.settings.coverage is not None:
            return self.settings.coverage
        from .. import fast_scanner

        return fast_scanner.COVERAGE_SCALED if self.encoder.config.scale else getattr(fast_scanner, self._coverage_name)

    @coverage.setter
    def coverage(self, value):
        self.configure(coverage=value)

    @property
    def code_size(self) -> int:
        """Compressed bytes per vector (codes + scale), excluding id and re-rank copy."""
        return self.encoder.code_size

    def __repr__(self):
        return f"{type(self).__name__}(d={self.d}, spec={self.spec!r}, ntotal={self.ntotal}, trained={self.is_trained})"

    # -- build ----------------------------------------------------------------
    def train(self, X, queries=None, *, weights=None, num_threads=-1):
        """Learn mean, transform, bit allocation and level sets from ``X``.

        ``queries`` (optional sample queries) set the per-dimension query
        energy used by the bit allocation; otherwise the corpus is used.
        An index that already holds vectors cannot be retrained (their codes
        belong to the current quantizer): build a new index instead.
        """
        if self.nrows:
            raise RuntimeError(f"the index holds {self.nrows} vectors encoded with the current "
                               "quantizer: create a new index to retrain")
        X = check_matrix(X, self.d, "training data")
        self._check_training(X)
        # everything is learnt aside and swapped in last: a failed train leaves the index as it was
        enc = ASQEncoder(self.d, self.encoder.config)
        enc.train(X, queries, weights=weights, num_threads=num_threads)
        commit = self._train_structure(X, enc)
        with self._lock:
            self.encoder = enc
            self.codes = np.zeros((0, enc.nbytes), np.uint8)
            self._reset_derived()
            commit()
        return self

    def _check_training(self, X):
        """Raise before anything is learnt when ``X`` cannot train the structure."""

    def _train_structure(self, X, enc):
        """Learn what the structure adds to the encoder ``enc`` (not yet the
        index's) from ``X``; returns the call that installs it (run after
        the encoder is swapped in)."""
        return lambda: None

    def add(self, X, ids=None, *, on_duplicate="replace", num_threads=-1):
        """Encode and append vectors; ``ids`` default to 0..n-1 continuing
        after the largest id held.  An id already in the index is an update:
        its old vector is removed and the new one added (``on_duplicate=
        "replace"``), or the call raises and changes nothing
        (``"error"``).  Ids repeated within one call raise."""
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train() before add()")
        if on_duplicate not in ("replace", "error"):
            raise ValueError(f'on_duplicate must be "replace" or "error", got {on_duplicate!r}')
        X = check_matrix(X, self.d, "vectors")
        n = X.shape[0]
        new_ids = None if ids is None else _check_ids(ids, n)
        if self.rerank and self.rerank_dtype == "float16" and np.abs(X).max() > np.finfo(np.float16).max:
            raise ValueError(f"vectors exceed the float16 range (|x| > {np.finfo(np.float16).max:g}) of the "
                             "re-rank copy: use a float32 copy (',Rerank<k>F32')")
        codes, scales = self.encoder.encode(X, row0=self.nrows, num_threads=num_threads)
        extra = self._encode_extra(X, num_threads)  # the structure's per-row data (IVF lists)
        with self._lock:  # everything computed: now commit (nothing changes if anything failed)
            if new_ids is None:
                new_ids = self._default_ids(n)
            old = self._live_rows_of(new_ids)
            if old.size and on_duplicate == "error":
                raise ValueError(f"{old.size} of the ids are already in the index (e.g. "
                                 f"{int(self.ids[old[0]])}): remove them first or pass on_duplicate='replace'")
            self._append_rows(X, codes, scales, new_ids, extra, num_threads)
            if old.size:
                self._tombstone(old)
        return self

    def _encode_extra(self, X, num_threads):
        """The structure's per-row data of new vectors X (computed before anything changes)."""
        return None

    def _append_rows(self, X, codes, scales, new_ids, extra, num_threads):
        """Append encoded rows (under the lock); structures extend it."""
        first = self.nrows == 0
        self.codes = readonly(codes if first else np.concatenate([np.asarray(self.codes), codes]))
        if scales is not None:
            self.scales = readonly(scales if first else np.concatenate([np.asarray(self.scales), scales]))
        if self.rerank:
            vec = X.astype(self.rerank_dtype)
            self.vectors = readonly(np.concatenate([np.asarray(self.vectors), vec])
                                    if self.vectors is not None else vec)
        if self.removed is not None:
            self.removed = readonly(np.concatenate([np.asarray(self.removed), np.zeros(len(new_ids), np.uint8)]))
        self.ids = readonly(new_ids if first else np.concatenate([np.asarray(self.ids), new_ids]))
        self._changed()

    def _default_ids(self, n):
        start = int(self.ids.max()) + 1 if self.nrows else 0
        if start + n - 1 > np.iinfo(np.int64).max:
            raise ValueError(f"default ids continue after the largest id {start - 1}: {n} more overflow "
                             "int64 (pass ids explicitly)")
        return np.arange(start, start + n, dtype=np.int64)

    def _live_rows_of(self, ids):
        """Rows (sorted) holding one of ``ids`` and not removed."""
        if not self.nrows:
            return np.zeros(0, np.int64)
        hit = np.isin(np.asarray(self.ids), ids)
        if self.removed is not None:
            hit &= np.asarray(self.removed) == 0
        return np.flatnonzero(hit)

    def remove_ids(self, ids) -> int:
        """Remove the vectors with these ids; returns how many were removed
        (ids not in the index are ignored).  Removed rows never appear in
        results; their space is reclaimed by ``compact``, which runs by itself
        once removed rows exceed the setting ``compact_share`` of the rows."""
        ids = np.unique(_check_ids(ids, None))
        with self._lock:
            rows = self._live_rows_of(ids)
            if rows.size:
                self._tombstone(rows)
                if self._n_removed > self.settings.compact_share * self.nrows:
                    self.compact()
        return int(rows.size)

    def _tombstone(self, rows):
        removed = np.zeros(self.nrows, np.uint8) if self.removed is None else np.array(self.removed)
        removed[rows] = 1
        self.removed = readonly(removed)
        self._n_removed = int(removed.sum())
        self._prepared_calls = {}  # they hold the old mask
        self._live_allow = None
        self._live_token = object()  # filters resolved for the old rows are stale

    def compact(self) -> "IndexBase":
        """Drop removed rows for good (rows renumbered, ids kept; a graph
        relinks its remaining nodes).  Searches give the same results
        before and after, up to the graph's new links."""
        with self._lock:
            if self.removed is None:
                return self
            keep = np.flatnonzero(np.asarray(self.removed) == 0)
            self._keep_rows(keep)
            self.removed = None
            self._n_removed = 0
            self._changed()
        return self

    def _keep_rows(self, keep):
        """Keep only rows ``keep`` (sorted); structures extend it."""
        self.codes = readonly(np.asarray(self.codes)[keep])
        if self.encoder.config.scale:
            self.scales = readonly(np.asarray(self.scales)[keep])
        if self.vectors is not None:
            self.vectors = readonly(np.asarray(self.vectors)[keep])
        self.ids = readonly(np.asarray(self.ids)[keep])

    def _changed(self):
        """The rows changed: what was derived from them is rebuilt on the next search."""
        self._prepared_calls = {}  # prepared calls hold the old arrays
        self._live_allow = None
        self._live_token = object()
        self._scanner = None
        self._rows_layout = None

    def _allowed(self, filter):
        """(allow, m) for a search: ``allow`` the read-only uint8 (nrows,)
        of rows it may return (removed ones out, then ``filter``; None: all
        rows), m how many."""
        if filter is None:
            if self.removed is None:
                return None, self.nrows
            if self._live_allow is None:
                self._live_allow = readonly((np.asarray(self.removed) == 0).view(np.uint8))
            return self._live_allow, self.ntotal
        f = as_filter(filter)
        memo = f._memo  # (index, rows state, allow, m) of the last index this filter served
        if memo is not None and memo[0]() is self and memo[1] is self._live_token:
            return memo[2], memo[3]
        ok = f.rows(np.asarray(self.ids))
        if self.removed is not None:
            ok &= np.asarray(self.removed) == 0
        got = readonly(ok.view(np.uint8)), int(ok.sum())
        f._memo = (weakref.ref(self), self._live_token, *got)
        return got

    # -- search ---------------------------------------------------------------
    def _search_arrays(self):
        """The per-index arguments of the search kernels, kept between
        searches (gathering them cost a few microseconds per query):
        (rotation, mean), the ADC arrays (levels, fields, candidate layout
        placeholder, table layout, codes, scales), ids, and the stored copy
        for the exact re-rank (``copy_rows``) with and without rows (the
        copy's own dtype either way: one kernel build per index; None for
        an index without a copy, whose kernel build then leaves out the
        re-rank).  Rebuilt when the codes or the encoder change."""
        got = self._search_state
        if got is None or got[0] is not self.codes or got[1] is not self.encoder:
            enc = self.encoder
            V = None if self.vectors is None else copy_rows(self.vectors)  # None: no re-rank code compiled
            R = enc.rotation16() if _rotation.HALF_SIMD else enc.rotation32()
            tabs = (np.asarray(enc.level_off), np.asarray(enc.bits), *enc._byte_fields())
            got = self._search_state = (self.codes, enc, (
                R, np.asarray(enc.mean, np.float64), enc.levels32(), enc.field_layout(), tabs,
                np.asarray(self.codes), self._scales(), np.asarray(self.ids), V, None if V is None else V[:0]))
        return got[2]

    def _scan_arrays(self, sc):
        """What the fast-scan stage adds to ``_search_arrays`` (cached on the
        scanner ``sc``): the rotation's leading columns the coarse stage
        reads (``_lead_dims``) and those the candidate ADC reads too
        (``_cand_layout``), the candidate layout (``_NO_CAND`` when that
        kernel cannot serve the codes) and the scan layout
        (``_candidate_args``)."""
        got = getattr(sc, "_search_args", None)
        if got is None:
            R = self._search_arrays()[0]
            lead = self._lead_dims(sc)
            cl = self._cand_layout(sc)
            lead_cand = lead if cl is None else max(lead, _round16(int(cl[0][:, 0].max()) + 1, self.d))
            R_lead, R_cand = ((np.ascontiguousarray(R[:, :m]) if m < self.d else R) if R.shape[0] else R
                              for m in (lead, lead_cand))
            got = sc._search_args = (R_lead, R_cand, _NO_CAND if cl is None else cl, self._candidate_args(sc))
        return got

    def _candidate_args(self, sc):
        """The candidate stage's arguments of the search kernel (structure-specific)."""
        raise NotImplementedError

    def _coarse_dims(self, sc):
        """Transformed dimensions the candidate stage reads (coarse tables)."""
        return sc.slot_dim[sc.slot_dim >= 0]

    def _lead_dims(self, sc):
        """How many leading transformed dimensions cover ``_coarse_dims``,
        rounded up to a multiple of 16 (at most d).  After PCA the coarse
        stage reads a prefix: 10^6 synthetic IVF1024, coverage 0.95, 147 of
        384 dimensions, so the search without the full-ADC rescoring
        rotates 160 columns (nprobe=40, 400 candidates re-ranked: 257-264 ->
        245-249 us per query; the full rotation took 17).  The columns are
        the rotation's own: the values are those of the full rotation (same
        sums in the same order)."""
        used = self._coarse_dims(sc)
        return _round16(int(used.max()) + 1 if used.size else 1, self.d)

    def _cand_layout(self, sc):
        """The SIMD candidate ADC's layout (``Encoder.candidate_layout``) of
        the dimensions holding ``cand_coverage`` (setting) of the estimated score variance
        (the fast scanner's ``share``, largest first), or None when that
        kernel cannot serve the codes.  Cached per scanner."""
        got = getattr(sc, "_cand_layout", None)
        if got is None:
            keep = None
            share = sc.share
            cover = self.settings.cand_coverage
            if cover < 1.0 and share.sum() > 0:
                order = np.argsort(-share, kind="stable")
                cum = np.cumsum(share[order]) / share.sum()
                keep = np.zeros(self.d, bool)
                keep[order[:int(np.searchsorted(cum, cover)) + 1]] = True
            got = sc._cand_layout = (self.encoder.candidate_layout(keep),)
        return got[0]

    def _search_with(self, Q, k, rerank, num_threads, return_std, key, prepare, filter=None):
        """The one search path of every structure: validation, then
        ``prepare(k, rr, kk, exact_ns, allow, m)`` (the structure's kernel
        call for k, the re-rank factor, the pool the ADC keeps, the exact
        re-rank's cost, and the rows the search may return: ``_allowed``)
        returns (``single(Q)``, ``batch(Q, threads)``), each giving (scores,
        rows, ids) with at least k columns: a few queries run ``single`` on
        the calling thread (the call is kept for ``key``,
        ``_prepared_call``), more run ``batch`` (``_over_chunks``).

        The index's rows are read under its lock and the kernels run on
        that snapshot (arrays are never changed in place), so a search
        running while another thread adds or removes sees the index before
        or after the change, never a mix.

        With ``return_std`` a third array bounds the standard deviation of each
        ADC score under unbiased rounding: E[score] is the exact inner product
        and Var <= sum_j y_j^2 max-gap_j^2 / 4 (times scale^2); 0 for exactly
        re-ranked scores.  A candidate whose score is more than ~3 std below
        the k-th score is very unlikely to belong to the top-k: use it to
        size ``rerank``."""
        with self._lock:
            Q, rr, kk, nthreads, exact_ns = self._prepare(Q, k, rerank, num_threads, return_std, finite=False)
            allow, m = self._allowed(filter)
            if m == 0:  # nothing may be returned: the kernels still check the queries
                allow, m, empty = None, self.nrows, True
            else:
                empty = False
            single, batch = prepare(k, rr, kk, exact_ns, allow, m)
            codes, scales = np.asarray(self.codes), self._scales()
        if self._few_queries(Q.shape[0]):
            if not empty:
                self._keep_call(key, single, k)
            v, rows, ids = single(Q)
        else:
            v, rows, ids = batch(Q, nthreads)
        v, rows, ids = v[:, :k], rows[:, :k], ids[:, :k]
        if empty:
            v, rows, ids = np.full_like(v, -np.inf), np.full_like(rows, -1), np.full_like(ids, -1)
        if return_std:
            return v, ids, self._score_std(Q, codes, scales, rows, rr)
        return v, ids

    def _score_std(self, Q, codes, scales, rows, rr):
        """Bound on the standard deviation of the ADC scores of result
        ``rows`` (``_search_with``; 0 for -1 rows and re-ranked scores)."""
        if rr:
            return np.zeros(rows.shape, np.float32)
        var = self.encoder.variance_tables(self.encoder.rotate_queries(Q, num_threads=1))
        sc2 = scales.astype(np.float64) ** 2 if scales.size else scales
        return np.sqrt(_tables.table_sums(var, codes, sc2, rows)).astype(np.float32)

    @staticmethod
    def _over_chunks(Q, num_threads, chunk):
        """``chunk(Qc, part)`` (a tuple of arrays, one row per query) over the
        queries QUERY_CHUNK at a time (bounds the tables' memory), the queries
        split across ``num_threads`` threads (``part``: the thread's index);
        the results joined in query order."""
        def run(a, b, part):
            return concat_rows([chunk(Q[q0:min(b, q0 + QUERY_CHUNK)], part) for q0 in range(a, b, QUERY_CHUNK)])

        return concat_rows(map_chunks(run, Q.shape[0], num_threads))

    def _call_key(self, return_std, filter, *params):
        """The key of a search's prepared call (``_prepared_call``): its
        parameters, the default rerank and the filter object (kept alive by
        the key, so never confused with another); None for ``return_std``
        or a filter given as a plain array (converted on every call)."""
        if return_std or not (filter is None or isinstance(filter, _IdFilter)):
            return None
        return (*params, self.rerank, filter)

    def _prepared_call(self, key, Q):
        """The single-query search state of one parameter set: the kernel's
        complete arguments as ``_search_with`` prepared them for ``key``
        (k, rerank, per-structure parameters, num_threads, the default
        rerank), kept until the index changes (``add``, ``train``,
        ``configure``).  The parameters were validated when it was prepared;
        the queries' layout is checked here and their values by the kernel.
        Saves the validation and planning Python of a ~100 us search (50k
        MiniLM IVF256 single queries: 87-110 -> 71-74 us).  None when there
        is no prepared call or Q is not a few float32 C-contiguous rows."""
        call = self._prepared_calls.get(key) if key is not None and _plain_key(key) else None
        if call is None or type(Q) is not np.ndarray or Q.dtype != np.float32 or Q.ndim != 2 \
                or Q.shape[1] != self.d or not 0 < Q.shape[0] < SERIAL_QUERIES or not Q.flags.c_contiguous:
            return None
        run, k = call
        v, _, out_ids = run(Q)
        return v[:, :k], out_ids[:, :k]

    def _keep_call(self, key, run, k):
        """Store a prepared single-query call (``_prepared_call``: ``run(Q)``
        -> the kernel's (scores, rows, ids)) when every parameter in
        ``key`` is a plain int or None."""
        if key is not None and _plain_key(key):
            if len(self._prepared_calls) >= 64:
                self._prepared_calls.clear()
            self._prepared_calls[key] = (run, k)

    def _prepare(self, Q, k, rerank, num_threads, return_std=False, finite=True):
        """Validate a search call: (Q float32 C-contiguous, rerank factor,
        pool size kk, thread count, per-dimension cost of an exact dot
        product (0: no re-rank)).  ``finite=False``: the query values are
        checked by the search kernel instead (``check_matrix``)."""
        if return_std and self.encoder.config.rounding != "unbiased":
            raise ValueError("return_std needs unbiased codes (spec flag 'u'): nearest rounding is biased")
        n = self.ntotal
        if n == 0:
            if not self.is_trained:
                raise RuntimeError("the index is not trained: call train() and add() first")
            raise RuntimeError("the index is empty: call add() before search()")
        Q = check_matrix(Q, self.d, "queries", finite)
        if type(k) is not int and (isinstance(k, bool) or not isinstance(k, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > n:
            raise ValueError(f"k={k} exceeds the number of indexed vectors ({n})")
        rr = self.rerank if rerank is None else nonneg_int(rerank, "rerank")
        if rr and self.vectors is None:
            raise ValueError("this index keeps no vectors for re-rank (build it with ',Rerank')")
        kk = min(n, k * rr) if rr else k
        nthreads = resolve_threads(num_threads)
        exact_ns = cost_model.exact_ns_per_dim(self.vectors.nbytes) if rr else 0.0
        return Q, rr, kk, nthreads, exact_ns

    def _scales(self):
        return np.asarray(self.scales) if self.encoder.config.scale else np.zeros(0, np.float32)

    def _fast_scanner(self):
        if self._scanner is None or self._scanner_rows != self.nrows:
            scales = np.asarray(self.scales) if self.encoder.config.scale else None
            self._scanner = FastScanner(self.encoder, np.asarray(self.codes), scales, self._scan_lists(),
                                        coverage=self.coverage, residual=self._scan_residual())
            self._scanner_rows = self.nrows
        return self._scanner

    def _scan_lists(self):
        return None  # the flat index scans every row

    def _scan_residual(self):
        return None  # coarse codes of the rows' values

    def reconstruct(self, rows=None) -> np.ndarray:
        """Decoded vectors (float32, original space) of the given row positions."""
        sel = slice(None) if rows is None else np.asarray(rows)
        scales = np.asarray(self.scales)[sel] if self.encoder.config.scale else None
        return self.encoder.decode(np.ascontiguousarray(np.asarray(self.codes)[sel]), scales)

    def warmup(self):
        """Compile every kernel and build derived structures (keeps JIT and
        set-up time out of timed searches)."""
        if self.ntotal:
            q = self.reconstruct([0])
            batch = np.repeat(q, SERIAL_QUERIES, axis=0)
            # one query (calling thread) and a batch (thread pool), each with
            # few candidates and with many (lookup-table rescoring), for every
            # parameter set that needs a kernel build of its own
            for params in self._warmup_params():
                for Q, nt in ((q, 1), (batch, -1)):
                    for k in (1, min(self.ntotal, 64)):
                        self.search(Q, k, num_threads=nt, **params)
        return self

    def _warmup_params(self):
        """Search parameter sets that together compile every kernel build a search of the structure can take."""
        raise NotImplementedError

    @staticmethod
    def _few_queries(nq) -> bool:
        """Whether nq queries run on the calling thread (fewer than
        ``SERIAL_QUERIES``; read in this module only)."""
        return nq < SERIAL_QUERIES

    # -- persistence ----------------------------------------------------------
    def save(self, path) -> None:
        """Write one versioned file (atomic: temp file + rename)."""
        if not self.is_trained:
            raise RuntimeError("cannot save an untrained index")
        with self._lock:  # one consistent snapshot of the rows
            enc_meta, arrays = self.encoder.state()
            meta = {"kind": self.kind, "spec": self.spec, "d": self.d, "ntotal": self.nrows,
                    "encoder": enc_meta, "rerank": self.rerank, "rerank_dtype": self.rerank_dtype,
                    "settings": self.resolved_settings(), "library": "ipq_index"}
            meta["search_defaults"] = {"rerank": self.rerank, **{k: v for k, v in meta["settings"].items()
                                                                  if k in ("fs", "depth", "nprobe", "ef", "nav")}}
            arrays.update({"codes": np.asarray(self.codes), "ids": np.asarray(self.ids)})
            if self.encoder.config.scale:
                arrays["scales"] = np.asarray(self.scales)
            if self.vectors is not None:
                arrays["vectors"] = np.asarray(self.vectors)
            if self.removed is not None:
                arrays["removed"] = np.asarray(self.removed)
                meta["removed"] = self._n_removed  # shown by ipq info (the array is the record)
            extra_meta, extra_arrays = self._extra_state()
            meta.update(extra_meta)
            arrays.update(extra_arrays)
        storage.save_arrays(path, meta, arrays)

    def _extra_state(self):
        return {}, {}

    def _load_extra(self, meta, arrays):
        pass

    @classmethod
    def _size_args(cls, header) -> tuple:
        """The constructor's arguments between ``d`` and the encoder config
        (an IVF index's list count, a graph's degree), from a parsed spec
        (``parse_spec``) or a file header: none for the base."""
        return ()

    @classmethod
    def _from_state(cls, meta, arrays):
        enc = ASQEncoder.from_state(meta["encoder"], arrays)
        if "settings" in meta:
            saved = meta["settings"]
        else:  # files written before settings were saved as one record
            names = cls.settings_class.names()
            saved = {k: meta[k] for k in ("coverage", "nprobe", "ef", "ef_construction") if k in meta and k in names}
        try:
            settings = cls.settings_class.from_dict(saved)
        except (TypeError, ValueError) as e:
            raise storage.FormatError(f"index file has bad settings: {e}") from None
        idx = cls(int(meta["d"]), *cls._size_args(meta), enc.config, rerank=int(meta["rerank"]),
                  rerank_dtype=meta["rerank_dtype"], spec=meta["spec"], settings=settings)
        idx.encoder = enc
        idx.codes = arrays["codes"]
        idx.ids = arrays["ids"]
        if enc.config.scale:
            idx.scales = arrays["scales"]
        idx.vectors = arrays.get("vectors")
        if "removed" in arrays:
            idx.removed = arrays["removed"]
            idx._n_removed = int(np.count_nonzero(idx.removed))
        idx._load_extra(meta, arrays)
        if idx.codes.shape != (int(meta["ntotal"]), enc.nbytes) or idx.ids.shape != (int(meta["ntotal"]),):
            raise storage.FormatError("index file is inconsistent: array shapes do not match the header")
        return idx

    def config_dict(self) -> dict:
        """Everything that defines the index: spec, encoder options, default
        re-rank factor and the (resolved) settings."""
        return {"spec": self.spec, "encoder": asdict(self.encoder.config), "rerank": self.rerank,
                "settings": self.resolved_settings()}


#: the search kernels' codes of the plans (``_rr.PLAN_*``)
PLAN_CODES = {"exact": _rr.PLAN_NONE, "fields": _rr.PLAN_FIELDS, "cand": _rr.PLAN_CAND, "tables": _rr.PLAN_TABLES}
#: the candidate layout argument of the search kernels when the SIMD candidate ADC does not apply
_NO_CAND = (np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int32), np.zeros((0, 3), np.int64), 0, 4)


def copy_rows(vectors):
    """The stored copy as the re-rank kernels read it: float32 rows, or the
    bit patterns (uint16) of float16 rows."""
    vectors = np.asarray(vectors)
    return vectors.view(np.uint16) if vectors.dtype == np.float16 else vectors


def _round16(m, d):
    """m rounded up to a multiple of 16, at most d (rotation columns kept by the scan search)."""
    return min(d, -(-m // 16) * 16)


def _plain_key(key) -> bool:
    """Whether every search parameter in ``key`` (all but its last entry,
    the filter object or None) is a plain int, str or None (True would find
    the entry of 1: such calls always take the validating path)."""
    for p in key[:-1]:
        if p is not None and type(p) is not int and type(p) is not str:
            return False
    return True


def _check_ids(ids, n):
    """``ids`` as int64 (n,) (any length when n is None), non-negative, no repeats."""
    a = np.asarray(ids)
    if a.ndim == 0:
        a = a.reshape(1)
    if a.ndim != 1 or (n is not None and a.shape[0] != n) or not (a.size == 0 or np.issubdtype(a.dtype, np.integer)):
        want = f"{n} integers" if n is not None else "a 1-D array of integers"
        raise ValueError(f"ids must be {want}, got shape {a.shape} dtype {a.dtype}")
    if a.size and a.dtype.kind == "u" and a.max() > np.iinfo(np.int64).max:
        raise ValueError("ids must fit in int64")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
    if n is not None and np.unique(a).size != a.size:
        raise ValueError("ids repeat within one add: each id names one vector")
    return a


def positive_int(value, name):
    """A search parameter that must be an int >= 1."""
    if nonneg_int(value, name) < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return int(value)


def nonneg_int(value, name):
    if type(value) is not int and (isinstance(value, bool) or not isinstance(value, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)
