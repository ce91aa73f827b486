"""Candidate generation with SIMD 4-bit fast-scan over coarse codes.

Every code field of width b keeps its top min(b, 4) bits as a *coarse* field;
coarse fields are packed (first-fit decreasing) into 4-bit groups so that a
group's value is a sum of independent per-field contributions.  That is
exactly a product quantizer with 16 centroids per sub-quantizer, so FAISS's
``IndexPQFastScan`` (SIMD lookup tables quantized to 8 bits) scores it: each
group becomes one sub-quantizer over a "virtual" 4-dimensional slice that
holds the query components of the group's fields, and its centroids are the
coarse levels (the mean of the fine levels sharing those top bits).  The
coarse scores only *select* candidates; the index rescores them with the
full-precision ADC (see ``FlatIndex.search``, parameter ``fs``).  Only the
dimensions that carry most of the score variance get coarse fields
(``COVERAGE``): the rescoring restores the rest.

Per-vector scales (``ASQ..s`` codes) cannot be folded into a PQ code, so for
scaled codes the coarse code is instead a per-dimension <= 4-bit
quantization of the decoded, rescaled vectors s * u_hat (levels from
``asq.solve`` on a sample), which ranks by approximate true inner products.
The coarse codes are derived from the stored codes: held in memory, not
saved.
"""

from __future__ import annotations

import threading

import numpy as np

from ._kernels import adc as _adc

DSUB = 4
#: vectors per fast-scan block (FAISS's bbs)
BLOCK = 32
#: share of the estimated score variance the coarse codes keep (dimensions by
#: decreasing share); after PCA a few dimensions carry almost all of it, so
#: the SIMD stage scans far fewer sub-quantizers (MiniLM raw, 4 bits: 126 of
#: 347 coded dimensions; same recall@10 at the default factor, 1.5x faster)
COVERAGE = 0.99
#: run the FAISS stage on one thread: its OpenMP workers otherwise keep
#: spinning after each call and starve the numba stages that follow (on a
#: 2-core machine batch search ran 2.5x slower); parallelism comes from numba
FAISS_SINGLE_THREAD = True


class FastScanner:
    """Coarse fast-scan candidate generator derived from an encoder's layout.

    ``lists``: optional ``(ptr, order)`` CSR of an IVF partition (list l holds
    rows ``order[ptr[l]:ptr[l+1]]``); then candidates come only from the
    probed lists (FAISS ``IndexIVFPQFastScan`` with injected codes).
    ``lists="codes"`` keeps the coarse codes as a plain (n, M/2) array
    (``codes``) scored by ``byte_tables`` (graph navigation), no FAISS index.
    """

    def __init__(self, encoder, codes, scales=None, lists=None, chunk: int = 65536, sample: int = 100_000,
                 coverage: float | None = None):
        import faiss

        from . import asq

        self._faiss = faiss
        e = encoder
        n = codes.shape[0]
        codes = np.ascontiguousarray(codes)
        d = e.bits.size
        self.kept = self._kept_dims(e, codes, scales, coverage)
        bits = np.where(self.kept, e.bits, 0).astype(np.int64)  # dropped dims: as if 0 bits
        cb = np.minimum(bits, 4)
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
        if scales is None:
            # coarse level = mean of the fine levels sharing the top bits
            coarse = {j: e.levels[e.level_off[j]:e.level_off[j + 1]].reshape(1 << cb[j], -1).mean(axis=1)
                      for j in np.nonzero(bits)[0]}
            packed = _adc.coarse_nibbles(codes, bits.astype(e.bits.dtype), e.byte_of, e.shift_of,
                                         (bits - cb).astype(np.int32), nib_of, nib_shift, M)
        else:
            # scaled codes: quantize the decoded, rescaled vectors s * u_hat
            # per dimension (so one index ranks by approximate true scores)
            def rescaled(rows):
                Zh = _adc.decode(codes[rows], e.levels, e.level_off, e.bits, e.byte_of, e.shift_of, d)
                return Zh * scales[rows, None]

            rng = np.random.default_rng(0)
            smp = np.sort(rng.choice(n, min(n, sample), replace=False))
            Zs = rescaled(smp)
            coarse = {}
            for j in np.nonzero(bits)[0]:
                coarse[j] = asq.solve(Zs[:, j], 1 << cb[j], method="approx")
                coarse[j] = np.concatenate([coarse[j], np.full((1 << cb[j]) - coarse[j].size, coarse[j][-1])])
            lv = [coarse[j] if bits[j] else np.zeros(0) for j in range(d)]
            off = np.zeros(d + 1, np.int64)
            off[1:] = np.cumsum([x.size for x in lv])
            flat = np.concatenate(lv).astype(np.float64)
            byte_of = (nib_of // 2).astype(np.int32)
            shift_of = (nib_shift + 4 * (nib_of % 2)).astype(np.int32)
            packed = np.empty((n, M // 2), np.uint8)
            for r0 in range(0, n, chunk):
                rows = np.arange(r0, min(n, r0 + chunk))
                packed[rows] = _adc.encode(np.ascontiguousarray(rescaled(rows), np.float32), flat, off,
                                           cb.astype(np.int32), byte_of, shift_of, M // 2, False, 0, 0)
        cent = np.zeros((M, 16, DSUB), np.float32)
        self.slot_dim = np.full((M, DSUB), -1, np.int64)
        for m, js in enumerate(groups):
            for s, j in enumerate(js):
                mask = (1 << cb[j]) - 1
                for c in range(16):
                    cent[m, c, s] = coarse[j][(c >> nib_shift[j]) & mask]
                self.slot_dim[m, s] = j
        self.M = M
        self._vsel = np.ascontiguousarray(self.slot_dim.ravel())
        self._nprobe = -1  # the nprobe last set on the FAISS IVF index
        self.dv = M * DSUB
        self.code_bytes = M // 2
        self.lists = lists
        self._nprobe_lock = threading.Lock()
        self.cent = cent
        self.codes = None
        if lists == "codes":
            self.codes = packed  # plain coarse codes, no FAISS index (graph navigation)
            self.index = None
        elif lists is None:
            pq = faiss.IndexPQ(self.dv, M, 4, faiss.METRIC_INNER_PRODUCT)
            faiss.copy_array_to_vector(cent.ravel(), pq.pq.centroids)
            pq.is_trained = True
            faiss.copy_array_to_vector(packed.ravel(), pq.codes)
            pq.ntotal = n
            self.index = faiss.IndexPQFastScan(pq)
        else:
            self.index = self._ivf_index(cent, packed, *lists)

    def _ivf_index(self, cent, packed, ptr, order):
        """FAISS IVF fast-scan index whose list l holds the coarse codes of
        rows ``order[ptr[l]:ptr[l+1]]`` (labels = row numbers).  Probing is
        ours (``search_preassigned``), so its coarse quantizer is a dummy."""
        faiss = self._faiss
        nlist = ptr.size - 1
        self._quantizer = faiss.IndexFlatIP(self.dv)
        self._quantizer.add(np.zeros((nlist, self.dv), np.float32))
        ivf = faiss.IndexIVFPQFastScan(self._quantizer, self.dv, nlist, self.M, 4,
                                       faiss.METRIC_INNER_PRODUCT, BLOCK)
        ivf.by_residual = False
        faiss.copy_array_to_vector(cent.ravel(), ivf.pq.centroids)
        ivf.is_trained = True
        packer = ivf.get_CodePacker()
        bs, cs = int(packer.block_size), int(packer.code_size)
        if cs != self.code_bytes or int(packer.nvec) != BLOCK:
            raise RuntimeError(f"unexpected FAISS fast-scan layout (code size {cs}, block {packer.nvec})")
        for lst in range(nlist):
            rows = np.ascontiguousarray(order[ptr[lst]:ptr[lst + 1]], np.int64)
            if rows.size == 0:
                continue
            nb = -(-rows.size // BLOCK)
            flat = np.zeros((nb * BLOCK, cs), np.uint8)
            flat[:rows.size] = packed[rows]
            blocks = np.zeros(nb * bs, np.uint8)
            for b in range(nb):
                packer.pack_all(faiss.swig_ptr(flat[b * BLOCK:(b + 1) * BLOCK]),
                                faiss.swig_ptr(blocks[b * bs:(b + 1) * bs]))
            ivf.invlists.add_entries(lst, rows.size, faiss.swig_ptr(rows), faiss.swig_ptr(blocks))
        ivf.ntotal = int(packed.shape[0])
        return ivf

    @staticmethod
    def _kept_dims(e, codes, scales, coverage, sample: int = 10_000):
        """Dimensions the coarse codes keep: by decreasing share of the score
        variance, E[y_j^2] * Var(decoded x_j) (query energy times the spread
        of the coded values, on a seeded sample of rows), until ``coverage``
        of the total; the rescoring stage still uses every dimension."""
        coverage = COVERAGE if coverage is None else float(coverage)
        if not 0.0 < coverage <= 1.0:
            raise ValueError(f"coverage must be in (0, 1], got {coverage!r}")
        coded = e.bits > 0
        if coverage >= 1.0:
            return coded
        rng = np.random.default_rng(0)
        n = codes.shape[0]
        rows = np.sort(rng.choice(n, min(n, sample), replace=False))
        Z = _adc.decode(np.ascontiguousarray(codes[rows]), e.levels, e.level_off, e.bits, e.byte_of,
                        e.shift_of, e.bits.size).astype(np.float64)
        if scales is not None and scales.size:
            Z *= scales[rows, None]
        share = np.where(coded, np.asarray(e.energy, np.float64) * Z.var(axis=0), 0.0)
        if share.sum() <= 0:
            return coded
        order = np.argsort(-share, kind="stable")
        cum = np.cumsum(share[order]) / share.sum()
        keep = np.zeros(e.bits.size, bool)
        keep[order[:int(np.searchsorted(cum, coverage)) + 1]] = True
        return keep & coded

    @property
    def nbytes(self) -> int:
        """Bytes of the derived coarse codes (held in memory, not saved)."""
        if self.codes is not None:
            return int(self.codes.nbytes)
        return int(self.index.ntotal) * self.code_bytes

    def byte_tables(self, Y) -> np.ndarray:
        """(nq, M/2, 256) float32 lookup tables of the coarse codes: entry
        [g, c] is the coarse score of code byte g = c (low nibble: group 2g,
        high nibble: group 2g + 1), so a row's coarse score is a sum of M/2
        lookups (the same ADC kernels as the full codes)."""
        return _adc.coarse_byte_tables(self.virtual_queries(Y), self.cent)

    def virtual_queries(self, Y):
        """Map rotated queries (nq, d) to the virtual (nq, M * 4) space."""
        return _adc.gather_columns(np.ascontiguousarray(Y, np.float32), self._vsel)

    def candidates(self, Y, kk: int, num_threads: int, probes=None) -> np.ndarray:
        """Rows (nq, kk) of the best coarse scores (-1 padded); ``probes``
        (nq, nprobe) int64: the lists to scan (IVF scanners only).  Calls the
        SWIG entry points directly (the Python wrappers' checks and copies
        cost ~20 us per single-query call)."""
        faiss = self._faiss
        sp = faiss.swig_ptr
        Yv = self.virtual_queries(Y)
        n = Yv.shape[0]
        kk = min(kk, int(self.index.ntotal))
        D = np.empty((n, kk), np.float32)
        I = np.empty((n, kk), np.int64)
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if FAISS_SINGLE_THREAD else max(1, num_threads))
        try:
            if self.lists is None:
                self.index.search_c(n, sp(Yv), kk, sp(D), sp(I), None)
            else:
                probes = np.ascontiguousarray(probes, np.int64)
                Dq = np.zeros(probes.shape, np.float32)
                with self._nprobe_lock:  # nprobe is a field of the shared FAISS index
                    if self._nprobe != probes.shape[1]:
                        self.index.nprobe = probes.shape[1]
                        self._nprobe = probes.shape[1]
                    self.index.search_preassigned_c(n, sp(Yv), kk, sp(probes), sp(Dq), sp(D), sp(I), False)
        finally:
            faiss.omp_set_num_threads(prev)
        return I
