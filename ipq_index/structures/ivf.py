"""The IVF index: inverted lists of the codes, probed by inner product with
the k-means centroids."""

from __future__ import annotations

import math

import numpy as np

from .._kernels import codes as _codes
from .._kernels import probe as _probe
from .._kernels import rotation as _rotation
from .._numba import readonly, split_rows
from ..encoder import EncoderConfig
from ..settings import IVFSettings, setting_property
from .base import positive_int
from .flat import FlatIndex


#: the smallest normal float16 (2^-14): centroids whose largest magnitude is
#: below it would round to subnormals and lose their relative precision
HALF_MIN_NORMAL, HALF_MAX = float(np.finfo(np.float16).tiny), float(np.finfo(np.float16).max)


class IVFIndex(FlatIndex):
    """Inverted lists of ASQ codes: k-means centroids (faiss, L2) partition the
    corpus; a query probes the ``nprobe`` lists whose centroids have the largest
    inner product with it and scans their codes with the full-precision ADC.

    The stored codes are *direct* (the same global encoder as the flat
    index, not residuals), so one encoder serves every list and scores are
    comparable across lists.  The fast-scan coarse codes derived from them
    (not saved) are *residual* for unscaled codes (setting ``residual``): they
    quantize each row's decoded vector minus its list's centroid, and the
    scan adds <q, c_l> per probed list.
    """

    kind = "ivf"
    settings_class = IVFSettings
    _coverage_name = "COVERAGE"  # residual coarse codes (fast_scanner.COVERAGE)

    def __init__(self, d: int, nlist: int, config: EncoderConfig | None = None, *, rerank: int = 0,
                 rerank_dtype: str = "float16", spec: str | None = None, settings: IVFSettings | None = None):
        super().__init__(d, config, rerank=rerank, rerank_dtype=rerank_dtype, spec=spec, settings=settings)
        self.nlist = int(nlist)
        self.centroids = None
        self._cent_t = None
        self._spread = None
        self.assign = np.zeros(0, np.int32)
        self._lists = None

    nprobe = setting_property("Lists probed by default (setting ``nprobe``).")

    def _reset_derived(self):
        super()._reset_derived()
        self._cent_t = None
        self._spread = None

    def _check_training(self, X):
        if X.shape[0] < self.nlist:
            raise ValueError(f"IVF{self.nlist} needs at least {self.nlist} training vectors, got {X.shape[0]}")

    def _train_structure(self, X, enc):
        """k-means centroids (faiss, L2) of a seeded sample of ``X``."""
        import faiss

        rng = np.random.default_rng(enc.config.seed)
        m = min(256 * self.nlist, max(64 * self.nlist, self.settings.train_points))
        sample = X if X.shape[0] <= m else X[np.sort(rng.choice(X.shape[0], m, replace=False))]
        km = faiss.Kmeans(self.d, self.nlist, niter=20, seed=int(enc.config.seed) + 1, verbose=False)
        km.train(np.ascontiguousarray(sample, np.float32))
        centroids = readonly(np.ascontiguousarray(km.centroids, np.float32))

        def install():
            self.centroids = centroids
            self._cent_t = None
            self._spread = None
            self.assign = np.zeros(0, np.int32)
            self._lists = None

        return install

    def _encode_extra(self, X, num_threads):
        """The new rows' lists: nearest centroid (L2, faiss)."""
        import faiss

        flat = faiss.IndexFlatL2(self.d)
        flat.add(self.centroids)
        _, a = flat.search(X, 1)
        return a[:, 0].astype(np.int32)

    def _append_rows(self, X, codes, scales, new_ids, extra, num_threads):
        self.assign = readonly(np.concatenate([np.asarray(self.assign), extra]))
        super()._append_rows(X, codes, scales, new_ids, extra, num_threads)

    def _keep_rows(self, keep):
        super()._keep_rows(keep)
        self.assign = readonly(np.asarray(self.assign)[keep])

    def _changed(self):
        super()._changed()
        self._lists = None
        self._spread = None

    def _list_index(self):
        if self._lists is None or self._lists[1].size != self.nrows:
            order = np.argsort(np.asarray(self.assign), kind="stable").astype(np.int64)
            ptr = np.searchsorted(np.asarray(self.assign)[order], np.arange(self.nlist + 1)).astype(np.int64)
            self._lists = (ptr, order)
        return self._lists

    def search(self, Q, k: int, *, rerank: int | None = None, nprobe: int | None = None,
               fs: int | None = None, filter=None, num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products probing ``nprobe`` lists (default: the index's
        ``nprobe``; ``nprobe = nlist`` scans everything, like the flat index).

        The probed lists are scanned by the SIMD fast-scan over coarse codes
        and the best ``fs * max(k, rerank * k)`` are rescored with the full
        ADC (``fs``: as in ``FlatIndex.search``, the default growing with the
        rows scanned; ``fs=0`` scans the lists with the full ADC).  ``filter``: as in
        ``FlatIndex.search``; the probe reaches further lists as the filter
        leaves fewer rows (nprobe * live rows / allowed rows, at most nlist).
        """
        key = self._call_key(return_std, filter, k, rerank, fs, nprobe, num_threads)
        out = self._prepared_call(key, Q)
        if out is not None:
            return out
        npb = min(self.nprobe if nprobe is None else positive_int(nprobe, "nprobe"), self.nlist)
        return self._scan_search(Q, k, rerank, num_threads, return_std, key, fs, filter, npb)

    def _probe_count(self, nprobe, m):
        live = self.ntotal  # removed rows do not count: an index of the live rows alone would hold these
        if 0 < m < live:  # a filter leaves fewer rows per list: probe further
            nprobe = min(self.nlist, math.ceil(nprobe * live / m))
        return nprobe, m * nprobe / max(1, self.nlist)  # the allowed rows of the lists are scanned

    def _kernel_probe(self, npb, fast):
        dims, Ct = self._probe_args()
        if not fast:  # the scan of every row needs no list terms
            return dims, Ct, self._list_spread(), npb if 0 < npb < self.nlist else 0, False
        # residual coarse codes need every scanned list's <q, c_l>: the probe runs even for nprobe = nlist
        resid = self._fast_scanner().residual
        return dims, Ct, self._list_spread(), npb if npb < self.nlist or resid else 0, resid

    def _scan_lists(self):
        return self._list_index()

    def _scan_residual(self):
        if not self.settings.residual or self.encoder.config.scale:
            return None
        return self._transformed_centroids().astype(np.float32), np.asarray(self.assign)

    def _coarse_dims(self, sc):
        return np.union1d(super()._coarse_dims(sc), self._probe_space()[0])

    def _transformed_centroids(self):
        """(nlist, d) float64 centroids in the encoder's transformed space,
        R^T (c_l - mean)."""
        enc = self.encoder
        Cr = np.asarray(self.centroids, np.float64) - enc.mean
        return Cr if enc.rotation is None else Cr @ np.asarray(enc.rotation, np.float64)

    def _probe_space(self):
        """Centroids in the encoder's transformed space, restricted to the
        dimensions that order the lists: <q, c_l> = <q, mean> + <y, R^T (c_l -
        mean)> (y = R^T q, R orthogonal), and the first term is the same for
        every list.  Dimensions are kept by decreasing E[y_j^2] Var_l(c'_lj)
        until ``probe_coverage`` (setting) of the total (after PCA a prefix: 10^6 synthetic,
        IVF4096, 128 of 384 dimensions probe the same lists).  Derived from
        the centroids and the encoder, not saved.  The centroids are rounded to
        float16 (relative error <= 2^-11: the probe scores only order the
        lists; ``_probe_args``) when their largest magnitude lies in
        float16's normal range, else kept float32."""
        if self._cent_t is None:
            enc = self.encoder
            Cr = self._transformed_centroids()
            energy = np.ones(self.d) if enc.energy is None else np.asarray(enc.energy, np.float64)
            share = energy * Cr.var(axis=0)
            dims = np.arange(self.d)
            cover = self.settings.probe_coverage
            if cover < 1.0 and share.sum() > 0:
                order = np.argsort(-share, kind="stable")
                cum = np.cumsum(share[order]) / share.sum()
                dims = np.sort(order[:int(np.searchsorted(cum, cover)) + 1])
            top = float(np.abs(Cr[:, dims]).max()) if dims.size and Cr.size else 0.0
            if HALF_MIN_NORMAL <= top <= HALF_MAX:
                Ct16 = np.ascontiguousarray(Cr[:, dims].T, np.float16)
                self._cent_t = (dims.astype(np.int64), Ct16.astype(np.float32), Ct16.view(np.uint16))
            else:  # beyond float16's range, or mostly subnormal in it: float32 centroids
                self._cent_t = (dims.astype(np.int64), np.ascontiguousarray(Cr[:, dims].T, np.float32), None)
        return self._cent_t[:2]

    def _probe_args(self):
        """``_probe_space`` as the single-query kernels take it: the centroids
        as float16 bit patterns where the CPU widens them (``HALF_SIMD``; half
        the bytes, the same sums), else float32."""
        dims, Ct = self._probe_space()
        half = self._cent_t[2]
        return dims, (half if _rotation.HALF_SIMD and half is not None else Ct)

    def _list_spread(self):
        """(nlist,) float32 ``probe_spread`` * s_l, s_l^2 = sum_j e_j v_lj / sum_j e_j:
        v_lj the mean squared residual of list l's members around its centroid
        along transformed dimension j (from the decoded codes), e_j the query
        energy E[y_j^2] the encoder was trained with.  Empty when
        ``probe_spread`` is 0.  Derived from the codes and cached per index
        size (not saved)."""
        if self.settings.probe_spread <= 0:
            return np.zeros(0, np.float32)
        if self._spread is None or self._spread[0] != self.nrows:
            enc = self.encoder
            Cr = self._transformed_centroids()
            w = np.ones(self.d) if enc.energy is None else np.maximum(np.asarray(enc.energy, np.float64), 0)
            w = w / w.sum() if w.sum() > 0 else np.full(self.d, 1.0 / self.d)
            scales = np.asarray(self.scales) if enc.config.scale else np.zeros(0, np.float32)
            assign = np.asarray(self.assign)
            args = (np.asarray(self.codes), scales, enc.levels, enc.level_off, enc.bits, enc.byte_of, enc.shift_of,
                    assign, np.ascontiguousarray(Cr, np.float32), w)
            res = split_rows(_codes.residual_energy, self.nrows, -1, args, rows=(0, 1, 7) if scales.size else (0, 7),
                             min_chunk=4096)
            tot = np.bincount(assign, weights=res, minlength=self.nlist)
            cnt = np.bincount(assign, minlength=self.nlist)
            spread = self.settings.probe_spread * np.sqrt(tot / np.maximum(cnt, 1))
            self._spread = (self.nrows, spread.astype(np.float32))
        return self._spread[1]

    def _probes(self, Y, nprobe, Q=None, with_raw=False):
        """(nq, nprobe) lists with the largest probe scores <q, c_l> +
        ``probe_spread`` |q| s_l from the transformed queries Y (numba kernel,
        float32 sums: a BLAS call here fought the search threads and cost
        milliseconds per batch on 2 cores), best first; |q| from the queries
        ``Q`` (default: from Y, equal up to rounding).  ``with_raw``: also
        their <y, c_l> (probe dimensions, float32: the list terms of residual
        coarse codes)."""
        dims, Ct = self._probe_space()
        spread = self._list_spread()
        Y = np.ascontiguousarray(Y, np.float32)
        Q = Y if Q is None else np.ascontiguousarray(Q, np.float32)
        lists, raw = _probe.probe_lists(Y, dims, Ct, spread, int(nprobe), Q)
        return (lists, raw) if with_raw else lists

    def _warmup_params(self):
        part = max(1, self.nlist // 2)  # probes computed (every list probed skips them)
        return ({}, {"nprobe": part}, {"fs": 0, "nprobe": part})

    def _extra_state(self):
        return {"nlist": self.nlist}, {"ivf.centroids": self.centroids,
                                                              "ivf.assign": np.asarray(self.assign)}

    def _load_extra(self, meta, arrays):
        self.centroids = np.ascontiguousarray(arrays["ivf.centroids"])
        self._cent_t = None
        self._spread = None
        self.assign = arrays["ivf.assign"]

    @classmethod
    def _size_args(cls, header):
        return (int(header.get("nlist", 0)),)
