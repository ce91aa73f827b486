"""The flat index: an exhaustive scan of every code (SIMD fast-scan
candidates rescored with the full ADC above ``fastscan_min_rows`` rows),
with an optional exact re-rank."""

from __future__ import annotations

import math

import numpy as np

from .. import cost_model
from .._kernels import fastscan as _fs
from ..settings import FlatSettings
from ..fast_scanner import DSUB as FS_DSUB
from .base import _NO_CAND, PLAN_CODES, IndexBase, nonneg_int

#: the default fast-scan candidate factor (setting ``fs``) grows as
#: sqrt(rows scanned / FS_REF_ROWS) above that many rows: the coarse ranking
#: errs more on larger corpora while rescoring stays cheap (10^6 synthetic
#: vectors, flat: recall@10 0.892 at fs=10, 0.941 at 32, QPS 626 vs 590;
#: eval/results/flat_ivf1024_1m_synthetic_fs_coverage_rerank_sweep.txt)
FS_REF_ROWS = 100_000

#: the probe arguments of a flat index's scan (no lists to choose)
_NO_PROBE = (np.zeros(0, np.int64), None, np.zeros(0, np.float32), 0, False)


def depth_for_k(depth: float, k: int) -> float:
    """The pool-growth multiplier of a search for k results (setting
    ``depth``): ``depth`` at k = 10, depth * ln 11 / ln(k + 1) in general.

    Model: a result's coarse-rank displacement (its coarse rank over its
    rank among the results) has an exponential-like tail, and the deepest
    of k exchangeable displacements sits near its 1 - 1/(k + 1) quantile, so
    covering a fixed tail quantile takes a multiple of that deepest rank
    proportional to 1 / ln(k + 1).  npm MiniLM-L6 50k (the set ``depth`` was
    chosen on), 500 queries, a fixed multiplier's recall@k against the
    exhaustive ADC's: k = 1 needs ~14 (4: -0.006), k = 10 4, k = 30 ~3, k =
    100 ~2 (4: the same recall in 1.4x the time); this gives 13.8, 4, 2.8,
    2.1."""
    return depth * math.log(11.0) / math.log(k + 1.0)


class FlatIndex(IndexBase):
    """Exhaustive ADC scan over ASQ codes, with optional exact re-rank."""

    kind = "flat"
    settings_class = FlatSettings
    _coverage_name = "FLAT_COVERAGE"

    # -- search ---------------------------------------------------------------
    def search(self, Q, k: int, *, rerank: int | None = None, fs: int | None = None, filter=None,
               num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products: (scores float32 (nq, k) descending, ids int64 (nq, k)).

        ``rerank``: re-rank ``rerank * k`` ADC candidates exactly with the stored
        copy (default: the spec's factor; 0 disables).  ``fs``: candidate
        factor of the SIMD fast-scan stage (the best ``fs * max(k, rerank * k)``
        coarse scores are rescored with the full ADC; 0 scans every code with
        the full ADC; default: the setting ``fs``, growing as sqrt(n / 100,000)
        above 100,000 vectors, then per query until the rescored rows reach
        ``depth_for_k`` of the setting ``depth`` times the coarse rank of the
        deepest result; a given ``fs`` keeps the pool fixed; used when the
        index holds at least ``fastscan_min_rows`` vectors).  ``filter``: the ids the search may
        return (``ipq_index.filters``: allowed ids, a boolean id mask or
        ``DenyIds``), applied inside the scan; when few rows pass, only
        they are scored.  Slots beyond the rows that pass hold id -1 and
        score -inf.  ``return_std`` (unbiased codes only): also return an
        upper bound on the standard deviation of each returned score (0 for
        exactly re-ranked scores); see ``_search_with``.
        """
        key = self._call_key(return_std, filter, k, rerank, fs, num_threads)
        out = self._prepared_call(key, Q)
        if out is not None:
            return out
        return self._scan_search(Q, k, rerank, num_threads, return_std, key, fs, filter)

    def _probe_count(self, nprobe, m):
        """(lists probed, rows scanned, about) when ``m`` rows may be
        returned (a filtered scan reads those alone: ``_allowed_scan``)."""
        return 1, m

    def _kernel_probe(self, npb, fast):
        """The scan kernel's probe arguments (dims, centroids, spread, nprobe,
        residual) for ``npb`` lists, of the fast scan (``fast``) or of the
        scan of every row; ``_NO_PROBE``: no lists to choose."""
        return _NO_PROBE

    def _scan_search(self, Q, k, rerank, num_threads, return_std, key, fs, filter, nprobe=None):
        """A scan search (``_scan_calls``) through ``_search_with``."""
        fs = None if fs is None else nonneg_int(fs, "fs")

        def prepare(k, rr, kk, exact_ns, allow, m):
            return self._scan_calls(k, rr, kk, exact_ns, allow, m, fs, nprobe)

        return self._search_with(Q, k, rerank, num_threads, return_std, key, prepare, filter)

    def _scan_calls(self, k, rr, kk, exact_ns, allow, m, fs, nprobe):
        """(single, batch) calls of a scan search through
        ``_fs.scan_query_serial`` (rotation to ids in one kernel per chunk of
        queries), for ``_search_with``: the ``fs``-factor best coarse scores
        among the allowed rows rescored (at least ``fastscan_min_rows``
        rows), else every allowed row of the scanned lists; a filter that
        lets few rows through (``cost_model.scan_allowed_rows``) scores
        those rows alone."""
        npb, scanned = self._probe_count(nprobe, m)
        fsf = self._fs_factor(fs, scanned)
        depth = depth_for_k(float(self.settings.depth), k) if fs is None else 0.0  # an explicit fs: a fixed pool
        every = fsf == 0 or self.nrows < self.settings.fastscan_min_rows
        sc = None if every else self._fast_scanner()
        few = allow is not None and (every or cost_model.scan_allowed_rows(
            self.encoder, m, scanned, sc.coarse_bytes, self._coarse_count(fsf, kk)))
        R, mean, levels, fields, tabs, codes, scales, ids, V, no_V = self._search_arrays()
        if few:  # the allowed rows alone, every one scored (one list: no probe)
            ncand, cl, scan, probe = 0, _NO_CAND, self._row_layout(allow), self._kernel_probe(0, False)
            nc = max(kk, m)
        elif every:
            ncand, cl, scan, probe = 0, _NO_CAND, self._row_layout(None), self._kernel_probe(npb, False)
            nc = min(self.nrows, max(kk, int(scanned)))
        else:
            probe = self._kernel_probe(npb, True)
            R_lead, R_cand, cl, scan = self._scan_arrays(sc)
            ncand = nc = self._coarse_count(fsf, kk)
            if allow is not None:  # the lists' allowed rows alone
                scan = self._allowed_scan(sc, allow)
        plan = cost_model.rescore_plan(self.encoder, nc, kk, exact_ns, self.settings.exact_preference,
                                       cl=None if cl is _NO_CAND else cl)
        if not (every or few):
            # without the full ADC of the candidates only some leading
            # transformed dimensions are read (coarse tables, probes, the
            # candidate ADC's fields): rotate those alone
            R = {"exact": R_lead, "cand": R_cand}.get(plan, R)
        args = (R, mean, *scan, *probe, ncand, depth, levels, fields, cl, tabs, codes, scales, kk,
                PLAN_CODES[plan], ids, V if rr else no_V, k)

        def single(Qc):
            return _fs.scan_query_serial(Qc, *args)

        return single, lambda Q, nt: self._over_chunks(Q, nt, lambda Qc, part: _cut(single(Qc), k))

    def _candidate_args(self, sc):
        return (sc.slot_dim, sc._centT, sc.blocks, sc.block_rows, sc.block_ptr, sc.block_fill)

    def _allowed_scan(self, sc, allow):
        """The scan kernel's candidate layout (``_candidate_args``) of the
        rows ``allow`` lets through alone, list by list (``_allowed_layout``,
        O(rows) once): a filtered search scans those alone.  Kept on the
        scanner for the last few ``allow`` arrays (a filter object hands the
        same array to every search until the index changes:
        ``IndexBase._allowed``)."""
        memo = sc.__dict__.setdefault("_allowed_scans", {})
        got = memo.get(id(allow))
        if got is not None and got[0] is allow:
            return got[1]
        got = (sc.slot_dim, sc._centT, *self._allowed_layout(sc, np.asarray(allow) != 0))
        if len(memo) >= 4:
            memo.clear()
        memo[id(allow)] = (allow, got)
        return got

    @staticmethod
    def _allowed_layout(sc, ok):
        """The block layout (``_fs.layout_blocks``) of the scanner's lists cut
        down to the rows ``ok`` (bool, per row) keeps: their coarse codes are
        copied out of the blocks."""
        blocks, block_rows, block_ptr = sc.blocks, sc.block_rows, sc.block_ptr
        slots = np.flatnonzero(block_rows >= 0)
        slots = slots[ok[block_rows[slots]]]  # in list order
        lists = np.searchsorted(block_ptr, slots // _fs.BLOCK, side="right") - 1
        ptr = np.zeros(block_ptr.shape[0], np.int64)
        np.cumsum(np.bincount(lists, minlength=ptr.shape[0] - 1), out=ptr[1:])
        packed = _fs.block_codes(blocks, slots)  # (rows, bytes): their coarse codes
        sub, local, sub_ptr, fill = _fs.layout_blocks(packed, ptr, np.arange(slots.size, dtype=np.int64))
        return sub, np.where(local >= 0, block_rows[slots][np.maximum(local, 0)], -1), sub_ptr, fill

    def _row_layout(self, allow=None):
        """The scan layout of a search without coarse codes (every row of the
        lists, ``_fs.scan_query_serial`` with ``ncand`` = 0): the block
        layout of the rows (``_fs.layout_blocks``) with empty coarse arrays
        of the fast-scan layout's types (writeable, derived arrays as the
        scanner's: one kernel build serves both); with ``allow``, one list
        of the rows it lets through.  Cached per index size without it."""
        if allow is not None:
            order = np.flatnonzero(np.asarray(allow)).astype(np.int64)
            return self._layout_of(np.array([0, order.size], np.int64), order, self.nrows)
        got = self._rows_layout
        if got is None or got[0] != self.nrows:
            n = self.nrows
            lists = self._scan_lists()
            ptr, order = lists if lists is not None else (np.array([0, n], np.int64), np.arange(n, dtype=np.int64))
            got = self._rows_layout = (n, self._layout_of(ptr, order, n))
        return got[1]

    @staticmethod
    def _layout_of(ptr, order, n):
        """``_row_layout`` of lists (``ptr``, ``order``) over n rows."""
        blocks, rows, bptr, fill = _fs.layout_blocks(np.zeros((n, 0), np.uint8), ptr, order)
        return (np.zeros((0, FS_DSUB), np.int64), np.zeros((0, FS_DSUB, 16), np.float32), blocks, rows, bptr, fill)

    def _fs_factor(self, fs, scanned_rows):
        """Fast-scan candidate factor: ``fs`` if given, else the setting
        ``fs`` grown by sqrt(rows scanned / FS_REF_ROWS) above that size."""
        if fs is not None:
            return nonneg_int(fs, "fs")
        return math.ceil(self.settings.fs * max(1.0, math.sqrt(scanned_rows / FS_REF_ROWS)))

    def _coarse_count(self, fsf, kk):
        """Candidates the fast-scan stage passes to the full ADC: ``fs`` times
        the pool the next stage keeps (``kk`` = k, or rerank * k when
        re-ranking).  Measured alternative, rejected: max(fs * k, 2 * kk) was
        1.5x faster on MiniLM 50k at equal recall but lost recall at 10^6
        (IVF1024 Rerank4 nprobe=64: 0.961 -> 0.935): lower ``fs`` per call
        to trade recall for speed."""
        return min(self.nrows, fsf * kk)

    def _warmup_params(self):
        return ({}, {"fs": 0})


def _cut(out, k):
    """The first k columns of a search kernel's (scores, rows, ids)."""
    return tuple(a[:, :k] for a in out)
