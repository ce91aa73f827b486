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
full-precision ADC (see ``FlatIndex.search``, parameter ``fs``).

Per-vector scales (``ASQ..s`` codes) cannot be folded into a PQ code, so for
scaled codes the coarse code is instead a per-dimension <= 4-bit
quantization of the decoded, rescaled vectors s * u_hat (levels from
``asq.solve`` on a sample), which ranks by approximate true inner products.
The coarse codes are derived from the stored codes: held in memory, not
saved.
"""

from __future__ import annotations

import numpy as np

from ._kernels import adc as _adc

DSUB = 4
#: run the FAISS stage on one thread: its OpenMP workers otherwise keep
#: spinning after each call and starve the numba stages that follow (on a
#: 2-core machine batch search ran 2.5x slower); parallelism comes from numba
FAISS_SINGLE_THREAD = True


class FastScanner:
    """Coarse fast-scan candidate generator derived from an encoder's layout."""

    def __init__(self, encoder, codes, scales=None, chunk: int = 65536, sample: int = 100_000):
        import faiss

        from . import asq

        self._faiss = faiss
        e = encoder
        bits = e.bits.astype(np.int64)
        d = bits.size
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
        n = codes.shape[0]
        codes = np.ascontiguousarray(codes)
        if scales is None:
            # coarse level = mean of the fine levels sharing the top bits
            coarse = {j: e.levels[e.level_off[j]:e.level_off[j + 1]].reshape(1 << cb[j], -1).mean(axis=1)
                      for j in np.nonzero(bits)[0]}
            packed = _adc.coarse_nibbles(codes, e.bits, e.byte_of, e.shift_of,
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
        self.dv = M * DSUB
        pq = faiss.IndexPQ(self.dv, M, 4, faiss.METRIC_INNER_PRODUCT)
        faiss.copy_array_to_vector(cent.ravel(), pq.pq.centroids)
        pq.is_trained = True
        faiss.copy_array_to_vector(packed.ravel(), pq.codes)
        pq.ntotal = n
        self.index = faiss.IndexPQFastScan(pq)
        self.code_bytes = M // 2

    @property
    def nbytes(self) -> int:
        """Bytes of the derived coarse codes (held in memory, not saved)."""
        return int(self.index.ntotal) * self.code_bytes

    def virtual_queries(self, Y):
        """Map rotated queries (nq, d) to the virtual (nq, M * 4) space."""
        Yv = np.zeros((Y.shape[0], self.M, DSUB), np.float32)
        ok = self.slot_dim >= 0
        Yv[:, ok] = Y[:, self.slot_dim[ok]]
        return Yv.reshape(Y.shape[0], self.dv)

    def candidates(self, Y, kk: int, num_threads: int) -> np.ndarray:
        """Rows (nq, kk) of the best coarse scores (-1 padded)."""
        faiss = self._faiss
        Yv = self.virtual_queries(Y)
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1 if FAISS_SINGLE_THREAD else max(1, num_threads))
        try:
            _, I = self.index.search(Yv, min(kk, int(self.index.ntotal)))
        finally:
            faiss.omp_set_num_threads(prev)
        return I
