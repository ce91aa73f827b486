"""Candidate generation with SIMD 4-bit fast-scan over coarse codes.

A code field of width b keeps its top cb <= min(b, 4) bits as a *coarse*
field, cb chosen per dimension to minimise the estimated error of the
coarse scores within a budget (``COVERAGE``; most dimensions get 1-3 bits,
the weakest none: the rescoring restores them).  Coarse fields are packed
(first-fit decreasing) into 4-bit groups so that a group's value is a sum of
independent per-field contributions.  That is exactly a product quantizer
with 16 centroids per sub-quantizer (each group a sub-quantizer over a
"virtual" 4-dimensional slice that holds the query components of the
group's fields, its centroids the coarse levels: the mean of the values in
each coarse cell, on a sample), scored by our SIMD fast-scan kernels
(``_kernels/fastscan.py``: blocks of 32 rows, lookup tables quantized to 8
bits in registers, a threshold collector).  The coarse scores only *select*
candidates; the index rescores them with the full-precision ADC (see
``FlatIndex.search``, parameter ``fs``).

Per-vector scales (``ASQ..s`` codes) cannot be folded into a PQ code, so for
scaled codes the coarse code is instead a per-dimension <= 4-bit
quantization of the decoded, rescaled vectors s * u_hat (levels from
``asq.solve`` on a sample), which ranks by approximate true inner products.
The coarse codes are derived from the stored codes: held in memory, not
saved.
"""

from __future__ import annotations

import numpy as np

from ._numba import split_rows
from ._kernels import coarse_tables as _coarse
from ._kernels import codes as _codes
from ._kernels import fastscan as _fs
from .encoder import column_costs

DSUB = 4
#: share of the estimated score variance the coarse scores keep (1 - the
#: relative error of the coarse scores; see FastScanner._coarse_bits).  Bits
#: go where they cut the error most, so most dimensions get 1-3 coarse bits:
#: 10^6 synthetic IVF1024 nprobe=48, 400 candidates: 64 sub-quantizers reach
#: candidate recall 0.956 (the former rule, 4 bits on the dimensions holding
#: 99% of the variance: 126 sub-quantizers, 0.951; scan 180 vs 313 us);
#: MiniLM 50k flat fs=10: 0.971 at 1.9x the QPS of FAISS PQ384x4fs
COVERAGE = 0.95
#: a flat index's coarse codes (unscaled): its candidates grow by the depth
#: rule (setting ``depth``), so finer coarse codes pay in fewer rows rescored.
#: Chosen on npm MiniLM-L6 50k (coverage x depth x fs, the fastest default
#: within 0.0025 recall@10 of the exhaustive ADC): 0.97 with depth 4, recall
#: -0.0011 at 4,620 QPS, against 0.95 with depth 6, -0.0015 at 3,599
FLAT_COVERAGE = 0.97
#: graph navigation scores nodes on the coarse codes alone (no candidate
#: factor to compensate): MiniLM 50k HNSW32 ef=64 recall 0.955 at 0.98 (112
#: sub-quantizers) vs 0.940 at 0.95 and 0.958 with every coarse bit (274)
NAV_COVERAGE = 0.98
#: scaled codes (ASQ..s) keep the dimensions with the largest variance shares
#: at min(b, 4) bits until this share (see FastScanner._coarse_bits)
COVERAGE_SCALED = 0.99
#: Lloyd rounds fitting residual coarse levels (FastScanner._residual_bits)
RESIDUAL_LLOYD_ITERS = 12


class FastScanner:
    """Coarse fast-scan candidate generator derived from an encoder's layout.

    ``lists``: optional ``(ptr, order)`` CSR of an IVF partition (list l holds
    rows ``order[ptr[l]:ptr[l+1]]``); then candidates come only from the
    probed lists.  ``lists="codes"`` keeps the coarse codes as a plain (n,
    M/2) array (``codes``) scored by ``nav_tables`` (graph navigation;
    ``byte_tables``: the same in float32) instead of the blocked layout.

    ``residual``: optional ``(Cr, assign)`` of an IVF partition (centroids
    (nlist, d) in the encoder's transformed space, each row's list), for
    unscaled codes: the coarse code of dimension j then quantizes the
    decoded value minus the row's centroid (levels by Lloyd's algorithm on
    a sample, widths chosen on the residuals' errors: ``_residual_bits``),
    and a row of list l scores <y, c_l> plus its code's table sum (the scan
    adds the list term, ``candidates``' ``raw``).  The residuals vary less
    than the values, so the same ``coverage`` takes fewer coarse bits: 10^6
    synthetic IVF1024 at coverage 0.95, 56 instead of 64 sub-quantizers,
    and at equal time recall@10 rises (saved index, 1,000 single queries,
    nprobe=44 rerank=2: direct codes coverage 0.92 fs=20 0.938 @ 171 us;
    residual, same widths 0.957 @ 167; residual widths, coverage 0.95
    fs=10 0.953 @ 140).
    """

    def __init__(self, encoder, codes, scales=None, lists=None, chunk: int = 65536, sample: int = 100_000,
                 coverage: float | None = None, residual=None):
        from . import asq

        e = encoder
        n = codes.shape[0]
        codes = np.ascontiguousarray(codes)
        d = e.bits.size
        cb, coarse, share = self._coarse_bits(e, codes, scales, coverage, asq, sample=sample)
        if scales is not None:
            residual = None
        self.residual = residual is not None
        if residual is not None:
            Cr, assign = np.ascontiguousarray(residual[0], np.float32), np.asarray(residual[1], np.int64)
            if Cr.shape[1] != d or assign.shape[0] != n:
                raise ValueError("residual centroids / assignment do not match the codes")
            if lists is None or isinstance(lists, str):
                raise ValueError("residual coarse codes need the IVF lists (ptr, order) they belong to")
            cov = COVERAGE if coverage is None else float(coverage)  # unscaled codes
            cb, coarse = self._residual_bits(e, codes, Cr, assign, share, cov, min(sample, 65536))
            residual = (Cr, assign)
        self.coarse_bits = cb
        #: estimated share of the score variance per dimension (E[y_j^2] E[z_j^2], or
        #: E[y_j^2] Var(z_j) for scaled codes; 0 for uncoded dimensions), from the sample
        self.share = share
        self.kept = cb > 0
        bits = np.where(self.kept, e.bits, 0).astype(np.int64)  # dropped dims: as if 0 bits
        nib_of, nib_shift, groups = _nibble_groups(bits, cb)
        M = len(groups)
        packed = self._coarse_codes(e, codes, scales, residual, bits, cb, coarse, nib_of, nib_shift, M, chunk)
        cent = np.zeros((M, 16, DSUB), np.float32)
        self.slot_dim = np.full((M, DSUB), -1, np.int64)
        for m, js in enumerate(groups):
            for s, j in enumerate(js):
                mask = (1 << cb[j]) - 1
                for c in range(16):
                    cent[m, c, s] = coarse[j][(c >> nib_shift[j]) & mask]
                self.slot_dim[m, s] = j
        self.M = M
        self.lists = lists
        self.cent = cent
        self._centT = np.ascontiguousarray(cent.transpose(0, 2, 1))  # (M, DSUB, 16)
        self.ntotal = n
        self.codes = None
        self.coarse_bytes = packed.shape[1]  # per row
        if lists == "codes":
            self.codes = packed  # plain coarse codes (graph navigation)
        else:
            ptr, order = (np.array([0, n]), np.arange(n)) if lists is None else lists
            self.blocks, self.block_rows, self.block_ptr, self.block_fill = _fs.layout_blocks(packed, ptr, order)

    @staticmethod
    def _coarse_codes(e, codes, scales, residual, bits, cb, coarse, nib_of, nib_shift, M, chunk):
        """(n, M/2) packed coarse codes.  Unscaled direct codes: the top bits
        of the stored fields.  Otherwise a per-dimension quantization of
        the decoded vectors: rescaled, s * u_hat, for scaled codes (so one
        index ranks by approximate true scores); minus their list's
        centroid for ``residual`` = ``(Cr, assign)``."""
        n, d = codes.shape[0], bits.size
        if scales is None and residual is None:
            return split_rows(_codes.coarse_nibbles, n, -1, (codes, bits.astype(e.bits.dtype), e.byte_of, e.shift_of,
                              (bits - cb).astype(np.int32), nib_of, nib_shift, M), rows=(0,), min_chunk=4096)

        def rescaled(rows):
            Zh = e._decode_rows(codes[rows])
            if residual is not None:
                Cr, assign = residual
                return Zh - Cr[assign[rows]]
            return Zh * scales[rows, None]

        lv = [coarse[j] if bits[j] else np.zeros(0) for j in range(d)]
        off = np.zeros(d + 1, np.int64)
        off[1:] = np.cumsum([x.size for x in lv])
        flat = np.concatenate(lv).astype(np.float64)
        byte_of = (nib_of // 2).astype(np.int32)
        shift_of = (nib_shift + 4 * (nib_of % 2)).astype(np.int32)
        packed = np.empty((n, M // 2), np.uint8)
        for r0 in range(0, n, chunk):
            rows = np.arange(r0, min(n, r0 + chunk))
            packed[rows] = _codes.encode(np.ascontiguousarray(rescaled(rows), np.float32), flat, off,
                                         cb.astype(np.int32), byte_of, shift_of, M // 2, False, 0, 0)
        return packed

    @staticmethod
    def _residual_bits(e, codes, Cr, assign, share, coverage, sample):
        """Coarse widths and levels of residual codes: from a seeded sample of
        rows, the residuals r_j = z_j - Cr[list, j] (decoded values) get
        2^b levels for b = 1..min(b_j, 4) by Lloyd's algorithm (1-D k-means,
        minimum squared error, from the quantiles); the widths then follow the
        same greedy rule as unscaled codes (``_coarse_bits``) on the residual
        errors sum_j E[y_j^2] err_j(cb_j) (err_j(0) = E[r_j^2]: an uncoded
        dimension scores as its centroid), until they are at most (1 -
        ``coverage``) of the values' sum_j E[y_j^2] E[z_j^2] (``share``: the
        list term counts as kept variance, so ``coverage`` means what it
        means for direct codes).  Measured against the error target of the
        residuals' own variance: the same recall-vs-time front (10^6
        IVF1024, ~0.953 at 140-150 us either way)."""
        n, d = codes.shape[0], Cr.shape[1]
        rng = np.random.default_rng(1)
        rows = np.sort(rng.choice(n, min(n, sample), replace=False))
        Zr = e._decode_rows(codes[rows]).astype(np.float64) - Cr[assign[rows]].astype(np.float64)
        w = np.ones(d) if e.energy is None else np.maximum(np.asarray(e.energy, np.float64), 0.0)
        maxb = np.minimum(e.bits.astype(np.int64), 4)
        maxb[share <= 0] = 0
        js = np.nonzero(maxb)[0]
        err = np.zeros((d, 5))
        err[:, 0] = np.mean(Zr * Zr, axis=0)
        cb = np.zeros(d, np.int64)
        if js.size == 0:
            return cb, {}
        # every width 1..maxb_j of every coded column in one parallel call (levels refined in place)
        sets = [(j, b) for j in js for b in range(1, maxb[j] + 1)]
        off = np.concatenate([[0], np.cumsum([1 << b for _, b in sets])]).astype(np.int64)
        Zs = np.sort(np.ascontiguousarray(Zr[:, js].T), axis=1)  # initial levels: the cells' middle quantiles
        col = {j: t for t, j in enumerate(js)}
        levels = np.concatenate([Zs[col[j], ((np.arange(1 << b) + 0.5) * Zs.shape[1] / (1 << b)).astype(np.int64)]
                                 for j, b in sets])
        set_ptr = np.concatenate([[0], np.cumsum(maxb[js])]).astype(np.int64)
        costs = column_costs(np.ascontiguousarray(Zr[:, js]), np.zeros(0), levels, off, set_ptr,
                             RESIDUAL_LLOYD_ITERS, True, False)
        for t, (j, b) in enumerate(sets):
            err[j, b] = costs[t] / Zr.shape[0]
        total = float(share.sum())
        cb = maxb.copy() if coverage >= 1.0 else _greedy_widths(err, w, maxb, (1.0 - coverage) * total)
        at = {(j, b): t for t, (j, b) in enumerate(sets)}
        return cb, {j: np.sort(levels[off[at[j, cb[j]]]:off[at[j, cb[j]] + 1]]) for j in np.nonzero(cb)[0]}

    @staticmethod
    def _coarse_bits(e, codes, scales, coverage, asq, sample: int = 100_000):
        """Coarse width cb_j in 0..min(b_j, 4) of every dimension, its levels
        ({j: 2^cb_j levels} for cb_j > 0) and the dimensions' shares of the
        score variance (below), from a seeded sample of rows (z_j: decoded
        values, times the row scale for scaled codes).

        Unscaled codes: the coarse code is the top cb bits of the fine code,
        its levels the mean of z_j over each cell (so the squared error never
        grows with cb).  The widths minimise the estimated error of the coarse
        scores, sum_j E[y_j^2] err_j(cb_j) (err_j(0) = E[z_j^2]): greedily,
        the step (one or more bits) with the largest error drop per bit,
        until the error is at most (1 - ``coverage``) of sum_j E[y_j^2]
        E[z_j^2].  Most dimensions then get 1-3 bits and share a
        sub-quantizer (see COVERAGE for the measured gain).

        Scaled codes: the dimensions with the largest shares E[y_j^2] Var(z_j)
        until ``coverage`` of the total, each at min(b_j, 4) bits, levels from
        ``asq.solve`` (nearest rounding).  The error-driven widths above were
        measured worse here (GloVe, 32 sub-quantizers, fs=5: recall@10 0.681
        vs 0.763), presumably because the top inner products come from a few
        long vectors that the mean error over the sample hardly weighs."""
        scaled = scales is not None and scales.size > 0
        if coverage is None:
            coverage = COVERAGE_SCALED if scaled else COVERAGE
        coverage = float(coverage)
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
        d = e.bits.size
        n = codes.shape[0]
        fbits = e.bits.astype(np.int64)
        maxb = np.minimum(fbits, 4)
        rng = np.random.default_rng(0)
        rows = np.sort(rng.choice(n, min(n, sample), replace=False))
        C = np.ascontiguousarray(codes[rows])
        w = np.ones(d) if e.energy is None else np.maximum(np.asarray(e.energy, np.float64), 0.0)
        row_scale = np.asarray(scales, np.float64)[rows] if scaled else None

        def column(j):
            fine = np.asarray(e.levels[e.level_off[j]:e.level_off[j + 1]], np.float64)
            c = ((C[:, e.byte_of[j]] >> e.shift_of[j]) & ((1 << fbits[j]) - 1)).astype(np.int64)
            return fine, c, (fine[c] * row_scale if scaled else fine[c])

        cb = np.zeros(d, np.int64)
        levels = {}
        if scaled:
            share = np.zeros(d)
            for j in np.nonzero(maxb)[0]:
                share[j] = w[j] * column(j)[2].var()
            keep = maxb > 0
            if coverage < 1.0 and share.sum() > 0:
                order = np.argsort(-share, kind="stable")
                cum = np.cumsum(share[order]) / share.sum()
                keep = np.zeros(d, bool)
                keep[order[:int(np.searchsorted(cum, coverage)) + 1]] = True
                keep &= maxb > 0
            cb[keep] = maxb[keep]
            for j in np.nonzero(cb)[0]:
                L = np.asarray(asq.solve(column(j)[2], 1 << cb[j], method="approx"), np.float64)
                levels[j] = np.concatenate([L, np.full((1 << cb[j]) - L.size, L[-1])])
            return cb, levels, share
        err = np.zeros((d, 5))
        cells = {}
        for j in np.nonzero(maxb)[0]:
            fine, c, z = column(j)
            err[j, 0] = np.mean(z * z)
            for b in range(1, maxb[j] + 1):
                t = c >> (fbits[j] - b)
                cnt = np.bincount(t, minlength=1 << b)
                L = np.where(cnt > 0, np.bincount(t, z, 1 << b) / np.maximum(cnt, 1),
                             fine.reshape(1 << b, -1).mean(axis=1))
                cells[j, b] = L
                err[j, b] = np.mean((z - L[t]) ** 2)
        total = float((w * err[:, 0]).sum())
        if coverage >= 1.0:
            cb[:] = maxb
        elif total > 0:
            cb = _greedy_widths(err, w, maxb, (1.0 - coverage) * total)
        return cb, {j: cells[j, cb[j]] for j in np.nonzero(cb)[0]}, w * err[:, 0]

    @property
    def nbytes(self) -> int:
        """Bytes of the derived coarse codes (held in memory, not saved)."""
        if self.codes is not None:
            return int(self.codes.nbytes)
        return int(self.blocks.nbytes + self.block_rows.nbytes + self.block_ptr.nbytes + self.block_fill.nbytes)

    def byte_tables(self, Y) -> np.ndarray:
        """(nq, M/2, 256) float32 lookup tables of the coarse codes: entry
        [g, c] is the coarse score of code byte g = c (low nibble: group 2g,
        high nibble: group 2g + 1), so a row's coarse score is a sum of M/2
        lookups (the same ADC kernels as the full codes)."""
        return _coarse.coarse_byte_tables(np.ascontiguousarray(Y, np.float32), self.slot_dim, self._centT)

    def nav_tables(self, Y) -> np.ndarray:
        """(nq, M/2, 256) int16 tables for ranking rows of each query by
        their coarse score (graph navigation): the float tables of
        ``byte_tables`` shifted per byte table and scaled by one step per
        query (``_coarse.coarse_byte_tables_i16``); sums of lookups order rows
        as the float coarse scores do, to within M/4 steps of 1/65535 of a
        byte table's span."""
        return _coarse.coarse_byte_tables_i16(np.ascontiguousarray(Y, np.float32), self.slot_dim, self._centT)

    def candidates(self, Y, kk: int, num_threads: int, probes=None, raw=None, with_scores: bool = False):
        """Rows (nq, kk) of the best coarse scores of rotated queries Y, in no
        particular order (-1 padded); ``probes`` (nq, nprobe) int64: the lists
        to scan (IVF scanners only); ``raw`` (nq, nprobe): their centroid
        scores <y, c_l> (needed with ``residual`` codes).  Queries split
        across ``num_threads`` threads.  ``with_scores``: also their
        quantized coarse scores (uint16, comparable within a query)."""
        Y = np.ascontiguousarray(Y, np.float32)
        nq = Y.shape[0]
        kk = max(1, min(int(kk), self.ntotal))
        if probes is None:
            probes = np.zeros((nq, 1), np.int64)
        probes = np.ascontiguousarray(probes, np.int64)
        if self.residual:
            if raw is None or np.shape(raw) != probes.shape:
                raise ValueError("residual coarse codes need the probed lists' centroid scores (raw)")
            raw = np.ascontiguousarray(raw, np.float32)
        else:
            raw = np.zeros((0, 0), np.float32)
        args = (Y, self.slot_dim, self._centT, self.blocks, self.block_rows, self.block_ptr, self.block_fill,
                probes, raw, kk)
        rows, scores = split_rows(_fs.scan_topk, nq, num_threads, args, rows=(0, 7, 8))
        return (rows, scores) if with_scores else rows


def _nibble_groups(bits, cb):
    """Coarse fields packed first-fit decreasing into 4-bit groups: field j
    (``bits[j] > 0``, cb[j] coarse bits) lies at bit ``nib_shift[j]`` of
    group ``nib_of[j]``.  Returns ``(nib_of, nib_shift, groups)``, groups
    the fields of each group, padded with empty groups to an even count
    of at least 2."""
    d = bits.size
    nib_of = np.zeros(d, np.int32)
    nib_shift = np.zeros(d, np.int32)
    groups: list[list[int]] = []
    free: list[int] = []
    for j in sorted(np.nonzero(bits)[0], key=lambda j: -cb[j]):
        for m, f in enumerate(free):
            if f >= cb[j]:
                nib_of[j], nib_shift[j] = m, 4 - f
                free[m] -= cb[j]
                groups[m].append(int(j))
                break
        else:
            nib_of[j], nib_shift[j] = len(free), 0
            free.append(4 - int(cb[j]))
            groups.append([int(j)])
    M = max(2, len(groups) + len(groups) % 2)
    groups += [[] for _ in range(M - len(groups))]
    return nib_of, nib_shift, groups


def _greedy_widths(err, w, maxb, target):
    """Widths cb_j in 0..maxb_j minimising sum_j w_j err[j, cb_j] (err (d,
    5): the error of each width): from all zero, repeatedly the step (one
    or more bits of one dimension) with the largest error drop per bit,
    until the error is at most ``target`` or no step lowers it."""
    d = err.shape[0]
    cb = np.zeros(d, np.int64)
    at = np.arange(d)
    cur = float((w * err[:, 0]).sum())
    rate = np.zeros((d, 5))
    while cur > target:
        rate[:] = -np.inf
        for b in range(1, 5):
            ok = (cb < b) & (b <= maxb)
            rate[:, b] = np.where(ok, w * (err[at, cb] - err[:, b]) / np.maximum(b - cb, 1), -np.inf)
        j, b = np.unravel_index(int(np.argmax(rate)), rate.shape)
        if not rate[j, b] > 0:
            break
        cur -= w[j] * (err[j, cb[j]] - err[j, b])
        cb[j] = b
    return cb
