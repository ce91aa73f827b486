"""Inner-product-aware encoder: transform, per-dimension ASQ levels, bit allocation.

Training (``ASQEncoder.train``):

1. centre the corpus (inner products shift by the per-query constant <y, mean>,
   which is added back to every score, so rankings are unchanged);
2. optional orthogonal transform R (``"pca"``: eigenvectors of the covariance,
   ``"random"``: a seeded random rotation); queries are mapped by R^T, so
   <R^T y, R^T (x - mean)> = <y, x - mean>;
3. optional per-vector scale: each transformed vector is divided by its norm
   and the directions are quantized; scores are ``scale * ADC`` with a
   float32 scale per vector: the norm for unbiased rounding (keeps scores
   unbiased); for nearest rounding the direction is rounded after the
   pre-scale t in SCALE_SEARCH that best aligns the result with it, and the
   least-squares scale <z, z_hat> / <z_hat, z_hat> is stored.  The ASQ
   objective weighs each vector by norm^2, its share of the score variance.
   ``scale=None`` (a spec without ``s`` or ``n``) decides on the data: both
   encoders are trained and the scale kept when it finds significantly
   more of the true top-10 on a held-out sample (``_scale_trial``; the
   record: ``scale_choice``);
4. for every dimension and every width b = 1..max_bits, ASQ levels
   (``asq.solve_columns``, objective ``sum`` or ``max``) and their cost F_j(b);
5. bit allocation: widths b_j in 0..max_bits with sum b_j <= round(bits * d),
   minimising sum_j E[y_j^2] F_j(b_j) (E[y_j^2] from sample queries when
   given, else from the corpus; F_j the error of the configured rounding:
   variance for unbiased, squared error for nearest; unbiased needs >= 1 bit
   per dimension) by a price per bit (see ``allocate_bits``).  Fields pack
   into whole bytes without straddling, ceil(budget / 8) bytes per vector.

With nearest rounding the ASQ levels are refined by exact Lloyd iterations
(1-D k-means on the sorted column, ``lloyd_iters``): ASQ levels are optimal
for unbiased rounding, which must keep min and max as levels.

Encoding is ``"nearest"`` (default: lower error, measured higher recall) or
``"unbiased"`` (stochastic rounding keyed by a seed and the row number, so
E[score] = exact score and results reproduce).
"""

from __future__ import annotations

import heapq
import warnings
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from . import asq
from ._kernels import cand_adc as _cand
from ._kernels import checks as _checks
from ._kernels import codes as _codes
from ._kernels import fields as _field_adc
from ._kernels import rotation as _rotation
from ._kernels import rounding as _rk
from ._kernels import tables as _tables
from ._numba import concat_rows, map_chunks, readonly, split_rows

TRANSFORMS = ("none", "pca", "random")
#: pre-scales tried when rounding a direction to nearest levels (scaled codes)
SCALE_SEARCH = (0.8, 0.85, 0.9, 0.95, 1.0, 1.05, 1.1, 1.15, 1.2, 1.3)
ROUNDINGS = ("nearest", "unbiased")
#: cap on the approximate solver's grid while training (None: the solver's
#: default, which grows to 65,536 cells for 8-bit widths).  Measured on MiniLM
#: raw 50k, PCA,ASQ4: training 21.6 s -> 6.8 s, recall@10 0.9789 -> 0.9792
#: (nearest, Lloyd-refined anyway) and 0.9626 -> 0.9621 (unbiased)
ENCODER_MAX_GRID = 4096


@dataclass(frozen=True)
class EncoderConfig:
    """Settings of :class:`ASQEncoder` (validated on construction)."""

    bits: float = 4.0  #: average bits per dimension (fractional allowed)
    transform: str = "pca"
    objective: str = "sum"  #: ASQ objective within a dimension: "sum" or "max"
    rounding: str = "nearest"
    #: store a per-vector norm (4 bytes) and quantize directions; None: decided
    #: by ``train`` on the data (``ASQEncoder.scale_choice``)
    scale: bool | None = False
    max_bits: int = 8
    sample_size: int = 100_000  #: training rows used (seeded sample)
    #: ASQ method for the level sets: "approx", "exact", or "auto" (approx
    #: for the sum objective; the minimax objective is solved exactly)
    method: str = "auto"
    lloyd_iters: int = 25  #: nearest rounding: Lloyd refinement of the ASQ levels (0 = off)
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.bits, (int, float)) and 0 < self.bits <= 8):
            raise ValueError(f"bits per dimension must be in (0, 8], got {self.bits!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.objective not in asq.OBJECTIVES:
            raise ValueError(f"objective must be one of {asq.OBJECTIVES}, got {self.objective!r}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        if self.method == "auto":
            object.__setattr__(self, "method", "approx" if self.objective == "sum" else "exact")  # frozen
        if self.method not in asq.METHODS:
            raise ValueError(f"method must be one of {asq.METHODS} or 'auto', got {self.method!r}")
        if self.objective == "max" and self.method == "approx":
            raise ValueError('the minimax objective ("max", spec flag m) is solved exactly: method="exact"')
        if not (isinstance(self.max_bits, int) and 1 <= self.max_bits <= 8):
            raise ValueError(f"max_bits must be an int in 1..8, got {self.max_bits!r}")
        if self.scale is not None and not isinstance(self.scale, (bool, np.bool_)):
            raise ValueError(f"scale must be True, False or None (decided by train), got {self.scale!r}")
        if not (isinstance(self.sample_size, int) and self.sample_size >= 2):
            raise ValueError(f"sample_size must be an int >= 2, got {self.sample_size!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "EncoderConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown encoder settings: {sorted(unknown)}")
        return cls(**d)


def check_matrix(X, d: int | None, name: str, finite: bool = True) -> np.ndarray:
    """Validate a (n, d) real matrix and return it as C-contiguous float32.
    ``finite=False``: a float32 C-contiguous input's values are left to the
    caller's kernel to check (one kernel call less per single-query search)."""
    arr = np.asarray(X)
    if arr.dtype == np.float32 and arr.ndim == 2 and arr.flags.c_contiguous and arr.shape[0] and \
            (d is None or arr.shape[1] == d):  # fast path (a search call validates every query)
        if finite and not _checks.all_finite(arr):
            raise ValueError(f"{name} contains NaN or infinite values")
        return arr
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, d) array, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} has dimension {arr.shape[1]}, expected {d}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


@dataclass
class ASQEncoder:
    """Trained state: mean, rotation, per-dimension widths, levels and packing."""

    d: int
    config: EncoderConfig = field(default_factory=EncoderConfig)
    mean: np.ndarray | None = None  # (d,) float64
    rotation: np.ndarray | None = None  # (d, d) float32 or None (identity)
    bits: np.ndarray | None = None  # (d,) int32
    byte_of: np.ndarray | None = None  # (d,) int32
    shift_of: np.ndarray | None = None  # (d,) int32
    levels: np.ndarray | None = None  # flat float64
    level_off: np.ndarray | None = None  # (d+1,) int64
    nbytes: int = 0
    energy: np.ndarray | None = None  # (d,) E[y_j^2] used for the allocation
    #: how train decided the scale when the config left it open (``_scale_trial``), else None
    scale_choice: dict | None = None
    _fields: tuple | None = field(default=None, repr=False)  # per-byte field lists (derived)
    _vmax: np.ndarray | None = field(default=None, repr=False)  # variance bound per level (derived)
    _field_rows: np.ndarray | None = field(default=None, repr=False)  # see field_table (derived)
    _levels32: np.ndarray | None = field(default=None, repr=False)  # see levels32 (derived)
    _rot_half: tuple | None = field(default=None, repr=False)  # see rotation16 (derived)
    _field_blocks: tuple | None = field(default=None, repr=False)  # see field_layout (derived)
    _cand_layout: dict | None = field(default=None, repr=False)  # see candidate_layout (derived)
    _plans: dict = field(default_factory=dict, repr=False)  # index._rescore_plan's choices (derived)

    @property
    def is_trained(self) -> bool:
        return self.bits is not None

    @property
    def code_size(self) -> int:
        """Bytes per vector: packed codes plus the float32 scale if any."""
        return self.nbytes + (4 if self.config.scale else 0)

    # -- training ---------------------------------------------------------
    def train(self, X, queries=None, *, weights=None, num_threads=-1):
        """Learn the encoder; on any error the previous state is kept."""
        snapshot = dict(self.__dict__)
        try:
            if self.config.scale is None:
                return self._train_choosing_scale(X, queries, weights, num_threads)
            return self._train(X, queries, weights, num_threads)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(snapshot)
            raise

    def _train(self, X, queries, weights, num_threads):
        X = check_matrix(X, self.d, "training data")
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        X, weights = _training_sample(X, weights, cfg.sample_size, rng)
        Xd = X.astype(np.float64)
        self.mean = Xd.mean(axis=0)
        Xc = Xd - self.mean
        self.rotation = _fit_rotation(Xc, cfg.transform, rng)
        Z, w = self._training_columns(Xc, queries, weights)
        per_width, costs = self._level_sets(Z, w, num_threads)
        # unbiased scores need every dimension coded (a dropped one is biased)
        min_bits = 1 if cfg.rounding == "unbiased" and cfg.bits >= 1 else 0
        self._clear_derived()
        self.bits, self.byte_of, self.shift_of, self.nbytes = allocate_bits(
            self.energy, costs, int(round(cfg.bits * self.d)), min_bits)
        levels, off = [], [0]
        for j in range(self.d):
            b = int(self.bits[j])
            lv = per_width[b][j] if b > 0 else np.zeros(0)
            if b > 0 and lv.size < (1 << b):  # fewer distinct values than codes: pad
                lv = np.concatenate([lv, np.full((1 << b) - lv.size, lv[-1])])
            levels.append(lv)
            off.append(off[-1] + lv.size)
        self.levels = np.concatenate(levels).astype(np.float64)
        self.level_off = np.asarray(off, np.int64)
        self._freeze()
        return self

    def _train_choosing_scale(self, X, queries, weights, num_threads):
        """Train with and without the per-vector scale and keep the encoder
        ``_scale_trial`` picks (its config then says which)."""
        X = check_matrix(X, self.d, "training data")
        trained = {on: ASQEncoder(self.d, replace(self.config, scale=on))._train(X, queries, weights, num_threads)
                   for on in (False, True)}
        choice = _scale_trial(trained[False], trained[True], X, queries, self.config.seed)
        self.__dict__.update(trained[choice["scale"]].__dict__)
        self.scale_choice = choice
        return self

    def _training_columns(self, Xc, queries, weights):
        """The rotated (with scale: normalised) training rows Z as float32 and
        their ASQ weights w (norm^2 with scale, times ``weights``; None for
        unit weights); sets ``energy``, E[y_j^2] from the sample queries
        when given, else from the corpus."""
        cfg = self.config
        Z = self._rotate(Xc.astype(np.float32))
        # E[(R^T x)_j^2] = E[z_j^2] + (R^T mean)_j^2 since the z_j are centred
        corpus_energy = np.mean(Z.astype(np.float64) ** 2, axis=0) + self._rotate(self.mean[None, :])[0] ** 2
        w = None
        if cfg.scale:
            norms = np.linalg.norm(Z, axis=1)
            Z = Z / np.where(norms > 0, norms, 1.0)[:, None]
            w = norms**2
        if weights is not None:
            w = weights if w is None else w * weights
        if queries is not None:
            Qr = self._rotate(check_matrix(queries, self.d, "sample queries").astype(np.float64))
            self.energy = np.mean(Qr**2, axis=0)
        else:
            self.energy = corpus_energy
        return np.ascontiguousarray(Z, dtype=np.float32), w

    def _level_sets(self, Z, w, num_threads):
        """Levels of every column for every width b = 1..max_bits and their
        costs: ``(per_width, costs)``, per_width[b][j] the levels of column j
        at width b, costs (d, max_bits + 1) the rounding error (column 0:
        the error of dropping the column)."""
        cfg = self.config
        nb = cfg.max_bits
        costs = np.empty((self.d, nb + 1))
        wz = np.ones(Z.shape[0]) if w is None else w
        if cfg.objective == "sum":
            costs[:, 0] = (wz[:, None] * Z.astype(np.float64) ** 2).sum(axis=0)
        else:
            costs[:, 0] = (wz[:, None] * Z.astype(np.float64) ** 2).max(axis=0)
        widths = list(range(1, nb + 1))
        def grid(b):  # the approximate solver's grid for width b, capped (ENCODER_MAX_GRID)
            if cfg.method != "approx" or not ENCODER_MAX_GRID:
                return None
            return min(asq.default_grid(Z.shape[0], 1 << b), ENCODER_MAX_GRID)

        per_width = {b: asq.solve_columns(Z, 1 << b, weights=w, objective=cfg.objective, method=cfg.method,
                                          grid=grid(b), num_threads=num_threads)
                     for b in widths}
        # one pass per column: sort once, Lloyd-refine for nearest rounding,
        # and measure the error of every width's level set
        flat = [per_width[b][j] for j in range(self.d) for b in widths]
        off = np.zeros(len(flat) + 1, np.int64)
        off[1:] = np.cumsum([lv.size for lv in flat])
        levels_flat = np.concatenate(flat).astype(np.float64)
        refine = cfg.lloyd_iters if (cfg.rounding == "nearest" and cfg.objective == "sum") else 0
        set_ptr = np.arange(0, len(flat) + 1, len(widths), dtype=np.int64)
        zw = np.empty(0) if w is None else np.ascontiguousarray(w, np.float64)
        errs = column_costs(Z, zw, levels_flat, off, set_ptr, refine, cfg.rounding == "nearest",
                            cfg.objective == "max", num_threads)
        for j in range(self.d):
            for t, b in enumerate(widths):
                si = j * len(widths) + t
                per_width[b][j] = levels_flat[off[si]:off[si + 1]].copy()
                costs[j, b] = errs[si]
        return per_width, costs

    def _clear_derived(self):
        """Drop the structures derived from the trained state (rebuilt on demand)."""
        self._fields = None
        self._vmax = None
        self._field_rows = None
        self._levels32 = None
        self._field_blocks = None
        self._cand_layout = None
        self._plans = {}

    _STATE = ("mean", "rotation", "bits", "byte_of", "shift_of", "levels", "level_off", "energy")

    def _freeze(self):
        """Make the learnt arrays read-only (``_numba.readonly``)."""
        for name in self._STATE:
            setattr(self, name, readonly(getattr(self, name)))

    def _rotate(self, A):
        """A @ R in A's precision (float32 for bulk data, float64 for small inputs)."""
        return A if self.rotation is None else A @ self.rotation.astype(A.dtype, copy=False)

    # -- encoding ---------------------------------------------------------
    def _require_trained(self):
        if not self.is_trained:
            raise RuntimeError("the encoder is not trained: call train() first")

    def transform(self, X) -> tuple[np.ndarray, np.ndarray | None]:
        """Centred, rotated (and, with scale, normalised) rows + their norms."""
        Z = self._rotate((X.astype(np.float64) - self.mean).astype(np.float32)).astype(np.float64)
        norms = None
        if self.config.scale:
            norms = np.linalg.norm(Z, axis=1)
            Z = Z / np.where(norms > 0, norms, 1.0)[:, None]
        return np.ascontiguousarray(Z, dtype=np.float32), norms

    def _encode_rows(self, Z, unbiased, seed, row0, num_threads):
        """Codes of transformed rows Z (``_codes.encode``), rows split across threads."""
        def call(a, b, _part):
            return _codes.encode(Z[a:b], self.levels, self.level_off, self.bits, self.byte_of, self.shift_of,
                               self.nbytes, unbiased, seed, row0 + a)

        return concat_rows(map_chunks(call, Z.shape[0], num_threads, min_chunk=ROWS_PER_TASK))

    def _decode_rows(self, codes, num_threads=-1):
        """Transformed values (float32) of codes (``_codes.decode``), rows split across threads."""
        args = (self.levels, self.level_off, self.bits, self.byte_of, self.shift_of, self.d)
        return split_rows(_codes.decode, codes.shape[0], num_threads, (codes, *args), rows=(0,),
                          min_chunk=ROWS_PER_TASK)

    def encode(self, X, *, row0: int = 0, num_threads: int | None = -1):
        """(codes uint8 (n, nbytes), scales float32 (n,) or None)."""
        self._require_trained()
        X = check_matrix(X, self.d, "vectors")
        Z, norms = self.transform(X)
        if norms is None or self.config.rounding == "unbiased":
            codes = self._encode_rows(Z, self.config.rounding == "unbiased", int(self.config.seed), int(row0),
                                      num_threads)
            return codes, (None if norms is None else norms.astype(np.float32))
        # nearest rounding of a direction: pick, per vector, the pre-scale t
        # whose rounding of t * u is best aligned with u, then store the
        # least-squares scale <z, z_hat> / <z_hat, z_hat> (corrects the length)
        Zd = Z.astype(np.float64)
        best_cos = np.full(Z.shape[0], -np.inf)
        codes = None
        for t in SCALE_SEARCH:
            c = self._encode_rows(np.ascontiguousarray(Z * np.float32(t)), False, 0, 0, num_threads)
            Zh = self._decode_rows(c, num_threads).astype(np.float64)
            cos = np.einsum("ij,ij->i", Zh, Zd) / np.maximum(np.linalg.norm(Zh, axis=1), 1e-300)
            better = cos > best_cos
            if codes is None:
                codes = c
            else:
                codes[better] = c[better]
            best_cos[better] = cos[better]
        Zh = self._decode_rows(codes, num_threads).astype(np.float64)
        num = np.einsum("ij,ij->i", Zd, Zh) * norms
        den = np.einsum("ij,ij->i", Zh, Zh)
        norms = np.where(den > 0, num / np.where(den > 0, den, 1.0), norms)
        return codes, norms.astype(np.float32)

    def decode(self, codes, scales=None) -> np.ndarray:
        """Reconstructed vectors in the original space (float32), rotated back
        with the matrix queries are rotated with (``rotation32``): <q,
        decode(c)> is the ADC score of c plus <q, mean>."""
        self._require_trained()
        Z = self._decode_rows(codes).astype(np.float64)
        if scales is not None:
            Z *= scales[:, None]
        if self.rotation is not None:
            Z = Z @ self.rotation32().T.astype(np.float64)
        return (Z + self.mean).astype(np.float32)

    def rotate_queries(self, Q, num_threads: int | None = -1) -> np.ndarray:
        """Queries in the transformed space (float32): R^T q."""
        self._require_trained()
        Q = np.ascontiguousarray(Q, np.float32)
        if self.rotation is None:
            return Q
        R = self.rotation16() if _rotation.HALF_SIMD else self.rotation32()
        return split_rows(_rotation.rotate_rows, Q.shape[0], num_threads, (Q, R), rows=(0,))

    def rotation32(self) -> np.ndarray:
        """The rotation queries are transformed with, as a C-contiguous float32
        (d, d) array, or a (0, 0) array for the identity (what the fused
        search kernels take): the trained rotation rounded to float16
        (relative error <= 2^-11 per entry: y = R^T q moves by ~1e-4 |q|,
        far below the quantization error), so the single-query kernels can
        read it as float16 (``rotation16``: half the bytes) with the same
        sums."""
        return self._rotation_half()[1]

    def rotation16(self) -> np.ndarray:
        """``rotation32`` as float16 bit patterns (uint16 (d, d); (0, 0) for
        the identity)."""
        return self._rotation_half()[0]

    def _rotation_half(self):
        R = self.rotation
        if self._rot_half is None or self._rot_half[2] is not R:
            if R is None:
                pair = (np.zeros((0, 0), np.uint16), np.zeros((0, 0), np.float32))
            else:
                h = np.ascontiguousarray(R, np.float16)
                pair = (h.view(np.uint16), h.astype(np.float32))
            self._rot_half = (*pair, R)
        return self._rot_half

    def query_tables(self, Q, Y=None):
        """(tables (nq, nbytes, 256) float32, offsets (nq,) float64 = <q, mean>).

        ``Y``: the already rotated queries, if at hand.
        """
        Y = self.rotate_queries(Q) if Y is None else Y
        return self.rotated_tables(Y), Q.astype(np.float64) @ self.mean

    def rotated_tables(self, Y, num_threads: int | None = -1) -> np.ndarray:
        """Lookup tables (nq, nbytes, 256) float32 of already rotated queries Y."""
        ptr, order = self._byte_fields()
        return split_rows(_tables.build_tables, Y.shape[0], num_threads,
                          (Y, self.levels32(), self.level_off, self.bits, ptr, order, self.nbytes), rows=(0,))

    def _byte_fields(self):
        """CSR (ptr, dims) of each code byte's fields in increasing shift order."""
        if self._fields is None:
            order = np.lexsort((self.shift_of, self.byte_of))
            order = order[self.bits[order] > 0]
            ptr = np.searchsorted(self.byte_of[order], np.arange(self.nbytes + 1))
            self._fields = (ptr.astype(np.int64), order.astype(np.int64))
        return self._fields

    def levels32(self) -> np.ndarray:
        """The levels as float32 (what the lookup-table builder multiplies)."""
        if self._levels32 is None or self._levels32.size != self.levels.size:
            self._levels32 = np.ascontiguousarray(self.levels, np.float32)
        return self._levels32

    def field_table(self) -> np.ndarray:
        """(nfields, 5) int64 rows (dim, byte, shift, mask, level offset) of
        the dimensions with bits > 0, sorted by byte (for table-free ADC)."""
        if self._field_rows is None:
            js = np.nonzero(self.bits > 0)[0]
            js = js[np.lexsort((self.shift_of[js], self.byte_of[js]))]
            self._field_rows = np.ascontiguousarray(np.stack(
                [js, self.byte_of[js], self.shift_of[js], (1 << self.bits[js].astype(np.int64)) - 1,
                 self.level_off[js]], axis=1).astype(np.int64))
        return self._field_rows

    def field_layout(self) -> tuple:
        """The table-free ADC's view of the codes: (``field_table()``, block
        starts int64 (nb,), lanes int32 (nb, 4, 16), lane dims int64 (nb * 16,)).

        Consecutive fields (in byte order) form blocks of up to 16 whose
        bytes lie within 16 bytes of the block's start; lane l of block b
        reads byte starts[b] + (the l-th byte of F[b, 0]) of a code row,
        shifts it right by F[b, 1, l], masks it with F[b, 2, l] and adds the
        level offset F[b, 3, l]; unused lanes have dim -1 (weight 0, level
        0).  No blocks (nb = 0) when a code row is shorter than 16 bytes or
        the CPU lacks the byte shuffle (``_field_adc.FIELD_SIMD``): the ADC then
        reads the table one field at a time."""
        if self._field_blocks is None:
            table = self.field_table()
            L = _field_adc.FIELD_LANES
            blocks = []
            if _field_adc.FIELD_SIMD and self.nbytes >= L:
                for f in range(table.shape[0]):
                    if not blocks or len(blocks[-1]) == L or table[f, 1] - table[blocks[-1][0], 1] >= L:
                        blocks.append([])
                    blocks[-1].append(f)
            nb = len(blocks)
            starts = np.zeros(nb, np.int64)
            lanes = np.zeros((nb, 4, L), np.int32)
            dims = np.full(nb * L, -1, np.int64)
            for b, fs in enumerate(blocks):
                starts[b] = min(int(table[fs[0], 1]), self.nbytes - L)  # the 16-byte window stays in the row
                offs = np.zeros(L, np.uint8)
                offs[:len(fs)] = table[fs, 1] - starts[b]
                lanes[b, 0, :L // 4] = offs.view(np.int32)
                lanes[b, 1:, :len(fs)] = table[fs, 2:5].T
                dims[b * L:b * L + len(fs)] = table[fs, 0]
            self._field_blocks = (table, starts, lanes, dims)
        return self._field_blocks

    def candidate_layout(self, keep=None) -> tuple | None:
        """The SIMD candidate ADC's view of the codes
        (``cand_adc.candidate_layout``: fields by width class, 16-bit table
        offsets) for the dimensions of bool mask ``keep`` (None: all), or None
        when that kernel cannot serve them: the CPU lacks AVX-512 VBMI, code
        rows are shorter than 8 bytes, no kept dimension is coded, or some
        kept dimension's levels do not increase (the tables take each
        field's extremes from its end levels).  Cached per mask."""
        key = None if keep is None else np.asarray(keep, bool).tobytes()
        if self._cand_layout is None:
            self._cand_layout = {}
        if key not in self._cand_layout:
            table = self.field_table()
            if keep is not None:
                table = table[np.asarray(keep, bool)[table[:, 0]]]
            lv = np.asarray(self.levels, np.float64)
            ok = _cand.CAND_SIMD and self.nbytes >= 8 and table.shape[0] > 0
            ok = ok and all(np.all(np.diff(lv[self.level_off[j]:self.level_off[j + 1]]) > 0) for j in table[:, 0])
            self._cand_layout[key] = _cand.candidate_layout(table, self.level_off, self.nbytes) if ok else None
        return self._cand_layout[key]

    def variance_tables(self, Y):
        """Per-byte tables of an upper bound on the variance of unbiased rounding:
        V[q, g, c] = sum over fields j of byte g of y_j^2 vmax_j(c_j), where a
        value coded as level L[c] lay in [L[c-1], L[c+1]], so its rounding
        variance (b - x)(x - a) is at most max(adjacent gap)^2 / 4."""
        if self._vmax is None:
            vm = np.zeros_like(self.levels)
            for j in range(self.d):
                L = self.levels[self.level_off[j]:self.level_off[j + 1]]
                if L.size < 2:
                    continue
                gaps = np.diff(L) ** 2 / 4.0
                vm[self.level_off[j]:self.level_off[j + 1]] = np.maximum(
                    np.concatenate([[0.0], gaps]), np.concatenate([gaps, [0.0]]))
            self._vmax = vm
        Y2 = np.ascontiguousarray(np.asarray(Y, np.float64) ** 2, np.float32)
        ptr, order = self._byte_fields()
        return _tables.build_tables(Y2, self._vmax.astype(np.float32), self.level_off, self.bits, ptr, order,
                                 self.nbytes)

    # -- persistence ------------------------------------------------------
    def state(self) -> tuple[dict, dict]:
        meta = {"d": self.d, "config": asdict(self.config), "nbytes": self.nbytes}
        if self.scale_choice is not None:
            meta["scale_choice"] = self.scale_choice
        arrays = {"enc.mean": self.mean, "enc.bits": self.bits, "enc.byte_of": self.byte_of,
                  "enc.shift_of": self.shift_of, "enc.levels": self.levels,
                  "enc.level_off": self.level_off, "enc.energy": self.energy}
        if self.rotation is not None:
            arrays["enc.rotation"] = self.rotation
        return meta, arrays

    @classmethod
    def from_state(cls, meta: dict, arrays: dict) -> "ASQEncoder":
        enc = cls(int(meta["d"]), EncoderConfig.from_dict(meta["config"]))
        if enc.config.scale is None:
            raise ValueError("encoder state has no decided scale")
        enc.scale_choice = meta.get("scale_choice")
        enc.nbytes = int(meta["nbytes"])
        enc.mean = np.asarray(arrays["enc.mean"])
        enc.rotation = np.asarray(arrays["enc.rotation"]) if "enc.rotation" in arrays else None
        for name in ("bits", "byte_of", "shift_of", "levels", "level_off", "energy"):
            setattr(enc, name, np.ascontiguousarray(arrays[f"enc.{name}"]))
        enc._freeze()
        return enc


#: the scale trial (``_scale_trial``): queries, rows and k of its top-k
SCALE_TRIAL_QUERIES, SCALE_TRIAL_ROWS, SCALE_TRIAL_K = 256, 20_000, 10


def _scale_trial(plain, scaled, X, queries, seed) -> dict:
    """Whether the per-vector scale pays, measured: on a seeded sample of
    rows (``SCALE_TRIAL_ROWS``) and of queries (the sample queries, else
    other rows of X), how many of each query's exact top-k inner products
    (``SCALE_TRIAL_K``) each encoder's ADC scores put in its top-k.  The
    scale (4 bytes per vector) is kept when it misses fewer by more than
    twice the standard error of the paired difference.  Returns the record
    ``{"scale", "recall_plain", "recall_scaled", "queries", "rows", "k"}``
    (too few rows to measure: no scale)."""
    rng = np.random.default_rng(seed + 1)
    n = X.shape[0]
    if queries is not None:
        Q = check_matrix(queries, X.shape[1], "sample queries")
        Q = Q[np.sort(rng.permutation(Q.shape[0])[:SCALE_TRIAL_QUERIES])]
        rows = np.sort(rng.permutation(n)[:SCALE_TRIAL_ROWS])
    else:
        perm = rng.permutation(n)
        nq = min(SCALE_TRIAL_QUERIES, n // 4)
        Q, rows = X[np.sort(perm[:nq])], np.sort(perm[nq:nq + SCALE_TRIAL_ROWS])
    k = min(SCALE_TRIAL_K, rows.size // 4)
    record = {"scale": False, "recall_plain": None, "recall_scaled": None, "queries": int(Q.shape[0]),
              "rows": int(rows.size), "k": int(k)}
    if k < 1 or Q.shape[0] < 8:
        return record
    D = X[rows]
    Q64 = Q.astype(np.float64)

    def top(S):
        return np.argpartition(-S, k - 1, axis=1)[:, :k]

    truth = top(Q64 @ D.astype(np.float64).T)
    hits = {}
    for name, enc in (("plain", plain), ("scaled", scaled)):
        codes, sc = enc.encode(D)
        found = top(Q64 @ enc.decode(codes, sc).astype(np.float64).T)
        hits[name] = np.array([np.intersect1d(a, b).size for a, b in zip(truth, found)], np.float64)
        record[f"recall_{name}"] = round(float(hits[name].mean()) / k, 4)
    gain = hits["scaled"] - hits["plain"]
    se = gain.std(ddof=1) / np.sqrt(gain.size) if gain.size > 1 else np.inf
    record["scale"] = bool(gain.mean() > 2.0 * se)
    return record


def _training_sample(X, weights, sample_size, rng):
    """At most ``sample_size`` rows of X (a seeded sample, in row order) and
    their weights (checked: one per row of X, or None)."""
    if weights is not None:
        weights = np.asarray(weights, np.float64).reshape(-1)
        if weights.shape != (X.shape[0],):
            raise ValueError(f"weights must have one entry per training row ({X.shape[0]}), "
                             f"got {weights.shape[0]}")
        if not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be finite and non-negative")
        if not weights.any():
            raise ValueError("weights are all zero: no training row would count")
    if X.shape[0] > sample_size:
        sel = np.sort(rng.choice(X.shape[0], sample_size, replace=False))
        X = X[sel]
        weights = None if weights is None else weights[sel]
        if weights is not None and not weights.any():
            raise ValueError(f"the weights of the {sample_size} sampled training rows are all zero")
    if X.shape[0] < 2:
        raise ValueError("training needs at least 2 vectors")
    return X, weights


def _fit_rotation(Xc, transform, rng):
    """The rotation R (float32) of ``transform`` for centred rows Xc, None for ``"none"``:
    ``"pca"`` the covariance's eigenvectors by decreasing eigenvalue,
    ``"random"`` a seeded Haar-random orthogonal matrix."""
    if transform == "pca":
        n, d = Xc.shape
        if n <= d:
            warnings.warn(f"PCA fitted on {n} training rows of {d} dimensions: at most {n - 1} components are "
                          "learnt, the others are arbitrary (train on more rows than dimensions)", stacklevel=4)
        cov = Xc.T @ Xc / Xc.shape[0]
        evals, evecs = np.linalg.eigh(cov)
        return np.ascontiguousarray(evecs[:, ::-1], dtype=np.float32)
    if transform == "random":
        d = Xc.shape[1]
        g = rng.standard_normal((d, d))
        qm, r = np.linalg.qr(g)
        return np.ascontiguousarray(qm * np.sign(np.diag(r)), dtype=np.float32)
    return None


#: rows per task when encoding or decoding on several threads
ROWS_PER_TASK = 4096


def column_costs(Z, w, levels, level_off, set_ptr, refine_iters, nearest, objective_max, num_threads=-1):
    """``_rk.column_costs`` of every column of Z (level sets refined in
    place), the columns split across threads."""
    def call(j0, j1, _part):
        return _rk.column_costs(Z, w, levels, level_off, set_ptr, int(refine_iters), bool(nearest),
                                bool(objective_max), j0, j1)

    return np.sum(map_chunks(call, Z.shape[1], num_threads), axis=0)


#: field widths that always pack whole bytes exactly (first-fit decreasing)
POW2_WIDTHS = (0, 1, 2, 4, 8)


def allocate_bits(energy, costs, budget, min_bits=0):
    """Widths b_j in min_bits..max_bits minimising sum_j energy_j * costs[j, b_j]
    with the fields packed into ceil(budget / 8) bytes (no field straddles a
    byte).  ``costs`` is (d, max_bits + 1) with +inf for unavailable widths.

    Cost curves need not be convex (0 bits, which drops a dimension, can
    beat 1 bit of unbiased rounding), so widths come from a price per bit:
    each dimension takes argmin_b energy_j costs[j, b] + mu b, with mu the
    smallest price whose total fits the budget (bisection); leftover bits
    then go to the best gain per bit.  If first-fit-decreasing packing needs
    more bytes than allowed, the field whose demotion (to the next smaller
    width) loses least per bit is demoted until it fits; widths that are
    powers of two always pack exactly, so this ends.
    Returns (bits, byte_of, shift_of, nbytes).
    """
    d = costs.shape[0]
    Wc = np.maximum(np.asarray(energy, np.float64), 0.0)[:, None] * np.asarray(costs, np.float64)
    Wc[:, :min_bits] = np.inf
    Wc[~np.isfinite(Wc)] = np.inf
    if budget < min_bits * d:
        raise ValueError(f"a budget of {budget} bits cannot give every dimension {min_bits} bit(s)")
    bits = _priced_widths(Wc, budget)
    _top_up(Wc, bits, budget)
    byte_of, nbytes = _repair_packing(Wc, bits, min_bits, max(1, -(-budget // 8)))
    _packed_top_up(Wc, bits, byte_of, nbytes, budget)
    shift_of = np.zeros(d, np.int32)
    fill = np.zeros(nbytes, np.int64)
    for j in np.nonzero(bits)[0]:
        shift_of[j] = fill[byte_of[j]]
        fill[byte_of[j]] += bits[j]
    assert fill.max(initial=0) <= 8
    return bits.astype(np.int32), byte_of.astype(np.int32), shift_of, nbytes


def _priced_widths(Wc, budget):
    """Widths argmin_b Wc[j, b] + mu b at the smallest price mu whose total
    fits the budget (bisection)."""
    widths = np.arange(Wc.shape[1])

    def pick(mu):
        return np.argmin(Wc + mu * widths, axis=1)

    lo, hi = 0.0, 1.0
    while pick(hi).sum() > budget and hi < 1e300:
        hi *= 4.0
    if pick(lo).sum() <= budget:
        hi = lo
    for _ in range(200):
        if hi - lo <= 1e-12 * hi:
            break
        mid = 0.5 * (lo + hi)
        if pick(mid).sum() > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)


def _top_up(Wc, bits, budget):
    """Give the bits left in the budget, one step at a time, to the field
    whose next finite width gains most per bit (``bits`` updated in place)."""
    d, nb1 = Wc.shape
    rows = np.arange(d)

    def next_up(b):
        """Next width above b with a finite cost for each row (b if none)."""
        up = b.copy()
        for j in range(d):
            for c in range(b[j] + 1, nb1):
                if np.isfinite(Wc[j, c]):
                    up[j] = c
                    break
        return up

    while True:
        left = budget - bits.sum()
        up = next_up(bits)
        step = up - bits
        gain = np.where(step > 0, (Wc[rows, bits] - Wc[rows, up]) / np.maximum(step, 1), -np.inf)
        gain[step > left] = -np.inf
        j = int(np.argmax(gain))
        if not gain[j] > 0:
            break
        bits[j] = up[j]


def _repair_packing(Wc, bits, min_bits, target):
    """Demote fields (``bits`` in place) until first-fit-decreasing packing
    needs at most ``target`` bytes: each time the field whose step down to
    its next finite width loses least per bit; fields of power-of-two widths
    stay (they always pack exactly).  Returns ``(byte_of, nbytes)``."""
    d = Wc.shape[0]
    while True:
        byte_of, shift_of, nbytes = pack_fields(bits)
        if nbytes <= target:
            return byte_of, nbytes
        best, best_loss = -1, np.inf
        for j in range(d):
            if bits[j] in POW2_WIDTHS:
                continue
            for c in range(bits[j] - 1, min_bits - 1, -1):
                if np.isfinite(Wc[j, c]):
                    loss = (Wc[j, c] - Wc[j, bits[j]]) / (bits[j] - c)
                    if loss < best_loss:
                        best, best_loss, best_c = j, loss, c
                    break
        if best < 0:  # only powers of two left: they pack exactly
            raise AssertionError("packing failed with power-of-two widths")
        bits[best] = best_c


def _packed_top_up(Wc, bits, byte_of, nbytes, budget):
    """Packing-aware top-up: spend the bits the repair freed (``bits`` and
    ``byte_of`` in place).  A field may grow in its byte or move to a byte
    with room; shifts are assigned afterwards."""
    nb1 = Wc.shape[1]
    rows = np.arange(Wc.shape[0])
    used = np.bincount(byte_of[bits > 0], weights=bits[bits > 0], minlength=nbytes).astype(np.int64)
    cols = np.arange(nb1)
    while True:
        left = budget - int(bits.sum())
        if left <= 0:
            break
        cur = Wc[rows, bits]
        gain = (cur[:, None] - Wc) / np.maximum(cols[None, :] - bits[:, None], 1)
        gain[(cols[None, :] <= bits[:, None]) | (cols[None, :] - bits[:, None] > left) | ~np.isfinite(gain)] = -np.inf
        order = np.argsort(-gain, axis=None)
        moved = False
        for flat in order:
            j, c = divmod(int(flat), nb1)
            if not gain[j, c] > 0:
                break
            g = int(byte_of[j])
            if bits[j] > 0 and used[g] + c - bits[j] <= 8:
                used[g] += c - bits[j]
            else:
                room = np.nonzero(used + c <= 8)[0]
                room = room[room != g] if bits[j] > 0 else room
                if room.size == 0:
                    continue
                if bits[j] > 0:
                    used[g] -= bits[j]
                h = int(room[0])
                used[h] += c
                byte_of[j] = h
            bits[j] = c
            moved = True
            break
        if not moved:
            break


def pack_fields(bits):
    """First-fit decreasing packing of bit fields into bytes: (byte_of, shift_of, nbytes).

    O(d log d): for each free amount a min-heap of byte indices gives the
    first byte with enough room.
    """
    bits = np.asarray(bits)
    d = bits.size
    byte_of = np.zeros(d, np.int32)
    shift_of = np.zeros(d, np.int32)
    free_heaps = [[] for _ in range(9)]  # free bits -> heap of byte indices
    nbytes = 0
    for j in sorted(range(d), key=lambda j: -int(bits[j])):
        b = int(bits[j])
        if b == 0:
            continue
        best_g, best_f = None, None
        for f in range(b, 9):
            if free_heaps[f] and (best_g is None or free_heaps[f][0] < best_g):
                best_g, best_f = free_heaps[f][0], f
        if best_g is None:
            g, f = nbytes, 8
            nbytes += 1
        else:
            g, f = heapq.heappop(free_heaps[best_f]), best_f
        byte_of[j] = g
        shift_of[j] = 8 - f
        if f - b > 0:
            heapq.heappush(free_heaps[f - b], g)
    return byte_of, shift_of, max(1, nbytes)
