"""The flat index: an exhaustive scan of every code (SIMD fast-scan
candidates rescored with the full ADC above ``fastscan_min_rows`` rows),
with an optional exact re-rank."""

from __future__ import annotations

import math

import numpy as np

from .. import cost_model
from .._kernels import fastscan as _fs
from .._kernels import tables as _tables
from ..settings import FlatSettings
from .base import PLAN_CODES, IndexBase, nonneg_int

#: the default fast-scan candidate factor (setting ``fs``) grows as
#: sqrt(rows scanned / FS_REF_ROWS) above that many rows: the coarse ranking
#: errs more on larger corpora while rescoring stays cheap (10^6 synthetic
#: vectors, flat: recall@10 0.892 at fs=10, 0.941 at 32, QPS 626 vs 590;
#: eval/results/flat_ivf1024_1m_synthetic_fs_coverage_rerank_sweep.txt)
FS_REF_ROWS = 100_000

#: the probe arguments of a flat index's fused scan (no lists to choose)
_NO_PROBE = (np.zeros(0, np.int64), None, np.zeros(0, np.float32), 0, False)


class FlatIndex(IndexBase):
    """Exhaustive ADC scan over ASQ codes, with optional exact re-rank."""

    kind = "flat"
    settings_class = FlatSettings

    # -- search ---------------------------------------------------------------
    def search(self, Q, k: int, *, rerank: int | None = None, fs: int | None = None,
               num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products: (scores float32 (nq, k) descending, ids int64 (nq, k)).

        ``rerank``: re-rank ``rerank * k`` ADC candidates exactly with the stored
        copy (default: the spec's factor; 0 disables).  ``fs``: candidate
        factor of the SIMD fast-scan stage (the best ``fs * max(k, rerank * k)``
        coarse scores are rescored with the full ADC; 0 scans every code with
        the full ADC; default: the setting ``fs``, growing as sqrt(n / 100,000)
        above 100,000 vectors; used when the index holds at least
        ``fastscan_min_rows`` vectors).  Slots beyond the index size hold
        id -1 and score -inf.  ``return_std`` (unbiased codes only): also return
        an upper bound on the standard deviation of each returned score (0 for
        exactly re-ranked scores); see ``_search``.
        """
        key = self._call_key(return_std, k, rerank, fs, num_threads)
        out = self._prepared_call(key, Q)
        if out is not None:
            return out
        fused = key is not None
        fsf = self._fs_factor(fs, self.ntotal)
        use_fs = fsf > 0 and self.ntotal >= self.settings.fastscan_min_rows
        if use_fs and fused:
            out = self._try_fused(Q, k, rerank, num_threads, fsf, key=key)
            if out is not None:
                return out

        def candidates(qb, kk, codes, scales):
            if use_fs:
                sc = self._fast_scanner()
                cand = sc.candidates(qb.Y, self._coarse_count(fsf, kk), 1)
                return qb.rescore(cand, kk, codes, scales, self._cand_layout(sc))
            return _tables.scan_topk_batch(qb.tables(), codes, scales, kk)

        return self._search(Q, k, rerank, num_threads, candidates, return_std)

    def _try_fused(self, Q, k, rerank, num_threads, fsf, probe=None, key=None):
        """The whole fast-scan search in one kernel (``_fs.scan_query_serial``),
        exact re-rank included: a few queries on the calling thread, more
        QUERY_CHUNK at a time on the thread pool (``_fused_batch``); None
        when the staged path applies (the rescoring plan wants lookup tables).  ``probe``: (dims, Ct,
        spread, nprobe) of an IVF index.  Same results as the staged path
        (tested); saves the Python and dispatch between the stages.  The
        call is kept for ``key`` (``_prepared_call``)."""
        Q, rr, kk, _, exact_ns = self._prepare(Q, k, rerank, num_threads, finite=False)  # the kernel checks
        ncand = self._coarse_count(fsf, kk)
        plan = cost_model.rescore_plan(self.encoder, ncand, kk, exact_ns, self.settings.exact_preference,
                             cl=self._cand_layout(self._fast_scanner()))
        if plan == "tables":
            return None
        rot, rot_lead, rot_cand, scan, adc, ids, V, no_V = self._fused_arrays()
        if probe is None:
            probe = _NO_PROBE
        # without the full ADC of the candidates only some leading transformed
        # dimensions are read (coarse tables, probes, the candidate ADC's
        # fields): rotate those alone
        R = {"exact": rot_lead, "cand": rot_cand}.get(plan, rot)
        args = (*R, *scan, *probe, ncand, *adc, kk, PLAN_CODES[plan], ids, V if rr else no_V, k)
        if not self._few_queries(Q.shape[0]):
            return self._fused_batch(Q, num_threads, lambda Qc, part: _fs.scan_query_serial(Qc, *args), k)
        self._keep_call(key, lambda Qc: _fs.scan_query_serial(Qc, *args), k)
        v, _, out_ids = _fs.scan_query_serial(Q, *args)
        return v[:, :k], out_ids[:, :k]

    def _fused_scan_args(self, sc):
        return (sc.slot_dim, sc._centT, sc.blocks, sc.block_rows, sc.block_ptr, sc.block_fill)

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
        return min(self.ntotal, fsf * kk)

    def _warmup_params(self):
        return ({}, {"fs": 0})
