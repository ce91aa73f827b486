"""User API: a flat MIPS index over ASQ codes, the factory and persistence.

Scores are raw inner products (float32, descending), not ``1 - ip``.
"""

from __future__ import annotations

import re
import threading
from dataclasses import asdict

import numpy as np

from .. import cost_model, storage
from .._kernels import cand_adc as _cand
from .._kernels import fastscan as _fs
from .._kernels import graph_search as _gs
from .._kernels import rerank as _rr
from .._kernels import tables as _adc
from .._numba import SERIAL_QUERIES, concat_rows, map_chunks, readonly, resolve_threads, split_rows
from ..encoder import ASQEncoder, EncoderConfig, check_matrix
from ..fast_scanner import FastScanner
from ..settings import NAVS, FlatSettings, GraphSettings, IVFSettings

__all__ = ["FlatIndex", "IVFIndex", "GraphIndex", "index_factory", "load", "parse_spec", "warmup"]

#: the default fast-scan candidate factor (setting ``fs``) grows as
#: sqrt(rows scanned / FS_REF_ROWS) above that many rows: the coarse ranking
#: errs more on larger corpora while rescoring stays cheap (10^6 synthetic
#: vectors, flat: recall@10 0.892 at fs=10, 0.941 at 32, QPS 626 vs 590;
#: eval/results/flat_ivf1024_1m_synthetic_fs_coverage_rerank_sweep.txt)
FS_REF_ROWS = 100_000
#: queries processed together (bounds the lookup-table memory)
QUERY_CHUNK = 32

_CODEC = re.compile(r"^ASQ(?P<bits>\d+(?:\.\d+)?)(?P<flags>[a-z]*)$")
_RERANK = re.compile(r"^Rerank(?P<factor>\d+)?(?P<dtype>F16|F32)?$")
_IVF = re.compile(r"^IVF(?P<nlist>\d+)$")
_HNSW = re.compile(r"^HNSW(?P<M>\d+)$")
_TRANSFORMS = {"PCA": "pca", "ROT": "random", "RR": "random"}


def parse_spec(spec: str) -> dict:
    """Parse a factory string ``[transform,] [IVF<nlist>|HNSW<M>,] ASQ<bits>[flags] [,Rerank[<k>][F16|F32]]``.

    transform: ``PCA`` or ``ROT`` (random rotation); none when absent.
    structure: ``IVF<nlist>`` (inverted lists, probed by inner product with
    the k-means centroids), ``HNSW<M>`` (graph walk scored by ADC); a flat
    scan when absent.
    flags on the codec: ``u`` unbiased rounding (default nearest), ``s``
    per-vector scale, ``m`` minimax (worst-case) objective.
    ``Rerank4`` keeps a float16 copy (``F32``: float32) and re-ranks 4 x k
    ADC candidates exactly by default.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"index spec must be a non-empty string, got {spec!r}")
    tokens = [t.strip() for t in spec.split(",")]
    out = {"transform": "none", "rerank": 0, "rerank_dtype": "float16", "structure": "flat"}
    codec = None
    for pos, tok in enumerate(tokens):
        if tok in _TRANSFORMS and pos == 0:
            out["transform"] = _TRANSFORMS[tok]
        elif (m := _HNSW.match(tok)) and codec is None and out["structure"] == "flat":
            out["structure"] = "hnsw"
            out["M"] = int(m.group("M"))
            if not 2 <= out["M"] <= 256:
                raise ValueError(f"bad index spec {spec!r}: HNSW M must be in 2..256")
        elif (m := _IVF.match(tok)) and codec is None and out["structure"] == "flat":
            out["structure"] = "ivf"
            out["nlist"] = int(m.group("nlist"))
            if out["nlist"] < 1:
                raise ValueError(f"bad index spec {spec!r}: IVF needs at least 1 list")
        elif (m := _CODEC.match(tok)) and codec is None:
            codec = m
        elif (m := _RERANK.match(tok)) and codec is not None and pos == len(tokens) - 1:
            out["rerank"] = int(m.group("factor") or 4)
            if out["rerank"] < 1:
                raise ValueError(f"bad index spec {spec!r}: rerank factor must be >= 1")
            out["rerank_dtype"] = "float32" if m.group("dtype") == "F32" else "float16"
        else:
            raise ValueError(
                f"bad index spec {spec!r}: cannot parse {tok!r} (expected "
                "'[PCA|ROT,][IVF<nlist>|HNSW<M>,]ASQ<bits>[u][s][m][,Rerank[<factor>][F16|F32]]')")
    if codec is None:
        raise ValueError(f"bad index spec {spec!r}: no ASQ<bits> codec")
    flags = codec.group("flags")
    if set(flags) - set("usm") or len(set(flags)) != len(flags):
        raise ValueError(f"bad index spec {spec!r}: unknown codec flags {flags!r} (u, s, m)")
    out["bits"] = float(codec.group("bits"))
    out["rounding"] = "unbiased" if "u" in flags else "nearest"
    out["scale"] = "s" in flags
    out["objective"] = "max" if "m" in flags else "sum"
    return out


def index_factory(d: int, spec: str, **options) -> "FlatIndex":
    """Build an untrained index from a factory string (see :func:`parse_spec`).

    ``options``: per-index settings (``FlatSettings`` / ``IVFSettings`` /
    ``GraphSettings`` fields of the spec's structure, e.g. ``coverage``,
    ``nprobe``, ``ef``) and :class:`EncoderConfig` fields (e.g. ``seed``,
    ``sample_size``, ``method``).
    """
    if not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"dimension d must be a positive int, got {d!r}")
    p = parse_spec(spec)
    cls = {"hnsw": GraphIndex, "ivf": IVFIndex}.get(p["structure"], FlatIndex)
    names = cls.settings_class.names()
    unknown = set(options) - set(names) - set(EncoderConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown options {sorted(unknown)} for {spec!r}: settings of a {cls.__name__} are "
                         f"{', '.join(names)}; encoder options are {', '.join(EncoderConfig.__dataclass_fields__)}")
    settings = cls.settings_class().replace(**{k: v for k, v in options.items() if k in names})
    cfg = EncoderConfig.from_dict({"bits": p["bits"], "transform": p["transform"],
                                   "rounding": p["rounding"], "scale": p["scale"], "objective": p["objective"],
                                   **{k: v for k, v in options.items() if k not in names}})
    size = {"hnsw": (p.get("M"),), "ivf": (p.get("nlist"),)}.get(p["structure"], ())
    return cls(int(d), *size, cfg, rerank=p["rerank"], rerank_dtype=p["rerank_dtype"], spec=spec,
               settings=settings)


def warmup(spec: str, d: int = 64) -> float:
    """Compile every kernel an index of ``spec`` uses to train, add, save and
    search (or load them from numba's on-disk cache), on a small synthetic
    index of dimension ``d``; returns the seconds it took.  Kernels compile
    once per machine (the cache lives next to the package, or in
    ``NUMBA_CACHE_DIR``); call this before timing a build or a search.
    The spec's IVF list count and graph degree are capped for the synthetic
    index: they do not change which kernels run."""
    import time

    t0 = time.perf_counter()
    p = parse_spec(spec)  # validates the spec
    small = ",".join(f"IVF{min(p['nlist'], 16)}" if _IVF.match(t.strip()) else
                     f"HNSW{min(p['M'], 8)}" if _HNSW.match(t.strip()) else t.strip() for t in spec.split(","))
    rng = np.random.default_rng(0)
    n = FlatSettings().fastscan_min_rows + 904  # reaches the fast-scan path
    X = (rng.standard_normal((n, d)) * np.linspace(2.0, 0.1, d)).astype(np.float32)
    index = index_factory(d, small)
    index.train(X)
    index.add(X)
    index.warmup()
    return time.perf_counter() - t0


class FlatIndex:
    """Exhaustive ADC scan over ASQ codes, with optional exact re-rank."""

    kind = "flat"
    settings_class = FlatSettings
    _coverage_name = "COVERAGE"  # fastscan constant holding the default coverage (unscaled codes)

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
        self._scanner = None  # fast-scan candidate generator (derived, rebuilt lazily)
        self._scanner_rows = -1
        self._fused_args = None  # per-index arguments of the fused kernels (see _fused_arrays)

    def _default_spec(self):
        c = self.encoder.config
        t = {"none": "", "pca": "PCA,", "random": "ROT,"}[c.transform]
        flags = ("u" if c.rounding == "unbiased" else "") + ("s" if c.scale else "") + \
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
        total += sum(int(np.asarray(a).nbytes) for a in self._extra_state()[1].values())
        return int(total)

    def configure(self, **settings) -> "FlatIndex":
        """Change per-index settings (see ``settings_class``; validated, saved
        with the index); derived search structures are rebuilt on the next
        search.  Returns the index."""
        self.settings = self.settings.replace(**settings)
        self._reset_derived()
        return self

    def _reset_derived(self):
        """Drop what is derived from the codes and settings (rebuilt lazily)."""
        self._scanner = None
        self._fused_args = None
        self.encoder._plans = {}

    def resolved_settings(self) -> dict:
        """The settings with automatic values resolved (what ``ipq info``
        shows and ``save`` writes)."""
        return {**self.settings.to_dict(), "coverage": self.coverage}

    @property
    def coverage(self) -> float:
        """Share of the estimated score variance the fast-scan coarse scores
        keep (setting ``coverage``; automatic: ``fastscan.COVERAGE``,
        ``fastscan.COVERAGE_SCALED`` for scaled codes, ``fastscan.NAV_COVERAGE``
        for a graph's navigation codes).  Lower values scan fewer bytes per
        row but rank candidates more coarsely (raise ``fs`` to compensate)."""
        if self.settings.coverage is not None:
            return self.settings.coverage
        from .. import fast_scanner as fastscan

        return fastscan.COVERAGE_SCALED if self.encoder.config.scale else getattr(fastscan, self._coverage_name)

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
        if self.ntotal:
            raise RuntimeError(f"the index holds {self.ntotal} vectors encoded with the current "
                               "quantizer: create a new index to retrain")
        self.encoder.train(X, queries, weights=weights, num_threads=num_threads)
        self.codes = np.zeros((0, self.encoder.nbytes), np.uint8)
        return self

    def add(self, X, ids=None, *, num_threads=-1):
        """Encode and append vectors; ``ids`` default to 0..n-1 continuing."""
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train() before add()")
        X = check_matrix(X, self.d, "vectors")
        n = X.shape[0]
        if ids is None:
            start = int(self.ids.max()) + 1 if self.ntotal else 0
            new_ids = np.arange(start, start + n, dtype=np.int64)
        else:
            new_ids = np.asarray(ids)
            if new_ids.shape != (n,) or not np.issubdtype(new_ids.dtype, np.integer):
                raise ValueError(f"ids must be {n} integers, got shape {new_ids.shape} dtype {new_ids.dtype}")
            new_ids = new_ids.astype(np.int64)
            if (new_ids < 0).any():
                raise ValueError("ids must be non-negative (-1 marks an empty result slot)")
        if self.rerank and self.rerank_dtype == "float16" and np.abs(X).max() > np.finfo(np.float16).max:
            raise ValueError(f"vectors exceed the float16 range (|x| > {np.finfo(np.float16).max:g}) of the "
                             "re-rank copy: use a float32 copy (',Rerank<k>F32')")
        codes, scales = self.encoder.encode(X, row0=self.ntotal, num_threads=num_threads)
        # everything computed: now commit (nothing changes if encoding failed)
        self.codes = readonly(np.concatenate([np.asarray(self.codes), codes]) if self.ntotal else codes)
        if scales is not None:
            self.scales = readonly(np.concatenate([np.asarray(self.scales), scales]) if self.ntotal else scales)
        if self.rerank:
            vec = X.astype(self.rerank_dtype)
            self.vectors = readonly(np.concatenate([np.asarray(self.vectors), vec])
                                    if self.vectors is not None else vec)
        self.ids = readonly(np.concatenate([np.asarray(self.ids), new_ids]) if self.ntotal else new_ids)
        return self

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
        fsf = self._fs_factor(fs, self.ntotal)
        use_fs = fsf > 0 and self.ntotal >= self.settings.fastscan_min_rows
        if use_fs and not return_std:
            fused = self._try_fused(Q, k, rerank, num_threads, fsf)
            if fused is not None:
                return fused

        def candidates(qb, kk, codes, scales):
            if use_fs:
                sc = self._fast_scanner()
                cand = sc.candidates(qb.Y, self._coarse_count(fsf, kk), 1)
                return qb.rescore(cand, kk, codes, scales, self._cand_layout(sc))
            return _adc.scan_topk_batch(qb.tables(), codes, scales, kk)

        return self._search(Q, k, rerank, num_threads, candidates, return_std)

    def _try_fused(self, Q, k, rerank, num_threads, fsf, probe=None):
        """A few queries on one thread (validated here): the whole fast-scan
        search in one kernel (``_fs.scan_query_serial``), exact re-rank
        included; None when the staged path applies (many queries, or
        the rescoring plan wants lookup tables).  ``probe``: (dims, Ct,
        spread, nprobe) of an IVF index.  Same results as the staged path
        (tested); saves the Python and dispatch between the stages."""
        Q, rr, kk, _, exact_ns = self._prepare(Q, k, rerank, num_threads)
        if Q.shape[0] >= SERIAL_QUERIES:
            return None
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
        args = (*R, *scan, *probe, ncand, *adc, kk, _PLAN_CODES[plan], ids, V if rr else no_V, k)
        v, _, out_ids = _fs.scan_query_serial(Q, *args)
        return v[:, :k], out_ids[:, :k]

    def _fused_arrays(self):
        """The per-index arguments of the fused single-query kernels, kept
        between searches (gathering them cost a few microseconds per query):
        (rotation, mean), the same with the rotation's leading columns alone
        (``_lead_dims``), and with those the candidate ADC reads too
        (``_cand_layout``), the fast-scan layout (slot dims, centroids, blocks,
        block rows, block pointers, fill; a graph's walk arrays instead:
        ``_fused_scan_args``), the ADC arrays (levels, fields, candidate
        layout, codes, scales), ids, and the stored copy for the exact
        re-rank (``_copy_rows``) with and without rows (the copy's own dtype either
        way: one kernel build per index).  Rebuilt when the scanner, the
        codes or the encoder change."""
        sc = self._fast_scanner()
        got = self._fused_args
        if got is None or got[0] is not sc or got[1] is not self.codes or got[2] is not self.encoder:
            enc = self.encoder
            V = np.zeros((0, 0), np.float32) if self.vectors is None else _copy_rows(self.vectors)
            R = enc.rotation16() if _adc.HALF_SIMD else enc.rotation32()
            mean = np.asarray(enc.mean, np.float64)
            lead = self._lead_dims(sc)
            cl = self._cand_layout(sc)
            lead_cand = lead if cl is None else max(lead, _round16(int(cl[0][:, 0].max()) + 1, self.d))
            R_lead, R_cand = ((np.ascontiguousarray(R[:, :m]) if m < self.d else R) if R.shape[0] else R
                              for m in (lead, lead_cand))
            got = self._fused_args = (sc, self.codes, enc, (
                (R, mean), (R_lead, mean), (R_cand, mean), self._fused_scan_args(sc),
                (enc.levels32(), enc.field_layout(), _NO_CAND if cl is None else cl, np.asarray(self.codes),
                 self._scales()),
                np.asarray(self.ids), V, V[:0]))
        return got[3]

    def _fused_scan_args(self, sc):
        return (sc.slot_dim, sc._centT, sc.blocks, sc.block_rows, sc.block_ptr, sc.block_fill)

    def _coarse_dims(self, sc):
        """Transformed dimensions the candidate stage reads (coarse tables)."""
        return sc.slot_dim[sc.slot_dim >= 0]

    def _lead_dims(self, sc):
        """How many leading transformed dimensions cover ``_coarse_dims``,
        rounded up to a multiple of 16 (at most d).  After PCA the coarse
        stage reads a prefix: 10^6 synthetic IVF1024, coverage 0.95, 147 of
        384 dimensions, so the fused search without the full-ADC rescoring
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

    def _fs_factor(self, fs, scanned_rows):
        """Fast-scan candidate factor: ``fs`` if given, else the setting
        ``fs`` grown by sqrt(rows scanned / FS_REF_ROWS) above that size."""
        if fs is not None:
            return _nonneg_int(fs, "fs")
        return int(np.ceil(self.settings.fs * max(1.0, np.sqrt(scanned_rows / FS_REF_ROWS))))

    def _coarse_count(self, fsf, kk):
        """Candidates the fast-scan stage passes to the full ADC: ``fs`` times
        the pool the next stage keeps (``kk`` = k, or rerank * k when
        re-ranking).  Measured alternative, rejected: max(fs * k, 2 * kk) was
        1.5x faster on MiniLM 50k at equal recall but lost recall at 10^6
        (IVF1024 Rerank4 nprobe=64: 0.961 -> 0.935): lower ``fs`` per call
        to trade recall for speed."""
        return min(self.ntotal, fsf * kk)

    def _search(self, Q, k, rerank, num_threads, candidates, return_std=False):
        """Validation, query chunks, candidates (structure-specific
        ``candidates(qb: _QueryBatch, kk, codes, scales) -> (scores, rows)``,
        one thread), exact re-rank and id mapping; the queries split across
        ``num_threads`` threads.

        With ``return_std`` a third array bounds the standard deviation of each
        ADC score under unbiased rounding: E[score] is the exact inner product
        and Var <= sum_j y_j^2 max-gap_j^2 / 4 (times scale^2).  A candidate
        whose score is more than ~3 std below the k-th score is very unlikely
        to belong to the top-k: use it to size ``rerank``.
        """
        Q, rr, kk, _, exact_ns = self._prepare(Q, k, rerank, num_threads, return_std)
        codes = np.asarray(self.codes)
        scales = self._scales()

        def run(a, b, part):  # queries a..b-1 on one thread, QUERY_CHUNK at a time
            out = []  # (scores, rows(, std)) per chunk
            for q0 in range(a, b, QUERY_CHUNK):
                Qc = Q[q0:min(b, q0 + QUERY_CHUNK)]
                qb = _QueryBatch(self.encoder, Qc, exact_ns=exact_ns, part=part, q0=q0,
                                 preference=self.settings.exact_preference)
                cand_v, cand_r = candidates(qb, kk, codes, scales)
                if rr:
                    sc, rows = _rerank_exact(Qc, np.asarray(self.vectors), cand_r, k)
                else:
                    sc = qb.scores(cand_v)
                    rows = cand_r
                chunk = (sc, rows)
                if return_std and rr:
                    chunk += (np.zeros(rows.shape, np.float32),)  # exactly re-ranked scores
                elif return_std:
                    V = self.encoder.variance_tables(qb.Y)
                    sc2 = scales.astype(np.float64) ** 2 if scales.size else scales
                    chunk += (np.sqrt(_adc.table_sums(V, codes, sc2, rows)).astype(np.float32),)
                out.append(chunk)
            return concat_rows(out)

        found = concat_rows(map_chunks(run, Q.shape[0], num_threads))
        # ids of the rows; -inf / -1 where fewer than k were found
        scores, ids = _adc.rows_to_ids(found[0], found[1], np.asarray(self.ids))
        if return_std:
            return scores, ids, found[2]
        return scores, ids

    def _prepare(self, Q, k, rerank, num_threads, return_std=False):
        """Validate a search call: (Q float32 C-contiguous, rerank factor,
        pool size kk, thread count, per-dimension cost of an exact dot
        product (0: no re-rank))."""
        if return_std and self.encoder.config.rounding != "unbiased":
            raise ValueError("return_std needs unbiased codes (spec flag 'u'): nearest rounding is biased")
        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train() and add() first")
        if self.ntotal == 0:
            raise RuntimeError("the index is empty: call add() before search()")
        Q = check_matrix(Q, self.d, "queries")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if k > self.ntotal:
            raise ValueError(f"k={k} exceeds the number of indexed vectors ({self.ntotal})")
        rr = self.rerank if rerank is None else _nonneg_int(rerank, "rerank")
        if rr and self.vectors is None:
            raise ValueError("this index keeps no vectors for re-rank (build it with ',Rerank')")
        kk = min(self.ntotal, k * rr) if rr else k
        nthreads = resolve_threads(num_threads)
        exact_ns = 0.0
        if rr:
            exact_ns = cost_model.exact_ns_per_dim(np.asarray(self.vectors).nbytes)
        return Q, rr, kk, nthreads, exact_ns

    def _scales(self):
        return np.asarray(self.scales) if self.encoder.config.scale else np.zeros(0, np.float32)

    def _fast_scanner(self):
        if self._scanner is None or self._scanner_rows != self.ntotal:
            scales = np.asarray(self.scales) if self.encoder.config.scale else None
            self._scanner = FastScanner(self.encoder, np.asarray(self.codes), scales, self._scan_lists(),
                                        coverage=self.coverage, residual=self._scan_residual())
            self._scanner_rows = self.ntotal
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
            # one query (serial kernels; fused when there are few candidates)
            # and a batch (parallel kernels), each with few candidates and
            # with many (lookup-table rescoring), for every search path
            for params in self._warmup_params():
                for Q, nt in ((q, 1), (batch, -1)):
                    for k in (1, min(self.ntotal, 64)):
                        self.search(Q, k, num_threads=nt, **params)
        return self

    def _warmup_params(self):
        return ({}, {"fs": 0})

    # -- persistence ----------------------------------------------------------
    def save(self, path) -> None:
        """Write one versioned file (atomic: temp file + rename)."""
        if not self.is_trained:
            raise RuntimeError("cannot save an untrained index")
        enc_meta, arrays = self.encoder.state()
        meta = {"kind": self.kind, "spec": self.spec, "d": self.d, "ntotal": self.ntotal,
                "encoder": enc_meta, "rerank": self.rerank, "rerank_dtype": self.rerank_dtype,
                "settings": self.resolved_settings(), "library": "ipq_index"}
        meta["search_defaults"] = {"rerank": self.rerank, **{k: v for k, v in meta["settings"].items()
                                                              if k in ("fs", "nprobe", "ef", "nav")}}
        arrays.update({"codes": np.asarray(self.codes), "ids": np.asarray(self.ids)})
        if self.encoder.config.scale:
            arrays["scales"] = np.asarray(self.scales)
        if self.vectors is not None:
            arrays["vectors"] = np.asarray(self.vectors)
        extra_meta, extra_arrays = self._extra_state()
        meta.update(extra_meta)
        arrays.update(extra_arrays)
        storage.save_arrays(path, meta, arrays)

    def _extra_state(self):
        return {}, {}

    def _load_extra(self, meta, arrays):
        pass

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
        size = {"ivf": (int(meta.get("nlist", 0)),), "hnsw": (int(meta.get("M", 0)),)}.get(cls.kind, ())
        idx = cls(int(meta["d"]), *size, enc.config, rerank=int(meta["rerank"]), rerank_dtype=meta["rerank_dtype"],
                  spec=meta["spec"], settings=settings)
        idx.encoder = enc
        idx.codes = arrays["codes"]
        idx.ids = arrays["ids"]
        if enc.config.scale:
            idx.scales = arrays["scales"]
        idx.vectors = arrays.get("vectors")
        idx._load_extra(meta, arrays)
        if idx.codes.shape != (int(meta["ntotal"]), enc.nbytes) or idx.ids.shape != (int(meta["ntotal"]),):
            raise storage.FormatError("index file is inconsistent: array shapes do not match the header")
        return idx

    def config_dict(self) -> dict:
        """Everything that defines the index: spec, encoder options, default
        re-rank factor and the (resolved) settings."""
        return {"spec": self.spec, "encoder": asdict(self.encoder.config), "rerank": self.rerank,
                "settings": self.resolved_settings()}


def _nonneg_int(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return int(value)


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

    def __init__(self, d: int, nlist: int, config: EncoderConfig | None = None, *, rerank: int = 0,
                 rerank_dtype: str = "float16", spec: str | None = None, settings: IVFSettings | None = None):
        super().__init__(d, config, rerank=rerank, rerank_dtype=rerank_dtype, spec=spec, settings=settings)
        self.nlist = int(nlist)
        self.centroids = None
        self._cent_t = None
        self._spread = None
        self.assign = np.zeros(0, np.int32)
        self._lists = None

    @property
    def nprobe(self) -> int:
        """Lists probed by default (setting ``nprobe``)."""
        return self.settings.nprobe

    @nprobe.setter
    def nprobe(self, value):
        self.configure(nprobe=value)

    def _reset_derived(self):
        super()._reset_derived()
        self._cent_t = None
        self._spread = None

    def train(self, X, queries=None, *, weights=None, num_threads=-1):
        import faiss

        super().train(X, queries, weights=weights, num_threads=num_threads)
        X = check_matrix(X, self.d, "training data")
        if X.shape[0] < self.nlist:
            raise ValueError(f"IVF{self.nlist} needs at least {self.nlist} training vectors, got {X.shape[0]}")
        rng = np.random.default_rng(self.encoder.config.seed)
        m = min(256 * self.nlist, max(64 * self.nlist, self.settings.train_points))
        sample = X if X.shape[0] <= m else X[np.sort(rng.choice(X.shape[0], m, replace=False))]
        km = faiss.Kmeans(self.d, self.nlist, niter=20, seed=int(self.encoder.config.seed) + 1, verbose=False)
        km.train(np.ascontiguousarray(sample, np.float32))
        self.centroids = readonly(np.ascontiguousarray(km.centroids, np.float32))
        self._cent_t = None
        self._spread = None
        self.assign = np.zeros(0, np.int32)
        self._lists = None
        return self

    def add(self, X, ids=None, *, num_threads=-1):
        import faiss

        if not self.is_trained:
            raise RuntimeError("the index is not trained: call train() before add()")
        X = check_matrix(X, self.d, "vectors")
        flat = faiss.IndexFlatL2(self.d)
        flat.add(self.centroids)
        _, a = flat.search(X, 1)
        super().add(X, ids, num_threads=num_threads)
        self.assign = readonly(np.concatenate([np.asarray(self.assign), a[:, 0].astype(np.int32)]))
        self._lists = None
        return self

    def _list_index(self):
        if self._lists is None or self._lists[1].size != self.ntotal:
            order = np.argsort(np.asarray(self.assign), kind="stable").astype(np.int64)
            ptr = np.searchsorted(np.asarray(self.assign)[order], np.arange(self.nlist + 1)).astype(np.int64)
            self._lists = (ptr, order)
        return self._lists

    def search(self, Q, k: int, *, rerank: int | None = None, nprobe: int | None = None,
               fs: int | None = None, num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products probing ``nprobe`` lists (default: the index's
        ``nprobe``; ``nprobe = nlist`` scans everything, like the flat index).

        The probed lists are scanned by the SIMD fast-scan over coarse codes
        and the best ``fs * max(k, rerank * k)`` are rescored with the full
        ADC (``fs``: as in ``FlatIndex.search``, the default growing with the
        rows scanned; ``fs=0`` scans the lists with the full ADC).
        """
        npb = self.nprobe if nprobe is None else _nonneg_int(nprobe, "nprobe")
        if npb < 1:
            raise ValueError("nprobe must be >= 1")
        npb = min(npb, self.nlist)
        fsf = self._fs_factor(fs, self.ntotal * npb / max(1, self.nlist))
        use_fs = fsf > 0 and self.ntotal >= self.settings.fastscan_min_rows
        ptr, rows = self._list_index()
        if use_fs and not return_std:
            resid = self._fast_scanner().residual
            # residual codes need every scanned list's <q, c_l>: the probe runs even for nprobe = nlist
            probe = (*self._probe_args(), self._list_spread(), npb if npb < self.nlist or resid else 0, resid)
            fused = self._try_fused(Q, k, rerank, num_threads, fsf, probe)
            if fused is not None:
                return fused

        def candidates(qb, kk, codes, scales):
            Qc = qb.Q
            resid = use_fs and self._fast_scanner().residual
            raw = None
            if npb < self.nlist or resid:
                probes, raw = self._probes(qb.Y, npb, Qc, with_raw=True)
            else:
                probes = np.tile(np.arange(self.nlist, dtype=np.int64), (Qc.shape[0], 1))
            if use_fs:
                sc = self._fast_scanner()
                cand = sc.candidates(qb.Y, self._coarse_count(fsf, kk), 1, probes, raw)
                return qb.rescore(cand, kk, codes, scales, self._cand_layout(sc))
            return _adc.scan_lists_topk(qb.tables(), codes, scales, ptr, rows, probes, kk)

        return self._search(Q, k, rerank, num_threads, candidates, return_std)

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
        lists; ``_probe_args``)."""
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
            Ct16 = np.ascontiguousarray(Cr[:, dims].T, np.float16)
            self._cent_t = (dims.astype(np.int64), Ct16.astype(np.float32), Ct16.view(np.uint16))
        return self._cent_t[:2]

    def _probe_args(self):
        """``_probe_space`` as the single-query kernels take it: the centroids
        as float16 bit patterns where the CPU widens them (``HALF_SIMD``; half
        the bytes, the same sums), else float32."""
        dims, Ct = self._probe_space()
        return dims, (self._cent_t[2] if _adc.HALF_SIMD else Ct)

    def _list_spread(self):
        """(nlist,) float32 ``probe_spread`` * s_l, s_l^2 = sum_j e_j v_lj / sum_j e_j:
        v_lj the mean squared residual of list l's members around its centroid
        along transformed dimension j (from the decoded codes), e_j the query
        energy E[y_j^2] the encoder was trained with.  Empty when
        ``probe_spread`` is 0.  Derived from the codes and cached per index
        size (not saved)."""
        if self.settings.probe_spread <= 0:
            return np.zeros(0, np.float32)
        if self._spread is None or self._spread[0] != self.ntotal:
            enc = self.encoder
            Cr = self._transformed_centroids()
            w = np.ones(self.d) if enc.energy is None else np.maximum(np.asarray(enc.energy, np.float64), 0)
            w = w / w.sum() if w.sum() > 0 else np.full(self.d, 1.0 / self.d)
            scales = np.asarray(self.scales) if enc.config.scale else np.zeros(0, np.float32)
            assign = np.asarray(self.assign)
            args = (np.asarray(self.codes), scales, enc.levels, enc.level_off, enc.bits, enc.byte_of, enc.shift_of,
                    assign, np.ascontiguousarray(Cr, np.float32), w)
            res = split_rows(_adc.residual_energy, self.ntotal, -1, args, rows=(0, 1, 7) if scales.size else (0, 7),
                             min_chunk=4096)
            tot = np.bincount(assign, weights=res, minlength=self.nlist)
            cnt = np.bincount(assign, minlength=self.nlist)
            spread = self.settings.probe_spread * np.sqrt(tot / np.maximum(cnt, 1))
            self._spread = (self.ntotal, spread.astype(np.float32))
        return self._spread[1]

    def _probes(self, Y, nprobe, Q=None, with_raw=False):
        """(nq, nprobe) lists with the largest probe scores <q, c_l> +
        ``probe_spread`` |q| s_l from the transformed queries Y (numba kernel,
        float32 sums: a BLAS call here fought the numba threads and cost
        milliseconds per batch on 2 cores), best first; |q| from the queries
        ``Q`` (default: from Y, equal up to rounding).  ``with_raw``: also
        their <y, c_l> (probe dimensions, float32: the list terms of residual
        coarse codes)."""
        dims, Ct = self._probe_space()
        spread = self._list_spread()
        Y = np.ascontiguousarray(Y, np.float32)
        Q = Y if Q is None else np.ascontiguousarray(Q, np.float32)
        lists, raw = _adc.probe_lists(Y, dims, Ct, spread, int(nprobe), Q)
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


class GraphIndex(FlatIndex):
    """HNSW-style graph walked with ADC scores on the codes.

    The graph is built by faiss ``IndexHNSWFlat`` with the inner-product metric
    on the float vectors (measured 0.975 vs 0.90 recall@10 at ef=256 for an
    L2 graph over the MIPS-to-NN augmentation x' = [x, sqrt(Phi^2 - |x|^2)]),
    so it serves vectors of any norm.  The
    walk scores nodes on the coarse fast-scan codes (or the full ADC, ``nav``)
    and the full ADC rescores the beam.  The float vectors are used only
    during ``add``; search reads the graph arrays and the codes (+ the re-rank
    copy).  The graph is built once: add all vectors in one call.
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

    @property
    def ef(self) -> int:
        """Beam width by default (setting ``ef``)."""
        return self.settings.ef

    @ef.setter
    def ef(self, value):
        self.configure(ef=value)

    @property
    def ef_construction(self) -> int:
        return self.settings.ef_construction

    def add(self, X, ids=None, *, num_threads=-1):
        import faiss

        if self.ntotal:
            raise RuntimeError("GraphIndex.add builds the graph once: add all vectors in one call")
        X = check_matrix(X, self.d, "vectors")
        hnsw = faiss.IndexHNSWFlat(self.d, self.M, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = self.settings.ef_construction
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(resolve_threads(num_threads))
        try:
            hnsw.add(X)
        finally:
            faiss.omp_set_num_threads(prev)
        g = hnsw.hnsw
        graph = {
            "neighbors": faiss.vector_to_array(g.neighbors).astype(np.int32),
            "offsets": faiss.vector_to_array(g.offsets).astype(np.int64),
            "cum": faiss.vector_to_array(g.cum_nneighbor_per_level).astype(np.int64),
            "entry": np.array([g.entry_point, g.max_level], np.int64),
        }
        super().add(X, ids, num_threads=num_threads)
        self.graph = {k: readonly(v) for k, v in graph.items()}
        return self

    def search(self, Q, k: int, *, rerank: int | None = None, ef: int | None = None,
               nav: str | None = None, num_threads: int | None = -1, return_std: bool = False):
        """Top-k inner products with a beam of width ``ef`` (default: the
        index's; raised to the candidate count when smaller).

        ``nav``: the scores that steer the walk.  ``"coarse"`` (default)
        scores nodes on the fast-scan coarse codes (~M/2 lookups per node in
        int16 tables, ``FastScanner.nav_tables``, instead of one float
        lookup per code byte) and rescores the ``ef`` best with the full ADC;
        ``"full"`` walks on the full ADC.  Codes of 6-8 bits rescore the
        beam more precisely than 4-bit ones at the same walk cost, so they
        reach a recall at a smaller ``ef``.  ``ef`` and ``nav`` default to
        the index's settings.
        """
        efv = self.ef if ef is None else _nonneg_int(ef, "ef")
        if efv < 1:
            raise ValueError("ef must be >= 1")
        nav = self.settings.nav if nav is None else nav
        if nav not in NAVS:
            raise ValueError(f"nav must be one of {NAVS}, got {nav!r}")
        gr = self.graph
        if nav == "coarse" and not return_std:
            Q, rr, kk, _, exact_ns = self._prepare(Q, k, rerank, num_threads)
            if Q.shape[0] < SERIAL_QUERIES:
                e = max(efv, kk)
                plan = cost_model.rescore_plan(self.encoder, e, kk, exact_ns, self.settings.exact_preference,
                                     cl=self._cand_layout(self._fast_scanner()))
                if plan != "tables":
                    return self._search_fused(Q, k, rr, kk, e, plan)

        visited, tags, held = self._take_visited(resolve_threads(num_threads))

        def candidates(qb, kk, codes, scales):
            e = max(efv, kk)
            if nav == "coarse":
                sc = self._fast_scanner()
                tables, wcodes, wscales, kw = sc.nav_tables(qb.Y), sc.codes, np.zeros(0, np.float32), e
            else:
                tables, wcodes, wscales, kw = qb.tables(), codes, scales, kk
            entry, max_level = int(gr["entry"][0]), int(gr["entry"][1])
            # each thread its own visited row, each query its own tag
            out = _gs.graph_search(tables, wcodes, wscales, gr["neighbors"], gr["offsets"], gr["cum"], entry,
                                   max_level, e, kw, self._beam_cap(e), visited[qb.part:qb.part + 1],
                                   self._next_tag(visited, tags, qb.part, qb.Q.shape[0]))
            return qb.rescore(out[1], kk, codes, scales, self._cand_layout(sc)) if nav == "coarse" else out

        try:
            return self._search(Q, k, rerank, num_threads, candidates, return_std)
        finally:
            if held:
                self._visit_lock.release()

    def _scan_lists(self):
        return "codes"  # plain coarse codes for navigation, no FAISS index

    def _lead_dims(self, sc):
        return self.d  # the walk rescores on every dimension: no narrowed rotation (nor its copy)

    def _search_fused(self, Q, k, rr, kk, e, plan):
        """A few queries on one thread, validated: the whole walk in one
        kernel (``_gs.graph_query_serial``), exact re-rank included.
        Same results as the staged path of ``search`` (tested); ~15 us less
        per query (MiniLM 50k, ef=48)."""
        (R, mean), _, _, walk, adc, ids, V, no_V = self._fused_arrays()
        visited, tags, held = self._take_visited(1)
        try:
            tag0 = self._next_tag(visited, tags, 0, Q.shape[0])
            v, _, out_ids = _gs.graph_query_serial(Q, R, mean, *walk, e, self._beam_cap(e), visited, tag0,
                                                   *adc, kk, _PLAN_CODES[plan], ids, V if rr else no_V, k)
        finally:
            if held:
                self._visit_lock.release()
        return v[:, :k], out_ids[:, :k]

    def _fused_scan_args(self, sc):
        """The walk's arguments of the fused kernel: navigation layout and
        codes, graph arrays, entry point and its level (the graph is built
        once, with the codes, so the cache key of ``_fused_arrays`` covers it)."""
        gr = self.graph
        return (sc.slot_dim, sc._centT, sc.codes, gr["neighbors"], gr["offsets"], gr["cum"],
                int(gr["entry"][0]), int(gr["entry"][1]))

    def _beam_cap(self, e):
        """Bound of the walk's candidate heap for beam width e (pushes beyond it are dropped)."""
        return min(self.ntotal + 1, 64 * e + 4096)

    def _take_visited(self, slots):
        """(visited-tag rows (slots, n) uint8, their next tags (slots,), held):
        rows kept between searches, one per thread of a search (row p for
        part p), zeroed when their tags wrap (``_next_tag``; zeroing an
        n-byte array per query costs more than the walk at 10^6 vectors; one
        byte per row keeps them in the L2 cache: GloVe 399k, ef=256, 7,300
        rows scored per query: 435 -> 420 us against int32 tags).  ``held``:
        the caller holds the rows' lock and releases it after the walk; a
        concurrent search from another Python thread gets fresh rows instead
        (held False)."""
        if not self._visit_lock.acquire(blocking=False):
            return np.zeros((slots, self.ntotal), _TAG_DTYPE), np.zeros(slots, np.int64), False
        try:
            buf = self._visit_buf
            if buf is None or buf.shape[0] < slots or buf.shape[1] != self.ntotal:
                buf = self._visit_buf = np.zeros((max(slots, 1), self.ntotal), _TAG_DTYPE)
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
        # a wide beam rescored with lookup tables takes the staged path
        # (tables beat the 16-field blocks above ~200-600 rows: cost_model.rescore_plan)
        return ({}, {"ef": 1024}, {"nav": "full"})

    def _extra_state(self):
        meta = {"M": self.M}
        return meta, {f"graph.{k}": v for k, v in self.graph.items()}

    def _load_extra(self, meta, arrays):
        self.graph = {k: arrays[f"graph.{k}"] for k in ("neighbors", "offsets", "cum", "entry")}


#: the probe arguments of a flat index's fused scan (no lists to choose)
_NO_PROBE = (np.zeros(0, np.int64), np.zeros((0, 0), np.uint16 if _adc.HALF_SIMD else np.float32),
             np.zeros(0, np.float32), 0, False)
_TAG_DTYPE = np.uint8
_TAG_MAX = int(np.iinfo(_TAG_DTYPE).max)  # visited tags wrap before this


#: the fused kernels' codes of the plans (``_rr.PLAN_*``)
_PLAN_CODES = {"exact": _rr.PLAN_NONE, "fields": _rr.PLAN_FIELDS, "cand": _rr.PLAN_CAND}
#: the candidate layout argument of the fused kernels when the SIMD candidate ADC does not apply
_NO_CAND = (np.zeros((0, 3), np.int64), np.zeros((0, 4), np.int32), np.zeros((0, 3), np.int64), 0, 4)


def _round16(m, d):
    """m rounded up to a multiple of 16, at most d (rotation columns kept by the fused search)."""
    return min(d, -(-m // 16) * 16)


class _QueryBatch:
    """One chunk of queries: rotated once; lookup tables built only when a
    search path asks for them (rescoring a short candidate list computes the
    ADC field by field instead, which is cheaper than building the tables).
    ``exact_ns``: the per-dimension cost of the exact re-rank that follows
    (0: the search does not re-rank)."""

    def __init__(self, encoder, Q, exact_ns=0.0, part=0, q0=0, preference=1.0):
        self.encoder = encoder
        self.Q = Q
        self.Y = encoder.rotate_queries(Q, num_threads=1)
        self._tables = None
        self.exact_ns = exact_ns
        self.part = part  # which of the search's threads runs this batch
        self.q0 = q0  # its first query's position in the search
        self.preference = preference  # setting exact_preference (``cost_model.rescore_plan``)

    def tables(self):
        if self._tables is None:
            self._tables = self.encoder.rotated_tables(self.Y, num_threads=1)
        return self._tables

    def scores(self, V):
        """ADC scores V (nq, k) of the centred codes plus <q, mean>: inner
        products, float32 (float64 sums)."""
        return _adc.add_offsets(V, self.Q, np.asarray(self.encoder.mean, np.float64))

    def rescore(self, cand, kk, codes, scales, cl=None):
        """Full-ADC top-kk of candidate rows (nq, c) (-1 = none); parallel over
        queries when there are many.  Field by field when that is cheaper
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
            return _adc.rescore_fields(self.Y, enc.levels32(), enc.field_layout(), codes, scales, cand, kk)
        return _adc.rescore_topk(self.tables(), codes, scales, cand, kk)


def _copy_rows(vectors):
    """The stored copy as the re-rank kernels read it: float32 rows, or the
    bit patterns (uint16) of float16 rows."""
    vectors = np.asarray(vectors)
    return vectors.view(np.uint16) if vectors.dtype == np.float16 else vectors


def _rerank_exact(Q, vectors, cand, k):
    """Exact inner products of each query with its candidate rows (-1 = none),
    accumulated in float64; top-k (scores float32 descending, rows -1 padded)."""
    V = _copy_rows(vectors)
    return _rr.rerank(np.ascontiguousarray(Q, np.float32), V, np.ascontiguousarray(cand, np.int64), k)


_KINDS = {"flat": FlatIndex, "ivf": IVFIndex, "hnsw": GraphIndex}


def load(path, mmap: bool = True) -> FlatIndex:
    """Load an index saved by ``save``; ``mmap=True`` maps the large arrays read-only."""
    meta, arrays = storage.load_arrays(path, mmap=mmap)
    if meta.get("library") != "ipq_index" or meta.get("kind") not in _KINDS:
        raise storage.FormatError(f"{path} does not hold an ipq_index index")
    return _KINDS[meta["kind"]]._from_state(meta, arrays)
