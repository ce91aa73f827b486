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

Per-vector scales (``ASQ..s`` codes) cannot be folded into a PQ code, so the
rows are split into buckets of similar scale (quantiles of log scale), each
with its own fast-scan index searched with the query times the bucket's
median scale.
"""

from __future__ import annotations

import numpy as np

from ._kernels import adc as _adc

DSUB = 4


class FastScanner:
    """Coarse fast-scan candidate generator derived from an encoder's layout."""

    def __init__(self, encoder, codes, scales=None, buckets: int = 8):
        import faiss

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
        cent = np.zeros((M, 16, DSUB), np.float32)
        self.slot_dim = np.full((M, DSUB), -1, np.int64)
        for m, js in enumerate(groups):
            for s, j in enumerate(js):
                L = e.levels[e.level_off[j]:e.level_off[j + 1]]
                coarse = L.reshape(1 << cb[j], -1).mean(axis=1)
                mask = (1 << cb[j]) - 1
                for c in range(16):
                    cent[m, c, s] = coarse[(c >> nib_shift[j]) & mask]
                self.slot_dim[m, s] = j
        self.M = M
        self.dv = M * DSUB
        packed = _adc.coarse_nibbles(np.ascontiguousarray(codes), e.bits, e.byte_of, e.shift_of,
                                     (bits - cb).astype(np.int32), nib_of, nib_shift, M)
        n = packed.shape[0]
        if scales is not None and buckets > 1 and n >= 64 * buckets:
            ls = np.log(np.maximum(np.abs(scales).astype(np.float64), 1e-30))
            edges = np.quantile(ls, np.linspace(0, 1, buckets + 1)[1:-1])
            which = np.searchsorted(edges, ls, side="right")
        else:
            which = np.zeros(n, np.int64)
        self.parts = []  # (faiss index, rows, query multiplier)
        for b in np.unique(which):
            rows = np.nonzero(which == b)[0].astype(np.int64)
            mult = float(np.median(scales[rows])) if scales is not None else 1.0
            pq = faiss.IndexPQ(self.dv, M, 4, faiss.METRIC_INNER_PRODUCT)
            faiss.copy_array_to_vector(cent.ravel(), pq.pq.centroids)
            pq.is_trained = True
            faiss.copy_array_to_vector(np.ascontiguousarray(packed[rows]).ravel(), pq.codes)
            pq.ntotal = rows.size
            self.parts.append((faiss.IndexPQFastScan(pq), rows, mult))
        self.code_bytes = M // 2

    @property
    def nbytes(self) -> int:
        return sum(p[1].size for p in self.parts) * (self.code_bytes + 8)

    def virtual_queries(self, Y):
        """Map rotated queries (nq, d) to the virtual (nq, M * 4) space."""
        Yv = np.zeros((Y.shape[0], self.M, DSUB), np.float32)
        ok = self.slot_dim >= 0
        Yv[:, ok] = Y[:, self.slot_dim[ok]]
        return Yv.reshape(Y.shape[0], self.dv)

    def candidates(self, Y, kk: int, num_threads: int) -> np.ndarray:
        """Rows (nq, <= kk * parts) of the best coarse scores (-1 padded)."""
        faiss = self._faiss
        Yv = self.virtual_queries(Y)
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(max(1, num_threads))
        try:
            out = []
            for index, rows, mult in self.parts:
                k = min(kk, rows.size)
                _, I = index.search(Yv * np.float32(mult), k)
                out.append(np.where(I >= 0, rows[np.maximum(I, 0)], -1))
        finally:
            faiss.omp_set_num_threads(prev)
        return np.concatenate(out, axis=1)
